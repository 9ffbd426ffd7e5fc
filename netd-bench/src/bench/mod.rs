//! The benchmark (`cargo xtask bench`): the eBPF datapath against iptables and the ceiling (a
//! plain veth pair), each arm in a fresh sandbox per round, rounds alternating the arms
//! (A B A B ...), medians and every run reported; the report lands in `target/bench/`. netd
//! is driven through its binary (`NETD_BIN`), as a user would.

mod arms;
pub mod docker;
pub mod report;
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

use arms::{Control, Publish, World};
use netd_testkit::sandbox::HOST_ADDR;
use report::{Machine, Record, Report};
use tools::Endpoint;

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
}

/// The parts of the benchmark that can run on their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The control plane: container create and remove.
    Setup,
    /// Request/response latency against the ceiling, paired (`measure_paired_latency`).
    Latency,
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

    pub fn name(self) -> &'static str {
        match self {
            Path::Published => "outside->published",
            Path::Masquerade => "container->outside",
            Path::ContainerToContainer => "container->container",
        }
    }
}

struct Plan {
    secs: u32,
    crr_threads: usize,
    port_counts: Vec<u32>,
    containers: usize,
    /// Pairs of request/response runs per arm and path in the paired latency measurement.
    latency_pairs: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                secs: 1,
                crr_threads: 2,
                port_counts: vec![1, 100],
                containers: 10,
                latency_pairs: 3,
            }
        } else {
            Self {
                secs: 3,
                crr_threads: 2,
                port_counts: vec![1, 100, 1_000, 10_000],
                containers: 100,
                latency_pairs: 15,
            }
        }
    }
}

/// Samples keyed by (arm, path, metric, n_ports).
type Samples = BTreeMap<(String, String, &'static str, u32), Vec<f64>>;

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
    let plan = Plan::new(opts.quick);
    let started = Instant::now();
    let mut skipped = Vec::new();
    if opts.arms.iter().any(|a| a == "docker")
        && let Err(e) = docker::check_installed()
    {
        skip(&mut skipped, format!("docker: {e:#}"));
        opts.arms.retain(|a| a != "docker");
    }
    let mut samples = Samples::new();
    let mut fairness = BTreeMap::new();
    let mut profile = Profile::new();
    let part = |p: Part| opts.only.is_none_or(|only| only == p);
    let rounds = if opts.only.is_none() { opts.runs } else { 0 };
    for round in 1..=rounds {
        for arm in &opts.arms {
            progress(&format!(
                "round {round}/{}: {arm}: building a fresh sandbox",
                opts.runs
            ))?;
            let world = World::build(arm, &prefix(arm)).await?;
            for path in Path::ALL {
                progress(&format!(
                    "round {round}/{}: {arm}: {}",
                    opts.runs,
                    path.name()
                ))?;
                let ep = world.endpoint(path);
                measure_path(&ep, arm, path, &plan, &mut samples)
                    .with_context(|| format!("{arm}, {}", path.name()))?;
                profile_while(&mut profile, &world, arm, path.name(), || {
                    tools::rr_latency(&ep, plan.secs).map(drop)
                })?;
            }
            if let Some(ep) = world.unsolicited() {
                progress(&format!(
                    "round {round}/{}: {arm}: {UNSOLICITED}",
                    opts.runs
                ))?;
                measure_unsolicited(&ep, arm, &plan, &mut samples)
                    .with_context(|| format!("{arm}, {UNSOLICITED}"))?;
                profile_while(&mut profile, &world, arm, UNSOLICITED, || {
                    let target = SocketAddr::from((ep.target, tools::FLOOD_PORT));
                    tools::flood(&ep.client_ns, target, plan.secs).map(drop)
                })?;
            }
            fairness.insert(arm.clone(), world.fairness()?);
        }
    }
    if part(Part::Latency) {
        measure_paired_latency(&opts.arms, &plan, &mut samples).await?;
    }
    for arm in opts.arms.iter().filter(|a| arms::has_own_control_plane(a)) {
        for &n in plan.port_counts.iter().filter(|_| opts.only.is_none()) {
            if arm == "docker" && n > DOCKER_MAX_PORTS {
                skip(
                    &mut skipped,
                    format!(
                        "docker at {n} ports: Docker starts one docker-proxy process per published port"
                    ),
                );
                continue;
            }
            for round in 1..=opts.runs {
                progress(&format!(
                    "scaling: {arm}: {n} published ports, round {round}/{}",
                    opts.runs
                ))?;
                measure_scaling(arm, n, &plan, &mut samples)
                    .await
                    .with_context(|| format!("{arm}, {n} ports"))?;
            }
        }
        if part(Part::Setup) {
            progress(&format!(
                "control plane: {arm}: {} containers",
                plan.containers
            ))?;
            measure_setup(arm, plan.containers, &mut samples).await?;
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
        records: samples.into_iter().map(Record::from_samples).collect(),
    };
    report.write(&opts.out)?;
    eprintln!("bench: report written to {}", opts.out.display());
    println!("{}", report.markdown());
    Ok(())
}

/// The arms the paired latency measurement compares with the ceiling.
const PAIRED_ARMS: [&str; 2] = ["routed", "ebpf"];

/// Request/response p50 of each arm against the ceiling, paired: every arm's world is up at
/// once, and short runs alternate between the ceiling and the arms (order rotating), so each
/// ratio compares runs seconds apart. Latency on a shared VM drifts by a third over minutes;
/// arms measured a round apart can't be held to a 5% target, pairs can. Records every
/// arm's p50s (`rr_p50_paired`) and, per pair, its ratio to the ceiling's
/// (`rr_p50_to_ceiling`).
async fn measure_paired_latency(arms: &[String], plan: &Plan, samples: &mut Samples) -> Result<()> {
    let compared: Vec<&str> = PAIRED_ARMS
        .into_iter()
        .filter(|a| arms.iter().any(|b| b == a))
        .collect();
    if compared.is_empty() || !arms.iter().any(|a| a == "ceiling") {
        return Ok(());
    }
    let mut worlds = Vec::new();
    for arm in std::iter::once("ceiling").chain(compared.iter().copied()) {
        progress(&format!("paired latency: {arm}: building a fresh sandbox"))?;
        worlds.push((arm, World::build(arm, &prefix(arm)).await?));
    }
    for path in Path::ALL {
        for pair in 0..plan.latency_pairs {
            progress(&format!(
                "paired latency: {}: pair {}/{}",
                path.name(),
                pair + 1,
                plan.latency_pairs
            ))?;
            let mut p50 = BTreeMap::new();
            for i in 0..worlds.len() {
                let (arm, world) = &worlds[(pair + i) % worlds.len()];
                let (v, _) = tools::rr_latency(&world.endpoint(path), 1)
                    .with_context(|| format!("{arm}, {}, paired", path.name()))?;
                record(samples, arm, path.name(), "rr_p50_paired", 1, v);
                p50.insert(*arm, v);
            }
            for arm in &compared {
                let ratio = p50[arm] / p50["ceiling"];
                record(samples, arm, path.name(), "rr_p50_to_ceiling", 1, ratio);
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
    let target = SocketAddr::from((ep.target, tools::FLOOD_PORT));
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

fn measure_path(
    ep: &Endpoint,
    arm: &str,
    path: Path,
    plan: &Plan,
    samples: &mut Samples,
) -> Result<()> {
    let gbps = tools::throughput(ep, plan.secs).context("throughput")?;
    record(samples, arm, path.name(), "throughput", 1, gbps);
    let (p50, p99) = tools::rr_latency(ep, plan.secs).context("latency")?;
    record(samples, arm, path.name(), "rr_p50", 1, p50);
    record(samples, arm, path.name(), "rr_p99", 1, p99);
    let cps = tools::crr(ep, plan.secs, plan.crr_threads).context("connections per second")?;
    record(samples, arm, path.name(), "crr", 1, cps);
    Ok(())
}

/// With `n - 1` ports already published, publishes port `n` (a container with one `-p`) and
/// measures the time that took, the first connection's latency and connections per second
/// through it.
async fn measure_scaling(arm: &str, n: u32, plan: &Plan, samples: &mut Samples) -> Result<()> {
    const FIRST: u16 = 20_000;
    const LAST_HOST_PORT: u16 = 45_000;
    let ctl = Control::build(arm, &prefix(arm)).await?;
    if n > 1 {
        let count = u16::try_from(n - 1).context("too many ports")?;
        ctl.create(
            "many",
            None,
            Publish::Range {
                first: FIRST,
                count,
            },
        )?;
    }
    ctl.create("last", None, Publish::Pairs(vec![]))?;
    let started = Instant::now();
    let last = ctl.publish("last", (LAST_HOST_PORT, tools::CRR_PORT))?;
    record(
        samples,
        arm,
        "publish",
        "publish_ms",
        n,
        started.elapsed().as_secs_f64() * 1e3,
    );

    let ep = Endpoint {
        client_ns: ctl.instance().sandbox.outside_path(),
        server_ns: last.netns,
        target: HOST_ADDR,
        port_shift: LAST_HOST_PORT - tools::CRR_PORT,
    };
    let first = first_packet(&ep)?;
    record(samples, arm, SCALING, "first_packet_us", n, first);
    let cps = tools::crr(&ep, plan.secs, plan.crr_threads)?;
    record(samples, arm, SCALING, "crr", n, cps);
    Ok(())
}

fn first_packet(ep: &Endpoint) -> Result<f64> {
    let _listener = netd::netns::run_in(Some(&ep.server_ns), || {
        Ok(std::net::TcpListener::bind(("0.0.0.0", tools::CRR_PORT))?)
    })?;
    tools::first_connect_us(
        &ep.client_ns,
        SocketAddr::from((ep.target, tools::CRR_PORT + ep.port_shift)),
    )
}

/// Creates then removes `count` containers one by one, timing each command.
async fn measure_setup(arm: &str, count: usize, samples: &mut Samples) -> Result<()> {
    let ctl = Control::build(arm, &prefix(arm)).await?;
    let names: Vec<String> = (0..count).map(|i| format!("c{i}")).collect();
    for name in &names {
        let started = Instant::now();
        ctl.create(name, None, Publish::Pairs(vec![]))?;
        record(
            samples,
            arm,
            "control",
            "create_ms",
            1,
            started.elapsed().as_secs_f64() * 1e3,
        );
    }
    for name in &names {
        let started = Instant::now();
        ctl.remove(name)?;
        record(
            samples,
            arm,
            "control",
            "remove_ms",
            1,
            started.elapsed().as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
