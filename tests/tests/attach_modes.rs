//! The host-wide programs (uplink ingress and egress, bridge ingress) attach with TCX where
//! the kernel has it and as clsact filters where it doesn't; `NETD_ATTACH=tcx|clsact`
//! overrides the probe. Each mode is checked end to end through the CLI: where the programs
//! sit, that traffic is translated, that a reload replaces them in place, and that removing
//! the last network takes them away.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Output,
    time::Duration,
};

use aya::programs::links::{FdLink, LinkType, PinnedLink};
use netd::{bpf::ATTACH_ENV, netns};
use tests::harness::{HOST_ADDR, OUTSIDE_ADDR, TestEnv, UPLINK};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Runs netd with `NETD_ATTACH` set to `mode` (unset for `None`).
fn netd_in_mode(env: &TestEnv, mode: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = env.netd_cmd(args);
    match mode {
        Some(mode) => cmd.env(ATTACH_ENV, mode),
        None => cmd.env_remove(ATTACH_ENV),
    };
    cmd.output().expect("run netd")
}

fn netd_ok_in_mode(env: &TestEnv, mode: Option<&str>, args: &[&str]) -> String {
    let out = netd_in_mode(env, mode, args);
    assert!(
        out.status.success(),
        "netd {args:?} ({mode:?}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `tc filter show dev IFACE DIR` in the sandbox host.
fn tc_filters(env: &TestEnv, iface: &str, dir: &str) -> String {
    let out = env.run_in(&env.host_ns(), "tc", &["filter", "show", "dev", iface, dir]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the pin at `path` is a TCX link.
fn is_tcx_link(path: &Path) -> bool {
    let link = FdLink::from(PinnedLink::from_pin(path).unwrap());
    link.info().unwrap().link_type().unwrap() == LinkType::Tcx
}

/// The hooks the host-wide programs sit on: interface, direction and program.
fn hooks(bridge: &str) -> [(&str, &'static str, &'static str); 3] {
    [
        (UPLINK, "ingress", "uplink_ingress"),
        (UPLINK, "egress", "uplink_egress"),
        (bridge, "ingress", "bridge_ingress"),
    ]
}

/// How many of netd's filters run `prog` on `iface` in `dir` (tc truncates names to 15
/// characters).
fn filters_of(env: &TestEnv, iface: &str, dir: &str, prog: &str) -> usize {
    tc_filters(env, iface, dir)
        .lines()
        .filter(|line| line.contains(&prog[..prog.len().min(15)]))
        .count()
}

/// Checks that each host-wide program is attached once, the way `expect` says.
fn assert_attached(env: &TestEnv, bridge: &str, expect: &str) {
    let links = env.bpffs.join("links");
    for (iface, dir, prog) in hooks(bridge) {
        let filters = filters_of(env, iface, dir, prog);
        let link = links.join(format!("{prog}@{iface}@{dir}"));
        let filter_pin = links.join(format!("{prog}@{iface}@{dir}-filter"));
        if expect == "clsact" {
            assert_eq!(filters, 1, "{prog} on {iface} {dir} as a filter");
            assert!(filter_pin.exists() && !link.exists(), "{prog} pins");
        } else {
            assert_eq!(filters, 0, "{prog} on {iface} {dir}: no filter in TCX mode");
            assert!(is_tcx_link(&link) && !filter_pin.exists(), "{prog} pins");
        }
    }
}

/// One TCP exchange from `from` to `to`; returns the peer the server saw.
fn exchange(env: &TestEnv, server_ns: &Path, port: u16, from: &Path, to: SocketAddr) -> SocketAddr {
    let listener = env.in_ns(server_ns, || TcpListener::bind(("0.0.0.0", port)).unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
        peer
    });
    env.in_ns(from, || {
        let mut conn = TcpStream::connect_timeout(&to, TIMEOUT).unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        conn.write_all(b"netd").unwrap();
        let mut back = [0u8; 4];
        conn.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"netd");
    });
    server.join().unwrap()
}

/// Masquerade and a published port work (the uplink programs translate both ways).
fn assert_translates(env: &TestEnv, container: &Path) {
    let peer = exchange(
        env,
        &env.outside_ns(),
        7000,
        container,
        (OUTSIDE_ADDR, 7000).into(),
    );
    assert_eq!(peer.ip(), HOST_ADDR, "masqueraded to the uplink address");
    let peer = exchange(
        env,
        container,
        80,
        &env.outside_ns(),
        (HOST_ADDR, 8080).into(),
    );
    assert_eq!(peer.ip(), OUTSIDE_ADDR, "DNAT keeps the client address");
}

/// The whole life of a network in `mode`, checking that the programs sit where `expect`
/// ("tcx" or "clsact") says.
fn network_lifecycle(mode: Option<&str>, expect: &str) {
    let env = TestEnv::new();
    let c = env.name("web");
    netd_ok_in_mode(
        &env,
        mode,
        &["network", "create", "n", "--subnet", "10.93.0.0/24"],
    );
    netd_ok_in_mode(
        &env,
        mode,
        &["container", "create", &c, "--network", "n", "-p", "8080:80"],
    );
    let bridge = env.netd_json(&["network", "inspect", "n"])["network"]["bridge"]
        .as_str()
        .unwrap()
        .to_string();
    assert_attached(&env, &bridge, expect);
    let container = netns::path_of(&c);
    assert_translates(&env, &container);
    // An upgrade replaces every program where it is, and traffic goes on: uplink ingress and
    // egress, bridge ingress, the container veth's ingress and egress, and the host's eight
    // cgroup socket programs.
    let out = netd_ok_in_mode(&env, mode, &["reload"]);
    assert!(out.contains("13 programs replaced"), "{out}");
    assert_attached(&env, &bridge, expect);
    assert_translates(&env, &container);
    // The last network takes the host-wide programs with it.
    netd_ok_in_mode(&env, mode, &["container", "rm", &c]);
    netd_ok_in_mode(&env, mode, &["network", "rm", "n"]);
    for (iface, dir, prog) in hooks(&bridge) {
        assert_eq!(
            filters_of(&env, iface, dir, prog),
            0,
            "{prog} left on {iface}"
        );
    }
    assert_eq!(
        std::fs::read_dir(env.bpffs.join("links")).unwrap().count(),
        0
    );
}

#[test]
fn tcx_mode_attaches_links_translates_reloads_and_detaches() {
    network_lifecycle(Some("tcx"), "tcx");
}

#[test]
fn clsact_mode_attaches_filters_translates_reloads_and_detaches() {
    network_lifecycle(Some("clsact"), "clsact");
}

/// Without the override the probe decides: TCX on Linux 6.6 and later, clsact before.
#[test]
fn the_probe_picks_tcx_where_the_kernel_has_it() {
    let release = nix::sys::utsname::uname().unwrap();
    let release = release.release().to_string_lossy().into_owned();
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap(), parts.next().unwrap());
    network_lifecycle(None, if version >= (6, 6) { "tcx" } else { "clsact" });
}

#[test]
fn a_bad_override_is_a_one_line_error_and_attaches_nothing() {
    let env = TestEnv::new();
    let out = netd_in_mode(
        &env,
        Some("tc"),
        &["network", "create", "n", "--subnet", "10.94.0.0/24"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("NETD_ATTACH"), "{stderr}");
    assert_eq!(filters_of(&env, UPLINK, "ingress", "uplink_ingress"), 0);
    assert!(
        !env.bpffs.join("links").exists()
            || std::fs::read_dir(env.bpffs.join("links")).unwrap().count() == 0
    );
    assert_eq!(
        env.netd_json(&["network", "ls", "--json"]),
        serde_json::json!([])
    );
}
