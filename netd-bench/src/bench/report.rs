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
        "throughput" => "Gbit/s",
        "rr_p50" | "rr_p99" | "rr_p50_paired" | "first_packet_us" => "us",
        "rr_p50_to_ceiling" => "ratio",
        "crr" => "conn/s",
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
        let e = self.find("ebpf", path, metric, n)?.median;
        let o = self.find(other, path, metric, n)?.median;
        Some(e / o)
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
        self.paired_latency_table(&mut md);
        self.unsolicited_table(&mut md);
        self.xdp_table(&mut md);
        self.scaling_table(&mut md);
        self.control_table(&mut md);
        self.fairness_table(&mut md);
        self.profile_table(&mut md);
        if !self.skipped.is_empty() {
            let _ = writeln!(md, "## Not measured\n");
            for why in &self.skipped {
                let _ = writeln!(md, "- {why}");
            }
        }
        md
    }

    fn paths_table(&self, md: &mut String) {
        if !self.records.iter().any(|r| r.metric == "throughput") {
            return;
        }
        let arms = self.arms();
        let _ = writeln!(md, "## Paths (median, min–max over runs)\n");
        let _ = write!(md, "| path | metric |");
        for a in &arms {
            let _ = write!(md, " {a} |");
        }
        let _ = writeln!(md, " ebpf/ceiling | ebpf/iptables | target |");
        let _ = writeln!(md, "|{}", "---|".repeat(arms.len() + 5));
        for path in super::Path::ALL.map(super::Path::name) {
            for metric in ["throughput", "rr_p50", "rr_p99", "crr"] {
                let _ = write!(md, "| {path} | {metric} ({}) |", unit_of(metric));
                for a in &arms {
                    let cell = self
                        .find(a, path, metric, 1)
                        .map(|r| format!("{:.2} ({:.2}–{:.2})", r.median, r.min, r.max))
                        .unwrap_or_else(|| "–".into());
                    let _ = write!(md, " {cell} |");
                }
                let fmt =
                    |r: Option<f64>| r.map(|r| format!("{r:.3}")).unwrap_or_else(|| "–".into());
                let to_ceiling = self.ratio("ceiling", path, metric, 1);
                // Latency's target is judged on the paired measurement when there is one.
                let target = match self.find("ebpf", path, "rr_p50_to_ceiling", 1) {
                    Some(paired) if metric == "rr_p50" => {
                        format!("{} (paired)", ceiling_target(metric, Some(paired.median)))
                    }
                    _ => ceiling_target(metric, to_ceiling).to_string(),
                };
                let _ = writeln!(
                    md,
                    " {} | {} | {target} |",
                    fmt(to_ceiling),
                    fmt(self.ratio("iptables", path, metric, 1)),
                );
            }
        }
        let _ = writeln!(md);
    }

    fn paired_latency_table(&self, md: &mut String) {
        if !self.records.iter().any(|r| r.metric == "rr_p50_to_ceiling") {
            return;
        }
        let _ = writeln!(md, "## Request/response p50 against the ceiling, paired\n");
        let _ = writeln!(
            md,
            "Every arm up at once, one-second runs alternating between the ceiling and the \
             arms (order rotating); each ratio is an arm's p50 over the ceiling's from the same \
             pair of runs (median, min–max over pairs). `routed` is plain kernel routing through \
             a host namespace, no NAT, no rules: from the outside to a container or back, a packet \
             crosses two veth pairs where the ceiling's crosses one; the floor of every datapath \
             on veth for those paths.\n"
        );
        let _ = writeln!(md, "| path | arm | p50 (us) | to ceiling | target |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for path in super::Path::ALL.map(super::Path::name) {
            for arm in self.arms() {
                let Some(p50) = self.find(arm, path, "rr_p50_paired", 1) else {
                    continue;
                };
                let (ratio, target) = match self.find(arm, path, "rr_p50_to_ceiling", 1) {
                    Some(r) => (
                        format!("{:.3} ({:.3}–{:.3})", r.median, r.min, r.max),
                        if arm == "ebpf" {
                            ceiling_target("rr_p50", Some(r.median))
                        } else {
                            ""
                        },
                    ),
                    None => ("1".into(), ""),
                };
                let _ = writeln!(
                    md,
                    "| {path} | {arm} | {:.2} ({:.2}–{:.2}) | {ratio} | {target} |",
                    p50.median, p50.min, p50.max
                );
            }
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
        let rows: Vec<(&str, &str, f64, f64)> = super::Path::ALL
            .map(super::Path::name)
            .into_iter()
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

    fn scaling_table(&self, md: &mut String) {
        let ns: Vec<u32> = {
            let mut ns: Vec<u32> = self
                .records
                .iter()
                .filter(|r| r.metric == "publish_ms")
                .map(|r| r.n_ports)
                .collect();
            ns.sort_unstable();
            ns.dedup();
            ns
        };
        if ns.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "## Scaling with published ports (to the last-added port)\n"
        );
        let _ = writeln!(
            md,
            "| N | arm | crr (conn/s) | first_packet_us | publish_ms |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for &n in &ns {
            for arm in self
                .arms()
                .into_iter()
                .filter(|a| super::arms::has_own_control_plane(a))
            {
                let get = |path: &str, metric: &str| {
                    self.find(arm, path, metric, n)
                        .map(|r| format!("{:.1}", r.median))
                        .unwrap_or_else(|| "–".into())
                };
                let _ = writeln!(
                    md,
                    "| {n} | {arm} | {} | {} | {} |",
                    get(super::SCALING, "crr"),
                    get(super::SCALING, "first_packet_us"),
                    get("publish", "publish_ms")
                );
            }
        }
        let crr_ratio = |n| self.ratio("iptables", super::SCALING, "crr", n);
        let fmt = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "–".into());
        let (first, last) = (ns[0], *ns.last().unwrap());
        let flat = match (
            self.find("ebpf", super::SCALING, "crr", first),
            self.find("ebpf", super::SCALING, "crr", last),
        ) {
            (Some(a), Some(b)) => format!("{:+.1}%", (b.median / a.median - 1.0) * 100.0),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "\nebpf/iptables new connections/s: {} at N={first}, {} at N={last} (targets ≥ 1.3 and ≥ 2 at 1 and 10,000); ebpf from N={first} to N={last}: {flat} (target within ±5%).\n",
            fmt(crr_ratio(first)),
            fmt(crr_ratio(last)),
        );
    }

    fn control_table(&self, md: &mut String) {
        if !self.records.iter().any(|r| r.metric == "create_ms") {
            return;
        }
        let _ = writeln!(md, "## Control plane (per container)\n");
        let _ = writeln!(
            md,
            "| arm | create p50 (ms) | create p99 (ms) | remove p50 (ms) | remove p99 (ms) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for arm in self
            .arms()
            .into_iter()
            .filter(|a| super::arms::has_own_control_plane(a))
        {
            let pct = |metric: &str, p: f64| {
                self.find(arm, "control", metric, 1)
                    .map(|r| {
                        let mut s = r.runs.clone();
                        s.sort_by(f64::total_cmp);
                        format!("{:.1}", percentile(&s, p))
                    })
                    .unwrap_or_else(|| "–".into())
            };
            let _ = writeln!(
                md,
                "| {arm} | {} | {} | {} | {} |",
                pct("create_ms", 50.0),
                pct("create_ms", 99.0),
                pct("remove_ms", 50.0),
                pct("remove_ms", 99.0)
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
             (IPv6 off in the sandbox, ip_forward on where routing is needed) and br_netfilter as the machine has it; \
             servers and clients are the same programs. What the host namespace of each arm held after its runs:\n"
        );
        let _ = writeln!(
            md,
            "| arm | netfilter rules | kernel conntrack entries | eBPF programs attached |"
        );
        let _ = writeln!(md, "|---|---|---|---|");
        for (arm, f) in &self.fairness {
            let _ = writeln!(
                md,
                "| {arm} | {} | {} | {} |",
                f.netfilter_rules, f.kernel_conntrack, f.bpf_programs_attached
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

    /// Bars of ebpf/ceiling and ebpf/iptables per path and metric.
    fn chart(&self, file: &Path) -> Result<()> {
        let mut bars = Vec::new();
        for path in super::Path::ALL.map(super::Path::name) {
            for metric in ["throughput", "rr_p50", "crr"] {
                for other in ["ceiling", "iptables"] {
                    if let Some(r) = self.ratio(other, path, metric, 1) {
                        bars.push((format!("{path} {metric} vs {other}"), r));
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
                "netd ebpf relative to the ceiling and to iptables (1.0 = equal)",
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
            .draw_series(bars.iter().enumerate().map(|(i, (_, r))| {
                let color = if i % 2 == 0 { BLUE } else { RED };
                Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(i)),
                        (*r, SegmentValue::Exact(i + 1)),
                    ],
                    color.mix(0.6).filled(),
                )
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
        Ok(())
    }
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("draw the chart: {e}")
}

/// The ebpf-vs-ceiling target for a metric: throughput ≥ 0.95, p50 latency ≤ 1.05.
fn ceiling_target(metric: &str, ratio: Option<f64>) -> &'static str {
    let Some(r) = ratio else { return "–" };
    match metric {
        "throughput" if r >= 0.95 => "met (≥ 0.95)",
        "throughput" => "MISSED (≥ 0.95)",
        "rr_p50" if r <= 1.05 => "met (≤ 1.05)",
        "rr_p50" => "MISSED (≤ 1.05)",
        _ => "",
    }
}
