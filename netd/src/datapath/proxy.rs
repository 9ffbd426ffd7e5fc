//! The iptables datapath's userland proxy, as Docker's docker-proxy (its default
//! `--userland-proxy=true`): one process per published port and loopback address, listening
//! there and forwarding to the container. The kernel can't do it on this datapath: netd's nat
//! OUTPUT jump skips loopback, since DNAT of loopback needs `route_localnet` (which lets
//! neighbours reach the host's loopback services, CVE-2020-8558), and IPv6 has no such thing.
//!
//! A proxy is `netd proxy --proto P --listen ADDR --to ADDR --pid-file FILE`, started from
//! netd's own process, so in the host namespace netd manages. It binds, forks the process
//! that serves and detaches it (a session of its own, stdio on /dev/null: it outlives the
//! command that started it and is no netd's child to reap), writes that process's record to
//! FILE and exits. netd waits for that exit: a port is published once its proxy listens, and
//! one that can't be bound fails the publish with the proxy's one-line error. The proxy, not
//! netd, writes the record, so a netd killed while it waits leaves a proxy that is recorded
//! all the same, for `gc` to end.
//!
//! The records are in the state dir's `proxies/`, one file per proxy named after its network,
//! protocol and address: the PID, then the proxy's arguments, one a line. A recorded PID is
//! still the proxy only while `/proc/PID/cmdline` has those arguments (PIDs are reused; the
//! record's own path among them makes them unique to the netd instance).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::{ForkResult, Pid},
};

use super::{PortSpec, Protocol};

mod serve;

/// How long an ended proxy may take to exit (it has nothing to clean up: it exits at once).
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// One proxy: where it listens and where it forwards to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    pub network_id: u32,
    pub proto: Protocol,
    pub listen: SocketAddr,
    pub to: SocketAddr,
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.listen, proto_name(self.proto))
    }
}

fn proto_name(p: Protocol) -> &'static str {
    crate::core::ports::proto_name(p)
}

impl Proxy {
    /// The proxies `port` needs: one on its loopback host address; for every address, one on
    /// 127.0.0.1 and one on [::1] when the host has IPv6 loopback (`ipv6_loopback`), of one
    /// family for an unspecified address. [::1] forwards to the container's IPv6 address if it
    /// has one, else to its IPv4 one. None on an address `--publish-allow` leaves out: a host
    /// process's source is the address it connects to, as on the eBPF datapath.
    pub fn for_port(port: &PortSpec, ipv6_loopback: bool) -> Vec<Proxy> {
        let (lo4, lo6) = (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        );
        let listen = match port.host_ip {
            None => vec![lo4, lo6],
            Some(IpAddr::V4(ip)) if ip.is_unspecified() => vec![lo4],
            Some(IpAddr::V6(ip)) if ip.is_unspecified() => vec![lo6],
            Some(ip) if ip.is_loopback() => vec![ip],
            Some(_) => vec![],
        };
        let allowed =
            |ip: &IpAddr| port.allow.is_empty() || port.allow.iter().any(|r| r.contains(ip));
        listen
            .into_iter()
            .filter(|ip| ip.is_ipv4() || ipv6_loopback)
            .filter(allowed)
            .map(|ip| {
                let to: IpAddr = match (ip, port.container_ip6) {
                    (IpAddr::V6(_), Some(ip6)) => ip6.into(),
                    _ => port.container_ip.into(),
                };
                Proxy {
                    network_id: port.network_id,
                    proto: port.proto,
                    listen: SocketAddr::new(ip, port.host_port),
                    to: SocketAddr::new(to, port.container_port),
                }
            })
            .collect()
    }

    /// Its record's file name.
    fn name(&self) -> String {
        format!(
            "{}-{}-{}",
            self.network_id,
            proto_name(self.proto),
            self.listen
        )
    }

    /// The `netd` arguments that run it, recording it in `record`.
    fn args(&self, record: &Path) -> Vec<String> {
        vec![
            "proxy".into(),
            "--proto".into(),
            proto_name(self.proto).into(),
            "--listen".into(),
            self.listen.to_string(),
            "--to".into(),
            self.to.to_string(),
            "--pid-file".into(),
            record.display().to_string(),
        ]
    }
}

/// Whether the host namespace has IPv6 loopback (`::1` on `lo`): not where IPv6 is disabled.
pub fn ipv6_loopback() -> bool {
    // The calling thread's namespace: netd's threads are all in the host's.
    std::fs::read_to_string("/proc/thread-self/net/if_inet6").is_ok_and(|table| {
        table
            .lines()
            .any(|l| l.starts_with("00000000000000000000000000000001 "))
    })
}

/// A running proxy as its record has it.
#[derive(Debug)]
struct Record {
    pid: i32,
    args: Vec<String>,
}

impl Record {
    /// The record at `path`; `None` when there is none, or only a partial one (a proxy killed
    /// while writing it).
    fn read(path: &Path) -> Result<Option<Record>> {
        let text = match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            text => text.with_context(|| format!("read {}", path.display()))?,
        };
        let mut lines = text.lines();
        let Some(Ok(pid)) = lines.next().map(str::parse) else {
            return Ok(None);
        };
        let args: Vec<String> = lines.map(String::from).collect();
        Ok((!args.is_empty()).then_some(Record { pid, args }))
    }

    /// Whether the recorded process is still running this proxy (a zombie's cmdline is empty).
    fn running(&self) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", self.pid)) else {
            return false;
        };
        let args: Vec<&[u8]> = cmdline
            .strip_suffix(&[0])
            .unwrap_or(&cmdline)
            .split(|b| *b == 0)
            .skip(1)
            .collect();
        args.iter()
            .copied()
            .eq(self.args.iter().map(String::as_bytes))
    }

    /// Ends the proxy and waits until it has exited (its sockets closed).
    fn end(&self) -> Result<()> {
        kill(Pid::from_raw(self.pid), Signal::SIGTERM)
            .with_context(|| format!("end userland proxy {}", self.pid))?;
        let deadline = Instant::now() + EXIT_WAIT;
        while self.running() {
            if Instant::now() > deadline {
                bail!("userland proxy {} did not exit", self.pid);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Writes the record of process `pid`, run with this process's arguments, to `path`
    /// (whole or not at all).
    fn write_for(pid: Pid, path: &Path) -> Result<()> {
        let mut text = format!("{pid}\n");
        for arg in std::env::args().skip(1) {
            text.push_str(&arg);
            text.push('\n');
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("write {}", path.display()))
    }
}

/// What [`Proxies::reconcile`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Proxies started again (not running, or running something else).
    pub started: usize,
    /// Proxies ended that no published port needed.
    pub ended: usize,
}

/// The proxies of one netd instance, recorded under its state dir.
pub struct Proxies {
    dir: PathBuf,
}

impl Proxies {
    pub fn new(state_dir: &Path) -> Self {
        // Absolute: the path is part of every proxy's command line, which identifies it.
        let state_dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.into());
        Self {
            dir: state_dir.join("proxies"),
        }
    }

    /// Starts `proxies`, each listening once this returns; if one fails, ends those started.
    pub fn start(&self, proxies: &[Proxy]) -> Result<()> {
        for (done, proxy) in proxies.iter().enumerate() {
            if let Err(e) = self.start_one(proxy) {
                self.end(&proxies[..done]).ok();
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts `proxy`, ending first what its record names (a proxy left by an older start).
    fn start_one(&self, proxy: &Proxy) -> Result<()> {
        let record = self.dir.join(proxy.name());
        self.end_recorded(&record)?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        let exe = std::env::current_exe().context("find netd's executable")?;
        let out = Command::new(exe)
            .args(proxy.args(&record))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("start the userland proxy for {proxy}"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            match err.lines().next() {
                Some(line) => bail!("{}", line.trim()),
                None => bail!("the userland proxy for {proxy} failed: {}", out.status),
            }
        }
        Ok(())
    }

    /// Ends `proxies` and removes their records; one not running is no failure. Every one is
    /// tried; the error names those that failed.
    pub fn end(&self, proxies: &[Proxy]) -> Result<()> {
        self.end_all(proxies.iter().map(|p| self.dir.join(p.name())))
    }

    /// Ends every proxy of network `network_id`.
    pub fn end_network(&self, network_id: u32) -> Result<()> {
        let prefix = format!("{network_id}-");
        let records = self.records()?.into_iter().filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
        });
        self.end_all(records)
    }

    fn end_all(&self, records: impl Iterator<Item = PathBuf>) -> Result<()> {
        let failed: Vec<String> = records
            .filter_map(|path| self.end_recorded(&path).err())
            .map(|e| format!("{e:#}"))
            .collect();
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }

    /// Ends the proxy recorded at `path`, if it is still running, and removes the record;
    /// whether one was running.
    fn end_recorded(&self, path: &Path) -> Result<bool> {
        let Some(record) = Record::read(path)? else {
            remove_if_there(path)?;
            return Ok(false);
        };
        let running = record.running();
        if running {
            record.end()?;
        }
        remove_if_there(path)?;
        Ok(running)
    }

    /// Every record file (a partial one included).
    fn records(&self) -> Result<Vec<PathBuf>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            entries => entries.with_context(|| format!("list {}", self.dir.display()))?,
        };
        Ok(entries.flatten().map(|e| e.path()).collect())
    }

    /// Makes the running proxies `wanted`: ends those recorded that aren't, and starts again
    /// those that aren't running as recorded (killed, or never recorded). Every one is tried;
    /// the error names those that failed.
    pub fn reconcile(&self, wanted: &[Proxy]) -> Result<Reconciled> {
        let mut done = Reconciled::default();
        let mut failed = Vec::new();
        let wanted_paths: Vec<PathBuf> = wanted.iter().map(|p| self.dir.join(p.name())).collect();
        for path in self.records()? {
            if wanted_paths.contains(&path) {
                continue;
            }
            match self.end_recorded(&path) {
                Ok(ended) => done.ended += usize::from(ended),
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        for (proxy, path) in wanted.iter().zip(&wanted_paths) {
            let as_wanted =
                Record::read(path)?.is_some_and(|r| r.args == proxy.args(path) && r.running());
            if as_wanted {
                continue;
            }
            match self.start_one(proxy) {
                Ok(()) => done.started += 1,
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        if !failed.is_empty() {
            bail!("userland proxies: {}", failed.join("; "));
        }
        Ok(done)
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The `netd proxy` process: binds `listen`, then forks the process that serves it,
/// forwarding to `to`, detached, and records that one in `record`. Returns in this process
/// once the proxy listens (an error names the address); the serving one returns only if
/// serving fails.
pub fn run(proto: Protocol, listen: SocketAddr, to: SocketAddr, record: &Path) -> Result<()> {
    let listener = serve::Listener::bind(proto, listen).with_context(|| {
        format!(
            "listen on {listen}/{} for the userland proxy",
            proto_name(proto)
        )
    })?;
    // SAFETY: this process has a single thread (no runtime yet: the proxy starts its own after
    // the fork), so the child inherits no lock another thread held.
    match unsafe { nix::unistd::fork() }.context("fork the userland proxy")? {
        ForkResult::Child => {
            serve::detach()?;
            serve::run(listener, to)
        }
        ForkResult::Parent { child } => {
            drop(listener);
            if let Err(e) = Record::write_for(child, record) {
                kill(child, Signal::SIGKILL).ok();
                return Err(e);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(host_ip: Option<&str>) -> PortSpec {
        PortSpec {
            network_id: 3,
            proto: Protocol::Tcp,
            host_ip: host_ip.map(|ip| ip.parse().unwrap()),
            host_port: 8080,
            container_ip: "10.0.0.2".parse().unwrap(),
            container_ip6: Some("fd00::2".parse().unwrap()),
            container_port: 80,
            allow: vec![],
        }
    }

    fn listening(port: &PortSpec, ipv6_loopback: bool) -> Vec<String> {
        Proxy::for_port(port, ipv6_loopback)
            .iter()
            .map(|p| format!("{} -> {}", p.listen, p.to))
            .collect()
    }

    #[test]
    fn loopback_addresses_get_a_proxy() {
        assert_eq!(
            listening(&port(None), true),
            [
                "127.0.0.1:8080 -> 10.0.0.2:80",
                "[::1]:8080 -> [fd00::2]:80"
            ]
        );
        assert_eq!(
            listening(&port(None), false),
            ["127.0.0.1:8080 -> 10.0.0.2:80"]
        );
        assert_eq!(
            listening(&port(Some("127.0.0.5")), true),
            ["127.0.0.5:8080 -> 10.0.0.2:80"]
        );
        assert_eq!(
            listening(&port(Some("::")), true),
            ["[::1]:8080 -> [fd00::2]:80"]
        );
        assert_eq!(
            listening(&port(Some("0.0.0.0")), true),
            ["127.0.0.1:8080 -> 10.0.0.2:80"]
        );
        assert!(listening(&port(Some("198.18.0.2")), true).is_empty());
        let mut v4_only = port(None);
        v4_only.container_ip6 = None;
        assert_eq!(listening(&v4_only, true)[1], "[::1]:8080 -> 10.0.0.2:80");
    }

    #[test]
    fn publish_allow_ranges_leave_loopback_out_unless_they_name_it() {
        let mut p = port(None);
        p.allow = vec!["198.18.0.0/15".parse().unwrap()];
        assert!(listening(&p, true).is_empty());
        p.allow.push("::1/128".parse().unwrap());
        assert_eq!(listening(&p, true), ["[::1]:8080 -> [fd00::2]:80"]);
    }

    #[test]
    fn a_record_is_running_only_as_its_own_command() {
        let me = Record {
            pid: std::process::id() as i32,
            args: std::env::args().skip(1).collect(),
        };
        assert!(me.running());
        let other = Record {
            args: vec!["proxy".into(), "--proto".into(), "tcp".into()],
            ..me
        };
        assert!(!other.running());
    }
}
