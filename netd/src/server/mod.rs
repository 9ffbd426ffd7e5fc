//! `netd daemon`'s server: one [`Controller`] kept in memory (its database connection and
//! prepared statements stay open), shared with the daemon's Docker plugin, served as JSON over HTTP/1.1 on a unix socket, next to the
//! periodic clean-up (conntrack sweep, `gc`, following the uplink). The CLI doesn't need it: every command works on
//! the state directly, and the two can run side by side (changes take the same kernel lock).
//!
//! API (`/v1`; bodies and answers are JSON; an error is `{"error": "one line"}` with status
//! 400 for a refused request, 404 for an unknown path):
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /v1/networks` | | `[Network]` |
//! | `POST /v1/networks` | `NetworkSpec` | `Network` |
//! | `GET /v1/networks/NAME` | | `Network` |
//! | `DELETE /v1/networks/NAME` | | `{}` |
//! | `GET /v1/containers` | | `[Container]` |
//! | `POST /v1/containers` | `ContainerSpec` | `Container` |
//! | `GET /v1/containers/NAME` | | `Container` |
//! | `DELETE /v1/containers/NAME` | | `{}` |
//! | `POST /v1/containers/NAME/ports` | `[Publish]` | `[PortMapping]` (the new ones) |
//! | `DELETE /v1/containers/NAME/ports` | `[Publish]` | `[PortMapping]` (the ones unpublished) |
//! | `POST /v1/links` | `{"a", "b", "addrs": LinkAddrs}` | `{}` |
//! | `POST /v1/gc` | | `{"containers", "networks", "ports", "links"}` |
//!
//! Requests are served one at a time, in order (the core changes the kernel under one lock
//! anyway). The socket is root's alone (mode 0600, from the moment it exists), a body is at
//! most 4 MiB, and a client gets 30 s to send a request's headers.

use std::{os::unix::fs::FileTypeExt as _, path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::sys::stat::{Mode, umask};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    task::LocalSet,
};

use crate::{
    core::{
        Controller,
        spec::{ContainerSpec, LinkAddrs, NetworkSpec, Publish},
    },
    engines::core::SharedController,
};

/// `POST /v1/links`'s body.
#[derive(Debug, Serialize, Deserialize)]
pub struct LinkRequest {
    pub a: String,
    pub b: String,
    #[serde(default)]
    pub addrs: LinkAddrs,
}

/// The controller, shared by the connections and the sweeper (on this thread) and the Docker
/// plugin (on a thread of its own).
type Shared = SharedController;

/// The largest request body either socket reads: bigger ones would only cost memory.
const MAX_BODY: usize = 4 << 20;
/// How long a client may take to send a request's headers before its connection is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed accept (out of file descriptors): it would fail again at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Binds `socket` for root alone, non-blocking for the runtime that will serve it: a stale
/// socket is replaced, never a live daemon's or any other file. The socket is created mode
/// 0600 (under umask 0177): set after the bind, a client that connected in between would keep
/// its connection.
pub(crate) fn bind_private(socket: &Path) -> Result<std::os::unix::net::UnixListener> {
    remove_stale_socket(socket)?;
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(socket);
    umask(old);
    let listener = bound.with_context(|| format!("listen on {}", socket.display()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves HTTP/1.1 on `stream` with `service` until the client goes: headers must come within
/// [`HEADER_TIMEOUT`]. `what` names the socket in the error reported.
pub(crate) async fn serve_connection<S>(stream: tokio::net::UnixStream, service: S, what: &str)
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Err(e) = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        eprintln!("netd daemon: {what} connection: {e}");
    }
}

/// Reports a failed accept on `what` and waits a moment before the next one.
pub(crate) async fn accept_failed(what: &str, e: std::io::Error) {
    eprintln!("netd daemon: accept on {what}: {e}");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// A request's body, at most [`MAX_BODY`] bytes.
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, String> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => {
            Err(format!("request body over {} MiB", MAX_BODY >> 20))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Makes way for the daemon's socket: one left by a daemon that is gone is removed; a live
/// daemon's socket, or any other file, stays and the daemon doesn't start.
fn remove_stale_socket(socket: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("inspect {}", socket.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket: not replaced",
            socket.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!("a daemon already serves {}", socket.display());
    }
    std::fs::remove_file(socket).with_context(|| format!("remove {}", socket.display()))
}

/// Serves `socket` and sweeps every `interval` until SIGINT or SIGTERM.
pub async fn run(shared: Shared, socket: &Path, interval: Duration) -> Result<()> {
    // Before the socket exists: once a client can connect, SIGTERM stops the daemon cleanly.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let listener = tokio::net::UnixListener::from_std(bind_private(socket)?)?;
    let mut tick = tokio::time::interval(interval);
    eprintln!(
        "netd daemon: serving {}, sweeping every {}s",
        socket.display(),
        interval.as_secs_f64()
    );
    // The core's futures hold the datapath driver (not `Send`): everything runs on this thread.
    let local = LocalSet::new();
    local
        .run_until(async {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            let service = service_fn(move |req| handle(shared.clone(), req));
                            tokio::task::spawn_local(serve_connection(stream, service, "API"));
                        }
                        Err(e) => accept_failed("the API socket", e).await,
                    },
                    _ = tick.tick() => sweep_once(&shared).await,
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
            }
        })
        .await;
    std::fs::remove_file(socket).ok();
    eprintln!("netd daemon: stopped");
    Ok(())
}

/// One round of clean-up; a failure is reported and the daemon carries on.
async fn sweep_once(shared: &Shared) {
    let mut ctl = shared.lock().await;
    let round = async {
        let collected = ctl.gc().await?;
        let swept = ctl.datapaths().conntrack_sweep()?;
        // A new default route, uplink address or interface: the eBPF datapath's NAT follows.
        let followed = ctl.datapaths().follow_host()?;
        if let Some(uplink) = &followed.uplink {
            eprintln!("netd daemon: the uplink is now {uplink}");
        }
        for iface in &followed.added {
            eprintln!("netd daemon: masquerading through {iface}");
        }
        for iface in &followed.removed {
            eprintln!("netd daemon: no longer masquerading through {iface}");
        }
        anyhow::Ok((collected, swept))
    };
    match round.await {
        Ok((collected, swept)) if !collected.is_empty() || swept > 0 => eprintln!(
            "netd daemon: {swept} conntrack entries swept, {} half-made containers removed, {} userland proxies restarted, {} ended",
            collected.containers.len(),
            collected.proxies.started,
            collected.proxies.ended
        ),
        Ok(_) => {}
        Err(e) => eprintln!("netd daemon: {e:#}"),
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, body: serde_json::Value) -> Answer {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(
    shared: Shared,
    req: Request<Incoming>,
) -> Result<Answer, std::convert::Infallible> {
    let method = req.method().clone();
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(String::from)
        .collect();
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return Ok(answer(StatusCode::BAD_REQUEST, json!({"error": e}))),
    };
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let mut ctl = shared.lock().await;
    Ok(match route(&mut ctl, &method, &path, &body).await {
        Some(Ok(value)) => answer(StatusCode::OK, value),
        Some(Err(e)) => answer(StatusCode::BAD_REQUEST, json!({"error": format!("{e:#}")})),
        None => answer(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no such endpoint: {method} /{}", path.join("/"))}),
        ),
    })
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).context("invalid request body")
}

fn to_json<T: Serialize>(value: T) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(value)?)
}

/// Calls the core for one request; `None` for a path the API doesn't have.
async fn route(
    ctl: &mut Controller,
    method: &Method,
    path: &[&str],
    body: &[u8],
) -> Option<Result<serde_json::Value>> {
    let done = || Ok(json!({}));
    Some(match (method, path) {
        (&Method::GET, ["v1", "networks"]) => ctl.networks().and_then(to_json),
        (&Method::POST, ["v1", "networks"]) => match parse::<NetworkSpec>(body) {
            Ok(spec) => ctl.create_network(spec).await.and_then(to_json),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "networks", name]) => ctl.network(name).and_then(to_json),
        (&Method::DELETE, ["v1", "networks", name]) => {
            ctl.remove_network(name).await.and_then(|()| done())
        }
        (&Method::GET, ["v1", "containers"]) => ctl.containers().and_then(to_json),
        (&Method::POST, ["v1", "containers"]) => match parse::<ContainerSpec>(body) {
            Ok(spec) => ctl.create_container(spec).await.and_then(to_json),
            Err(e) => Err(e),
        },
        (&Method::GET, ["v1", "containers", name]) => ctl.container(name).and_then(to_json),
        (&Method::DELETE, ["v1", "containers", name]) => {
            ctl.remove_container(name).await.and_then(|()| done())
        }
        (&Method::POST, ["v1", "containers", name, "ports"]) => match parse::<Vec<Publish>>(body) {
            Ok(requests) => ctl.publish(name, &requests).await.and_then(to_json),
            Err(e) => Err(e),
        },
        (&Method::DELETE, ["v1", "containers", name, "ports"]) => {
            match parse::<Vec<Publish>>(body) {
                Ok(requests) => ctl.unpublish(name, &requests).await.and_then(to_json),
                Err(e) => Err(e),
            }
        }
        (&Method::POST, ["v1", "links"]) => match parse::<LinkRequest>(body) {
            Ok(l) => ctl.link(&l.a, &l.b, l.addrs).await.and_then(|()| done()),
            Err(e) => Err(e),
        },
        (&Method::POST, ["v1", "gc"]) => ctl.gc().await.map(|c| {
            json!({
                "containers": c.containers,
                "networks": c.networks,
                "ports": c.ports,
                "links": c.links,
                "proxies_started": c.proxies.started,
                "proxies_ended": c.proxies.ended,
            })
        }),
        _ => return None,
    })
}
