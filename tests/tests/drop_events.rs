//! Every drop reason real traffic can cause, as `netd monitor --json --count N` reports it:
//! one datagram that must be dropped, exactly one event naming its reason and 5-tuple, the
//! receiver got nothing, and (the control) the same receiver gets the datagram that is allowed.
//!
//! Containers are made in namespaces with IPv6 off from the start (`--netns`), so no router
//! solicitation or neighbour discovery adds events of its own. The reasons no traffic from
//! the CLI can cause (`port_exhausted`, `conntrack_full`, `rewrite_failed`: a full table or a
//! failing helper) are left to the datapath's unit tests.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
};

use tests::{
    cli::{Ctr, TIMEOUT, drop_events, output_in, stat},
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv},
    traffic::retry_interrupted,
};

const PORT: u16 = 9999;

/// `netd container create` into a namespace made here with IPv6 off, so the container sends
/// nothing of its own.
fn create_quiet(env: &TestEnv, base: &str, args: &[&str]) -> Ctr {
    let name = env.name(base);
    let ns = netd::netns::create(&name).unwrap();
    for key in ["all", "default"] {
        netd::netlink::set_sysctl(Some(&ns), &format!("net.ipv6.conf.{key}.disable_ipv6"), "1")
            .unwrap();
    }
    let path = ns.to_str().unwrap().to_string();
    env.netd_ok(&[&["container", "create", &name, "--netns", &path][..], args].concat());
    let ip = env.netd_json(&["container", "inspect", &name])["ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    Ctr { name, ns, ip }
}

/// A UDP socket bound to `addr` in `ns`, reading with a time-out.
fn receiver(env: &TestEnv, ns: &Path, addr: SocketAddr) -> UdpSocket {
    let sock = env.in_ns(ns, || UdpSocket::bind(addr).unwrap());
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    sock
}

/// One datagram from `ns` (from `src` when given) to `dst`.
fn send(env: &TestEnv, ns: &Path, src: Option<Ipv4Addr>, dst: SocketAddr, what: &[u8]) {
    env.in_ns(ns, || {
        let sock = UdpSocket::bind((src.unwrap_or(Ipv4Addr::UNSPECIFIED), 0)).unwrap();
        sock.send_to(what, dst).unwrap();
    });
}

/// What `sock` received next: its payload, or `None` when nothing came.
fn received(sock: &UdpSocket) -> Option<String> {
    let mut buf = [0u8; 64];
    match retry_interrupted(|| sock.recv_from(&mut buf)) {
        Ok((n, _)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
    }
}

/// Runs `send_it`, which must cause exactly one drop for `reason`: one event, counted once,
/// and nothing at `rx`. Returns the event.
fn dropped_once(
    env: &TestEnv,
    reason: &str,
    rx: &UdpSocket,
    send_it: impl FnOnce(),
) -> serde_json::Value {
    let counted = stat(env, reason);
    let event = drop_events(env, 1, send_it).remove(0);
    assert_eq!(event["reason"], reason, "{event}");
    assert_eq!(received(rx), None, "{reason}: the datagram got through");
    assert_eq!(stat(env, reason), counted + 1, "{reason} counted once");
    event
}

/// [`dropped_once`], for a UDP datagram from `saddr` to `daddr:PORT` that the event names.
fn datagram_dropped_once(
    env: &TestEnv,
    reason: &str,
    (saddr, daddr): (Ipv4Addr, Ipv4Addr),
    rx: &UdpSocket,
    send_it: impl FnOnce(),
) {
    let e = dropped_once(env, reason, rx, send_it);
    assert_eq!(
        (&e["proto"], &e["saddr"], &e["daddr"], &e["dport"]),
        (
            &"udp".into(),
            &saddr.to_string().into(),
            &daddr.to_string().into(),
            &PORT.into()
        ),
        "{e}"
    );
}

/// A permanent neighbour entry in `ns` for `peer`, so a datagram to it needs no ARP first.
fn know_neighbour(env: &TestEnv, ns: &Path, peer: &Ctr) {
    let mac = env.netd_json(&["container", "inspect", &peer.name])["mac"]
        .as_str()
        .unwrap()
        .to_string();
    output_in(
        env,
        ns,
        "ip",
        &[
            "neigh",
            "replace",
            &peer.ip.to_string(),
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
    );
}

fn to(ip: Ipv4Addr) -> SocketAddr {
    (ip, PORT).into()
}

#[test]
fn icc_denied_between_containers_of_a_network_without_icc() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "network",
        "create",
        "quiet",
        "--subnet",
        "10.71.0.0/24",
        "--icc=false",
    ]);
    let (a, b) = (
        create_quiet(&env, "a", &["--network", "quiet"]),
        create_quiet(&env, "b", &["--network", "quiet"]),
    );
    know_neighbour(&env, &a.ns, &b);
    let rx = receiver(&env, &b.ns, to(Ipv4Addr::UNSPECIFIED));
    datagram_dropped_once(&env, "icc_denied", (a.ip, b.ip), &rx, || {
        send(&env, &a.ns, None, to(b.ip), b"denied")
    });
    // The control: the host (the gateway) reaches b.
    send(&env, &env.host_ns(), None, to(b.ip), b"from the host");
    assert_eq!(received(&rx).as_deref(), Some("from the host"));
}

#[test]
fn other_network_between_containers_of_two_networks() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "blue", "--subnet", "10.72.0.0/24"]);
    env.netd_ok(&["network", "create", "red", "--subnet", "10.73.0.0/24"]);
    let b = create_quiet(&env, "b", &["--network", "blue"]);
    let r = create_quiet(&env, "r", &["--network", "red"]);
    let rx = receiver(&env, &r.ns, to(Ipv4Addr::UNSPECIFIED));
    // Resolve the gateway first (the control's path), so the drop is one datagram.
    send(&env, &b.ns, None, (OUTSIDE_ADDR, PORT).into(), b"resolve");
    datagram_dropped_once(&env, "other_network", (b.ip, r.ip), &rx, || {
        send(&env, &b.ns, None, to(r.ip), b"denied")
    });
    send(&env, &env.host_ns(), None, to(r.ip), b"from the host");
    assert_eq!(received(&rx).as_deref(), Some("from the host"));
}

#[test]
fn internal_for_a_container_of_an_internal_network_leaving_it() {
    let env = TestEnv::new();
    env.netd_ok(&[
        "network",
        "create",
        "inner",
        "--subnet",
        "10.74.0.0/24",
        "--internal",
    ]);
    let c = create_quiet(&env, "c", &["--network", "inner"]);
    let rx = receiver(&env, &env.outside_ns(), to(OUTSIDE_ADDR));
    let gateway: Ipv4Addr = env.netd_json(&["network", "inspect", "inner"])["network"]["gateway"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // The gateway is in reach (and resolved by this).
    let at_gateway = receiver(&env, &env.host_ns(), to(gateway));
    send(&env, &c.ns, None, to(gateway), b"to the gateway");
    assert_eq!(received(&at_gateway).as_deref(), Some("to the gateway"));
    datagram_dropped_once(&env, "internal", (c.ip, OUTSIDE_ADDR), &rx, || {
        send(&env, &c.ns, None, to(OUTSIDE_ADDR), b"denied")
    });
    send(
        &env,
        &env.host_ns(),
        None,
        to(OUTSIDE_ADDR),
        b"from the host",
    );
    assert_eq!(received(&rx).as_deref(), Some("from the host"));
}

/// Container `a` with a second address (`spoofed`) it doesn't own, sending from it to `b`.
#[test]
fn spoofed_addr_for_a_source_address_not_the_containers_own() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.75.0.0/24"]);
    let (a, b) = (
        create_quiet(&env, "a", &["--network", "n"]),
        create_quiet(&env, "b", &["--network", "n"]),
    );
    know_neighbour(&env, &a.ns, &b);
    let spoofed = Ipv4Addr::new(10, 75, 0, 200);
    output_in(
        &env,
        &a.ns,
        "ip",
        &["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"],
    );
    let rx = receiver(&env, &b.ns, to(Ipv4Addr::UNSPECIFIED));
    datagram_dropped_once(&env, "spoofed_addr", (spoofed, b.ip), &rx, || {
        send(&env, &a.ns, Some(spoofed), to(b.ip), b"denied")
    });
    send(&env, &a.ns, Some(a.ip), to(b.ip), b"from its own address");
    assert_eq!(received(&rx).as_deref(), Some("from its own address"));
}

/// A container's MAC, as netd gave it.
fn mac_of(env: &TestEnv, c: &Ctr) -> [u8; 6] {
    let text = env.netd_json(&["container", "inspect", &c.name])["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// One frame from `a` to `b`'s UDP PORT, written by hand with source MAC `src_mac` (changing
/// eth0's MAC would make the kernel send frames of its own).
fn frame_from(env: &TestEnv, a: &Ctr, b: &Ctr, src_mac: [u8; 6]) {
    use tests::frames::{send_raw, udp_frame, with_macs};
    let frame = with_macs(
        udp_frame(a.ip, 4000, b.ip, PORT, true),
        mac_of(env, b),
        src_mac,
    );
    env.in_ns(&a.ns, || send_raw("eth0", &frame));
}

#[test]
fn spoofed_mac_for_a_source_mac_not_the_containers_own() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.76.0.0/24"]);
    let (a, b) = (
        create_quiet(&env, "a", &["--network", "n"]),
        create_quiet(&env, "b", &["--network", "n"]),
    );
    let rx = receiver(&env, &b.ns, to(Ipv4Addr::UNSPECIFIED));
    let event = dropped_once(&env, "spoofed_mac", &rx, || {
        frame_from(&env, &a, &b, SPOOFED_MAC)
    });
    assert_eq!(
        event["ifindex"],
        host_veth_index(&env, &a),
        "the sender's veth: {event}"
    );
    frame_from(&env, &a, &b, mac_of(&env, &a));
    assert_eq!(received(&rx).as_deref(), Some("netd udp!"));
}

/// A spoofed-MAC drop of an IPv4 datagram names its 5-tuple, though the MAC check comes
/// before the IPv4 header's.
#[test]
fn spoofed_mac_events_name_the_datagrams_five_tuple() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.70.0.0/24"]);
    let (a, b) = (
        create_quiet(&env, "a", &["--network", "n"]),
        create_quiet(&env, "b", &["--network", "n"]),
    );
    let rx = receiver(&env, &b.ns, to(Ipv4Addr::UNSPECIFIED));
    datagram_dropped_once(&env, "spoofed_mac", (a.ip, b.ip), &rx, || {
        frame_from(&env, &a, &b, SPOOFED_MAC)
    });
}

const SPOOFED_MAC: [u8; 6] = [0x02, 0x42, 0xde, 0xad, 0xbe, 0xef];

/// The interface index of `c`'s host-side veth.
fn host_veth_index(env: &TestEnv, c: &Ctr) -> u64 {
    let veth = env.netd_json(&["container", "inspect", &c.name])["host_veth"]
        .as_str()
        .unwrap()
        .to_string();
    let link = output_in(env, &env.host_ns(), "ip", &["-j", "link", "show", &veth]);
    serde_json::from_str::<serde_json::Value>(&link).unwrap()[0]["ifindex"]
        .as_u64()
        .unwrap()
}

#[test]
fn publish_denied_for_a_source_outside_the_allowed_range() {
    let env = TestEnv::new();
    let allowed = Ipv4Addr::new(198, 18, 0, 100);
    output_in(
        &env,
        &env.outside_ns(),
        "ip",
        &["addr", "add", &format!("{allowed}/24"), "dev", "out0"],
    );
    env.netd_ok(&["network", "create", "n", "--subnet", "10.77.0.0/24"]);
    let c = create_quiet(
        &env,
        "c",
        &[
            "--network",
            "n",
            "-p",
            &format!("{PORT}:{PORT}/udp"),
            "--publish-allow",
            &format!("{allowed}/32"),
        ],
    );
    let rx = receiver(&env, &c.ns, to(Ipv4Addr::UNSPECIFIED));
    datagram_dropped_once(
        &env,
        "publish_denied",
        (OUTSIDE_ADDR, HOST_ADDR),
        &rx,
        || {
            send(
                &env,
                &env.outside_ns(),
                Some(OUTSIDE_ADDR),
                to(HOST_ADDR),
                b"denied",
            )
        },
    );
    send(
        &env,
        &env.outside_ns(),
        Some(allowed),
        to(HOST_ADDR),
        b"allowed",
    );
    assert_eq!(received(&rx).as_deref(), Some("allowed"));
}

#[test]
fn unsolicited_for_a_new_flow_routed_straight_to_a_container() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "n", "--subnet", "10.78.0.0/24"]);
    let c = create_quiet(
        &env,
        "c",
        &["--network", "n", "-p", &format!("{PORT}:{PORT}/udp")],
    );
    output_in(
        &env,
        &env.outside_ns(),
        "ip",
        &[
            "route",
            "add",
            "10.78.0.0/24",
            "via",
            &HOST_ADDR.to_string(),
        ],
    );
    let rx = receiver(&env, &c.ns, to(Ipv4Addr::UNSPECIFIED));
    // The control first (it resolves the host's MAC): through the published port.
    send(&env, &env.outside_ns(), None, to(HOST_ADDR), b"published");
    assert_eq!(received(&rx).as_deref(), Some("published"));
    datagram_dropped_once(&env, "unsolicited", (OUTSIDE_ADDR, c.ip), &rx, || {
        send(&env, &env.outside_ns(), None, to(c.ip), b"denied")
    });
}
