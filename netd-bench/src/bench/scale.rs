//! Scale: published ports (to 30,000 on every arm, 100,000 on ebpf across several host
//! addresses), containers (one by one, and a start storm of creates at once), and the memory
//! each takes.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result};
use netd::{netlink::Netlink, netns};
use netd_testkit::sandbox::{HOST_ADDR, UPLINK};

use super::{
    Plan, SCALING, Samples,
    arms::{Control, Publish},
    daemon::Daemon,
    memory::{Per, Snapshot},
    prefix, record,
    tools::{self, Endpoint},
};

/// The first host (and container) port of the ranges published before the last one.
const FIRST: u16 = 10_000;
/// The last-added port: above every range (`FIRST` + at most 30,000 per address).
const LAST_HOST_PORT: u16 = 45_000;
/// Ports published one by one through the daemon after the CLI's, each a fresh one above
/// `LAST_HOST_PORT` (the report takes their median).
const DAEMON_PUBLISHES: u16 = 5;

/// The host address of the `i`th range: the uplink's own, then extra addresses of the
/// sandbox's /24 added to the uplink.
fn range_address(i: usize) -> Ipv4Addr {
    if i == 0 {
        HOST_ADDR
    } else {
        Ipv4Addr::new(198, 18, 0, 10 + i as u8)
    }
}

/// With `n - 1` ports already published (in ranges of at most `plan.ports_per_address`, one
/// host address each), publishes port `n` (a container with one `-p`) and measures the time
/// that took (the whole CLI process), the first connection's latency and connections per
/// second through it. For netd arms, also what the `n - 1` ports took in memory, and the time
/// of publishing one more port through `netd daemon`'s API (a request on its socket).
pub async fn measure_ports(arm: &str, n: u32, plan: &Plan, samples: &mut Samples) -> Result<()> {
    let ctl = Control::build(arm, &prefix(arm)).await?;
    let host_ns = ctl.instance().sandbox.host_path();
    let before = Snapshot::take(&ctl.instance().bpffs, &host_ns)?;
    let mut left = n - 1;
    // On one address, the ranges publish on every address, as a plain `-p` does.
    let several = left > plan.ports_per_address;
    for i in 0.. {
        if left == 0 {
            break;
        }
        let count = left.min(plan.ports_per_address);
        left -= count;
        let ip = range_address(i);
        if i > 0 {
            add_uplink_address(&host_ns, ip).await?;
        }
        let publish = Publish::Range {
            ip: several.then_some(ip),
            first: FIRST,
            count: u16::try_from(count).context("too many ports on one address")?,
        };
        ctl.create(&format!("many{i}"), None, publish)?;
    }
    if n > 1 && matches!(ctl, Control::Netd { .. }) {
        // Filed under N: the cost per port may change with N.
        let after = Snapshot::take(&ctl.instance().bpffs, &host_ns)?;
        let made = f64::from(n - 1);
        after.record_growth(&before, (arm, n), Per::TenThousandPorts, made, samples);
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
        target: HOST_ADDR.into(),
        port_shift: LAST_HOST_PORT - tools::CRR_PORT,
    };
    let first = first_packet(&ep)?;
    record(samples, arm, SCALING, "first_packet_us", n, first);
    let cps = tools::crr(&ep, plan.secs, plan.crr_threads)?;
    record(samples, arm, SCALING, "crr", n, cps);
    if matches!(ctl, Control::Netd { .. }) {
        publish_through_daemon(&ctl, (arm, n), samples)?;
    }
    Ok(())
}

/// Starts `netd daemon` on the arm's state and publishes [`DAEMON_PUBLISHES`] more ports of
/// the last container through its API, one request each, recording each request's time
/// (connect to answer) as `publish_daemon_ms`; then stops the daemon.
fn publish_through_daemon(
    ctl: &Control,
    (arm, n): (&str, u32),
    samples: &mut Samples,
) -> Result<()> {
    // No sweep during the measurement but the one at start, which the first request may wait on.
    let daemon = Daemon::start(ctl, 3600.0)?;
    let path = format!("/v1/containers/{}/ports", ctl.instance().name("last"));
    for port in (LAST_HOST_PORT + 1..).take(usize::from(DAEMON_PUBLISHES)) {
        let body = serde_json::json!([{
            "host_ip": null,
            "host_ports": [port, port],
            "container_ports": [port, port],
            "proto": "tcp",
        }]);
        let started = Instant::now();
        let made = daemon.post(&path, &body)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let made = made.as_array().map_or(0, Vec::len);
        anyhow::ensure!(made == 1, "POST {path}: {made} mappings made, not 1");
        record(samples, arm, "publish", "publish_daemon_ms", n, ms);
    }
    daemon.stop()
}

async fn add_uplink_address(host_ns: &std::path::Path, ip: Ipv4Addr) -> Result<()> {
    let nl = Netlink::in_ns(Some(host_ns))?;
    let up = nl.require_link(UPLINK).await?;
    nl.add_addr(up, ipnet::IpNet::new(ip.into(), 24)?)
        .await
        .with_context(|| format!("add {ip} to the uplink"))
}

fn first_packet(ep: &Endpoint) -> Result<f64> {
    let _listener = netns::run_in(Some(&ep.server_ns), || {
        Ok(std::net::TcpListener::bind(ep.listen(tools::CRR_PORT))?)
    })?;
    tools::first_connect_us(&ep.client_ns, ep.target(tools::CRR_PORT))
}

/// Creates then removes `count` containers one by one, timing each command (filed under
/// N = `count`); for netd arms, also the memory the containers took.
pub async fn measure_containers(arm: &str, count: usize, samples: &mut Samples) -> Result<()> {
    let ctl = Control::build(arm, &prefix(arm)).await?;
    let host_ns = ctl.instance().sandbox.host_path();
    let n = u32::try_from(count)?;
    let before = Snapshot::take(&ctl.instance().bpffs, &host_ns)?;
    let names: Vec<String> = (0..count).map(|i| format!("c{i}")).collect();
    for name in &names {
        let started = Instant::now();
        ctl.create(name, None, Publish::Pairs(vec![]))?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        record(samples, arm, "control", "create_ms", n, ms);
    }
    if matches!(ctl, Control::Netd { .. }) {
        let after = Snapshot::take(&ctl.instance().bpffs, &host_ns)?;
        after.record_growth(&before, (arm, n), Per::Container, count as f64, samples);
    }
    for name in &names {
        let started = Instant::now();
        ctl.remove(name)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        record(samples, arm, "control", "remove_ms", n, ms);
    }
    Ok(())
}

/// The start storm: `count` `netd container create` processes started at once. Records each
/// one's time (`storm_create_ms`) and the storm's (`storm_total_ms`), filed under `count`.
pub async fn measure_storm(arm: &str, count: usize, samples: &mut Samples) -> Result<()> {
    let ctl = Control::build(arm, &prefix(arm)).await?;
    let Control::Netd { .. } = &ctl else {
        return Ok(());
    };
    let n = u32::try_from(count)?;
    let started = Instant::now();
    let results: Vec<Result<f64>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..count)
            .map(|i| {
                let ctl = &ctl;
                s.spawn(move || {
                    let began = Instant::now();
                    ctl.create(&format!("s{i}"), None, Publish::Pairs(vec![]))?;
                    Ok(began.elapsed().as_secs_f64() * 1e3)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("storm thread panicked"))
            .collect()
    });
    let total = started.elapsed().as_secs_f64() * 1e3;
    for ms in results {
        record(samples, arm, "control", "storm_create_ms", n, ms?);
    }
    record(samples, arm, "control", "storm_total_ms", n, total);
    // Every container is there and has its own address.
    let listed = ctl.netd(&["container", "ls", "--json"])?;
    let listed: serde_json::Value = serde_json::from_str(&listed)?;
    let made = listed.as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        made == count,
        "start storm: {made} containers listed after {count} creates"
    );
    Ok(())
}
