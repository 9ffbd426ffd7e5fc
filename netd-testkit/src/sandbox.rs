//! The sandbox topology that the demo, the tests and the benchmark run netd in:
//!
//! ```text
//!  [PREFIX-out: "the internet"] out0 ──veth── up0 [PREFIX-host: netd's host]
//! ```
//! Both are named network namespaces made here, so nothing touches the machine's own
//! interfaces and no packet leaves the machine. Addresses come from 198.18.0.0/15 (RFC 2544,
//! benchmarking) and, once [`Sandbox::enable_ipv6`] ran, 2001:2::/48 (RFC 5180, IPv6
//! benchmarking); they exist only inside these namespaces.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Result;
use ipnet::IpNet;

use netd::{
    netlink::{Netlink, set_ipv6_conf, set_sysctl},
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
/// The host's uplink IPv6 address (after [`Sandbox::enable_ipv6`]).
pub const HOST_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// The outside namespace's IPv6 address: the host's IPv6 default gateway.
pub const OUTSIDE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
const PREFIX_LEN6: u8 = 64;

/// Names of a sandbox's two namespaces. Removing is explicit ([`Sandbox::remove`]): the
/// [`Instance`](crate::Instance) guard removes it and reports what it could not remove.
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
        if let Err(e) = sandbox.build().await {
            return Err(match sandbox.remove() {
                Ok(()) => e,
                Err(left) => e.context(format!("and removing it failed: {left:#}")),
            });
        }
        Ok(sandbox)
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

    /// Turns IPv6 on for loopback and the uplink in both namespaces (off from creation, so
    /// IPv4-only tests count no router solicitations), with [`HOST_ADDR6`],
    /// [`OUTSIDE_ADDR6`] and the host's IPv6 default route via the outside. No
    /// autoconfiguration and no duplicate address detection: usable at once, and only the
    /// addresses set here.
    pub async fn enable_ipv6(&self) -> Result<()> {
        for (ns, link, addr) in [
            (self.host_path(), UPLINK, HOST_ADDR6),
            (self.outside_path(), OUTSIDE_LINK, OUTSIDE_ADDR6),
        ] {
            for ifname in ["lo", link] {
                enable_ipv6_on(&ns, ifname)?;
            }
            let nl = Netlink::in_ns(Some(&ns))?;
            let index = nl.require_link(link).await?;
            nl.add_addr(index, IpNet::new(addr.into(), PREFIX_LEN6)?)
                .await?;
        }
        Netlink::in_ns(Some(&self.host_path()))?
            .add_route("::/0".parse()?, Some(IpAddr::V6(OUTSIDE_ADDR6)), None)
            .await
    }

    /// Removes both namespaces (and with them the uplink), both tried whatever the first did.
    pub fn remove(&self) -> Result<()> {
        let host = netns::remove(&self.host);
        let outside = netns::remove(&self.outside);
        host.and(outside)
    }
}

/// Turns IPv6 on for interface `ifname` of namespace `ns` (off there from creation): no
/// autoconfiguration and no duplicate address detection, so only the addresses given to it
/// are there, and usable at once.
pub fn enable_ipv6_on(ns: &Path, ifname: &str) -> Result<()> {
    for (key, value) in [("accept_ra", "0"), ("autoconf", "0"), ("accept_dad", "0")] {
        set_ipv6_conf(Some(ns), ifname, key, value)?;
    }
    set_ipv6_conf(Some(ns), ifname, "disable_ipv6", "0")
}
