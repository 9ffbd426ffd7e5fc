use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use netd::{bench, bpf::Pins, cli, counter, demo, netns};

/// Container networking with an eBPF datapath.
#[derive(Parser)]
#[command(name = "netd", version)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the biggest variant doesn't matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Core(cli::Command),
    /// The per-protocol packet counter (a TCX program with a pinned map).
    #[command(subcommand)]
    Counter(CounterCommand),
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
        #[arg(long, value_delimiter = ',', default_values_t = netd::bench::ARMS.iter().map(|a| a.to_string()))]
        arms: Vec<String>,
        /// Rounds (each arm measured once per round); default 5, or 1 with --quick.
        #[arg(long)]
        runs: Option<usize>,
        /// Only this part: `setup` (container create and remove times) or `latency`
        /// (request/response against the ceiling, paired).
        #[arg(long)]
        only: Option<bench::Part>,
    },
}

#[derive(Subcommand)]
enum CounterCommand {
    /// Attach the counter to an interface of the host namespace.
    Attach {
        iface: String,
        /// Count outgoing packets instead of incoming ones.
        #[arg(long)]
        egress: bool,
    },
    /// Detach the counter from an interface.
    Detach {
        iface: String,
        #[arg(long)]
        egress: bool,
    },
    /// Show the counts, summed over every interface the counter is attached to.
    Show {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    // Like other Unix tools: a closed pipe (`netd ... | head`) ends netd quietly.
    // SAFETY: set before any thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if let Err(e) = run(Cli::parse()) {
        eprintln!("netd: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    // Before any thread exists: every thread netd starts inherits the host namespace.
    if let Some(ns) = &cli.global.host_netns {
        netns::enter(ns)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Core(cmd) => cli::run(&cli.global, cmd).await,
        Command::Counter(cmd) => counter_command(&Pins::open(&cli.global.bpffs)?, cmd),
        Command::Demo => demo::run().await,
        Command::Bench {
            quick,
            out,
            arms,
            runs,
            only,
        } => {
            let runs = runs.unwrap_or(if quick { 1 } else { 5 });
            bench::run(bench::Options {
                quick,
                out,
                arms,
                runs,
                only,
            })
            .await
        }
    }
}

fn counter_command(pins: &Pins, cmd: CounterCommand) -> Result<()> {
    match cmd {
        CounterCommand::Attach { iface, egress } => {
            counter::attach(pins, &iface, counter::direction(egress))?;
            println!("counter attached to {iface}");
        }
        CounterCommand::Detach { iface, egress } => {
            if !counter::detach(pins, &iface, counter::direction(egress))? {
                anyhow::bail!("the counter is not attached to {iface}");
            }
            println!("counter detached from {iface}");
        }
        CounterCommand::Show { json } => {
            let counts = counter::read(pins)?;
            if json {
                netd::cli::output::json(&counts)?;
            } else {
                let rows: Vec<Vec<String>> = counts
                    .iter()
                    .map(|c| {
                        vec![
                            c.proto.to_string(),
                            c.packets.to_string(),
                            c.bytes.to_string(),
                        ]
                    })
                    .collect();
                netd::cli::output::table(&["PROTO", "PACKETS", "BYTES"], &rows);
            }
        }
    }
    Ok(())
}
