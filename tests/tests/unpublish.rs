//! `netd unpublish`: a published port stops taking new connections (refused, as by a host
//! with nothing listening), its established connections carry on (as under Docker, whose
//! conntrack entries stay), and the container's other ports keep working; on both datapaths.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
};

use netd_common::datapath::PUBLISHED_MAP;
use tests::{
    cli::{TIMEOUT, connect_error, create, map_entries},
    harness::{HOST_ADDR, TestEnv},
    traffic::retry_interrupted,
};

/// An echo server on `port` in `ns`: every connection gets back what it sends, until it ends.
fn echo_server(env: &TestEnv, ns: &Path, port: u16) {
    let listener = env.in_ns(ns, || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A connection from `ns` to `addr`, kept open.
fn connect(env: &TestEnv, ns: &Path, addr: SocketAddr) -> TcpStream {
    let conn = env
        .in_ns(ns, || TcpStream::connect_timeout(&addr, TIMEOUT))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    conn
}

/// Sends `word` on `conn` and returns what came back.
fn echo(conn: &mut TcpStream, word: &str) -> String {
    conn.write_all(word.as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    let n = retry_interrupted(|| conn.read(&mut buf)).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// What the datapath has for published ports: PUBLISHED's entries (eBPF) or the DNAT rules of
/// Docker's chain (iptables).
fn datapath_ports(env: &TestEnv, datapath: &str) -> usize {
    match datapath {
        "ebpf" => map_entries(env, PUBLISHED_MAP),
        _ => {
            let out = env.run_in(&env.host_ns(), "iptables", &["-t", "nat", "-S", "NETD"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("-j DNAT"))
                .count()
        }
    }
}

fn unpublish_closes_a_port_to_new_connections_only(datapath: &str) {
    let env = TestEnv::new();
    let netd = |args: &[&str]| env.netd_ok(&[&["--datapath", datapath][..], args].concat());
    netd(&["network", "create", "n", "--subnet", "10.93.0.0/24"]);
    let c = create(
        &env,
        "web",
        &["--network", "n", "-p", "8080:80", "-p", "8081:81"],
    );
    echo_server(&env, &c.ns, 80);
    echo_server(&env, &c.ns, 81);
    let (on_8080, on_8081) = (
        SocketAddr::from((HOST_ADDR, 8080)),
        SocketAddr::from((HOST_ADDR, 8081)),
    );
    let outside = env.outside_ns();
    let mut established = connect(&env, &outside, on_8080);
    assert_eq!(echo(&mut established, "before"), "before");
    let published = datapath_ports(&env, datapath);

    assert_eq!(
        netd(&["unpublish", &c.name, "8080:80"]),
        "80/tcp -> 0.0.0.0:8080\n"
    );
    assert_eq!(netd(&["port", &c.name]), "81/tcp -> 0.0.0.0:8081\n");
    assert!(
        datapath_ports(&env, datapath) < published,
        "the datapath still has every port"
    );
    // A new connection meets the host, where nothing listens; the established one carries on.
    assert_eq!(
        connect_error(&env, &outside, on_8080),
        std::io::ErrorKind::ConnectionRefused
    );
    assert_eq!(echo(&mut established, "after"), "after");
    assert_eq!(
        echo(&mut connect(&env, &outside, on_8081), "other"),
        "other"
    );

    // Bad input: one line, nothing changed.
    let err = env.netd_err(&["unpublish", &c.name, "8080:80"]);
    assert!(
        err.contains(&format!(
            "container {:?} does not publish 8080:80/tcp",
            c.name
        )),
        "{err}"
    );
    let err = env.netd_err(&["unpublish", &c.name, "8081:81", "8082:82"]);
    assert!(err.contains("does not publish 8082:82/tcp"), "{err}");
    let err = env.netd_err(&["unpublish", &c.name, "80/sctp"]);
    assert!(err.contains("unknown protocol"), "{err}");
    let err = env.netd_err(&["unpublish", &env.name("nobody"), "80"]);
    assert!(err.contains("no container named"), "{err}");
    assert_eq!(netd(&["port", &c.name]), "81/tcp -> 0.0.0.0:8081\n");
    assert_eq!(echo(&mut connect(&env, &outside, on_8081), "kept"), "kept");

    // The port is free again: published anew, it takes new connections.
    netd(&["publish", &c.name, "-p", "8080:80"]);
    assert_eq!(datapath_ports(&env, datapath), published);
    assert_eq!(
        echo(&mut connect(&env, &outside, on_8080), "again"),
        "again"
    );
    // Without a host port: every mapping of the container port.
    assert_eq!(
        netd(&["unpublish", &c.name, "81", "80"]),
        "81/tcp -> 0.0.0.0:8081\n80/tcp -> 0.0.0.0:8080\n"
    );
    assert_eq!(netd(&["port", &c.name]), "");
    assert_eq!(
        connect_error(&env, &outside, on_8081),
        std::io::ErrorKind::ConnectionRefused
    );
    drop(established);
    netd(&["container", "rm", &c.name]);
    netd(&["network", "rm", "n"]);
}

#[test]
fn unpublish_closes_a_port_to_new_connections_only_ebpf() {
    unpublish_closes_a_port_to_new_connections_only("ebpf");
}

#[test]
fn unpublish_closes_a_port_to_new_connections_only_iptables() {
    unpublish_closes_a_port_to_new_connections_only("iptables");
}
