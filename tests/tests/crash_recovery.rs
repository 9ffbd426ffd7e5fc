//! Crash recovery: netd is killed (SIGKILL, by the `fault-injection` step hook) at every step
//! of `network create/rm`, `container create/rm`, `publish`, `unpublish` and `link`. Afterwards nothing is
//! left that shouldn't be (namespaces, interfaces, pins, tc filters, map entries, iptables
//! rules, userland proxies and their records, state) and everything still works, whether the clean-up is `netd gc`'s or the
//! implicit one of the next command.
//!
//! The steps are not listed here: each scenario first runs its command with
//! `NETD_FAULT_LIST=1`, which prints every step it passes, so a new step is covered as soon as
//! it exists.

use std::{collections::BTreeMap, os::unix::process::ExitStatusExt as _};

use netd_common::datapath::{
    ENDPOINTS_MAP, LINKS_MAP, NETWORKS_MAP, NETWORKS6_MAP, PUBLISH_ALLOW_MAP, PUBLISHED_MAP,
    SUBNETS_MAP, SUBNETS6_MAP, VETHS_MAP,
};
use tests::harness::{TestEnv, host_links, namespaces, netd_state, proxies};

/// Everything netd may make, in a form two runs can compare.
#[derive(Debug, PartialEq, Eq)]
struct Leftovers {
    namespaces: Vec<String>,
    host_links: Vec<String>,
    state: String,
    maps: BTreeMap<&'static str, Vec<String>>,
    pins: Vec<String>,
    tc_filters: String,
    iptables: String,
    /// The iptables datapath's userland proxies running, and their records.
    proxies: Vec<String>,
    proxy_records: Vec<String>,
}

fn text(out: std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn leftovers(env: &TestEnv) -> Leftovers {
    let namespaces = namespaces(env);
    let host_links = host_links(env);
    let state = netd_state(env);
    let maps = [
        NETWORKS_MAP,
        NETWORKS6_MAP,
        SUBNETS_MAP,
        SUBNETS6_MAP,
        ENDPOINTS_MAP,
        PUBLISHED_MAP,
        VETHS_MAP,
        LINKS_MAP,
        PUBLISH_ALLOW_MAP,
    ]
    .into_iter()
    .map(|m| (m, map_entries(env, m)))
    .collect();
    // Attachments only: a loaded program stays pinned under progs/ for the next user.
    let mut pins: Vec<String> = std::fs::read_dir(env.bpffs.join("links"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    pins.sort();
    let tc_filters = host_links
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('@').next().unwrap())
        .flat_map(|l| {
            ["ingress", "egress"].map(|dir| {
                let out = env.run_in(&env.host_ns(), "tc", &["filter", "show", "dev", l, dir]);
                format!("{l} {dir}: {}", text(out))
            })
        })
        .collect();
    let iptables = ["iptables", "ip6tables"]
        .into_iter()
        .flat_map(|tool| ["filter", "nat"].map(|t| (tool, t)))
        .map(|(tool, t)| text(env.run_in(&env.host_ns(), tool, &["-t", t, "-S"])))
        .collect::<Vec<_>>()
        .concat();
    let mut proxy_records: Vec<String> = std::fs::read_dir(env.state_dir.join("proxies"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    proxy_records.sort();
    Leftovers {
        namespaces,
        host_links,
        state,
        maps,
        pins,
        tc_filters,
        iptables,
        proxies: proxies(env),
        proxy_records,
    }
}

/// [`leftovers`] once they are `expected`, or as they are after a few seconds: the kernel
/// deletes a removed container's veth pair with its namespace, after the command returns.
fn leftovers_settled(env: &TestEnv, expected: &Leftovers) -> Leftovers {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let now = leftovers(env);
        if now == *expected || std::time::Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The entries of pinned map `name`, sorted (absent: no entries).
fn map_entries(env: &TestEnv, name: &str) -> Vec<String> {
    let pin = env.bpffs.join("maps").join(name);
    if !pin.exists() {
        return vec![];
    }
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool map dump {name}: {out:?}");
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
    entries.sort();
    entries
}

/// A command to kill at each of its steps, and how to get around it.
struct Scenario {
    /// Run before the "nothing left" snapshot.
    base: Vec<Vec<String>>,
    /// Run after the snapshot, before the command (what a removal removes).
    before: Vec<Vec<String>>,
    command: Vec<String>,
    /// Must succeed after the crash (its first command's implicit clean-up, or after `gc`).
    redo: Vec<Vec<String>>,
    /// Brings the state back to the snapshot's.
    after: Vec<Vec<String>>,
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn run_all(env: &TestEnv, commands: &[Vec<String>]) {
    for c in commands {
        let c: Vec<&str> = c.iter().map(String::as_str).collect();
        env.netd_ok(&c);
    }
}

#[derive(Clone, Copy, Debug)]
enum Recovery {
    Gc,
    NextCommand,
}

/// `commands`, each creating on `datapath`.
fn on_datapath(datapath: &str, commands: &[Vec<String>]) -> Vec<Vec<String>> {
    commands
        .iter()
        .map(|c| [vec!["--datapath".into(), datapath.into()], c.clone()].concat())
        .collect()
}

/// The steps `scenario`'s command passes.
fn steps(datapath: &str, scenario: &dyn Fn(&TestEnv) -> Scenario) -> Vec<String> {
    let env = TestEnv::new();
    let s = scenario(&env);
    run_all(&env, &on_datapath(datapath, &s.base));
    run_all(&env, &on_datapath(datapath, &s.before));
    let cmd: Vec<&str> = s.command.iter().map(String::as_str).collect();
    let out = env
        .netd_cmd(&[&["--datapath", datapath][..], &cmd].concat())
        .env("NETD_FAULT_LIST", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let steps: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("netd-step "))
        .map(String::from)
        .collect();
    assert!(
        !steps.is_empty(),
        "no steps: is netd built with fault-injection?"
    );
    steps
}

fn kill_at_every_step(datapath: &str, scenario: impl Fn(&TestEnv) -> Scenario) {
    for step in steps(datapath, &scenario) {
        for recovery in [Recovery::Gc, Recovery::NextCommand] {
            let env = TestEnv::new();
            let with_dp = |c: &[Vec<String>]| on_datapath(datapath, c);
            let s = scenario(&env);
            run_all(&env, &with_dp(&s.base));
            let clean = leftovers(&env);
            run_all(&env, &with_dp(&s.before));
            let cmd: Vec<&str> = s.command.iter().map(String::as_str).collect();
            let status = env
                .netd_cmd(&[&["--datapath", datapath][..], &cmd].concat())
                .env("NETD_FAULT_KILL_AT", &step)
                .status()
                .unwrap();
            assert_eq!(status.signal(), Some(9), "{cmd:?} not killed at {step}");
            if let Recovery::Gc = recovery {
                env.netd_ok(&["gc"]);
            }
            run_all(&env, &with_dp(&s.redo));
            run_all(&env, &with_dp(&s.after));
            assert_eq!(
                leftovers_settled(&env, &clean),
                clean,
                "{cmd:?} killed at {step}, then {recovery:?}: something was left"
            );
        }
    }
}

fn network_create(_: &TestEnv) -> Scenario {
    Scenario {
        base: vec![],
        before: vec![],
        command: args("network create n --subnet 10.77.0.0/24"),
        redo: vec![args("network create n --subnet 10.77.0.0/24")],
        after: vec![args("network rm n")],
    }
}

const DUAL_STACK: &str =
    "network create n --ipv6 --subnet 10.77.0.0/24 --subnet fd00:77::/64 --icc=false";
/// The eBPF datapath's: routed (it translates no IPv6 yet).
const DUAL_STACK_ROUTED: &str = "network create n --ipv6 --subnet 10.77.0.0/24 --subnet fd00:77::/64 --icc=false --masquerade=false";

/// A dual-stack network (iptables datapath: rules in both families).
fn network_create_dual_stack(_: &TestEnv) -> Scenario {
    network_create_as(DUAL_STACK)
}

/// A routed dual-stack network (eBPF datapath: `NETWORKS6`).
fn network_create_dual_stack_routed(_: &TestEnv) -> Scenario {
    network_create_as(DUAL_STACK_ROUTED)
}

fn network_create_as(create: &str) -> Scenario {
    Scenario {
        base: vec![],
        before: vec![],
        command: args(create),
        redo: vec![args(create)],
        after: vec![args("network rm n")],
    }
}

/// A dual-stack container with a link and published ports.
fn container_create_dual_stack(env: &TestEnv) -> Scenario {
    let (db, c) = (env.name("db"), env.name("c"));
    let create = format!(
        "container create {c} --network n -p 18080:80 -p [::1]:18081:81 --link {db} --publish-allow fd00::/8"
    );
    linked_container_create(DUAL_STACK, &db, &c, &create)
}

/// A dual-stack container with a link on a routed network (eBPF datapath: the IPv6
/// `ENDPOINTS` and `LINKS` entries).
fn container_create_dual_stack_routed(env: &TestEnv) -> Scenario {
    let (db, c) = (env.name("db"), env.name("c"));
    let create = format!("container create {c} --network n --link {db}");
    linked_container_create(DUAL_STACK_ROUTED, &db, &c, &create)
}

/// `create` (of container `c`), on network `network` beside container `db`, which exposes a
/// port.
fn linked_container_create(network: &str, db: &str, c: &str, create: &str) -> Scenario {
    Scenario {
        base: vec![
            args(network),
            args(&format!("container create {db} --network n --expose 5432")),
        ],
        before: vec![],
        command: args(create),
        redo: vec![args(create)],
        after: vec![args(&format!("container rm {c}"))],
    }
}

fn network_rm(_: &TestEnv) -> Scenario {
    Scenario {
        base: vec![],
        before: vec![args("network create n --subnet 10.77.0.0/24")],
        command: args("network rm n"),
        redo: vec![args("network create n --subnet 10.77.0.0/24")],
        after: vec![args("network rm n")],
    }
}

fn container_create(env: &TestEnv) -> Scenario {
    let (db, c) = (env.name("db"), env.name("c"));
    let create = format!(
        "container create {c} --network n -p 18080:80 --expose 90 --link {db} --publish-allow 198.18.0.0/15"
    );
    Scenario {
        base: vec![
            args("network create n --subnet 10.77.0.0/24 --icc=false"),
            args(&format!("container create {db} --network n --expose 5432")),
        ],
        before: vec![],
        command: args(&create),
        redo: vec![args(&create)],
        after: vec![args(&format!("container rm {c}"))],
    }
}

fn container_rm(env: &TestEnv) -> Scenario {
    let c = env.name("c");
    let create = format!("container create {c} --network n -p 18080:80");
    Scenario {
        base: vec![args("network create n --subnet 10.77.0.0/24")],
        before: vec![args(&create)],
        command: args(&format!("container rm {c}")),
        redo: vec![args(&create)],
        after: vec![args(&format!("container rm {c}"))],
    }
}

fn publish(env: &TestEnv) -> Scenario {
    let c = env.name("c");
    let publish = format!("publish {c} -p 18081:81 -p 18082:82/udp");
    Scenario {
        base: vec![args("network create n --subnet 10.77.0.0/24")],
        before: vec![args(&format!(
            "container create {c} --network n -p 18080:80"
        ))],
        command: args(&publish),
        redo: vec![args(&publish)],
        after: vec![args(&format!("container rm {c}"))],
    }
}

fn unpublish(env: &TestEnv) -> Scenario {
    let c = env.name("c");
    Scenario {
        base: vec![args("network create n --subnet 10.77.0.0/24")],
        before: vec![args(&format!(
            "container create {c} --network n -p 18080:80 -p 18081:81 -p 18082:82/udp"
        ))],
        command: args(&format!("unpublish {c} 18081:81 18082:82/udp")),
        // Unpublished whatever the step: the ports are free to publish again.
        redo: vec![args(&format!("publish {c} -p 18081:81 -p 18082:82/udp"))],
        after: vec![args(&format!("container rm {c}"))],
    }
}

fn link(env: &TestEnv) -> Scenario {
    let (a, b) = (env.name("a"), env.name("b"));
    Scenario {
        base: vec![args("network create n --subnet 10.77.0.0/24")],
        before: vec![
            args(&format!("container create {a} --network n")),
            args(&format!("container create {b} --network none")),
        ],
        command: args(&format!("link {a} {b}")),
        redo: vec![args(&format!("link {a} {b}"))],
        after: vec![
            args(&format!("container rm {a}")),
            args(&format!("container rm {b}")),
        ],
    }
}

#[test]
fn network_create_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", network_create);
}

#[test]
fn network_create_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", network_create);
}

#[test]
fn dual_stack_network_create_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", network_create_dual_stack);
}

#[test]
fn dual_stack_container_create_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", container_create_dual_stack);
}

#[test]
fn dual_stack_network_create_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", network_create_dual_stack_routed);
}

#[test]
fn dual_stack_container_create_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", container_create_dual_stack_routed);
}

#[test]
fn network_rm_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", network_rm);
}

#[test]
fn network_rm_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", network_rm);
}

#[test]
fn container_create_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", container_create);
}

#[test]
fn container_create_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", container_create);
}

#[test]
fn container_rm_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", container_rm);
}

#[test]
fn container_rm_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", container_rm);
}

#[test]
fn publish_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", publish);
}

#[test]
fn publish_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", publish);
}

#[test]
fn unpublish_killed_at_every_step_ebpf() {
    kill_at_every_step("ebpf", unpublish);
}

#[test]
fn unpublish_killed_at_every_step_iptables() {
    kill_at_every_step("iptables", unpublish);
}

#[test]
fn link_killed_at_every_step() {
    kill_at_every_step("ebpf", link);
}

/// `container rm` again after one killed midway: the garbage collection finishes the first
/// removal, and the second one says so by succeeding (the container is gone, as asked).
#[test]
fn container_rm_again_after_one_killed_midway_succeeds() {
    let all = steps("ebpf", &container_rm);
    let step = &all[all.len() / 2];
    let env = TestEnv::new();
    let s = container_rm(&env);
    run_all(&env, &s.base);
    run_all(&env, &s.before);
    let cmd: Vec<&str> = s.command.iter().map(String::as_str).collect();
    let status = env
        .netd_cmd(&cmd)
        .env("NETD_FAULT_KILL_AT", step)
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(9), "{cmd:?} not killed at {step}");
    env.netd_ok(&cmd);
    assert_eq!(
        env.netd_json(&["container", "ls", "--json"]),
        serde_json::json!([])
    );
    // And once it is gone, removing it is an error again.
    env.netd_err(&cmd);
}
