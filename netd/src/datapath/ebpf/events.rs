//! `netd monitor`: the packets the datapath drops, as they happen, from the `DROP_EVENTS` ring
//! buffer. The buffer keeps what no monitor read yet (up to its size), so a monitor started
//! after a drop still sees it; there is one reader position, so two monitors share the stream.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Result;
use aya::maps::{Map, RingBuf};
use netd_common::datapath::{
    AF_INET6, Addr, DROP_EVENTS_MAP, DropEvent, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, Stat, v4_octets,
};
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::bpf::Pins;

/// One dropped packet.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Drop {
    pub reason: &'static str,
    pub proto: String,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// The interface the packet arrived on (in the host namespace).
    pub ifindex: u32,
}

impl std::fmt::Display for Drop {
    /// `icc_denied tcp 172.18.0.3:41234 -> 172.18.0.2:80 (if 12)`, IPv6 addresses in brackets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (from, to) = (
            std::net::SocketAddr::new(self.saddr, self.sport),
            std::net::SocketAddr::new(self.daddr, self.dport),
        );
        write!(
            f,
            "{} {} {from} -> {to} (if {})",
            self.reason, self.proto, self.ifindex
        )
    }
}

/// Calls `each` with every drop event, waiting for new ones, until `count` were seen (for
/// ever when `None`) or `each` fails.
pub async fn follow(
    pins: &Pins,
    count: Option<usize>,
    mut each: impl FnMut(Drop) -> Result<()>,
) -> Result<()> {
    let ring = RingBuf::try_from(Map::RingBuf(pins.open_map(DROP_EVENTS_MAP)?))?;
    // SAFETY: the ring buffer owns its map fd for its whole life (moved into the AsyncFd, it
    // is neither closed nor replaced), and as_raw_fd always returns that fd.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("poll the drop events: {e}"))?;
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let mut ready = ring.readable_mut().await?;
        while let Some(item) = ready.get_inner_mut().next() {
            let event: DropEvent = bytemuck::try_pod_read_unaligned(&item)
                .map_err(|e| anyhow::anyhow!("a drop event of {} bytes: {e}", item.len()))?;
            drop(item);
            each(describe(&event))?;
            seen += 1;
            if count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
        ready.clear_ready();
    }
    Ok(())
}

fn describe(e: &DropEvent) -> Drop {
    Drop {
        reason: Stat::from_index(e.reason).map_or("unknown", Stat::name),
        proto: match e.proto {
            IPPROTO_TCP => "tcp".into(),
            IPPROTO_UDP => "udp".into(),
            IPPROTO_ICMP => "icmp".into(),
            IPPROTO_ICMPV6 => "icmpv6".into(),
            0 => "-".into(),
            other => other.to_string(),
        },
        saddr: address(&e.saddr, e.family),
        sport: e.sport,
        daddr: address(&e.daddr, e.family),
        dport: e.dport,
        ifindex: e.ifindex,
    }
}

/// An event's address of family `family`.
fn address(addr: &Addr, family: u8) -> IpAddr {
    if family == AF_INET6 {
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        IpAddr::V4(Ipv4Addr::from(v4_octets(addr)))
    }
}
