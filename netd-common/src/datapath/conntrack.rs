//! Connection tracking: a flow's two tuples, its state and its translation.

use super::{Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// `CONNTRACK`: LRU hash [`CtKey`] → [`CtEntry`], one entry per direction of each assured
/// flow (a TCP handshake completed, or a UDP/ICMP flow answered and still going after
/// [`CT_ASSURE_AFTER_NS`]).
pub const CONNTRACK_MAP: &str = "CONNTRACK";
/// `CONNTRACK_NEW`: the same for flows not assured yet. A flood of new flows only churns
/// this table (netfilter's early drop takes unassured flows first for the same reason); a
/// flow moves to `CONNTRACK` when it is assured.
pub const CONNTRACK_NEW_MAP: &str = "CONNTRACK_NEW";
/// The conntrack tables, assured first (the order lookups go in).
pub const CONNTRACK_MAPS: [&str; 2] = [CONNTRACK_MAP, CONNTRACK_NEW_MAP];
/// Default size of each conntrack table (entries; each flow takes two).
pub const CONNTRACK_DEFAULT_MAX: u32 = 262_144;
/// A UDP or ICMP flow is assured when a packet comes at least this long after it started,
/// once it has been answered (netfilter's UDP stream rule): one-shot request and response
/// flows (DNS) stay unassured.
pub const CT_ASSURE_AFTER_NS: u64 = 2_000_000_000;

/// How many times its timeout a timed-out flow's entries stay: until then a new flow with the
/// same tuple and translation takes them over in place (the programs), only after that does a
/// sweep remove them. An idle time only grows, so a sweep never removes entries a new flow
/// took over after the sweep read them.
pub const CT_TAKE_OVER_TIMEOUTS: u64 = 2;

/// `CT_LIMITS`: [`CtLimitKey`] → [`CtLimit`]: the most flows a container or a network may
/// have (`--conntrack-limit`), and how many it has. The programs count new flows up; the
/// sweep (`netd conntrack sweep`, the daemon) sets counts to the live flows.
pub const CT_LIMITS_MAP: &str = "CT_LIMITS";
pub const CT_LIMITS_MAX: u32 = 65_536;

/// Whose flows a [`CtLimit`] counts: a container (`addr`, `network_id` 0) or a network
/// (`network_id`, `addr` zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtLimitKey {
    pub addr: Addr,
    pub network_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtLimit {
    /// Flows allowed.
    pub max: u64,
    /// Flows counted.
    pub count: u64,
}

/// One direction of a flow as seen on the wire at the uplink. For ICMP echo, the identifier
/// is `sport` of a request and `dport` of a reply (the other port is 0), so a reply's tuple
/// is the request's reversed, as for TCP and UDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Which direction of its flow a conntrack entry matches.
pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// What a flow's translation is.
pub const CT_NAT_SNAT: u8 = 1;
pub const CT_NAT_DNAT: u8 = 2;
/// A container to a published port through a host address: DNAT plus SNAT to the gateway.
pub const CT_NAT_HAIRPIN: u8 = 3;

/// Which end of the packet an entry's rewrite changes.
pub const CT_REWRITE_SRC: u8 = 1;
pub const CT_REWRITE_DST: u8 = 2;
/// The destination to `nat_addr`/`nat_port`, the source to `nat2_addr`/`nat2_port`.
pub const CT_REWRITE_BOTH: u8 = 3;

/// Flow states. TCP walks them like netfilter; UDP and ICMP use `NEW` and `ESTABLISHED`
/// (once a reply was seen: netfilter's assured stream).
pub const CT_NEW: u8 = 0;
pub const CT_SYN_SENT: u8 = 1;
pub const CT_SYN_RECV: u8 = 2;
pub const CT_ESTABLISHED: u8 = 3;
pub const CT_FIN_WAIT: u8 = 4;
pub const CT_TIME_WAIT: u8 = 5;
pub const CT_CLOSE: u8 = 6;

/// `CtEntry::flags` bits.
pub const CT_SEEN_REPLY: u8 = 1;
pub const CT_FIN_ORIGINAL: u8 = 2;
pub const CT_FIN_REPLY: u8 = 4;
/// The flow lives in `CONNTRACK` (else in `CONNTRACK_NEW`).
pub const CT_ASSURED: u8 = 8;

/// What a flow's TCP tracking knows of one direction's sender (netfilter's `ip_ct_tcp_state`,
/// reduced to what the RST check needs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TcpWindow {
    /// The sequence number after the last byte (SYN and FIN count one) sent so far.
    pub end: u32,
    /// The largest window field this side advertised (as sent: scale it by `wscale`).
    pub max_win: u16,
    /// `TCP_WINDOW_*` bits.
    pub flags: u8,
    /// The window scale (a shift, at most 14) this side's SYN announced, with
    /// `TCP_WINDOW_SCALED`.
    pub wscale: u8,
}

/// `TcpWindow::flags`: the side has sent a segment (`end` and `max_win` are set).
pub const TCP_WINDOW_SEEN: u8 = 1;
/// `TcpWindow::flags`: the side's SYN announced a window scale (`wscale`). Windows are scaled
/// only when both sides' did (RFC 7323).
pub const TCP_WINDOW_SCALED: u8 = 2;

/// A conntrack entry. Both entries of a flow carry the flow's two tuples and their own
/// rewrite; state, timestamps and counters live in the original-direction entry only, so a
/// reply-direction hit also looks up `original`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtEntry {
    /// The flow's original direction, before translation (the key of the flow's state).
    pub original: CtKey,
    /// The flow's reply direction, as it arrives (after translation of the original).
    pub reply: CtKey,
    /// The address and port (ICMP: echo identifier) this entry's rewrite puts in place.
    pub nat_addr: Addr,
    pub nat_port: u16,
    /// `CT_DIR_*`: the direction this entry's key matches.
    pub dir: u8,
    /// `CT_REWRITE_*`.
    pub rewrite: u8,
    /// `CT_NAT_*`.
    pub nat: u8,
    /// `CT_*` state (original entry only).
    pub state: u8,
    /// `CT_SEEN_REPLY` | `CT_FIN_*` (original entry only) | `CT_ASSURED` (both).
    pub flags: u8,
    pub _pad: u8,
    /// The source rewrite of a `CT_REWRITE_BOTH` entry.
    pub nat2_addr: Addr,
    pub nat2_port: u16,
    pub _pad2: [u8; 6],
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of creation and of the last packet.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Per direction (`CT_DIR_*` index).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// TCP: each direction's sender (`CT_DIR_*` index; original entry only).
    pub tcp: [TcpWindow; 2],
}

impl CtEntry {
    /// [`CtEntry::timeout_secs`] in ns.
    #[inline(always)]
    pub fn timeout_ns(&self, t: &Timeouts) -> u64 {
        u64::from(self.timeout_secs(t)) * 1_000_000_000
    }

    /// How long the flow of this original-direction entry may stay idle in its state.
    #[inline(always)]
    pub fn timeout_secs(&self, t: &Timeouts) -> u32 {
        match self.original.proto {
            IPPROTO_TCP => match self.state {
                CT_SYN_SENT => t.tcp_syn_sent,
                CT_SYN_RECV => t.tcp_syn_recv,
                CT_ESTABLISHED => t.tcp_established,
                CT_FIN_WAIT => t.tcp_fin_wait,
                CT_TIME_WAIT => t.tcp_time_wait,
                _ => t.tcp_close,
            },
            IPPROTO_UDP if self.flags & CT_SEEN_REPLY != 0 => t.udp_stream,
            IPPROTO_UDP => t.udp,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => t.icmp,
            _ => t.generic,
        }
    }
}

/// Conntrack timeouts in seconds (netfilter's defaults).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Timeouts {
    pub tcp_syn_sent: u32,
    pub tcp_syn_recv: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub udp: u32,
    pub udp_stream: u32,
    pub icmp: u32,
    /// Every other IP protocol (GRE, ESP, SCTP...), tracked by address
    /// (`nf_conntrack_generic_timeout`).
    pub generic: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 432_000,
            tcp_fin_wait: 120,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp: 30,
            udp_stream: 120,
            icmp: 30,
            generic: 600,
        }
    }
}

crate::user_pod!(CtKey, CtEntry, Timeouts, TcpWindow, CtLimitKey, CtLimit);

/// Size of `FRAGS`, the LRU hash [`FragKey`] → [`FragPorts`]: the ports of fragmented
/// datagrams whose first fragment was translated.
pub const FRAGS_MAX: u32 = 16_384;

/// What the fragments of one IPv4 datagram share (addresses in wire byte order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the fragments of one IPv6 datagram share (the fragment header's identification).
/// `FRAGS6` is the LRU hash of these → [`FragPorts`], of [`FRAGS_MAX`] entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragKey6 {
    pub saddr: Addr,
    pub daddr: Addr,
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The ports (echo identifier) a datagram's first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}

crate::user_pod!(FragKey, FragPorts);
