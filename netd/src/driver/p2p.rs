//! `netd link`'s plumbing: a veth pair between two containers' namespaces, each end with its
//! container's address as a /32 and a host route to the other end.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Result;
use ipnet::IpNet;

use super::{Failures, netlink::Netlink};
use crate::fault;

/// One end of a point-to-point link.
pub struct End<'a> {
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub ip: Ipv4Addr,
}

/// Makes the veth pair `a`–`b` in the host namespace, moves each end into its namespace and
/// configures it. Stops at the first failure (the caller tears down).
pub async fn setup(a: &End<'_>, b: &End<'_>) -> Result<()> {
    let host = Netlink::in_ns(None)?;
    host.add_veth(a.ifname, b.ifname, None).await?;
    fault::step("link-veth");
    for (end, peer, step) in [(a, b, "link-end-a"), (b, a, "link-end-b")] {
        let index = host.require_link(end.ifname).await?;
        host.move_to_ns(index, end.netns).await?;
        let inside = Netlink::in_ns(Some(end.netns))?;
        let index = inside.require_link(end.ifname).await?;
        inside
            .add_addr(index, IpNet::new(end.ip.into(), 32)?)
            .await?;
        inside.set_up(index).await?;
        inside
            .add_route(IpNet::new(peer.ip.into(), 32)?, None, Some(index))
            .await?;
        fault::step(step);
    }
    Ok(())
}

/// Removes both ends wherever they are (still in the host namespace, or moved).
pub async fn teardown(ends: [(&Path, &str); 2]) -> Failures {
    let mut failed = Failures::default();
    for (netns, ifname) in ends {
        for ns in [None, Some(netns).filter(|p| p.exists())] {
            let gone = async { Netlink::in_ns(ns)?.remove_link(ifname).await };
            failed.note(&format!("link {ifname}"), gone.await);
        }
    }
    failed
}
