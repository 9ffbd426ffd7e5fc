//! `netd link A B` between containers without a network address (`--network none`): each end
//! gets a /32 (given with `--ip A_IP --ip B_IP`, or from the link pool) and a host route to
//! the other, and they reach each other over it.

use std::path::Path;

use netd::netns;
use tests::{cli::output_in, harness::TestEnv};

fn pings(env: &TestEnv, from: &Path, to: &str) -> bool {
    env.run_in(from, "ping", &["-c", "1", "-W", "2", to])
        .status
        .success()
}

fn addresses(env: &TestEnv, name: &str) -> String {
    String::from_utf8(
        env.run_in(&netns::path_of(name), "ip", &["-o", "-4", "addr"])
            .stdout,
    )
    .unwrap()
}

#[test]
fn two_none_containers_link_with_given_addresses() {
    let env = TestEnv::new();
    let (a, b) = (env.name("a"), env.name("b"));
    for c in [&a, &b] {
        env.netd_ok(&["container", "create", c, "--network", "none"]);
    }
    // Positive control first: nothing joins them yet.
    assert!(!pings(&env, &netns::path_of(&a), "10.200.0.2"));
    env.netd_ok(&["link", &a, &b, "--ip", "10.200.0.1", "--ip", "10.200.0.2"]);
    assert!(
        addresses(&env, &a).contains("10.200.0.1/32"),
        "{}",
        addresses(&env, &a)
    );
    assert!(
        addresses(&env, &b).contains("10.200.0.2/32"),
        "{}",
        addresses(&env, &b)
    );
    assert!(pings(&env, &netns::path_of(&a), "10.200.0.2"));
    assert!(pings(&env, &netns::path_of(&b), "10.200.0.1"));
    let err = env.netd_err(&["link", &a, &b]);
    assert!(err.contains("already linked"), "{err}");
    // Another link can't take an end's address.
    let (c, d) = (env.name("c"), env.name("d"));
    for x in [&c, &d] {
        env.netd_ok(&["container", "create", x, "--network", "none"]);
    }
    let err = env.netd_err(&["link", &c, &d, "--ip", "10.200.0.1", "--ip", "10.200.0.9"]);
    assert!(err.contains("another link's end has it"), "{err}");
    for x in [&a, &b, &c, &d] {
        env.netd_ok(&["container", "rm", x]);
    }
}

#[test]
fn two_none_containers_link_with_pool_addresses() {
    let env = TestEnv::new();
    let (a, b) = (env.name("a"), env.name("b"));
    for c in [&a, &b] {
        env.netd_ok(&["container", "create", c, "--network", "none"]);
    }
    let err = env.netd_err(&["link", &a, &b, "--ip", "10.200.0.1"]);
    assert!(err.contains("--ip"), "{err}");
    // Addresses an end can't have: no host's, or taken.
    for (ip, why) in [("224.0.0.1", "unicast"), ("0.0.0.0", "unicast")] {
        let err = env.netd_err(&["link", &a, &b, "--ip", ip, "--ip", "10.200.0.2"]);
        assert!(err.contains(why), "{ip}: {err}");
    }
    env.netd_ok(&["link", &a, &b]);
    let ends = env.netd_json(&["container", "inspect", &a])["peer_links"][0].clone();
    let (mine, peer) = (
        ends["ip"].as_str().unwrap(),
        ends["peer_ip"].as_str().unwrap(),
    );
    assert!(
        mine.starts_with("169.254.") && peer.starts_with("169.254."),
        "{ends}"
    );
    assert!(addresses(&env, &a).contains(&format!("{mine}/32")));
    assert!(pings(&env, &netns::path_of(&a), peer));
    // The pool's addresses are taken until the containers go.
    let (c, d) = (env.name("c"), env.name("d"));
    for x in [&c, &d] {
        env.netd_ok(&["container", "create", x, "--network", "none"]);
    }
    env.netd_ok(&["link", &c, &d]);
    let other = env.netd_json(&["container", "inspect", &c])["peer_links"][0]["ip"].clone();
    assert!(other != mine && other != peer, "{other} reused");
    for x in [&a, &b, &c, &d] {
        env.netd_ok(&["container", "rm", x]);
    }
}

#[test]
fn a_host_mode_container_or_one_sharing_the_namespace_is_not_linked() {
    let env = TestEnv::new();
    let (a, h, s) = (env.name("a"), env.name("h"), env.name("s"));
    env.netd_ok(&["container", "create", &a, "--network", "none"]);
    env.netd_ok(&["container", "create", &h, "--network", "host"]);
    let shared = format!("container:{a}");
    env.netd_ok(&["container", "create", &s, "--network", &shared]);
    let host_links = || output_in(&env, &env.host_ns(), "ip", &["-br", "link"]);
    let before = host_links();
    let err = env.netd_err(&["link", &a, &h]);
    assert!(err.contains("--network host"), "{err}");
    let err = env.netd_err(&["link", &a, &s]);
    assert!(err.contains("share one network namespace"), "{err}");
    assert_eq!(host_links(), before, "a link end was left in the host");
    assert_eq!(
        env.netd_json(&["container", "inspect", &a])["peer_links"],
        serde_json::json!([])
    );
    for c in [&s, &h, &a] {
        env.netd_ok(&["container", "rm", c]);
    }
}
