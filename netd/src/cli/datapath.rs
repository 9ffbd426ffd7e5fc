//! The datapath's own commands: `netd conntrack`, `stats`, `monitor`, `reload`. They need no
//! state, only the datapath's kernel objects (`reload` takes the state's kernel lock).

use anyhow::Result;
use clap::Subcommand;

use super::{Global, views};
use crate::datapath::Datapaths;

#[derive(Subcommand)]
pub enum ConntrackCommand {
    /// List the live flows, like `conntrack -L`.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove every flow.
    Flush,
    /// Remove the entries of flows timed out long enough that no new flow takes them over
    /// (idle twice their timeout).
    Sweep,
}

#[derive(clap::Args)]
pub struct StatsArgs {
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct MonitorArgs {
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<usize>,
}

fn datapaths(global: &Global) -> Result<Datapaths> {
    Ok(Datapaths {
        bpffs: global.bpffs.clone(),
        state_dir: global.state_dir.clone(),
        tuning: global.config()?.tuning,
    })
}

pub fn conntrack(global: &Global, cmd: ConntrackCommand) -> Result<()> {
    let dp = datapaths(global)?;
    match cmd {
        ConntrackCommand::Ls { json } => {
            let mut printer = views::FlowPrinter::new(json);
            dp.conntrack_for_each_flow(|flow| printer.print(&flow))?;
            printer.finish()?;
        }
        ConntrackCommand::Sweep => {
            let removed = dp.conntrack_sweep()?;
            println!("{removed} expired entries removed");
        }
        ConntrackCommand::Flush => {
            let removed = dp.conntrack_flush()?;
            println!("conntrack table flushed ({removed} entries removed)");
        }
    }
    Ok(())
}

pub fn stats(global: &Global, args: StatsArgs) -> Result<()> {
    let (reasons, endpoints) = datapaths(global)?.stats()?;
    views::stats(&reasons, &endpoints, args.json)
}

pub async fn monitor(global: &Global, args: MonitorArgs) -> Result<()> {
    datapaths(global)?
        .follow_drops(args.count, |drop| {
            if args.json {
                println!("{}", serde_json::to_string(&drop)?);
            } else {
                println!("{drop}");
            }
            Ok(())
        })
        .await
}

pub fn reload(global: &Global) -> Result<()> {
    // No other netd changes the maps meanwhile: a map being resized misses no entry.
    let store = crate::store::Store::open(&global.state_dir)?;
    let _lock = store.lock()?;
    let replaced = datapaths(global)?.reload()?;
    println!("{replaced} programs replaced");
    Ok(())
}
