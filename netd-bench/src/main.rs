//! `netd-bench bench|demo`, run by `cargo xtask bench` and `cargo xtask demo`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use netd_bench::{bench, demo};

#[derive(Parser)]
#[command(name = "netd-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a sandbox, run netd in it, show traffic through the datapath, remove it all.
    Demo,
    /// Benchmark the eBPF datapath against iptables and a plain veth pair (the ceiling).
    Bench {
        /// A smoke run: short measurements, one round, fewer ports and containers.
        #[arg(long)]
        quick: bool,
        /// Where to write latest.json, report.md and ratios.svg.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Arms to run, in the order they alternate.
        #[arg(long, value_delimiter = ',', default_values_t = bench::ARMS.iter().map(|a| a.to_string()))]
        arms: Vec<String>,
        /// Rounds (each arm measured once per round); default 5, or 1 with --quick.
        #[arg(long)]
        runs: Option<usize>,
        /// Only this part: `setup` (container create and remove times), `conntrack` (under
        /// pressure), `paired` (request/response p50, connections and keep-alive requests per
        /// second against the ceiling and routed, in paired runs), `paths` (every arm's paths,
        /// both families, then the paired runs) or `programs` (netd's eBPF programs timed one
        /// packet at a time).
        #[arg(long)]
        only: Option<bench::Part>,
        /// Another netd binary (an earlier build) measured beside this one as the arm
        /// `baseline` (paths and paired latency): a before/after in one run.
        #[arg(long, value_name = "NETD_BIN")]
        baseline: Option<PathBuf>,
    },
    /// Churn (containers and ports) beside long-lived flows, for `--minutes`: flows lost,
    /// errors, map sizes, the daemon's RSS and latency over time, leaks at the end.
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Where to write soak.json, soak.md and soak.svg.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("netd-bench: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Demo => demo::run().await,
            Command::Soak { minutes, out } => bench::soak(minutes, &out).await,
            Command::Bench {
                quick,
                out,
                arms,
                runs,
                only,
                baseline,
            } => {
                let runs = runs.unwrap_or(if quick { 1 } else { 5 });
                bench::run(bench::Options {
                    quick,
                    out,
                    arms,
                    runs,
                    only,
                    baseline,
                })
                .await
            }
        }
    })
}
