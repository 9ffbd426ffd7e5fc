//! `netd daemon`: the long-running part of netd, a server for the core's API (see
//! `server`). The datapath never needs it (programs, maps and links are pinned, so packets
//! keep flowing with no netd process at all); it sweeps long timed-out conntrack entries so
//! their slots free up before the LRU would evict, finishes or undoes what a command killed
//! midway left, and moves the eBPF datapath's NAT to a new uplink or uplink address. It can
//! be killed and restarted at any time.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::sync::Mutex;

use super::Global;
use crate::server;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds between sweeps.
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    sweep_interval: f64,
    /// The unix socket of the API (default: netd.sock in the state dir).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also serve Docker's network and IPAM driver NAME (`docker network create -d NAME
    /// --ipam-driver NAME`) on DIR/NAME.sock.
    #[arg(long, value_name = "NAME")]
    docker_plugin: Option<String>,
    /// Where Docker looks for plugin sockets.
    #[arg(long, default_value = crate::engines::docker::PLUGIN_DIR, value_name = "DIR")]
    docker_plugin_dir: PathBuf,
}

/// The shortest and longest sweep intervals: a timer needs a period, and a year is as good as
/// never.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(1);
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

pub async fn run(global: &Global, args: Args) -> Result<()> {
    let interval = Duration::try_from_secs_f64(args.sweep_interval)
        .ok()
        .filter(|i| (MIN_SWEEP_INTERVAL..=MAX_SWEEP_INTERVAL).contains(i))
        .with_context(|| {
            format!(
                "invalid --sweep-interval {}: must be from {} to {} seconds",
                args.sweep_interval,
                MIN_SWEEP_INTERVAL.as_secs_f64(),
                MAX_SWEEP_INTERVAL.as_secs()
            )
        })?;
    let socket = args
        .socket
        .unwrap_or_else(|| global.state_dir.join("netd.sock"));
    // One controller for the API and the Docker plugin.
    let shared = Arc::new(Mutex::new(global.controller()?));
    // Served until the daemon stops (dropped when this returns).
    let _plugin = args
        .docker_plugin
        .map(|name| {
            let datapath = global.datapath_kind()?;
            crate::engines::docker::serve(shared.clone(), datapath, &name, &args.docker_plugin_dir)
        })
        .transpose()?;
    server::run(shared, &socket, interval).await
}
