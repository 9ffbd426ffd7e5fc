//! Podman 4.3 (Debian's, CNI backend) runs containers on a netd network through netd-cni:
//! the reference portmap plugin's checks (the port via the host address, via 127.0.0.1,
//! hairpin from the container itself, and a UDP port taken over by a second container).

use std::net::{Ipv4Addr, SocketAddr};

use serde_json::json;
use tests::{
    engines::{
        PODMAN_IMAGE, Podman, host_tcp_ask, tcp_ask, tcp_name_server, udp_ask, udp_name_server,
    },
    harness::{HOST_ADDR, TestEnv},
};

fn podman_with_netd_network(env: &TestEnv) -> Podman {
    let conflist = json!({
        "cniVersion": "0.4.0",
        "name": "netdnet",
        "plugins": [{
            "type": "netd-cni",
            "subnet": "10.88.7.0/24",
            "stateDir": env.state_dir,
            "bpffs": env.bpffs,
            "hostNetns": env.host_ns(),
            "hostCgroup": env.cgroup,
            "capabilities": { "portMappings": true, "ips": true },
        }],
    });
    Podman::start(env, &[&conflist])
}

#[test]
fn podman_publishes_a_port_through_netd() {
    let env = TestEnv::new();
    let podman = podman_with_netd_network(&env);
    podman.podman(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "netdnet",
        "-p",
        "8080:80",
        PODMAN_IMAGE,
        "sleep",
        "1d",
    ]);
    let web = podman.netns_of("web");
    tcp_name_server(&env, &web, 80, "web");
    let via = |ip: Ipv4Addr| SocketAddr::from((ip, 8080));
    assert_eq!(
        tcp_ask(&env, &env.outside_ns(), via(HOST_ADDR)).unwrap(),
        "web"
    );
    assert_eq!(host_tcp_ask(&env, via(HOST_ADDR)), "web");
    assert_eq!(host_tcp_ask(&env, via(Ipv4Addr::LOCALHOST)), "web");
    // Hairpin: the container reaches its own published port through the host's address.
    assert_eq!(tcp_ask(&env, &web, via(HOST_ADDR)).unwrap(), "web");
    // The negative control: a port nobody published.
    assert!(tcp_ask(&env, &env.outside_ns(), SocketAddr::from((HOST_ADDR, 8081))).is_err());

    podman.podman(&["rm", "-f", "-t", "0", "web"]);
    assert!(tcp_ask(&env, &env.outside_ns(), via(HOST_ADDR)).is_err());
    let left = env.netd_json(&["container", "ls", "--json"]);
    assert_eq!(left, json!([]), "podman rm left netd containers");
}

#[test]
fn a_udp_port_is_taken_over_by_the_next_container() {
    let env = TestEnv::new();
    let podman = podman_with_netd_network(&env);
    let dns = SocketAddr::from((HOST_ADDR, 5353));
    podman.podman(&[
        "run",
        "-d",
        "--name",
        "u1",
        "--network",
        "netdnet",
        "-p",
        "5353:53/udp",
        PODMAN_IMAGE,
        "sleep",
        "1d",
    ]);
    udp_name_server(&env, &podman.netns_of("u1"), 53, "u1");
    assert_eq!(
        udp_ask(&env, &env.outside_ns(), 40001, dns).as_deref(),
        Some("u1")
    );
    podman.podman(&["rm", "-f", "-t", "0", "u1"]);

    // Another address than u1's: only a translation made afresh reaches it.
    podman.podman(&[
        "run",
        "-d",
        "--name",
        "u2",
        "--network",
        "netdnet",
        "--ip",
        "10.88.7.77",
        "-p",
        "5353:53/udp",
        PODMAN_IMAGE,
        "sleep",
        "1d",
    ]);
    let u2 = podman.netns_of("u2");
    let addr = env.run_in(&u2, "ip", &["-4", "-br", "addr", "show", "eth0"]);
    assert!(String::from_utf8_lossy(&addr.stdout).contains("10.88.7.77/24"));
    udp_name_server(&env, &u2, 53, "u2");
    assert_eq!(
        udp_ask(&env, &env.outside_ns(), 40001, dns).as_deref(),
        Some("u2")
    );
    podman.podman(&["rm", "-f", "-t", "0", "u2"]);
}
