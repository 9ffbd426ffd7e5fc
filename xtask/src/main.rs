//! `cargo xtask`: the development loop. Every command first checks (and on a fresh machine
//! installs) the toolchain and tools netd needs; see `setup`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod setup;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent): nightly rust-src, LLVM 22, bpf-linker,
    /// the test tools, and a mounted bpffs.
    Setup,
    /// Release build of the eBPF programs and the userspace.
    Build,
    /// The lint, then all unit and integration tests.
    Test {
        /// Passed to `cargo test` after `--` (a test name filter, `--nocapture`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy with warnings denied, for userspace and the eBPF crate.
    Lint,
    /// Build netd and run its demo in a sandbox.
    Demo,
    /// Benchmark: eBPF against iptables and the ceiling; report in target/bench/.
    Bench {
        /// `setup`: only the control plane (create and remove containers); `paired`: only
        /// the paired runs against the ceiling and routed (request/response p50, connections and
        /// keep-alive requests per second); `conntrack`: only conntrack under pressure; `paths`:
        /// only the paths of every arm and family, then the paired runs;
        /// `programs`: only netd's eBPF programs timed one packet at a time (BPF_PROG_TEST_RUN);
        /// `soak`: churn beside long-lived flows for `--minutes`.
        what: Option<String>,
        /// A smoke run (a few minutes) with the same report shape.
        #[arg(long)]
        quick: bool,
        /// Rounds (each arm measured once per round); default 5, or 1 with --quick.
        #[arg(long)]
        runs: Option<usize>,
        /// Minutes the soak runs (30 for the report, 2 in CI).
        #[arg(long)]
        minutes: Option<f64>,
        /// Arms to run, comma-separated (default: all).
        #[arg(long)]
        arms: Option<String>,
        /// Another netd binary (an earlier build) measured beside this one, as the arm
        /// `baseline`: a before/after in one run.
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let installed = setup::ensure()?;
    if installed.is_empty() {
        eprintln!("setup: nothing installed: the toolchain, tools and bpffs were in place");
    } else {
        eprintln!("setup: installed {}", installed.join(", "));
    }
    match cli.command {
        Task::Setup => Ok(()),
        // The default members: `EBPF_CRATES` are built through the build.rs of netd and
        // netd-bench.
        Task::Build => cargo(&["build", "--release"]),
        Task::Test { args } => {
            lint()?;
            test(&args)
        }
        Task::Lint => lint(),
        Task::Demo => demo(),
        Task::Bench {
            what,
            quick,
            runs,
            minutes,
            arms,
            baseline,
        } => bench(
            what.as_deref(),
            BenchOptions {
                quick,
                runs,
                minutes,
                arms,
                baseline,
            },
        ),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `cargo ARGS` at the workspace root and fails if it does.
fn cargo(args: &[&str]) -> Result<()> {
    run_cmd(Command::new(env!("CARGO")).args(args))
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// The test binaries that send packets through the eBPF datapath's host-wide programs: run a
/// second time with them attached as clsact filters (what kernels without TCX get).
const DATAPATH_TESTS: &[&str] = &["datapath", "isolation", "conntrack_pressure"];

fn test(args: &[String]) -> Result<()> {
    // The integration tests drive the netd binary, so build it first and tell them where it is
    // (with the step hook the crash-recovery tests kill it at).
    cargo(&[
        "build",
        "--package",
        "netd",
        "--features",
        "fault-injection",
    ])?;
    let netd_bin = workspace_root().join("target/debug/netd");
    let run = |targets: &[&str], attach: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.arg("test").args(targets).env("NETD_BIN", &netd_bin);
        match attach {
            Some(mode) => cmd.env("NETD_ATTACH", mode),
            None => cmd.env_remove("NETD_ATTACH"),
        };
        if !args.is_empty() {
            cmd.arg("--").args(args);
        }
        run_cmd(&mut cmd)
    };
    // Every test, with the attach mode the kernel's probe picks (TCX on Linux >= 6.6).
    run(&workspace_but_ebpf(), None)?;
    let mut clsact = vec!["--package", "tests"];
    for name in DATAPATH_TESTS {
        clsact.extend(["--test", name]);
    }
    eprintln!("test: the datapath tests again with NETD_ATTACH=clsact");
    run(&clsact, Some("clsact"))
}

/// The crates that only build for the BPF target (netd's and netd-bench's build.rs build
/// them with aya-build).
const EBPF_CRATES: [&str; 2] = ["netd-ebpf", "netd-bench-ebpf"];

/// `cargo` arguments naming every workspace crate but the eBPF ones.
fn workspace_but_ebpf() -> Vec<&'static str> {
    let mut args = vec!["--workspace"];
    for name in EBPF_CRATES {
        args.extend(["--exclude", name]);
    }
    args
}

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    let mut clippy = vec!["clippy"];
    clippy.extend(workspace_but_ebpf());
    clippy.extend(["--all-targets", "--", "-D", "warnings"]);
    cargo(&clippy)?;
    // The eBPF crates, with nightly and build-std.
    let mut ebpf_clippy = vec!["run", "nightly", "cargo", "clippy"];
    for name in EBPF_CRATES {
        ebpf_clippy.extend(["--package", name]);
    }
    ebpf_clippy.extend([
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--target-dir",
        "target/ebpf-lint",
        "--",
        "-D",
        "warnings",
    ]);
    run_cmd(
        Command::new("rustup")
            .args(ebpf_clippy)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER"),
    )
}

/// `cargo xtask bench`'s options.
struct BenchOptions {
    quick: bool,
    runs: Option<usize>,
    minutes: Option<f64>,
    arms: Option<String>,
    baseline: Option<PathBuf>,
}

fn bench(what: Option<&str>, opts: BenchOptions) -> Result<()> {
    let BenchOptions {
        quick,
        runs,
        minutes,
        arms,
        baseline,
    } = opts;
    if minutes.is_some() && what != Some("soak") {
        bail!("--minutes is for `cargo xtask bench soak`");
    }
    if what == Some("soak") {
        if runs.is_some() {
            bail!("--runs is not for `cargo xtask bench soak` (it runs once, for --minutes)");
        }
        if arms.is_some() || baseline.is_some() {
            bail!("--arms and --baseline are not for `cargo xtask bench soak` (it runs ebpf)");
        }
    }
    let mut cmd = netd_bench()?;
    let out = workspace_root().join("target/bench");
    if what == Some("soak") {
        cmd.arg("soak").arg("--out").arg(out);
        if let Some(minutes) = minutes {
            cmd.arg("--minutes").arg(minutes.to_string());
        }
        return run_cmd(&mut cmd);
    }
    cmd.arg("bench").arg("--out").arg(out);
    match what {
        None => {}
        Some(part @ ("setup" | "paired" | "conntrack" | "paths" | "programs")) => {
            cmd.args(["--only", part]);
        }
        Some(other) => {
            bail!(
                "unknown benchmark {other:?} (known: setup, paired, conntrack, paths, programs, soak)"
            )
        }
    }
    if quick {
        cmd.arg("--quick");
    }
    if let Some(runs) = runs {
        cmd.arg("--runs").arg(runs.to_string());
    }
    if let Some(arms) = arms {
        cmd.arg("--arms").arg(arms);
    }
    if let Some(baseline) = baseline {
        cmd.arg("--baseline").arg(baseline);
    }
    run_cmd(&mut cmd)
}

fn demo() -> Result<()> {
    run_cmd(netd_bench()?.arg("demo"))
}

/// `netd-bench` (release), driving the release `netd` it is given in `NETD_BIN`; both built.
fn netd_bench() -> Result<Command> {
    cargo(&[
        "build",
        "--release",
        "--package",
        "netd",
        "--package",
        "netd-bench",
    ])?;
    let release = workspace_root().join("target/release");
    let mut cmd = Command::new(release.join("netd-bench"));
    cmd.env("NETD_BIN", release.join("netd"));
    Ok(cmd)
}
