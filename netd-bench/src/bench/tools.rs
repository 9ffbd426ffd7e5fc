//! The load generators: iperf3 (throughput), sockperf ping-pong (request/response latency; over
//! IPv6 a ping-pong of our own), a closed-loop connect/1-byte/close client of our own (new
//! connections per second), and a UDP flood of our own (unsolicited traffic the datapath must
//! drop). Each takes its family from the endpoint's target.
//!
//! Servers run in the endpoint's server namespace, clients in its client namespace; both are
//! processes or threads this module starts and ends itself.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::report::percentile;
use netd::netns;
use netd_testkit::{cleanup::Cleanup, command_in, traffic::snmp_counter};

/// Container-side ports of the three servers; published paths add [`PUBLISH_SHIFT`].
pub const IPERF_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
pub const CRR_PORT: u16 = 7001;
pub const PUBLISH_SHIFT: u16 = 10000;
/// The CPUs the request/response client and server run on.
const CLIENT_CPU: &str = "0";
const SERVER_CPU: &str = "1";
/// Where the unsolicited flood goes: a port nothing publishes and nothing listens on.
pub const FLOOD_PORT: u16 = 9;
/// UDP payload of a flood datagram: with its headers, a minimum-size (60-byte) frame.
const FLOOD_PAYLOAD: usize = 18;

/// Where one path's client and server run, and what the client connects to.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub client_ns: PathBuf,
    pub server_ns: PathBuf,
    /// The address the client dials; its family is the one the path is measured over.
    pub target: IpAddr,
    /// Added to a server's port to get the port the client dials (published ports).
    pub port_shift: u16,
}

impl Endpoint {
    pub fn target(&self, server_port: u16) -> SocketAddr {
        SocketAddr::new(self.target, server_port + self.port_shift)
    }

    /// Where a server listens for `port`: every address of the target's family.
    pub fn listen(&self, port: u16) -> SocketAddr {
        SocketAddr::new(unspecified_like(self.target), port)
    }
}

/// The unspecified address of `ip`'s family (`0.0.0.0` or `::`).
pub fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// A server process, ended (by its PID, which we started) when dropped.
pub(super) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let mut cleanup = Cleanup::of(format!("server process {}", self.0.id()));
        cleanup.check(self.0.kill());
        cleanup.check(self.0.wait().map(drop));
        cleanup.finish();
    }
}

/// Starts `program args` in `ns` and waits until it listens on TCP `port` there.
pub(super) fn start_server(ns: &Path, port: u16, program: &str, args: &[&str]) -> Result<Server> {
    let child = command_in(ns, program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {program}"))?;
    let server = Server(child);
    netns::wait_tcp_listener(ns, port, Duration::from_secs(5))?;
    Ok(server)
}

/// Bulk TCP throughput from client to server, in Gbit/s.
pub fn throughput(ep: &Endpoint, secs: u32) -> Result<f64> {
    received_gbps(&iperf3(ep, secs, &[])?)
}

/// [`throughput`] with client and server on the first CPU (iperf3's `-A 0,0`), so that all
/// of the path's work lands there: the senders' TCP, the datapath both ways (run in the
/// sending side's softirq) and the receivers' copy. It gauges what the path costs per byte,
/// free of what two CPUs add on this machine: segments arriving out of order (spurious
/// retransmits by the thousand a transfer; none on one CPU), and where the scheduler puts
/// the ends.
pub fn throughput_on_one_core(ep: &Endpoint, secs: u32) -> Result<f64> {
    let report = iperf3(ep, secs, &["-A", "0,0"])?;
    ensure_one_cpu(&report)?;
    received_gbps(&report)
}

/// The most CPU time iperf3's two ends may report together, in percent of the transfer's
/// wall time, when they share one CPU: 100, and a margin for the clock's granularity. Apart,
/// on two CPUs, they report far more (the sender alone near 100).
const ONE_CPU_PERCENT: f64 = 105.0;

/// Checks that iperf3's two ends really shared one CPU: their CPU times (each end's, in
/// percent of the transfer's wall time) add up to no more than one CPU has.
fn ensure_one_cpu(report: &serde_json::Value) -> Result<()> {
    let cpu = &report["end"]["cpu_utilization_percent"];
    let (Some(client), Some(server)) = (cpu["host_total"].as_f64(), cpu["remote_total"].as_f64())
    else {
        bail!("iperf3 report has no CPU utilization");
    };
    ensure!(
        client + server <= ONE_CPU_PERCENT,
        "iperf3's client and server used {client:.0}% and {server:.0}% of a CPU: not one CPU between them, so `-A 0,0` didn't pin them"
    );
    Ok(())
}

/// The rate iperf3's server received, in Gbit/s.
fn received_gbps(report: &serde_json::Value) -> Result<f64> {
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 report has no received rate")?;
    Ok(bps / 1e9)
}

/// iperf3's JSON report of a transfer from client to server, the client run with `extra`.
fn iperf3(ep: &Endpoint, secs: u32, extra: &[&str]) -> Result<serde_json::Value> {
    let _server = start_server(
        &ep.server_ns,
        IPERF_PORT,
        "iperf3",
        &["-s", "-p", &IPERF_PORT.to_string()],
    )?;
    let target = ep.target(IPERF_PORT);
    let out = command_in(&ep.client_ns, "iperf3")
        .args([
            "-c",
            &target.ip().to_string(),
            "-p",
            &target.port().to_string(),
        ])
        .args(["-t", &secs.to_string(), "-J"])
        .args(extra)
        .output()
        .context("run iperf3")?;
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("iperf3 printed no JSON")?;
    if let Some(err) = report["error"].as_str() {
        bail!("iperf3 to {target}: {err}");
    }
    Ok(report)
}

/// TCP request/response round-trip time percentiles (p50, p99) in microseconds. Client and
/// server are pinned to CPUs of their own: left to the scheduler, they sometimes share one and
/// the p50 jumps by a fifth, run to run. Over IPv4, sockperf's ping-pong; over IPv6 our own
/// ([`ping_pong`]): Debian's sockperf (3.7) takes IPv4 addresses only.
pub fn rr_latency(ep: &Endpoint, secs: u32) -> Result<(f64, f64)> {
    match ep.target {
        IpAddr::V4(_) => sockperf(ep, secs),
        IpAddr::V6(_) => ping_pong(ep, secs),
    }
}

/// [`rr_latency`] by sockperf's TCP ping-pong (`--full-rtt`).
fn sockperf(ep: &Endpoint, secs: u32) -> Result<(f64, f64)> {
    let port = SOCKPERF_PORT.to_string();
    let _server = start_server(
        &ep.server_ns,
        SOCKPERF_PORT,
        "taskset",
        &[
            "-c", SERVER_CPU, "sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", &port,
        ],
    )?;
    let target = ep.target(SOCKPERF_PORT);
    // On a loaded machine a client now and then ends without a summary (its connection
    // raced the server's start); one more run says whether the path is really broken.
    let mut last = String::new();
    for _ in 0..SOCKPERF_TRIES {
        let out = command_in(&ep.client_ns, "taskset")
            .args(["-c", CLIENT_CPU, "sockperf"])
            .args(["pp", "--tcp", "--full-rtt", "-i", &target.ip().to_string()])
            .args(["-p", &target.port().to_string(), "-t", &secs.to_string()])
            .output()
            .context("run sockperf")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let (Some(p50), Some(p99)) = (
            sockperf_percentile(&text, "50.000"),
            sockperf_percentile(&text, "99.000"),
        ) {
            return Ok((p50, p99));
        }
        last = format!("{}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let tail: Vec<&str> = last.lines().rev().take(3).collect();
    bail!(
        "sockperf to {target} printed no percentiles in {SOCKPERF_TRIES} runs: {}",
        tail.join(" / ")
    )
}

/// [`rr_latency`] as sockperf's TCP ping-pong does it: one connection, a message of
/// [`PING_PONG_SIZE`] bytes echoed back, the next sent when the echo is in, each round trip
/// timed; the echoing server a thread listening in the server namespace.
fn ping_pong(ep: &Endpoint, secs: u32) -> Result<(f64, f64)> {
    let listener = netns::run_in(Some(&ep.server_ns), || {
        Ok(TcpListener::bind(ep.listen(SOCKPERF_PORT))?)
    })?;
    let server = std::thread::spawn(move || -> Result<()> {
        pin_to(SERVER_CPU)?;
        let mut conn = accept_within(&listener, Duration::from_secs(5))?;
        conn.set_nodelay(true)?;
        let mut message = [0u8; PING_PONG_SIZE];
        // Until the client closes (read_exact fails at its end of file).
        while conn.read_exact(&mut message).is_ok() {
            conn.write_all(&message)?;
        }
        Ok(())
    });
    let target = ep.target(SOCKPERF_PORT);
    // On a thread of its own, as the server: the pin would outlast the call on the caller's
    // thread, and so would every process it starts afterwards (iperf3, the other arms' runs).
    let client_ns = ep.client_ns.clone();
    let client = std::thread::spawn(move || {
        netns::run_in(Some(&client_ns), || {
            pin_to(CLIENT_CPU)?;
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))
                .with_context(|| format!("connect to {target}"))?;
            conn.set_nodelay(true)?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            let deadline = Instant::now() + Duration::from_secs(u64::from(secs));
            let mut message = [0u8; PING_PONG_SIZE];
            let mut rtts = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                conn.write_all(&message)?;
                conn.read_exact(&mut message)
                    .with_context(|| format!("read the echo from {target}"))?;
                rtts.push(sent.elapsed().as_secs_f64() * 1e6);
            }
            Ok(rtts)
        })
    });
    let rtts = client.join().expect("ping-pong client panicked");
    let served = server.join().expect("ping-pong server panicked");
    let mut rtts = rtts?;
    served.context("ping-pong server")?;
    rtts.sort_by(f64::total_cmp);
    anyhow::ensure!(!rtts.is_empty(), "no round trip to {target} in {secs} s");
    Ok((percentile(&rtts, 50.0), percentile(&rtts, 99.0)))
}

/// The first connection `listener` accepts within `timeout` (a client that never connects
/// leaves no thread waiting).
fn accept_within(listener: &TcpListener, timeout: Duration) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e).context("accept the ping-pong client"),
        }
    }
}

/// A ping-pong message: sockperf's default (and least) size.
const PING_PONG_SIZE: usize = 14;

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: &str) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu.parse().context("a CPU number")?)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pin to CPU {cpu}"))
}

/// Runs of the sockperf client before a path's latency counts as unmeasurable.
const SOCKPERF_TRIES: usize = 3;

/// Reads `---> percentile P = X` from sockperf's summary.
fn sockperf_percentile(text: &str, p: &str) -> Option<f64> {
    let key = format!("percentile {p} =");
    text.lines()
        .find_map(|l| l.split_once(&key).map(|(_, v)| v.trim().parse().ok()))
        .flatten()
}

/// New connections per second: `threads` closed-loop clients, each connecting, sending one
/// byte, reading one back and closing, for `secs`.
pub fn crr(ep: &Endpoint, secs: u32, threads: usize) -> Result<f64> {
    crr_with(ep, secs, threads, Failures::Abort).map(|(rate, _)| rate)
}

/// What a closed-loop client does when a connection fails.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Failures {
    /// Stop and fail the measurement with the connection's error.
    Abort,
    /// Count it and go on (a measurement of a datapath under pressure).
    Count,
}

/// [`crr`], returning the connections per second and the connections that failed.
pub fn crr_with(
    ep: &Endpoint,
    secs: u32,
    threads: usize,
    failures: Failures,
) -> Result<(f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let listener = netns::run_in(Some(&ep.server_ns), || {
        Ok(TcpListener::bind(ep.listen(CRR_PORT))?)
    })?;
    let server = spawn_echo_server(listener, stop.clone());
    let target = ep.target(CRR_PORT);
    let deadline = Instant::now() + Duration::from_secs(u64::from(secs));
    let started = Instant::now();
    let counts: Vec<Result<(u64, u64)>> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    netns::run_in(Some(&ep.client_ns), || {
                        crr_client(target, deadline, failures)
                    })
                })
            })
            .collect();
        clients
            .into_iter()
            .map(|c| c.join().expect("crr client panicked"))
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // Wake the accept loop so it sees `stop`.
    let _ = netns::run_in(Some(&ep.client_ns), || {
        Ok(TcpStream::connect_timeout(
            &target,
            Duration::from_millis(200),
        ))
    });
    let _ = server.join();
    let (mut done, mut failed) = (0, 0);
    for count in counts {
        let (d, f) = count?;
        done += d;
        failed += f;
    }
    Ok((done as f64 / elapsed, failed))
}

fn spawn_echo_server(listener: TcpListener, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(mut conn) = conn {
                let mut byte = [0u8; 1];
                if conn.read_exact(&mut byte).is_ok() {
                    let _ = conn.write_all(&byte);
                }
            }
        }
    })
}

/// One closed-loop client; returns the connections it completed and those that failed.
fn crr_client(target: SocketAddr, deadline: Instant, failures: Failures) -> Result<(u64, u64)> {
    let (mut done, mut failed) = (0, 0);
    while Instant::now() < deadline {
        match crr_once(target) {
            Ok(()) => done += 1,
            Err(_) if failures == Failures::Count => failed += 1,
            Err(e) => return Err(e),
        }
    }
    Ok((done, failed))
}

/// One connection: connect, one byte each way, reset.
fn crr_once(target: SocketAddr) -> Result<()> {
    let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(1))
        .with_context(|| format!("connect to {target}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    // Reset on close: no TIME_WAIT, so the client's ports don't run out mid-run.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&conn, nix::sys::socket::sockopt::Linger, &linger)?;
    conn.write_all(b"x")?;
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte)?;
    Ok(())
}

/// Microseconds until a first TCP connection to `target` (from `client_ns`) is established.
pub fn first_connect_us(client_ns: &Path, target: SocketAddr) -> Result<f64> {
    netns::run_in(Some(client_ns), || {
        let started = Instant::now();
        let conn = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .with_context(|| format!("connect to {target}"))?;
        let us = started.elapsed().as_secs_f64() * 1e6;
        drop(conn);
        Ok(us)
    })
}

/// Unsolicited traffic: one thread in `client_ns` sends minimum-size UDP datagrams to
/// `target` as fast as it can for `secs`. On veth, the receiving side's work (the datapath's
/// drop included) runs on the sending core, in the softirq each send raises, so the rate
/// falls as dropping costs more. Returns datagrams sent per second.
pub fn flood(client_ns: &Path, target: SocketAddr, secs: u32) -> Result<f64> {
    netns::run_in(Some(client_ns), || {
        let sock = UdpSocket::bind(SocketAddr::new(unspecified_like(target.ip()), 0))?;
        sock.connect(target)?;
        let payload = [0u8; FLOOD_PAYLOAD];
        let started = Instant::now();
        let deadline = started + Duration::from_secs(u64::from(secs));
        let mut sent = 0u64;
        while Instant::now() < deadline {
            for _ in 0..256 {
                // A send can fail (an ICMP error came back when nothing drops): not counted.
                if sock.send(&payload).is_ok() {
                    sent += 1;
                }
            }
        }
        Ok(sent as f64 / started.elapsed().as_secs_f64())
    })
}

/// Datagrams the namespace at `ns` received for ports nothing listens on (`NoPorts` of
/// /proc/net/snmp): flood datagrams that got past the datapath.
pub fn udp_no_ports(ns: &Path) -> Result<u64> {
    snmp_counter(ns, "Udp", "NoPorts")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An iperf3 report's CPU part, as a transfer on a veth pair gave it (2026-12-06).
    fn cpu_report(client: f64, server: f64) -> serde_json::Value {
        serde_json::json!({
            "end": { "cpu_utilization_percent": { "host_total": client, "remote_total": server } }
        })
    }

    #[test]
    fn ends_that_shared_one_cpu_pass_and_ends_on_two_fail() {
        // `-A 0,0`: 18.3 + 74.0; unpinned: 89.1 + 40.2 (the sender alone near one CPU).
        assert!(ensure_one_cpu(&cpu_report(18.3, 74.0)).is_ok());
        let err = ensure_one_cpu(&cpu_report(89.1, 40.2)).unwrap_err();
        assert!(err.to_string().contains("didn't pin"), "{err}");
        assert!(ensure_one_cpu(&serde_json::json!({ "end": {} })).is_err());
    }
}
