//! `netd daemon` in an arm's sandbox, and a minimal HTTP/1.1 client for its API on the unix
//! socket (one request per connection, as a CLI front end would make).

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::{sys::signal, unistd::Pid};

use super::{arms::Control, memory};

/// How long the daemon may take to bind its socket, and to stop after SIGTERM: it reads the
/// signal between sweeps, and a debug build's sweep of a nearly full conntrack table (the
/// conntrack measurement) took over 10 s.
const PATIENCE: Duration = Duration::from_secs(60);

/// `netd daemon` for a netd arm's instance (with its iptables backend), serving its API on
/// `socket`. Stop it with [`Daemon::stop`]; dropped running, it is stopped and a failure
/// reported on stderr.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    /// Starts the daemon, sweeping every `sweep_secs`, and waits for its socket.
    pub fn start(ctl: &Control, sweep_secs: f64) -> Result<Self> {
        let socket = ctl.instance().state_dir.join("bench-api.sock");
        let sweep = sweep_secs.to_string();
        let child = ctl
            .netd_cmd(&["daemon", "--sweep-interval", &sweep, "--socket"])?
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start netd daemon")?;
        let mut daemon = Self {
            child: Some(child),
            socket,
        };
        daemon.wait_for_socket()?;
        Ok(daemon)
    }

    fn wait_for_socket(&mut self) -> Result<()> {
        let started = Instant::now();
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child_mut().try_wait()? {
                anyhow::bail!("netd daemon exited before serving: {status}");
            }
            anyhow::ensure!(
                started.elapsed() < PATIENCE,
                "netd daemon: no socket at {} after {PATIENCE:?}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a running daemon")
    }

    pub fn rss_bytes(&self) -> Result<u64> {
        memory::rss_bytes(self.pid())
    }

    /// The most resident memory the daemon has used since it started.
    pub fn peak_rss_bytes(&self) -> Result<u64> {
        memory::peak_rss_bytes(self.pid())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running daemon").id()
    }

    /// `POST PATH` with a JSON body; the answer's JSON, or an error with the daemon's.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let body = body.to_string();
        let mut stream = UnixStream::connect(&self.socket)
            .with_context(|| format!("connect to {}", self.socket.display()))?;
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: netd\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .context("send a request to netd daemon")?;
        let mut raw = String::new();
        stream
            .read_to_string(&mut raw)
            .context("read netd daemon's answer")?;
        let (head, answer) = raw
            .split_once("\r\n\r\n")
            .with_context(|| format!("POST {path}: not an HTTP answer: {raw:?}"))?;
        let status = head.split_whitespace().nth(1).unwrap_or("none");
        anyhow::ensure!(status == "200", "POST {path}: {status}: {answer}");
        serde_json::from_str(answer).with_context(|| format!("POST {path}: answer {answer:?}"))
    }

    /// SIGTERM, then waits: an error if it doesn't stop in time or exits with a failure.
    pub fn stop(mut self) -> Result<()> {
        let child = self.child.take().expect("a running daemon");
        terminate(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.take()
            && let Err(e) = terminate(child)
        {
            eprintln!("netd-bench: stopping netd daemon: {e:#}");
        }
    }
}

/// Stops the daemon by its PID; SIGKILL (and an error) if SIGTERM doesn't do it in time.
fn terminate(mut child: Child) -> Result<()> {
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    signal::kill(pid, signal::Signal::SIGTERM).context("SIGTERM netd daemon")?;
    let started = Instant::now();
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().context("wait for netd daemon")? {
            break status;
        }
        if started.elapsed() > PATIENCE {
            child.kill().context("SIGKILL netd daemon")?;
            child.wait().context("wait for netd daemon")?;
            anyhow::bail!("netd daemon still running {PATIENCE:?} after SIGTERM: killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    anyhow::ensure!(status.success(), "netd daemon stopped with {status}");
    Ok(())
}
