//! The benchmark report: `latest.json` (one record per measurement, for scripts), `report.md`
//! (tables of medians, spreads and ratios, targets met or missed) and `ratios.svg`.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde::Serialize;

use super::arms::Fairness;

#[derive(Debug, Serialize)]
pub struct Record {
    pub arm: String,
    pub path: String,
    pub metric: &'static str,
    pub unit: &'static str,
    pub n_ports: u32,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Record {
    pub fn from_samples(
        ((arm, path, metric, n_ports), runs): ((String, String, &'static str, u32), Vec<f64>),
    ) -> Self {
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        Self {
            arm,
            path,
            metric,
            unit: unit_of(metric),
            n_ports,
            median: percentile(&sorted, 50.0),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            runs,
        }
    }
}

fn unit_of(metric: &str) -> &'static str {
    match metric {
        "throughput" | "throughput_one_core" => "Gbit/s",
        "rr_p50" | "rr_p99" | "rr_p50_paired" | "first_packet_us" => "us",
        m if m.contains("_to_") => "ratio",
        super::programs::RUN_NS => "ns",
        "crr" | "crr_ct90" | "crr_paired" => "conn/s",
        "throughput_synflood" => "Gbit/s",
        "synflood_held" | "sender_synflood_held" | "synflood_vs_sender" => "ratio",
        "synflood_cpu_us" | "sender_synflood_cpu_us" => "us",
        "synflood_sent" | "ct_entries" | "crr_failed" | "crr_ct90_failed" | "crr_paired_failed" => {
            "count"
        }
        "daemon_rss_mib" | "daemon_peak_rss_mib" => "MiB",
        m if m.contains("_kib_") => "KiB",
        "keepalive_rps" | "keepalive_rps_paired" => "req/s",
        "flood_pps" => "pkt/s",
        "leaked_pct" => "%",
        _ => "ms",
    }
}

/// The `p`th percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// What one program cost on one path, summed over the rounds.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub arm: String,
    pub path: String,
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cores: usize,
    pub cpu: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines().find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cores: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu,
        }
    }
}

pub fn now_utc() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub quick: bool,
    pub duration_s: f64,
    pub machine: Machine,
    pub fairness: BTreeMap<String, Fairness>,
    /// Time spent in each attached TCX program while the paths ran (kernel run-time stats).
    pub profile: Vec<Profile>,
    /// What was not measured, and why.
    pub skipped: Vec<String>,
    /// The other netd binary the `baseline` arm drove (`--baseline`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    pub records: Vec<Record>,
}

impl Report {
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("latest.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        self.chart(&dir.join("ratios.svg"))
    }

    fn find(&self, arm: &str, path: &str, metric: &str, n: u32) -> Option<&Record> {
        self.records
            .iter()
            .find(|r| r.arm == arm && r.path == path && r.metric == metric && r.n_ports == n)
    }

    fn arms(&self) -> Vec<&str> {
        let mut arms: Vec<&str> = Vec::new();
        for r in &self.records {
            if !arms.contains(&r.arm.as_str()) {
                arms.push(&r.arm);
            }
        }
        arms
    }

    /// The ratio of ebpf's median to `other`'s.
    fn ratio(&self, other: &str, path: &str, metric: &str, n: u32) -> Option<f64> {
        self.ratio_of("ebpf", other, path, metric, n)
    }

    /// `arm`'s median over `other`'s.
    fn ratio_of(&self, arm: &str, other: &str, path: &str, metric: &str, n: u32) -> Option<f64> {
        let a = self.find(arm, path, metric, n)?.median;
        let o = self.find(other, path, metric, n)?.median;
        Some(a / o)
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "# netd benchmark\n");
        let _ = writeln!(
            md,
            "{} run of {}, {:.0} s, on Linux {} with {} cores ({}).\n",
            if self.quick { "Quick" } else { "Full" },
            self.date,
            self.duration_s,
            m.kernel,
            m.cores,
            m.cpu
        );
        self.paths_table(&mut md);
        self.paired_table(&mut md);
        self.redirect_bound_table(&mut md);
        self.unsolicited_table(&mut md);
        self.xdp_table(&mut md);
        self.baseline_table(&mut md);
        self.scaling_table(&mut md);
        self.control_table(&mut md);
        self.conntrack_table(&mut md);
        self.memory_table(&mut md);
        self.fairness_table(&mut md);
        self.profile_table(&mut md);
        self.programs_table(&mut md);
        if !self.skipped.is_empty() {
            let _ = writeln!(md, "## Not measured\n");
            for why in &self.skipped {
                let _ = writeln!(md, "- {why}");
            }
        }
        md
    }

    fn paths_table(&self, md: &mut String) {
        let paths: Vec<&str> = super::Path::rows().map(|(_, name)| name).collect();
        if !self
            .records
            .iter()
            .any(|r| r.metric == "throughput" && paths.contains(&r.path.as_str()))
        {
            return;
        }
        // The arms measured on the paths (not those of the scaling alone).
        let arms: Vec<&str> = self
            .arms()
            .into_iter()
            .filter(|a| {
                paths
                    .iter()
                    .any(|p| self.find(a, p, "throughput", 1).is_some())
            })
            .collect();
        let _ = writeln!(md, "## Paths (median, min–max over runs)\n");
        let _ = writeln!(
            md,
            "Each path over IPv4 and, in the rows marked (IPv6), over IPv6 (the arms' worlds \
             built dual-stack, the ceiling a veth pair carrying IPv6); every ratio and target is \
             against the same family's ceiling and routed floor. `redirect/routed` is what the \
             least an eBPF datapath can do (the `redirect` arm: routed's topology, one program \
             redirecting by destination alone) reaches against routed: a target set against \
             routed that it misses, no eBPF datapath on this topology meets. Request/response \
             over IPv6 is netd-bench's own ping-pong (sockperf's 14-byte messages on one \
             connection, pinned the same way; Debian's sockperf takes IPv4 addresses only; the README says how the \
             two compare on the same IPv4 paths). `throughput_one_core` is the same transfer with \
             both ends on the first CPU, where all of the path's work then lands: what the path \
             costs per byte, without the out-of-order arrivals seen on two CPUs here.\n"
        );
        let _ = write!(md, "| path | metric |");
        for a in &arms {
            let _ = write!(md, " {a} |");
        }
        let _ = writeln!(
            md,
            " ebpf/ceiling | ebpf/routed | redirect/routed | ebpf/iptables | target |"
        );
        let _ = writeln!(md, "|{}", "---|".repeat(arms.len() + 7));
        for (route, path) in super::Path::rows() {
            for metric in PATH_METRICS {
                let _ = write!(md, "| {path} | {metric} ({}) |", unit_of(metric));
                for a in &arms {
                    let _ = write!(md, " {} |", self.cell(a, path, metric, 1, 2));
                }
                let fmt =
                    |r: Option<f64>| r.map(|r| format!("{r:.3}")).unwrap_or_else(|| "–".into());
                let to_ceiling = self.ratio("ceiling", path, metric, 1);
                let to_routed = self.ratio("routed", path, metric, 1);
                // A target is judged on the paired runs when there are some.
                let target = match super::Paired::of(metric) {
                    Some(what) if self.find("ebpf", path, what.runs(), 1).is_some() => {
                        format!("{} (paired)", self.paired_target(route, path, what))
                    }
                    _ => Target::of(route, metric)
                        .map(|t| t.judge(to_ceiling, to_routed))
                        .unwrap_or_default(),
                };
                let _ = writeln!(
                    md,
                    " {} | {} | {} | {} | {target} |",
                    fmt(to_ceiling),
                    fmt(to_routed),
                    fmt(self.ratio_of("redirect", "routed", path, metric, 1)),
                    fmt(self.ratio("iptables", path, metric, 1)),
                );
            }
        }
        let _ = writeln!(md);
        self.lost_connections(md);
    }

    /// The connections of the connections-per-second measurement that got no answer within
    /// a second (a lost SYN waits that long to be sent again), where any did.
    fn lost_connections(&self, md: &mut String) {
        let lost: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| {
                ["crr_failed", "crr_paired_failed"].contains(&r.metric)
                    && super::Path::rows().any(|(_, p)| p == r.path)
            })
            .filter(|r| r.runs.iter().sum::<f64>() > 0.0)
            .collect();
        if lost.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "Connections that got no answer within a second while connections per second were \
             measured (not counted in the rate; `crr_paired_failed`: in the paired runs):\n"
        );
        for r in lost {
            let _ = writeln!(
                md,
                "- {}, {}, {}: {} over {} runs",
                r.arm,
                r.path,
                r.metric,
                r.runs.iter().sum::<f64>(),
                r.runs.len()
            );
        }
        let _ = writeln!(md);
    }

    /// The target of `route` (named `path`) for the paired measurement `what`, judged on
    /// ebpf's median ratio within a pair to the ceiling or routed.
    fn paired_target(&self, route: super::Path, path: &str, what: super::Paired) -> String {
        let median = |against| {
            self.find("ebpf", path, what.ratio(against), 1)
                .map(|r| r.median)
        };
        Target::of(route, what.metric())
            .map(|t| t.judge(median("ceiling"), median("routed")))
            .unwrap_or_default()
    }

    fn paired_table(&self, md: &mut String) {
        if !self.records.iter().any(|r| r.metric.ends_with("_paired")) {
            return;
        }
        let _ = writeln!(md, "## Paired runs against the ceiling and routed\n");
        let _ = writeln!(
            md,
            "Every arm up at once, one-second runs alternating between the ceiling and the \
             arms (order rotating); each ratio is an arm's figure over the ceiling's or routed's \
             from the same pair of runs (median, min–max over pairs). Keep-alive requests are \
             paired on outside → published alone, where their target is. `routed` is plain \
             kernel routing through a host namespace, no NAT, no rules: from the outside to a \
             container or back, a packet crosses two veth pairs where the ceiling's crosses \
             one; the floor of every datapath on veth for those paths. `redirect` is that \
             topology forwarded by the least an eBPF program can do (a lookup of the \
             destination, new MACs, a redirect).\n"
        );
        let _ = writeln!(
            md,
            "| path | metric | arm | median (min–max) | to ceiling | to routed | target |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for (route, path) in super::Path::rows() {
            for what in super::Paired::ALL {
                let digits = if what == super::Paired::Latency { 2 } else { 0 };
                for arm in self.arms() {
                    if self.find(arm, path, what.runs(), 1).is_none() {
                        continue;
                    }
                    let to = |against| {
                        if arm == against {
                            "1".to_string()
                        } else {
                            self.cell(arm, path, what.ratio(against), 1, 3)
                        }
                    };
                    let target = if arm == "ebpf" {
                        self.paired_target(route, path, what)
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        md,
                        "| {path} | {} ({}) | {arm} | {} | {} | {} | {target} |",
                        what.metric(),
                        unit_of(what.runs()),
                        self.cell(arm, path, what.runs(), 1, digits),
                        to("ceiling"),
                        to("routed"),
                    );
                }
            }
        }
        let _ = writeln!(md);
    }

    /// ebpf beside routed and the `redirect` arm on the metrics whose targets are set against
    /// routed: `redirect/routed` is the most an eBPF datapath reaches there, `ebpf/redirect`
    /// what netd's programs cost over the least one can do.
    fn redirect_bound_table(&self, md: &mut String) {
        const METRICS: [(&str, usize); 3] = [
            ("crr_paired", 0),
            ("keepalive_rps_paired", 0),
            ("rr_p50_paired", 2),
        ];
        let rows: Vec<(&str, &str, usize)> = super::Path::rows()
            .flat_map(|(_, path)| METRICS.map(|(metric, digits)| (path, metric, digits)))
            .filter(|(path, metric, _)| {
                ["routed", "redirect", "ebpf"]
                    .iter()
                    .all(|arm| self.find(arm, path, metric, 1).is_some())
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "## The bound of any eBPF datapath: the `redirect` arm (median, min–max over runs)\n"
        );
        let _ = writeln!(
            md,
            "`redirect` is routed's topology forwarded by one TC program per host interface that \
             only looks the destination up, sets the MACs and redirects: a target against routed \
             that it misses is out of reach on this topology, and ebpf against it is what netd's \
             programs cost. From the paired runs; ratios are of medians.\n"
        );
        let _ = writeln!(
            md,
            "| path | metric | routed | redirect | ebpf | redirect/routed | ebpf/redirect | ebpf/routed |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for (path, metric, digits) in rows {
            let ratio = |arm, other| {
                self.ratio_of(arm, other, path, metric, 1)
                    .map(|r| format!("{r:.3}"))
                    .unwrap_or_default()
            };
            let _ = writeln!(
                md,
                "| {path} | {metric} ({}) | {} | {} | {} | {} | {} | {} |",
                unit_of(metric),
                self.cell("routed", path, metric, 1, digits),
                self.cell("redirect", path, metric, 1, digits),
                self.cell("ebpf", path, metric, 1, digits),
                ratio("redirect", "routed"),
                ratio("ebpf", "redirect"),
                ratio("ebpf", "routed"),
            );
        }
        let _ = writeln!(md);
    }

    fn unsolicited_table(&self, md: &mut String) {
        let path = super::UNSOLICITED;
        if !self.records.iter().any(|r| r.path == path) {
            return;
        }
        let _ = writeln!(md, "## Unsolicited traffic (median, min–max over runs)\n");
        let _ = writeln!(
            md,
            "One core in the outside namespace floods the server container's address (routed \
             through the host) with minimum-size UDP datagrams to a port nothing publishes. On \
             veth the receiving side runs on the sending core, so more datagrams per second \
             means a cheaper drop; \"got in\" is the share the container received.\n"
        );
        let _ = writeln!(md, "| arm | datagrams/s | got in (%) |");
        let _ = writeln!(md, "|---|---|---|");
        for arm in self.arms() {
            let cell = |metric: &str| {
                self.find(arm, path, metric, 1)
                    .map(|r| format!("{:.0} ({:.0}–{:.0})", r.median, r.min, r.max))
            };
            if let (Some(pps), Some(leaked)) = (cell("flood_pps"), cell("leaked_pct")) {
                let _ = writeln!(md, "| {arm} | {pps} | {leaked} |");
            }
        }
        let _ = writeln!(md);
    }

    /// The uplink's XDP program against TC alone, for every path it is on.
    fn xdp_table(&self, md: &mut String) {
        let rows: Vec<(&str, &str, f64, f64)> = super::Path::rows()
            .map(|(_, name)| name)
            .flat_map(|path| ["throughput", "rr_p50", "crr"].map(|metric| (path, metric)))
            .chain([(super::UNSOLICITED, "flood_pps")])
            .filter_map(|(path, metric)| {
                let tc = self.find("ebpf", path, metric, 1)?.median;
                let xdp = self.find("ebpf-xdp", path, metric, 1)?.median;
                Some((path, metric, tc, xdp))
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(md, "## XDP on the uplink against TC alone (medians)\n");
        let _ = writeln!(
            md,
            "| path | metric | ebpf (TC) | ebpf-xdp | xdp/tc | faster |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for (path, metric, tc, xdp) in rows {
            // Latency is better lower, the rest higher.
            let xdp_wins = if metric == "rr_p50" {
                xdp < tc
            } else {
                xdp > tc
            };
            let _ = writeln!(
                md,
                "| {path} | {metric} ({}) | {tc:.2} | {xdp:.2} | {:.3} | {} |",
                unit_of(metric),
                xdp / tc,
                if xdp_wins { "xdp" } else { "tc" }
            );
        }
        let _ = writeln!(md);
    }

    /// This build against the baseline build (`--baseline`), path by path: the before/after
    /// of a change, measured in one run with the rounds alternating.
    fn baseline_table(&self, md: &mut String) {
        let Some(bin) = &self.baseline else {
            return;
        };
        let paths: Vec<&str> = super::Path::rows().map(|(_, name)| name).collect();
        if !self
            .records
            .iter()
            .any(|r| r.arm == super::arms::BASELINE && paths.contains(&r.path.as_str()))
        {
            // Only its programs were measured (`programs`), which have their own table.
            return;
        }
        let _ = writeln!(
            md,
            "## This build against the baseline (median, min–max over runs)\n"
        );
        let _ = writeln!(md, "Baseline: `{bin}`, the eBPF datapath as `ebpf`.\n");
        let _ = writeln!(md, "| path | metric | baseline | ebpf | ebpf/baseline |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for (_, path) in super::Path::rows() {
            for metric in PATH_METRICS {
                let Some(ratio) = self.ratio(super::arms::BASELINE, path, metric, 1) else {
                    continue;
                };
                let _ = writeln!(
                    md,
                    "| {path} | {metric} ({}) | {} | {} | {ratio:.3} |",
                    unit_of(metric),
                    self.cell(super::arms::BASELINE, path, metric, 1, 2),
                    self.cell("ebpf", path, metric, 1, 2),
                );
            }
        }
        let _ = writeln!(md);
    }

    /// The N values `metric` was measured at, ascending.
    fn counts_of(&self, metric: &str) -> Vec<u32> {
        let mut ns: Vec<u32> = self
            .records
            .iter()
            .filter(|r| r.metric == metric)
            .map(|r| r.n_ports)
            .collect();
        ns.sort_unstable();
        ns.dedup();
        ns
    }

    /// "median (min–max)" of a record, or "–".
    fn cell(&self, arm: &str, path: &str, metric: &str, n: u32, digits: usize) -> String {
        self.find(arm, path, metric, n)
            .map(|r| format!("{:.d$} ({:.d$}–{:.d$})", r.median, r.min, r.max, d = digits))
            .unwrap_or_else(|| "–".into())
    }

    fn scaling_table(&self, md: &mut String) {
        let ns = self.counts_of("publish_ms");
        if ns.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "## Scaling with published ports (to the last-added port)\n"
        );
        let _ = writeln!(
            md,
            "N - 1 ports published first (past one host address's worth, on several addresses \
             of the uplink), then one more: `publish_ms` is that `netd publish`, a whole CLI \
             process (Docker has to re-create the container); `publish_daemon_ms` is one more \
             port through `netd daemon`'s API, a request on its unix socket, connect to answer \
             (median of five, each a fresh port). iptables with both backends: \
             legacy (x_tables) and nft (nf_tables, Debian's default). Memory: what the N - 1 \
             ports took, per 10,000 (maps: the share of netd's preallocated maps their entries \
             occupy; rule set: iptables-legacy-save plus nft list ruleset text).\n"
        );
        let _ = writeln!(
            md,
            "| N | arm | crr (conn/s) | first packet (us) | publish, CLI (ms) | publish, daemon (ms) | maps (KiB/10k ports) | rule set (KiB/10k ports) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for &n in &ns {
            for arm in self
                .arms()
                .into_iter()
                .filter(|a| super::arms::has_own_control_plane(a))
            {
                if self.find(arm, "publish", "publish_ms", n).is_none() {
                    continue;
                }
                let mem = super::memory::MEMORY;
                let _ = writeln!(
                    md,
                    "| {n} | {arm} | {} | {} | {} | {} | {} | {} |",
                    self.cell(arm, super::SCALING, "crr", n, 0),
                    self.cell(arm, super::SCALING, "first_packet_us", n, 0),
                    self.cell(arm, "publish", "publish_ms", n, 1),
                    self.cell(arm, "publish", "publish_daemon_ms", n, 2),
                    self.cell(arm, mem, "maps_kib_per_10k_ports", n, 1),
                    self.cell(arm, mem, "ruleset_kib_per_10k_ports", n, 0),
                );
            }
        }
        let fmt = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into());
        let ebpf: Vec<u32> = ns
            .iter()
            .copied()
            .filter(|&n| self.find("ebpf", super::SCALING, "crr", n).is_some())
            .collect();
        if let (Some(&first), Some(&last)) = (ebpf.first(), ebpf.last()) {
            let crr = |n| {
                self.find("ebpf", super::SCALING, "crr", n)
                    .map(|r| r.median)
            };
            let flat =
                crr(first)
                    .zip(crr(last))
                    .map(|(a, b)| b / a - 1.0)
                    .map_or("–".into(), |d| {
                        format!(
                            "{:+.1}% ({})",
                            d * 100.0,
                            if d.abs() <= 0.05 { "met" } else { "MISSED" }
                        )
                    });
            let _ = writeln!(
                md,
                "\nebpf new connections/s from N={first} to N={last}: {flat} (target within ±5%)."
            );
        }
        for backend in ["iptables-nft", "iptables-legacy"] {
            let Some(&last) = ns
                .iter()
                .rev()
                .find(|&&n| self.find(backend, super::SCALING, "crr", n).is_some())
            else {
                continue;
            };
            let _ = writeln!(
                md,
                "ebpf/{backend} new connections/s: {} at N={}, {} at N={last}.",
                fmt(self.ratio(backend, super::SCALING, "crr", ns[0])),
                ns[0],
                fmt(self.ratio(backend, super::SCALING, "crr", last)),
            );
        }
        self.daemon_publish_verdict(md, &ns);
    }

    /// ebpf's publish through the daemon at the largest N measured, against the target (under
    /// 1 ms at 30,000; judged only when N reached it).
    fn daemon_publish_verdict(&self, md: &mut String, ns: &[u32]) {
        let Some((n, ms)) = ns.iter().rev().find_map(|&n| {
            self.find("ebpf", "publish", "publish_daemon_ms", n)
                .map(|r| (n, r.median))
        }) else {
            return;
        };
        let verdict = match (n >= 30_000, ms < 1.0) {
            (true, true) => "met",
            (true, false) => "MISSED",
            (false, _) => "not judged: N below 30,000",
        };
        let _ = writeln!(
            md,
            "\nebpf publish through the daemon API at N={n}: {ms:.2} ms ({verdict}) (target < 1 ms \
             at 30,000).\n"
        );
    }

    fn control_table(&self, md: &mut String) {
        let ns = self.counts_of("create_ms");
        if ns.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Control plane (per container)\n");
        let _ = writeln!(
            md,
            "N containers created one by one, then removed one by one (targets: create p50 ≤ 10 ms, \
             remove p50 ≤ 15 ms); memory: what the N containers took, per container.\n"
        );
        let _ = writeln!(
            md,
            "| N | arm | create p50 (ms) | create p99 (ms) | remove p50 (ms) | remove p99 (ms) | maps (KiB/container) | rule set (KiB/container) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for &n in &ns {
            for arm in self.arms() {
                if self.find(arm, "control", "create_ms", n).is_none() {
                    continue;
                }
                let pct = |metric: &str, p: f64| self.percentile_of(arm, "control", metric, n, p);
                let mem = |metric: &str| {
                    self.find(arm, super::memory::MEMORY, metric, n)
                        .map_or("–".into(), |r| format!("{:.2}", r.median))
                };
                let _ = writeln!(
                    md,
                    "| {n} | {arm} | {} | {} | {} | {} | {} | {} |",
                    pct("create_ms", 50.0),
                    pct("create_ms", 99.0),
                    pct("remove_ms", 50.0),
                    pct("remove_ms", 99.0),
                    mem("maps_kib_per_container"),
                    mem("ruleset_kib_per_container"),
                );
            }
        }
        let storms = self.counts_of("storm_total_ms");
        if !storms.is_empty() {
            let _ = writeln!(
                md,
                "\nStart storm: N `netd container create` processes started at once.\n"
            );
            let _ = writeln!(
                md,
                "| N | arm | total (ms) | create p50 (ms) | create p99 (ms) |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|");
            for &n in &storms {
                for arm in self.arms() {
                    let Some(total) = self.find(arm, "control", "storm_total_ms", n) else {
                        continue;
                    };
                    let pct = |p: f64| self.percentile_of(arm, "control", "storm_create_ms", n, p);
                    let _ = writeln!(
                        md,
                        "| {n} | {arm} | {:.0} | {} | {} |",
                        total.median,
                        pct(50.0),
                        pct(99.0)
                    );
                }
            }
        }
        let _ = writeln!(md);
    }

    /// The `p`th percentile of every run of a record (per-container times), or "–".
    fn percentile_of(&self, arm: &str, path: &str, metric: &str, n: u32, p: f64) -> String {
        self.find(arm, path, metric, n)
            .map(|r| {
                let mut s = r.runs.clone();
                s.sort_by(f64::total_cmp);
                format!("{:.1}", percentile(&s, p))
            })
            .unwrap_or_else(|| "–".into())
    }

    fn conntrack_table(&self, md: &mut String) {
        let path = super::conntrack::CONNTRACK;
        if !self.records.iter().any(|r| r.path == path) {
            return;
        }
        let _ = writeln!(
            md,
            "## Conntrack under pressure (median, min–max over runs)\n"
        );
        let _ = writeln!(
            md,
            "New connections per second to a published port with netd's conntrack table empty and \
             90% full (filled by SYNs from random sources of 198.19.128.0/17, answered by nobody; N: \
             `--conntrack-max`; such flows are never assured, so they fill netd's table of \
             unassured flows, which a flood can't get past into the assured one); \
             one established flow's throughput alone and while SYNs from random sources hit the \
             same published port at a fixed rate (held: flooded over alone, target 0.9); the \
             same with the flood's SYNs sent into a sink in the outside namespace instead (held, \
             sender alone: what the flood's sender takes from the flow on this machine, which no \
             datapath can win back); the flow under the flood over the flow under the sender \
             alone (what the datapath's handling of the SYNs takes); each ratio within a triple \
             of transfers back to back (alone, then under either flood); what one SYN of each \
             flood costs the whole machine (busy CPU time of all CPUs during the flood alone, \
             less a quiet span's, over the SYNs sent: sender, datapath, the container's \
             answer). iptables' table is the kernel's, machine-wide and shared here, so it is \
             not filled.\n"
        );
        let _ = writeln!(
            md,
            "| arm | table size | crr empty (conn/s) | failed | entries when full | crr 90% full (conn/s) | failed | daemon RSS (MiB) | daemon peak RSS (MiB) | throughput (Gbit/s) | under SYN flood (Gbit/s) | held | SYNs sent | CPU per SYN (us) | held, sender alone | flood / sender alone | CPU per SYN, sender alone (us) |"
        );
        let _ = writeln!(
            md,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for arm in self.arms() {
            let Some(held) = self.find(arm, path, "synflood_held", 1) else {
                continue;
            };
            let size = self
                .records
                .iter()
                .find(|r| r.arm == arm && r.path == path && r.metric == "crr_ct90")
                .map(|r| r.n_ports);
            let at = |metric: &str, digits| {
                size.map_or("–".into(), |n| self.cell(arm, path, metric, n, digits))
            };
            let _ = writeln!(
                md,
                "| {arm} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3} ({:.3}–{:.3}) {} | {} | {} | {} | {} | {} |",
                size.map_or("–".into(), |n| n.to_string()),
                at("crr", 0),
                at("crr_failed", 0),
                at("ct_entries", 0),
                at("crr_ct90", 0),
                at("crr_ct90_failed", 0),
                at("daemon_rss_mib", 1),
                at("daemon_peak_rss_mib", 1),
                self.cell(arm, path, "throughput", 1, 2),
                self.cell(arm, path, "throughput_synflood", 1, 2),
                held.median,
                held.min,
                held.max,
                if held.median >= 0.9 { "met" } else { "MISSED" },
                self.cell(arm, path, "synflood_sent", 1, 0),
                self.cell(arm, path, "synflood_cpu_us", 1, 1),
                self.cell(arm, path, "sender_synflood_held", 1, 3),
                self.cell(arm, path, "synflood_vs_sender", 1, 3),
                self.cell(arm, path, "sender_synflood_cpu_us", 1, 1),
            );
        }
        let _ = writeln!(md);
    }

    fn memory_table(&self, md: &mut String) {
        let mem = super::memory::MEMORY;
        if !self.records.iter().any(|r| r.path == mem) {
            return;
        }
        let _ = writeln!(md, "## Memory\n");
        let _ = writeln!(
            md,
            "Kernel memory: netd's maps as the kernel accounts them (bpftool `bytes_memlock`; \
             netd's hash maps are preallocated, so what a container, a port or a flow costs is the \
             share its entries occupy); iptables: the rule set's text (iptables-legacy-save plus \
             nft list ruleset) and the machine's Slab growth (shared with every process here: \
             noisy); the kernel conntrack's per 100,000 entries from its slab object size.\n"
        );
        let _ = writeln!(md, "| arm | what | KiB (median, min–max) |");
        let _ = writeln!(md, "|---|---|---|");
        let mut rows: Vec<&Record> = self.records.iter().filter(|r| r.path == mem).collect();
        rows.sort_by(|a, b| (&a.arm, a.metric, a.n_ports).cmp(&(&b.arm, b.metric, b.n_ports)));
        for r in rows {
            let _ = writeln!(
                md,
                "| {} | {} (N={}) | {:.2} ({:.2}–{:.2}) |",
                r.arm, r.metric, r.n_ports, r.median, r.min, r.max
            );
        }
        let _ = writeln!(md);
    }

    fn fairness_table(&self, md: &mut String) {
        if self.fairness.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Fairness\n");
        let _ = writeln!(
            md,
            "Every arm runs on veth pairs with the kernel's default offloads and MTU 1500, the same sysctls \
             (IPv6 off in the sandbox but on the links of an IPv6 world, without autoconfiguration; forwarding on where routing is needed) and br_netfilter as the machine has it; \
             servers and clients are the same programs for every arm of a family. What the host namespace of each arm held after its runs, \
             per family (rows marked (IPv6): its IPv6 world, whose netfilter rules are ip6tables') \
             (netfilter tables: nf_tables and x_tables; the kernel registers a namespace's netfilter and conntrack \
             hooks only for tables that need them, so with none, no packet there pays for netfilter or conntrack; \
             bridge-nf-call-iptables only matters to frames that cross a bridge):\n"
        );
        let _ = writeln!(
            md,
            "| arm | netfilter tables (host) | netfilter tables (container) | netfilter rules | kernel conntrack entries | bridge-nf-call-iptables | eBPF programs attached |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for (arm, f) in &self.fairness {
            let _ = writeln!(
                md,
                "| {arm} | {} | {} | {} | {} | {} | {} |",
                f.nf_tables_host,
                f.nf_tables_container,
                f.netfilter_rules,
                f.kernel_conntrack,
                f.bridge_nf_call_iptables,
                f.bpf_programs_attached
            );
        }
        let _ = writeln!(md);
    }

    fn profile_table(&self, md: &mut String) {
        if self.profile.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Where the eBPF datapath spends its time\n");
        let _ = writeln!(
            md,
            "Kernel run-time statistics of every attached program (TCX, XDP, TC filter), taken in a pass of its own after each path's measurements (request/response; the flood for the unsolicited path), so counting doesn't slow what the tables above measured:\n"
        );
        let _ = writeln!(md, "| arm | path | program | runs | ns per run |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for p in &self.profile {
            let per_run = if p.runs == 0 {
                0.0
            } else {
                p.run_time_ns as f64 / p.runs as f64
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {per_run:.0} |",
                p.arm, p.path, p.program, p.runs
            );
        }
        let _ = writeln!(md);
    }

    /// netd's programs timed one packet at a time (`programs`): a row per program and frame,
    /// a column per arm, and this build against the baseline where there is one.
    fn programs_table(&self, md: &mut String) {
        let rows: Vec<&Record> = self
            .records
            .iter()
            .filter(|r| r.metric == super::programs::RUN_NS)
            .collect();
        if rows.is_empty() {
            return;
        }
        let mut arms: Vec<&str> = rows.iter().map(|r| r.arm.as_str()).collect();
        arms.dedup();
        let _ = writeln!(
            md,
            "## netd's programs, one packet at a time
"
        );
        let _ = writeln!(
            md,
            "Each program's run time (ns) on one frame of a tracked flow, as the kernel's \
             BPF_PROG_TEST_RUN times it in the arm's own world: the median of single runs per \
             round, then the median (min–max) over rounds. A new flow's SYN comes from a new \
             source every run.\n"
        );
        let baseline = arms.contains(&super::arms::BASELINE);
        let _ = write!(md, "| program: frame |");
        for arm in &arms {
            let _ = write!(md, " {arm} |");
        }
        let _ = writeln!(md, "{}", if baseline { " ebpf/baseline |" } else { "" });
        let columns = arms.len() + 1 + usize::from(baseline);
        let _ = writeln!(md, "|{}", "---|".repeat(columns));
        let mut paths: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        paths.sort_unstable();
        paths.dedup();
        for path in paths {
            let _ = write!(md, "| {path} |");
            for arm in &arms {
                let cell = self.cell(arm, path, super::programs::RUN_NS, 1, 0);
                let _ = write!(md, " {cell} |");
            }
            if baseline {
                let ratio = self
                    .ratio_of(
                        "ebpf",
                        super::arms::BASELINE,
                        path,
                        super::programs::RUN_NS,
                        1,
                    )
                    .map(|r| format!("{r:.3}"))
                    .unwrap_or_else(|| "–".into());
                let _ = write!(md, " {ratio} |");
            }
            let _ = writeln!(md);
        }
        let _ = writeln!(md);
    }

    /// Bars of ebpf/ceiling, ebpf/routed and ebpf/iptables per path and metric, with the
    /// routed arm as the target line (1.0: as good as plain kernel routing).
    fn chart(&self, file: &Path) -> Result<()> {
        const AGAINST: [(&str, RGBColor); 3] =
            [("ceiling", BLUE), ("routed", GREEN), ("iptables", RED)];
        let mut bars = Vec::new();
        for (_, path) in super::Path::rows() {
            for metric in ["throughput", "rr_p50", "crr", "keepalive_rps"] {
                for (other, color) in AGAINST {
                    if let Some(r) = self.ratio(other, path, metric, 1) {
                        bars.push((format!("{path} {metric} vs {other}"), r, color));
                    }
                }
            }
        }
        let top = bars.iter().map(|b| b.1).fold(1.2, f64::max) * 1.1;
        let height = 80 + 22 * bars.len() as u32;
        let root = SVGBackend::new(file, (900, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "netd ebpf relative to the ceiling, routed and iptables (line: routed = 1.0, the target)",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(320)
            .build_cartesian_2d(0.0..top, (0..bars.len()).into_segmented())
            .map_err(plot_err)?;
        let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(bars.len())
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, r, color))| {
                Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*r, SegmentValue::Exact(i + 1)),
                    ],
                    color.mix(0.6).filled(),
                )
            }))
            .map_err(plot_err)?;
        // The target line: the routed arm, plain kernel routing.
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (1.0, SegmentValue::Exact(0)),
                    (1.0, SegmentValue::Exact(bars.len())),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
        Ok(())
    }
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("draw the chart: {e}")
}

/// The metrics of the paths table, in its order.
const PATH_METRICS: [&str; 6] = [
    "throughput",
    "throughput_one_core",
    "rr_p50",
    "rr_p99",
    "crr",
    "keepalive_rps",
];

/// A target of issue 16 for ebpf on one path and metric, over either family: a bound on its
/// ratio to the ceiling or to `routed` (plain kernel routing, the floor of the paths that
/// cross the host) of the same family.
struct Target {
    against: &'static str,
    /// Higher is better (ratio ≥ bound) or lower is (ratio ≤ bound).
    at_least: bool,
    bound: f64,
}

impl Target {
    fn of(path: super::Path, metric: &str) -> Option<Self> {
        let c2c = path == super::Path::ContainerToContainer;
        let published = path == super::Path::Published;
        let (against, at_least, bound) = match metric {
            "throughput" | "throughput_one_core" => ("ceiling", true, 0.98),
            "rr_p50" if c2c => ("ceiling", false, 1.03),
            "rr_p50" => ("routed", false, 1.00),
            "crr" if c2c => ("ceiling", true, 0.95),
            "crr" => ("routed", true, 1.00),
            "keepalive_rps" if published => ("routed", true, 1.10),
            _ => return None,
        };
        Some(Self {
            against,
            at_least,
            bound,
        })
    }

    /// "met (≥ 0.98 × ceiling)" or "MISSED (...)"; empty without the ratio it needs.
    fn judge(&self, to_ceiling: Option<f64>, to_routed: Option<f64>) -> String {
        let ratio = if self.against == "ceiling" {
            to_ceiling
        } else {
            to_routed
        };
        let Some(r) = ratio else {
            return String::new();
        };
        let met = if self.at_least {
            r >= self.bound
        } else {
            r <= self.bound
        };
        format!(
            "{} ({} {:.2} × {})",
            if met { "met" } else { "MISSED" },
            if self.at_least { "≥" } else { "≤" },
            self.bound,
            self.against
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(daemon_ms: &[(u32, Vec<f64>)]) -> Report {
        let mut records = Vec::new();
        for (n, runs) in daemon_ms {
            let key = |metric| ("ebpf".to_string(), "publish".to_string(), metric, *n);
            records.push(Record::from_samples((key("publish_ms"), vec![5.0])));
            records.push(Record::from_samples((
                key("publish_daemon_ms"),
                runs.clone(),
            )));
        }
        Report {
            date: now_utc(),
            quick: true,
            duration_s: 1.0,
            machine: Machine::probe(),
            fairness: BTreeMap::new(),
            profile: Vec::new(),
            skipped: Vec::new(),
            baseline: None,
            records,
        }
    }

    #[test]
    fn the_daemon_publish_is_judged_at_30000_only() {
        let md = report(&[(1, vec![0.2]), (30_000, vec![40.0, 0.3, 0.2])]).markdown();
        assert!(
            md.contains("at N=30000: 0.30 ms (met)"),
            "median judged at the largest N: {md}"
        );
        let md = report(&[(30_000, vec![1.5, 2.0, 1.2])]).markdown();
        assert!(md.contains("at N=30000: 1.50 ms (MISSED)"), "{md}");
        let md = report(&[(1, vec![0.2]), (10_000, vec![0.4])]).markdown();
        assert!(
            md.contains("at N=10000: 0.40 ms (not judged: N below 30,000)"),
            "{md}"
        );
    }

    #[test]
    fn ipv6_rows_sit_beside_ipv4_ones_judged_against_their_own_family() {
        use crate::bench::{Family, Path};
        let mut r = report(&[]);
        // IPv6 half as fast as IPv4 everywhere: its ratios are IPv4's.
        for family in Family::ALL {
            let scale = if family == Family::V6 { 0.5 } else { 1.0 };
            for (arm, gbps) in [
                ("ceiling", 20.0),
                ("routed", 19.0),
                ("redirect", 20.9),
                ("ebpf", 19.8),
            ] {
                for path in Path::ALL {
                    let key = (
                        arm.to_string(),
                        path.name_in(family).to_string(),
                        "throughput",
                        1,
                    );
                    r.records
                        .push(Record::from_samples((key, vec![gbps * scale])));
                }
            }
        }
        let md = r.markdown();
        let row = |path: &str| {
            md.lines()
                .position(|l| l.starts_with(&format!("| {path} | throughput")))
                .unwrap_or_else(|| panic!("no {path} row in {md}"))
        };
        let (v4, v6) = (row("outside->published"), row("outside->published (IPv6)"));
        assert!(v4 < v6 && v6 < row("container->outside"), "{md}");
        assert!(
            md.contains(
                "| outside->published (IPv6) | throughput (Gbit/s) | 10.00 (10.00–10.00) | \
                 9.50 (9.50–9.50) | 10.45 (10.45–10.45) | 9.90 (9.90–9.90) | 0.990 | 1.042 | \
                 1.100 | – | met (≥ 0.98 × ceiling) |"
            ),
            "{md}"
        );
    }

    #[test]
    fn the_baseline_table_compares_this_build_path_by_path() {
        let mut r = report(&[]);
        let path = crate::bench::Path::Published
            .name_in(crate::bench::Family::V4)
            .to_string();
        for (arm, runs) in [
            ("baseline", vec![30_000.0, 34_000.0, 32_000.0]),
            ("ebpf", vec![33_000.0]),
        ] {
            let key = (arm.to_string(), path.clone(), "crr", 1);
            r.records.push(Record::from_samples((key, runs)));
        }
        assert!(
            !r.markdown().contains("against the baseline"),
            "no baseline, no table"
        );
        r.baseline = Some("/old/netd".into());
        let md = r.markdown();
        assert!(md.contains("Baseline: `/old/netd`"), "{md}");
        assert!(
            md.contains(&format!(
                "| {path} | crr (conn/s) | 32000.00 (30000.00–34000.00) | 33000.00 (33000.00–33000.00) | 1.031 |"
            )),
            "{md}"
        );
    }

    #[test]
    fn the_redirect_table_sets_ebpf_between_routed_and_redirect_where_all_three_were_measured() {
        let mut r = report(&[]);
        let path = crate::bench::Path::Published
            .name_in(crate::bench::Family::V4)
            .to_string();
        let mut add = |arm: &str, metric, runs: Vec<f64>| {
            let key = (arm.to_string(), path.clone(), metric, 1);
            r.records.push(Record::from_samples((key, runs)));
        };
        add("routed", "crr_paired", vec![24_000.0, 25_000.0, 23_000.0]);
        add("ebpf", "crr_paired", vec![22_800.0]);
        // Keep-alive lacks a redirect figure: no row for it.
        add("routed", "keepalive_rps_paired", vec![130_000.0]);
        add("ebpf", "keepalive_rps_paired", vec![125_000.0]);
        assert!(
            !r.markdown().contains("`redirect` arm (median"),
            "no redirect, no table"
        );
        r.records.push(Record::from_samples((
            ("redirect".to_string(), path.clone(), "crr_paired", 1),
            vec![25_000.0, 26_000.0, 24_000.0],
        )));
        let md = r.markdown();
        assert!(
            md.contains(&format!(
                "| {path} | crr_paired (conn/s) | 24000 (23000–25000) | 25000 (24000–26000) | \
                 22800 (22800–22800) | 1.042 | 0.912 | 0.950 |"
            )),
            "{md}"
        );
        assert!(
            !md.contains(&format!("| {path} | keepalive_rps_paired")),
            "{md}"
        );
    }

    #[test]
    fn the_programs_table_has_a_row_per_program_and_frame_and_compares_with_the_baseline() {
        let mut r = report(&[]);
        let request = "uplink_ingress: published, request";
        for (arm, runs) in [
            ("baseline", vec![600.0, 580.0, 590.0]),
            ("ebpf", vec![531.0]),
        ] {
            let key = (
                arm.to_string(),
                request.to_string(),
                super::super::programs::RUN_NS,
                1,
            );
            r.records.push(Record::from_samples((key, runs)));
        }
        r.baseline = Some("/old/netd".into());
        let md = r.markdown();
        assert!(
            md.contains("| program: frame | baseline | ebpf | ebpf/baseline |"),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "| {request} | 590 (580–600) | 531 (531–531) | 0.900 |"
            )),
            "{md}"
        );
        assert!(
            !md.contains("This build against the baseline"),
            "no path measured, no paths' baseline table: {md}"
        );
    }

    #[test]
    fn targets_are_judged_on_the_ratios_within_pairs_where_there_are_paired_runs() {
        let mut r = report(&[]);
        let published = crate::bench::Path::Published
            .name_in(crate::bench::Family::V4)
            .to_string();
        let c2c = crate::bench::Path::ContainerToContainer
            .name_in(crate::bench::Family::V4)
            .to_string();
        for (arm, path, metric, runs) in [
            // Unpaired, ebpf is under routed; within pairs it is over.
            ("ebpf", &published, "throughput", vec![20.0]),
            ("ebpf", &published, "crr", vec![9_000.0]),
            ("routed", &published, "crr", vec![10_000.0]),
            (
                "ebpf",
                &published,
                "crr_paired",
                vec![9_000.0, 11_000.0, 10_100.0],
            ),
            (
                "routed",
                &published,
                "crr_paired",
                vec![8_900.0, 11_000.0, 10_000.0],
            ),
            ("ebpf", &published, "crr_to_routed", vec![1.011, 1.0, 1.01]),
            ("ebpf", &published, "keepalive_rps_paired", vec![100_000.0]),
            ("ebpf", &published, "keepalive_rps_to_routed", vec![1.05]),
            // Container to container is held to the ceiling.
            ("ebpf", &c2c, "throughput", vec![20.0]),
            ("ebpf", &c2c, "crr_paired", vec![9_400.0]),
            ("ebpf", &c2c, "crr_to_ceiling", vec![0.94]),
            ("ebpf", &c2c, "crr_to_routed", vec![1.2]),
        ] {
            let key = (arm.to_string(), path.clone(), metric, 1);
            r.records.push(Record::from_samples((key, runs)));
        }
        let md = r.markdown();
        let row = |path: &str, metric: &str| {
            md.lines()
                .find(|l| l.starts_with(&format!("| {path} | {metric} (")))
                .unwrap_or_else(|| panic!("no {path} {metric} row: {md}"))
                .to_string()
        };
        assert!(
            row(&published, "crr").ends_with("| met (≥ 1.00 × routed) (paired) |"),
            "{md}"
        );
        assert!(
            row(&published, "keepalive_rps").ends_with("| MISSED (≥ 1.10 × routed) (paired) |"),
            "{md}"
        );
        assert!(
            row(&c2c, "crr").ends_with("| MISSED (≥ 0.95 × ceiling) (paired) |"),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "| {published} | crr (conn/s) | ebpf | 10100 (9000–11000) | – | 1.010 (1.000–1.011) \
                 | met (≥ 1.00 × routed) |"
            )),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "| {published} | crr (conn/s) | routed | 10000 (8900–11000) | – | 1 |  |"
            )),
            "{md}"
        );
    }

    #[test]
    fn lost_connections_are_listed_under_the_paths_only_where_some_were_lost() {
        let mut r = report(&[]);
        let published = crate::bench::Path::Published
            .name_in(crate::bench::Family::V4)
            .to_string();
        let conntrack = crate::bench::conntrack::CONNTRACK.to_string();
        for (arm, path, metric, runs) in [
            ("ebpf", &published, "throughput", vec![20.0]),
            ("ebpf", &published, "crr_failed", vec![0.0, 2.0, 1.0]),
            ("routed", &published, "crr_failed", vec![0.0, 0.0, 0.0]),
            ("routed", &published, "crr_paired_failed", vec![0.0, 1.0]),
            // The conntrack table has a column of its own for these.
            ("iptables", &conntrack, "crr_failed", vec![5.0]),
        ] {
            let key = (arm.to_string(), path.clone(), metric, 1);
            r.records.push(Record::from_samples((key, runs)));
        }
        let md = r.markdown();
        assert!(
            md.contains(&format!("- ebpf, {published}, crr_failed: 3 over 3 runs")),
            "{md}"
        );
        assert!(
            md.contains(&format!(
                "- routed, {published}, crr_paired_failed: 1 over 2 runs"
            )),
            "{md}"
        );
        assert!(
            !md.contains(&format!("- routed, {published}, crr_failed")),
            "none lost, none listed: {md}"
        );
        assert!(!md.contains("- iptables,"), "{md}");
    }
}
