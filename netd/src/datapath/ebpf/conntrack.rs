//! The conntrack tables seen from userspace: `netd conntrack ls`, `flush` and `sweep` (which
//! also recounts the flows of capped containers and networks), and the clean-ups the driver
//! does when an endpoint or a network goes.

use std::{collections::HashMap, net::Ipv4Addr};

use anyhow::Result;
use ipnet::Ipv4Net;
use netd_common::datapath::{
    Addr, CT_ASSURED, CT_CLOSE, CT_DIR_ORIGINAL, CT_ESTABLISHED, CT_FIN_WAIT, CT_NAT_DNAT,
    CT_NAT_SNAT, CT_NEW, CT_SEEN_REPLY, CT_SYN_RECV, CT_SYN_SENT, CT_TIME_WAIT, CtEntry, CtKey,
    CtLimit, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, v4_octets,
};
use serde::Serialize;

use super::maps;
use crate::bpf::Pins;

/// One direction of a flow, like a tuple of `conntrack -L`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Ports; for ICMP echo, the identifier is `sport` of the original direction.
    pub sport: u16,
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
}

/// A tracked flow.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Flow {
    pub proto: &'static str,
    pub state: &'static str,
    /// `snat` (masquerade) or `dnat` (published port).
    pub nat: &'static str,
    /// In the assured table: a flood of new flows can't evict it.
    pub assured: bool,
    pub original: Tuple,
    pub reply: Tuple,
    pub age_secs: u64,
    /// Seconds until the flow times out if idle.
    pub expires_secs: u64,
}

/// Every entry of both tables (assured flows first).
fn entries(pins: &Pins) -> Result<Vec<(CtKey, CtEntry)>> {
    let mut entries = Vec::new();
    for table in maps::conntrack(pins)? {
        entries.extend(table.iter().filter_map(Result::ok));
    }
    Ok(entries)
}

/// The live flows' original entries: not timed out, and with a reply entry pointing back.
fn live_flows(pins: &Pins) -> Result<Vec<CtEntry>> {
    let timeouts = maps::read_config(pins)?.timeouts;
    let now = monotonic_ns();
    let entries = entries(pins)?;
    let replies: HashMap<CtKey, CtEntry> = entries
        .iter()
        .filter(|(_, e)| e.dir != CT_DIR_ORIGINAL)
        .map(|(k, e)| (*k, *e))
        .collect();
    Ok(entries
        .into_iter()
        .filter(|(_, e)| e.dir == CT_DIR_ORIGINAL)
        .filter(|(_, e)| {
            let idle = now.saturating_sub(e.last_seen_ns) / 1_000_000_000;
            let paired = replies
                .get(&e.reply)
                .is_some_and(|r| r.original == e.original);
            paired && idle <= u64::from(e.timeout_secs(&timeouts))
        })
        .map(|(_, e)| e)
        .collect())
}

/// Every live flow.
pub fn list(pins: &Pins) -> Result<Vec<Flow>> {
    let timeouts = maps::read_config(pins)?.timeouts;
    let now = monotonic_ns();
    let mut flows = Vec::new();
    for e in live_flows(pins)? {
        let idle = now.saturating_sub(e.last_seen_ns) / 1_000_000_000;
        let timeout = u64::from(e.timeout_secs(&timeouts));
        flows.push(Flow {
            proto: proto_name(e.original.proto),
            state: state_name(&e),
            nat: if e.nat == CT_NAT_SNAT { "snat" } else { "dnat" },
            assured: e.flags & CT_ASSURED != 0,
            original: tuple(&e.original, e.packets[0], e.bytes[0]),
            reply: tuple(&e.reply, e.packets[1], e.bytes[1]),
            age_secs: now.saturating_sub(e.created_ns) / 1_000_000_000,
            expires_secs: timeout - idle,
        });
    }
    flows.sort_by_key(|f| std::cmp::Reverse(f.age_secs));
    Ok(flows)
}

/// Removes the entries of timed-out flows (the datapath already ignores them; this frees
/// their slots before the LRU would), and sets the flow counts of capped containers and
/// networks to their live flows (the datapath counts up only). Returns how many entries
/// went.
pub fn sweep(pins: &Pins) -> Result<usize> {
    let timeouts = maps::read_config(pins)?.timeouts;
    let now = monotonic_ns();
    let entries = entries(pins)?;
    let originals: HashMap<CtKey, CtEntry> = entries
        .iter()
        .filter(|(_, e)| e.dir == CT_DIR_ORIGINAL)
        .map(|(k, e)| (*k, *e))
        .collect();
    let dead = |key: &CtKey, e: &CtEntry| {
        let Some(flow) = originals.get(&e.original) else {
            return true;
        };
        // A reply entry left behind by an older flow of the same original tuple.
        let superseded = e.dir != CT_DIR_ORIGINAL && flow.reply != *key;
        let idle = now.saturating_sub(flow.last_seen_ns) / 1_000_000_000;
        superseded || idle > u64::from(flow.timeout_secs(&timeouts))
    };
    let doomed: Vec<CtKey> = entries
        .iter()
        .filter(|(k, e)| dead(k, e))
        .map(|(k, _)| *k)
        .collect();
    let removed = remove_keys(pins, &doomed)?;
    recount_limits(pins)?;
    Ok(removed)
}

/// `bpf_map_update_elem`'s flag: only replace an existing value.
const BPF_EXIST: u64 = 2;

/// Sets each capped container's and network's flow count to its live flows.
fn recount_limits(pins: &Pins) -> Result<()> {
    let mut limits = maps::ct_limits(pins)?;
    let capped: Vec<_> = limits.iter().filter_map(Result::ok).collect();
    if capped.is_empty() {
        return Ok(());
    }
    let endpoints = maps::endpoints(pins)?;
    let mut per_container: HashMap<Addr, u64> = HashMap::new();
    let mut per_network: HashMap<u32, u64> = HashMap::new();
    for flow in live_flows(pins)? {
        let owner = owner(&flow);
        *per_container.entry(owner).or_default() += 1;
        let key = netd_common::datapath::EndpointKey {
            addr: owner,
            family: flow.original.family,
            _pad: [0; 3],
        };
        if let Ok(ep) = endpoints.get(&key, 0) {
            *per_network.entry(ep.network_id).or_default() += 1;
        }
    }
    for (key, limit) in capped {
        let count = if key.network_id == 0 {
            per_container.get(&key.addr)
        } else {
            per_network.get(&key.network_id)
        };
        let recounted = CtLimit {
            count: count.copied().unwrap_or(0),
            ..limit
        };
        // Gone meanwhile (its container or network was removed): nothing to recount.
        let _ = limits.insert(key, recounted, BPF_EXIST);
    }
    Ok(())
}

/// The container a flow is counted against: the one that started it, or the published
/// port's.
fn owner(flow: &CtEntry) -> Addr {
    if flow.nat == CT_NAT_DNAT {
        flow.reply.saddr
    } else {
        flow.original.saddr
    }
}

/// Empties the table; returns how many entries (two per flow) went.
pub fn flush(pins: &Pins) -> Result<usize> {
    flush_matching(pins, |_| true)
}

/// Removes the flows of a container address.
pub fn flush_address(pins: &Pins, ip: Ipv4Addr) -> Result<usize> {
    let addr = ip.octets();
    flush_matching(pins, |e| {
        [&e.original, &e.reply]
            .iter()
            .any(|k| ends(k).contains(&addr))
    })
}

/// Removes the flows of a network's containers.
pub fn flush_network(pins: &Pins, subnet: Ipv4Net) -> Result<usize> {
    flush_matching(pins, |e| {
        [&e.original, &e.reply]
            .iter()
            .any(|k| ends(k).iter().any(|a| subnet.contains(&Ipv4Addr::from(*a))))
    })
}

fn flush_matching(pins: &Pins, matches: impl Fn(&CtEntry) -> bool) -> Result<usize> {
    let doomed: Vec<CtKey> = entries(pins)?
        .into_iter()
        .filter(|(_, e)| matches(e))
        .map(|(k, _)| k)
        .collect();
    remove_keys(pins, &doomed)
}

/// Removes `doomed` from whichever table holds each. Returns how many entries went.
fn remove_keys(pins: &Pins, doomed: &[CtKey]) -> Result<usize> {
    let mut removed = 0;
    for mut table in maps::conntrack(pins)? {
        for key in doomed {
            // The datapath or the LRU may have removed it meanwhile.
            if table.remove(key).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

fn ends(key: &CtKey) -> [[u8; 4]; 2] {
    [v4_octets(&key.saddr), v4_octets(&key.daddr)]
}

fn ip(addr: &Addr) -> Ipv4Addr {
    Ipv4Addr::from(v4_octets(addr))
}

fn tuple(key: &CtKey, packets: u64, bytes: u64) -> Tuple {
    Tuple {
        src: ip(&key.saddr),
        dst: ip(&key.daddr),
        sport: key.sport,
        dport: key.dport,
        packets,
        bytes,
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        _ => "other",
    }
}

fn state_name(e: &CtEntry) -> &'static str {
    if e.original.proto != IPPROTO_TCP {
        return if e.flags & CT_ASSURED != 0 {
            "ASSURED"
        } else if e.flags & CT_SEEN_REPLY != 0 {
            "REPLIED"
        } else {
            "UNREPLIED"
        };
    }
    match e.state {
        CT_NEW => "NONE",
        CT_SYN_SENT => "SYN_SENT",
        CT_SYN_RECV => "SYN_RECV",
        CT_ESTABLISHED => "ESTABLISHED",
        CT_FIN_WAIT => "FIN_WAIT",
        CT_TIME_WAIT => "TIME_WAIT",
        CT_CLOSE => "CLOSE",
        _ => "UNKNOWN",
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
