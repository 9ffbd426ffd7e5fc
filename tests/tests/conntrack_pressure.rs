//! Conntrack under pressure, with real packets through the CLI-built datapath: floods of new
//! flows (spoofed SYNs to a published port, a UDP flow storm from a container) ten times the
//! table's size never evict an established flow; a container's `--conntrack-limit` caps its
//! flows; blind RSTs outside the window don't close a masqueraded connection; NAT ports stay
//! out of the host's ephemeral range and off published ports.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use netd::netns;
use netd_testkit::sandbox::OUTSIDE_LINK;
use tests::{
    frames::{SYN, TCP, UDP, ipv4, send_ipv4, tcp_at, udp},
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, bound_connect, reset},
    traffic::retry_interrupted,
};

/// `--conntrack-max`: entries in the table (two per flow).
const TABLE: u32 = 1024;
/// New flows per flood: ten times the table.
const FLOOD: u32 = 10 * TABLE;
const TIMEOUT: Duration = Duration::from_secs(3);
const TCP_RST: u8 = 0x04;
/// The server port on the outside.
const SERVER_PORT: u16 = 9000;

struct Container {
    name: String,
    ns: PathBuf,
    ip: Ipv4Addr,
}

/// A network with a small conntrack table (and short close/UDP timeouts), set up by `netd`.
fn network(env: &TestEnv) {
    env.netd_ok(&[
        "--conntrack-max",
        &TABLE.to_string(),
        "--conntrack-timeout",
        "tcp_close=1",
        "--conntrack-timeout",
        "udp=1",
        "network",
        "create",
        "n",
        "--subnet",
        "10.95.0.0/24",
    ]);
}

/// A container on network `n`, made with `args`.
fn container(env: &TestEnv, base: &str, args: &[&str]) -> Container {
    container_on(env, "n", base, args)
}

fn container_on(env: &TestEnv, network: &str, base: &str, args: &[&str]) -> Container {
    let name = env.name(base);
    let mut create = vec!["container", "create", &name, "--network", network];
    create.extend_from_slice(args);
    env.netd_ok(&create);
    let ip = env.netd_json(&["container", "inspect", &name])["ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    Container {
        ns: netns::path_of(&name),
        name,
        ip,
    }
}

fn stat(env: &TestEnv, reason: &str) -> u64 {
    let stats = env.netd_json(&["stats", "--json"]);
    stats["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["reason"] == reason)
        .unwrap_or_else(|| panic!("no {reason} in {stats}"))["packets"]
        .as_u64()
        .unwrap()
}

/// Both ends of a TCP connection through the datapath: the container's and the outside's.
struct Conn {
    inside: TcpStream,
    outside: TcpStream,
}

impl Conn {
    /// A connection from `c` to the outside server (masqueraded), one exchange done.
    fn masqueraded(env: &TestEnv, c: &Container, port: u16) -> Self {
        let listener = env.in_ns(&env.outside_ns(), || {
            TcpListener::bind((OUTSIDE_ADDR, port)).unwrap()
        });
        let inside = env.in_ns(&c.ns, || {
            TcpStream::connect_timeout(&(OUTSIDE_ADDR, port).into(), TIMEOUT).unwrap()
        });
        let (outside, _) = listener.accept().unwrap();
        Self::ready(inside, outside)
    }

    /// A connection from the outside to `c`'s port `cport`, published as `hport`.
    fn published(env: &TestEnv, c: &Container, cport: u16, hport: u16) -> Self {
        let listener = env.in_ns(&c.ns, || TcpListener::bind(("0.0.0.0", cport)).unwrap());
        let outside = env.in_ns(&env.outside_ns(), || {
            TcpStream::connect_timeout(&(HOST_ADDR, hport).into(), TIMEOUT).unwrap()
        });
        let (inside, _) = listener.accept().unwrap();
        Self::ready(inside, outside)
    }

    fn ready(inside: TcpStream, outside: TcpStream) -> Self {
        for s in [&inside, &outside] {
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
        }
        let mut conn = Self { inside, outside };
        conn.assert_alive("hello");
        conn
    }

    /// The outside speaks first (a masqueraded flow's reply direction), then the container.
    fn assert_alive(&mut self, what: &str) {
        send_and_receive(&mut self.outside, &mut self.inside, what);
        send_and_receive(&mut self.inside, &mut self.outside, what);
    }

    /// The container speaks first (a published flow's reply direction), then the outside.
    fn assert_alive_inside_first(&mut self, what: &str) {
        send_and_receive(&mut self.inside, &mut self.outside, what);
        send_and_receive(&mut self.outside, &mut self.inside, what);
    }
}

fn send_and_receive(from: &mut TcpStream, to: &mut TcpStream, what: &str) {
    from.write_all(what.as_bytes()).unwrap();
    let mut got = vec![0u8; what.len()];
    to.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{what}: the other end got nothing ({e})"));
    assert_eq!(got, what.as_bytes());
}

/// A stream of 1 KiB writes every 2 ms from the outside to a published port of a container,
/// counted where it arrives.
struct Stream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sender: thread::JoinHandle<u64>,
    receiver: thread::JoinHandle<u64>,
}

impl Stream {
    fn start(env: &TestEnv, c: &Container, cport: u16, hport: u16) -> Self {
        let conn = Conn::published(env, c, cport, hport);
        let (stop, received) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (mut out, mut inside) = (conn.outside, conn.inside);
        let sender = {
            let stop = stop.clone();
            thread::spawn(move || {
                let chunk = [0x5a_u8; 1024];
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    out.write_all(&chunk).expect("the stream broke");
                    sent += chunk.len() as u64;
                    thread::sleep(Duration::from_millis(2));
                }
                out.shutdown(std::net::Shutdown::Write).unwrap();
                sent
            })
        };
        let receiver = {
            let received = received.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match retry_interrupted(|| inside.read(&mut buf)) {
                        Ok(0) => return received.load(Ordering::Relaxed),
                        Ok(n) => {
                            received.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e) => panic!("the stream broke at the receiver: {e}"),
                    }
                }
            })
        };
        Self {
            stop,
            received,
            sender,
            receiver,
        }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops the stream; asserts every byte sent arrived.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().unwrap();
        let received = self.receiver.join().unwrap();
        assert_eq!(received, sent, "bytes lost on the way");
        received
    }
}

/// xorshift32: spoofed sources and ports without a dependency.
fn next_random(state: &mut u32) -> u32 {
    *state ^= *state << 13;
    *state ^= *state >> 17;
    *state ^= *state << 5;
    *state
}

/// `count` SYNs to HOST_ADDR:`port` from random sources in 198.19.0.0/16 (the sandbox's
/// benchmarking range: their answers die in the outside namespace).
fn spoofed_syns(count: u32, port: u16) -> impl Iterator<Item = Vec<u8>> {
    let mut state = 0x1234_5678;
    (0..count).map(move |_| {
        let r = next_random(&mut state);
        let src = Ipv4Addr::new(198, 19, (r >> 8) as u8, r as u8);
        let sport = 1024 + (r >> 16) as u16 % 60_000;
        ipv4(
            src,
            HOST_ADDR,
            TCP,
            &tcp_at(src, HOST_ADDR, sport, port, SYN, r, b""),
        )
    })
}

#[test]
fn a_syn_flood_ten_times_the_table_evicts_no_established_flow() {
    let env = TestEnv::new();
    network(&env);
    let web = container(
        &env,
        "web",
        &["-p", "8080:80", "-p", "8081:81", "-p", "8082:82"],
    );
    // Something answers the flood: every SYN gets a SYN-ACK, so each flow sees a reply.
    let _listener = env.in_ns(&web.ns, || TcpListener::bind(("0.0.0.0", 80)).unwrap());
    let mut masqueraded = Conn::masqueraded(&env, &web, SERVER_PORT);
    let mut published = Conn::published(&env, &web, 82, 8082);
    let stream = Stream::start(&env, &web, 81, 8081);
    let dnat_before = stat(&env, "dnat_new");
    let received_before = stream.received();
    let sent = env.in_ns(&env.outside_ns(), || send_ipv4(spoofed_syns(FLOOD, 8080)));
    assert_eq!(sent, FLOOD as usize);
    thread::sleep(Duration::from_millis(300));
    // Data flowed during the flood, and every byte arrived.
    assert!(stream.received() > received_before, "the stream stalled");
    // The established flows are assured (out of the flood's reach), the flood's are not.
    let flows = env.netd_json(&["conntrack", "ls", "--json"]);
    let assured = |f: &&serde_json::Value| f["assured"] == true;
    let (kept, flood): (Vec<_>, Vec<_>) = flows.as_array().unwrap().iter().partition(assured);
    assert_eq!(kept.len(), 3, "the three connections: {kept:?}");
    assert!(flood.iter().all(|f| f["original"]["dport"] == 8080));
    // The idle connections survived it, in the direction a lost entry would break.
    masqueraded.assert_alive("after the flood");
    published.assert_alive_inside_first("after the flood");
    let received = stream.finish();
    assert!(received > 0);
    // The flood did go through the table: each SYN was a new flow.
    assert!(
        stat(&env, "dnat_new") - dnat_before >= u64::from(FLOOD),
        "the flood didn't reach the datapath"
    );
    assert_eq!(stat(&env, "conntrack_full"), 0);
}

/// Sends one datagram from `c` to each of `count` outside ports from `first` on.
fn udp_storm(env: &TestEnv, c: &Container, first: u16, count: u32) {
    env.in_ns(&c.ns, || {
        let sock = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        for i in 0..count {
            let port = first + i as u16;
            sock.send_to(b"storm", (OUTSIDE_ADDR, port)).unwrap();
        }
    });
}

/// A UDP server on the outside that answers every datagram, until dropped.
struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Responder {
    fn start(env: &TestEnv, port: u16) -> Self {
        let sock = env.in_ns(&env.outside_ns(), || {
            UdpSocket::bind((OUTSIDE_ADDR, port)).unwrap()
        });
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = retry_interrupted(|| sock.recv_from(&mut buf)) {
                        let _ = sock.send_to(&buf[..n], peer);
                    }
                }
            })
        };
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `count` UDP flows from `c` to OUTSIDE_ADDR:`port`, one datagram each from source ports
/// 10000 on (sent through a raw socket: no socket per flow).
fn udp_flows(c: &Container, port: u16, count: u32) -> impl Iterator<Item = Vec<u8>> {
    let ip = c.ip;
    (0..count).map(move |i| {
        let sport = 10_000 + i as u16;
        ipv4(
            ip,
            OUTSIDE_ADDR,
            UDP,
            &udp(ip, OUTSIDE_ADDR, sport, port, b"storm", true),
        )
    })
}

#[test]
fn a_udp_storm_from_a_container_evicts_no_established_flow() {
    let env = TestEnv::new();
    network(&env);
    let web = container(&env, "web", &["-p", "8081:81"]);
    let noisy = container(&env, "noisy", &[]);
    let mut idle = Conn::masqueraded(&env, &web, SERVER_PORT);
    let stream = Stream::start(&env, &web, 81, 8081);
    // Every flow of the storm gets an answer, as a DNS server would give.
    let _responder = Responder::start(&env, 5353);
    let snat_before = stat(&env, "snat_new");
    let received_before = stream.received();
    let sent = env.in_ns(&noisy.ns, || send_ipv4(udp_flows(&noisy, 5353, FLOOD)));
    assert_eq!(sent, FLOOD as usize);
    thread::sleep(Duration::from_millis(300));
    assert!(stream.received() > received_before, "the stream stalled");
    idle.assert_alive("after the storm");
    stream.finish();
    assert!(
        stat(&env, "snat_new") - snat_before >= u64::from(FLOOD),
        "the storm didn't reach the datapath"
    );
}

/// The live flows `netd conntrack ls` shows from `addr`.
fn flows_from(env: &TestEnv, addr: Ipv4Addr) -> usize {
    env.netd_json(&["conntrack", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["original"]["src"] == addr.to_string())
        .count()
}

/// Whether a datagram from `c` reaches a UDP socket of the outside.
fn udp_reaches_outside(env: &TestEnv, c: &Container, port: u16) -> bool {
    let server = env.in_ns(&env.outside_ns(), || {
        UdpSocket::bind((OUTSIDE_ADDR, port)).unwrap()
    });
    server
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    env.in_ns(&c.ns, || {
        let sock = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        sock.send_to(b"probe", (OUTSIDE_ADDR, port)).unwrap();
    });
    let mut buf = [0u8; 16];
    retry_interrupted(|| server.recv_from(&mut buf)).is_ok()
}

#[test]
fn a_container_limit_caps_its_flows_and_no_one_else_s() {
    const LIMIT: u32 = 64;
    let env = TestEnv::new();
    network(&env);
    let quiet = container(&env, "quiet", &[]);
    let noisy = container(&env, "noisy", &["--conntrack-limit", &LIMIT.to_string()]);
    let limited_before = stat(&env, "conntrack_limit");
    udp_storm(&env, &noisy, 20_000, 1000);
    let live = flows_from(&env, noisy.ip);
    assert!(
        live <= LIMIT as usize && live > 0,
        "{live} flows of {} live",
        noisy.name
    );
    assert!(
        stat(&env, "conntrack_limit") - limited_before >= u64::from(1000 - LIMIT),
        "the flows over the limit were dropped and counted"
    );
    // At its limit, the container can't start another flow; others can.
    assert!(!udp_reaches_outside(&env, &noisy, 7001));
    assert!(udp_reaches_outside(&env, &quiet, 7002));
    // Once its flows time out (udp=1) and the sweeper runs, it can again.
    thread::sleep(Duration::from_millis(2500));
    env.netd_ok(&["conntrack", "sweep"]);
    assert!(udp_reaches_outside(&env, &noisy, 7003));
}

#[test]
fn a_network_limit_caps_its_containers_together() {
    const LIMIT: u32 = 50;
    let env = TestEnv::new();
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--subnet",
        "10.96.0.0/24",
        "--conntrack-limit",
        &LIMIT.to_string(),
    ]);
    let a = container(&env, "a", &[]);
    let b = container(&env, "b", &[]);
    let limited_before = stat(&env, "conntrack_limit");
    udp_storm(&env, &a, 20_000, 100);
    udp_storm(&env, &b, 20_000, 100);
    let live = flows_from(&env, a.ip) + flows_from(&env, b.ip);
    assert!(live <= LIMIT as usize && live > 0, "{live} flows live");
    assert!(stat(&env, "conntrack_limit") - limited_before >= u64::from(200 - LIMIT));
    // A network without a limit is not held to this one's.
    env.netd_ok(&["network", "create", "free", "--subnet", "10.97.0.0/24"]);
    let free = container_on(&env, "free", "free", &[]);
    assert!(udp_reaches_outside(&env, &free, 7004));
    assert!(!udp_reaches_outside(&env, &a, 7005));
    // The iptables datapath has no such cap: asking for one is an error, not a no-op.
    let err = env.netd_err(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "ipt",
        "--subnet",
        "10.98.0.0/24",
        "--conntrack-limit",
        "5",
    ]);
    assert!(
        err.contains("--conntrack-limit needs the ebpf datapath"),
        "{err}"
    );
}

/// The sequence number of the next byte the outside sends on `conn`: captured on the
/// outside's link while `conn`'s outside end sends `what`, from the segment that carried it.
fn next_outside_seq(env: &TestEnv, conn: &mut Conn, nat_port: u16, what: &str) -> u32 {
    let capture = env.in_ns(&env.outside_ns(), || Capture::open(OUTSIDE_LINK));
    send_and_receive(&mut conn.outside, &mut conn.inside, what);
    capture.next_seq(SERVER_PORT, nat_port)
}

/// An AF_PACKET socket seeing the frames of one interface, both directions (outgoing ones
/// only reach ETH_P_ALL sockets).
struct Capture(std::os::fd::OwnedFd);

impl Capture {
    fn open(ifname: &str) -> Self {
        use std::os::fd::FromRawFd as _;
        let index = nix::net::if_::if_nametoindex(ifname).unwrap();
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket calls on a fresh fd with initialised arguments.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
            assert!(fd >= 0, "{}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index as i32;
            let rc = libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            Self(fd)
        }
    }

    /// seq + length of the first data segment from OUTSIDE_ADDR:`sport` to
    /// HOST_ADDR:`dport`.
    fn next_seq(&self, sport: u16, dport: u16) -> u32 {
        let mut buf = [0u8; 2048];
        loop {
            let n = retry_interrupted(|| {
                // SAFETY: reads into a buffer of the length given.
                let n = unsafe {
                    libc::recv(
                        std::os::fd::AsRawFd::as_raw_fd(&self.0),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                    )
                };
                // Negative: failed, errno says why.
                usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
            })
            .unwrap_or_else(|e| panic!("no segment captured: {e}"));
            assert!(n > 0, "no segment captured: an empty read");
            if buf[12..14] != [0x08, 0x00] {
                continue;
            }
            let p = &buf[14..n];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p[9] != TCP || p[12..16] != OUTSIDE_ADDR.octets() || p[16..20] != HOST_ADDR.octets()
            {
                continue;
            }
            let t = &p[ihl..];
            let ports = (
                u16::from_be_bytes([t[0], t[1]]),
                u16::from_be_bytes([t[2], t[3]]),
            );
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            let payload = total - ihl - usize::from(t[12] >> 4) * 4;
            if ports == (sport, dport) && payload > 0 {
                let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
                return seq.wrapping_add(payload as u32);
            }
        }
    }
}

/// A RST from the outside server to the container's translated end, with sequence `seq`.
fn rst(nat_port: u16, seq: u32) -> Vec<u8> {
    ipv4(
        OUTSIDE_ADDR,
        HOST_ADDR,
        TCP,
        &tcp_at(
            OUTSIDE_ADDR,
            HOST_ADDR,
            SERVER_PORT,
            nat_port,
            TCP_RST,
            seq,
            b"",
        ),
    )
}

#[test]
fn blind_rsts_out_of_the_window_leave_an_idle_masqueraded_connection_alone() {
    let env = TestEnv::new();
    network(&env);
    let c = container(&env, "c", &[]);
    let mut conn = Conn::masqueraded(&env, &c, SERVER_PORT);
    // The port the container's end was translated to, as the outside sees it.
    let nat_port = conn.outside.peer_addr().unwrap().port();
    let next = next_outside_seq(&env, &mut conn, nat_port, "before");
    // A blind sweep: 127 RSTs spread over the sequence space, none within 32 MiB of the
    // window (the receive window here is a few MiB at most).
    let sweep = (1..128u32).map(|k| rst(nat_port, next.wrapping_add(k << 25)));
    env.in_ns(&env.outside_ns(), || send_ipv4(sweep));
    // Longer than a closed flow's timeout (tcp_close=1): a flow the sweep closed is gone.
    thread::sleep(Duration::from_millis(2500));
    conn.assert_alive("after the sweep");
    let states: Vec<_> = env
        .netd_json(&["conntrack", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["original"]["src"] == c.ip.to_string())
        .map(|f| f["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["ESTABLISHED"]);
    // The positive control: a RST at the exact next sequence number closes it.
    let next = next_outside_seq(&env, &mut conn, nat_port, "last");
    env.in_ns(&env.outside_ns(), || send_ipv4([rst(nat_port, next)]));
    let mut buf = [0u8; 8];
    let err = retry_interrupted(|| conn.inside.read(&mut buf)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

/// The host's ephemeral port range in the sandbox host namespace.
fn set_local_port_range(env: &TestEnv, range: &str) {
    netd::netlink::set_sysctl(Some(&env.host_ns()), "net.ipv4.ip_local_port_range", range).unwrap();
}

/// Connects from `ns` (from `local` when given) to the outside server and echoes one message;
/// returns the peer the server saw. Both ends stay open, so a later connection can't take
/// this one's tuple.
fn echo_via(
    env: &TestEnv,
    ns: &Path,
    local: Option<SocketAddr>,
    listener: &TcpListener,
) -> SocketAddr {
    let server_addr = (OUTSIDE_ADDR, SERVER_PORT).into();
    let mut conn = env.in_ns(ns, || match local {
        Some(local) => bound_connect(local, server_addr),
        None => TcpStream::connect_timeout(&server_addr, TIMEOUT).unwrap(),
    });
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (mut server, peer) = listener.accept().unwrap();
    server.set_read_timeout(Some(TIMEOUT)).unwrap();
    send_and_receive(&mut conn, &mut server, "ping");
    send_and_receive(&mut server, &mut conn, "pong");
    std::mem::forget((conn, server));
    peer
}

#[test]
fn nat_ports_stay_out_of_the_host_ephemeral_range_and_off_published_ports() {
    let env = TestEnv::new();
    // One ephemeral port, set before the datapath reads the range.
    set_local_port_range(&env, "40000 40000");
    network(&env);
    let web = container(&env, "web", &["-p", "8080:80"]);
    let c = container(&env, "c", &[]);
    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, SERVER_PORT)).unwrap()
    });
    // The container asks for the host's only ephemeral port as its source.
    let from_container = echo_via(&env, &c.ns, Some((c.ip, 40000).into()), &listener);
    assert_eq!(from_container.ip(), HOST_ADDR);
    assert_ne!(from_container.port(), 40000, "NAT took an ephemeral port");
    // A host socket made later gets that port, towards the same server: both work.
    let from_host = echo_via(&env, &env.host_ns(), None, &listener);
    assert_eq!(from_host, SocketAddr::from((HOST_ADDR, 40000)));
    // A container's source port that is a published port is not kept either.
    let from_web = echo_via(&env, &web.ns, Some((web.ip, 8080).into()), &listener);
    assert_ne!(from_web.port(), 8080, "NAT took a published port");
    // The positive control: a port in the NAT range, free, is kept.
    let kept = echo_via(&env, &c.ns, Some((c.ip, 20_000).into()), &listener);
    assert_eq!(kept.port(), 20_000);
}

/// A busy client's reset connections give their NAT ports back at once, as netfilter's NAT
/// takes over a CLOSE entry: with 16 NAT ports, 200 connections in a row, each reset when
/// done (as the benchmark's connection-rate client does), all connect at once. (Holding a
/// closed tuple for a second ran the benchmark's client out of ports.)
#[test]
fn reset_connections_give_their_nat_ports_back_at_once() {
    const CONNECTIONS: usize = 200;
    let env = TestEnv::new();
    // Ephemeral ports 1040-65535: the NAT range is what is left above 1023, 1024-1039.
    set_local_port_range(&env, "1040 65535");
    network(&env);
    let c = container(&env, "c", &[]);
    let listener = env.in_ns(&env.outside_ns(), || {
        TcpListener::bind((OUTSIDE_ADDR, SERVER_PORT)).unwrap()
    });
    let server = thread::spawn(move || {
        let mut ports = std::collections::BTreeSet::new();
        for _ in 0..CONNECTIONS {
            let (mut conn, peer) = listener.accept().unwrap();
            ports.insert(peer.port());
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).unwrap();
            conn.write_all(&byte).unwrap();
        }
        ports
    });
    let server_addr = (OUTSIDE_ADDR, SERVER_PORT).into();
    env.in_ns(&c.ns, || {
        for i in 0..CONNECTIONS {
            let mut conn = TcpStream::connect_timeout(&server_addr, Duration::from_millis(500))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            conn.write_all(b"x").unwrap();
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).unwrap();
            reset(conn);
        }
    });
    let ports = server.join().unwrap();
    assert!(
        ports.iter().all(|p| (1024..=1039).contains(p)),
        "NAT ports outside the range: {ports:?}"
    );
    assert_eq!(stat(&env, "port_exhausted"), 0);
}

/// The kernel's run time of the pinned uplink program `prog` on `frame`, in ns: the median of
/// `runs` single runs (each on a fresh copy: a run rewrites the frame it is given).
fn run_time_ns(env: &TestEnv, prog: &str, frame: &[u8], runs: usize) -> u64 {
    median_run_time_ns(env, prog, std::iter::repeat_n(frame.to_vec(), runs))
}

/// The median of the kernel's run times of the pinned uplink program `prog`, one run on each
/// of `frames`.
fn median_run_time_ns(env: &TestEnv, prog: &str, frames: impl Iterator<Item = Vec<u8>>) -> u64 {
    use aya::{TestRun as _, TestRunOptions, programs::SchedClassifier};
    let program = SchedClassifier::from_pin(env.bpffs.join("progs").join(prog)).unwrap();
    let mut times: Vec<u64> = frames
        .map(|frame| {
            let frame = &frame[..];
            let mut out = vec![0u8; frame.len() + 256];
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..Default::default()
                })
                .unwrap();
            result.duration.as_nanos() as u64
        })
        .collect();
    times.sort_unstable();
    times[times.len() / 2]
}

/// What conntrack costs per packet on the uplink (BPF_PROG_TEST_RUN): a packet of an
/// established masqueraded flow each way, and one no flow explains. A measurement to compare
/// builds (`NETD_BIN` picks the build), not a check:
/// `cargo test -p tests --test conntrack_pressure -- --ignored --nocapture per_packet`.
#[test]
#[ignore]
fn conntrack_cost_per_packet() {
    use tests::frames::{ACK, tcp_frame};
    const RUNS: usize = 20_000;
    let env = TestEnv::new();
    network(&env);
    let c = container(&env, "c", &[]);
    let conn = Conn::masqueraded(&env, &c, SERVER_PORT);
    let local = conn.inside.local_addr().unwrap().port();
    let nat_port = conn.outside.peer_addr().unwrap().port();
    let cases = [
        (
            "uplink_egress",
            "established, original direction",
            tcp_frame(c.ip, local, OUTSIDE_ADDR, SERVER_PORT, ACK),
        ),
        (
            "uplink_ingress",
            "established, reply direction",
            tcp_frame(OUTSIDE_ADDR, SERVER_PORT, HOST_ADDR, nat_port, ACK),
        ),
        (
            "uplink_egress",
            "no flow (a host packet)",
            tcp_frame(HOST_ADDR, 20_000, OUTSIDE_ADDR, SERVER_PORT, ACK),
        ),
    ];
    for (prog, case, frame) in cases {
        eprintln!(
            "{prog}: {case}: {} ns",
            run_time_ns(&env, prog, &frame, RUNS)
        );
    }
    // A new flow each run: SYNs to a published port from sources no flow has seen.
    let _published = container(&env, "p", &["-p", "8080:80"]);
    let syns = (0..RUNS as u32).map(|i| {
        let src = Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8);
        tcp_frame(src, 40_000, HOST_ADDR, 8080, SYN)
    });
    eprintln!(
        "uplink_ingress: new flow to a published port: {} ns",
        median_run_time_ns(&env, "uplink_ingress", syns)
    );
}

/// `--conntrack-max` of the sweep test: big enough that holding the table shows in the
/// daemon's memory, small enough to fill in seconds.
const SWEPT_TABLE: u32 = 65_536;
/// The most the daemon's resident memory may peak at while sweeping the 90%-full table. Holding
/// the table, it peaked at 49 MiB (debug build); walking it in place, at 14 MiB.
const SWEEP_PEAK_KIB: u64 = 24 * 1024;

/// The UDP timeout of the sweep test: the flows that fill the table live this long.
const FILL_TIMEOUT: Duration = Duration::from_secs(6);

/// `count` one-datagram UDP flows to HOST_ADDR:`port`, each from its own source address and
/// port in 198.19.0.0/16 (the sandbox's benchmarking range).
fn spoofed_datagrams(count: u32, port: u16) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |i| {
        let src = Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8);
        let sport = 40_000 + (i >> 16) as u16;
        ipv4(
            src,
            HOST_ADDR,
            UDP,
            &udp(src, HOST_ADDR, sport, port, b"fill", true),
        )
    })
}

/// `netd daemon` sweeping once at its start (and next in an hour); stopped with SIGTERM when
/// dropped, a failing test included.
struct Daemon(std::process::Child);

impl Daemon {
    /// Starts the daemon and waits for its first sweep; returns it and how many entries the
    /// sweep removed.
    fn sweeping_once(env: &TestEnv) -> (Self, usize) {
        let mut child = env
            .netd_cmd(&["daemon", "--sweep-interval", "3600"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let daemon = Self(child);
        // Read on a thread of its own: a daemon that never reports a sweep fails the test
        // instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead as _;
            for line in stderr.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(120))
                .expect("the daemon reported no sweep");
            if let Some(swept) = line
                .strip_prefix("netd daemon: ")
                .and_then(|l| l.split_once(" conntrack entries swept"))
            {
                return (daemon, swept.0.parse().unwrap());
            }
        }
    }

    /// The most resident memory the daemon has used (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {status}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

#[test]
fn the_daemon_sweeps_a_90_percent_full_table_in_place_keeping_live_flows() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "--conntrack-max",
        &SWEPT_TABLE.to_string(),
        "--conntrack-timeout",
        &format!("udp={}", FILL_TIMEOUT.as_secs()),
        "network",
        "create",
        "n",
        "--subnet",
        "10.95.0.0/24",
    ]);
    let web = container(&env, "web", &["-p", "8082:82", "-p", "5300:53/udp"]);
    // Something receives the datagrams (and never answers): each flow stays unreplied.
    let _sink = env.in_ns(&web.ns, || UdpSocket::bind(("0.0.0.0", 53)).unwrap());
    let mut published = Conn::published(&env, &web, 82, 8082);
    let live = tests::cli::conntrack_entries(&env);
    assert_eq!(live, 2, "the established flow's two entries");

    // Two entries per flow: 90% of the unassured table.
    let flows = SWEPT_TABLE * 9 / 10 / 2;
    let filling = std::time::Instant::now();
    let sent = env.in_ns(&env.outside_ns(), || {
        send_ipv4(spoofed_datagrams(flows, 5300))
    });
    assert_eq!(sent, flows as usize);
    // Listed as they are read: every one of them, and the established flow.
    let listed = tests::cli::flows(&env).len();
    assert!(
        filling.elapsed() < FILL_TIMEOUT,
        "filled and listed too slowly to check the listing"
    );
    // Expired entries stay until swept: counted after they expire, they are the same.
    let filled = tests::cli::conntrack_entries(&env);
    assert_eq!(listed, filled / 2, "`conntrack ls` lists every live flow");
    assert!(
        filled >= live + SWEPT_TABLE as usize * 85 / 100,
        "the table holds only {filled} of {SWEPT_TABLE} entries"
    );
    // The datagrams' flows time out, and stay idle long enough to be swept (twice their
    // timeout); the established one doesn't.
    thread::sleep(
        (FILL_TIMEOUT * 2 + Duration::from_millis(500)).saturating_sub(filling.elapsed()),
    );

    let (daemon, swept) = Daemon::sweeping_once(&env);
    assert_eq!(
        swept,
        filled - live,
        "the sweep removed every expired entry"
    );
    assert_eq!(tests::cli::conntrack_entries(&env), live, "and only those");
    assert_eq!(tests::cli::flows(&env).len(), 1, "the established flow");
    published.assert_alive_inside_first("after the sweep");
    let peak = daemon.peak_rss_kib();
    eprintln!("daemon peak RSS after sweeping {filled} entries: {peak} KiB");
    assert!(
        peak < SWEEP_PEAK_KIB,
        "the daemon peaked at {peak} KiB sweeping {filled} entries"
    );
}
