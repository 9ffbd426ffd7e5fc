//! NAT66, the IPv6 twin of `parse::Flow` and `nat`: what translating an IPv6 packet needs of
//! it, and the rewrite of one of its ends (address and port, or ICMPv6 echo identifier).
//!
//! IPv6 has no header checksum, and the checksums of TCP, UDP and ICMPv6 all cover the
//! addresses (the pseudo-header): an address change is one `bpf_csum_diff` of its 16 bytes,
//! fed to the L4 checksum. Other protocols are translated by address, their checksums are
//! none of NAT's business. A fragmented datagram is translated as IPv4's is: its first
//! fragment carries the L4 header and the ports, remembered (`frag::remember6`) for its later
//! fragments, which then only have their addresses rewritten. A later fragment of no such
//! datagram, or a fragmented ICMPv6 error, is dropped (`fragment`).

use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    helpers::{bpf_csum_diff, bpf_csum_update},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use netd_common::datapath::{
    AF_INET6, Addr, CT_REWRITE_BOTH, CT_REWRITE_SRC, Config, CtEntry, CtKey, FragKey6,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Stat,
};

use super::{
    conntrack::Tracked,
    csum::{icmp_csum, l4_csum},
    events::{self, Tuple6},
    frag,
    ipv6::{self, read_within},
    maps,
    parse::{FRAG_FIRST, FRAG_LATER, FRAG_NONE, Frame as _, L3_OFF},
    sockets,
    tcp_window::{self, Segment},
};

/// Where the addresses are in an IPv6 header, and how long it is.
pub const SRC_IN_IP: usize = 8;
pub const DST_IN_IP: usize = 24;
const FIXED_LEN: usize = 40;
const TCP_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
/// An ICMPv6 header, and the identifier's offset in an echo.
const ICMPV6_HEADER_LEN: usize = 8;
const ICMPV6_ID_IN_L4: usize = 4;
/// Offsets in a TCP/UDP header.
const SPORT_IN_L4: usize = 0;
const DPORT_IN_L4: usize = 2;
const TCP_FLAGS_IN_L4: usize = 13;
/// Beyond any upper-layer header the extension-header walk finds (six of at most 2 KiB).
const MAX_L4_OFF: usize = 0x3fff;
/// An ICMPv6 error quotes the offending packet, at least its fixed header and 8 bytes.
const QUOTED_L4_LEN: usize = 8;

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAM_PROBLEM: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Extension headers a quoted packet may start with (their ports are further in).
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// What NAT66 needs from a translatable packet; ports as in [`super::parse::Flow`] (for ICMPv6
/// echo, the identifier is `sport` of a request and `dport` of a reply).
pub struct Flow6 {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Where the upper-layer header starts (past the extension headers) and the packet ends.
    pub l4_off: usize,
    pub end: usize,
    /// For an ICMPv6 error (destination unreachable, packet too big, time exceeded,
    /// parameter problem): the packet it quotes.
    pub quoted: Option<Quoted6>,
    /// `FRAG_*`, and the fragment header's identification.
    pub frag: u8,
    pub frag_id: u32,
}

impl Flow6 {
    /// Whether the packet carries an L4 header NAT66 rewrites (not a later fragment).
    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        self.frag != FRAG_LATER
    }

    /// The key its datagram's fragments share.
    #[inline(always)]
    fn frag_key(&self) -> FragKey6 {
        frag::key6(self.saddr, self.daddr, self.proto, self.frag_id)
    }

    /// Remembers the ports of a first fragment NAT66 translated (before translation: the
    /// later fragments arrive as it did), for its later fragments.
    #[inline(always)]
    pub fn remember_ports(&self) {
        if self.frag == FRAG_FIRST {
            frag::remember6(&self.frag_key(), self.sport, self.dport);
        }
    }
}

/// The ends of the packet an ICMPv6 error quotes, as it was sent, and where its headers are.
pub struct Quoted6 {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub l3_off: usize,
    pub l4_off: usize,
}

impl Tracked for Flow6 {
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
        // Read back from the per-CPU slot, the offset is bounded again for the verifier
        // before the segment is read in place (no walk goes this far). A fragment's segment
        // is the whole datagram's: not this packet's to measure (as for IPv4).
        if self.l4_off > MAX_L4_OFF || self.frag != FRAG_NONE {
            return None;
        }
        tcp_window::segment_at(ctx, self.l4_off, self.end, self.tcp_flags)
    }

    #[inline(always)]
    fn published(reply: &CtKey, _cfg: &Config) -> bool {
        // The reply tuple's destination is one of the host's addresses: a port published on
        // every address is published there too.
        reply.proto != IPPROTO_ICMPV6
            && [reply.daddr, [0; 4]]
                .iter()
                .any(|addr| maps::published6(addr, reply.dport, reply.proto).is_some())
    }

    #[inline(always)]
    fn host_socket_owns(ctx: &TcContext, incoming: &CtKey) -> bool {
        sockets::host_socket_owns6(ctx, incoming)
    }
}

/// Where packets are parsed to: a [`Flow6`] on the stack would take a fifth of it.
#[map]
static FLOWS6: PerCpuArray<Flow6> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's slot to parse a packet into.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Flow6> {
    // SAFETY: per-CPU slot, used only within this program run.
    FLOWS6.get_ptr_mut(0).map(|ptr| unsafe { &mut *ptr })
}

/// Parses an untagged Ethernet and IPv6 frame (extension headers walked as for the
/// isolation) carrying TCP, UDP, ICMPv6 echo or error, or another protocol (by address) into
/// `flow`; a later fragment takes the ports its first fragment carried. An `Err` is the reason
/// it can't be translated: a later fragment of no translated datagram, a fragmented error,
/// neighbour discovery and the rest of ICMPv6, a header cut short. A function of its own (see
/// `progs::uplink`).
#[inline(never)]
pub fn parse_into(ctx: &TcContext, flow: &mut Flow6) -> Result<(), Stat> {
    let p = ipv6::parse(ctx)?;
    *flow = Flow6 {
        saddr: p.src,
        daddr: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        tcp_flags: 0,
        l4_off: p.l4_off,
        end: p.end,
        quoted: None,
        frag: p.frag,
        frag_id: p.frag_id,
    };
    if p.frag == FRAG_LATER {
        let (sport, dport) = frag::ports6(&flow.frag_key()).ok_or(Stat::Fragment)?;
        flow.sport = sport;
        flow.dport = dport;
        return Ok(());
    }
    match p.proto {
        IPPROTO_TCP => {
            if p.l4_off + TCP_HEADER_LEN > p.end {
                return Err(Stat::TruncatedL4);
            }
            let head: [u8; TCP_FLAGS_IN_L4 + 1] =
                read_within(ctx, p.l4_off, p.end).ok_or(Stat::TruncatedL4)?;
            flow.tcp_flags = head[TCP_FLAGS_IN_L4];
        }
        IPPROTO_UDP if p.l4_off + UDP_HEADER_LEN > p.end => return Err(Stat::TruncatedL4),
        IPPROTO_ICMPV6 => {
            let head: [u8; ICMPV6_HEADER_LEN] =
                read_within(ctx, p.l4_off, p.end).ok_or(Stat::TruncatedL4)?;
            let id = u16::from_be_bytes([head[4], head[5]]);
            match (head[0], head[1]) {
                (ICMPV6_ECHO_REQUEST, 0) => flow.sport = id,
                (ICMPV6_ECHO_REPLY, 0) => flow.dport = id,
                // An error fits the minimum MTU: a fragmented one is nothing a router sends.
                (ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROBLEM, _) if p.frag == FRAG_NONE => {
                    flow.quoted = Some(quoted(ctx, p.l4_off + ICMPV6_HEADER_LEN, p.end)?);
                }
                (ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROBLEM, _) => return Err(Stat::Fragment),
                _ => return Err(Stat::UnsupportedProto),
            }
        }
        _ => {}
    }
    Ok(())
}

/// Parses the packet an ICMPv6 error quotes, from `l3_off` to the error's `end`: its fixed
/// header and the ports right after it (a quoted extension header is not walked: refused).
#[inline(always)]
fn quoted(ctx: &TcContext, l3_off: usize, end: usize) -> Result<Quoted6, Stat> {
    let first: [u8; 8] = read_within(ctx, l3_off, end).ok_or(Stat::TruncatedL4)?;
    if first[0] >> 4 != 6 {
        return Err(Stat::BadIpHeader);
    }
    let mut q = Quoted6 {
        saddr: read_within(ctx, l3_off + SRC_IN_IP, end).ok_or(Stat::TruncatedL4)?,
        daddr: read_within(ctx, l3_off + DST_IN_IP, end).ok_or(Stat::TruncatedL4)?,
        sport: 0,
        dport: 0,
        proto: first[6],
        l3_off,
        l4_off: l3_off + FIXED_LEN,
    };
    let l4: [u8; QUOTED_L4_LEN] = read_within(ctx, q.l4_off, end).ok_or(Stat::TruncatedL4)?;
    match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            q.sport = u16::from_be_bytes([l4[0], l4[1]]);
            q.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        IPPROTO_ICMPV6 => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            match (l4[0], l4[1]) {
                (ICMPV6_ECHO_REQUEST, 0) => q.sport = id,
                (ICMPV6_ECHO_REPLY, 0) => q.dport = id,
                _ => return Err(Stat::UnsupportedProto),
            }
        }
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_AH | IPPROTO_DSTOPTS => {
            return Err(Stat::Ipv6Header);
        }
        _ => {}
    }
    Ok(q)
}

/// The conntrack key of a parsed packet.
#[inline(always)]
pub fn key_of(flow: &Flow6) -> CtKey {
    CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        family: AF_INET6,
        _pad: [0; 2],
    }
}

/// The key of the flow an ICMPv6 error quoting `q` is about (the quoted tuple reversed).
#[inline(always)]
pub fn quoted_key(q: &Quoted6) -> CtKey {
    CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        family: AF_INET6,
        _pad: [0; 2],
    }
}

/// A translation of one end of an IPv6 packet.
pub struct Rewrite6 {
    /// The source end when true, else the destination.
    pub src: bool,
    pub addr: Addr,
    /// Host byte order; the echo identifier for ICMPv6.
    pub port: u16,
}

/// The rewrite of packets matching conntrack entry `entry`.
#[inline(always)]
pub fn rewrite_of(entry: &CtEntry) -> Rewrite6 {
    Rewrite6 {
        src: entry.rewrite == CT_REWRITE_SRC,
        addr: entry.nat_addr,
        port: entry.nat_port,
    }
}

/// The rewrite of a hairpin flow's source, after [`rewrite_of`]'s of its destination (`None`
/// for other flows).
#[inline(always)]
pub fn second_rewrite_of(entry: &CtEntry) -> Option<Rewrite6> {
    (entry.rewrite == CT_REWRITE_BOTH).then_some(Rewrite6 {
        src: true,
        addr: entry.nat2_addr,
        port: entry.nat2_port,
    })
}

/// An IPv6 packet to drop: why, and the IPv4 address of the container it counts against.
pub struct Drop6 {
    pub reason: Stat,
    pub container: u32,
}

/// Drops an IPv6 packet, counted against its container and reported.
#[inline(never)]
pub fn dropped(ctx: &TcContext, flow: &Flow6, drop: Drop6) -> Stat {
    let tuple = Tuple6 {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
    };
    events::dropped6(&tuple, drop.reason, drop.container, ctx.ifindex())
}

/// Applies `rw` to the packet `flow` was parsed from.
#[inline(always)]
pub fn apply(ctx: &TcContext, flow: &Flow6, rw: &Rewrite6) -> Result<(), Stat> {
    let (in_ip, old_addr, old_port, port_in_l4) = if rw.src {
        (SRC_IN_IP, &flow.saddr, flow.sport, SPORT_IN_L4)
    } else {
        (DST_IN_IP, &flow.daddr, flow.dport, DPORT_IN_L4)
    };
    // A later fragment has no L4 header: its first fragment's checksum covered the addresses.
    let covered =
        matches!(flow.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMPV6) && flow.has_l4_header();
    if *old_addr != rw.addr {
        let diff = csum_diff(old_addr, &rw.addr)?;
        if covered {
            fix_pseudo_header_sum(ctx, flow.proto, flow.l4_off, diff)?;
        }
        store(ctx, L3_OFF + in_ip, &rw.addr)?;
    }
    if old_port != rw.port && covered {
        let in_l4 = id_or_port_in_l4(flow.proto, port_in_l4);
        let (csum_off, flags) = l4_csum(flow.proto, flow.l4_off);
        replace_port(ctx, csum_off, flags, flow.l4_off + in_l4, old_port, rw.port)?;
    }
    Ok(())
}

/// Translates an ICMPv6 error travelling like the packets `rw` is for: where the error's
/// source (destination) changes, the quoted packet's destination (source) address and port
/// change to the same values (it travelled the other way). Its own L4 checksum is left as it
/// was, as for IPv4: receivers of ICMP errors don't check it.
#[inline(always)]
pub fn apply_icmp_error(
    ctx: &TcContext,
    flow: &Flow6,
    q: &Quoted6,
    rw: &Rewrite6,
) -> Result<(), Stat> {
    let (outer_in_ip, outer_old, quoted_in_ip, quoted_old, quoted_old_port, port_in_l4) = if rw.src
    {
        (
            SRC_IN_IP,
            &flow.saddr,
            DST_IN_IP,
            &q.daddr,
            q.dport,
            DPORT_IN_L4,
        )
    } else {
        (
            DST_IN_IP,
            &flow.daddr,
            SRC_IN_IP,
            &q.saddr,
            q.sport,
            SPORT_IN_L4,
        )
    };
    let icmp_csum_off = icmp_csum(flow.l4_off);
    if *outer_old != rw.addr {
        let diff = csum_diff(outer_old, &rw.addr)?;
        fix_pseudo_header_sum(ctx, IPPROTO_ICMPV6, flow.l4_off, diff)?;
        store(ctx, L3_OFF + outer_in_ip, &rw.addr)?;
    }
    if *quoted_old != rw.addr {
        // Within the ICMPv6 body: the sum moves with the bytes, the packet's sum doesn't.
        let diff = csum_diff(quoted_old, &rw.addr)?;
        ctx.l4_csum_replace(icmp_csum_off, 0, diff, 0)
            .map_err(|_| Stat::RewriteFailed)?;
        store(ctx, q.l3_off + quoted_in_ip, &rw.addr)?;
    }
    if quoted_old_port != rw.port && (q.sport | q.dport) != 0 {
        let in_l4 = id_or_port_in_l4(q.proto, port_in_l4);
        replace_port(
            ctx,
            icmp_csum_off,
            0,
            q.l4_off + in_l4,
            quoted_old_port,
            rw.port,
        )?;
    }
    Ok(())
}

/// Where in the L4 header of `proto` the translated port is: the echo identifier for
/// ICMPv6, else `port_in_l4` (the source or destination port).
#[inline(always)]
fn id_or_port_in_l4(proto: u8, port_in_l4: usize) -> usize {
    if proto == IPPROTO_ICMPV6 {
        ICMPV6_ID_IN_L4
    } else {
        port_in_l4
    }
}

/// The checksum difference of an address changing from `old` to `new`.
#[inline(always)]
fn csum_diff(old: &Addr, new: &Addr) -> Result<u64, Stat> {
    let (mut from, mut to) = (*old, *new);
    // SAFETY: both buffers live on the stack across the call, their sizes passed with them.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
    u64::try_from(diff).map_err(|_| Stat::RewriteFailed)
}

/// Moves the L4 checksum of the header at `l4_off` by `diff`, an address of the pseudo-header
/// changing. The helper then also moves a received packet's whole-packet sum
/// (CHECKSUM_COMPLETE) by `-diff`, as IPv4 needs, whose header checksum cancels the address
/// change; in IPv6 the address bytes themselves move the packet's sum by `diff`, so it is
/// moved back (Linux 6.16's BPF_F_IPV6 does the same, older kernels refuse that flag).
#[inline(always)]
fn fix_pseudo_header_sum(ctx: &TcContext, proto: u8, l4_off: usize, diff: u64) -> Result<(), Stat> {
    let (csum_off, flags) = l4_csum(proto, l4_off);
    ctx.l4_csum_replace(csum_off, 0, diff, flags | u64::from(BPF_F_PSEUDO_HDR))
        .map_err(|_| Stat::RewriteFailed)?;
    // SAFETY: the context's skb is valid for the program run; the helper only adds `diff` to
    // the skb's sum when it is CHECKSUM_COMPLETE.
    unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
    Ok(())
}

/// Replaces the 16-bit port (identifier) at `off`, moving the checksum at `csum_off`.
#[inline(always)]
fn replace_port(
    ctx: &TcContext,
    csum_off: usize,
    flags: u64,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), Stat> {
    // The helpers take the field's bytes as they are in the packet.
    let (old, new) = (old.to_be(), new.to_be());
    ctx.l4_csum_replace(csum_off, u64::from(old), u64::from(new), flags | 2)
        .map_err(|_| Stat::RewriteFailed)?;
    ctx.store(off, &new, 0).map_err(|_| Stat::RewriteFailed)
}

#[inline(always)]
fn store(ctx: &TcContext, off: usize, addr: &Addr) -> Result<(), Stat> {
    ctx.store(off, addr, 0).map_err(|_| Stat::RewriteFailed)
}
