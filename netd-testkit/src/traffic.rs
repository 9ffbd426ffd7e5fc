//! Traffic and the counters that prove it: echo servers and clients, a socket read a signal
//! can't fail, waits for listeners, and the kernel's and netd's packet counters. The `Result`
//! forms are for the benchmark and the demo; the others, for tests, panic naming what failed.

use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use netd::netns;

use crate::{Instance, command_in};

/// How long a helper waits for a connection, a reply or a listener.
const TIMEOUT: Duration = Duration::from_secs(2);

/// `op` (a read of a socket with a read time-out), run again while a signal interrupts it.
/// signal(7): a receive on a socket with SO_RCVTIMEO (recv, recvfrom, recvmsg, accept) is
/// never restarted after a signal handler runs, and on Linux fails with EINTR even without
/// one when the process is stopped and continued. std's loops (`read_exact`, `read_to_end`,
/// `read_line`, `write_all`) already ask again; a bare `read`, `recv`, `recv_from` or `peek`
/// returns `Interrupted`, which a test would take for a failure or for silence.
pub fn retry_interrupted<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}

/// A TCP server in `ns` on `port` answering `count` connections, each by echoing what it
/// read (once) and closing; yields each connection's peer.
pub fn serve_echo(
    ns: &Path,
    port: u16,
    count: usize,
) -> Result<JoinHandle<Result<Vec<SocketAddr>>>> {
    let listener = netns::run_in(Some(ns), || {
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("listen on port {port}"))
    })?;
    Ok(std::thread::spawn(move || {
        (0..count)
            .map(|_| {
                let (mut conn, peer) = listener.accept()?;
                conn.set_read_timeout(Some(TIMEOUT))?;
                let mut buf = [0u8; 128];
                let n = retry_interrupted(|| conn.read(&mut buf))?;
                conn.write_all(&buf[..n])?;
                Ok(peer)
            })
            .collect()
    }))
}

/// The peers a [`serve_echo`] server saw, once it has answered them all.
pub fn echo_peers(server: JoinHandle<Result<Vec<SocketAddr>>>) -> Result<Vec<SocketAddr>> {
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo server thread panicked"))?
}

/// Connects from `ns` to `to`, sends `text` and returns the reply (read to the end).
pub fn tcp_request(ns: &Path, to: SocketAddr, text: &str) -> Result<String> {
    netns::run_in(Some(ns), || {
        let mut conn =
            TcpStream::connect_timeout(&to, TIMEOUT).with_context(|| format!("connect to {to}"))?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        conn.write_all(text.as_bytes())?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)
            .with_context(|| format!("read the reply from {to}"))?;
        Ok(reply)
    })
}

/// A one-shot TCP echo server in `ns` on `port`; its thread yields the peer it saw.
pub fn echo_server(ns: &Path, port: u16) -> JoinHandle<SocketAddr> {
    let server = serve_echo(ns, port, 1).unwrap_or_else(|e| panic!("echo server: {e:#}"));
    std::thread::spawn(move || {
        let peers = echo_peers(server).unwrap_or_else(|e| panic!("echo server: {e:#}"));
        peers[0]
    })
}

/// Connects from `ns` to `addr`, sends "netd" and returns what came back.
pub fn tcp_echo(ns: &Path, addr: SocketAddr) -> Result<String> {
    tcp_request(ns, addr, "netd")
}

/// Stdout of `program args` run in `ns`; fails with its stderr when it fails.
pub fn try_output_in(ns: &Path, program: &str, args: &[&str]) -> Result<String> {
    let out = command_in(ns, program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Output of `program args` in `ns`, which must succeed.
pub fn output_in(ns: &Path, program: &str, args: &[&str]) -> String {
    try_output_in(ns, program, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits until something listens on TCP `port` in `ns`.
pub fn wait_listening(ns: &Path, port: u16) {
    netns::wait_tcp_listener(ns, port, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e:#}"));
}

/// Packets counted under `reason` by `netd stats`.
pub fn stat(env: &Instance, reason: &str) -> u64 {
    let stats = env.netd_json(&["stats", "--json"]);
    stats["reasons"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["reason"] == reason))
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or_else(|| panic!("no counter {reason}: {stats}"))
}

/// A counter of `nstat -az` in `ns`.
pub fn nstat(ns: &Path, counter: &str) -> u64 {
    let out = output_in(ns, "nstat", &["-azs", counter]);
    out.lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            (fields.next() == Some(counter)).then(|| fields.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {counter} in {out}"))
}

/// Counter `name` of protocol `group` (`Udp`, `Icmp`, ...) in /proc/net/snmp of `ns`.
pub fn snmp_counter(ns: &Path, group: &str, name: &str) -> Result<u64> {
    let snmp = netns::run_in(Some(ns), || {
        std::fs::read_to_string("/proc/thread-self/net/snmp").context("read /proc/net/snmp")
    })?;
    let tag = format!("{group}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&tag));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} lines in /proc/net/snmp");
    };
    let column = names
        .split_whitespace()
        .position(|n| n == name)
        .with_context(|| format!("no {group} {name} in /proc/net/snmp"))?;
    values
        .split_whitespace()
        .nth(column)
        .with_context(|| format!("short {group} line in /proc/net/snmp"))?
        .parse()
        .with_context(|| format!("{group} {name} is not a number"))
}

/// ICMP echo requests the namespace at `ns` received (`InEchos`).
pub fn echo_requests_received(ns: &Path) -> u64 {
    snmp_counter(ns, "Icmp", "InEchos").unwrap_or_else(|e| panic!("{e:#}"))
}
