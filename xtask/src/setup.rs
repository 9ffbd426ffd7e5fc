//! Checks, and installs when missing, everything netd needs on a fresh Debian machine.
//! Idempotent: a second run installs nothing and only prints what it found.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Stdio},
};

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
];

/// The Docker arm's (see [`docker_packages`]).
const DOCKER_PACKAGES: &[&str] = &["docker.io", "busybox-static"];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Installs what is missing; returns what it installed (nothing, the second time).
pub fn ensure() -> Result<Vec<String>> {
    let mut installed = Vec::new();
    nightly_components(&mut installed)?;
    debian_packages(&mut installed)?;
    docker_packages(&mut installed)?;
    bpf_linker(&mut installed)?;
    bpffs(&mut installed)?;
    Ok(installed)
}

/// Installs `what` with `action`, saying so, and records it once done.
fn install(
    installed: &mut Vec<String>,
    what: &str,
    action: impl FnOnce() -> Result<()>,
) -> Result<()> {
    eprintln!("setup: installing {what}");
    action()?;
    installed.push(what.to_string());
    Ok(())
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
fn nightly_components(installed: &mut Vec<String>) -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        install(installed, "the nightly toolchain", || {
            status(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))
        })?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    for component in ["rust-src", "clippy"] {
        if !components.lines().any(|l| l.starts_with(component)) {
            install(installed, &format!("{component} for nightly"), || {
                status(Command::new("rustup").args([
                    "component",
                    "add",
                    component,
                    "--toolchain",
                    "nightly",
                ]))
            })?;
        }
    }
    Ok(())
}

fn debian_packages(installed: &mut Vec<String>) -> Result<()> {
    let missing = missing_packages(PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    install(installed, &missing.join(" "), || apt_install(&missing))
}

/// The Docker arm's packages: a real dockerd for the benchmark's `docker` arm and its test.
/// Without them only that arm is skipped (saying why), so failing to install them warns.
fn docker_packages(installed: &mut Vec<String>) -> Result<()> {
    let missing = missing_packages(DOCKER_PACKAGES);
    if missing.is_empty() {
        return Ok(());
    }
    let _no_service_starts = ServiceStartsDenied::new()?;
    if let Err(e) = install(installed, &missing.join(" "), || apt_install(&missing)) {
        eprintln!("setup: warning: {e:#}: the Docker arm and its test will be skipped");
    }
    Ok(())
}

fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect()
}

fn apt_install(packages: &[&str]) -> Result<()> {
    status(
        Command::new("apt-get")
            .arg("update")
            .arg("-q")
            .stdout(Stdio::null()),
    )?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )
}

/// docker.io's postinst starts the docker service, which would run a dockerd in the machine's
/// own namespace and rewrite its iptables. While this guard lives, a policy-rc.d denies every
/// service start (when the machine has its own policy-rc.d, that one is left to decide).
struct ServiceStartsDenied {
    created: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl ServiceStartsDenied {
    fn new() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(Self { created: false });
        }
        fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# netd xtask setup: no service starts\nexit 101\n",
        )
        .with_context(|| format!("write {POLICY_RC_D}"))?;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {POLICY_RC_D}"))?;
        Ok(Self { created: true })
    }
}

impl Drop for ServiceStartsDenied {
    fn drop(&mut self) {
        if self.created
            && let Err(e) = fs::remove_file(POLICY_RC_D)
        {
            eprintln!("setup: warning: remove {POLICY_RC_D}: {e} (it denies every service start)");
        }
    }
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// bpf-linker built against the system's LLVM 22. Both variables are needed: llvm-sys reads
/// the versioned one, bpf-linker's own build script reads `LLVM_PREFIX` to find libLLVM.
fn bpf_linker(installed: &mut Vec<String>) -> Result<()> {
    let current = Command::new("bpf-linker").arg("--version").output();
    if current.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    install(
        installed,
        &format!("bpf-linker {BPF_LINKER_VERSION} (builds against LLVM 22, about a minute)"),
        || {
            status(
                Command::new(env!("CARGO"))
                    .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                    .args(["--no-default-features", "--features", "llvm-22", "--force"])
                    .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
                    .env("LLVM_PREFIX", LLVM_PREFIX),
            )
        },
    )
}

/// A bpf filesystem at /sys/fs/bpf in the machine's mount namespace, for netd's pins.
fn bpffs(installed: &mut Vec<String>) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    });
    if !mounted {
        install(installed, "a bpf filesystem on /sys/fs/bpf", || {
            status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        })?;
    }
    Ok(())
}
