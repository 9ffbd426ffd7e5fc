//! Podman 4.3 (Debian's, CNI backend) runs containers on a netd network through netd-cni:
//! the reference portmap plugin's checks (the port via the host address, via 127.0.0.1,
//! hairpin from the container itself, and a UDP port taken over by a second container).

use std::net::{Ipv4Addr, SocketAddr};

use serde_json::{Value, json};
use tests::{
    engines::{
        PODMAN_IMAGE, Podman, host_tcp_ask, tcp_ask, tcp_name_server, udp_ask, udp_name_server,
    },
    harness::{HOST_ADDR, TestEnv},
};

fn podman_with_netd_network(env: &TestEnv) -> Podman {
    Podman::start(env, &[&conflist(env, "netdnet", "10.88.7.0/24")])
}

fn conflist(env: &TestEnv, name: &str, subnet: &str) -> Value {
    json!({
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [{
            "type": "netd-cni",
            "subnet": subnet,
            "stateDir": env.state_dir,
            "bpffs": env.bpffs,
            "hostNetns": env.host_ns(),
            "hostCgroup": env.cgroup,
            "capabilities": { "portMappings": true, "ips": true },
        }],
    })
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
    // Hairpin: the container reaches its own published port through the host's address,
    // from its namespace and from a process of its own.
    assert_eq!(tcp_ask(&env, &web, via(HOST_ADDR)).unwrap(), "web");
    let own = podman.podman(&[
        "exec",
        "web",
        "nc",
        "-w",
        "2",
        &HOST_ADDR.to_string(),
        "8080",
    ]);
    assert_eq!(own, "web");
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

/// A container on two netd networks: podman adds eth0 and eth1, one netd endpoint each;
/// disconnecting one network removes only its endpoint.
#[test]
fn a_container_on_two_netd_networks() {
    let env = TestEnv::new();
    let podman = Podman::start(
        &env,
        &[
            &conflist(&env, "netdnet", "10.88.7.0/24"),
            &conflist(&env, "netdtwo", "10.88.8.0/24"),
        ],
    );
    podman.podman(&[
        "run",
        "-d",
        "--name",
        "multi",
        "--network",
        "netdnet,netdtwo",
        PODMAN_IMAGE,
        "sleep",
        "1d",
    ]);
    let ns = podman.netns_of("multi");
    let address_of = |ifname: &str| -> Option<Ipv4Addr> {
        let out = env.run_in(&ns, "ip", &["-4", "-br", "addr", "show", ifname]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(2)?
            .split('/')
            .next()?
            .parse()
            .ok()
    };
    // Podman names the interfaces in no fixed order of the networks.
    let mut by_ifname = [
        ("eth0", address_of("eth0").unwrap()),
        ("eth1", address_of("eth1").unwrap()),
    ];
    by_ifname.sort_by_key(|(_, ip)| *ip);
    let [(_, on_one), (on_two_if, on_two)] = by_ifname;
    assert!(on_one.octets()[..3] == [10, 88, 7] && on_two.octets()[..3] == [10, 88, 8]);
    let listed = env.netd_json(&["container", "ls", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    tcp_name_server(&env, &ns, 80, "multi");
    let host = env.host_ns();
    for ip in [on_one, on_two] {
        let answer = tcp_ask(&env, &host, SocketAddr::from((ip, 80)));
        assert_eq!(answer.unwrap(), "multi", "via {ip}");
    }

    podman.podman(&["network", "disconnect", "netdtwo", "multi"]);
    assert_eq!(address_of(on_two_if), None, "{on_two_if} is still there");
    assert!(tcp_ask(&env, &host, SocketAddr::from((on_two, 80))).is_err());
    let answer = tcp_ask(&env, &host, SocketAddr::from((on_one, 80)));
    assert_eq!(answer.unwrap(), "multi");
    let left = env.netd_json(&["container", "ls", "--json"]);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["ip"], on_one.to_string());

    podman.podman(&["rm", "-f", "-t", "0", "multi"]);
    assert_eq!(env.netd_json(&["container", "ls", "--json"]), json!([]));
}
