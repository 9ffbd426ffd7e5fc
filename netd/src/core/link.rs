//! `netd link A B`: a point-to-point veth between two containers, each end with its
//! container's address as a /32 and a route to the other end. A container without an address
//! of its own (`--network none`) gets one for the link: the one given, or the next free pair
//! of [`LINK_POOL`]. The link is recorded (`pending_links`) before its veth exists.

use std::{collections::HashSet, net::Ipv4Addr};

use anyhow::{Result, bail};
use ipnet::Ipv4Net;

use super::{Controller, spec::LinkAddrs};
use crate::{
    driver::{bridge, p2p},
    fault,
    store::{
        Container, PendingLink, Status, Tx,
        model::{Mode, PeerLink},
    },
};

/// Where link addresses come from when neither the container nor the command gives one:
/// RFC 3927 link-local space, which no network, route or host address of netd's uses.
pub const LINK_POOL: &str = "169.254.0.0/16";

impl Controller {
    pub async fn link(&mut self, a: &str, b: &str, addrs: LinkAddrs) -> Result<()> {
        let _lock = self.store.lock()?;
        self.collect_garbage().await?;
        if a == b {
            bail!("cannot link container {a:?} to itself");
        }
        let suffix = bridge::free_veth_name(&format!("{a}/{b}")).await?[4..].to_string();
        let (end_a, end_b) = (format!("p2p{suffix}a"), format!("p2p{suffix}b"));
        let (ca, cb, ip_a, ip_b) = self.store.write(|tx| {
            let (ca, cb) = (tx.container_required(a)?, tx.container_required(b)?);
            if ca.netns == cb.netns {
                bail!("containers {a:?} and {b:?} share one network namespace: nothing to link");
            }
            for c in [&ca, &cb] {
                if c.status != Status::Running {
                    bail!("container {:?} is {}", c.name, c.status.name());
                }
                // The link's end and its route would go into the host's namespace.
                if c.mode == Mode::Host {
                    bail!(
                        "container {:?} is in the host's network namespace (--network host): it can't be linked",
                        c.name
                    );
                }
                let peer = if c.name == a { b } else { a };
                if c.peer_links.iter().any(|l| l.peer == peer) {
                    bail!("containers {a:?} and {b:?} are already linked");
                }
            }
            let (ip_a, ip_b) = link_addresses(tx, &ca, &cb, addrs)?;
            tx.add_pending_link(&PendingLink {
                a: a.to_string(),
                b: b.to_string(),
                end_a: end_a.clone(),
                end_b: end_b.clone(),
                owner_pid: std::process::id(),
            })?;
            Ok((ca, cb, ip_a, ip_b))
        })?;
        fault::step("link-record");
        let ends = (
            p2p::End {
                netns: &ca.netns,
                ifname: &end_a,
                ip: ip_a,
            },
            p2p::End {
                netns: &cb.netns,
                ifname: &end_b,
                ip: ip_b,
            },
        );
        if let Err(e) = p2p::setup(&ends.0, &ends.1).await {
            let failed = p2p::teardown([(&ca.netns, &end_a), (&cb.netns, &end_b)]).await;
            if failed.is_empty() {
                self.store.write(|tx| tx.delete_pending_link(a, b))?;
                return Err(e);
            }
            return Err(e.context(format!("{:#}", failed.into_result("undo").unwrap_err())));
        }
        self.store.write(|tx| {
            for (c, peer, ifname, ip, peer_ip) in [
                (&ca, &cb, &end_a, ip_a, ip_b),
                (&cb, &ca, &end_b, ip_b, ip_a),
            ] {
                let mut rec = tx.container_required(&c.name)?;
                rec.peer_links.push(PeerLink {
                    peer: peer.name.clone(),
                    ifname: ifname.clone(),
                    ip: c.ip.is_none().then_some(ip),
                    peer_ip: Some(peer_ip),
                });
                tx.put_container(&rec)?;
            }
            tx.delete_pending_link(a, b)
        })?;
        Ok(())
    }
}

/// Each end's address: the container's own, else the one asked for, else the next free pair
/// of the link pool.
fn link_addresses(
    tx: &Tx,
    a: &Container,
    b: &Container,
    asked: LinkAddrs,
) -> Result<(Ipv4Addr, Ipv4Addr)> {
    for (c, ip) in [(a, asked.a), (b, asked.b)] {
        if let (Some(own), Some(ip)) = (c.ip, ip)
            && own != ip
        {
            bail!(
                "container {:?} has address {own}: it can't link as {ip}",
                c.name
            );
        }
    }
    for (c, ip) in [(a, asked.a), (b, asked.b)] {
        if let (None, Some(ip)) = (c.ip, ip) {
            check_asked(tx, ip)?;
        }
    }
    let mut free = None;
    let mut pick = |tx: &Tx| -> Result<Ipv4Addr> {
        if free.is_none() {
            free = Some(free_pool_addresses(tx)?);
        }
        let pool = free.as_mut().expect("just set");
        pool.pop()
            .ok_or_else(|| anyhow::anyhow!("link pool {LINK_POOL} is exhausted"))
    };
    let ip_a = match a.ip.or(asked.a) {
        Some(ip) => ip,
        None => pick(tx)?,
    };
    let ip_b = match b.ip.or(asked.b) {
        Some(ip) => ip,
        None => pick(tx)?,
    };
    if ip_a == ip_b {
        bail!("both ends of the link would have address {ip_a}");
    }
    Ok((ip_a, ip_b))
}

/// Checks an address asked for a link's end: a host's unicast address that no container and
/// no other link's end has.
fn check_asked(tx: &Tx, ip: Ipv4Addr) -> Result<()> {
    if ip.is_multicast() || ip.is_broadcast() || ip.is_unspecified() || ip.is_loopback() {
        bail!("--ip {ip}: not a host's unicast address");
    }
    if let Some(c) = tx.containers()?.iter().find(|c| c.ip == Some(ip)) {
        bail!("--ip {ip}: container {:?} has it", c.name);
    }
    if tx.link_pool_addresses()?.contains(&ip) {
        bail!("--ip {ip}: another link's end has it");
    }
    Ok(())
}

/// The link pool's free addresses, lowest last (so `pop` takes the lowest).
fn free_pool_addresses(tx: &Tx) -> Result<Vec<Ipv4Addr>> {
    let pool: Ipv4Net = LINK_POOL.parse()?;
    let used: HashSet<Ipv4Addr> = tx.link_pool_addresses()?;
    let mut free: Vec<Ipv4Addr> = pool
        .hosts()
        .filter(|ip| !used.contains(ip))
        .take(2)
        .collect();
    free.reverse();
    Ok(free)
}
