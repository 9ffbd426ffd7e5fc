//! What the eBPF datapath translates rather than passes or drops, with real packets: IPv4
//! options (`ping -R`) and fragmented datagrams, both ways through masquerade and a published
//! port; and the same kinds of packets routed straight to a masqueraded or an internal
//! container from outside, dropped with their reasons.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use tests::{
    harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv},
    traffic::retry_interrupted,
};

/// A datagram bigger than the path's MTU (1500): it travels in three fragments.
const BIG: usize = 4000;

struct Container {
    ns: PathBuf,
    ip: Ipv4Addr,
}

fn create(env: &TestEnv, base: &str, args: &[&str]) -> Container {
    let name = env.name(base);
    let mut all = vec!["container", "create", name.as_str()];
    all.extend_from_slice(args);
    env.netd_ok(&all);
    let info = env.netd_json(&["container", "inspect", &name]);
    Container {
        ns: netd::netns::path_of(&name),
        ip: info["ip"].as_str().unwrap().parse().unwrap(),
    }
}

fn stat(env: &TestEnv, reason: &str) -> u64 {
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

/// Whether one echo request from `ns` to `dst` with ping's `args` got its reply (within 2 s:
/// the machine running the tests may be busy).
fn pings(env: &TestEnv, ns: &Path, args: &[&str], dst: Ipv4Addr) -> bool {
    let dst = dst.to_string();
    let mut all = vec!["-c", "1", "-W", "2"];
    all.extend_from_slice(args);
    all.push(&dst);
    env.run_in(ns, "ping", &all).status.success()
}

/// A UDP socket bound to `port` in the namespace `ns` (sockets stay in the namespace they were
/// made in).
fn udp_in(env: &TestEnv, ns: &Path, port: u16) -> UdpSocket {
    env.in_ns(ns, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    })
}

/// Receives one datagram: its bytes and sender.
fn receive(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = retry_interrupted(|| s.recv_from(&mut buf)).expect("a datagram");
    buf.truncate(n);
    (buf, from)
}

fn payload(seed: u8) -> Vec<u8> {
    (0..BIG).map(|i| (i as u8).wrapping_mul(seed)).collect()
}

#[test]
fn options_and_fragments_are_translated_both_ways() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "m", "--subnet", "10.95.0.0/24"]);
    let c = create(&env, "c", &["--network", "m", "-p", "5353:53/udp"]);

    // Masquerade: record route and a fragmented echo request get their replies.
    assert!(pings(&env, &c.ns, &["-R"], OUTSIDE_ADDR), "ping -R");
    assert!(
        pings(&env, &c.ns, &["-s", "3000"], OUTSIDE_ADDR),
        "ping -s 3000"
    );

    // A fragmented datagram to a published port reaches the container whole, from the
    // client; the fragmented answer reaches the client whole, from the published port.
    let server = udp_in(&env, &c.ns, 53);
    let client = udp_in(&env, &env.outside_ns(), 0);
    client
        .send_to(&payload(3), (HOST_ADDR, 5353))
        .expect("send to the published port");
    let (got, from) = receive(&server);
    assert_eq!(
        got,
        payload(3),
        "the datagram, reassembled in the container"
    );
    assert_eq!(from.ip(), OUTSIDE_ADDR);
    server.send_to(&payload(5), from).unwrap();
    let (got, from) = receive(&client);
    assert_eq!(got, payload(5));
    assert_eq!(from, SocketAddr::from((HOST_ADDR, 5353)));

    // And from the container to a server outside, masqueraded.
    let outside = udp_in(&env, &env.outside_ns(), 7000);
    let local = udp_in(&env, &c.ns, 0);
    local.send_to(&payload(7), (OUTSIDE_ADDR, 7000)).unwrap();
    let (got, from) = receive(&outside);
    assert_eq!(got, payload(7));
    assert_eq!(from.ip(), HOST_ADDR, "masqueraded");
    outside.send_to(&payload(9), from).unwrap();
    assert_eq!(receive(&local).0, payload(9));
    assert_eq!(
        stat(&env, "fragment"),
        0,
        "no fragment was left untranslated"
    );
}

#[test]
fn options_and_fragments_routed_straight_to_a_container_are_dropped() {
    let env = TestEnv::new();
    env.netd_ok(&["network", "create", "m", "--subnet", "10.96.0.0/24"]);
    env.netd_ok(&[
        "network",
        "create",
        "i",
        "--subnet",
        "10.97.0.0/24",
        "--internal",
    ]);
    let masqueraded = create(&env, "c", &["--network", "m"]);
    let internal = create(&env, "d", &["--network", "i"]);
    for subnet in ["10.96.0.0/24", "10.97.0.0/24"] {
        let route = env.run_in(
            &env.outside_ns(),
            "ip",
            &["route", "add", subnet, "via", &HOST_ADDR.to_string()],
        );
        assert!(route.status.success(), "{route:?}");
    }
    let outside = env.outside_ns();
    for (c, reason) in [(&masqueraded, "unsolicited"), (&internal, "internal")] {
        for args in [&["-R"][..], &["-s", "3000"]] {
            let (before, fragments) = (stat(&env, reason), stat(&env, "fragment"));
            assert!(
                !pings(&env, &outside, args, c.ip),
                "{reason}: ping {args:?}"
            );
            assert!(stat(&env, reason) > before, "{reason}: ping {args:?}");
            if args[0] == "-s" {
                // The later fragments have no first one that was let in.
                assert!(stat(&env, "fragment") > fragments, "{reason}");
            }
        }
    }
    // Control: the containers reach the outside (the internal one doesn't).
    assert!(pings(&env, &masqueraded.ns, &["-R"], OUTSIDE_ADDR));
    assert!(!pings(&env, &internal.ns, &[], OUTSIDE_ADDR));
}
