//! `netd daemon`: the long-running part of netd. The datapath never needs it (programs, maps
//! and links are pinned, so packets keep flowing with no netd process at all); the daemon
//! sweeps timed-out conntrack entries so their slots free up before the LRU would evict, and
//! removes what a command killed midway left, and moves the eBPF datapath's NAT to a new
//! uplink or uplink address. It can be killed and restarted at any time.

use std::time::Duration;

use anyhow::Result;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    container,
    controller::Ctx,
    datapath::ebpf::{EbpfDatapath, conntrack},
};

/// Runs until SIGINT or SIGTERM, sweeping every `interval`.
pub async fn run(open: impl Fn() -> Result<Ctx>, interval: Duration) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(interval);
    eprintln!("netd daemon: sweeping every {}s", interval.as_secs_f64());
    loop {
        tokio::select! {
            _ = tick.tick() => sweep_once(&open).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    eprintln!("netd daemon: stopped");
    Ok(())
}

/// One round; a failure is reported and the daemon carries on.
async fn sweep_once(open: &impl Fn() -> Result<Ctx>) {
    let round = async {
        // The lock is held only for this round, so CLI commands interleave with the daemon.
        let ctx = open()?;
        let mut state = ctx.store.load()?;
        let removed = container::collect_garbage(&ctx, &mut state).await?;
        let swept = if ctx.pins.map(netd_common::datapath::CONNTRACK_MAP).exists() {
            conntrack::sweep(&ctx.pins)?
        } else {
            0
        };
        // A new default route or uplink address: the eBPF datapath's NAT moves along.
        if ctx.pins.map(netd_common::datapath::CONFIG_MAP).exists()
            && let Some(uplink) = EbpfDatapath::new(ctx.pins.clone()).follow_uplink()?
        {
            eprintln!("netd daemon: the uplink is now {uplink}");
        }
        anyhow::Ok((removed, swept))
    };
    match round.await {
        Ok((removed, swept)) if !removed.is_empty() || swept > 0 => {
            eprintln!(
                "netd daemon: {swept} conntrack entries swept, {} half-made containers removed",
                removed.len()
            )
        }
        Ok(_) => {}
        Err(e) => eprintln!("netd daemon: {e:#}"),
    }
}
