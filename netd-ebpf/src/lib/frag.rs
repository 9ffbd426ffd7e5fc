//! IPv4 fragments: only a datagram's first fragment carries the L4 header, so the ports NAT
//! translates it by are remembered here, keyed by what all its fragments share (addresses,
//! protocol, identification), for the later fragments (as Cilium's fragment map). A later
//! fragment that arrives before its first one, or whose first one wasn't translated, matches
//! nothing and is dropped (`fragment`).

use aya_ebpf::{bindings::BPF_ANY, macros::map, maps::LruHashMap};
use netd_common::datapath::{FRAGS_MAX, FragKey, FragPorts};

use super::parse::{FRAG_FIRST, Flow};

#[map]
static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(FRAGS_MAX, 0);

#[inline(always)]
fn key_of(flow: &Flow) -> FragKey {
    FragKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        _pad: 0,
    }
}

/// The ports of the datagram a later fragment belongs to, as its first fragment carried them.
#[inline(always)]
pub fn ports(flow: &Flow) -> Option<(u16, u16)> {
    // SAFETY: read-only use of a map value written whole.
    let ports = unsafe { FRAGS.get(&key_of(flow)) }?;
    Some((ports.sport, ports.dport))
}

/// Remembers the ports of a first fragment NAT translated (before translation: the later
/// fragments arrive as it did). A full map loses the oldest datagrams.
#[inline(always)]
pub fn remember(flow: &Flow) {
    if flow.frag != FRAG_FIRST {
        return;
    }
    let ports = FragPorts {
        sport: flow.sport,
        dport: flow.dport,
    };
    let _ = FRAGS.insert(&key_of(flow), &ports, u64::from(BPF_ANY));
}
