//! The sandbox topology that the demo, the tests and the benchmark run netd in:
//!
//! ```text
//!  [PREFIX-out: "the internet"] out0 ──veth── up0 [PREFIX-host: netd's host]
//! ```
//! Both are named network namespaces made here, so nothing touches the machine's own
//! interfaces and no packet leaves the machine. Addresses come from 198.18.0.0/15 (RFC 2544,
//! benchmarking) and exist only inside these namespaces.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::Result;
use ipnet::IpNet;

use netd::{
    netlink::{Netlink, set_sysctl},
    netns,
};

/// The host's uplink interface inside the sandbox host namespace.
pub const UPLINK: &str = "up0";
/// The outside end of the uplink.
pub const OUTSIDE_LINK: &str = "out0";
/// The host's uplink address.
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The outside namespace's address: the host's default gateway and the "internet server".
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PREFIX_LEN: u8 = 24;

/// Names of a sandbox's two namespaces. Removing is explicit ([`Sandbox::remove`]) so that a
/// caller can keep one alive across processes; the test harness wraps it in a Drop guard.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub host: String,
    pub outside: String,
}

impl Sandbox {
    /// Names for a sandbox whose namespaces start with `prefix`.
    pub fn named(prefix: &str) -> Self {
        Self {
            host: format!("{prefix}-host"),
            outside: format!("{prefix}-out"),
        }
    }

    pub fn host_path(&self) -> PathBuf {
        netns::path_of(&self.host)
    }

    pub fn outside_path(&self) -> PathBuf {
        netns::path_of(&self.outside)
    }

    /// Creates both namespaces and the uplink between them. On failure nothing is left.
    pub async fn create(prefix: &str) -> Result<Self> {
        let sandbox = Self::named(prefix);
        let made = sandbox.build().await;
        if made.is_err() {
            sandbox.remove();
        }
        made.map(|()| sandbox)
    }

    async fn build(&self) -> Result<()> {
        let host = netns::create(&self.host)?;
        let outside = netns::create(&self.outside)?;
        for ns in [&host, &outside] {
            // IPv6 autoconfiguration would add router solicitations to every count.
            set_sysctl(Some(ns), "net.ipv6.conf.all.disable_ipv6", "1")?;
            set_sysctl(Some(ns), "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let host_nl = Netlink::in_ns(Some(&host))?;
        let out_nl = Netlink::in_ns(Some(&outside))?;
        for nl in [&host_nl, &out_nl] {
            let lo = nl.require_link("lo").await?;
            nl.set_up(lo).await?;
        }
        host_nl.add_veth(UPLINK, OUTSIDE_LINK, None).await?;
        let peer = host_nl.require_link(OUTSIDE_LINK).await?;
        host_nl.move_to_ns(peer, &outside).await?;

        let up = host_nl.require_link(UPLINK).await?;
        host_nl
            .add_addr(up, IpNet::new(HOST_ADDR.into(), PREFIX_LEN)?)
            .await?;
        host_nl.set_up(up).await?;
        let out = out_nl.require_link(OUTSIDE_LINK).await?;
        out_nl
            .add_addr(out, IpNet::new(OUTSIDE_ADDR.into(), PREFIX_LEN)?)
            .await?;
        out_nl.set_up(out).await?;
        host_nl
            .add_route("0.0.0.0/0".parse()?, Some(IpAddr::V4(OUTSIDE_ADDR)), None)
            .await?;
        Ok(())
    }

    /// Removes both namespaces (and with them the uplink). Best effort: used on error paths.
    pub fn remove(&self) {
        for name in [&self.host, &self.outside] {
            if let Err(e) = netns::remove(name) {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// A netd instance confined to a sandbox: its host namespace, state dir and pin dir, driven
/// through the `netd` binary like a user would. Dropping it removes the sandbox, every
/// namespace whose name starts with its prefix (containers), its pins and its state.
pub struct Instance {
    pub prefix: String,
    pub sandbox: Sandbox,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
}

impl Instance {
    pub async fn create(prefix: &str) -> Result<Self> {
        let sandbox = Sandbox::create(prefix).await?;
        Ok(Self {
            prefix: prefix.to_string(),
            state_dir: std::env::temp_dir().join(prefix),
            bpffs: PathBuf::from("/sys/fs/bpf").join(prefix),
            sandbox,
        })
    }

    /// A name for a container (and so its namespace) that [`Drop`] will clean up.
    pub fn name(&self, base: &str) -> String {
        format!("{}-{base}", self.prefix)
    }

    /// `netd GLOBALS ARGS` for this instance.
    pub fn command(&self, args: &[&str]) -> Result<std::process::Command> {
        let mut cmd = std::process::Command::new(crate::netd_bin()?);
        cmd.arg("--host-netns")
            .arg(self.sandbox.host_path())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(args)
            .stdin(std::process::Stdio::null());
        Ok(cmd)
    }

    /// Runs `netd ARGS` and returns its stdout; fails with netd's error line.
    pub fn netd(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args)?.output()?;
        if !out.status.success() {
            anyhow::bail!(
                "netd {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(netns::NETNS_RUN_DIR) {
            let ours = format!("{}-", self.prefix);
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(&ours)
                    && name != self.sandbox.host
                    && name != self.sandbox.outside
                {
                    let _ = netns::remove(&name);
                }
            }
        }
        self.sandbox.remove();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
