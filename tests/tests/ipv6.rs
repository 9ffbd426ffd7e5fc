//! Dual-stack networks with real IPv6 packets: the sandbox's uplink carries IPv6 (2001:2::/64)
//! and the outside namespace is reached only through it. The iptables datapath does all of
//! it; the eBPF datapath enforces the isolation rules for IPv6, masquerades a network's
//! outbound IPv6 to the uplink's address (NAT66: TCP, UDP, ICMPv6 echo and the errors about
//! them) and publishes IPv6 ports to what arrives from outside, to containers through a
//! host address (hairpin) and to the host's own processes (on its addresses and `[::1]`).

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use netd_common::datapath::{PUBLISH_ALLOW_MAP, PUBLISHED_MAP};
use netd_testkit::sandbox::OUTSIDE_LINK;
use nix::errno::Errno;
use tests::{
    cli::{
        Ctr, TIMEOUT, assert_echoed, assert_spoofed_refused, connect_error, create, echo_server,
        echo_servers, flows, map_entries, output_in, pings, stat,
    },
    frames::{ETH_LEN, send_raw, with_macs},
    frames6,
    harness::{
        HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR, OUTSIDE_ADDR6, TestEnv, UPLINK, reset,
        try_bound_connect,
    },
    rawsock::{self, Tap, marker},
    topology::{TestCgroup, connect_from_cgroup, second_nic, udp_from_cgroup},
    traffic::{retry_interrupted, snmp_counter},
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

    // Out over both families, masqueraded (NAT66 for IPv6).
    reaches_out_over_both_families(&env, &web);

    // Gone without a trace in either family.
    env.netd_ok(&["container", "rm", &client.name]);
    env.netd_ok(&["container", "rm", &web.name]);
    env.netd_ok(&["network", "rm", "n6"]);
    assert_no_rules_left(&env);
}

#[test]
fn hairpin_containers_reach_ports_published_on_the_hosts_ipv6_address() {
    hairpin_through_the_hosts_ipv6_address("iptables");
}

#[test]
fn hairpin_containers_reach_ports_published_on_the_hosts_ipv6_address_on_the_ebpf_datapath() {
    hairpin_through_the_hosts_ipv6_address("ebpf");
}

/// The IPv6 twin of `datapath.rs`'s hairpin test, on `datapath`: containers of a dual-stack
/// network reach a port published on the host's IPv6 address (another container, and the
/// published container itself) and on its network's IPv6 gateway. The container reaching its
/// own port comes from the gateway on both (Docker's hairpin MASQUERADE); another container
/// too on the eBPF datapath, which SNATs every hairpin flow so the target's replies come back
/// through the bridge's program, while Docker's rules leave its address (the bridge's
/// netfilter translates the replies back).
fn hairpin_through_the_hosts_ipv6_address(datapath: &str) {
    let env = TestEnv::dual_stack();
    dual_stack_network_on(
        &env,
        datapath,
        "n6",
        &["--subnet", "10.61.0.0/24", "--subnet", "fd00:61::/64"],
    );
    let web = create(&env, "web", &["--network", "n6", "-p", "8080:80"]);
    let client = create(&env, "client", &["--network", "n6"]);
    let gateway: Ipv6Addr = "fd00:61::1".parse().unwrap();
    let server = echo_servers(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80), 3);
    for (c, host) in [
        (&client, HOST_ADDR6),
        (&web, HOST_ADDR6),
        (&client, gateway),
    ] {
        assert_echoed(&env, &c.ns, sock(host, 8080));
    }
    let other = if datapath == "ebpf" {
        gateway
    } else {
        ip6(&env, &client)
    };
    let seen = [other, gateway, other].map(IpAddr::from);
    assert_eq!(peer_ips(server), seen, "{datapath}");
    if datapath == "ebpf" {
        assert_eq!(stat(&env, "hairpin_new"), 3);
        assert_eq!(stat(&env, "no_endpoint"), 0);
    }

    env.netd_ok(&["container", "rm", &client.name]);
    env.netd_ok(&["container", "rm", &web.name]);
    env.netd_ok(&["network", "rm", "n6"]);
    assert_no_rules_left(&env);
}

/// The addresses of the peers an echo server saw, in order; IPv4 ones as such (an IPv6
/// socket sees them v4-mapped).
fn peer_ips(server: std::thread::JoinHandle<Vec<SocketAddr>>) -> Vec<IpAddr> {
    let peers = server.join().unwrap();
    peers.iter().map(|p| p.ip().to_canonical()).collect()
}

/// A UDP socket bound to `addr` in `ns`, whose reads give up after [`TIMEOUT`].
fn udp_in(env: &TestEnv, ns: &Path, addr: SocketAddr) -> UdpSocket {
    let socket = env.in_ns(ns, || UdpSocket::bind(addr).unwrap());
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket
}

/// Sends "question" from `client` to `server` and the answer back to whom it came from, each
/// of which must arrive; the peer `server` saw.
fn udp_round_trip(client: &UdpSocket, server: &UdpSocket) -> SocketAddr {
    udp_round_trip_via(client, server, server.local_addr().unwrap())
}

/// [`udp_round_trip`] through `to` (a published port of `server`'s): the answer must come
/// back from `to`.
fn udp_round_trip_via(client: &UdpSocket, server: &UdpSocket, to: SocketAddr) -> SocketAddr {
    let mut buf = [0u8; 64];
    client.send_to(b"question", to).unwrap();
    let (n, peer) = retry_interrupted(|| server.recv_from(&mut buf)).expect("the question arrives");
    assert_eq!(&buf[..n], b"question");
    server.send_to(b"answer", peer).unwrap();
    let (n, from) =
        retry_interrupted(|| client.recv_from(&mut buf)).expect("the answer comes back");
    assert_eq!(
        (&buf[..n], from.ip(), from.port()),
        (&b"answer"[..], to.ip(), to.port())
    );
    peer
}

/// Container `c` reaches the outside over both families, masqueraded to the host's address of
/// each: over IPv6 (NAT66) with ICMPv6 echo, TCP and UDP, and over IPv4 with TCP to the same
/// dual-stack server, as the outside sees.
fn reaches_out_over_both_families(env: &TestEnv, c: &Ctr) {
    assert!(
        pings(env, &c.ns, OUTSIDE_ADDR6),
        "ping the outside over IPv6"
    );
    let outside = env.outside_ns();
    let server = echo_servers(env, &outside, sock(Ipv6Addr::UNSPECIFIED, 9000), 2);
    assert_echoed(env, &c.ns, sock(OUTSIDE_ADDR6, 9000));
    assert_echoed(env, &c.ns, sock(OUTSIDE_ADDR, 9000));
    let peers = peer_ips(server);
    assert_eq!(peers, [IpAddr::from(HOST_ADDR6), IpAddr::from(HOST_ADDR)]);
    let client = udp_in(env, &c.ns, sock(Ipv6Addr::UNSPECIFIED, 0));
    let server = udp_in(env, &outside, sock(OUTSIDE_ADDR6, 9001));
    assert_eq!(
        udp_round_trip(&client, &server).ip(),
        IpAddr::from(HOST_ADDR6)
    );
}

/// A container of the masquerading (the default) dual-stack network `n6`, its IPv6 subnet
/// `subnet6`, on the eBPF datapath.
fn masqueraded_on_ebpf(env: &TestEnv, subnet6: &str) -> Ctr {
    dual_stack_network_on(env, "ebpf", "n6", &["--subnet", subnet6]);
    create(env, "c", &["--network", "n6"])
}

/// Container `web` on the eBPF datapath's dual-stack network `n6` (`subnet` and `subnet6`),
/// publishing `ports` (each a `-p` value).
fn web_on_ebpf(env: &TestEnv, subnet: &str, subnet6: &str, ports: &[&str]) -> Ctr {
    dual_stack_network_on(
        env,
        "ebpf",
        "n6",
        &["--subnet", subnet, "--subnet", subnet6],
    );
    let mut args = vec!["--network", "n6"];
    for port in ports {
        args.extend(["-p", port]);
    }
    create(env, "web", &args)
}

/// The IPv6 twin of the isolation matrix's `reconnect_after_unpublish` (NAT66 flows are in the
/// same conntrack): a client reconnecting from the port of a connection it reset reaches a
/// published port only while it is published; refused, the host answers and `web` accepts
/// nothing.
#[test]
fn an_ipv6_reconnection_reaches_a_port_only_while_it_is_published_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    let web = web_on_ebpf(&env, "10.68.0.0/24", "fd00:68::/64", &["8080:80"]);
    let _listening = env.in_ns(&web.ns, || {
        TcpListener::bind(sock(Ipv6Addr::UNSPECIFIED, 80)).unwrap()
    });
    let (client, server) = (sock(OUTSIDE_ADDR6, 40123), sock(HOST_ADDR6, 8080));
    let reconnect = || {
        env.in_ns(&env.outside_ns(), || {
            try_bound_connect(client, server).map(reset)
        })
    };
    reconnect().unwrap_or_else(|e| panic!("published, the first connection: {e}"));
    env.netd_ok(&["unpublish", &web.name, "8080:80"]);
    let accepted = || snmp_counter(&web.ns, "Tcp", "PassiveOpens").unwrap();
    let before = accepted();
    assert_eq!(
        reconnect(),
        Err(Errno::ECONNREFUSED),
        "unpublished, the reconnection got through"
    );
    assert_eq!(accepted(), before, "web accepted the reconnection");
    env.netd_ok(&["publish", &web.name, "-p", "8080:80"]);
    reconnect().unwrap_or_else(|e| panic!("published again, the reconnection: {e}"));
}

/// Packets netd's programs dropped so far, whatever the reason.
fn dropped(env: &TestEnv) -> u64 {
    env.netd_json(&["stats", "--json"])["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dropped"] == true)
        .map(|r| r["packets"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_masquerading_dual_stack_network_on_the_ebpf_datapath_reaches_out_through_nat66() {
    let env = TestEnv::dual_stack();
    let c = masqueraded_on_ebpf(&env, "fd00:64::/64");
    let c6 = ip6(&env, &c);
    let routes = output_in(&env, &c.ns, "ip", &["-6", "route"]);
    assert!(
        routes.contains("default via fd00:64::1 dev eth0"),
        "{routes}"
    );

    let new = stat(&env, "snat_new");
    reaches_out_over_both_families(&env, &c);
    // Three IPv6 flows and an IPv4 one, each translated as it began.
    let translated = stat(&env, "snat_new") - new;
    assert!(translated >= 4, "snat_new grew by {translated}");
    // IPv6 takes the fast paths: from the container's veth straight to the uplink, and from
    // the uplink straight into the container's namespace.
    let fast = || (stat(&env, "fast_path_out"), stat(&env, "fast_path_in"));
    let before = fast();
    let client = udp_in(&env, &c.ns, sock(Ipv6Addr::UNSPECIFIED, 0));
    let server = udp_in(&env, &env.outside_ns(), sock(OUTSIDE_ADDR6, 9003));
    udp_round_trip(&client, &server);
    assert_eq!(fast(), (before.0 + 1, before.1 + 1));
    // The IPv6 flows as `netd conntrack ls` lists them: the container's address out, the
    // host's back.
    let flows = flows(&env);
    for proto in ["tcp", "udp", "icmpv6"] {
        let flow = flows
            .iter()
            .find(|f| f["proto"] == proto && f["original"]["src"] == c6.to_string())
            .unwrap_or_else(|| panic!("no {proto} flow of {c6}: {flows:?}"));
        assert_eq!(flow["nat"], "snat", "{flow}");
        assert_eq!(flow["original"]["dst"], OUTSIDE_ADDR6.to_string(), "{flow}");
        assert_eq!(flow["reply"]["dst"], HOST_ADDR6.to_string(), "{flow}");
        assert!(flow["reply"]["packets"].as_u64().unwrap() > 0, "{flow}");
    }

    // Gone without a trace: its flows, and any rule.
    env.netd_ok(&["container", "rm", &c.name]);
    let left = flows_of(&env, c6);
    assert!(left.is_empty(), "{left:?}");
    env.netd_ok(&["network", "rm", "n6"]);
    assert_no_rules_left(&env);
}

/// The flows `conntrack ls` lists with `ip` as either end of either direction.
fn flows_of(env: &TestEnv, ip: Ipv6Addr) -> Vec<serde_json::Value> {
    let ip = ip.to_string();
    flows(env)
        .into_iter()
        .filter(|f| {
            ["original", "reply"]
                .iter()
                .any(|dir| f[dir]["src"] == ip.as_str() || f[dir]["dst"] == ip.as_str())
        })
        .collect()
}

#[test]
fn nothing_from_outside_reaches_a_masquerading_dual_stack_container_unasked_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    let c = masqueraded_on_ebpf(&env, "fd00:65::/64");
    let c6 = ip6(&env, &c);
    // The outside knows the way in: only netd stands between it and the container.
    route_from_outside(&env, "fd00:65::/64");
    let outside = env.outside_ns();
    let listener = env.in_ns(&c.ns, || {
        TcpListener::bind(sock(Ipv6Addr::UNSPECIFIED, 80)).unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    let inbox = udp_in(&env, &c.ns, sock(Ipv6Addr::UNSPECIFIED, 5300));
    let knocker = udp_in(&env, &outside, sock(OUTSIDE_ADDR6, 0));

    // New flows straight to the container's address: a SYN (and its retransmission), a
    // datagram, an echo request.
    let unsolicited = stat(&env, "unsolicited");
    assert_eq!(
        connect_error(&env, &outside, sock(c6, 80)),
        ErrorKind::TimedOut
    );
    knocker.send_to(b"knock", sock(c6, 5300)).unwrap();
    assert!(!pings(&env, &outside, c6), "echo from outside answered");
    let accepted = listener.accept().map(|(_, peer)| peer);
    assert_eq!(
        accepted.unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "a connection from outside"
    );
    let got = retry_interrupted(|| inbox.recv_from(&mut [0u8; 64]));
    assert!(got.is_err(), "a datagram from outside: {got:?}");
    let counted = stat(&env, "unsolicited") - unsolicited;
    assert!(counted >= 3, "unsolicited grew by {counted}");

    // An ICMPv6 error about a flow the container never had: port unreachable about a datagram
    // "from" it, sent to its address.
    let mark = marker();
    let quoted = frames6::frame(
        c6,
        OUTSIDE_ADDR6,
        &[],
        frames6::UDP,
        &frames6::udp(c6, 40000, OUTSIDE_ADDR6, 9999, &mark),
    );
    let body = [&[0u8; 4][..], &quoted[ETH_LEN..]].concat();
    let error = frames6::icmpv6(OUTSIDE_ADDR6, c6, DEST_UNREACH6, PORT_UNREACH6, &body);
    let frame = with_macs(
        frames6::frame(OUTSIDE_ADDR6, c6, &[], frames6::ICMPV6, &error),
        rawsock::mac_of(&env, &env.host_ns(), UPLINK),
        rawsock::mac_of(&env, &outside, OUTSIDE_LINK),
    );
    let tap = Tap::open(&env, &c.ns, "eth0");
    let drops = dropped(&env);
    rawsock::send_frames(&env, &outside, OUTSIDE_LINK, &[frame]);
    assert_eq!(tap.count(&mark), 0, "the error reached the container");
    assert!(dropped(&env) > drops, "netd didn't drop the error");

    // The control: what the container opens itself is answered, through the same uplink.
    assert_eq!(
        udp_round_trip(&inbox, &knocker).ip(),
        IpAddr::from(HOST_ADDR6)
    );
}

/// A port published on `[::1]` is for the host's own processes alone, and `::` is the key a
/// port published on every address is kept under: neither destination reaches a container,
/// from outside (at the uplink's MAC) or from a container (at its gateway's MAC). The stack
/// drops both as martians; no DNAT may take them first.
#[test]
fn loopback_and_unspecified_ipv6_destinations_reach_no_published_port_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    let web = web_on_ebpf(
        &env,
        "10.67.0.0/24",
        "fd00:67::/64",
        &["[::1]:5301:53/udp", "5300:53/udp"],
    );
    let peer = create(&env, "peer", &["--network", "n6"]);
    let peer6 = ip6(&env, &peer);
    let bridge = env.netd_json(&["network", "inspect", "n6"])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    let outside = env.outside_ns();
    let from_outside = (
        rawsock::mac_of(&env, &env.host_ns(), UPLINK),
        rawsock::mac_of(&env, &outside, OUTSIDE_LINK),
    );
    let from_peer = (
        rawsock::mac_of(&env, &env.host_ns(), &bridge),
        mac_of(&env, &peer).1,
    );
    let tap = Tap::open(&env, &web.ns, "eth0");
    // Each from a port of its own: a reply tuple an attack took must not be what refuses a
    // control.
    let sport = std::cell::Cell::new(40000);
    let datagram = |src: Ipv6Addr, dst: Ipv6Addr, port: u16, (to, from): ([u8; 6], [u8; 6])| {
        let mark = marker();
        sport.set(sport.get() + 1);
        let udp = frames6::udp_frame_carrying(src, sport.get(), dst, port, &mark);
        let frame = with_macs(udp, to, from);
        (mark, frame)
    };
    let attacks = [
        (OUTSIDE_ADDR6, Ipv6Addr::LOCALHOST, 5301, from_outside),
        (OUTSIDE_ADDR6, Ipv6Addr::UNSPECIFIED, 5300, from_outside),
        (peer6, Ipv6Addr::LOCALHOST, 5301, from_peer),
        (peer6, Ipv6Addr::UNSPECIFIED, 5300, from_peer),
    ];
    let mut sent = Vec::new();
    for (src, dst, port, macs) in attacks {
        let (mark, frame) = datagram(src, dst, port, macs);
        let (ns, link) = if src == peer6 {
            (&peer.ns, "eth0")
        } else {
            (&outside, OUTSIDE_LINK)
        };
        rawsock::send_frames(&env, ns, link, &[frame]);
        sent.push((dst, src, mark));
    }
    // The controls: the port published on every address, through the host's address.
    for (src, macs, ns, link) in [
        (OUTSIDE_ADDR6, from_outside, &outside, OUTSIDE_LINK),
        (peer6, from_peer, &peer.ns, "eth0"),
    ] {
        let (mark, frame) = datagram(src, HOST_ADDR6, 5300, macs);
        rawsock::send_frames(&env, ns, link, &[frame]);
        assert!(tap.arrived(&mark), "the control from {src} didn't arrive");
    }
    for (dst, src, mark) in sent {
        assert_eq!(
            tap.count(&mark),
            0,
            "from {src} to [{dst}] reached the container"
        );
    }
}

/// From a neighbour on a second NIC that netd has no programs on (made after the network,
/// with no `netd reload`), an IPv6 datagram to the outside with a container's source:
/// masqueraded, it would start a flow in the container's name whose answers reach it. The
/// uplink drops it (`martian`: it came into the host elsewhere than through the container's
/// veth or bridge); the neighbour's datagram from its own address goes out.
#[test]
fn a_containers_ipv6_source_from_an_unprogrammed_nic_never_leaves_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    let c = masqueraded_on_ebpf(&env, "fd00:68::/64");
    let c6 = ip6(&env, &c);
    let lan = second_nic(&env);
    for (ns, link) in [(env.host_ns(), "nic1"), (lan.clone(), "lan0")] {
        let key = format!("net.ipv6.conf.{link}.disable_ipv6");
        netd::netlink::set_sysctl(Some(&ns), &key, "0").unwrap();
    }
    let (nic1, lan0): (Ipv6Addr, Ipv6Addr) =
        ("fd01:19::2".parse().unwrap(), "fd01:19::1".parse().unwrap());
    output_in(
        &env,
        &env.host_ns(),
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{nic1}/64"),
            "dev",
            "nic1",
            "nodad",
        ],
    );
    output_in(
        &env,
        &lan,
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{lan0}/64"),
            "dev",
            "lan0",
            "nodad",
        ],
    );
    let macs = (
        rawsock::mac_of(&env, &env.host_ns(), "nic1"),
        rawsock::mac_of(&env, &lan, "lan0"),
    );
    let tap = Tap::open(&env, &env.outside_ns(), OUTSIDE_LINK);
    assert_spoofed_refused(&env, &tap, c6, lan0, |src, mark| {
        let frame = frames6::udp_frame_carrying(src, 4000, OUTSIDE_ADDR6, 5000, mark);
        rawsock::send_frames(&env, &lan, "lan0", &[with_macs(frame, macs.0, macs.1)]);
    });
}

/// ICMPv6 Destination Unreachable, code port unreachable.
const DEST_UNREACH6: u8 = 1;
const PORT_UNREACH6: u8 = 4;

/// Sends a datagram larger than the links' MTU (its source's stack fragments it) from `from`
/// to `to`, which must get it whole from `seen_from`; answers it the same way, which `from`
/// must get whole from `to`.
fn fragmented_round_trip(from: &UdpSocket, to: &UdpSocket, via: SocketAddr, seen_from: IpAddr) {
    let big: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut buf = [0u8; 4096];
    from.send_to(&big, via).unwrap();
    let (n, peer) =
        retry_interrupted(|| to.recv_from(&mut buf)).expect("the fragmented datagram arrives");
    assert_eq!((&buf[..n], peer.ip()), (&big[..], seen_from));
    to.send_to(&big, peer).unwrap();
    let (n, back) =
        retry_interrupted(|| from.recv_from(&mut buf)).expect("the fragmented answer comes back");
    assert_eq!((&buf[..n], back), (&big[..], via));
}

#[test]
fn ipv6_fragments_go_through_nat66_both_ways_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    let c = masqueraded_on_ebpf(&env, "fd00:66::/64");
    let outside = env.outside_ns();
    // Out and back: masqueraded as the host, each fragment as its first one was.
    let server = udp_in(&env, &outside, sock(OUTSIDE_ADDR6, 9002));
    let client = udp_in(&env, &c.ns, sock(Ipv6Addr::UNSPECIFIED, 0));
    let out = server.local_addr().unwrap();
    fragmented_round_trip(&client, &server, out, IpAddr::from(HOST_ADDR6));
    // In to a published port and back: DNATed to the container, which sees the client.
    let srv = create(&env, "srv", &["--network", "n6", "-p", "9053:53/udp"]);
    let dns = udp_in(&env, &srv.ns, sock(Ipv6Addr::UNSPECIFIED, 53));
    let asker = udp_in(&env, &outside, sock(OUTSIDE_ADDR6, 0));
    let published = sock(HOST_ADDR6, 9053);
    fragmented_round_trip(&asker, &dns, published, IpAddr::from(OUTSIDE_ADDR6));
    // Each flow counted every fragment (three each way at the links' 1500 bytes).
    let flows = env.netd_ok(&["conntrack", "ls"]);
    for flow in ["dport=9002", "dport=9053"] {
        let line = flows.lines().find(|l| l.contains(flow)).unwrap_or(&flows);
        assert!(line.contains("packets=3 "), "{flow}: {flows}");
    }
}

#[test]
fn a_port_published_on_one_ipv6_address_answers_there_only() {
    published_on_one_ipv6_address("iptables");
}

#[test]
fn a_port_published_on_one_ipv6_address_answers_there_only_on_the_ebpf_datapath() {
    published_on_one_ipv6_address("ebpf");
}

/// Another address of the host's uplink, besides [`HOST_ADDR6`].
const HOST_ADDR6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 3);

/// A port published on [`HOST_ADDR6`] on `datapath` answers from outside there, and neither
/// on the host's IPv4 address nor on its other IPv6 one.
fn published_on_one_ipv6_address(datapath: &str) {
    let env = TestEnv::dual_stack();
    dual_stack_network_on(&env, datapath, "n6", &[]);
    let web = create(
        &env,
        "web",
        &["--network", "n6", "-p", &format!("[{HOST_ADDR6}]:8080:80")],
    );
    // Added once the network is made: HOST_ADDR6 stays the uplink's NAT66 address.
    add_addr6(&env, &env.host_ns(), UPLINK, HOST_ADDR6_2, &[]);
    let listing = env.netd_ok(&["container", "ls"]);
    assert!(
        listing.contains(&format!("80/tcp -> [{HOST_ADDR6}]:8080")),
        "{listing}"
    );
    let server = echo_server(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80));
    let outside = env.outside_ns();
    assert_echoed(&env, &outside, sock(HOST_ADDR6, 8080));
    assert_eq!(
        server.join().unwrap().ip(),
        IpAddr::from(OUTSIDE_ADDR6),
        "{datapath}: not translated"
    );
    // Nothing listens on the host itself: the host's other addresses to the same port find no
    // DNAT and are refused.
    for other in [IpAddr::from(HOST_ADDR), IpAddr::from(HOST_ADDR6_2)] {
        assert_eq!(
            connect_error(&env, &outside, sock(other, 8080)),
            ErrorKind::ConnectionRefused,
            "{datapath}: {other}"
        );
    }
}

/// Adds `addr`/64 to `link` in `ns`, usable at once (no duplicate address detection), and
/// `extra` arguments of `ip addr add`.
fn add_addr6(env: &TestEnv, ns: &Path, link: &str, addr: Ipv6Addr, extra: &[&str]) {
    let cidr = format!("{addr}/64");
    let args = ["-6", "addr", "add", &cidr, "dev", link, "nodad"];
    output_in(env, ns, "ip", &[&args[..], extra].concat());
}

#[test]
fn nat66_masquerades_to_the_uplinks_preferred_address_not_a_deprecated_one() {
    let env = TestEnv::dual_stack();
    // Listed before HOST_ADDR6 (the kernel lists an interface's newest address first), and
    // deprecated: new flows must not take it.
    add_addr6(
        &env,
        &env.host_ns(),
        UPLINK,
        HOST_ADDR6_2,
        &["preferred_lft", "0"],
    );
    let c = masqueraded_on_ebpf(&env, "fd00:67::/64");
    reaches_out_over_both_families(&env, &c);
}

#[test]
fn a_dual_stack_container_is_reached_from_outside_over_both_families_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    let web = web_on_ebpf(
        &env,
        "10.67.0.0/24",
        "fd00:67::/64",
        &["8080:80", "5353:53/udp"],
    );
    let web6 = ip6(&env, &web);
    // Both families' sides of both ports.
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 4);
    let outside = env.outside_ns();

    // TCP on the host's address of each family, DNATed: the container sees the client's own
    // address (no source NAT on the way in).
    let server = echo_servers(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80), 2);
    assert_echoed(&env, &outside, sock(HOST_ADDR6, 8080));
    assert_echoed(&env, &outside, sock(HOST_ADDR, 8080));
    let peers = peer_ips(server);
    assert_eq!(
        peers,
        [IpAddr::from(OUTSIDE_ADDR6), IpAddr::from(OUTSIDE_ADDR)]
    );
    // The IPv6 flow as `netd conntrack ls` lists it: to the host's address, answered from the
    // container's.
    let flows = flows_of(&env, web6);
    let flow = flows
        .iter()
        .find(|f| f["proto"] == "tcp")
        .unwrap_or_else(|| panic!("no tcp flow of {web6}: {flows:?}"));
    assert_eq!(flow["nat"], "dnat", "{flow}");
    assert_eq!(flow["original"]["src"], OUTSIDE_ADDR6.to_string(), "{flow}");
    assert_eq!(flow["original"]["dst"], HOST_ADDR6.to_string(), "{flow}");
    assert_eq!(flow["original"]["dport"], 8080, "{flow}");
    assert_eq!(flow["reply"]["src"], web6.to_string(), "{flow}");

    // UDP over IPv6: the question arrives from the client's address, the answer comes back
    // from the published port.
    let inbox = udp_in(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 53));
    let client = udp_in(&env, &outside, sock(OUTSIDE_ADDR6, 0));
    let peer = udp_round_trip_via(&client, &inbox, sock(HOST_ADDR6, 5353));
    assert_eq!(peer, client.local_addr().unwrap());

    // Unpublished, both sides go; the port meets the host, where nothing listens.
    env.netd_ok(&["unpublish", &web.name, "8080:80"]);
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 2);
    for host in [IpAddr::from(HOST_ADDR6), IpAddr::from(HOST_ADDR)] {
        assert_eq!(
            connect_error(&env, &outside, sock(host, 8080)),
            ErrorKind::ConnectionRefused,
            "{host}"
        );
    }
    // Published again, it answers again.
    env.netd_ok(&["publish", &web.name, "-p", "8080:80"]);
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 4);
    let server = echo_server(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80));
    assert_echoed(&env, &outside, sock(HOST_ADDR6, 8080));
    server.join().unwrap();

    // Gone without a trace: its ports, its flows.
    env.netd_ok(&["container", "rm", &web.name]);
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 0);
    let left = flows_of(&env, web6);
    assert!(left.is_empty(), "{left:?}");
    env.netd_ok(&["network", "rm", "n6"]);
}

/// A second address of the outside namespace's, beyond the ranges the tests allow but
/// [`ALLOWED6`].
const OUTSIDE_ADDR6_2: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x77);
/// A range holding [`OUTSIDE_ADDR6_2`] and not [`OUTSIDE_ADDR6`].
const ALLOWED6: &str = "2001:2::40/122";

/// Connects from `ns` to `to` from the local address `from`, sends "netd" and returns what
/// came back; a connection not made within [`TIMEOUT`] is `TimedOut`.
fn tcp_echo_from(
    env: &TestEnv,
    ns: &Path,
    from: Ipv6Addr,
    to: SocketAddr,
) -> std::io::Result<String> {
    use nix::{
        errno::Errno,
        sys::{
            socket::{
                AddressFamily, SockFlag, SockType, SockaddrIn6, bind, connect, setsockopt, socket,
                sockopt,
            },
            time::{TimeVal, TimeValLike as _},
        },
    };
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V6(to) = to else {
        panic!("{to} is no IPv6 address")
    };
    env.in_ns(ns, || {
        let fd = socket(
            AddressFamily::Inet6,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // A blocking connect gives up after the send timeout (EINPROGRESS).
        let timeout = TimeVal::milliseconds(TIMEOUT.as_millis().try_into().unwrap());
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
        let local = std::net::SocketAddrV6::new(from, 0, 0, 0);
        bind(fd.as_raw_fd(), &SockaddrIn6::from(local))?;
        match connect(fd.as_raw_fd(), &SockaddrIn6::from(to)) {
            Err(Errno::EINPROGRESS) => return Err(ErrorKind::TimedOut.into()),
            done => done?,
        }
        let mut conn = TcpStream::from(fd);
        conn.set_read_timeout(Some(TIMEOUT))?;
        conn.write_all(b"netd")?;
        let mut buf = [0u8; 16];
        let n = retry_interrupted(|| conn.read(&mut buf))?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

#[test]
fn publish_allow_takes_ipv6_ranges_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    dual_stack_network_on(&env, "ebpf", "n6", &[]);
    let outside = env.outside_ns();
    add_addr6(&env, &outside, OUTSIDE_LINK, OUTSIDE_ADDR6_2, &[]);
    // One IPv6 address, and no IPv4 range: no IPv4 source at all.
    let one = create(
        &env,
        "one",
        &[
            "--network",
            "n6",
            "-p",
            "8080:80",
            "--publish-allow",
            &format!("{OUTSIDE_ADDR6}/128"),
        ],
    );
    // A range of each family.
    let range = create(
        &env,
        "range",
        &[
            "--network",
            "n6",
            "-p",
            "8081:80",
            "--publish-allow",
            ALLOWED6,
            "--publish-allow",
            "198.18.0.0/24",
        ],
    );
    let one_server = echo_server(&env, &one.ns, sock(Ipv6Addr::UNSPECIFIED, 80));
    let range_server = echo_servers(&env, &range.ns, sock(Ipv6Addr::UNSPECIFIED, 80), 2);
    let denied = stat(&env, "publish_denied");

    let echo = |from, port| tcp_echo_from(&env, &outside, from, sock(HOST_ADDR6, port));
    assert_eq!(echo(OUTSIDE_ADDR6, 8080).unwrap(), "netd");
    assert_eq!(
        echo(OUTSIDE_ADDR6_2, 8080).unwrap_err().kind(),
        ErrorKind::TimedOut,
        "outside the range"
    );
    assert_eq!(
        connect_error(&env, &outside, sock(HOST_ADDR, 8080)),
        ErrorKind::TimedOut,
        "IPv4, of which no range is allowed"
    );
    assert_eq!(echo(OUTSIDE_ADDR6_2, 8081).unwrap(), "netd");
    assert_eq!(
        echo(OUTSIDE_ADDR6, 8081).unwrap_err().kind(),
        ErrorKind::TimedOut,
        "outside {ALLOWED6}"
    );
    assert_echoed(&env, &outside, sock(HOST_ADDR, 8081));
    // Each refused connection counted (its SYN and retransmissions).
    let counted = stat(&env, "publish_denied") - denied;
    assert!(counted >= 3, "publish_denied grew by {counted}");
    // What got in came from the client's own address.
    assert_eq!(one_server.join().unwrap().ip(), IpAddr::from(OUTSIDE_ADDR6));
    let peers = peer_ips(range_server);
    assert_eq!(
        peers,
        [IpAddr::from(OUTSIDE_ADDR6_2), IpAddr::from(OUTSIDE_ADDR)]
    );

    // The ranges go with their containers.
    for c in [&one, &range] {
        env.netd_ok(&["container", "rm", &c.name]);
    }
    assert_eq!(map_entries(&env, PUBLISH_ALLOW_MAP), 0);
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 0);
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
    let env = TestEnv::dual_stack();
    for (args, why) in [
        (
            &["network", "create", "n6", "--subnet", "fd00:60::/64"][..],
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
    // A masquerading dual-stack network is made on the eBPF datapath too (NAT66).
    env.netd_ok(&["network", "create", "n6", "--ipv6"]);
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
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 0, "nothing half-made");
    let networks = env.netd_json(&["network", "ls", "--json"]);
    assert_eq!(networks.as_array().unwrap().len(), 2, "{networks}");

    // Each IPv6 side of a port is published there: on every address, on every IPv6 one, on
    // the IPv6 loopback (`netd publish` as create).
    let c = create(
        &env,
        "c",
        &["--network", "n6", "-p", "8080:80", "-p", "[::]:8081:80"],
    );
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 3);
    env.netd_ok(&["publish", &c.name, "-p", "[::1]:8082:80"]);
    let ports = env.netd_ok(&["port", &c.name]);
    assert!(ports.contains("[::1]:8082"), "{ports}");
    assert_eq!(map_entries(&env, PUBLISHED_MAP), 4);
}

#[test]
fn host_processes_reach_ipv6_ports_on_host_addresses_and_loopback_on_the_ebpf_datapath() {
    let env = TestEnv::dual_stack();
    let one_addr = format!("[{HOST_ADDR6}]:8082:80");
    let web = web_on_ebpf(
        &env,
        "10.60.0.0/24",
        "fd00:60::/64",
        &["8080:80", "[::1]:8081:80", &one_addr, "5353:53/udp"],
    );
    let cgroup = TestCgroup::new(&env);
    let host = env.host_ns();
    let server = echo_servers(&env, &web.ns, sock(Ipv6Addr::UNSPECIFIED, 80), 5);
    // Each socket of the host's processes goes straight to the container, and getpeername()
    // shows the address it asked for: IPv6 ports on the host's address and on loopback, and
    // the IPv4 port through an IPv4-mapped address of an IPv6 socket.
    let mapped_loopback: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
    for addr in [
        sock(HOST_ADDR6, 8080),
        sock(Ipv6Addr::LOCALHOST, 8080),
        sock(Ipv6Addr::LOCALHOST, 8081),
        sock(HOST_ADDR6, 8082),
        sock(mapped_loopback, 8080),
    ] {
        assert_eq!(
            connect_from_cgroup(&cgroup, Some(&host), addr),
            format!("hello {}:{}", addr.ip(), addr.port())
        );
    }
    // The host connects from its bridge addresses: no NAT, no proxy.
    let gateway6 = IpAddr::from("fd00:60::1".parse::<Ipv6Addr>().unwrap());
    let gateway4 = IpAddr::from(std::net::Ipv4Addr::new(10, 60, 0, 1));
    assert_eq!(
        peer_ips(server),
        [gateway6, gateway6, gateway6, gateway6, gateway4]
    );

    // UDP without connect(): sent to the container, answered from the address asked for.
    let dns = env.in_ns(&web.ns, || {
        UdpSocket::bind(sock(Ipv6Addr::UNSPECIFIED, 53)).unwrap()
    });
    let answers = std::thread::spawn(move || {
        for _ in 0..2 {
            let mut buf = [0u8; 64];
            let (n, peer) = dns.recv_from(&mut buf).unwrap();
            dns.send_to(&buf[..n], peer).unwrap();
        }
    });
    for ip in [IpAddr::from(HOST_ADDR6), IpAddr::from(Ipv6Addr::LOCALHOST)] {
        let reply = udp_from_cgroup(&cgroup, Some(&host), sock(ip, 5353));
        assert_eq!(reply, format!("query {ip}:5353"));
    }
    answers.join().unwrap();

    // Where nothing is published, the host's own port: a port published on one address is
    // not on loopback, nor is loopback's on the host's address; nothing listens there.
    for addr in [sock(Ipv6Addr::LOCALHOST, 8082), sock(HOST_ADDR6, 8081)] {
        let script = format!(
            "import socket\ntry:\n socket.create_connection(('{}', {}), timeout=5)\n \
             print('connected')\nexcept ConnectionRefusedError:\n print('refused')",
            addr.ip(),
            addr.port()
        );
        let out = cgroup.run(Some(&host), "python3", &["-c", &script]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "refused",
            "{addr}"
        );
    }
    // The same connect() in another namespace of the cgroup is left alone: the outside's own
    // loopback answers.
    let outside = env.outside_ns();
    let own = echo_server(&env, &outside, sock(Ipv6Addr::LOCALHOST, 8080));
    assert_eq!(
        connect_from_cgroup(&cgroup, Some(&outside), sock(Ipv6Addr::LOCALHOST, 8080)),
        "hello ::1:8080"
    );
    own.join().unwrap();

    env.netd_ok(&["container", "rm", &web.name]);
    env.netd_ok(&["network", "rm", "n6"]);
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
    path_mtu_discovery_through_nat66("iptables");
}

#[test]
fn path_mtu_discovery_works_through_nat66_on_the_ebpf_datapath() {
    path_mtu_discovery_through_nat66("ebpf");
}

/// A masquerading network's container on `datapath` sends more than fits the path to the far
/// network at once, and learns the path MTU from the Packet Too Big its datapath translates
/// back.
fn path_mtu_discovery_through_nat66(datapath: &str) {
    let env = TestEnv::dual_stack();
    dual_stack_network_on(&env, datapath, "n6", &[]);
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
    let peers = peer_ips(server);
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
    let (victim_mac, victim_mac_bytes) = mac_of(&env, &victim);
    let (_, attacker_mac) = mac_of(&env, &attacker);
    // The host learns where the victim is, at its global and link-local addresses (the
    // EUI-64 one of its MAC, which netd has the kernel make).
    assert!(pings(&env, &env.host_ns(), victim6));
    let victim_ll = frames6::link_local(victim_mac_bytes);
    let link = output_in(
        &env,
        &victim.ns,
        "ip",
        &["-6", "addr", "show", "scope", "link"],
    );
    assert!(link.contains(&format!("{victim_ll}/64")), "{link}");
    let bridge = env.netd_json(&["network", "inspect", "r6"])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    let victim_ll_on_bridge = format!("{victim_ll}%{bridge}");
    let ping_ll = || {
        env.run_in(
            &env.host_ns(),
            "ping",
            &["-n", "-c", "1", "-W", "1", &victim_ll_on_bridge],
        )
        .status
        .success()
    };
    assert!(
        ping_ll(),
        "the host reaches the victim's link-local address"
    );
    let ll_neighbour = || {
        output_in(
            &env,
            &env.host_ns(),
            "ip",
            &[
                "-6",
                "neigh",
                "show",
                &victim_ll.to_string(),
                "dev",
                &bridge,
            ],
        )
    };
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
    let claim_link_local = to_all(
        attacker_ll,
        frames6::neighbour_advert(attacker_ll, all_nodes, victim_ll, attacker_mac),
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
        for frame in [&claim, &claim_link_local, &rogue_router, &from_victim] {
            send_raw("eth0", frame);
        }
    });
    assert_eq!(stat(&env, "spoofed_nd"), nd + 3, "the advertisements");
    assert_eq!(stat(&env, "spoofed_addr"), addr + 1, "the spoofed source");

    // None of it took: the host still sends the victim's packets to the victim, which has no
    // address or route from the rogue router.
    assert!(neighbour().contains(&victim_mac), "{}", neighbour());
    assert!(pings(&env, &env.host_ns(), victim6));
    assert!(ll_neighbour().contains(&victim_mac), "{}", ll_neighbour());
    assert!(ping_ll());
    let addrs = output_in(&env, &victim.ns, "ip", &["-6", "addr"]);
    assert!(!addrs.contains("2001:db8:bad"), "{addrs}");
    let routes = output_in(&env, &victim.ns, "ip", &["-6", "route"]);
    assert!(!routes.contains(&attacker_ll.to_string()), "{routes}");
}
