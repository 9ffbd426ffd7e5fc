//! What the integration tests and the benchmark share: one fixture for netd in a sandbox
//! ([`Instance`]), driven through the `netd` binary named by `NETD_BIN`; guards that fail
//! loudly when they can't clean up ([`cleanup`]); the traffic helpers that show what went
//! through it ([`traffic`]); and one run of a datapath program on a crafted frame
//! ([`testrun`]).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

pub mod cleanup;
mod instance;
mod orphans;
pub mod sandbox;
pub mod testrun;
pub mod traffic;

pub use instance::Instance;
pub use sandbox::{HOST_ADDR, HOST_ADDR6, OUTSIDE_ADDR, OUTSIDE_ADDR6, OUTSIDE_LINK, UPLINK};

/// The netd binary under test: `NETD_BIN`, which `cargo xtask test|bench|demo` set after
/// building it. There is no fallback: a binary found some other way may be a stale build.
pub fn netd_bin() -> Result<PathBuf> {
    let bin = PathBuf::from(std::env::var_os("NETD_BIN").context(
        "NETD_BIN is not set: run through `cargo xtask test` (or bench, demo), which builds netd and names it",
    )?);
    anyhow::ensure!(bin.is_file(), "NETD_BIN={}: no such file", bin.display());
    Ok(bin)
}

/// `program` run inside the network namespace at `ns` (`ip netns exec` semantics, without the
/// /sys remount: nsenter setns'es before exec), with stdin closed.
pub fn command_in(ns: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.display()))
        .arg("--")
        .arg(program)
        .stdin(Stdio::null());
    cmd
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a
/// hybrid system).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            let (point, fstype) = (fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(point))
        })
        .context("cgroup v2 is not mounted")
}

/// Where the bpffs the instances' pin dirs go in is mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// Mounts a bpffs at [`BPFFS`] in this (the machine's) mount namespace when there is none,
/// for the instances' pin dirs.
fn ensure_bpffs() -> Result<()> {
    static MOUNTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut mounted = MOUNTED.lock().unwrap_or_else(|p| p.into_inner());
    if *mounted {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    let present = mounts.lines().any(|l| {
        let mut fields = l.split_whitespace().skip(1);
        fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
    });
    if !present {
        nix::mount::mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mount a bpffs on /sys/fs/bpf")?;
    }
    *mounted = true;
    Ok(())
}
