//! Drop events: every packet a program drops is reported on the `DROP_EVENTS` ring buffer
//! (read by `netd monitor`), next to its count in `STATS` and `ENDPOINT_DROPS`.

use aya_ebpf::{macros::map, maps::RingBuf};
use netd_common::datapath::{AF_INET, AF_INET6, Addr, DROP_EVENTS_BYTES, DropEvent, Stat};

use super::{conntrack::v4, ipv6::Packet, parse::Flow, stats};

#[map]
static DROP_EVENTS: RingBuf = RingBuf::pinned(DROP_EVENTS_BYTES, 0);

/// The 5-tuple of a dropped packet, as far as it was parsed (zero beyond that).
#[derive(Default)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    #[inline(always)]
    pub fn of(flow: &Flow) -> Self {
        Self {
            saddr: flow.saddr,
            daddr: flow.daddr,
            sport: flow.sport,
            dport: flow.dport,
            proto: flow.proto,
        }
    }
}

/// The ends of a dropped IPv6 packet, as far as it was parsed (zero beyond that).
#[derive(Default)]
pub struct Tuple6 {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple6 {
    #[inline(always)]
    pub fn of(p: &Packet) -> Self {
        Self {
            saddr: p.src,
            daddr: p.dst,
            sport: p.sport,
            dport: p.dport,
            proto: p.proto,
        }
    }
}

/// [`dropped`] for an IPv6 packet.
#[inline(always)]
pub fn dropped6(tuple: &Tuple6, reason: Stat, container: u32, ifindex: u32) -> Stat {
    stats::count_endpoint_drop(container, reason);
    submit(DropEvent {
        saddr: tuple.saddr,
        daddr: tuple.daddr,
        sport: tuple.sport,
        dport: tuple.dport,
        proto: tuple.proto,
        family: AF_INET6,
        _pad: [0; 2],
        reason: reason as u32,
        ifindex,
    });
    reason
}

/// A packet of the container at `container` (wire byte order) dropped for `reason` on
/// interface `ifindex`: counted against the container and reported. Returns `reason` (the
/// caller's verdict counts it in `STATS`).
#[inline(always)]
pub fn dropped(tuple: &Tuple, reason: Stat, container: u32, ifindex: u32) -> Stat {
    stats::count_endpoint_drop(container, reason);
    report_drop(tuple, reason, ifindex);
    reason
}

/// Reports a packet dropped for `reason`. A full ring buffer loses the event; the counters
/// still have the drop.
#[inline(always)]
fn report_drop(tuple: &Tuple, reason: Stat, ifindex: u32) {
    submit(DropEvent {
        saddr: v4(tuple.saddr),
        daddr: v4(tuple.daddr),
        sport: tuple.sport,
        dport: tuple.dport,
        proto: tuple.proto,
        family: AF_INET,
        _pad: [0; 2],
        reason: reason as u32,
        ifindex,
    });
}

#[inline(always)]
fn submit(event: DropEvent) {
    if let Some(mut entry) = DROP_EVENTS.reserve::<DropEvent>(0) {
        entry.write(event);
        entry.submit(0);
    }
}
