//! IPv4 fragments: only a datagram's first fragment carries the L4 header, so the ports NAT
//! translates it by are remembered here, keyed by what all its fragments share (addresses,
//! protocol, identification), for the later fragments (as Cilium's fragment map). A later
//! fragment that arrives before its first one, or whose first one wasn't translated, matches
//! nothing and is dropped (`fragment`). The endpoint programs remember the ports of a first
//! fragment a `--link` let through the same way, so its later fragments follow its verdict.
//! NAT66 does the same for IPv6 (`FRAGS6`, keyed by the fragment header's identification).

use aya_ebpf::{bindings::BPF_ANY, macros::map, maps::LruHashMap};
use netd_common::datapath::{Addr, FRAGS_MAX, FragKey, FragKey6, FragPorts};

use super::{
    events::Tuple,
    parse::{FRAG_FIRST, Flow},
};

#[map]
static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(FRAGS_MAX, 0);
#[map]
static FRAGS6: LruHashMap<FragKey6, FragPorts> = LruHashMap::pinned(FRAGS_MAX, 0);

#[inline(always)]
fn key_of(flow: &Flow) -> FragKey {
    datagram_key(flow.saddr, flow.daddr, flow.proto, flow.ip_id)
}

#[inline(always)]
fn datagram_key(saddr: u32, daddr: u32, proto: u8, id: u16) -> FragKey {
    FragKey {
        saddr,
        daddr,
        id,
        proto,
        _pad: 0,
    }
}

/// The ports of datagram `id` of `t` (whose own ports are unknown: a later fragment), as
/// [`remember_ports`] recorded them from its first fragment.
#[inline(always)]
pub fn ports_of(t: &Tuple, id: u16) -> Option<(u16, u16)> {
    lookup(&datagram_key(t.saddr, t.daddr, t.proto, id))
}

/// Remembers the ports of `t`, the first fragment of datagram `id`, for its later fragments.
/// A full map loses the oldest datagrams.
#[inline(always)]
pub fn remember_ports(t: &Tuple, id: u16) {
    insert(
        &datagram_key(t.saddr, t.daddr, t.proto, id),
        t.sport,
        t.dport,
    );
}

#[inline(always)]
fn insert(key: &FragKey, sport: u16, dport: u16) {
    let _ = FRAGS.insert(key, &FragPorts { sport, dport }, u64::from(BPF_ANY));
}

/// The ports of the datagram a later fragment belongs to, as its first fragment carried them.
#[inline(always)]
pub fn ports(flow: &Flow) -> Option<(u16, u16)> {
    lookup(&key_of(flow))
}

#[inline(always)]
fn lookup(key: &FragKey) -> Option<(u16, u16)> {
    // SAFETY: read-only use of a map value written whole.
    let ports = unsafe { FRAGS.get(key) }?;
    Some((ports.sport, ports.dport))
}

/// Remembers the ports of a first fragment NAT translated (before translation: the later
/// fragments arrive as it did). A full map loses the oldest datagrams.
#[inline(always)]
pub fn remember(flow: &Flow) {
    if flow.frag != FRAG_FIRST {
        return;
    }
    insert(&key_of(flow), flow.sport, flow.dport);
}

/// The key of an IPv6 datagram's fragments.
#[inline(always)]
pub fn key6(saddr: Addr, daddr: Addr, proto: u8, id: u32) -> FragKey6 {
    FragKey6 {
        saddr,
        daddr,
        id,
        proto,
        _pad: [0; 3],
    }
}

/// [`ports`] for IPv6.
#[inline(always)]
pub fn ports6(key: &FragKey6) -> Option<(u16, u16)> {
    // SAFETY: read-only use of a map value written whole.
    let ports = unsafe { FRAGS6.get(key) }?;
    Some((ports.sport, ports.dport))
}

/// [`remember`] for IPv6: the ports of a first fragment NAT66 translated.
#[inline(always)]
pub fn remember6(key: &FragKey6, sport: u16, dport: u16) {
    let _ = FRAGS6.insert(key, &FragPorts { sport, dport }, u64::from(BPF_ANY));
}
