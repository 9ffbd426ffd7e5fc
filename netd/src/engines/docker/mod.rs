//! netd as a Docker network and IPAM driver: a legacy (socket) plugin that Docker discovers
//! by its socket in `/run/docker/plugins`, speaking Docker's plugin protocol (HTTP POSTs of
//! JSON) for `netd daemon --docker-plugin NAME`.

pub mod ipam;
pub mod network_driver;
pub mod protocol;

use std::{
    convert::Infallible,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    rc::Rc,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::{net::UnixListener, sync::oneshot};

use crate::{
    datapath::DatapathKind,
    engines::core::{Core, SharedController},
    server,
};

/// Where Docker looks for plugin sockets.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// The plugin being served; dropping it stops serving and removes the socket.
pub struct Served {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("netd daemon: the plugin thread panicked");
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            eprintln!("netd daemon: remove {}: {e}", self.socket.display());
        }
    }
}

/// Binds `dir/NAME.sock` and serves the plugin on it from a thread of its own (the
/// controller's futures stay on one thread: its datapath handles aren't `Send`), on the
/// process's shared controller; networks whose options name no datapath get `datapath`.
pub fn serve(
    shared: SharedController,
    datapath: DatapathKind,
    name: &str,
    dir: &Path,
) -> Result<Served> {
    crate::core::spec::validate_name("Docker plugin", name)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let socket = dir.join(format!("{name}.sock"));
    let listener = server::bind_private(&socket)?;
    eprintln!(
        "netd daemon: Docker network and IPAM driver {name:?} on {}",
        socket.display()
    );
    let (stop, stopped) = oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread = std::thread::spawn(move || {
        let plugin = Rc::new(Plugin { shared, datapath });
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, accept_loop(listener, plugin, stopped));
    });
    Ok(Served {
        stop: Some(stop),
        thread: Some(thread),
        socket,
    })
}

async fn accept_loop(
    listener: std::os::unix::net::UnixListener,
    plugin: Rc<Plugin>,
    mut stopped: oneshot::Receiver<()>,
) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("netd daemon: the plugin socket: {e}");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    server::accept_failed("the plugin socket", e).await;
                    continue;
                }
            },
            _ = &mut stopped => return,
        };
        let plugin = plugin.clone();
        let service = service_fn(move |req| answer(plugin.clone(), req));
        tokio::task::spawn_local(server::serve_connection(stream, service, "plugin"));
    }
}

struct Plugin {
    /// The daemon's controller. A request holds it while it runs, which also serialises the
    /// requests (IPAM's answers depend on what was handed out before).
    shared: SharedController,
    /// The datapath of networks whose options name none.
    datapath: DatapathKind,
}

/// What went wrong with a request: Docker shows the message.
enum Failure {
    /// The request can't be decoded.
    BadRequest(String),
    /// A verb netd doesn't implement.
    NotFound(String),
    /// The request is fine; netd could not do it.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Failed(e)
    }
}

async fn answer(
    plugin: Rc<Plugin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let verb = req.uri().path().trim_start_matches('/').to_string();
    let body = match server::read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return Ok(reply(&verb, Err(Failure::BadRequest(e)))),
    };
    let outcome = plugin.dispatch(&verb, &body).await;
    if let Err(Failure::Failed(e)) = &outcome {
        eprintln!("netd daemon: {verb}: {e:#}");
    }
    Ok(reply(&verb, outcome))
}

/// Errors as Docker reads them: HTTP 200 for a failed operation, its message in the field
/// the API's response has (the network driver's `{"Err"}`, IPAM's `{"Error"}`); 400 for an
/// undecodable request and 404 for a verb netd doesn't implement, with `{"Err"}`, which
/// Docker's plugin client reads from any answer other than 200.
fn reply(verb: &str, outcome: Result<Value, Failure>) -> Response<Full<Bytes>> {
    let failed_field = if verb.starts_with("IpamDriver.") {
        "Error"
    } else {
        "Err"
    };
    let (status, body) = match outcome {
        Ok(v) => (StatusCode::OK, v),
        Err(Failure::Failed(e)) => (StatusCode::OK, json!({ failed_field: format!("{e:#}") })),
        Err(Failure::BadRequest(msg)) => (StatusCode::BAD_REQUEST, json!({ "Err": msg })),
        Err(Failure::NotFound(msg)) => (StatusCode::NOT_FOUND, json!({ "Err": msg })),
    };
    Response::builder()
        .status(status)
        .header("Content-Type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn decode<T: DeserializeOwned>(verb: &str, body: &[u8]) -> Result<T, Failure> {
    // Docker posts no body (or `null`) for the verbs without arguments.
    let body = if body.is_empty() {
        b"null" as &[u8]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| Failure::BadRequest(format!("{verb}: {e}")))
}

impl Plugin {
    /// The daemon's controller, for one request.
    async fn core(&self) -> Core {
        Core::lock(self.shared.clone()).await
    }

    async fn dispatch(&self, verb: &str, body: &[u8]) -> Result<Value, Failure> {
        use network_driver as nd;
        Ok(match verb {
            "Plugin.Activate" => json!({ "Implements": ["NetworkDriver", "IpamDriver"] }),
            "NetworkDriver.GetCapabilities" => nd::capabilities(),
            "NetworkDriver.CreateNetwork" => {
                let spec = nd::network_spec(decode(verb, body)?, self.datapath)?;
                nd::create_network(&mut self.core().await, spec).await?
            }
            "NetworkDriver.DeleteNetwork" => {
                nd::delete_network(&mut self.core().await, decode(verb, body)?).await?
            }
            "NetworkDriver.CreateEndpoint" => {
                nd::create_endpoint(&mut self.core().await, decode(verb, body)?).await?
            }
            "NetworkDriver.DeleteEndpoint" => {
                nd::delete_endpoint(&mut self.core().await, decode(verb, body)?).await?
            }
            "NetworkDriver.EndpointOperInfo" => {
                nd::endpoint_oper_info(&mut self.core().await, decode(verb, body)?)?
            }
            "NetworkDriver.Join" => nd::join(&mut self.core().await, decode(verb, body)?).await?,
            "NetworkDriver.Leave" => nd::leave(decode(verb, body)?),
            "NetworkDriver.ProgramExternalConnectivity" => {
                let mut core = self.core().await;
                nd::program_external_connectivity(&mut core, decode(verb, body)?).await?
            }
            "NetworkDriver.RevokeExternalConnectivity" => {
                let mut core = self.core().await;
                nd::revoke_external_connectivity(&mut core, decode(verb, body)?).await?
            }
            "IpamDriver.GetCapabilities" => ipam::capabilities(),
            "IpamDriver.GetDefaultAddressSpaces" => ipam::default_address_spaces(),
            "IpamDriver.RequestPool" => {
                ipam::request_pool(&mut self.core().await, decode(verb, body)?).await?
            }
            "IpamDriver.ReleasePool" => {
                ipam::release_pool(&mut self.core().await, decode(verb, body)?)?
            }
            "IpamDriver.RequestAddress" => {
                ipam::request_address(&mut self.core().await, decode(verb, body)?)?
            }
            "IpamDriver.ReleaseAddress" => {
                ipam::release_address(&mut self.core().await, decode(verb, body)?)?
            }
            other => {
                return Err(Failure::NotFound(format!(
                    "netd does not implement {other}"
                )));
            }
        })
    }
}
