//! What a datapath and a receiver counted: `netd stats` reasons (eBPF datapath), the packet
//! counters of iptables rules (iptables datapath) and a namespace's /proc/net/snmp.

use std::path::Path;

use crate::harness::TestEnv;

/// Packets counted under `reason` by `netd stats`.
pub fn netd_stat(env: &TestEnv, reason: &str) -> u64 {
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

/// Packets dropped by the DROP rules of `chain` (host namespace, filter table) with exactly
/// these in/out interfaces (`*`: any). Panics when there is no such rule.
pub fn iptables_drops(env: &TestEnv, chain: &str, input: &str, output: &str) -> u64 {
    let out = env.run_in(&env.host_ns(), "iptables", &["-w", "-nvxL", chain]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // pkts bytes target prot opt in out source destination
    let rules: Vec<Vec<&str>> = text
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .filter(|f: &Vec<&str>| f.len() >= 9 && f[2] == "DROP" && f[5] == input && f[6] == output)
        .collect();
    assert!(
        !rules.is_empty(),
        "no DROP rule -i {input} -o {output} in {chain}:\n{text}"
    );
    rules.iter().map(|f| f[0].parse::<u64>().unwrap()).sum()
}

/// A counter of /proc/net/snmp (`Ip`, `Icmp`, `Tcp`, `Udp`: `group`; `InEchos`: `name`) in the
/// namespace at `ns`.
pub fn snmp(env: &TestEnv, ns: &Path, group: &str, name: &str) -> u64 {
    let out = env.run_in(ns, "cat", &["/proc/net/snmp"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let column = names
        .split_whitespace()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no {group} {name} in /proc/net/snmp"));
    values
        .split_whitespace()
        .nth(column)
        .unwrap()
        .parse()
        .unwrap()
}

/// A counter of /proc/net/snmp6 (`Ip6OutForwDatagrams`: `name`) in the namespace at `ns`.
pub fn snmp6(env: &TestEnv, ns: &Path, name: &str) -> u64 {
    let out = env.run_in(ns, "cat", &["/proc/net/snmp6"]);
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&name))
        .unwrap_or_else(|| panic!("no {name} in /proc/net/snmp6"))[1]
        .parse()
        .unwrap()
}
