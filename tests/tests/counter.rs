//! The first end-to-end proof: a netd-ebpf TC program attached with TCX counts real packets per
//! protocol, and keeps counting after the netd that attached it has exited.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use tests::harness::{HOST_ADDR, TestEnv, UPLINK};

fn counts(env: &TestEnv) -> serde_json::Value {
    env.netd_json(&["counter", "show", "--json"])
}

fn packets(counts: &serde_json::Value, proto: &str) -> u64 {
    counts
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["proto"] == proto)
        .unwrap_or_else(|| panic!("no {proto} in {counts}"))["packets"]
        .as_u64()
        .unwrap()
}

/// From the outside namespace: `syns` TCP connection attempts to a closed port (each is
/// exactly one SYN in, answered by a RST out), `datagrams` UDP datagrams and `pings` echo
/// requests to the host's uplink address.
fn send_traffic(env: &TestEnv, syns: u64, datagrams: u64, pings: u64) {
    env.in_ns(&env.outside_ns(), || {
        let closed = SocketAddr::from((HOST_ADDR, 9));
        for _ in 0..syns {
            let refused = TcpStream::connect_timeout(&closed, Duration::from_secs(2));
            assert!(refused.is_err(), "port 9 should be closed");
        }
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..datagrams {
            udp.send_to(b"netd", (HOST_ADDR, 9)).unwrap();
        }
    });
    let ping = env.run_in(
        &env.outside_ns(),
        "ping",
        &["-c", &pings.to_string(), "-i", "0.05", "-W", "2", &HOST_ADDR.to_string()],
    );
    assert!(ping.status.success(), "ping failed: {ping:?}");
}

#[test]
fn counter_counts_real_packets_and_outlives_netd() {
    let env = TestEnv::new();
    env.netd_ok(&["counter", "attach", UPLINK]);
    send_traffic(&env, 3, 7, 5);

    // A second netd process reads the pinned map.
    let first = counts(&env);
    assert_eq!(packets(&first, "tcp"), 3, "{first}");
    assert_eq!(packets(&first, "udp"), 7, "{first}");
    assert_eq!(packets(&first, "icmp"), 5, "{first}");

    // No netd process runs now; the pinned link keeps the program attached.
    send_traffic(&env, 2, 4, 1);
    let second = counts(&env);
    assert_eq!(packets(&second, "tcp"), 5, "{second}");
    assert_eq!(packets(&second, "udp"), 11, "{second}");
    assert_eq!(packets(&second, "icmp"), 6, "{second}");

    // The table form names every protocol.
    let table = env.netd_ok(&["counter", "show"]);
    for proto in ["tcp", "udp", "icmp", "other"] {
        assert!(table.contains(proto), "{table}");
    }

    // Detached: traffic no longer counts.
    env.netd_ok(&["counter", "detach", UPLINK]);
    send_traffic(&env, 1, 1, 1);
    assert_eq!(counts(&env), second);
}

#[test]
fn counter_rejects_double_attach_and_unknown_interface() {
    let env = TestEnv::new();
    env.netd_ok(&["counter", "attach", UPLINK]);
    let err = env.netd_err(&["counter", "attach", UPLINK]);
    assert!(err.contains("already attached"), "{err}");
    let err = env.netd_err(&["counter", "attach", "nosuch0"]);
    assert!(err.contains("nosuch0"), "{err}");
    let err = env.netd_err(&["counter", "detach", "nosuch0"]);
    assert!(err.contains("nosuch0"), "{err}");
}
