use anyhow::Result;
use clap::Parser;
use netd::{cli, netns};

/// Container networking with an eBPF datapath.
#[derive(Parser)]
#[command(name = "netd", version)]
struct Cli {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    command: cli::Invocation,
}

fn main() {
    // Like other Unix tools: a closed pipe (`netd ... | head`) ends netd quietly.
    // SAFETY: set before any thread exists; SIG_DFL is a valid disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    let command = match cli.command {
        // Before any runtime or thread exists: the proxy forks.
        cli::Invocation::Proxy(args) => std::process::exit(cli::proxy::main(args)),
        cli::Invocation::Command(command) => *command,
    };
    if let Err(e) = run(&cli.global, command) {
        eprintln!("netd: {e:#}");
        std::process::exit(1);
    }
}

/// Help and the version are printed as clap prints them; a usage error is one line that names
/// what is wrong (clap's message without its usage and tips), exit status 2.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let message = text.split("\n\n").next().unwrap_or_default();
    let message = message.strip_prefix("error: ").unwrap_or(message);
    eprintln!(
        "netd: {}",
        message.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    std::process::exit(2);
}

fn run(global: &cli::Global, command: cli::Command) -> Result<()> {
    // Before any thread exists: every thread netd starts inherits the host namespace (and so
    // does every process it starts: the iptables datapath's userland proxies).
    if let Some(ns) = &global.host_netns {
        netns::enter(ns)?;
    }
    // A one-shot command waits on one netlink answer at a time: on the thread that asked, no
    // wake-up of another thread (and no wait for a CPU to run it) per round trip. The
    // long-running ones serve many clients at once.
    let mut builder = match command {
        cli::Command::Daemon(_) | cli::Command::Monitor(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = builder.enable_all().build()?;
    runtime.block_on(cli::run(global, command))
}
