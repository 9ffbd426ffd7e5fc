use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use netd::{
    bench,
    bpf::Pins,
    counter,
    datapath::ebpf::{EbpfDatapath, conntrack, stats},
    demo, netns, output,
};

/// Container networking with an eBPF datapath.
#[derive(Parser)]
#[command(name = "netd", version)]
struct Cli {
    /// The network namespace netd manages as "the host" (default: the one it runs in).
    #[arg(long, global = true, value_name = "PATH")]
    host_netns: Option<PathBuf>,
    /// Where netd keeps its state.
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/netd",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    /// This instance's directory on a bpf filesystem, for pinned maps, programs and links.
    #[arg(
        long,
        global = true,
        default_value = "/sys/fs/bpf/netd",
        value_name = "DIR"
    )]
    bpffs: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
        /// Only the control plane: create and remove containers, per create and remove times.
        #[arg(long)]
        setup_only: bool,
    },
    /// The eBPF datapath's connection tracking table.
    #[command(subcommand)]
    Conntrack(ConntrackCommand),
    /// Replace the attached eBPF programs with this binary's, atomically (an upgrade: flows and
    /// maps stay).
    Reload,
    /// The eBPF datapath's packet counters, per reason (drops included).
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// List the live flows, like `conntrack -L`.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove every flow.
    Flush,
    /// Remove the entries of timed-out flows.
    Sweep,
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
    if let Err(e) = run(Cli::parse()) {
        eprintln!("netd: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    // Before any thread exists: every thread netd starts inherits the host namespace.
    if let Some(ns) = &cli.host_netns {
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
        Command::Counter(cmd) => counter_command(&Pins::open(&cli.bpffs)?, cmd),
        Command::Demo => demo::run().await,
        Command::Bench {
            quick,
            out,
            arms,
            runs,
            setup_only,
        } => {
            let runs = runs.unwrap_or(if quick { 1 } else { 5 });
            bench::run(bench::Options {
                quick,
                out,
                arms,
                runs,
                setup_only,
            })
            .await
        }
        Command::Conntrack(cmd) => conntrack_command(&Pins::open(&cli.bpffs)?, cmd),
        Command::Stats { json } => stats_command(&Pins::open(&cli.bpffs)?, json),
        Command::Reload => {
            let replaced = EbpfDatapath::new(Pins::open(&cli.bpffs)?).reload_programs()?;
            println!("{replaced} programs replaced");
            Ok(())
        }
    }
}

fn conntrack_command(pins: &Pins, cmd: ConntrackCommand) -> Result<()> {
    match cmd {
        ConntrackCommand::Ls { json } => {
            let flows = conntrack::list(pins)?;
            if json {
                output::json(&flows)?;
            } else {
                for f in &flows {
                    let (o, r) = (&f.original, &f.reply);
                    println!(
                        "{} {} {} {}s src={} dst={} sport={} dport={} packets={} bytes={} src={} dst={} sport={} dport={} packets={} bytes={} age={}s",
                        f.proto,
                        f.nat,
                        f.state,
                        f.expires_secs,
                        o.src,
                        o.dst,
                        o.sport,
                        o.dport,
                        o.packets,
                        o.bytes,
                        r.src,
                        r.dst,
                        r.sport,
                        r.dport,
                        r.packets,
                        r.bytes,
                        f.age_secs
                    );
                }
                eprintln!("netd: {} flows", flows.len());
            }
        }
        ConntrackCommand::Sweep => {
            let removed = conntrack::sweep(pins)?;
            println!("{removed} expired entries removed");
        }
        ConntrackCommand::Flush => {
            let removed = conntrack::flush(pins)?;
            println!("conntrack table flushed ({removed} entries removed)");
        }
    }
    Ok(())
}

fn stats_command(pins: &Pins, json: bool) -> Result<()> {
    let reasons = stats::read(pins)?;
    let endpoints = stats::read_endpoint_drops(pins)?;
    if json {
        return output::json(&serde_json::json!({ "reasons": reasons, "endpoints": endpoints }));
    }
    let rows: Vec<Vec<String>> = reasons
        .iter()
        .map(|c| {
            vec![
                c.reason.to_string(),
                if c.dropped { "drop" } else { "pass" }.to_string(),
                c.packets.to_string(),
            ]
        })
        .collect();
    output::table(&["REASON", "VERDICT", "PACKETS"], &rows);
    if !endpoints.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = endpoints
            .iter()
            .map(|d| vec![d.endpoint.to_string(), d.dropped.to_string()])
            .collect();
        output::table(&["ENDPOINT", "DROPPED"], &rows);
    }
    Ok(())
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
                output::json(&counts)?;
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
                output::table(&["PROTO", "PACKETS", "BYTES"], &rows);
            }
        }
    }
    Ok(())
}
