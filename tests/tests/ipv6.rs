//! Dual-stack networks with real IPv6 packets: the sandbox's uplink carries IPv6 (2001:2::/64)
//! and the outside namespace is reached only through it. The iptables datapath does all of
//! it; the eBPF datapath enforces the isolation rules for IPv6 but translates none (no NAT66
//! yet), so netd makes only routed and internal dual-stack networks there.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use tests::{
    cli::{
        Ctr, assert_echoed, connect_error, create, echo_server, echo_servers, output_in, pings,
        stat,
    },
    frames::{send_raw, with_macs},
    frames6,
    harness::{HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR6, TestEnv},
};

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Creates the dual-stack network `name` on the iptables datapath with `args`.
fn dual_stack_network(env: &TestEnv, name: &str, args: &[&str]) -> String {
    dual_stack_network_on(env, "iptables", name, args)
}

/// Creates the dual-stack network `name` on `datapath` with `args`.
fn dual_stack_network_on(env: &TestEnv, datapath: &str, name: &str, args: &[&str]) -> String {
    let create = [
        &["--datapath", datapath, "network", "create", name, "--ipv6"][..],
        args,
    ]
    .concat();
    env.netd_ok(&create)
}

/// Container `c`'s IPv6 address, as `container inspect` shows it.
fn ip6(env: &TestEnv, c: &Ctr) -> Ipv6Addr {
    env.netd_json(&["container", "inspect", &c.name])["ip6"]
        .as_str()
        .unwrap_or_else(|| panic!("{} has no IPv6 address", c.name))
        .parse()
        .unwrap()
}

/// Container `c`'s /etc/hosts, as netd wrote it.
fn hosts_of(env: &TestEnv, c: &Ctr) -> String {
    let path = env.state_dir.join("containers").join(&c.name).join("hosts");
    std::fs::read_to_string(path).unwrap()
}

/// Asserts that no rule of netd's is left in either family.
fn assert_no_rules_left(env: &TestEnv) {
    for tool in ["iptables-save", "ip6tables-save"] {
        let rules = saved(env, tool);
        assert!(!rules.contains("NETD"), "{tool} left:\n{rules}");
    }
}

/// The rules of `tool` (`iptables-save`, `ip6tables-save`) in the sandbox host.
fn saved(env: &TestEnv, tool: &str) -> String {
    output_in(env, &env.host_ns(), tool, &[])
}

#[test]
fn a_dual_stack_container_is_reached_and_reaches_out_over_both_families() {
    let env = TestEnv::dual_stack();
    let line = dual_stack_network(
        &env,
        "n6",
        &["--subnet", "10.60.0.0/24", "--subnet", "fd00:60::/64"],
    );
    assert!(
        line.contains("ipv6 fd00:60::/64 gateway fd00:60::1"),
        "{line}"
    );
    let web = create(&env, "web", &["--network", "n6", "-p", "8080:80"]);
    assert_eq!(ip6(&env, &web), "fd00:60::2".parse::<Ipv6Addr>().unwrap());
    let addrs = output_in(&env, &web.ns, "ip", &["-6", "-o", "addr", "show", "eth0"]);
    assert!(addrs.contains("fd00:60::2/64"), "{addrs}");
    let routes = output_in(&env, &web.ns, "ip", &["-6", "route"]);
    assert!(
        routes.contains("default via fd00:60::1 dev eth0"),
        "{routes}"
    );
    let hosts = hosts_of(&env, &web);
    assert!(
        hosts.contains(&format!("fd00:60::2\t{}\n", web.name)),
        "{hosts}"
    );

    // In: the published port answers on the host's IPv6 and IPv4 addresses, from the outside,
    // and the container sees the client's own address (DNAT, no source NAT).
    let server = echo_servers(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80), 6);
    let outside = env.outside_ns();
    assert_echoed(&env, &outside, sock(HOST_ADDR6, 8080));
    assert_echoed(&env, &outside, sock(HOST_ADDR, 8080));
    // From the host itself, and from another container through the host's IPv6 address.
    assert_echoed(&env, &env.host_ns(), sock(HOST_ADDR6, 8080));
    let client = create(&env, "client", &["--network", "n6"]);
    assert_echoed(&env, &client.ns, sock(HOST_ADDR6, 8080));
    // The container itself through the host's addresses: back out of the port it came in on
    // (hairpin mode), and from the gateway (Docker's hairpin MASQUERADE), as the server sees.
    for host in [IpAddr::from(HOST_ADDR6), IpAddr::from(HOST_ADDR)] {
        // Its own port.
        assert_echoed(&env, &web.ns, sock(host, 8080));
    }
    let peers = server.join().unwrap();
    assert_eq!(peers[0].ip(), IpAddr::from(OUTSIDE_ADDR6), "{peers:?}");
    let gateways: [IpAddr; 2] = ["fd00:60::1".parse().unwrap(), "10.60.0.1".parse().unwrap()];
    // The server's socket is IPv6: IPv4 peers show v4-mapped.
    let seen: Vec<IpAddr> = peers[4..].iter().map(|p| p.ip().to_canonical()).collect();
    assert_eq!(seen, gateways);

    // Out: masqueraded to the host's IPv6 address (NAT66), echo and TCP.
    assert!(
        pings(&env, &web.ns, OUTSIDE_ADDR6),
        "ping the outside over IPv6"
    );
    let server = echo_server(&env, &outside, sock(OUTSIDE_ADDR6, 9000));
    assert_echoed(&env, &web.ns, sock(OUTSIDE_ADDR6, 9000));
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(HOST_ADDR6));

    // Gone without a trace in either family.
    env.netd_ok(&["container", "rm", &client.name]);
    env.netd_ok(&["container", "rm", &web.name]);
    env.netd_ok(&["network", "rm", "n6"]);
    assert_no_rules_left(&env);
}

#[test]
fn a_port_published_on_one_ipv6_address_answers_there_only() {
    let env = TestEnv::dual_stack();
    dual_stack_network(&env, "n6", &[]);
    let web = create(
        &env,
        "web",
        &["--network", "n6", "-p", &format!("[{HOST_ADDR6}]:8080:80")],
    );
    let listing = env.netd_ok(&["container", "ls"]);
    assert!(
        listing.contains(&format!("80/tcp -> [{HOST_ADDR6}]:8080")),
        "{listing}"
    );
    let server = echo_server(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80));
    let outside = env.outside_ns();
    assert_echoed(&env, &outside, sock(HOST_ADDR6, 8080));
    server.join().unwrap();
    // Nothing listens on the host itself: IPv4 to the same port finds no DNAT and is refused.
    assert_eq!(
        connect_error(&env, &outside, sock(HOST_ADDR, 8080)),
        ErrorKind::ConnectionRefused
    );
}

#[test]
fn icc_false_links_and_internal_networks_hold_for_ipv6() {
    icc_links_and_internal_hold_for_ipv6("iptables", &[]);
}

#[test]
fn icc_false_links_and_internal_networks_hold_for_ipv6_on_the_ebpf_datapath() {
    icc_links_and_internal_hold_for_ipv6("ebpf", &["--masquerade=false"]);
}

/// The isolation twin of the IPv4 tests on `datapath`, its `--icc=false` network made with
/// `quiet_args` too.
fn icc_links_and_internal_hold_for_ipv6(datapath: &str, quiet_args: &[&str]) {
    let env = TestEnv::dual_stack();
    dual_stack_network_on(
        &env,
        datapath,
        "quiet",
        &[&["--icc=false"][..], quiet_args].concat(),
    );
    let db = create(&env, "db", &["--network", "quiet", "--expose", "80"]);
    let other = create(&env, "other", &["--network", "quiet"]);
    let app = create(
        &env,
        "app",
        &["--network", "quiet", "--link", &format!("{}:db", db.name)],
    );
    let db6 = ip6(&env, &db);
    let hosts = hosts_of(&env, &app);
    assert!(
        hosts.contains(&format!("{db6}\tdb {}\n", db.name)),
        "{hosts}"
    );
    let server = echo_server(&env, &db.ns, sock(Ipv6Addr::UNSPECIFIED, 80));
    // The link opens the exposed port over IPv6; without one, --icc=false drops.
    assert_eq!(
        connect_error(&env, &other.ns, sock(db6, 80)),
        ErrorKind::TimedOut
    );
    assert!(!pings(&env, &other.ns, db6), "icc=false drops ICMPv6 echo");
    assert_echoed(&env, &app.ns, sock(db6, 80));
    server.join().unwrap();

    dual_stack_network_on(&env, datapath, "inner", &["--internal"]);
    let inner = create(&env, "inner", &["--network", "inner"]);
    let gateway6: IpAddr = env.netd_json(&["network", "inspect", "inner"])["network"]["gateway6"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pings(&env, &inner.ns, gateway6), "the gateway is in reach");
    let peer = create(&env, "peer", &["--network", "inner"]);
    let server = echo_server(&env, &peer.ns, sock(Ipv6Addr::UNSPECIFIED, 80));
    assert_echoed(&env, &inner.ns, sock(ip6(&env, &peer), 80));
    server.join().unwrap();
    assert!(
        !pings(&env, &inner.ns, OUTSIDE_ADDR6),
        "an internal network reaches no further"
    );
    assert_eq!(
        connect_error(&env, &inner.ns, sock(OUTSIDE_ADDR6, 9000)),
        ErrorKind::TimedOut
    );
    // Other networks are out of reach over IPv6 as over IPv4.
    assert!(!pings(&env, &inner.ns, db6), "another network's container");

    for c in [&peer, &inner, &app, &other, &db] {
        env.netd_ok(&["container", "rm", &c.name]);
    }
    env.netd_ok(&["network", "rm", "inner"]);
    env.netd_ok(&["network", "rm", "quiet"]);
    assert_no_rules_left(&env);
}

#[test]
fn ipv6_is_refused_where_it_would_not_be_enforced() {
    let env = TestEnv::new();
    for (args, why) in [
        (
            &["network", "create", "n6", "--ipv6"][..],
            "--ipv6 on the ebpf datapath needs --internal or --masquerade=false",
        ),
        (
            &["network", "create", "n6", "--subnet", "fd00:60::/64"],
            "needs --ipv6",
        ),
        (
            &[
                "--datapath",
                "iptables",
                "network",
                "create",
                "n6",
                "--ipv6",
                "--subnet",
                "fd00::/64",
                "--subnet",
                "fd01::/64",
            ],
            "two IPv6 subnets",
        ),
    ] {
        let err = env.netd_err(args);
        assert!(
            err.contains(why) && !err.trim().contains('\n'),
            "{args:?}: {err}"
        );
    }
    env.netd_ok(&["--datapath", "iptables", "network", "create", "v4"]);
    for (args, why) in [
        (&["--network", "v4", "--ip6", "fd00::2"][..], "has no IPv6"),
        (
            &["--network", "v4", "-p", "[::1]:8080:80"],
            "publishing on ::1",
        ),
        (
            &[
                "--network",
                "v4",
                "--publish-allow",
                "2001:db8::/32",
                "-p",
                "80",
            ],
            "--publish-allow 2001:db8::/32",
        ),
    ] {
        let err = env.netd_err(&[&["container", "create", "c"][..], args].concat());
        assert!(
            err.contains(why) && !err.trim().contains('\n'),
            "{args:?}: {err}"
        );
    }
    let listing = env.netd_json(&["container", "ls", "--json"]);
    assert_eq!(listing, serde_json::json!([]), "nothing half-made");
    let networks = env.netd_json(&["network", "ls", "--json"]);
    assert_eq!(networks.as_array().unwrap().len(), 1, "{networks}");
}

/// A network beyond the outside one, behind a link whose outside end has IPv6's minimum MTU
/// (1280): the outside namespace routes to it, and sends Packet Too Big for what doesn't
/// fit. The far end keeps 1500, so the far server's MSS doesn't spare the sender the
/// discovery.
const FAR_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 3, 0, 0, 0, 0, 0, 2);
const NEAR_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 3, 0, 0, 0, 0, 0, 1);

/// Makes the namespace beyond the outside one ([`FAR_ADDR6`]), named by `env` (removed with it).
fn far_network(env: &TestEnv) -> PathBuf {
    let name = env.name("far");
    let far = netd::netns::create(&name).unwrap();
    let outside = env.outside_ns();
    let run = |ns: &PathBuf, args: &[&str]| {
        output_in(env, ns, args[0], &args[1..]);
    };
    run(
        &outside,
        &[
            "ip", "link", "add", "near", "mtu", "1280", "type", "veth", "peer", "name", "farend",
        ],
    );
    run(
        &outside,
        &[
            "ip",
            "link",
            "set",
            "farend",
            "netns",
            &far.to_string_lossy(),
        ],
    );
    // No duplicate address detection: a tentative link-local address sends no neighbour
    // solicitation for forwarded packets.
    run(
        &outside,
        &[
            "sysctl",
            "-qw",
            "net.ipv6.conf.near.accept_dad=0",
            "net.ipv6.conf.near.disable_ipv6=0",
            "net.ipv6.conf.all.forwarding=1",
        ],
    );
    run(
        &outside,
        &[
            "ip",
            "addr",
            "add",
            &format!("{NEAR_ADDR6}/64"),
            "dev",
            "near",
            "nodad",
        ],
    );
    run(&outside, &["ip", "link", "set", "near", "up"]);
    run(
        &far,
        &[
            "sysctl",
            "-qw",
            "net.ipv6.conf.farend.accept_dad=0",
            "net.ipv6.conf.farend.disable_ipv6=0",
        ],
    );
    run(
        &far,
        &[
            "ip",
            "addr",
            "add",
            &format!("{FAR_ADDR6}/64"),
            "dev",
            "farend",
            "nodad",
        ],
    );
    run(&far, &["ip", "link", "set", "farend", "up"]);
    run(
        &far,
        &[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &NEAR_ADDR6.to_string(),
        ],
    );
    far
}

#[test]
fn path_mtu_discovery_works_through_nat66() {
    let env = TestEnv::dual_stack();
    dual_stack_network(&env, "n6", &[]);
    let web = create(&env, "web", &["--network", "n6"]);
    let far = far_network(&env);
    // The far server counts what it reads and answers with the count.
    let listener = env.in_ns(&far, || {
        TcpListener::bind(sock(Ipv6Addr::UNSPECIFIED, 9100)).unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut data = Vec::new();
        conn.read_to_end(&mut data).unwrap();
        conn.write_all(data.len().to_string().as_bytes()).unwrap();
        peer
    });
    // Full-size segments (1500-byte packets) leave the container; the far link takes 1280.
    // Only the outside's Packet Too Big, translated back through NAT66 to the container,
    // gets them there: without it the connection stalls until the read times out.
    let sent = vec![b'x'; 64 * 1024];
    let reply = env.in_ns(&web.ns, || {
        let mut conn = TcpStream::connect_timeout(&sock(FAR_ADDR6, 9100), Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(&sent)?;
        conn.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        Ok::<_, std::io::Error>(reply)
    });
    assert_eq!(reply.unwrap(), sent.len().to_string());
    assert_eq!(
        server.join().unwrap().ip(),
        IpAddr::from(HOST_ADDR6),
        "masqueraded"
    );
    let route = output_in(
        &env,
        &web.ns,
        "ip",
        &["-6", "route", "get", &FAR_ADDR6.to_string()],
    );
    assert!(
        route.contains("mtu 1280"),
        "the container learned the path MTU: {route}"
    );
}

#[test]
fn a_network_without_masquerade_routes_its_ipv6_prefix_unchanged() {
    let env = TestEnv::dual_stack();
    // A global prefix (documentation range) the outside routes to the host.
    dual_stack_network(
        &env,
        "routed",
        &["--subnet", "2001:db8:60::/64", "--masquerade=false"],
    );
    let outside = env.outside_ns();
    output_in(
        &env,
        &outside,
        "ip",
        &[
            "route",
            "add",
            "2001:db8:60::/64",
            "via",
            &HOST_ADDR6.to_string(),
        ],
    );
    let c = create(&env, "c", &["--network", "routed"]);
    let own = ip6(&env, &c);
    let server = echo_server(&env, &outside, sock(OUTSIDE_ADDR6, 9000));
    assert_echoed(&env, &c.ns, sock(OUTSIDE_ADDR6, 9000));
    assert_eq!(
        server.join().unwrap().ip(),
        IpAddr::from(own),
        "not translated"
    );
    let rules = saved(&env, "ip6tables-save");
    assert!(!rules.contains("MASQUERADE"), "{rules}");
}

#[test]
fn a_dual_stack_network_works_beside_an_ebpf_network() {
    let env = TestEnv::dual_stack();
    // An eBPF network's container: the uplink gets netd's TC programs.
    env.netd_ok(&["network", "create", "fast", "--subnet", "10.61.0.0/24"]);
    create(&env, "fast", &["--network", "fast", "-p", "8081:80"]);
    let links = env.bpffs.join("links");
    let attached = [
        "uplink_ingress@up0@ingress",
        "uplink_ingress@up0@ingress-filter",
    ]
    .iter()
    .any(|pin| links.join(pin).exists());
    assert!(attached, "the uplink has netd's ingress program");
    dual_stack_network(&env, "n6", &[]);
    let web = create(&env, "web", &["--network", "n6", "-p", "8080:80"]);
    let server = echo_server(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80));
    let outside = env.outside_ns();
    assert_echoed(&env, &outside, sock(HOST_ADDR6, 8080));
    server.join().unwrap();
    let server = echo_server(&env, &outside, sock(OUTSIDE_ADDR6, 9000));
    assert_echoed(&env, &web.ns, sock(OUTSIDE_ADDR6, 9000));
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(HOST_ADDR6));
}

#[test]
fn an_unspecified_host_address_publishes_on_its_family_only() {
    let env = TestEnv::dual_stack();
    dual_stack_network(&env, "n6", &[]);
    let web = create(
        &env,
        "web",
        &[
            "--network",
            "n6",
            "-p",
            "0.0.0.0:8080:80",
            "-p",
            "[::]:8081:80",
        ],
    );
    // The same port again on all addresses clashes with either.
    let err = env.netd_err(&["publish", &web.name, "-p", "8080:81"]);
    assert!(err.contains("8080/tcp is already published"), "{err}");
    let server = echo_servers(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80), 2);
    let outside = env.outside_ns();
    assert_echoed(&env, &outside, sock(HOST_ADDR, 8080));
    assert_echoed(&env, &outside, sock(HOST_ADDR6, 8081));
    server.join().unwrap();
    for wrong in [sock(HOST_ADDR6, 8080), sock(HOST_ADDR, 8081)] {
        assert_eq!(
            connect_error(&env, &outside, wrong),
            ErrorKind::ConnectionRefused
        );
    }
    // On the eBPF datapath too, 0.0.0.0 is every IPv4 address.
    env.netd_ok(&["network", "create", "fast", "--subnet", "10.61.0.0/24"]);
    let fast = create(
        &env,
        "fast",
        &["--network", "fast", "-p", "0.0.0.0:8082:80"],
    );
    let server = echo_server(&env, &fast.ns, sock(std::net::Ipv4Addr::UNSPECIFIED, 80));
    assert_echoed(&env, &outside, sock(HOST_ADDR, 8082));
    server.join().unwrap();
}

/// Routes `prefix` from the outside namespace to the sandbox host (a routed network's).
fn route_from_outside(env: &TestEnv, prefix: &str) {
    let via = HOST_ADDR6.to_string();
    output_in(
        env,
        &env.outside_ns(),
        "ip",
        &["route", "add", prefix, "via", &via],
    );
}

/// Container `c`'s MAC, as `container inspect` shows it, and as bytes.
fn mac_of(env: &TestEnv, c: &Ctr) -> (String, [u8; 6]) {
    let text = env.netd_json(&["container", "inspect", &c.name])["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(hex, 16).unwrap();
    }
    (text, mac)
}

#[test]
fn a_routed_dual_stack_network_on_the_ebpf_datapath_carries_ipv6_under_its_rules() {
    let env = TestEnv::dual_stack();
    dual_stack_network_on(
        &env,
        "ebpf",
        "r6",
        &[
            "--subnet",
            "10.62.0.0/24",
            "--subnet",
            "2001:db8:62::/64",
            "--masquerade=false",
        ],
    );
    route_from_outside(&env, "2001:db8:62::/64");
    let web = create(&env, "web", &["--network", "r6"]);
    let client = create(&env, "client", &["--network", "r6"]);
    let (web6, client6) = (ip6(&env, &web), ip6(&env, &client));
    let web4: IpAddr = env.netd_json(&["container", "inspect", &web.name])["ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let outside = env.outside_ns();

    // Between containers over both families, straight into the namespace; from the host;
    // routed in from the outside unchanged.
    let fast = stat(&env, "fast_path_local");
    let server = echo_servers(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80), 4);
    assert_echoed(&env, &client.ns, sock(web6, 80));
    assert_echoed(&env, &client.ns, sock(web4, 80));
    assert_echoed(&env, &env.host_ns(), sock(web6, 80));
    assert_echoed(&env, &outside, sock(web6, 80));
    let peers: Vec<IpAddr> = server
        .join()
        .unwrap()
        .iter()
        .map(|p| p.ip().to_canonical())
        .collect();
    let client4: IpAddr = env.netd_json(&["container", "inspect", &client.name])["ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(peers[..2], [IpAddr::from(client6), client4]);
    assert_eq!(peers[3], IpAddr::from(OUTSIDE_ADDR6), "not translated");
    assert!(
        stat(&env, "fast_path_local") > fast,
        "IPv6 between containers takes the fast path"
    );
    assert!(
        pings(&env, &client.ns, web6),
        "ICMPv6 echo between containers"
    );
    assert!(pings(&env, &web.ns, OUTSIDE_ADDR6), "ICMPv6 echo out");

    // Out, routed unchanged.
    let server = echo_server(&env, &outside, sock(OUTSIDE_ADDR6, 9000));
    assert_echoed(&env, &web.ns, sock(OUTSIDE_ADDR6, 9000));
    assert_eq!(server.join().unwrap().ip(), IpAddr::from(web6));

    // No IPv6 port is published on this datapath yet: refused, nothing half-made.
    let err = env.netd_err(&[
        "container",
        "create",
        "pub",
        "--network",
        "r6",
        "-p",
        "8080:80",
    ]);
    assert!(
        err.contains("publishes over IPv4 only") && !err.trim().contains('\n'),
        "{err}"
    );
    let listing = env.netd_json(&["container", "ls", "--json"]);
    assert_eq!(listing.as_array().unwrap().len(), 2, "{listing}");

    for c in [&client, &web] {
        env.netd_ok(&["container", "rm", &c.name]);
    }
    env.netd_ok(&["network", "rm", "r6"]);
}

#[test]
fn a_container_cannot_spoof_ipv6_neighbours_routers_or_sources_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    dual_stack_network_on(
        &env,
        "ebpf",
        "r6",
        &["--subnet", "2001:db8:63::/64", "--masquerade=false"],
    );
    let victim = create(&env, "victim", &["--network", "r6"]);
    let attacker = create(&env, "attacker", &["--network", "r6"]);
    let (victim6, attacker6) = (ip6(&env, &victim), ip6(&env, &attacker));
    let (victim_mac, _) = mac_of(&env, &victim);
    let (_, attacker_mac) = mac_of(&env, &attacker);
    // The host learns where the victim is.
    assert!(pings(&env, &env.host_ns(), victim6));
    let neighbour = || {
        output_in(
            &env,
            &env.host_ns(),
            "ip",
            &["-6", "neigh", "show", &victim6.to_string()],
        )
    };
    assert!(neighbour().contains(&victim_mac), "{}", neighbour());

    // The attacker claims the victim's address (overriding), advertises itself as a router
    // with a prefix to autoconfigure, and sends from the victim's address.
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let attacker_ll = frames6::link_local(attacker_mac);
    let to_all = |src, l4: Vec<u8>| {
        with_macs(
            frames6::frame(src, all_nodes, &[], frames6::ICMPV6, &l4),
            frames6::multicast_mac(all_nodes),
            attacker_mac,
        )
    };
    let claim = to_all(
        attacker6,
        frames6::neighbour_advert(attacker6, all_nodes, victim6, attacker_mac),
    );
    let rogue_prefix: Ipv6Addr = "2001:db8:bad::".parse().unwrap();
    let rogue_router = to_all(
        attacker_ll,
        frames6::router_advert(attacker_ll, all_nodes, attacker_mac, rogue_prefix),
    );
    let from_victim = with_macs(
        frames6::frame(
            victim6,
            OUTSIDE_ADDR6,
            &[],
            frames6::UDP,
            &frames6::udp(victim6, 5000, OUTSIDE_ADDR6, 53, b"spoofed"),
        ),
        frames6::multicast_mac(all_nodes),
        attacker_mac,
    );
    let (nd, addr) = (stat(&env, "spoofed_nd"), stat(&env, "spoofed_addr"));
    env.in_ns(&attacker.ns, || {
        for frame in [&claim, &rogue_router, &from_victim] {
            send_raw("eth0", frame);
        }
    });
    assert_eq!(stat(&env, "spoofed_nd"), nd + 2, "the advertisements");
    assert_eq!(stat(&env, "spoofed_addr"), addr + 1, "the spoofed source");

    // None of it took: the host still sends the victim's packets to the victim, which has no
    // address or route from the rogue router.
    assert!(neighbour().contains(&victim_mac), "{}", neighbour());
    assert!(pings(&env, &env.host_ns(), victim6));
    let addrs = output_in(&env, &victim.ns, "ip", &["-6", "addr"]);
    assert!(!addrs.contains("2001:db8:bad"), "{addrs}");
    let routes = output_in(&env, &victim.ns, "ip", &["-6", "route"]);
    assert!(!routes.contains(&attacker_ll.to_string()), "{routes}");
}
