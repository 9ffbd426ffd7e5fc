//! Bounds-checked header parsing, for TC and XDP programs alike. Every read goes through
//! [`Frame::read`], which fails (instead of reading past the packet) when the frame is shorter
//! than the header.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use netd_common::datapath::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Stat};
use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// Where the IPv4 header starts (no VLAN tag: tagged frames are never translated).
pub const L3_OFF: usize = EthHdr::LEN;
/// Where the L4 header starts: only IPv4 without options (IHL 5) is translated.
pub const L4_OFF: usize = L3_OFF + Ipv4Hdr::LEN;

/// Where the header of the packet an ICMP error quotes starts, and its L4 header.
pub const QUOTED_L3_OFF: usize = L4_OFF + Icmpv4Hdr::LEN;
pub const QUOTED_L4_OFF: usize = QUOTED_L3_OFF + Ipv4Hdr::LEN;
/// An ICMP error quotes the offending IP header and at least 8 bytes of its payload.
const QUOTED_L4_LEN: usize = 8;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// `vihl` of an IPv4 header without options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// The "more fragments" flag and the fragment offset.
const IPV4_FRAG_MASK: u16 = 0x3fff;
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

/// What NAT needs from a translatable packet. For ICMP echo the identifier is `sport` of a
/// request and `dport` of a reply, the other one 0 (see `CtKey`).
pub struct Flow {
    /// Addresses as on the wire (network byte order in memory).
    pub saddr: u32,
    pub daddr: u32,
    /// Ports in host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte; 0 for UDP and ICMP.
    pub tcp_flags: u8,
    /// For an ICMP error (destination unreachable, time exceeded): the packet it quotes.
    pub quoted: Option<Quoted>,
}

/// The ends of the packet an ICMP error quotes, as they were when it was sent (ports and echo
/// identifier as in [`Flow`]).
pub struct Quoted {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// Parses an Ethernet + IPv4 (IHL 5, unfragmented) + TCP/UDP/ICMP echo frame. Anything else is
/// an `Err` with the reason it can't be translated; callers pass such packets on untouched.
#[inline(always)]
pub fn ipv4_flow(ctx: &impl Frame) -> Result<Flow, Stat> {
    if ctx.vlan_offloaded() {
        return Err(Stat::Vlan);
    }
    let eth: EthHdr = ctx.read(0).ok_or(Stat::TruncatedL2)?;
    if eth.ether_type == EtherType::Ieee8021q as u16
        || eth.ether_type == EtherType::Ieee8021ad as u16
    {
        return Err(Stat::Vlan);
    }
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return Err(Stat::NotIpv4);
    }
    let ip: Ipv4Hdr = ctx.read(L3_OFF).ok_or(Stat::TruncatedL3)?;
    let l4_len = ipv4_payload_len(ctx, &ip)?;
    let mut flow = Flow {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
        tcp_flags: 0,
        quoted: None,
    };
    match ip.proto {
        IPPROTO_TCP => {
            if l4_len < TcpHdr::LEN {
                return Err(Stat::TruncatedL4);
            }
            let tcp: TcpHdr = ctx.read(L4_OFF).ok_or(Stat::TruncatedL4)?;
            flow.sport = u16::from_be_bytes(tcp.source);
            flow.dport = u16::from_be_bytes(tcp.dest);
            flow.tcp_flags = ctx.read(L4_OFF + TCP_FLAGS_OFF).ok_or(Stat::TruncatedL4)?;
        }
        IPPROTO_UDP => {
            if l4_len < UdpHdr::LEN {
                return Err(Stat::TruncatedL4);
            }
            let udp: UdpHdr = ctx.read(L4_OFF).ok_or(Stat::TruncatedL4)?;
            flow.sport = u16::from_be_bytes(udp.src);
            flow.dport = u16::from_be_bytes(udp.dst);
        }
        IPPROTO_ICMP => {
            if l4_len < Icmpv4Hdr::LEN {
                return Err(Stat::TruncatedL4);
            }
            let icmp: Icmpv4Hdr = ctx.read(L4_OFF).ok_or(Stat::TruncatedL4)?;
            let id = u16::from_be_bytes([icmp.data[0], icmp.data[1]]);
            match (icmp.type_, icmp.code) {
                (ICMP_ECHO_REQUEST, 0) => flow.sport = id,
                (ICMP_ECHO_REPLY, 0) => flow.dport = id,
                (ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED, _) => {
                    flow.quoted = Some(quoted(ctx, l4_len - Icmpv4Hdr::LEN)?);
                }
                _ => return Err(Stat::UnsupportedProto),
            }
        }
        _ => return Err(Stat::UnsupportedProto),
    }
    Ok(flow)
}

/// Parses the packet quoted by an ICMP error, `len` bytes long in the frame. The same rules
/// as for the outer packet apply: IHL 5, TCP, UDP or ICMP echo.
#[inline(always)]
fn quoted(ctx: &impl Frame, len: usize) -> Result<Quoted, Stat> {
    if len < Ipv4Hdr::LEN + QUOTED_L4_LEN {
        return Err(Stat::TruncatedL4);
    }
    let ip: Ipv4Hdr = ctx.read(QUOTED_L3_OFF).ok_or(Stat::TruncatedL4)?;
    if ip.vihl != IPV4_NO_OPTIONS {
        return Err(Stat::IpOptions);
    }
    let mut q = Quoted {
        saddr: u32::from_ne_bytes(ip.src_addr),
        daddr: u32::from_ne_bytes(ip.dst_addr),
        sport: 0,
        dport: 0,
        proto: ip.proto,
    };
    let l4: [u8; QUOTED_L4_LEN] = ctx.read(QUOTED_L4_OFF).ok_or(Stat::TruncatedL4)?;
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
        _ => return Err(Stat::UnsupportedProto),
    }
    Ok(q)
}

/// Checks the IPv4 header is one NAT may rewrite and returns the length of its payload.
#[inline(always)]
fn ipv4_payload_len(ctx: &impl Frame, ip: &Ipv4Hdr) -> Result<usize, Stat> {
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(Stat::BadIpHeader);
    }
    if ip.vihl != IPV4_NO_OPTIONS {
        return Err(Stat::IpOptions);
    }
    let total = usize::from(u16::from_be_bytes(ip.tot_len));
    if total < Ipv4Hdr::LEN {
        return Err(Stat::BadIpHeader);
    }
    // Frames may carry padding after the datagram, never less than it claims.
    if (ctx.len() as usize) < L3_OFF + total {
        return Err(Stat::TruncatedL3);
    }
    if u16::from_be_bytes(ip.frags) & IPV4_FRAG_MASK != 0 {
        return Err(Stat::Fragment);
    }
    Ok(total - Ipv4Hdr::LEN)
}
