//! `netd daemon`: the long-running part of netd. The datapath never needs it (programs, maps
//! and links are pinned, so packets keep flowing with no netd process at all); the daemon
//! sweeps timed-out conntrack entries so their slots free up before the LRU would evict, and
//! finishes or undoes what a command killed midway left, and moves the eBPF datapath's NAT to a
//! new uplink or uplink address. It can be killed and restarted at
//! any time.

use std::time::Duration;

use anyhow::{Result, bail};
use tokio::signal::unix::{SignalKind, signal};

use super::Global;
use crate::core::Controller;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds between sweeps.
    #[arg(long, default_value_t = 30.0)]
    sweep_interval: f64,
}

/// Runs until SIGINT or SIGTERM, sweeping every `--sweep-interval`.
pub async fn run(global: &Global, args: Args) -> Result<()> {
    if !args.sweep_interval.is_finite() || args.sweep_interval <= 0.0 {
        bail!(
            "invalid --sweep-interval {}: must be above 0",
            args.sweep_interval
        );
    }
    let interval = Duration::from_secs_f64(args.sweep_interval);
    let mut ctl = global.controller()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(interval);
    eprintln!("netd daemon: sweeping every {}s", interval.as_secs_f64());
    loop {
        tokio::select! {
            _ = tick.tick() => sweep_once(&mut ctl).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    eprintln!("netd daemon: stopped");
    Ok(())
}

/// One round; a failure is reported and the daemon carries on.
async fn sweep_once(ctl: &mut Controller) {
    let round = async {
        // The kernel lock is held only for the collection, so commands interleave.
        let collected = ctl.gc().await?;
        let swept = ctl.datapaths().conntrack_sweep()?;
        // A new default route or uplink address: the eBPF datapath's NAT moves along.
        if let Some(uplink) = ctl.datapaths().follow_uplink()? {
            eprintln!("netd daemon: the uplink is now {uplink}");
        }
        anyhow::Ok((collected, swept))
    };
    match round.await {
        Ok((collected, swept)) if !collected.is_empty() || swept > 0 => {
            eprintln!(
                "netd daemon: {swept} conntrack entries swept, {} half-made containers removed",
                collected.containers.len()
            )
        }
        Ok(_) => {}
        Err(e) => eprintln!("netd daemon: {e:#}"),
    }
}
