//! The soak (`cargo xtask bench soak --minutes N`): netd's eBPF arm with `netd daemon`
//! running, two containers that stay (a server publishing ports, a client) carrying
//! long-lived flows (iperf3 from the outside to a published port, bitrate-capped; paced
//! keep-alive request/response from the outside through a published port and from the client
//! container), while containers are created and removed and ports published and unpublished
//! at a steady rate.
//!
//! Every `sample` it records the conntrack and endpoint map sizes, the daemon's RSS and the
//! request/response p99 over the interval; at the end, the flows of staying containers lost
//! (must be 0), the churn's errors, and what is left behind once the churned containers are
//! removed (links, pins, namespaces against before the churn: must be 0). Writes `soak.json`,
//! `soak.md` and `soak.svg` to the output directory.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use netd::netns;
use netd_common::datapath::ENDPOINTS_MAP;
use netd_testkit::sandbox::HOST_ADDR;
use plotters::prelude::*;
use serde::Serialize;

use super::{
    arms::{self, CLIENT_IP, Control, Publish, SERVER_IP},
    daemon::Daemon,
    keepalive::{self, KEEPALIVE_PORT},
    memory, progress,
    report::{Machine, now_utc, percentile},
    tools::{self, IPERF_PORT, PUBLISH_SHIFT},
};

/// Churned containers alive at once: past this, the oldest goes.
const CHURN_LIVE: usize = 5;
/// Host ports the churn publishes on: a container's first port is `CHURN_PORT + k % 5000`.
const CHURN_PORT: u16 = 30_000;
/// The iperf3 flow's bitrate cap: long-lived, without starving the churn of the 2 cores.
const IPERF_BITRATE: &str = "200M";
/// Requests per second of each paced request/response flow.
const RR_INTERVAL: Duration = Duration::from_millis(2);

/// One sample of the soak.
#[derive(Debug, Serialize)]
struct Sample {
    t_s: f64,
    conntrack_entries: u64,
    endpoint_entries: u64,
    daemon_rss_mib: f64,
    rr_p99_us: f64,
    rr_requests: usize,
    containers_created: u64,
    containers_removed: u64,
    ports_published: u64,
    ports_unpublished: u64,
    errors: u64,
}

/// What stayed behind, and what broke.
#[derive(Debug, Default, Serialize)]
struct Outcome {
    flows_lost: u64,
    lost: Vec<String>,
    errors: u64,
    error_messages: Vec<String>,
    leaked_links: i64,
    leaked_pins: i64,
    leaked_namespaces: i64,
}

#[derive(Debug, Serialize)]
struct SoakReport {
    date: String,
    minutes: f64,
    machine: Machine,
    samples: Vec<Sample>,
    outcome: Outcome,
}

/// Churn counters, shared by the churn loop and the sampler.
#[derive(Default)]
struct Churn {
    created: u64,
    removed: u64,
    published: u64,
    unpublished: u64,
    errors: u64,
    messages: Vec<String>,
}

impl Churn {
    fn failed(&mut self, e: anyhow::Error) {
        self.errors += 1;
        if self.messages.len() < 20 {
            self.messages.push(format!("{e:#}"));
        }
    }
}

/// A paced request/response flow on one keep-alive connection, run by a thread until `stop`;
/// latencies (µs) go to `latencies`. Its result is the error that ended it, if one did.
fn rr_flow(
    ns: PathBuf,
    target: SocketAddr,
    stop: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<f64>>>,
) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        let mut client = netns::run_in(Some(&ns), || keepalive::Client::connect(target))?;
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            client.request()?;
            let us = started.elapsed().as_secs_f64() * 1e6;
            latencies.lock().expect("latency lock").push(us);
            std::thread::sleep(RR_INTERVAL.saturating_sub(started.elapsed()));
        }
        Ok(())
    })
}

/// What exists of an instance: links in its host namespace, files under its pin directory,
/// namespaces named after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Footprint {
    links: i64,
    pins: i64,
    namespaces: i64,
}

impl Footprint {
    /// The footprint once it is back to `before`, or as it is after a few seconds: the
    /// kernel deletes a removed container's veth pair with its namespace, after the command
    /// returns.
    fn settled(ctl: &Control, before: &Self) -> Result<Self> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let now = Self::take(ctl)?;
            if now == *before || std::time::Instant::now() > deadline {
                return Ok(now);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn take(ctl: &Control) -> Result<Self> {
        let inst = ctl.instance();
        let links = netns::run_in(Some(&inst.sandbox.host_path()), arms::interface_names)?;
        let ours = format!("{}-", inst.prefix);
        let namespaces = std::fs::read_dir(netns::NETNS_RUN_DIR)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&ours))
            .count();
        Ok(Self {
            links: links.len() as i64,
            pins: count_files(&inst.bpffs) as i64,
            namespaces: namespaces as i64,
        })
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    count_files(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

/// Runs the soak for `minutes`, sampling every `sample` (default: a twentieth of the run,
/// at least 5 s), and writes its report to `out`.
pub async fn run(minutes: f64, out: &Path) -> Result<()> {
    anyhow::ensure!(
        minutes.is_finite() && minutes > 0.0,
        "--minutes {minutes}: must be above 0"
    );
    let total = Duration::from_secs_f64(minutes * 60.0);
    let sample_every = (total / 20).max(Duration::from_secs(5));
    progress("soak: building the ebpf arm with netd daemon")?;
    let ctl = Control::build("ebpf", &super::prefix("soak")).await?;
    let published = [IPERF_PORT, KEEPALIVE_PORT].map(|p| (p + PUBLISH_SHIFT, p));
    let server = ctl.create(
        "srv",
        Some(SERVER_IP.into()),
        Publish::Pairs(published.to_vec()),
    )?;
    let client = ctl.create("cli", Some(CLIENT_IP.into()), Publish::Pairs(vec![]))?;
    let daemon = Daemon::start(&ctl, 5.0)?;
    let outside = ctl.instance().sandbox.outside_path();
    let published_rr = SocketAddr::from((HOST_ADDR, KEEPALIVE_PORT + PUBLISH_SHIFT));
    let _http = keepalive::Server::start(&server.netns, &outside, published_rr)?;
    let _iperf_server = tools::start_server(
        &server.netns,
        IPERF_PORT,
        "iperf3",
        &["-s", "-p", &IPERF_PORT.to_string()],
    )?;
    let before = Footprint::take(&ctl)?;
    let began = now_utc();

    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let flows = [
        (
            "outside->published request/response",
            rr_flow(
                outside.clone(),
                published_rr,
                stop.clone(),
                latencies.clone(),
            ),
        ),
        (
            "container->container request/response",
            rr_flow(
                client.netns.clone(),
                SocketAddr::from((SERVER_IP, KEEPALIVE_PORT)),
                stop.clone(),
                latencies.clone(),
            ),
        ),
    ];
    let iperf = netd_testkit::command_in(&outside, "iperf3")
        .args(["-c", &HOST_ADDR.to_string()])
        .args(["-p", &(IPERF_PORT + PUBLISH_SHIFT).to_string()])
        .args(["-b", IPERF_BITRATE, "-J"])
        .args(["-t", &total.as_secs().max(1).to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the iperf3 flow")?;

    let maps = ctl.instance().bpffs.join("maps");
    let started = Instant::now();
    let mut churn = Churn::default();
    let mut live: std::collections::VecDeque<String> = Default::default();
    let mut samples = Vec::new();
    let mut next_sample = started + sample_every;
    let mut k: u64 = 0;
    while started.elapsed() < total {
        progress_quiet()?;
        churn_step(&ctl, k, &mut live, &mut churn);
        k += 1;
        if Instant::now() >= next_sample {
            next_sample += sample_every;
            let mut window = std::mem::take(&mut *latencies.lock().expect("latency lock"));
            window.sort_by(f64::total_cmp);
            let sample = Sample {
                t_s: started.elapsed().as_secs_f64(),
                conntrack_entries: memory::conntrack_entries(&maps)?,
                endpoint_entries: memory::map_entries(&maps.join(ENDPOINTS_MAP))?,
                daemon_rss_mib: daemon.rss_bytes()? as f64 / f64::from(1 << 20),
                rr_p99_us: percentile(&window, 99.0),
                rr_requests: window.len(),
                containers_created: churn.created,
                containers_removed: churn.removed,
                ports_published: churn.published,
                ports_unpublished: churn.unpublished,
                errors: churn.errors,
            };
            eprintln!(
                "soak: {:>5.0} s: conntrack {} endpoints {} daemon RSS {:.1} MiB rr p99 {:.0} us, {} created, {} errors",
                sample.t_s,
                sample.conntrack_entries,
                sample.endpoint_entries,
                sample.daemon_rss_mib,
                sample.rr_p99_us,
                sample.containers_created,
                sample.errors
            );
            samples.push(sample);
        }
        // A steady rate: one churn step a second.
        let due = started + Duration::from_secs(k);
        tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
    }

    let mut outcome = Outcome::default();
    stop.store(true, Ordering::Relaxed);
    for (name, flow) in flows {
        if let Err(e) = flow.join().expect("request/response flow panicked") {
            outcome.lost.push(format!("{name}: {e:#}"));
        }
    }
    let iperf = iperf.wait_with_output().context("wait for iperf3")?;
    if let Err(e) = iperf_verdict(&iperf) {
        outcome
            .lost
            .push(format!("iperf3 outside->published: {e:#}"));
    }
    outcome.flows_lost = outcome.lost.len() as u64;
    while let Some(name) = live.pop_front() {
        if let Err(e) = ctl.remove(&name) {
            churn.failed(e);
        }
    }
    daemon.stop()?;
    let after = Footprint::settled(&ctl, &before)?;
    outcome.errors = churn.errors;
    outcome.error_messages = churn.messages;
    outcome.leaked_links = after.links - before.links;
    outcome.leaked_pins = after.pins - before.pins;
    outcome.leaked_namespaces = after.namespaces - before.namespaces;
    let report = SoakReport {
        date: began,
        minutes,
        machine: Machine::probe(),
        samples,
        outcome,
    };
    report.write(out)?;
    println!("{}", report.markdown());
    Ok(())
}

/// Stops the soak at its next step if it was interrupted, without a progress line.
fn progress_quiet() -> Result<()> {
    if super::INTERRUPTED.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted: removing what the soak made");
    }
    Ok(())
}

/// One second of churn, step `k`: create a container publishing a port; every other step,
/// publish one more port of the newest, and on the steps between unpublish it again; past
/// `CHURN_LIVE` containers, remove the oldest (and with it its ports). A failure is counted,
/// not fatal.
fn churn_step(
    ctl: &Control,
    k: u64,
    live: &mut std::collections::VecDeque<String>,
    churn: &mut Churn,
) {
    let name = format!("ch{k}");
    let port = CHURN_PORT + (k % 5000) as u16 * 2;
    match ctl.create(&name, None, Publish::Pairs(vec![(port, 80)])) {
        Ok(_) => {
            churn.created += 1;
            churn.published += 1;
            live.push_back(name.clone());
        }
        Err(e) => churn.failed(e),
    }
    if k % 2 == 1
        && let Some(newest) = live.back()
    {
        match ctl.publish(newest, (port + 1, 81)) {
            Ok(_) => churn.published += 1,
            Err(e) => churn.failed(e),
        }
    }
    // The port the previous step published on its container, if that one is still there.
    let previous = format!("ch{}", k.wrapping_sub(1));
    if k.is_multiple_of(2) && k > 0 && live.contains(&previous) {
        let port = CHURN_PORT + ((k - 1) % 5000) as u16 * 2;
        match ctl.unpublish(&previous, (port + 1, 81)) {
            Ok(()) => churn.unpublished += 1,
            Err(e) => churn.failed(e),
        }
    }
    if live.len() > CHURN_LIVE
        && let Some(oldest) = live.pop_front()
    {
        match ctl.remove(&oldest) {
            Ok(()) => churn.removed += 1,
            Err(e) => churn.failed(e),
        }
    }
}

/// Whether the long-lived iperf3 flow ran to its end.
fn iperf_verdict(out: &std::process::Output) -> Result<()> {
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("iperf3 printed no JSON")?;
    if let Some(err) = report["error"].as_str() {
        anyhow::bail!("{err}");
    }
    anyhow::ensure!(out.status.success(), "iperf3 exited with {}", out.status);
    Ok(())
}

impl SoakReport {
    fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("soak.md"), self.markdown())?;
        self.chart(&dir.join("soak.svg"))
    }

    fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let o = &self.outcome;
        let _ = writeln!(md, "# netd soak\n");
        let _ = writeln!(
            md,
            "{} minutes from {}, on Linux {} with {} cores ({}): ebpf arm with `netd daemon`; a container created (one published port) every second, one more port published every other second and unpublished the second after, the oldest removed past {CHURN_LIVE}; iperf3 (capped at {IPERF_BITRATE}bit/s) and two paced request/response flows to containers that stay.\n",
            self.minutes, self.date, m.kernel, m.cores, m.cpu
        );
        let _ = writeln!(md, "| what | value | target |");
        let _ = writeln!(md, "|---|---|---|");
        let verdict = |v: i64| if v == 0 { "met (0)" } else { "MISSED (0)" };
        let _ = writeln!(
            md,
            "| flows of staying containers lost | {} | {} |",
            o.flows_lost,
            verdict(o.flows_lost as i64)
        );
        let _ = writeln!(
            md,
            "| churn errors | {} | {} |",
            o.errors,
            verdict(o.errors as i64)
        );
        for (what, v) in [
            ("leaked links", o.leaked_links),
            ("leaked pins", o.leaked_pins),
            ("leaked namespaces", o.leaked_namespaces),
        ] {
            let _ = writeln!(md, "| {what} | {v} | {} |", verdict(v));
        }
        let _ = writeln!(md);
        for why in o.lost.iter().chain(&o.error_messages) {
            let _ = writeln!(md, "- {why}");
        }
        let _ = writeln!(
            md,
            "\n| t (s) | conntrack entries | endpoint entries | daemon RSS (MiB) | rr p99 (us) | requests | created | removed | ports published | unpublished | errors |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
        for s in &self.samples {
            let _ = writeln!(
                md,
                "| {:.0} | {} | {} | {:.1} | {:.0} | {} | {} | {} | {} | {} | {} |",
                s.t_s,
                s.conntrack_entries,
                s.endpoint_entries,
                s.daemon_rss_mib,
                s.rr_p99_us,
                s.rr_requests,
                s.containers_created,
                s.containers_removed,
                s.ports_published,
                s.ports_unpublished,
                s.errors
            );
        }
        md
    }

    /// Four panels over time: conntrack entries, endpoint entries, daemon RSS, rr p99.
    fn chart(&self, file: &Path) -> Result<()> {
        let root = SVGBackend::new(file, (900, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let panels = root.split_evenly((4, 1));
        let t_max = self.samples.last().map_or(1.0, |s| s.t_s).max(1.0);
        type Series = fn(&Sample) -> f64;
        let series: [(&str, Series, RGBColor); 4] = [
            ("conntrack entries", |s| s.conntrack_entries as f64, BLUE),
            ("endpoint map entries", |s| s.endpoint_entries as f64, GREEN),
            ("netd daemon RSS (MiB)", |s| s.daemon_rss_mib, RED),
            ("request/response p99 (us)", |s| s.rr_p99_us, MAGENTA),
        ];
        for (panel, (title, value, color)) in panels.iter().zip(series) {
            let top = self.samples.iter().map(value).fold(1.0, f64::max) * 1.2;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(25)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..t_max, 0.0..top)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("seconds")
                .draw()
                .map_err(plot_err)?;
            chart
                .draw_series(LineSeries::new(
                    self.samples.iter().map(|s| (s.t_s, value(s))),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
        Ok(())
    }
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("draw the soak graph: {e}")
}
