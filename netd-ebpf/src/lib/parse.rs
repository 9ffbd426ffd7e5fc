//! Bounds-checked header parsing, for TC and XDP programs alike. Every read goes through
//! [`Frame::read`], which fails (instead of reading past the packet) when the frame is shorter
//! than the header.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use netd_common::datapath::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat};

use super::frag;
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// Where the IPv4 header starts (no VLAN tag: tagged frames are never translated).
pub const L3_OFF: usize = EthHdr::LEN;
/// The length of an 802.1Q tag (TPID and TCI) in a frame.
const VLAN_TAG_LEN: usize = 4;
/// An ICMP error quotes the offending IP header and at least 8 bytes of its payload.
const QUOTED_L4_LEN: usize = 8;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// The "more fragments" flag and the fragment offset (in 8-byte units).
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;
/// Offset of the TCP flags byte in the TCP header.
const TCP_FLAGS_OFF: usize = 13;

/// A frame headers are read from.
pub trait Frame {
    /// The `T` at byte `off` of the frame, or `None` when the frame ends before it does.
    fn read<T: Copy>(&self, off: usize) -> Option<T>;
    /// The frame's length in bytes.
    fn len(&self) -> u32;
    /// Whether the frame's VLAN tag was taken out of it into metadata.
    fn vlan_offloaded(&self) -> bool;
    /// The interface the program runs on.
    fn ifindex(&self) -> u32;
}

/// TC reads the packet directly too: a bounds check instead of a `bpf_skb_load_bytes` call,
/// the cost that matters at a few headers per packet. Bytes beyond the linear data (drivers
/// may leave headers in page fragments) are pulled in first; packet pointers don't survive
/// helpers that change the packet, so each read derives them afresh.
impl Frame for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        let end = off + size_of::<T>();
        if self.data() + end > self.data_end() {
            self.pull_data(end as u32).ok()?;
        }
        read_within(self.data(), self.data_end(), off)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        // SAFETY: the context's skb pointer is valid for the whole program run.
        unsafe { (*self.skb.skb).vlan_present != 0 }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: as above.
        unsafe { (*self.skb.skb).ifindex }
    }
}

/// XDP reads the buffer directly: the bounds check against `data_end` is what the verifier
/// requires before any access.
impl Frame for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        read_within(self.data(), self.data_end(), off)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }

    /// An XDP buffer is the frame as received: a tag is still in it.
    #[inline(always)]
    fn vlan_offloaded(&self) -> bool {
        false
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
}

/// The `T` at byte `off` of the packet data `data..data_end`, if it lies within: the bounds
/// check the verifier requires before a direct read.
#[inline(always)]
fn read_within<T: Copy>(data: usize, data_end: usize, off: usize) -> Option<T> {
    let start = data + off;
    if start + size_of::<T>() > data_end {
        return None;
    }
    // SAFETY: `start..start + size_of::<T>()` lies within the packet, checked just above;
    // headers are not aligned in the packet.
    Some(unsafe { (start as *const T).read_unaligned() })
}

/// Whether an EtherType is a VLAN tag's (802.1Q, or an 802.1ad service tag).
#[inline(always)]
pub fn is_vlan_tag(ether_type: u16) -> bool {
    ether_type == EtherType::Ieee8021q as u16 || ether_type == EtherType::Ieee8021ad as u16
}

/// VLAN tags read through to what a frame carries. The stack strips priority tags (VLAN 0)
/// however deep and routes what they carry; real traffic has two tags at most (802.1ad
/// QinQ), the outer one often taken out into metadata before a TC program runs.
const MAX_TAGS: usize = 3;

/// The EtherType of what the frame carries behind its VLAN tags (up to [`MAX_TAGS`] of them
/// in the frame), and where that starts: still a tag's EtherType when they are nested deeper.
/// `None` when the frame ends first.
#[inline(always)]
pub fn carried(ctx: &impl Frame) -> Option<(u16, usize)> {
    let mut ether_type = ctx.read::<EthHdr>(0)?.ether_type;
    let mut l3 = L3_OFF;
    for _ in 0..MAX_TAGS {
        if !is_vlan_tag(ether_type) {
            break;
        }
        ether_type = ctx.read::<u16>(l3 + 2)?;
        l3 += VLAN_TAG_LEN;
    }
    Some((ether_type, l3))
}

/// The source and destination (wire byte order) of an IPv4 packet that [`ipv4_flow`] could
/// not parse, as far as its header can be read: behind VLAN tags too ([`carried`]). `None`
/// for anything else.
#[inline(always)]
pub fn ipv4_ends(ctx: &impl Frame) -> Option<(u32, u32)> {
    match carried(ctx)? {
        (ether_type, l3) if ether_type == EtherType::Ipv4 as u16 => ipv4_ends_at(ctx, l3),
        _ => None,
    }
}

/// The source and destination (wire byte order) of the IPv4 header at `l3`.
#[inline(always)]
pub fn ipv4_ends_at(ctx: &impl Frame, l3: usize) -> Option<(u32, u32)> {
    let ip: Ipv4Hdr = ctx.read(l3)?;
    Some((
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
    ))
}

/// What NAT needs from a translatable packet. For ICMP echo the identifier is `sport` of a
/// request and `dport` of a reply, the other one 0 (see `CtKey`); other protocols than TCP,
/// UDP and ICMP have no ports (0: translated by address, as netfilter's generic tracker).
pub struct Flow {
    /// Addresses as on the wire (network byte order in memory).
    pub saddr: u32,
    pub daddr: u32,
    /// Ports in host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; 0 for UDP and ICMP, and for a later fragment.
    pub tcp_flags: u8,
    /// Where the L4 header starts (after the IPv4 options, which are translated along).
    pub l4_off: usize,
    /// `FRAG_*`: whether the packet is a fragment, and which.
    pub frag: u8,
    /// The IPv4 identification (what a datagram's fragments share).
    pub ip_id: u16,
    /// For an ICMP error (destination unreachable, time exceeded): the packet it quotes.
    pub quoted: Option<Quoted>,
}

/// A whole datagram.
pub const FRAG_NONE: u8 = 0;
/// The first fragment: it carries the L4 header, and its ports are remembered
/// ([`frag::remember`]) for the datagram's later fragments.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment: no L4 header; its ports are its first fragment's.
pub const FRAG_LATER: u8 = 2;

/// `FRAG_*`: where an IPv4 packet sits in its datagram.
#[inline(always)]
pub fn frag_kind(ip: &Ipv4Hdr) -> u8 {
    let frags = u16::from_be_bytes(ip.frags);
    if frags & IPV4_OFFSET_MASK != 0 {
        FRAG_LATER
    } else if frags & IPV4_MORE_FRAGMENTS != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    }
}

impl Flow {
    /// Whether the packet carries an L4 header that NAT rewrites with the addresses.
    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        self.frag != FRAG_LATER
    }
}

/// The ends of the packet an ICMP error quotes, as they were when it was sent (ports and echo
/// identifier as in [`Flow`]), and where its headers are in the frame.
pub struct Quoted {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub l3_off: usize,
    pub l4_off: usize,
}

/// Parses an Ethernet + IPv4 frame (options and fragments included) + TCP, UDP, ICMP echo or
/// error, or another IP protocol (by address). Anything else is an `Err` with the reason it
/// can't be translated: callers drop it when it is to or from a container that needs
/// translation, and leave it to the stack otherwise. A later fragment whose first fragment
/// was not translated is a `Fragment` error.
#[inline(always)]
pub fn ipv4_flow(ctx: &impl Frame) -> Result<Flow, Stat> {
    if ctx.vlan_offloaded() {
        return Err(Stat::Vlan);
    }
    let eth: EthHdr = ctx.read(0).ok_or(Stat::TruncatedL2)?;
    if is_vlan_tag(eth.ether_type) {
        return Err(Stat::Vlan);
    }
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Err(Stat::NotIpv4);
    }
    let ip: Ipv4Hdr = ctx.read(L3_OFF).ok_or(Stat::TruncatedL3)?;
    let (l4_off, l4_len) = ipv4_payload(ctx, &ip)?;
    let mut flow = Flow {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        tcp_flags: 0,
        l4_off,
        frag: frag_kind(&ip),
        ip_id: u16::from_be_bytes(ip.id),
        quoted: None,
    };
    if flow.frag == FRAG_LATER {
        let (sport, dport) = frag::ports(&flow).ok_or(Stat::Fragment)?;
        flow.sport = sport;
        flow.dport = dport;
        return Ok(flow);
    }
    match ip.proto {
        IPPROTO_TCP => {
            if l4_len < TcpHdr::LEN {
                return Err(Stat::TruncatedL4);
            }
            // Ports and flags in one read: one bounds check the verifier follows (two
            // reads at a variable offset get merged into one check it can't).
            let tcp: [u8; TCP_FLAGS_OFF + 1] = ctx.read(l4_off).ok_or(Stat::TruncatedL4)?;
            flow.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            flow.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            flow.tcp_flags = tcp[TCP_FLAGS_OFF];
        }
        IPPROTO_UDP => {
            if l4_len < UdpHdr::LEN {
                return Err(Stat::TruncatedL4);
            }
            let udp: UdpHdr = ctx.read(l4_off).ok_or(Stat::TruncatedL4)?;
            flow.sport = u16::from_be_bytes(udp.src);
            flow.dport = u16::from_be_bytes(udp.dst);
        }
        IPPROTO_ICMP => {
            if l4_len < Icmpv4Hdr::LEN {
                return Err(Stat::TruncatedL4);
            }
            let icmp: Icmpv4Hdr = ctx.read(l4_off).ok_or(Stat::TruncatedL4)?;
            let id = u16::from_be_bytes([icmp.data[0], icmp.data[1]]);
            match (icmp.type_, icmp.code) {
                (ICMP_ECHO_REQUEST, 0) => flow.sport = id,
                (ICMP_ECHO_REPLY, 0) => flow.dport = id,
                // A fragmented error is nothing a router or host sends.
                (ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED, _) if flow.frag == FRAG_NONE => {
                    let quoted_off = l4_off + Icmpv4Hdr::LEN;
                    flow.quoted = Some(quoted(ctx, quoted_off, l4_len - Icmpv4Hdr::LEN)?);
                }
                _ => return Err(Stat::UnsupportedProto),
            }
        }
        // Other protocols are translated by address.
        _ => {}
    }
    Ok(flow)
}

/// Parses the packet quoted by an ICMP error, at `l3_off` and `len` bytes long in the frame.
/// The same rules as for the outer packet apply.
#[inline(always)]
fn quoted(ctx: &impl Frame, l3_off: usize, len: usize) -> Result<Quoted, Stat> {
    let ip: Ipv4Hdr = ctx.read(l3_off).ok_or(Stat::TruncatedL4)?;
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(Stat::BadIpHeader);
    }
    let header_len = header_len(&ip);
    if len < header_len + QUOTED_L4_LEN {
        return Err(Stat::TruncatedL4);
    }
    let mut q = Quoted {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        l3_off,
        l4_off: l3_off + header_len,
    };
    let l4: [u8; QUOTED_L4_LEN] = ctx.read(q.l4_off).ok_or(Stat::TruncatedL4)?;
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            q.sport = u16::from_be_bytes([l4[0], l4[1]]);
            q.dport = u16::from_be_bytes([l4[2], l4[3]]);
        }
        IPPROTO_ICMP => {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            match (l4[0], l4[1]) {
                (ICMP_ECHO_REQUEST, 0) => q.sport = id,
                (ICMP_ECHO_REPLY, 0) => q.dport = id,
                _ => return Err(Stat::UnsupportedProto),
            }
        }
        _ => {}
    }
    Ok(q)
}

/// The IPv4 header's length in bytes (at most 60: the verifier sees the bound).
#[inline(always)]
fn header_len(ip: &Ipv4Hdr) -> usize {
    usize::from(ip.vihl & 0x0f) * 4
}

/// Checks the IPv4 header is one NAT may rewrite and returns where its payload starts and how
/// long it is.
#[inline(always)]
fn ipv4_payload(ctx: &impl Frame, ip: &Ipv4Hdr) -> Result<(usize, usize), Stat> {
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(Stat::BadIpHeader);
    }
    let header_len = header_len(ip);
    let total = usize::from(u16::from_be_bytes(ip.tot_len));
    if total < header_len {
        return Err(Stat::BadIpHeader);
    }
    // Frames may carry padding after the datagram, never less than it claims.
    if (ctx.len() as usize) < L3_OFF + total {
        return Err(Stat::TruncatedL3);
    }
    Ok((L3_OFF + header_len, total - header_len))
}
