//! Every documented flag of `netd network create` and `netd container create`, on the success
//! path: the kernel objects it makes and the traffic that goes where the flag says.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use tests::{
    cli::{
        Ctr, TIMEOUT, assert_echoed, connect_error, create, echo_server, echo_servers, eventually,
        flows, output_in, ping_output, pings, stat, tcp_echo,
    },
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK},
    traffic::retry_interrupted,
};

/// A second address of the host, on its uplink (the outside reaches it on the same link).
const SECOND_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

fn add_second_host_address(env: &TestEnv) {
    output_in(
        env,
        &env.host_ns(),
        "ip",
        &[
            "addr",
            "add",
            &format!("{SECOND_HOST_ADDR}/24"),
            "dev",
            UPLINK,
        ],
    );
}

/// `ip -j ARGS` in `ns`, parsed.
fn ip_json(env: &TestEnv, ns: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&output_in(env, ns, "ip", &[&["-j"][..], args].concat())).unwrap()
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn network_create_with_gateway_bridge_mtu_and_host_ip_makes_what_they_name() {
    let env = TestEnv::new();
    add_second_host_address(&env);
    let bridge = "brflags";
    env.netd_ok(&[
        "network",
        "create",
        "n",
        "--subnet",
        "10.81.0.0/24",
        "--gateway",
        "10.81.0.254",
        "--bridge",
        bridge,
        "--mtu",
        "1400",
        "--host-ip",
        &SECOND_HOST_ADDR.to_string(),
    ]);
    let host = env.host_ns();
    let br = &ip_json(&env, &host, &["addr", "show", bridge])[0];
    assert_eq!(br["mtu"], 1400, "{br}");
    let addrs: Vec<String> = br["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    assert_eq!(addrs, ["10.81.0.254/24"], "{br}");

    let c = create(&env, "c", &["--network", "n", "-p", "8080:80"]);
    assert_ne!(
        c.ip,
        Ipv4Addr::new(10, 81, 0, 254),
        "the gateway is not handed out"
    );
    let eth0 = &ip_json(&env, &c.ns, &["link", "show", "eth0"])[0];
    assert_eq!(eth0["mtu"], 1400, "{eth0}");
    let route = output_in(&env, &c.ns, "ip", &["route", "show", "default"]);
    assert!(route.contains("via 10.81.0.254"), "{route}");
    let veth = env.netd_json(&["container", "inspect", &c.name])["host_veth"]
        .as_str()
        .unwrap()
        .to_string();
    let veth = &ip_json(&env, &host, &["link", "show", &veth])[0];
    assert_eq!(
        (&veth["master"], &veth["mtu"]),
        (&bridge.into(), &1400.into())
    );

    // Traffic: the gateway answers, and 1400 bytes leave whole but 1401 don't.
    assert!(pings(
        &env,
        &c.ns,
        "10.81.0.254".parse::<std::net::Ipv4Addr>().unwrap()
    ));
    let fits = ping_output(
        &env,
        &c.ns,
        &["-c1", "-W2", "-M", "do", "-s", "1372", "10.81.0.254"],
    );
    assert!(fits.contains("1 received"), "{fits}");
    let too_big = env.run_in(
        &c.ns,
        "ping",
        &["-n", "-c1", "-W2", "-M", "do", "-s", "1373", "10.81.0.254"],
    );
    let err = String::from_utf8_lossy(&too_big.stderr);
    assert!(err.contains("mtu=1400"), "{err}");

    // The published port is on --host-ip only: the uplink's own address refuses it.
    assert_eq!(
        env.netd_ok(&["port", &c.name]),
        format!("80/tcp -> {SECOND_HOST_ADDR}:8080\n")
    );
    let listed: serde_json::Value =
        serde_json::from_str(&env.netd_ok(&["port", &c.name, "--json"])).unwrap();
    assert_eq!(
        listed,
        serde_json::json!([{
            "proto": "tcp",
            "host_ip": SECOND_HOST_ADDR.to_string(),
            "host_port": 8080,
            "container_port": 80,
        }])
    );
    let server = echo_server(&env, &c.ns, sock(Ipv4Addr::UNSPECIFIED, 80));
    assert_echoed(&env, &env.outside_ns(), sock(SECOND_HOST_ADDR, 8080));
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(OUTSIDE_ADDR));
    assert_eq!(
        connect_error(&env, &env.outside_ns(), sock(HOST_ADDR, 8080)),
        ErrorKind::ConnectionRefused,
        "the host itself answers on an address the port is not published on"
    );
}

#[test]
fn a_network_without_masquerade_is_routed_both_ways_untranslated() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "network",
        "create",
        "routed",
        "--subnet",
        "10.82.0.0/24",
        "--masquerade=false",
    ]);
    env.netd_ok(&["network", "create", "masq", "--subnet", "10.83.0.0/24"]);
    let r = create(&env, "r", &["--network", "routed"]);
    let m = create(&env, "m", &["--network", "masq"]);
    let out = env.outside_ns();
    for subnet in ["10.82.0.0/24", "10.83.0.0/24"] {
        output_in(
            &env,
            &out,
            "ip",
            &["route", "add", subnet, "via", &HOST_ADDR.to_string()],
        );
    }

    // The outside opens a flow to the container's own address, and the container sees the
    // outside's address.
    let server = echo_server(&env, &r.ns, sock(Ipv4Addr::UNSPECIFIED, 9000));
    assert_echoed(&env, &out, sock(r.ip, 9000));
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(OUTSIDE_ADDR));
    assert!(pings(&env, &out, r.ip));
    // Its own flows leave with its own address, untracked.
    let server = echo_server(&env, &out, sock(OUTSIDE_ADDR, 9001));
    assert_echoed(&env, &r.ns, sock(OUTSIDE_ADDR, 9001));
    assert_eq!(
        server.join().unwrap().ip(),
        IpAddr::from(r.ip),
        "not masqueraded"
    );
    assert_eq!(
        flows(&env),
        Vec::<serde_json::Value>::new(),
        "routed flows are not tracked"
    );
    assert_eq!(stat(&env, "unsolicited"), 0);

    // The control: the same new flow to a masquerading network's container is dropped.
    let _listener = echo_server(&env, &m.ns, sock(Ipv4Addr::UNSPECIFIED, 9000));
    assert_eq!(
        connect_error(&env, &out, sock(m.ip, 9000)),
        ErrorKind::TimedOut
    );
    assert!(stat(&env, "unsolicited") > 0);
    let server = echo_server(&env, &out, sock(OUTSIDE_ADDR, 9002));
    assert_echoed(&env, &m.ns, sock(OUTSIDE_ADDR, 9002));
    assert_eq!(
        server.join().unwrap().ip(),
        IpAddr::from(HOST_ADDR),
        "masqueraded"
    );
}

#[test]
fn container_create_with_mac_takes_that_mac_and_its_traffic_passes() {
    let env = TestEnv::new();
    let mac = "02:aa:bb:cc:dd:ee";
    let c = create(&env, "mac", &["--mac", mac]);
    let eth0 = &ip_json(&env, &c.ns, &["link", "show", "eth0"])[0];
    assert_eq!(eth0["address"], mac, "{eth0}");
    // The anti-spoofing check takes the given MAC as the container's own: its frames pass.
    assert!(pings(&env, &env.host_ns(), c.ip));
    assert!(pings(&env, &c.ns, OUTSIDE_ADDR));
    let neigh = output_in(
        &env,
        &env.host_ns(),
        "ip",
        &["neigh", "show", &c.ip.to_string()],
    );
    assert!(neigh.contains(mac), "{neigh}");
    assert_eq!(stat(&env, "spoofed_mac"), 0);
}

/// Configures eth0 in the namespace at `ns` (not made by netd) and checks traffic, then that
/// `container rm` takes eth0 away and leaves the namespace.
fn joins_and_leaves_a_foreign_namespace(env: &TestEnv, name: &str, ns: &Path, flag: &[&str]) {
    env.netd_ok(&[&["container", "create", name][..], flag].concat());
    let ip: Ipv4Addr = env.netd_json(&["container", "inspect", name])["ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let addrs = output_in(env, ns, "ip", &["-o", "addr", "show", "eth0"]);
    assert!(addrs.contains(&format!("{ip}/")), "{addrs}");
    assert!(pings(env, ns, OUTSIDE_ADDR));
    let server = echo_server(env, ns, sock(Ipv4Addr::UNSPECIFIED, 9000));
    assert_echoed(env, &env.host_ns(), sock(ip, 9000));
    server.join().unwrap();
    env.netd_ok(&["container", "rm", name]);
    let links = output_in(env, ns, "ip", &["-o", "link"]);
    assert!(!links.contains("eth0"), "{links}");
}

#[test]
fn container_create_with_netns_configures_that_namespace_and_leaves_it_on_rm() {
    let env = TestEnv::new();
    let ns_name = env.name("ext");
    let ns = netd::netns::create(&ns_name).unwrap();
    let name = env.name("onns");
    joins_and_leaves_a_foreign_namespace(&env, &name, &ns, &["--netns", ns.to_str().unwrap()]);
    assert!(netd::netns::exists(&ns_name), "not netd's to remove");
}

#[test]
fn container_create_with_pid_configures_that_process_namespace_and_leaves_it_on_rm() {
    let env = TestEnv::new();
    // A process in a network namespace of its own (nsenter and unshare exec: same PID).
    let pid = env.spawn_in(&env.host_ns(), "unshare", &["--net", "sleep", "120"]);
    let ns = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
    let comm = format!("/proc/{pid}/comm");
    assert!(
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
        }),
        "unshare did not exec sleep"
    );
    let name = env.name("onpid");
    joins_and_leaves_a_foreign_namespace(&env, &name, &ns, &["--pid", &pid.to_string()]);
    assert!(ns.exists(), "the process and its namespace live on");
}

#[test]
fn rm_succeeds_while_the_kernel_dismantles_the_namespace_of_a_process_gone() {
    // An engine kills a container's process, then removes its network (containerd's `ctr
    // run --cni` DELs right after): the kernel dismantles the namespace, veths included, on a
    // work queue meanwhile, so the veth may go between netd's steps. Each round waits
    // 0.2 ms longer before the rm, to land in that window (a few ms after the kill here).
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "dying", "--subnet", "10.77.0.0/24"]);
    for round in 0..60u64 {
        let pid = env.spawn_in(&env.host_ns(), "unshare", &["--net", "sleep", "120"]);
        let comm = format!("/proc/{pid}/comm");
        assert!(
            eventually(Duration::from_secs(5), || {
                std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
            }),
            "unshare did not exec sleep"
        );
        let name = env.name(&format!("dying{round}"));
        env.netd_ok(&[
            "container",
            "create",
            &name,
            "--network",
            "dying",
            "--pid",
            &pid.to_string(),
        ]);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        std::thread::sleep(Duration::from_micros(round * 200));
        env.netd_ok(&["container", "rm", &name]);
    }
    let left = env.netd_ok(&["container", "ls", "--json"]);
    assert_eq!(left.trim(), "[]", "round after round, nothing is left");
}

/// A UDP echo on `port` in `ns` for one datagram.
fn udp_echo_once(env: &TestEnv, ns: &Path, port: u16) -> std::thread::JoinHandle<SocketAddr> {
    let sock = env.in_ns(ns, || {
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap()
    });
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, peer) = retry_interrupted(|| sock.recv_from(&mut buf)).unwrap();
        sock.send_to(&buf[..n], peer).unwrap();
        peer
    })
}

/// A datagram from the outside to `addr`; what came back, from where.
fn udp_ask(env: &TestEnv, addr: SocketAddr) -> (String, SocketAddr) {
    let sock = env.in_ns(&env.outside_ns(), || {
        UdpSocket::bind((OUTSIDE_ADDR, 0)).unwrap()
    });
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock.send_to(b"query", addr).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = retry_interrupted(|| sock.recv_from(&mut buf)).unwrap();
    (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
}

#[test]
fn publish_all_a_host_ip_and_port_ranges_reach_the_container_through_the_cli_ebpf() {
    publish_all_a_host_ip_and_port_ranges("ebpf");
}

#[test]
fn publish_all_a_host_ip_and_port_ranges_reach_the_container_through_the_cli_iptables() {
    publish_all_a_host_ip_and_port_ranges("iptables");
}

/// `-P` with `--expose`d ports, `-p IP:HOST:CONTAINER` and port ranges for TCP and UDP, on a
/// network of `datapath`: each published port carries traffic to its container port.
fn publish_all_a_host_ip_and_port_ranges(datapath: &str) {
    let env = TestEnv::new();
    add_second_host_address(&env);
    env.netd_ok(&[
        "--datapath",
        datapath,
        "network",
        "create",
        "n",
        "--subnet",
        "10.67.0.0/24",
    ]);
    let c: Ctr = create(
        &env,
        "web",
        &[
            "--network",
            "n",
            "--expose",
            "80",
            "--expose",
            "53/udp",
            "-P",
            "-p",
            &format!("{HOST_ADDR}:8081:81"),
            "-p",
            "8090-8092:90-92",
            "-p",
            "5300-5301:63-64/udp",
        ],
    );
    let ports = env.netd_ok(&["port", &c.name]);
    let published: Vec<(String, SocketAddr)> = ports
        .lines()
        .map(|l| {
            let (cport, host) = l.split_once(" -> ").unwrap_or_else(|| panic!("{ports}"));
            (cport.to_string(), host.parse().unwrap())
        })
        .collect();
    let host_port_of = |cport: &str| {
        published
            .iter()
            .find(|(c, _)| c == cport)
            .unwrap_or_else(|| panic!("{cport} is not published: {ports}"))
            .1
    };
    // -P: every exposed port on a port of Docker's ephemeral range.
    for cport in ["80/tcp", "53/udp"] {
        let port = host_port_of(cport).port();
        assert!(
            (49153..=65535).contains(&port),
            "{cport} on {port}: {ports}"
        );
    }
    assert_eq!(host_port_of("81/tcp"), sock(HOST_ADDR, 8081));
    assert_eq!(published.len(), 2 + 1 + 3 + 2, "{ports}");

    let mut tcp = vec![
        (80, host_port_of("80/tcp").port(), HOST_ADDR),
        (81, 8081, HOST_ADDR),
    ];
    tcp.extend((0..3).map(|i| (90 + i, 8090 + i, HOST_ADDR)));
    for (cport, hport, via) in tcp {
        let server = echo_server(&env, &c.ns, sock(Ipv4Addr::UNSPECIFIED, cport));
        assert_eq!(
            tcp_echo(&env, &env.outside_ns(), sock(via, hport)).unwrap(),
            "netd",
            "{via}:{hport} -> {cport}"
        );
        assert_eq!(server.join().unwrap().ip(), IpAddr::from(OUTSIDE_ADDR));
    }
    let mut udp = vec![(53, host_port_of("53/udp").port())];
    udp.extend((0..2).map(|i| (63 + i, 5300 + i)));
    for (cport, hport) in udp {
        let server = udp_echo_once(&env, &c.ns, cport);
        let (reply, from) = udp_ask(&env, sock(HOST_ADDR, hport));
        assert_eq!((reply.as_str(), from), ("query", sock(HOST_ADDR, hport)));
        assert_eq!(server.join().unwrap().ip(), IpAddr::from(OUTSIDE_ADDR));
    }
    // The port bound to the uplink's address is not on the host's other address.
    let _server = echo_server(&env, &c.ns, sock(Ipv4Addr::UNSPECIFIED, 81));
    assert_eq!(
        connect_error(&env, &env.outside_ns(), sock(SECOND_HOST_ADDR, 8081)),
        ErrorKind::ConnectionRefused
    );
}

/// A port published without an address is reached on each of the host's addresses (Docker
/// DNATs every `--dst-type LOCAL` address).
fn a_wildcard_port_is_reached_on_every_host_address(datapath: &str) {
    let env = TestEnv::new();
    add_second_host_address(&env);
    env.netd_ok(&[
        "--datapath",
        datapath,
        "network",
        "create",
        "n",
        "--subnet",
        "10.85.0.0/24",
    ]);
    let c = create(&env, "web", &["--network", "n", "-p", "8080:80"]);
    let vias = [HOST_ADDR, SECOND_HOST_ADDR];
    let server = echo_servers(&env, &c.ns, sock(Ipv4Addr::UNSPECIFIED, 80), vias.len());
    for via in vias {
        assert_eq!(
            tcp_echo(&env, &env.outside_ns(), sock(via, 8080)).map_err(|e| e.kind()),
            Ok("netd".to_string()),
            "{datapath}: through {via}"
        );
    }
    server.join().unwrap();
}

#[test]
fn a_wildcard_port_is_reached_on_every_host_address_iptables() {
    a_wildcard_port_is_reached_on_every_host_address("iptables");
}

#[test]
fn a_wildcard_port_is_reached_on_every_host_address_ebpf() {
    a_wildcard_port_is_reached_on_every_host_address("ebpf");
}

/// The live flow of `proto` in `conntrack ls --json`, if any.
fn flow_of(env: &TestEnv, proto: &str) -> Option<serde_json::Value> {
    flows(env).into_iter().find(|f| f["proto"] == proto)
}

#[test]
fn conntrack_timeouts_for_tcp_and_icmp_expire_entries_after_the_configured_time() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "--conntrack-timeout",
        "tcp_established=4",
        "--conntrack-timeout",
        "icmp=1",
        "network",
        "create",
        "n",
        "--subnet",
        "10.84.0.0/24",
    ]);
    let c = create(&env, "ct", &["--network", "n"]);
    // An established TCP connection left idle, a ping, and (the control) a UDP flow on
    // netfilter's default 30 s.
    let listener = env.in_ns(&env.outside_ns(), || {
        std::net::TcpListener::bind((OUTSIDE_ADDR, 9000)).unwrap()
    });
    let conn = env.in_ns(&c.ns, || {
        std::net::TcpStream::connect_timeout(&sock(OUTSIDE_ADDR, 9000), TIMEOUT).unwrap()
    });
    let _accepted = listener.accept().unwrap();
    assert!(pings(&env, &c.ns, OUTSIDE_ADDR));
    env.in_ns(&c.ns, || {
        UdpSocket::bind("0.0.0.0:0")
            .unwrap()
            .send_to(b"x", (OUTSIDE_ADDR, 5400))
            .unwrap()
    });
    let tcp = flow_of(&env, "tcp").expect("a tcp flow");
    assert_eq!(tcp["state"], "ESTABLISHED", "{tcp}");
    assert!(tcp["expires_secs"].as_u64().unwrap() <= 4, "{tcp}");
    let icmp = flow_of(&env, "icmp").expect("an icmp flow");
    assert!(icmp["expires_secs"].as_u64().unwrap() <= 1, "{icmp}");

    // `conntrack ls` counts whole idle seconds: an entry is gone once it was idle for more
    // than its timeout, i.e. by timeout + 1 s.
    std::thread::sleep(Duration::from_millis(2300));
    assert!(
        flow_of(&env, "icmp").is_none(),
        "icmp outlived 1 s: {:?}",
        flows(&env)
    );
    assert!(flow_of(&env, "tcp").is_some(), "tcp expired before its 4 s");
    std::thread::sleep(Duration::from_millis(3000));
    assert!(
        flow_of(&env, "tcp").is_none(),
        "tcp outlived 4 s: {:?}",
        flows(&env)
    );
    assert!(flow_of(&env, "udp").is_some(), "the 30 s udp flow went too");
    drop(conn);
}
