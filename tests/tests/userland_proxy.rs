//! The iptables datapath's userland proxy (Docker's docker-proxy): a host process reaches a
//! port published on loopback (`-p 127.0.0.1:H:C`, `-p [::1]:H:C`) or on every address
//! (`-p H:C`, through 127.0.0.1 and [::1]), over TCP and UDP, which the rules alone can't
//! serve. The proxies go with their ports, a port that can't be bound fails the publish with
//! nothing left, and `netd gc` and the daemon start again a proxy killed behind netd's back.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use tests::{
    cli::{Ctr, connect_error, create},
    engines::NetdDaemon,
    harness::{TestEnv, proxies, proxy_pids},
    traffic::retry_interrupted,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// A TCP server on `[::]:port` in `ns` (IPv4 too) that answers every connection with the
/// address it came from, until the test ends.
fn tcp_peer_server(env: &TestEnv, ns: &Path, port: u16) {
    let listener = env.in_ns(ns, || {
        TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).unwrap()
    });
    std::thread::spawn(move || {
        for (mut conn, peer) in listener.incoming().flatten().filter_map(|c| {
            let peer = c.peer_addr().ok()?;
            Some((c, peer))
        }) {
            let _ = conn.write_all(peer.ip().to_canonical().to_string().as_bytes());
        }
    });
}

/// A UDP server on `[::]:port` in `ns` that answers every datagram with the address it came
/// from, until the test ends.
fn udp_peer_server(env: &TestEnv, ns: &Path, port: u16) {
    let socket = env.in_ns(ns, || {
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)).unwrap()
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(peer.ip().to_canonical().to_string().as_bytes(), peer);
        }
    });
}

/// What the server behind `addr` says to a TCP connection from the host.
fn tcp_ask(env: &TestEnv, addr: SocketAddr) -> std::io::Result<String> {
    env.in_ns(&env.host_ns(), || {
        let mut conn = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        conn.set_read_timeout(Some(TIMEOUT))?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        Ok(answer)
    })
}

/// What the server behind `addr` answers to a datagram from the host, if anything within
/// the timeout.
fn udp_ask(env: &TestEnv, addr: SocketAddr) -> Option<String> {
    env.in_ns(&env.host_ns(), || {
        let any: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = UdpSocket::bind((any, 0)).unwrap();
        socket.set_read_timeout(Some(TIMEOUT)).unwrap();
        socket.send_to(b"who", addr).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = retry_interrupted(|| socket.recv_from(&mut buf)).ok()?;
        assert_eq!(from, addr, "the answer comes from the address asked");
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// A dual-stack network on the iptables datapath: its gateways are what the container sees
/// the proxy's connections come from.
fn dual_stack_network(env: &TestEnv) {
    env.netd_ok(&[
        "--datapath",
        "iptables",
        "network",
        "create",
        "n",
        "--ipv6",
        "--subnet",
        "10.61.0.0/24",
        "--subnet",
        "fd00:61::/64",
    ]);
}

const GATEWAY4: &str = "10.61.0.1";
const GATEWAY6: &str = "fd00:61::1";

/// The files under the state dir's record of proxies.
fn proxy_records(env: &TestEnv) -> Vec<String> {
    std::fs::read_dir(env.state_dir.join("proxies"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn refused(env: &TestEnv, addr: SocketAddr) -> bool {
    connect_error(env, &env.host_ns(), addr) == ErrorKind::ConnectionRefused
}

#[test]
fn host_processes_reach_loopback_ports_through_the_userland_proxy() {
    let env = TestEnv::dual_stack();
    dual_stack_network(&env);
    let web: Ctr = create(
        &env,
        "web",
        &[
            "--network",
            "n",
            "-p",
            "127.0.0.1:8080:80",
            "-p",
            "[::1]:8081:80",
            "-p",
            "8082:80",
            "-p",
            "8083:53/udp",
        ],
    );
    tcp_peer_server(&env, &web.ns, 80);
    udp_peer_server(&env, &web.ns, 53);
    let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);

    // IPv4 loopback to the container's IPv4 address, IPv6 loopback to its IPv6 one.
    for (addr, from) in [
        (at(LO4, 8080), GATEWAY4),
        (at(LO6, 8081), GATEWAY6),
        (at(LO4, 8082), GATEWAY4),
        (at(LO6, 8082), GATEWAY6),
    ] {
        assert_eq!(tcp_ask(&env, addr).unwrap(), from, "TCP via {addr}");
    }
    for (addr, from) in [(at(LO4, 8083), GATEWAY4), (at(LO6, 8083), GATEWAY6)] {
        assert_eq!(udp_ask(&env, addr).as_deref(), Some(from), "UDP via {addr}");
    }
    // A port published on one loopback address isn't on the other.
    assert!(refused(&env, at(LO6, 8080)));
    assert!(refused(&env, at(LO4, 8081)));
    assert_eq!(proxies(&env).len(), 6, "{:?}", proxies(&env));

    // Unpublished: refused at once, and the proxies are gone.
    env.netd_ok(&["unpublish", &web.name, "127.0.0.1:8080:80", "8082:80"]);
    for addr in [at(LO4, 8080), at(LO4, 8082), at(LO6, 8082)] {
        assert!(refused(&env, addr), "{addr} after unpublish");
    }
    assert_eq!(
        proxies(&env),
        [
            "--proto tcp --listen [::1]:8081 --to [fd00:61::2]:80",
            "--proto udp --listen 127.0.0.1:8083 --to 10.61.0.2:53",
            "--proto udp --listen [::1]:8083 --to [fd00:61::2]:53",
        ]
    );
    assert_eq!(tcp_ask(&env, at(LO6, 8081)).unwrap(), GATEWAY6);

    // Removed with the container: nothing listens, nothing runs, nothing is recorded.
    env.netd_ok(&["container", "rm", &web.name]);
    assert!(refused(&env, at(LO6, 8081)));
    assert_eq!(udp_ask(&env, at(LO4, 8083)), None);
    assert_eq!(proxies(&env), Vec::<String>::new());
    assert_eq!(proxy_records(&env), Vec::<String>::new());
}

#[test]
fn a_port_range_on_loopback_gets_a_proxy_per_port() {
    let env = TestEnv::new();
    env.netd_ok(&["--datapath", "iptables", "network", "create", "n"]);
    let web = create(
        &env,
        "web",
        &["--network", "n", "-p", "127.0.0.1:8090-8091:80-81"],
    );
    tcp_peer_server(&env, &web.ns, 80);
    tcp_peer_server(&env, &web.ns, 81);
    for port in [8090, 8091] {
        let answer = tcp_ask(&env, SocketAddr::new(LO4, port)).unwrap();
        assert!(!answer.is_empty(), "{port}: nothing came back");
    }
    // No IPv6 loopback in this sandbox: no proxy on [::1] for a port on every address.
    env.netd_ok(&["publish", &web.name, "-p", "8092:80"]);
    assert_eq!(proxies(&env).len(), 3, "{:?}", proxies(&env));
    // A network removed with its containers leaves no proxy.
    env.netd_ok(&["container", "rm", &web.name]);
    env.netd_ok(&["network", "rm", "n"]);
    assert_eq!(proxies(&env), Vec::<String>::new());
}

#[test]
fn a_taken_loopback_port_fails_the_publish_and_leaves_nothing() {
    let env = TestEnv::new();
    env.netd_ok(&["--datapath", "iptables", "network", "create", "n"]);
    let rules_before = nat_rules(&env);
    let _taken = env.in_ns(&env.host_ns(), || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 8095)).unwrap()
    });

    let name = env.name("web");
    let err = env.netd_err(&[
        "container",
        "create",
        &name,
        "--network",
        "n",
        "-p",
        "8095:80",
    ]);
    assert!(err.contains("127.0.0.1:8095/tcp"), "{err}");
    assert_eq!(
        env.netd_json(&["container", "ls", "--json"]),
        serde_json::json!([])
    );

    let web = create(&env, "web", &["--network", "n", "-p", "8096:80"]);
    let rules_with_one = nat_rules(&env);
    let err = env.netd_err(&[
        "publish",
        &web.name,
        "-p",
        "8097:80",
        "-p",
        "127.0.0.1:8095:80",
    ]);
    assert!(err.contains("127.0.0.1:8095/tcp"), "{err}");
    let ports = env.netd_ok(&["port", &web.name]);
    assert!(
        !ports.contains("8095") && !ports.contains("8097"),
        "{ports}"
    );
    assert_eq!(
        nat_rules(&env),
        rules_with_one,
        "the publish's rules are gone"
    );
    assert_eq!(
        proxies(&env),
        [format!(
            "--proto tcp --listen 127.0.0.1:8096 --to {}:80",
            web.ip
        )]
    );
    assert_eq!(proxy_records(&env).len(), 1, "{:?}", proxy_records(&env));

    env.netd_ok(&["container", "rm", &web.name]);
    assert_eq!(nat_rules(&env), rules_before);
    assert_eq!(proxies(&env), Vec::<String>::new());
    assert_eq!(proxy_records(&env), Vec::<String>::new());
}

/// The host namespace's nat rules.
fn nat_rules(env: &TestEnv) -> String {
    let out = env.run_in(&env.host_ns(), "iptables", &["-t", "nat", "-S"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn gc_restarts_a_proxy_killed_behind_netds_back() {
    let env = TestEnv::new();
    env.netd_ok(&["--datapath", "iptables", "network", "create", "n"]);
    let web = create(&env, "web", &["--network", "n", "-p", "127.0.0.1:8098:80"]);
    tcp_peer_server(&env, &web.ns, 80);
    let addr = SocketAddr::new(LO4, 8098);
    assert!(tcp_ask(&env, addr).is_ok());

    let [(pid, _)] = proxy_pids(&env)[..] else {
        panic!("one proxy expected: {:?}", proxies(&env));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    // A dying process leaves the listing (its memory goes first) before its socket closes
    // (CI connected in between): wait for the refusal itself.
    let refuses = || {
        env.in_ns(&env.host_ns(), || {
            TcpStream::connect_timeout(&addr, TIMEOUT)
        })
        .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
    };
    assert!(tests::cli::eventually(TIMEOUT, refuses));
    assert!(proxies(&env).is_empty());

    let gc = env.netd_ok(&["gc"]);
    assert!(gc.contains("restarted 1 userland proxy"), "{gc}");
    assert!(tcp_ask(&env, addr).is_ok());
    assert!(
        !env.netd_ok(&["gc"]).contains("proxy"),
        "nothing more to do"
    );
}

#[test]
fn the_daemons_rounds_restart_a_proxy_killed_behind_netds_back() {
    let env = TestEnv::new();
    env.netd_ok(&["--datapath", "iptables", "network", "create", "n"]);
    let web = create(&env, "web", &["--network", "n", "-p", "127.0.0.1:8101:80"]);
    tcp_peer_server(&env, &web.ns, 80);
    let socket = env.state_dir.join("netd.sock");
    let _daemon = NetdDaemon::start(
        &env,
        &[
            "--sweep-interval",
            "0.2",
            "--socket",
            socket.to_str().unwrap(),
        ],
        &socket,
    );
    let [(pid, _)] = proxy_pids(&env)[..] else {
        panic!("one proxy expected: {:?}", proxies(&env));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let restarted = || matches!(proxy_pids(&env)[..], [(again, _)] if again != pid);
    assert!(tests::cli::eventually(Duration::from_secs(5), restarted));
    // The process seen may still be the proxy's starter, before it binds: it answers soon.
    let answers = || tcp_ask(&env, SocketAddr::new(LO4, 8101)).is_ok();
    assert!(tests::cli::eventually(Duration::from_secs(5), answers));
}

#[test]
fn the_ebpf_datapath_runs_no_proxy() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n"]);
    create(
        &env,
        "web",
        &["--network", "n", "-p", "127.0.0.1:8099:80", "-p", "8100:80"],
    );
    assert_eq!(proxies(&env), Vec::<String>::new());
    assert_eq!(proxy_records(&env), Vec::<String>::new());
}
