//! Connection tracking: one LRU entry per direction of each flow, keyed by the tuple as it is
//! seen where the flow is translated (the uplink; the bridge for hairpin flows). The
//! original-direction entry holds the flow's state, timestamps and counters; the reply-direction
//! entry points back to it. An entry whose flow has timed out (netfilter's timeouts, from
//! `Config`) is treated as absent, and overwritten when its tuple is needed again. A SYN
//! reopening a closed flow's tuple starts a new flow, checked as any other; a new flow with a
//! finished flow's tuple and translation takes that flow's entries over in place.
//!
//! Under pressure: a flow starts in `CONNTRACK_NEW` and moves to `CONNTRACK` once assured (a
//! TCP handshake completed and answered; a UDP or ICMP flow answered and still going after
//! `CT_ASSURE_AFTER_NS`), so a flood of new flows (spoofed SYNs, a container's UDP storm) only
//! evicts other unassured flows, as netfilter's early drop does. A container or a network may
//! be capped (`CT_LIMITS`): its new flows over the cap are dropped (`conntrack_limit`).
//!
//! No wrong delivery: an entry is trusted only while its flow's other entry points back at it
//! (checked on every hit), so an entry whose partner was evicted, or whose tuple another flow
//! took since, is never used; a tuple is taken for a new flow only when no live flow holds it
//! and no other CPU is creating one with it. Translated ports stay in `Config`'s NAT range
//! (outside the host's ephemeral ports) and off published ports.
//!
//! An insert that fails anyway is dropped and counted (`conntrack_full`).

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::bpf_get_prandom_u32,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use netd_common::datapath::{
    AF_INET, Addr, CONNTRACK_DEFAULT_MAX, CT_ASSURE_AFTER_NS, CT_ASSURED, CT_CLOSE,
    CT_DIR_ORIGINAL, CT_DIR_REPLY, CT_ESTABLISHED, CT_FIN_ORIGINAL, CT_FIN_REPLY, CT_FIN_WAIT,
    CT_LIMITS_MAX, CT_NAT_DNAT, CT_NAT_HAIRPIN, CT_NAT_SNAT, CT_NEW, CT_REWRITE_BOTH,
    CT_REWRITE_DST, CT_REWRITE_SRC, CT_SEEN_REPLY, CT_SYN_RECV, CT_SYN_SENT, CT_TAKE_OVER_TIMEOUTS,
    CT_TIME_WAIT, Config, CtEntry, CtKey, CtLimit, CtLimitKey, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP, PublishedTarget, Stat, TcpWindow, Timeouts,
};

use super::{
    maps,
    nat::Rewrite,
    parse::{Flow, Quoted},
    sockets, stats,
    tcp_window::{self, Segment},
};

/// Assured flows. Sized by the loader (`map_max_entries`); this is the default.
#[map]
static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CONNTRACK_DEFAULT_MAX, 0);
/// Flows not assured yet, sized like `CONNTRACK`.
#[map]
static CONNTRACK_NEW: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CONNTRACK_DEFAULT_MAX, 0);
/// Flow caps of containers and networks, and their counts.
#[map]
static CT_LIMITS: HashMap<CtLimitKey, CtLimit> = HashMap::pinned(CT_LIMITS_MAX, 0);

/// Where new entries are built: a `CtEntry` (192 bytes) next to the keys and the parsed
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
/// The NAT range when `Config` has none (a datapath configured by an older netd).
const PORT_MIN: u16 = 1024;
const PORT_MAX: u16 = 65535;
/// A reply entry younger than this whose original entry isn't there yet is a flow another
/// CPU is creating: its tuple is not free.
const CLAIM_GRACE_NS: u64 = 1_000_000_000;
/// How long a TCP flow closed by FINs (TIME_WAIT) holds its tuple before a new connection
/// may take it over. A flow closed by a RST gives it up at once.
const TIME_WAIT_REUSE_NS: u64 = 1_000_000_000;

/// What conntrack reads of a packet it tracks, and what it looks up in the packet's family
/// (a type for each, so no program carries a branch on the family it doesn't take).
pub trait Tracked {
    fn proto(&self) -> u8;
    /// The TCP flags byte (0 for other protocols).
    fn tcp_flags(&self) -> u8;
    /// The TCP segment, when the packet carries all of it.
    fn segment(&self, ctx: &TcContext) -> Option<Segment>;
    /// Whether the reply tuple `reply` ends at a published port (a translated flow must not
    /// take it).
    fn published(reply: &CtKey, cfg: &Config) -> bool;
    /// Whether a host socket would receive packets with the tuple `incoming`.
    fn host_socket_owns(ctx: &TcContext, incoming: &CtKey) -> bool;
}

impl Tracked for Flow {
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }

    #[inline(always)]
    fn tcp_flags(&self) -> u8 {
        self.tcp_flags
    }

    #[inline(always)]
    fn segment(&self, ctx: &TcContext) -> Option<Segment> {
        tcp_window::segment(ctx, self)
    }

    #[inline(always)]
    fn published(reply: &CtKey, cfg: &Config) -> bool {
        reply.proto != IPPROTO_ICMP
            && maps::published(reply.daddr[0], reply.dport, reply.proto, cfg, true).is_some()
    }

    #[inline(always)]
    fn host_socket_owns(ctx: &TcContext, incoming: &CtKey) -> bool {
        sockets::host_socket_owns(ctx, incoming)
    }
}

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

/// The table of assured flows, or of the others.
#[inline(always)]
fn table(assured: bool) -> &'static LruHashMap<CtKey, CtEntry> {
    if assured { &CONNTRACK } else { &CONNTRACK_NEW }
}

/// What a tracked packet gets: its entry's rewrite (for hairpin flows: of the destination,
/// and `second` of the source), and the kind of translation.
pub struct Hit {
    pub rewrite: Rewrite,
    pub second: Option<Rewrite>,
    pub nat: u8,
}

/// Where a packet is looked up: each attach point translates its own kind of entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Arriving on the uplink: replies of masqueraded flows, originals of published ones.
    In,
    /// Leaving on the uplink: originals of masqueraded flows, replies of published ones.
    Out,
    /// On a bridge: hairpin flows, both ways.
    Hairpin,
}

/// Whether `entry` is one packets on `path` are translated by: a packet matching an entry of
/// the other direction (a spoofed copy of a flow's own packets, sent back at the host) is no
/// packet of the flow.
#[inline(always)]
fn on_path(entry: &CtEntry, path: Path) -> bool {
    let arrives = (entry.nat == CT_NAT_SNAT) == (entry.dir == CT_DIR_REPLY);
    match path {
        Path::Hairpin => entry.nat == CT_NAT_HAIRPIN,
        Path::In => entry.nat != CT_NAT_HAIRPIN && arrives,
        Path::Out => entry.nat != CT_NAT_HAIRPIN && !arrives,
    }
}

/// Looks `key` up among the entries of `path`. For a packet of a live flow, advances the
/// flow's state (a TCP RST only when in the window), counts the packet and returns the
/// entry it matched (whose rewrite its direction needs).
#[inline(always)]
pub fn track(
    ctx: &TcContext,
    key: &CtKey,
    flow: &impl Tracked,
    now: u64,
    cfg: &Config,
    path: Path,
) -> Option<&'static CtEntry> {
    let live = live_flow(key, now, &cfg.timeouts)?;
    // SAFETY: pointers into map values; concurrent updates race only on counters and
    // state, which tolerate a lost update.
    let (entry, state) = unsafe { (&*live.entry, &mut *live.state) };
    if !on_path(entry, path) {
        return None;
    }
    let dir = entry.dir;
    if reopens(state, dir, flow) {
        return None;
    }
    if flow.proto() == IPPROTO_TCP {
        let Some(seg) = flow.segment(ctx) else {
            return Some(entry);
        };
        if !advance_tcp(state, dir, flow.tcp_flags(), &seg) {
            stats::count(Stat::RstOutOfWindow);
            return Some(entry);
        }
    } else {
        advance_other(state, dir);
    }
    state.last_seen_ns = now;
    let i = usize::from(dir & 1);
    state.packets[i] += 1;
    state.bytes[i] += u64::from(ctx.len());
    if state.flags & CT_ASSURED == 0 && assured(state, now) {
        // The flow's other entry than its state: the partner of an original-direction
        // packet's entry, the entry a reply-direction packet matched.
        let reply = if live.entry == live.state {
            live.partner
        } else {
            live.entry
        };
        promote(live.state, reply);
    }
    Some(entry)
}

/// Whether the packet, in direction `dir` of the flow whose state is `s`, is a SYN opening a
/// new connection on a closed flow's tuple. That is a new flow, not a packet of this one:
/// every check a new flow gets runs again (its port may have been unpublished, or published
/// to another container, since), as netfilter kills a closed conntrack entry a SYN reopens.
/// Starting it takes the entries over in place when its translation is the same
/// ([`take_over`]).
#[inline(always)]
fn reopens(s: &CtEntry, dir: u8, flow: &impl Tracked) -> bool {
    dir == CT_DIR_ORIGINAL
        && flow.proto() == IPPROTO_TCP
        && flow.tcp_flags() & (TCP_SYN | TCP_ACK) == TCP_SYN
        && matches!(s.state, CT_CLOSE | CT_TIME_WAIT)
}

/// The rewrites of IPv4 packets matching `entry`.
#[inline(always)]
pub fn hit_of(entry: &CtEntry) -> Hit {
    let second = (entry.rewrite == CT_REWRITE_BOTH).then_some(Rewrite {
        src: true,
        addr: entry.nat2_addr[0],
        port: entry.nat2_port,
    });
    Hit {
        rewrite: Rewrite {
            src: entry.rewrite == CT_REWRITE_SRC,
            addr: entry.nat_addr[0],
            port: entry.nat_port,
        },
        second,
        nat: entry.nat,
    }
}

/// The key of the flow an IPv4 ICMP error quoting `q` is about: the quoted packet went the
/// other way, so its tuple reversed.
#[inline(always)]
pub fn quoted_key(q: &Quoted) -> CtKey {
    CtKey {
        saddr: v4(q.daddr),
        daddr: v4(q.saddr),
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        family: AF_INET,
        _pad: [0; 2],
    }
}

/// The entry of the live flow `key` (the reversed quoted tuple of an ICMP error) translated
/// on `path`, which says how the error travels; no packet is counted.
#[inline(always)]
pub fn flow_of_error(key: &CtKey, now: u64, cfg: &Config, path: Path) -> Option<&'static CtEntry> {
    let live = live_flow(key, now, &cfg.timeouts)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let entry = unsafe { &*live.entry };
    on_path(entry, path).then_some(entry)
}

/// Whether `key` belongs to a live flow (of any kind), without counting a packet.
#[inline(always)]
pub fn is_live(key: &CtKey, now: u64, cfg: &Config) -> bool {
    live_flow(key, now, &cfg.timeouts).is_some()
}

/// A live flow's entries: the one a packet matched, the original-direction one (the
/// flow's state) and the other direction's.
struct Live {
    entry: *mut CtEntry,
    state: *mut CtEntry,
    partner: *mut CtEntry,
}

/// The entries of the live flow `key` belongs to: not timed out, and both entries pointing
/// at each other. The assured table is asked first; a stale entry there doesn't hide a
/// newer flow with the same tuple among the unassured ones.
#[inline(always)]
fn live_flow(key: &CtKey, now: u64, timeouts: &Timeouts) -> Option<Live> {
    live_among(
        CONNTRACK.get_ptr_mut(key),
        || CONNTRACK_NEW.get_ptr_mut(key),
        now,
        timeouts,
    )
}

/// [`live_flow`] on the entries a tuple has in the assured table (`assured`) and in the
/// other (`unassured`, looked up only when the assured one is no live flow's).
#[inline(always)]
fn live_among(
    assured: Option<*mut CtEntry>,
    unassured: impl FnOnce() -> Option<*mut CtEntry>,
    now: u64,
    timeouts: &Timeouts,
) -> Option<Live> {
    if let Some(live) = assured.and_then(|entry| consistent(entry, now, timeouts)) {
        return Some(live);
    }
    consistent(unassured()?, now, timeouts)
}

/// `entry` as part of a live flow, if its partner points back at it and
/// the flow has not timed out.
#[inline(always)]
fn consistent(entry: *mut CtEntry, now: u64, timeouts: &Timeouts) -> Option<Live> {
    let flow = paired(entry)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    (!timed_out(unsafe { &*flow.state }, now, timeouts)).then_some(flow)
}

/// Whether the flow of original entry `s` has been idle longer than its state allows.
#[inline(always)]
fn timed_out(s: &CtEntry, now: u64, timeouts: &Timeouts) -> bool {
    now.saturating_sub(s.last_seen_ns) > s.timeout_ns(timeouts)
}

/// `entry` and its partner, if the partner points back at it (the flow may have timed out).
#[inline(always)]
fn paired(entry: *mut CtEntry) -> Option<Live> {
    // SAFETY: a pointer into the map value, valid for this program run.
    let e = unsafe { &*entry };
    let other_key = if e.dir == CT_DIR_ORIGINAL {
        &e.reply
    } else {
        &e.original
    };
    let partner = partner_of(other_key, e.flags & CT_ASSURED != 0)?;
    // SAFETY: as above.
    let p = unsafe { &*partner };
    // The two entries are of one flow (each is keyed by its own tuple, so this is both
    // pointing at the other) and of opposite directions.
    if p.dir == e.dir || p.original != e.original || p.reply != e.reply {
        return None;
    }
    let state = if e.dir == CT_DIR_ORIGINAL {
        entry
    } else {
        partner
    };
    Some(Live {
        entry,
        state,
        partner,
    })
}

/// The flow's other entry, in the table the entry says, or (while a promotion is half done
/// on another CPU) in the other one.
#[inline(always)]
fn partner_of(key: &CtKey, assured: bool) -> Option<*mut CtEntry> {
    table(assured)
        .get_ptr_mut(key)
        .or_else(|| table(!assured).get_ptr_mut(key))
}

/// Whether the flow of original entry `s` is assured: TCP established and answered; UDP and
/// ICMP answered and still going after `CT_ASSURE_AFTER_NS`.
#[inline(always)]
fn assured(s: &CtEntry, now: u64) -> bool {
    if s.flags & CT_SEEN_REPLY == 0 {
        return false;
    }
    if s.original.proto == IPPROTO_TCP {
        return s.state == CT_ESTABLISHED;
    }
    now.saturating_sub(s.created_ns) >= CT_ASSURE_AFTER_NS
}

/// Moves the flow of original entry `state` and its reply entry `partner` to the assured
/// table (the original first: a packet finding one there finds its partner in either table).
#[inline(always)]
fn promote(state: *mut CtEntry, partner: *mut CtEntry) {
    // SAFETY: pointers into map values, valid for this program run.
    let (s, p) = unsafe { (&mut *state, &mut *partner) };
    s.flags |= CT_ASSURED;
    p.flags |= CT_ASSURED;
    let (original, reply) = (s.original, s.reply);
    let moved = CONNTRACK.insert(&original, &*s, u64::from(BPF_ANY)).is_ok()
        && CONNTRACK.insert(&reply, &*p, u64::from(BPF_ANY)).is_ok();
    if !moved {
        // Stays unassured; the next packet tries again.
        let _ = CONNTRACK.remove(&original);
        s.flags &= !CT_ASSURED;
        p.flags &= !CT_ASSURED;
        return;
    }
    let _ = CONNTRACK_NEW.remove(&original);
    let _ = CONNTRACK_NEW.remove(&reply);
}

/// Moves a UDP or ICMP flow's state on for a packet in direction `dir`.
#[inline(always)]
fn advance_other(s: &mut CtEntry, dir: u8) {
    if dir == CT_DIR_REPLY {
        s.flags |= CT_SEEN_REPLY;
        s.state = CT_ESTABLISHED;
    }
}

/// Moves a TCP flow's state on for segment `seg` in direction `dir` (a simplified netfilter
/// TCP machine: handshake, FIN from each side, RST within the window). Returns false, with
/// nothing changed, for a RST outside the window (RFC 5961).
#[inline(always)]
fn advance_tcp(s: &mut CtEntry, dir: u8, tcp: u8, seg: &Segment) -> bool {
    if tcp & TCP_RST != 0 {
        if !tcp_window::rst_in_window(&mut s.tcp, dir, seg.seq) {
            return false;
        }
        s.state = CT_CLOSE;
        return true;
    }
    tcp_window::update(&mut s.tcp, dir, seg);
    if dir == CT_DIR_REPLY {
        s.flags |= CT_SEEN_REPLY;
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
        return true;
    }
    let syn_ack = tcp & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    s.state = match (s.state, dir) {
        (CT_SYN_SENT, CT_DIR_REPLY) if syn_ack => CT_SYN_RECV,
        (CT_SYN_RECV, CT_DIR_ORIGINAL) if tcp & TCP_ACK != 0 => CT_ESTABLISHED,
        (state, _) => state,
    };
    true
}

/// Whether a packet that matches no flow may start one: not a TCP RST (nothing to answer).
#[inline(always)]
pub fn may_start_flow(flow: &impl Tracked) -> bool {
    !(flow.proto() == IPPROTO_TCP && flow.tcp_flags() & TCP_RST != 0)
}

/// Starts a masqueraded flow for the packet `key`/`flow` of the container whose IPv4
/// address is `container` (its flows are counted there, both families'), leaving from
/// `host`: keeps the source port (echo id) when it is in the NAT range, not published, and no
/// live flow and no host socket uses it on `host` towards the same destination, else takes a
/// random free one from the range. Returns the source port for this packet.
#[inline(always)]
pub fn start_snat<F: Tracked>(
    ctx: &TcContext,
    key: &CtKey,
    flow: &F,
    container: u32,
    host: Addr,
    now: u64,
    cfg: &Config,
) -> Result<u16, Stat> {
    let e = scratch_flow(ctx, key, flow, now)?;
    e.nat = CT_NAT_SNAT;
    // The reply entry: from the destination back to host:port, rewritten to the container.
    e.reply = CtKey {
        saddr: key.daddr,
        daddr: host,
        sport: key.dport,
        dport: key.sport,
        ..*key
    };
    e.dir = CT_DIR_REPLY;
    e.rewrite = CT_REWRITE_DST;
    e.nat_addr = key.saddr;
    e.nat_port = key.sport;
    let choose_port = has_ports(key.proto);
    if take_over::<F>(ctx, key, e, choose_port, cfg) {
        return Ok(e.reply.dport);
    }
    charge(container)?;
    let port = claim_reply_tuple::<F>(ctx, e, choose_port, now, cfg)?;
    // The original entry: from the container, rewritten to host:port.
    e.dir = CT_DIR_ORIGINAL;
    e.rewrite = CT_REWRITE_SRC;
    e.nat_addr = host;
    e.nat_port = port;
    insert_original(key, e)?;
    Ok(port)
}

/// Starts a flow to a published port: `key` arrives for host:port and goes to `target`
/// (`target.addr`: `target.port`), the container whose IPv4 address is `container` (its flows
/// are counted there).
#[inline(always)]
pub fn start_dnat<F: Tracked>(
    ctx: &TcContext,
    key: &CtKey,
    flow: &F,
    target: &PublishedTarget,
    container: u32,
    now: u64,
    cfg: &Config,
) -> Result<(), Stat> {
    let e = scratch_flow(ctx, key, flow, now)?;
    e.nat = CT_NAT_DNAT;
    // The reply entry: from the container back to the client, rewritten to host:port.
    e.reply = CtKey {
        saddr: target.addr,
        daddr: key.saddr,
        sport: target.port,
        dport: key.sport,
        ..*key
    };
    e.dir = CT_DIR_REPLY;
    e.rewrite = CT_REWRITE_SRC;
    e.nat_addr = key.daddr;
    e.nat_port = key.dport;
    if take_over::<F>(ctx, key, e, false, cfg) {
        return Ok(());
    }
    charge(container)?;
    // The client picked its port: the tuple is free or the flow is refused.
    claim_reply_tuple::<F>(ctx, e, false, now, cfg)?;
    // The original entry: from the client, rewritten to the container.
    e.dir = CT_DIR_ORIGINAL;
    e.rewrite = CT_REWRITE_DST;
    e.nat_addr = target.addr;
    e.nat_port = target.port;
    insert_original(key, e)
}

/// Starts a hairpin flow: `key` goes from the container whose IPv4 address is `container`
/// (its flows are counted there, both families') to host:port, published as `target`; it
/// leaves with the destination rewritten to the target and the source to the container
/// network's `gateway` and a port free towards the target (so the target's replies come back
/// through the bridge, where they are translated back). Returns the source port for this
/// packet.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn start_hairpin<F: Tracked>(
    ctx: &TcContext,
    key: &CtKey,
    flow: &F,
    target: &PublishedTarget,
    container: u32,
    gateway: Addr,
    now: u64,
    cfg: &Config,
) -> Result<u16, Stat> {
    let e = scratch_flow(ctx, key, flow, now)?;
    e.nat = CT_NAT_HAIRPIN;
    e.rewrite = CT_REWRITE_BOTH;
    // The reply entry: from the target to gateway:port, back to host:port → container.
    e.reply = CtKey {
        saddr: target.addr,
        daddr: gateway,
        sport: target.port,
        dport: key.sport,
        ..*key
    };
    e.dir = CT_DIR_REPLY;
    e.nat_addr = key.saddr;
    e.nat_port = key.sport;
    e.nat2_addr = key.daddr;
    e.nat2_port = key.dport;
    let choose_port = has_ports(key.proto);
    if take_over::<F>(ctx, key, e, choose_port, cfg) {
        return Ok(e.reply.dport);
    }
    charge(container)?;
    let port = claim_reply_tuple::<F>(ctx, e, choose_port, now, cfg)?;
    // The original entry: container → host:port, to gateway:port → target.
    e.dir = CT_DIR_ORIGINAL;
    e.nat_addr = target.addr;
    e.nat_port = target.port;
    e.nat2_addr = gateway;
    e.nat2_port = port;
    insert_original(key, e)?;
    Ok(port)
}

/// Counts a new flow of the container at `addr` against its cap and its network's; a flow
/// over either is refused.
#[inline(always)]
fn charge(addr: u32) -> Result<(), Stat> {
    let container = CtLimitKey {
        addr: v4(addr),
        network_id: 0,
        family: AF_INET,
        _pad: [0; 3],
    };
    let network = CtLimitKey {
        addr: [0; 4],
        network_id: maps::endpoint(addr).map_or(0, |ep| ep.network_id),
        family: AF_INET,
        _pad: [0; 3],
    };
    let limits = [
        CT_LIMITS.get_ptr_mut(&container),
        CT_LIMITS.get_ptr_mut(&network),
    ];
    for limit in limits.iter().flatten() {
        // SAFETY: a pointer into the map value, valid for this program run.
        let l = unsafe { &**limit };
        if l.count >= l.max {
            return Err(Stat::ConntrackLimit);
        }
    }
    for limit in limits.iter().flatten() {
        // SAFETY: as above. Not atomic (the BPF target has no atomic add in `core`): CPUs
        // racing here may lose a count, letting a flow or two past the cap until the sweep
        // recounts.
        unsafe { (**limit).count += 1 };
    }
    Ok(())
}

/// The per-CPU scratch entry, filled with a new flow's common fields.
#[inline(always)]
fn scratch_flow(
    ctx: &TcContext,
    key: &CtKey,
    flow: &impl Tracked,
    now: u64,
) -> Result<&'static mut CtEntry, Stat> {
    let ptr = SCRATCH.get_ptr_mut(0).ok_or(Stat::ConntrackFull)?;
    // SAFETY: per-CPU slot, used only within this program run.
    let e = unsafe { &mut *ptr };
    e.original = *key;
    e.state = match flow.proto() {
        IPPROTO_TCP if flow.tcp_flags() & (TCP_SYN | TCP_ACK) == TCP_SYN => CT_SYN_SENT,
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
    e.bytes = [u64::from(ctx.len()), 0];
    e.tcp = [TcpWindow::default(); 2];
    if flow.proto() == IPPROTO_TCP
        && let Some(seg) = flow.segment(ctx)
    {
        tcp_window::update(&mut e.tcp, CT_DIR_ORIGINAL, &seg);
    }
    Ok(e)
}

/// The ports a translated source may take, from `Config` (outside the host's ephemeral
/// range): the first and how many.
#[inline(always)]
fn nat_ports(cfg: &Config) -> (u16, u32) {
    let (min, max) = if cfg.nat_port_min == 0 || cfg.nat_port_max < cfg.nat_port_min {
        (PORT_MIN, PORT_MAX)
    } else {
        (cfg.nat_port_min, cfg.nat_port_max)
    };
    (min, u32::from(max - min) + 1)
}

/// Whether `proto` has ports (ICMP: echo identifiers) NAT can choose.
#[inline(always)]
fn has_ports(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP) || is_icmp(proto)
}

/// Whether `proto` is ICMP of either family (echo identifiers for ports).
#[inline(always)]
fn is_icmp(proto: u8) -> bool {
    proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6
}

/// Inserts the reply entry `e` into the unassured table. With `choose_port`, changes its
/// destination port (the translated source port) until the tuple is free: in the NAT range
/// (any echo identifier is), not a published port, held by no host socket and no flow,
/// trying `PORT_TRIES` ports (the first the original one, when in range). Without, the tuple
/// is the only one there is (a client's port; a protocol translated by address). Returns
/// the port.
#[inline(always)]
fn claim_reply_tuple<F: Tracked>(
    ctx: &TcContext,
    e: &mut CtEntry,
    choose_port: bool,
    now: u64,
    cfg: &Config,
) -> Result<u16, Stat> {
    let (min, span) = nat_ports(cfg);
    let (translated, tries) = if choose_port {
        (true, PORT_TRIES)
    } else {
        (false, 1)
    };
    for attempt in 0..tries {
        if translated && (attempt > 0 || !in_nat_range(&e.reply, cfg)) {
            // SAFETY: a helper without preconditions.
            let random = unsafe { bpf_get_prandom_u32() };
            e.reply.dport = min + (random % span) as u16;
        }
        let mut how = 0;
        if translated {
            how |= TAKE_TRANSLATED;
        }
        // Only the last try may take over a closed flow's tuple: a free one is better.
        if attempt + 1 == tries {
            how |= TAKE_REUSING_CLOSED;
        }
        if take_tuple::<F>(ctx, e, how, now, cfg) {
            return Ok(e.reply.dport);
        }
    }
    Err(Stat::PortExhausted)
}

/// Whether the translated source port of reply tuple `reply` is in `Config`'s NAT range (any
/// echo identifier is: they are not ports, no host socket takes one from the ephemeral range).
#[inline(always)]
fn in_nat_range(reply: &CtKey, cfg: &Config) -> bool {
    let (min, span) = nat_ports(cfg);
    is_icmp(reply.proto) || u32::from(reply.dport.wrapping_sub(min)) < span
}

/// `take_tuple`'s `how`: the tuple's destination port is a translated source port.
const TAKE_TRANSLATED: u8 = 1;
/// `take_tuple`'s `how`: a closed TCP flow's tuple may be taken over.
const TAKE_REUSING_CLOSED: u8 = 2;

/// Inserts the reply entry `e` into the unassured table if its tuple is free (see
/// [`tuple_free`]) and, for a translated source port (`how` has `TAKE_TRANSLATED`), neither
/// published nor held by a host socket. Returns whether it did.
///
/// A function of its own (a BPF-to-BPF call) for the verifier: it walks every try of the
/// loop above, and inlined, each way through one try would multiply the ways through the
/// next (the states its paths end in differ); across a call they end in two, taken or not.
#[inline(never)]
fn take_tuple<F: Tracked>(
    ctx: &TcContext,
    e: &mut CtEntry,
    how: u8,
    now: u64,
    cfg: &Config,
) -> bool {
    // Only a translated source can collide with a host socket: a published flow's reply
    // tuple ends at its client, where a host listener on the client's port (matched on any
    // address) has nothing to do with it.
    if how & TAKE_TRANSLATED != 0 && !translated_port_free::<F>(ctx, &e.reply, cfg) {
        return false;
    }
    tuple_free(&e.reply, now, cfg, how & TAKE_REUSING_CLOSED != 0)
        && CONNTRACK_NEW
            .insert(&e.reply, &*e, u64::from(BPF_ANY))
            .is_ok()
}

/// Whether the translated source port of reply tuple `reply` is neither published nor held
/// by a host socket.
#[inline(always)]
fn translated_port_free<F: Tracked>(ctx: &TcContext, reply: &CtKey, cfg: &Config) -> bool {
    !F::published(reply, cfg) && !F::host_socket_owns(ctx, reply)
}

/// Starts the new flow `key` in the entries of the finished flow (closed, or timed out) with
/// the same original tuple, when its translation is the one the new flow gets: the reply
/// tuple of `e` (the new flow's reply entry), its translated port aside with `choose_port`
/// (then it must still be one a new flow could take, and `e` gets it). A client reconnecting
/// from the same port, or a container to the same server from the same port, then costs
/// lookups only, where a new flow's entries are four inserts and two removals. Not charged
/// against the container's and network's caps: it takes no new entries. Returns whether it
/// did.
///
/// A function of its own (a BPF-to-BPF call), as `take_tuple`, so that the verifier's ways
/// through it end in two; `now` is `e`'s creation time (a call takes at most five arguments).
#[inline(never)]
fn take_over<F: Tracked>(
    ctx: &TcContext,
    key: &CtKey,
    e: &mut CtEntry,
    choose_port: bool,
    cfg: &Config,
) -> bool {
    let now = e.created_ns;
    let Some(flow) = finished_flow(CONNTRACK.get_ptr_mut(key), now, &cfg.timeouts)
        .or_else(|| finished_flow(CONNTRACK_NEW.get_ptr_mut(key), now, &cfg.timeouts))
    else {
        return false;
    };
    // SAFETY: a pointer into the map value, valid for this program run.
    let s = unsafe { &mut *flow.state };
    let reply = &s.reply;
    if s.nat != e.nat || !same_but_port(reply, &e.reply, choose_port) {
        return false;
    }
    if choose_port && !(in_nat_range(reply, cfg) && translated_port_free::<F>(ctx, reply, cfg)) {
        return false;
    }
    if claimed_elsewhere(reply, flow.partner, now) {
        return false;
    }
    e.reply.dport = reply.dport;
    // The new flow's state, as `scratch_flow` made it; the entries keep their table.
    s.state = e.state;
    s.flags &= CT_ASSURED;
    s.created_ns = e.created_ns;
    s.last_seen_ns = e.last_seen_ns;
    s.packets = e.packets;
    s.bytes = e.bytes;
    s.tcp = e.tcp;
    true
}

/// Whether tuples `a` and `b` are the same, their destination ports aside with `any_port`
/// (compared field by field: a copy of either would not fit on the stack of every caller).
#[inline(always)]
fn same_but_port(a: &CtKey, b: &CtKey, any_port: bool) -> bool {
    a.saddr == b.saddr
        && a.daddr == b.daddr
        && a.sport == b.sport
        && (any_port || a.dport == b.dport)
        && a.proto == b.proto
        && a.family == b.family
}

/// The flow whose original entry is `entry`, if it is finished (a TCP flow closed by FINs or
/// a RST, or timed out) and not yet a sweep's: idle no longer than `CT_TAKE_OVER_TIMEOUTS`
/// times its timeout.
#[inline(always)]
fn finished_flow(entry: Option<*mut CtEntry>, now: u64, timeouts: &Timeouts) -> Option<Live> {
    let flow = paired(entry?)?;
    // SAFETY: a pointer into the map value, valid for this program run.
    let s = unsafe { &*flow.state };
    let idle = now.saturating_sub(s.last_seen_ns);
    let timeout = s.timeout_ns(timeouts);
    let closed = s.original.proto == IPPROTO_TCP && matches!(s.state, CT_CLOSE | CT_TIME_WAIT);
    let finished = closed || idle > timeout;
    (flow.entry == flow.state && finished && idle <= timeout * CT_TAKE_OVER_TIMEOUTS)
        .then_some(flow)
}

/// Whether another CPU is creating a flow with reply tuple `reply`: an unassured entry of it,
/// younger than `CLAIM_GRACE_NS`, other than `ours`.
#[inline(always)]
fn claimed_elsewhere(reply: &CtKey, ours: *mut CtEntry, now: u64) -> bool {
    CONNTRACK_NEW
        .get_ptr_mut(reply)
        .is_some_and(|other| other != ours && claimed_lately(other, now))
}

/// Whether the unassured entry `e` was made less than `CLAIM_GRACE_NS` ago.
#[inline(always)]
fn claimed_lately(e: *mut CtEntry, now: u64) -> bool {
    // SAFETY: a pointer into the map value, valid for this program run.
    now.saturating_sub(unsafe { (*e).created_ns }) < CLAIM_GRACE_NS
}

/// Whether a new flow may take the tuple `key`: no live flow holds it (with `reuse_closed`,
/// a reset TCP flow gives it up, a FIN-closed one after `TIME_WAIT_REUSE_NS`), and no other
/// CPU is creating one with it (a reply entry younger than `CLAIM_GRACE_NS` whose flow isn't
/// complete yet). A stale assured entry is removed, so it can't shadow the new flow.
#[inline(always)]
fn tuple_free(key: &CtKey, now: u64, cfg: &Config, reuse_closed: bool) -> bool {
    // Each table asked once: the checks below need the tuple's entries in both.
    let assured = CONNTRACK.get_ptr_mut(key);
    let unassured = CONNTRACK_NEW.get_ptr_mut(key);
    if let Some(live) = live_among(assured, || unassured, now, &cfg.timeouts) {
        // SAFETY: a pointer into the map value, valid for this program run.
        let (state, last_seen) = unsafe { ((*live.state).state, (*live.state).last_seen_ns) };
        // A closed TCP flow gives its tuple to a new connection (its other entry stops
        // pointing back: never used again), else a busy client's closed flows would hold
        // every NAT port for the TIME_WAIT timeout. A reset flow at once, as netfilter's NAT
        // takes over a CLOSE entry: both ends dropped it, a late segment meets a new sequence
        // space. A FIN-closed one after a second of quiet, as Linux's tcp_tw_reuse: its
        // last ACK may still be in flight.
        if !reuse_closed || key.proto != IPPROTO_TCP {
            return false;
        }
        let reusable = match state {
            CT_CLOSE => true,
            CT_TIME_WAIT => now.saturating_sub(last_seen) >= TIME_WAIT_REUSE_NS,
            _ => false,
        };
        if !reusable {
            return false;
        }
    }
    if unassured.is_some_and(|e| claimed_lately(e, now)) {
        return false;
    }
    if assured.is_some() {
        // A finished assured flow's entry: the new flow takes its tuple.
        let _ = CONNTRACK.remove(key);
    }
    true
}

/// Removes a finished assured flow's entry for `key` (a new flow takes its tuple). Looked up
/// first: a lookup takes no lock, a removal locks the bucket, and there mostly is none.
#[inline(always)]
fn forget_assured(key: &CtKey) {
    // SAFETY: only tested for presence, not read.
    if unsafe { CONNTRACK.get(key) }.is_some() {
        let _ = CONNTRACK.remove(key);
    }
}

/// Inserts the original entry of a flow whose reply entry is in place (removed again on
/// failure, so no half flow stays). A stale assured entry with the same tuple goes.
#[inline(always)]
fn insert_original(key: &CtKey, e: &CtEntry) -> Result<(), Stat> {
    forget_assured(key);
    if CONNTRACK_NEW.insert(key, e, u64::from(BPF_ANY)).is_err() {
        let _ = CONNTRACK_NEW.remove(&e.reply);
        return Err(Stat::ConntrackFull);
    }
    Ok(())
}
