//! `cargo xtask bench --quick` writes a complete report: every arm × path × metric the README
//! lists has its record, over IPv4 and (but where the report says why not) IPv6, with
//! measured values, and the Markdown report and chart exist.

use std::{collections::BTreeSet, process::Command};

/// Every arm, and those with a control plane of their own (scaling, container set-up).
const ARMS: [&str; 7] = [
    "ceiling", "routed", "redirect", "ebpf", "ebpf-xdp", "iptables", "docker",
];
const MANAGED: [&str; 3] = ["ebpf", "iptables", "docker"];
const PATHS: [&str; 3] = [
    "outside->published",
    "container->outside",
    "container->container",
];
/// The arms without IPv6 rows (the report says why).
const NO_IPV6: [&str; 2] = ["ebpf-xdp", "docker"];
/// `--quick`'s numbers of published ports, and ebpf's past one host address.
const PORT_COUNTS: [u32; 2] = [1, 100];
const EBPF_PORT_COUNT: u32 = 1_000;
/// `--quick`'s containers created one by one, and at once (the start storm).
const CONTAINERS: u32 = 10;
const STORM: u32 = 10;
/// `--quick`'s conntrack table size.
const CONNTRACK_MAX: u32 = 262_144;

type Key = (String, String, String, u32);

const CONNTRACK: &str = "outside->published-conntrack";

/// Published-port scaling: iptables with both backends, ebpf past one host address too.
fn expect_scaling(want: &mut BTreeSet<Key>, arm: &str) {
    let (arms, counts): (Vec<&str>, Vec<u32>) = match arm {
        "iptables" => (
            vec!["iptables-legacy", "iptables-nft"],
            PORT_COUNTS.to_vec(),
        ),
        "ebpf" => (vec![arm], [&PORT_COUNTS[..], &[EBPF_PORT_COUNT]].concat()),
        _ => (vec![arm], PORT_COUNTS.to_vec()),
    };
    for arm in arms {
        for &n in &counts {
            want.insert(key(arm, "outside->last-published", "crr", n));
            want.insert(key(arm, "outside->last-published", "first_packet_us", n));
            want.insert(key(arm, "publish", "publish_ms", n));
            if arm != "docker" {
                want.insert(key(arm, "publish", "publish_daemon_ms", n));
            }
        }
    }
}

fn key(arm: &str, path: &str, metric: &str, n: u32) -> Key {
    (arm.into(), path.into(), metric.into(), n)
}

/// What the README promises, for the arms that ran.
fn expected(ran: &[&str]) -> BTreeSet<Key> {
    let mut want = BTreeSet::new();
    for arm in ran {
        for path in PATHS {
            let ipv6 = format!("{path} (IPv6)");
            for metric in [
                "throughput",
                "throughput_one_core",
                "rr_p50",
                "rr_p99",
                "crr",
                "crr_failed",
                "keepalive_rps",
            ] {
                want.insert(key(arm, path, metric, 1));
                if !NO_IPV6.contains(arm) {
                    want.insert(key(arm, &ipv6, metric, 1));
                }
            }
        }
        // Unsolicited floods: the arms that refuse new flows to a container (not the
        // reference arms, which have no NAT to refuse them).
        if !["ceiling", "routed", "redirect"].contains(arm) {
            for metric in ["flood_pps", "leaked_pct"] {
                want.insert(key(arm, "outside->container-unsolicited", metric, 1));
            }
        }
        if MANAGED.contains(arm) {
            expect_scaling(&mut want, arm);
            want.insert(key(arm, "control", "create_ms", CONTAINERS));
            want.insert(key(arm, "control", "remove_ms", CONTAINERS));
        }
        if ["ebpf", "iptables"].contains(arm) {
            want.insert(key(arm, "control", "storm_total_ms", STORM));
            want.insert(key(arm, "control", "storm_create_ms", STORM));
            for metric in [
                "throughput",
                "throughput_synflood",
                "synflood_held",
                "synflood_cpu_us",
                "sender_synflood_held",
                "synflood_vs_sender",
                "sender_synflood_cpu_us",
            ] {
                want.insert(key(arm, CONNTRACK, metric, 1));
            }
        }
    }
    for metric in [
        "crr",
        "crr_ct90",
        "ct_entries",
        "daemon_rss_mib",
        "daemon_peak_rss_mib",
    ] {
        want.insert(key("ebpf", CONNTRACK, metric, CONNTRACK_MAX));
    }
    // netd's programs, one packet at a time: a frame of each program's, both families.
    for family in ["", " (IPv6)"] {
        for path in [
            "uplink_ingress: published, request",
            "uplink_ingress: published, a new flow's SYN",
            "endpoint_ingress: published, reply",
            "uplink_egress: published, reply",
            "uplink_egress: masqueraded, request",
            "uplink_ingress: masqueraded, reply",
            "endpoint_ingress: container->container",
        ] {
            want.insert(key("ebpf", &format!("{path}{family}"), "prog_run_ns", 1));
        }
    }
    want.insert(key(
        "ebpf",
        "uplink_ingress: ARP (the floor)",
        "prog_run_ns",
        1,
    ));
    want.insert(key("ebpf", "memory", "maps_kib_per_container", CONTAINERS));
    want.insert(key("ebpf", "memory", "maps_kib_per_10k_ports", 100));
    want.insert(key("ebpf", "memory", "maps_kib_per_100k_ct", 1));
    want.insert(key(
        "iptables-nft",
        "memory",
        "ruleset_kib_per_10k_ports",
        100,
    ));
    want.insert(key("iptables", "memory", "slab_kib_per_100k_ct", 1));
    for path in PATHS
        .into_iter()
        .flat_map(|p| [p.to_string(), format!("{p} (IPv6)")])
    {
        // Keep-alive requests are paired where their target is, outside → published.
        let mut paired = vec!["rr_p50", "crr"];
        if path.starts_with("outside->published") {
            paired.push("keepalive_rps");
        }
        for metric in paired {
            for arm in ["ceiling", "routed", "redirect", "ebpf"] {
                want.insert(key(arm, &path, &format!("{metric}_paired"), 1));
                if arm != "ceiling" {
                    want.insert(key(arm, &path, &format!("{metric}_to_ceiling"), 1));
                }
                if !["ceiling", "routed"].contains(&arm) {
                    want.insert(key(arm, &path, &format!("{metric}_to_routed"), 1));
                }
            }
        }
        for arm in ["ceiling", "routed", "redirect", "ebpf"] {
            want.insert(key(arm, &path, "crr_paired_failed", 1));
        }
    }
    want
}

#[test]
fn a_quick_run_writes_a_record_for_every_arm_path_and_metric() {
    let out = std::env::temp_dir().join(format!("netd-bench-quick-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_netd-bench"))
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "the benchmark failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("latest.json")).unwrap()).unwrap();
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    let svg = std::fs::read_to_string(out.join("ratios.svg")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();

    // Only the Docker arm may be skipped (saying why), where docker.io isn't installed; and
    // the IPv6 worlds of the two arms that have none (saying why).
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let without_ipv6 = |s: &&str| {
        NO_IPV6
            .iter()
            .any(|arm| s.starts_with(&format!("{arm} over IPv6")))
    };
    let whole_arms: Vec<&&str> = skipped.iter().filter(|s| !without_ipv6(s)).collect();
    assert!(
        whole_arms.iter().all(|s| s.starts_with("docker")),
        "{skipped:?}"
    );
    let ran: Vec<&str> = ARMS
        .into_iter()
        .filter(|a| *a != "docker" || whole_arms.is_empty())
        .collect();
    for arm in NO_IPV6.iter().filter(|arm| ran.contains(arm)) {
        let why = format!("{arm} over IPv6");
        assert!(skipped.iter().any(|s| s.starts_with(&why)), "{skipped:?}");
    }

    let mut got = BTreeSet::new();
    for r in report["records"].as_array().unwrap() {
        let (arm, path, metric) = (
            r["arm"].as_str().unwrap(),
            r["path"].as_str().unwrap(),
            r["metric"].as_str().unwrap(),
        );
        let runs = r["runs"].as_array().unwrap();
        assert!(!runs.is_empty(), "{r}");
        let median = r["median"].as_f64().unwrap();
        // A share of leaked datagrams is 0 where the arm drops them all, failed connections
        // where none failed, and memory growth may be 0 (no rules on ebpf) or, for the
        // machine-wide Slab, negative; all else is measured.
        if metric != "leaked_pct" && !metric.ends_with("_failed") && path != "memory" {
            assert!(median > 0.0, "{r}");
        }
        assert!(r["unit"].as_str().is_some_and(|u| !u.is_empty()), "{r}");
        got.insert(key(
            arm,
            path,
            metric,
            r["n_ports"].as_u64().unwrap() as u32,
        ));
    }
    let want = expected(&ran);
    let missing: Vec<&Key> = want.difference(&got).collect();
    assert!(missing.is_empty(), "records missing: {missing:?}");
    for arm in &ran {
        assert!(report["fairness"][arm].is_object(), "no fairness for {arm}");
    }
    assert!(report["quick"].as_bool().unwrap());
    assert!(markdown.starts_with("# netd benchmark"), "{markdown}");
    assert!(svg.contains("<svg"), "ratios.svg is no SVG");
}

/// A short soak: churn beside long-lived flows loses no flow, makes no error and leaves
/// nothing behind; its report and graph are written.
#[test]
fn a_short_soak_loses_no_flow_and_leaves_nothing_behind() {
    let out = std::env::temp_dir().join(format!("netd-bench-soak-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_netd-bench"))
        .args(["soak", "--minutes", "0.5", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "the soak failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("soak.json")).unwrap()).unwrap();
    let svg = std::fs::read_to_string(out.join("soak.svg")).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let outcome = &report["outcome"];
    for what in [
        "flows_lost",
        "errors",
        "leaked_links",
        "leaked_pins",
        "leaked_namespaces",
    ] {
        assert_eq!(outcome[what].as_i64(), Some(0), "{what}: {outcome}");
    }
    let samples = report["samples"].as_array().unwrap();
    assert!(samples.len() >= 3, "{samples:?}");
    // The churn ran: containers were made and removed, and the flows carried requests.
    let last = samples.last().unwrap();
    assert!(last["containers_removed"].as_u64().unwrap() > 0, "{last}");
    assert!(
        samples
            .iter()
            .all(|s| s["rr_requests"].as_u64().unwrap() > 0)
    );
    assert!(svg.contains("<svg"), "soak.svg is no SVG");
}
