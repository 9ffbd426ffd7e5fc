//! Keep-alive request rate: a small HTTP/1.1 server in the server namespace answering every
//! request on a connection that stays open, and closed-loop clients sending many small
//! requests on connections opened once. Unlike `crr`, no connection is made per request: this
//! is what a busy web service behind a published port sees.
//!
//! The server is a thread per connection of this process, its listener made in the server
//! namespace (busybox httpd closes the connection after every response, so it can't be the
//! server here); the soak reuses the client for its long-lived request/response flow.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::tools::{Endpoint, unspecified_like};
use netd::netns;

/// The keep-alive server's container-side port.
pub const KEEPALIVE_PORT: u16 = 8080;
/// Connections each client keeps open.
const CONNECTIONS: usize = 4;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: keep-alive\r\n\r\n";
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n\r\nok";

/// The keep-alive HTTP server, listening in a namespace until dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    wake: SocketAddr,
    wake_ns: std::path::PathBuf,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Listens on `KEEPALIVE_PORT` in `ns`, on every address of `wake`'s family; `wake_ns`
    /// and `wake` are where a connection that reaches it can come from (used to end the
    /// accept loop).
    pub fn start(ns: &Path, wake_ns: &Path, wake: SocketAddr) -> Result<Self> {
        let any = SocketAddr::new(unspecified_like(wake.ip()), KEEPALIVE_PORT);
        let listener = netns::run_in(Some(ns), || Ok(TcpListener::bind(any)?))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    std::thread::spawn(move || serve(conn));
                }
            }
        });
        Ok(Self {
            stop,
            wake,
            wake_ns: wake_ns.to_path_buf(),
            accept: Some(accept),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let wake = self.wake;
        let _ = netns::run_in(Some(&self.wake_ns), || {
            Ok(TcpStream::connect_timeout(
                &wake,
                Duration::from_millis(200),
            ))
        });
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Answers each request on `conn` (a request ends at its blank line) until the peer closes.
fn serve(mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            if conn.write_all(RESPONSE).is_err() {
                return;
            }
        }
    }
}

/// One open client connection: a request, then exactly one response.
pub struct Client {
    conn: TcpStream,
    response: [u8; RESPONSE.len()],
}

impl Client {
    pub fn connect(target: SocketAddr) -> Result<Self> {
        let conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .with_context(|| format!("connect to {target}"))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self {
            conn,
            response: [0; RESPONSE.len()],
        })
    }

    /// One request/response round trip.
    pub fn request(&mut self) -> Result<()> {
        self.conn.write_all(REQUEST).context("send a request")?;
        self.conn
            .read_exact(&mut self.response)
            .context("read a response")?;
        if self.response != RESPONSE {
            bail!("unexpected response from the keep-alive server");
        }
        Ok(())
    }
}

/// Requests per second over `CONNECTIONS` open connections to the endpoint's server, each
/// driven closed-loop by a thread of its own, for `secs`.
pub fn request_rate(ep: &Endpoint, secs: u32) -> Result<f64> {
    let target = ep.target(KEEPALIVE_PORT);
    let _server = Server::start(&ep.server_ns, &ep.client_ns, target)?;
    let clients: Vec<Client> = netns::run_in(Some(&ep.client_ns), || {
        (0..CONNECTIONS).map(|_| Client::connect(target)).collect()
    })?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(u64::from(secs));
    let counts: Vec<Result<u64>> = std::thread::scope(|s| {
        let threads: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let mut done = 0;
                    while Instant::now() < deadline {
                        c.request()?;
                        done += 1;
                    }
                    Ok(done)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("keep-alive client panicked"))
            .collect()
    });
    let total: u64 = counts.into_iter().sum::<Result<u64>>()?;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
