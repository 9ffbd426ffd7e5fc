//! Helpers for tests that drive netd through its CLI: containers made with `netd container
//! create`, traffic in and out of them, and what `netd stats`, `conntrack ls` and `monitor`
//! report about it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    harness::TestEnv,
    rawsock::{Tap, marker},
    traffic::retry_interrupted,
};

/// How long a connection attempt or a read may take before the test calls it lost.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// A container made with `netd container create NAME ARGS`.
pub struct Ctr {
    pub name: String,
    pub ns: PathBuf,
    pub ip: Ipv4Addr,
}

/// `netd container create <prefix><base> ARGS`, with its address from `container inspect`.
pub fn create(env: &TestEnv, base: &str, args: &[&str]) -> Ctr {
    let name = env.name(base);
    env.netd_ok(&[&["container", "create", name.as_str()][..], args].concat());
    let info = env.netd_json(&["container", "inspect", &name]);
    Ctr {
        ns: netd::netns::path_of(&name),
        ip: info["ip"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no address: {info}"))
            .parse()
            .unwrap(),
        name,
    }
}

/// Packets counted under `reason` by `netd stats --json`.
pub fn stat(env: &TestEnv, reason: &str) -> u64 {
    let stats = env.netd_json(&["stats", "--json"]);
    stats["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == reason)
        .unwrap_or_else(|| panic!("no counter {reason}: {stats}"))["packets"]
        .as_u64()
        .unwrap()
}

/// `send(from, marker)` from `spoofed`, then from `honest`, each with a marker of its own:
/// only the honest one reaches `tap`, and the spoofed one counts as `martian`.
pub fn assert_spoofed_refused<A: std::fmt::Display + Copy>(
    env: &TestEnv,
    tap: &Tap,
    spoofed: A,
    honest: A,
    send: impl Fn(A, &[u8]),
) {
    let martian = stat(env, "martian");
    let (attack, control) = (marker(), marker());
    send(spoofed, &attack);
    send(honest, &control);
    assert!(
        tap.arrived(&control),
        "the control from {honest} didn't arrive"
    );
    assert_eq!(tap.count(&attack), 0, "the datagram from {spoofed} arrived");
    assert!(
        stat(env, "martian") > martian,
        "{spoofed}: not counted as martian"
    );
}

/// A one-shot TCP echo server on `addr` in `ns`: its thread yields the peer it saw.
pub fn echo_server(env: &TestEnv, ns: &Path, addr: SocketAddr) -> thread::JoinHandle<SocketAddr> {
    let listener = env.in_ns(ns, || TcpListener::bind(addr).unwrap());
    thread::spawn(move || echo_one(&listener))
}

/// A TCP echo server on `addr` in `ns` for `connections` connections one after another: its
/// thread yields the peers it saw. One listener for all, so a later connection doesn't depend
/// on binding the port again while the last one is closing.
pub fn echo_servers(
    env: &TestEnv,
    ns: &Path,
    addr: SocketAddr,
    connections: usize,
) -> thread::JoinHandle<Vec<SocketAddr>> {
    let listener = env.in_ns(ns, || TcpListener::bind(addr).unwrap());
    thread::spawn(move || (0..connections).map(|_| echo_one(&listener)).collect())
}

/// Accepts one connection on `listener`, echoes what it reads once and yields the peer.
fn echo_one(listener: &TcpListener) -> SocketAddr {
    let (mut conn, peer) = listener.accept().unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 64];
    let n = retry_interrupted(|| conn.read(&mut buf)).unwrap();
    conn.write_all(&buf[..n]).unwrap();
    peer
}

/// Connects from `ns` to `addr`, sends "netd" and returns what came back.
pub fn tcp_echo(env: &TestEnv, ns: &Path, addr: SocketAddr) -> std::io::Result<String> {
    env.in_ns(ns, || {
        let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        conn.write_all(b"netd")?;
        let mut buf = [0u8; 16];
        let n = retry_interrupted(|| conn.read(&mut buf))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// Asserts that a TCP connection from `ns` to `addr` reaches an echo server: "netd" comes back.
pub fn assert_echoed(env: &TestEnv, ns: &Path, addr: SocketAddr) {
    match tcp_echo(env, ns, addr) {
        Ok(back) => assert_eq!(back, "netd", "echo via {addr}"),
        Err(e) => panic!("echo via {addr}: {e}"),
    }
}

/// The error kind of a TCP connection attempt from `ns` to `addr` that must fail: a refusal
/// (`ConnectionRefused`, something answered with a reset) and a drop (`TimedOut`) are told
/// apart, so a check can't pass for the wrong reason.
pub fn connect_error(env: &TestEnv, ns: &Path, addr: SocketAddr) -> std::io::ErrorKind {
    env.in_ns(ns, || TcpStream::connect_timeout(&addr, TIMEOUT))
        .map(|_| panic!("connected to {addr}, which should have failed"))
        .unwrap_err()
        .kind()
}

/// Whether one ping (ICMP or ICMPv6 echo) from `ns` to `dst` is answered.
pub fn pings(env: &TestEnv, ns: &Path, dst: impl Into<IpAddr>) -> bool {
    let dst: IpAddr = dst.into();
    env.run_in(ns, "ping", &["-n", "-c", "1", "-W", "1", &dst.to_string()])
        .status
        .success()
}

/// `ping ARGS` from `ns`: its stdout, whatever the outcome.
pub fn ping_output(env: &TestEnv, ns: &Path, args: &[&str]) -> String {
    let out = env.run_in(ns, "ping", &[&["-n"][..], args].concat());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stdout of `program args` in `ns`, which must succeed.
pub fn output_in(env: &TestEnv, ns: &Path, program: &str, args: &[&str]) -> String {
    let out = env.run_in(ns, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The live flows, as `netd conntrack ls --json` lists them.
pub fn flows(env: &TestEnv) -> Vec<serde_json::Value> {
    env.netd_json(&["conntrack", "ls", "--json"])
        .as_array()
        .unwrap()
        .clone()
}

/// Bytes both ways of the TCP flows through published ports, as `conntrack ls` counts them.
pub fn published_tcp_bytes(env: &TestEnv) -> u64 {
    flows(env)
        .iter()
        .filter(|f| f["proto"] == "tcp" && f["nat"] == "dnat")
        .map(|f| f["original"]["bytes"].as_u64().unwrap() + f["reply"]["bytes"].as_u64().unwrap())
        .sum()
}

/// Entries of the pinned conntrack tables, expired ones included (`conntrack ls` hides those).
pub fn conntrack_entries(env: &TestEnv) -> usize {
    // A flow lives in the unassured table until it is assured, then in the main one.
    netd_common::datapath::CONNTRACK_MAPS
        .iter()
        .map(|map| map_entries(env, map))
        .sum()
}

/// Entries of this instance's pinned map `name`.
pub fn map_entries(env: &TestEnv, name: &str) -> usize {
    let map = env.bpffs.join("maps").join(name);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool map dump {}", map.display());
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .len()
}

/// Polls `check` every 50 ms until it holds or `within` passed; whether it held.
pub fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `netd daemon` (`daemon`) answers on `socket`; fails if it exits first or
/// nothing answers within 30 s. From then on it handles SIGTERM (signalled while starting, it
/// would die of it).
pub fn wait_until_serving(daemon: &mut Child, socket: &Path) {
    let serving = eventually(Duration::from_secs(30), || {
        if let Some(status) = daemon.try_wait().unwrap() {
            panic!(
                "netd daemon exited ({status}) before serving {}",
                socket.display()
            );
        }
        UnixStream::connect(socket).is_ok()
    });
    assert!(
        serving,
        "netd daemon: nothing answers on {}",
        socket.display()
    );
}

/// Starts `netd monitor --json --count COUNT`, runs `cause`, and returns the `count` events it
/// printed, parsed; fails naming what it got when fewer come within 10 s.
pub fn drop_events(env: &TestEnv, count: usize, cause: impl FnOnce()) -> Vec<serde_json::Value> {
    let mut child = env
        .netd_cmd(&["monitor", "--json", "--count", &count.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start netd monitor");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    cause();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut lines = Vec::new();
    while lines.len() < count {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert_eq!(lines.len(), count, "netd monitor printed only {lines:?}");
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {l:?}: {e}")))
        .collect()
}
