//! Connection tracking: one LRU entry per direction of each flow, keyed by the tuple as it is
//! seen where the flow is translated (the uplink; the bridge for hairpin flows). The original-direction entry holds the flow's state, timestamps and
//! counters; the reply-direction entry points back to it. An entry whose flow has timed out
//! (netfilter's timeouts, from `Config`) is treated as absent, and overwritten when its tuple
//! is needed again.
//!
//! A full table: every new flow is admitted, the LRU map makes room by evicting the least
//! recently used entries, so idle flows go first and active ones (refreshed by each packet)
//! stay. A packet of an evicted flow starts a new flow when it leaves, and passes to the host
//! untranslated when it arrives. An insert that fails anyway is dropped and counted
//! (`conntrack_full`).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
    programs::TcContext,
};
use netd_common::datapath::{
    AF_INET, Addr, CONNTRACK_DEFAULT_MAX, CT_CLOSE, CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_ESTABLISHED,
    CT_FIN_ORIGINAL, CT_FIN_REPLY, CT_FIN_WAIT, CT_NAT_DNAT, CT_NAT_HAIRPIN, CT_NAT_SNAT, CT_NEW,
    CT_REWRITE_BOTH, CT_REWRITE_DST, CT_REWRITE_SRC, CT_SEEN_REPLY, CT_SYN_RECV, CT_SYN_SENT,
    CT_TIME_WAIT, Config, CtEntry, CtKey, IPPROTO_TCP, Stat, Timeouts,
};

use super::{nat::Rewrite, parse::Flow, sockets};

/// Sized by the loader (`map_max_entries`); this is the default.
#[map]
static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CONNTRACK_DEFAULT_MAX, 0);

/// Where new entries are built: a `CtEntry` (176 bytes) next to the keys and the parsed
/// packet would not fit in the 512-byte BPF stack.
#[map]
static SCRATCH: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(1, 0);

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// How many source ports (echo ids) masquerade tries before dropping a new flow: the
/// original one, then random ones.
const PORT_TRIES: u32 = 8;
/// Translated ports come from 1024..=65535 when the original one is taken.
const PORT_MIN: u32 = 1024;
const PORT_SPAN: u32 = 65536 - PORT_MIN;

const NS_PER_SEC: u64 = 1_000_000_000;

/// The conntrack key of a parsed packet.
#[inline(always)]
pub fn key_of(flow: &Flow) -> CtKey {
    CtKey {
        saddr: v4(flow.saddr),
        daddr: v4(flow.daddr),
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        family: AF_INET,
        _pad: [0; 2],
    }
}

#[inline(always)]
pub fn v4(addr: u32) -> Addr {
    [addr, 0, 0, 0]
}

/// What a tracked packet gets: its entry's rewrite (for hairpin flows: of the destination,
/// and `second` of the source), and the kind of translation.
pub struct Hit {
    pub rewrite: Rewrite,
    pub second: Option<Rewrite>,
    pub nat: u8,
}

/// Looks `key` up among hairpin flows (`hairpin`) or the others: each attach point sees one
/// kind. For a packet of a live flow, advances the flow's state, counts the packet and
/// returns the rewrite its direction needs.
#[inline(always)]
pub fn track(
    key: &CtKey,
    flow: &Flow,
    len: u32,
    now: u64,
    cfg: &Config,
    hairpin: bool,
) -> Option<Hit> {
    let (entry, state) = live_flow(key, now, &cfg.timeouts)?;
    // SAFETY: both point into map values; concurrent updates race only on counters and
    // state, which tolerate a lost update.
    let (entry, state) = unsafe { (&*entry, &mut *state) };
    if (entry.nat == CT_NAT_HAIRPIN) != hairpin {
        return None;
    }
    advance(state, entry.dir, flow.tcp_flags);
    state.last_seen_ns = now;
    let dir = usize::from(entry.dir & 1);
    state.packets[dir] += 1;
    state.bytes[dir] += u64::from(len);
    let second = (entry.rewrite == CT_REWRITE_BOTH).then_some(Rewrite {
        src: true,
        addr: entry.nat2_addr[0],
        port: entry.nat2_port,
    });
    Some(Hit {
        rewrite: Rewrite {
            src: entry.rewrite == CT_REWRITE_SRC,
            addr: entry.nat_addr[0],
            port: entry.nat_port,
        },
        second,
        nat: entry.nat,
    })
}

/// The rewrite for packets matching `key`, if it belongs to a live flow translated on the
/// uplink, without counting a packet (for ICMP errors about the flow).
#[inline(always)]
pub fn rewrite_for(key: &CtKey, now: u64, cfg: &Config) -> Option<Rewrite> {
    let (entry, _) = live_flow(key, now, &cfg.timeouts)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let entry = unsafe { &*entry };
    if entry.nat == CT_NAT_HAIRPIN {
        return None;
    }
    Some(Rewrite {
        src: entry.rewrite == CT_REWRITE_SRC,
        addr: entry.nat_addr[0],
        port: entry.nat_port,
    })
}

/// Whether `key` belongs to a live flow (of any kind), without counting a packet.
#[inline(always)]
pub fn is_live(key: &CtKey, now: u64, cfg: &Config) -> bool {
    live_flow(key, now, &cfg.timeouts).is_some()
}

/// The entry matching `key` and its flow's original-direction entry, if the flow is live:
/// not timed out, and (for a reply entry) still the flow that owns the tuple.
#[inline(always)]
fn live_flow(key: &CtKey, now: u64, timeouts: &Timeouts) -> Option<(*mut CtEntry, *mut CtEntry)> {
    let entry = CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let e = unsafe { &*entry };
    let state = if e.dir == CT_DIR_ORIGINAL {
        entry
    } else {
        let state = CONNTRACK.get_ptr_mut(&e.original)?;
        // SAFETY: as above.
        if unsafe { (*state).reply } != *key {
            return None;
        }
        state
    };
    // SAFETY: as above.
    let s = unsafe { &*state };
    let age = now.saturating_sub(s.last_seen_ns);
    if age > u64::from(s.timeout_secs(timeouts)) * NS_PER_SEC {
        return None;
    }
    Some((entry, state))
}

/// Moves the flow's state on for a packet in direction `dir` (a simplified netfilter TCP
/// machine: handshake, FIN from each side, RST).
#[inline(always)]
fn advance(s: &mut CtEntry, dir: u8, tcp: u8) {
    if dir == CT_DIR_REPLY {
        s.flags |= CT_SEEN_REPLY;
    }
    if s.original.proto != IPPROTO_TCP {
        if s.flags & CT_SEEN_REPLY != 0 {
            s.state = CT_ESTABLISHED;
        }
        return;
    }
    if tcp & TCP_RST != 0 {
        s.state = CT_CLOSE;
        return;
    }
    if tcp & TCP_FIN != 0 {
        s.flags |= if dir == CT_DIR_REPLY {
            CT_FIN_REPLY
        } else {
            CT_FIN_ORIGINAL
        };
        let both = CT_FIN_ORIGINAL | CT_FIN_REPLY;
        s.state = if s.flags & both == both {
            CT_TIME_WAIT
        } else {
            CT_FIN_WAIT
        };
        return;
    }
    let syn_ack = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    s.state = match (s.state, dir) {
        (CT_SYN_SENT, CT_DIR_REPLY) if syn_ack => CT_SYN_RECV,
        (CT_SYN_RECV, CT_DIR_ORIGINAL) if tcp & TCP_ACK != 0 => CT_ESTABLISHED,
        // A new connection reusing the tuple of a closed one.
        (CT_CLOSE | CT_TIME_WAIT, CT_DIR_ORIGINAL) if tcp & (TCP_SYN | TCP_ACK) == TCP_SYN => {
            s.flags = 0;
            CT_SYN_SENT
        }
        (state, _) => state,
    };
}

/// Whether a packet that matches no flow may start one: not a TCP RST (nothing to answer).
#[inline(always)]
pub fn may_start_flow(flow: &Flow) -> bool {
    !(flow.proto == IPPROTO_TCP && flow.tcp_flags & TCP_RST != 0)
}

/// Starts a masqueraded flow for the packet `key`/`flow` leaving from `host`: keeps the
/// source port (echo id) when no live flow and no host socket uses it on `host` towards the
/// same destination, else takes a random free one. Returns the rewrite for this packet.
#[inline(always)]
pub fn start_snat(
    ctx: &TcContext,
    key: &CtKey,
    flow: &Flow,
    host: u32,
    len: u32,
    now: u64,
    cfg: &Config,
) -> Result<Rewrite, Stat> {
    let e = scratch_flow(key, flow, len, now)?;
    e.nat = CT_NAT_SNAT;
    // The reply entry: from the destination back to host:port, rewritten to the container.
    e.reply = CtKey {
        saddr: key.daddr,
        daddr: v4(host),
        sport: key.dport,
        dport: key.sport,
        ..*key
    };
    e.dir = CT_DIR_REPLY;
    e.rewrite = CT_REWRITE_DST;
    e.nat_addr = key.saddr;
    e.nat_port = key.sport;
    let port = claim_reply_tuple(ctx, e, now, &cfg.timeouts)?;
    // The original entry: from the container, rewritten to host:port.
    e.dir = CT_DIR_ORIGINAL;
    e.rewrite = CT_REWRITE_SRC;
    e.nat_addr = v4(host);
    e.nat_port = port;
    insert_original(key, e)?;
    Ok(Rewrite {
        src: true,
        addr: host,
        port,
    })
}

/// Starts a flow to a published port: `key` arrives for host:port and goes to `target`:
/// `target_port`. Returns the rewrite for this packet.
#[inline(always)]
pub fn start_dnat(
    key: &CtKey,
    flow: &Flow,
    target: u32,
    target_port: u16,
    len: u32,
    now: u64,
) -> Result<Rewrite, Stat> {
    let e = scratch_flow(key, flow, len, now)?;
    e.nat = CT_NAT_DNAT;
    // The reply entry: from the container back to the client, rewritten to host:port.
    e.reply = CtKey {
        saddr: v4(target),
        daddr: key.saddr,
        sport: target_port,
        dport: key.sport,
        ..*key
    };
    e.dir = CT_DIR_REPLY;
    e.rewrite = CT_REWRITE_SRC;
    e.nat_addr = key.daddr;
    e.nat_port = key.dport;
    // The client picked its port, nothing to choose: a stale owner of the tuple is replaced.
    CONNTRACK
        .insert(&e.reply, &*e, u64::from(BPF_ANY))
        .map_err(|_| Stat::ConntrackFull)?;
    // The original entry: from the client, rewritten to the container.
    e.dir = CT_DIR_ORIGINAL;
    e.rewrite = CT_REWRITE_DST;
    e.nat_addr = v4(target);
    e.nat_port = target_port;
    insert_original(key, e)?;
    Ok(Rewrite {
        src: false,
        addr: target,
        port: target_port,
    })
}

/// Starts a hairpin flow: `key` goes from a container to host:port, published as `target`:
/// `target_port`; it leaves with the destination rewritten to the target and the source to
/// the container network's `gateway` and a port free towards the target (so the target's
/// replies come back through the bridge, where they are translated back). Returns the
/// destination and source rewrites for this packet.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn start_hairpin(
    ctx: &TcContext,
    key: &CtKey,
    flow: &Flow,
    target: u32,
    target_port: u16,
    gateway: u32,
    len: u32,
    now: u64,
    cfg: &Config,
) -> Result<(Rewrite, Rewrite), Stat> {
    let e = scratch_flow(key, flow, len, now)?;
    e.nat = CT_NAT_HAIRPIN;
    e.rewrite = CT_REWRITE_BOTH;
    // The reply entry: from the target to gateway:port, back to host:port → container.
    e.reply = CtKey {
        saddr: v4(target),
        daddr: v4(gateway),
        sport: target_port,
        dport: key.sport,
        ..*key
    };
    e.dir = CT_DIR_REPLY;
    e.nat_addr = key.saddr;
    e.nat_port = key.sport;
    e.nat2_addr = key.daddr;
    e.nat2_port = key.dport;
    let port = claim_reply_tuple(ctx, e, now, &cfg.timeouts)?;
    // The original entry: container → host:port, to gateway:port → target.
    e.dir = CT_DIR_ORIGINAL;
    e.nat_addr = v4(target);
    e.nat_port = target_port;
    e.nat2_addr = v4(gateway);
    e.nat2_port = port;
    insert_original(key, e)?;
    Ok((
        Rewrite {
            src: false,
            addr: target,
            port: target_port,
        },
        Rewrite {
            src: true,
            addr: gateway,
            port,
        },
    ))
}

/// The per-CPU scratch entry, filled with a new flow's common fields.
#[inline(always)]
fn scratch_flow(
    key: &CtKey,
    flow: &Flow,
    len: u32,
    now: u64,
) -> Result<&'static mut CtEntry, Stat> {
    let ptr = SCRATCH.get_ptr_mut(0).ok_or(Stat::ConntrackFull)?;
    // SAFETY: per-CPU slot, used only within this program run.
    let e = unsafe { &mut *ptr };
    e.original = *key;
    e.state = match flow.proto {
        IPPROTO_TCP if flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN => CT_SYN_SENT,
        // Picked up mid-stream (netfilter's loose pickup), e.g. after a conntrack flush.
        IPPROTO_TCP => CT_ESTABLISHED,
        _ => CT_NEW,
    };
    e.flags = 0;
    e._pad = 0;
    e.rewrite = 0;
    e.nat2_addr = [0; 4];
    e.nat2_port = 0;
    e._pad2 = [0; 6];
    e.created_ns = now;
    e.last_seen_ns = now;
    e.packets = [1, 0];
    e.bytes = [u64::from(len), 0];
    Ok(e)
}

/// Inserts the reply entry `e`, changing its destination port (the translated source port)
/// until the tuple is free (no host socket, no live flow holds it). Returns the port.
#[inline(always)]
fn claim_reply_tuple(
    ctx: &TcContext,
    e: &mut CtEntry,
    now: u64,
    timeouts: &Timeouts,
) -> Result<u16, Stat> {
    for attempt in 0..PORT_TRIES {
        if attempt > 0 {
            // SAFETY: a helper without preconditions.
            let random = unsafe { bpf_get_prandom_u32() };
            e.reply.dport = (PORT_MIN + random % PORT_SPAN) as u16;
        }
        if sockets::host_socket_owns(ctx, &e.reply) {
            continue;
        }
        if CONNTRACK
            .insert(&e.reply, &*e, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Ok(e.reply.dport);
        }
        if live_flow(&e.reply, now, timeouts).is_none()
            && CONNTRACK.insert(&e.reply, &*e, u64::from(BPF_ANY)).is_ok()
        {
            return Ok(e.reply.dport);
        }
    }
    Err(Stat::PortExhausted)
}

/// Inserts the original entry of a flow whose reply entry is in place (removed again on
/// failure, so no half flow stays).
#[inline(always)]
fn insert_original(key: &CtKey, e: &CtEntry) -> Result<(), Stat> {
    if CONNTRACK.insert(key, e, u64::from(BPF_ANY)).is_err() {
        let _ = CONNTRACK.remove(&e.reply);
        return Err(Stat::ConntrackFull);
    }
    Ok(())
}
