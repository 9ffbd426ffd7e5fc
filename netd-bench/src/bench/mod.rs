//! The benchmark (`cargo xtask bench`): the eBPF datapath against iptables and the ceiling (a
//! plain veth pair), each arm in a fresh sandbox per round, rounds alternating the arms
//! (A B A B ...), medians and every run reported; the report lands in `target/bench/`. netd
//! is driven through its binary (`NETD_BIN`), as a user would.

mod arms;
mod conntrack;
mod daemon;
pub mod docker;
mod keepalive;
mod memory;
mod programs;
pub mod report;
mod scale;
mod soak;
mod tools;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use serde::Serialize;

use arms::{Fairness, World};
use report::{Machine, Record, Report};
use tools::{Endpoint, Failures};

pub use arms::ARMS;

/// What a run measures and for how long.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    pub out: PathBuf,
    pub arms: Vec<String>,
    /// Rounds per arm (each arm measured once per round).
    pub runs: usize,
    /// One part of the benchmark instead of all of it.
    pub only: Option<Part>,
    /// Another netd binary (an earlier build) to measure beside this one, as the arm
    /// `baseline`: the paths and the paired latency, for a before/after in one run.
    pub baseline: Option<PathBuf>,
}

/// The parts of the benchmark that can run on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The control plane: container create and remove.
    Setup,
    /// Request/response p50, connections and keep-alive requests per second against the
    /// ceiling and routed, in paired runs.
    Paired,
    /// Conntrack under pressure: the table 90% full, a SYN flood beside a flow.
    Conntrack,
    /// The traffic paths of every arm, both families, `--runs` rounds, then the paired runs:
    /// the results table without scaling, control plane, conntrack or memory.
    Paths,
    /// netd's eBPF programs timed one packet at a time under BPF_PROG_TEST_RUN (ebpf and
    /// baseline), `--runs` rounds.
    Programs,
}

/// The traffic paths every arm is measured on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Path {
    /// From the outside namespace to a container's published port.
    Published,
    /// From a container to the outside (masquerade).
    Masquerade,
    /// From one container to another on the same network.
    ContainerToContainer,
}

impl Path {
    pub const ALL: [Path; 3] = [
        Path::Published,
        Path::Masquerade,
        Path::ContainerToContainer,
    ];

    /// The path's name over `family`: the report's rows and the records' `path`. IPv4's
    /// names are those of the runs before IPv6 rows existed, so their records stay comparable.
    pub fn name_in(self, family: Family) -> &'static str {
        match (self, family) {
            (Path::Published, Family::V4) => "outside->published",
            (Path::Masquerade, Family::V4) => "container->outside",
            (Path::ContainerToContainer, Family::V4) => "container->container",
            (Path::Published, Family::V6) => "outside->published (IPv6)",
            (Path::Masquerade, Family::V6) => "container->outside (IPv6)",
            (Path::ContainerToContainer, Family::V6) => "container->container (IPv6)",
        }
    }

    /// The report's rows, each path's IPv6 row right after its IPv4 one, with their names.
    pub fn rows() -> impl Iterator<Item = (Path, &'static str)> {
        Self::ALL
            .into_iter()
            .flat_map(|path| Family::ALL.map(|family| (path, path.name_in(family))))
    }
}

/// The address family a world is built for and its paths are measured over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// `what` as measured over this family: IPv4's as it is, IPv6's marked (as the paths'
    /// names are).
    pub fn label(self, what: &str) -> String {
        match self {
            Family::V4 => what.to_string(),
            Family::V6 => format!("{what} (IPv6)"),
        }
    }

    /// The families `arm` is measured over: IPv4 alone where [`ipv4_only_because`] says why.
    fn of_arm(arm: &str) -> &'static [Family] {
        if ipv4_only_because(arm).is_some() {
            &[Family::V4]
        } else {
            &Family::ALL
        }
    }
}

/// Why `arm` has no IPv6 rows (the report's "Not measured" line), if it has none.
fn ipv4_only_because(arm: &str) -> Option<&'static str> {
    match arm {
        "docker" => Some(
            "docker over IPv6: dockerd 20.10 does IPv6 NAT (ip6tables) only as an experimental \
             option, off in the arm as by default; without it a published port's IPv6 goes \
             through docker-proxy and nothing masquerades IPv6 out, so no IPv6 datapath to compare",
        ),
        "ebpf-xdp" => Some(
            "ebpf-xdp over IPv6: the uplink's XDP program parses IPv4 only and passes IPv6 on to \
             TC untouched, so its IPv6 rows would be ebpf's",
        ),
        _ => None,
    }
}

struct Plan {
    secs: u32,
    crr_threads: usize,
    /// Published port counts every arm with a control plane is scaled to.
    port_counts: Vec<u32>,
    /// Further port counts for ebpf alone (past what one host address holds).
    ebpf_port_counts: Vec<u32>,
    /// Ports published on one host address; past that, on the next.
    ports_per_address: u32,
    /// Container counts created and removed one by one.
    container_counts: Vec<usize>,
    /// Containers created at once in the start storm.
    storm: usize,
    /// Entries of netd's conntrack table in the conntrack measurement (filled to 90%).
    conntrack_max: u32,
    /// Pairs of runs per arm, path and measurement in the paired runs.
    pairs: usize,
}

impl Plan {
    /// The plan for a full or quick run; `NETD_BENCH_PORTS`, `NETD_BENCH_EBPF_PORTS`,
    /// `NETD_BENCH_CONTAINERS` (comma-separated counts) and `NETD_BENCH_STORM` scale it down
    /// (or up) without touching the rest.
    fn new(quick: bool) -> Result<Self> {
        let mut plan = if quick {
            Self {
                secs: 1,
                crr_threads: 2,
                port_counts: vec![1, 100],
                // Two host addresses: the several-address path, at smoke size.
                ebpf_port_counts: vec![1_000],
                ports_per_address: 600,
                container_counts: vec![10],
                storm: 10,
                conntrack_max: 262_144,
                pairs: 3,
            }
        } else {
            Self {
                secs: 3,
                crr_threads: 2,
                port_counts: vec![1, 100, 1_000, 10_000, 30_000],
                ebpf_port_counts: vec![60_000, 100_000],
                ports_per_address: 25_000,
                container_counts: vec![100, 1_000],
                storm: 100,
                conntrack_max: 524_288,
                pairs: 15,
            }
        };
        if let Some(v) = env_counts("NETD_BENCH_PORTS")? {
            plan.port_counts = v;
        }
        if let Some(v) = env_counts("NETD_BENCH_EBPF_PORTS")? {
            plan.ebpf_port_counts = v;
        }
        if let Some(v) = env_counts("NETD_BENCH_CONTAINERS")? {
            plan.container_counts = v;
        }
        if let Some(v) = env_counts("NETD_BENCH_STORM")? {
            plan.storm = v.first().copied().unwrap_or(plan.storm);
        }
        Ok(plan)
    }

    /// The port counts `arm` is scaled to.
    fn port_counts_of(&self, arm: &str) -> Vec<u32> {
        let mut counts = self.port_counts.clone();
        if arm == "ebpf" {
            counts.extend(&self.ebpf_port_counts);
        }
        counts
    }
}

/// Comma-separated counts from the environment variable `var`, if set.
fn env_counts<T: std::str::FromStr>(var: &str) -> Result<Option<Vec<T>>> {
    let Ok(text) = std::env::var(var) else {
        return Ok(None);
    };
    text.split(',')
        .map(|n| {
            n.trim()
                .replace('_', "")
                .parse()
                .map_err(|_| anyhow::anyhow!("{var}={text}: {n:?} is not a count"))
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// The arms the scaling and control-plane measurements run for `arm`: iptables with both
/// backends (legacy and nft), the others as they are.
fn scaled_arms(arm: &str) -> Vec<String> {
    if arm == "iptables" {
        vec!["iptables-legacy".into(), "iptables-nft".into()]
    } else {
        vec![arm.to_string()]
    }
}

/// Samples keyed by (arm, path, metric, n_ports).
type Samples = BTreeMap<(String, String, &'static str, u32), Vec<f64>>;

/// Published-port scaling of one arm, every count of the plan, `runs` rounds each.
async fn measure_port_scaling(
    arm: &str,
    plan: &Plan,
    runs: usize,
    samples: &mut Samples,
    skipped: &mut Vec<String>,
) -> Result<()> {
    for n in plan.port_counts_of(arm) {
        if arm == "docker" && n > DOCKER_MAX_PORTS {
            skip(
                skipped,
                format!(
                    "docker at {n} ports: Docker starts one docker-proxy process per published port"
                ),
            );
            continue;
        }
        for round in 1..=runs {
            progress(&format!(
                "scaling: {arm}: {n} published ports, round {round}/{runs}"
            ))?;
            let measured = scale::measure_ports(arm, n, plan, samples)
                .await
                .with_context(|| format!("{arm} at {n} ports"));
            match measured {
                // Past one address's worth, a failure is a limit of netd's, reported.
                Err(e) if plan.ebpf_port_counts.contains(&n) => {
                    skip(skipped, format!("{e:#}"));
                    break;
                }
                other => other?,
            }
        }
    }
    Ok(())
}

/// Containers created and removed one by one at each count of the plan, and the start storm.
async fn measure_control_plane(
    arm: &str,
    plan: &Plan,
    samples: &mut Samples,
    skipped: &mut Vec<String>,
) -> Result<()> {
    for &count in &plan.container_counts {
        if arm == "docker" && count > DOCKER_MAX_CONTAINERS {
            skip(
                skipped,
                format!("docker at {count} containers: about a second each, create and remove"),
            );
            continue;
        }
        progress(&format!("control plane: {arm}: {count} containers"))?;
        scale::measure_containers(arm, count, samples)
            .await
            .with_context(|| format!("{arm}, {count} containers"))?;
    }
    if arm != "docker" {
        progress(&format!(
            "control plane: {arm}: start storm of {}",
            plan.storm
        ))?;
        scale::measure_storm(arm, plan.storm, samples)
            .await
            .with_context(|| format!("{arm}, start storm"))?;
    }
    Ok(())
}

/// Conntrack under pressure (`conntrack`): on ebpf, its table 90% full and a SYN flood; on
/// iptables, the SYN flood and the kernel conntrack's memory (its table is machine-wide, so
/// it is not filled). Not on Docker (the iptables arm's rules, plus a proxy).
async fn measure_conntrack(
    arm: &str,
    plan: &Plan,
    round: usize,
    samples: &mut Samples,
) -> Result<()> {
    if arm == "docker" {
        return Ok(());
    }
    progress(&format!("conntrack: {arm}, round {round}"))?;
    let done = if arm == "ebpf" {
        conntrack::measure(arm, plan, samples).await
    } else {
        conntrack::measure_flood_only(arm, plan, samples).await
    };
    done.with_context(|| format!("{arm}, conntrack"))
}

/// Docker takes about half a second per container; past this many the arm is not measured.
const DOCKER_MAX_CONTAINERS: usize = 100;

/// Set by SIGINT or SIGTERM: the benchmark stops at its next step and unwinds, which removes
/// every sandbox, server and dockerd it made (killed outright, it would leave them behind).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn catch_interrupts() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.context("catch SIGINT and SIGTERM")?;
    }
    Ok(())
}

/// Reports the next step, or stops the benchmark there if it was interrupted.
fn progress(what: &str) -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted: removing what the benchmark made");
    }
    eprintln!("bench: {what}");
    Ok(())
}

pub async fn run(mut opts: Options) -> Result<()> {
    catch_interrupts()?;
    let plan = Plan::new(opts.quick)?;
    let started = Instant::now();
    let mut skipped = Vec::new();
    if opts.arms.iter().any(|a| a == "docker")
        && let Err(e) = docker::check_installed()
    {
        skip(&mut skipped, format!("docker: {e:#}"));
        opts.arms.retain(|a| a != "docker");
    }
    if let Some(bin) = &opts.baseline {
        arms::set_baseline(bin.clone())?;
        if !opts.arms.iter().any(|a| a == arms::BASELINE) {
            // Right after ebpf, so the two alternate as closely as the order allows.
            let at = opts
                .arms
                .iter()
                .position(|a| a == "ebpf")
                .map_or(0, |i| i + 1);
            opts.arms.insert(at, arms::BASELINE.to_string());
        }
    }
    let mut samples = Samples::new();
    let mut fairness = BTreeMap::new();
    let mut profile = Profile::new();
    let part = |p: Part| opts.only.is_none_or(|only| only == p);
    let rounds = match opts.only {
        None | Some(Part::Paths) => opts.runs,
        Some(_) => 0,
    };
    if rounds > 0 {
        for why in opts.arms.iter().filter_map(|a| ipv4_only_because(a)) {
            skip(&mut skipped, why.to_string());
        }
    }
    for round in 1..=rounds {
        for arm in &opts.arms {
            for &family in Family::of_arm(arm) {
                let at = format!("round {round}/{}: {arm}, {}", opts.runs, family.name());
                let held = measure_world(arm, family, &at, &plan, &mut samples, &mut profile)
                    .await
                    .with_context(|| format!("{arm}, {}", family.name()))?;
                fairness.insert(family.label(arm), held);
            }
        }
    }
    if part(Part::Paired) || opts.only == Some(Part::Paths) {
        measure_paired(&opts.arms, &plan, &mut samples).await?;
    }
    if part(Part::Programs) {
        measure_programs(&opts, &mut samples).await?;
    }
    for arm in opts.arms.iter().filter(|a| arms::has_own_control_plane(a)) {
        if opts.only.is_none() {
            for scaled in scaled_arms(arm) {
                measure_port_scaling(&scaled, &plan, opts.runs, &mut samples, &mut skipped).await?;
            }
        }
        if part(Part::Setup) {
            measure_control_plane(arm, &plan, &mut samples, &mut skipped).await?;
        }
        if part(Part::Conntrack) {
            for round in 1..=opts.runs {
                measure_conntrack(arm, &plan, round, &mut samples).await?;
            }
        }
    }
    let report = Report {
        date: report::now_utc(),
        quick: opts.quick,
        duration_s: started.elapsed().as_secs_f64(),
        machine: Machine::probe(),
        fairness,
        profile: profile
            .into_iter()
            .map(|((arm, path, program), (runs, ns))| report::Profile {
                arm,
                path,
                program,
                runs,
                run_time_ns: ns,
            })
            .collect(),
        skipped,
        baseline: opts.baseline.as_ref().map(|b| b.display().to_string()),
        records: samples.into_iter().map(Record::from_samples).collect(),
    };
    report.write(&opts.out)?;
    eprintln!("bench: report written to {}", opts.out.display());
    println!("{}", report.markdown());
    Ok(())
}

/// netd's programs timed one packet at a time (`programs`), on ebpf and the baseline: each
/// arm's world built once, the rounds alternating the arms.
async fn measure_programs(opts: &Options, samples: &mut Samples) -> Result<()> {
    let mut subjects = Vec::new();
    for arm in opts
        .arms
        .iter()
        .filter(|a| ["ebpf", arms::BASELINE].contains(&a.as_str()))
    {
        subjects.push(
            programs::Subject::build(arm)
                .await
                .with_context(|| format!("programs, {arm}"))?,
        );
    }
    if subjects.is_empty() && opts.only == Some(Part::Programs) {
        bail!(
            "programs: no eBPF arm of netd's in --arms {} (ebpf, or baseline with --baseline)",
            opts.arms.join(",")
        );
    }
    let sizes = programs::Sizes::new(opts.quick);
    for round in 1..=opts.runs {
        for subject in &subjects {
            subject.measure(&sizes, round, samples)?;
        }
    }
    Ok(())
}

/// The soak (`soak` module): `minutes` of churn beside long-lived flows; report in `out`.
pub async fn soak(minutes: f64, out: &std::path::Path) -> Result<()> {
    catch_interrupts()?;
    soak::run(minutes, out).await
}

/// Builds `arm`'s world for `family` and measures it: the three paths, each profiled, and the
/// unsolicited flood where the world has one; returns what its host held after the runs.
/// `at` names the step in the progress lines.
async fn measure_world(
    arm: &str,
    family: Family,
    at: &str,
    plan: &Plan,
    samples: &mut Samples,
    profile: &mut Profile,
) -> Result<Fairness> {
    progress(&format!("{at}: building a fresh sandbox"))?;
    let world = World::build(arm, &prefix(arm), family)
        .await
        .context("build the sandbox")?;
    for path in Path::ALL {
        let name = path.name_in(family);
        progress(&format!("{at}: {name}"))?;
        let ep = world.endpoint(path);
        measure_path(&ep, arm, name, plan, samples).with_context(|| name.to_string())?;
        profile_while(profile, &world, arm, name, || {
            tools::rr_latency(&ep, plan.secs).map(drop)
        })?;
    }
    if let Some(ep) = world.unsolicited() {
        progress(&format!("{at}: {UNSOLICITED}"))?;
        measure_unsolicited(&ep, arm, plan, samples).context(UNSOLICITED)?;
        profile_while(profile, &world, arm, UNSOLICITED, || {
            let target = SocketAddr::new(ep.target, tools::FLOOD_PORT);
            tools::flood(&ep.client_ns, target, plan.secs).map(drop)
        })?;
    }
    world.fairness()
}

/// The arms the paired runs compare with the ceiling.
const PAIRED_ARMS: [&str; 4] = ["routed", "redirect", "ebpf", arms::BASELINE];

/// A measurement of the paired runs, one second long per arm and pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paired {
    /// Request/response p50.
    Latency,
    /// New connections per second.
    Connections,
    /// Keep-alive requests per second.
    KeepAlive,
}

impl Paired {
    pub const ALL: [Paired; 3] = [Paired::Latency, Paired::Connections, Paired::KeepAlive];

    /// The measurements paired on `path`: those with a target there.
    fn on(path: Path) -> &'static [Paired] {
        if path == Path::Published {
            &[Paired::Latency, Paired::Connections, Paired::KeepAlive]
        } else {
            &[Paired::Latency, Paired::Connections]
        }
    }

    /// The paired measurement of the paths table's `metric`, if it has one.
    pub fn of(metric: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.metric() == metric)
    }

    /// The paths table's metric it is paired runs of.
    pub fn metric(self) -> &'static str {
        match self {
            Paired::Latency => "rr_p50",
            Paired::Connections => "crr",
            Paired::KeepAlive => "keepalive_rps",
        }
    }

    /// The metric each arm's runs are recorded as.
    pub fn runs(self) -> &'static str {
        match self {
            Paired::Latency => "rr_p50_paired",
            Paired::Connections => "crr_paired",
            Paired::KeepAlive => "keepalive_rps_paired",
        }
    }

    /// The metric an arm's ratio to `against` ("ceiling" or "routed") within each pair is
    /// recorded as.
    pub fn ratio(self, against: &str) -> &'static str {
        match (self, against == "ceiling") {
            (Paired::Latency, true) => "rr_p50_to_ceiling",
            (Paired::Latency, false) => "rr_p50_to_routed",
            (Paired::Connections, true) => "crr_to_ceiling",
            (Paired::Connections, false) => "crr_to_routed",
            (Paired::KeepAlive, true) => "keepalive_rps_to_ceiling",
            (Paired::KeepAlive, false) => "keepalive_rps_to_routed",
        }
    }

    /// One second of it on `ep`: the figure, and the connections that got no answer.
    fn measure(self, ep: &Endpoint, plan: &Plan) -> Result<(f64, u64)> {
        match self {
            Paired::Latency => tools::rr_latency(ep, 1).map(|(p50, _)| (p50, 0)),
            Paired::Connections => {
                let (cps, lost) = tools::crr_with(ep, 1, plan.crr_threads, Failures::Count)?;
                anyhow::ensure!(cps > 0.0, "no connection completed");
                Ok((cps, lost))
            }
            Paired::KeepAlive => keepalive::request_rate(ep, 1).map(|rps| (rps, 0)),
        }
    }
}

/// Request/response p50, connections per second and (outside → published) keep-alive
/// requests per second of each arm against the ceiling and `routed`, paired: every arm's
/// world is up at once, and one-second runs alternate between the ceiling and the arms (order
/// rotating), so each ratio compares runs seconds apart. Latency and rates on a shared VM
/// drift by a third over minutes; arms measured a round apart can't be held to a 5% target,
/// pairs can. Over each family in turn, IPv4's worlds then IPv6's. Records every arm's runs
/// ([`Paired::runs`]), per pair its ratios to the ceiling and to routed
/// ([`Paired::ratio`]), and connections lost (`crr_paired_failed`).
async fn measure_paired(arms: &[String], plan: &Plan, samples: &mut Samples) -> Result<()> {
    let compared: Vec<&str> = PAIRED_ARMS
        .into_iter()
        .filter(|a| arms.iter().any(|b| b == a))
        .collect();
    if compared.is_empty() || !arms.iter().any(|a| a == "ceiling") {
        return Ok(());
    }
    for family in Family::ALL {
        measure_paired_over(family, &compared, plan, samples)
            .await
            .with_context(|| format!("paired runs, {}", family.name()))?;
    }
    Ok(())
}

/// [`measure_paired`] over one family: the ceiling's and the `compared` arms' worlds of
/// `family` up at once.
async fn measure_paired_over(
    family: Family,
    compared: &[&str],
    plan: &Plan,
    samples: &mut Samples,
) -> Result<()> {
    let mut worlds = Vec::new();
    for arm in std::iter::once("ceiling").chain(compared.iter().copied()) {
        progress(&format!(
            "paired runs: {arm}, {}: building a fresh sandbox",
            family.name()
        ))?;
        let world = World::build(arm, &prefix(arm), family)
            .await
            .with_context(|| format!("{arm}: build the sandbox"))?;
        worlds.push((arm, world));
    }
    for path in Path::ALL {
        let name = path.name_in(family);
        for pair in 0..plan.pairs {
            progress(&format!(
                "paired runs: {name}: pair {}/{}",
                pair + 1,
                plan.pairs
            ))?;
            for &what in Paired::on(path) {
                let mut value = BTreeMap::new();
                for i in 0..worlds.len() {
                    let (arm, world) = &worlds[(pair + i) % worlds.len()];
                    let (v, lost) = what
                        .measure(&world.endpoint(path), plan)
                        .with_context(|| format!("{arm}, {name}, {}", what.metric()))?;
                    record(samples, arm, name, what.runs(), 1, v);
                    if what == Paired::Connections {
                        record(samples, arm, name, "crr_paired_failed", 1, lost as f64);
                    }
                    value.insert(*arm, v);
                }
                for arm in compared {
                    for against in ["ceiling", "routed"] {
                        if let Some(base) = value.get(against).filter(|_| arm != &against) {
                            record(
                                samples,
                                arm,
                                name,
                                what.ratio(against),
                                1,
                                value[arm] / base,
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Run counts and times per (arm, path, program).
type Profile = BTreeMap<(String, String, String), (u64, u64)>;

/// Adds to `profile` what each program of `world` ran while `load` ran, with the kernel's
/// run-time statistics on. They are on only here, in a pass of its own after the path's
/// measurements: counting costs every program run two clock reads, which the measured
/// latencies must not pay (the other arms run no program to pay them).
fn profile_while(
    profile: &mut Profile,
    world: &World,
    arm: &str,
    path: &str,
    load: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enable BPF run-time stats")?;
    let before = arms::program_stats(&world.datapath_ns())?;
    if before.is_empty() {
        // No program to profile (the ceiling, iptables, Docker).
        return Ok(());
    }
    load().with_context(|| format!("{arm}, {path}, profiled"))?;
    let after = arms::program_stats(&world.datapath_ns())?;
    for a in after {
        let b = before
            .iter()
            .find(|b| b.program == a.program && b.interface == a.interface);
        let runs = a.runs - b.map_or(0, |b| b.runs);
        let ns = a.run_time_ns - b.map_or(0, |b| b.run_time_ns);
        let entry = profile
            .entry((arm.to_string(), path.to_string(), a.program.clone()))
            .or_default();
        entry.0 += runs;
        entry.1 += ns;
    }
    Ok(())
}

/// The path name of the unsolicited flood: outside straight to a container, on a port
/// nothing publishes.
pub const UNSOLICITED: &str = "outside->container-unsolicited";

/// Floods a container with unsolicited datagrams (`tools::flood`): records how many per
/// second one sending core gets out (higher: the drop costs less), and what share of them
/// got into the container (0 when the arm drops them all).
fn measure_unsolicited(ep: &Endpoint, arm: &str, plan: &Plan, samples: &mut Samples) -> Result<()> {
    let before = tools::udp_no_ports(&ep.server_ns)?;
    let target = SocketAddr::new(ep.target, tools::FLOOD_PORT);
    let pps = tools::flood(&ep.client_ns, target, plan.secs)?;
    let leaked = tools::udp_no_ports(&ep.server_ns)? - before;
    record(samples, arm, UNSOLICITED, "flood_pps", 1, pps);
    let sent = pps * f64::from(plan.secs);
    record(
        samples,
        arm,
        UNSOLICITED,
        "leaked_pct",
        1,
        100.0 * leaked as f64 / sent,
    );
    Ok(())
}

/// The path name of the scaling measurements: outside to the last-published port.
pub const SCALING: &str = "outside->last-published";

/// Docker runs a proxy process per published port; past this many the arm is not measured.
const DOCKER_MAX_PORTS: u32 = 100;

fn skip(skipped: &mut Vec<String>, why: String) {
    eprintln!("bench: skipped: {why}");
    skipped.push(why);
}

fn prefix(arm: &str) -> String {
    format!("nb{}{arm}", std::process::id())
}

fn record(samples: &mut Samples, arm: &str, path: &str, metric: &'static str, n: u32, v: f64) {
    samples
        .entry((arm.to_string(), path.to_string(), metric, n))
        .or_default()
        .push(v);
}

/// Measures the path named `path` (its endpoints `ep`) on `arm`, every metric once.
fn measure_path(
    ep: &Endpoint,
    arm: &str,
    path: &str,
    plan: &Plan,
    samples: &mut Samples,
) -> Result<()> {
    let gbps = tools::throughput(ep, plan.secs).context("throughput")?;
    record(samples, arm, path, "throughput", 1, gbps);
    let gbps = tools::throughput_on_one_core(ep, plan.secs).context("throughput on one core")?;
    record(samples, arm, path, "throughput_one_core", 1, gbps);
    let (p50, p99) = tools::rr_latency(ep, plan.secs).context("latency")?;
    record(samples, arm, path, "rr_p50", 1, p50);
    record(samples, arm, path, "rr_p99", 1, p99);
    // A connection lost on the way (1 s without an answer: the SYN's first retransmission)
    // is counted and reported rather than ending the whole run.
    let (cps, failed) = tools::crr_with(ep, plan.secs, plan.crr_threads, Failures::Count)
        .context("connections per second")?;
    anyhow::ensure!(cps > 0.0, "connections per second: no connection completed");
    record(samples, arm, path, "crr", 1, cps);
    record(samples, arm, path, "crr_failed", 1, failed as f64);
    let rps = keepalive::request_rate(ep, plan.secs).context("keep-alive requests per second")?;
    record(samples, arm, path, "keepalive_rps", 1, rps);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_path_has_its_ipv6_row_right_after_its_ipv4_one() {
        let names: Vec<&str> = Path::rows().map(|(_, name)| name).collect();
        assert_eq!(
            names,
            [
                "outside->published",
                "outside->published (IPv6)",
                "container->outside",
                "container->outside (IPv6)",
                "container->container",
                "container->container (IPv6)",
            ]
        );
        assert!(Path::rows().all(|(path, name)| name.starts_with(path.name_in(Family::V4))));
    }

    #[test]
    fn docker_and_ebpf_xdp_alone_are_measured_over_ipv4_only() {
        for arm in ARMS {
            let ipv4_only = matches!(*arm, "docker" | "ebpf-xdp");
            let families: &[Family] = if ipv4_only {
                &[Family::V4]
            } else {
                &Family::ALL
            };
            assert_eq!(Family::of_arm(arm), families, "{arm}");
            assert_eq!(ipv4_only_because(arm).is_some(), ipv4_only, "{arm}");
        }
    }
}
