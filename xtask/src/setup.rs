//! Checks, and installs when missing, everything netd needs on a fresh Debian machine.
//! Idempotent: a second run installs nothing and only prints what it found.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests and benchmark drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "iptables",
    "nftables",
    "conntrack",
    "iperf3",
    "sockperf",
    "tcpdump",
    "bpftool",
    // The container engines the engine tests drive (netd as their network), and a static
    // busybox to build their images offline.
    "docker.io",
    "podman",
    "containernetworking-plugins",
    "containerd",
    "busybox-static",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    nightly_components()?;
    debian_packages()?;
    bpf_linker()?;
    bpffs()
}

fn installing(what: &str) {
    eprintln!("setup: installing {what}");
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

/// rust-src (aya-build uses `-Z build-std=core`) and clippy (the eBPF lint) for nightly.
fn nightly_components() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        installing("the nightly toolchain");
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    for component in ["rust-src", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            installing(&format!("{component} for nightly"));
            status(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))?;
        }
    }
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    installing(&missing.join(" "));
    status(
        Command::new("apt-get")
            .arg("update")
            .arg("-q")
            .stdout(Stdio::null()),
    )?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null()),
    )
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// bpf-linker built against the system's LLVM 22. Both variables are needed: llvm-sys reads
/// the versioned one, bpf-linker's own build script reads `LLVM_PREFIX` to find libLLVM.
fn bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    installing(&format!(
        "bpf-linker {BPF_LINKER_VERSION} (builds against LLVM 22, about a minute)"
    ));
    status(
        Command::new(env!("CARGO"))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

/// A bpf filesystem at /sys/fs/bpf in the machine's mount namespace, for netd's pins.
fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    });
    if !mounted {
        installing("a bpf filesystem on /sys/fs/bpf");
        status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}
