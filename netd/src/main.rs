use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use netd::{
    bpf::Pins,
    container,
    controller::Ctx,
    datapath::ebpf::{EbpfDatapath, conntrack, events, stats},
    exec, netns, network, output, views,
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
    /// The datapath new networks use: ebpf, or iptables (Docker's rules, the baseline).
    #[arg(long, global = true, default_value = "ebpf", value_name = "NAME")]
    datapath: String,
    /// Entries of the eBPF connection-tracking table (two per flow), when it is created.
    #[arg(long, global = true, value_name = "N")]
    conntrack_max: Option<u32>,
    /// A conntrack timeout, NAME=SECONDS (tcp_established, tcp_syn_sent, udp, icmp, ...),
    /// applied when a network is set up; netfilter's defaults otherwise.
    #[arg(long, global = true, value_name = "NAME=SECS")]
    conntrack_timeout: Vec<String>,
    /// Also attach an XDP program to the uplink, which drops refused new flows (straight to a
    /// container, to an internal network, from a source a published port doesn't allow)
    /// before the kernel builds an skb for them; attached with the first network.
    #[arg(long, global = true, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    uplink_xdp: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Networks: a bridge, an address pool and the datapath that serves them.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Containers: a network namespace joined to a network.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// Run a command inside a container's network namespace, with its /etc files.
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The ports a container publishes, like `docker port`.
    Port { name: String },
    /// Publish more ports of an existing container.
    Publish {
        name: String,
        /// [IP:]HOSTPORT[-END]:CPORT[-END][/tcp|/udp]
        #[arg(short = 'p', long = "publish", required = true)]
        publish: Vec<String>,
    },
    /// A point-to-point veth between two containers, with /32 routes to each other.
    Link { a: String, b: String },
    /// Remove what a netd command that died midway left behind.
    Gc,
    /// Run the long-running part: conntrack sweeping and clean-up (the datapath doesn't need
    /// it to forward; it can be killed and restarted at any time).
    Daemon {
        /// Seconds between sweeps.
        #[arg(long, default_value_t = 30.0)]
        sweep_interval: f64,
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
    /// Stream the packets the eBPF datapath drops: reason and 5-tuple, one per line.
    Monitor {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Create a network.
    Create(network::Request),
    /// Remove a network (it must have no containers).
    Rm { name: String },
    /// List networks.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a network as JSON.
    Inspect { name: String },
}

// Parsed once per process: the size of the biggest variant doesn't matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ContainerCommand {
    /// Create a container's network: a namespace (or an existing one) joined to a network.
    Create(container::Request),
    /// Remove a container's network.
    Rm { name: String },
    /// List containers.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a container as JSON.
    Inspect { name: String },
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
    let mut tuning = netd::datapath::Tuning {
        conntrack_max: cli.conntrack_max,
        uplink_xdp: cli.uplink_xdp,
        ..Default::default()
    };
    for spec in &cli.conntrack_timeout {
        tuning.set_timeout(spec)?;
    }
    let ctx = || {
        Ctx::open(
            &cli.state_dir,
            cli.host_netns.as_deref(),
            &cli.bpffs,
            &cli.datapath,
            tuning.clone(),
        )
    };
    match cli.command {
        Command::Network(cmd) => network_command(&ctx()?, cmd).await,
        Command::Container(cmd) => container_command(&ctx()?, cmd).await,
        Command::Exec { name, command } => {
            let ctx = ctx()?;
            let state = ctx.store.load()?;
            let c = state.container(&name)?;
            let code = exec::run(c, &ctx.store.container_dir(&name), &command)?;
            std::process::exit(code);
        }
        Command::Publish { name, publish } => {
            for p in container::publish(&ctx()?, &name, &publish).await? {
                println!("{}", views::port_line(&p));
            }
            Ok(())
        }
        Command::Port { name } => views::port(&ctx()?.store.load()?, &name),
        Command::Link { a, b } => {
            container::link(&ctx()?, &a, &b).await?;
            println!("linked {a} <-> {b}");
            Ok(())
        }
        Command::Daemon { sweep_interval } => {
            if !sweep_interval.is_finite() || sweep_interval <= 0.0 {
                anyhow::bail!("invalid --sweep-interval {sweep_interval}: must be above 0");
            }
            netd::daemon::run(ctx, std::time::Duration::from_secs_f64(sweep_interval)).await
        }
        Command::Gc => {
            let ctx = ctx()?;
            let removed = container::collect_garbage(&ctx, &mut ctx.store.load()?).await?;
            println!(
                "removed {} half-made container(s){}",
                removed.len(),
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", removed.join(", "))
                }
            );
            Ok(())
        }
        Command::Conntrack(cmd) => conntrack_command(&Pins::open(&cli.bpffs)?, cmd),
        Command::Stats { json } => stats_command(&Pins::open(&cli.bpffs)?, json),
        Command::Monitor { json, count } => {
            events::follow(&Pins::open(&cli.bpffs)?, count, |drop| {
                if json {
                    println!("{}", serde_json::to_string(&drop)?);
                } else {
                    println!("{drop}");
                }
                Ok(())
            })
            .await
        }
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
            .map(|d| {
                let reasons: Vec<String> = d
                    .reasons
                    .iter()
                    .map(|r| format!("{}={}", r.reason, r.packets))
                    .collect();
                vec![
                    d.endpoint.to_string(),
                    d.dropped.to_string(),
                    reasons.join(","),
                ]
            })
            .collect();
        output::table(&["ENDPOINT", "DROPPED", "REASONS"], &rows);
    }
    Ok(())
}

async fn network_command(ctx: &Ctx, cmd: NetworkCommand) -> Result<()> {
    let mut state = ctx.store.load()?;
    match cmd {
        NetworkCommand::Create(req) => {
            let net = network::create(ctx, &mut state, req).await?;
            ctx.store.save(&state)?;
            println!(
                "{} {} gateway {} bridge {} ({})",
                net.name, net.subnet, net.gateway, net.bridge, net.datapath
            );
            Ok(())
        }
        NetworkCommand::Rm { name } => {
            container::collect_garbage(ctx, &mut state).await?;
            network::remove(ctx, &mut state, &name).await?;
            ctx.store.save(&state)?;
            println!("{name}");
            Ok(())
        }
        NetworkCommand::Ls { json } => views::network_ls(&state, json),
        NetworkCommand::Inspect { name } => views::network_inspect(&state, &name),
    }
}

async fn container_command(ctx: &Ctx, cmd: ContainerCommand) -> Result<()> {
    match cmd {
        ContainerCommand::Create(req) => {
            let c = container::create(ctx, req).await?;
            let ip = c.ip.map(|ip| format!(" {ip}")).unwrap_or_default();
            println!("{}{ip}", c.name);
            for p in &c.ports {
                println!("  {}", views::port_line(p));
            }
            Ok(())
        }
        ContainerCommand::Rm { name } => {
            container::remove(ctx, &name).await?;
            println!("{name}");
            Ok(())
        }
        ContainerCommand::Ls { json } => views::container_ls(&ctx.store.load()?, json),
        ContainerCommand::Inspect { name } => views::container_inspect(&ctx.store.load()?, &name),
    }
}
