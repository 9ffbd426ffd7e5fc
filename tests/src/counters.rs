//! What the iptables datapath and a namespace's IPv6 stack counted (`netd stats` and
//! /proc/net/snmp are in [`crate::traffic`]).

use std::path::Path;

use crate::harness::TestEnv;

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

/// Frames the ebtables DROP rules of FORWARD in the host namespace matched.
pub fn ebtables_drops(env: &TestEnv) -> u64 {
    let out = env.run_in(&env.host_ns(), "ebtables", &["-L", "FORWARD", "--Lc"]);
    assert!(out.status.success(), "{out:?}");
    // `-p 802_1Q -i vethX -j DROP , pcnt = 3 -- bcnt = 210`
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.contains("-j DROP"))
        .filter_map(|l| {
            l.split("pcnt = ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
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
