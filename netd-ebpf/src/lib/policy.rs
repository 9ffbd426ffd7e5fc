//! The isolation rules between containers and networks that don't depend on the attach point.

use netd_common::datapath::{IPPROTO_TCP, IPPROTO_UDP, NetworkInfo};

use super::{
    events::{Tuple, Tuple6},
    maps,
};

/// Docker's ACCEPT rules for a link: to the linked container's port, or a reply from it.
/// Packets without ports (ICMP, later fragments) are never linked.
#[inline(always)]
pub fn link_allows(t: &Tuple) -> bool {
    if t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP || t.sport == 0 && t.dport == 0 {
        return false;
    }
    maps::linked(t.saddr, t.daddr, t.proto, t.dport)
        || maps::linked(t.daddr, t.saddr, t.proto, t.sport)
}

/// [`link_allows`] for IPv6.
#[inline(always)]
pub fn link_allows6(t: &Tuple6) -> bool {
    if t.proto != IPPROTO_TCP && t.proto != IPPROTO_UDP || t.sport == 0 && t.dport == 0 {
        return false;
    }
    maps::linked6(t.saddr, t.daddr, t.proto, t.dport)
        || maps::linked6(t.daddr, t.saddr, t.proto, t.sport)
}

/// The limited broadcast address and multicast groups (224.0.0.0/4).
#[inline(always)]
pub fn floods(addr: u32) -> bool {
    addr == u32::MAX || u32::from_be(addr) >> 28 == 0xe
}

#[inline(always)]
pub fn in_subnet(addr: u32, net: &NetworkInfo) -> bool {
    let mask = prefix_mask(net.prefix_len);
    u32::from_be(addr) & mask == u32::from_be(net.subnet[0]) & mask
}

#[inline(always)]
fn prefix_mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len.min(32)))
    }
}
