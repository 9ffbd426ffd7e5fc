//! Forwarding without the host stack: the kernel's FIB says where a packet goes, and the
//! redirects take it there, past the bridge, netfilter and a second routing pass. A packet
//! the FIB can't fully answer for (no route, a local destination, an unresolved neighbour,
//! too big, TTL about to expire) is left to the stack, which does all of that itself.

use core::{
    mem::{MaybeUninit, align_of, size_of},
    ptr,
};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
        bpf_check_mtu_ret::BPF_MTU_CHK_RET_SUCCESS, bpf_fib_lookup, bpf_redir_neigh,
    },
    cty::c_long,
    helpers::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_redirect,
        bpf_redirect_neigh, bpf_redirect_peer,
    },
    programs::TcContext,
};
use netd_common::datapath::{Addr, EndpointInfo};
use network_types::{eth::EtherType, ip::Ipv4Hdr};

use super::{
    ipv4_hdr, ipv6, maps,
    parse::{Frame as _, L3_OFF},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Delivers a packet the uplink's ingress translated to a container straight into its
/// namespace, as routing it to the container's bridge would have: from the bridge's MAC to
/// the container's, TTL decremented. No FIB lookup: netd made both ends, the container's
/// address on its bridge's subnet with a MAC it knows, so the endpoint and network maps
/// answer what the lookup would, for a fraction of its cost. `None`: the stack takes it (TTL
/// about to expire, bigger than the container's MTU).
#[inline(always)]
pub fn deliver_to_container(ctx: &TcContext) -> Option<i32> {
    let ip: Ipv4Hdr = ctx.read(L3_OFF)?;
    let ep: &EndpointInfo = maps::endpoint(u32::from_ne_bytes(ip.dst_addr))?;
    let net = maps::network(ep.network_id)?;
    if ip.ttl <= 1 || !fits_mtu(ctx, ep.ifindex) {
        return None;
    }
    ipv4_hdr::forward_as(ctx, &ip, ep.mac, net.bridge_mac)?;
    // SAFETY: a helper without preconditions; it returns TC_ACT_REDIRECT (TC_ACT_SHOT if the
    // interface is not a veth, which endpoints are).
    Some(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}

/// [`deliver_to_container`] for IPv6 (the hop limit down by one; no header checksum). A
/// function of its own: inlined, its frame would join NAT66's deepest calls' (see
/// `progs::uplink`).
#[inline(never)]
pub fn deliver6_to_container(ctx: &TcContext) -> Option<i32> {
    let ip: ipv6::Fixed = ctx.load(L3_OFF).ok()?;
    let ep: &EndpointInfo = maps::endpoint6(ip.dst)?;
    let net = maps::network(ep.network_id)?;
    if ip.hop_limit <= 1 || !fits_mtu(ctx, ep.ifindex) {
        return None;
    }
    forward6_as(ctx, &ip, ep.mac, net.bridge_mac)?;
    // SAFETY: as in `deliver_to_container`.
    Some(unsafe { bpf_redirect_peer(ep.ifindex, 0) } as i32)
}

/// The Ethernet header of an untagged IPv6 frame and the IPv6 header up to its hop limit, as
/// in the packet.
#[repr(C)]
struct EthIp6Head {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ether_type: u16,
    vtc_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
}
const _: () = assert!(size_of::<EthIp6Head>() == 22);

/// [`ipv4_hdr::forward_as`] for an untagged IPv6 frame whose fixed header is `ip` (with a hop
/// limit above 0): one store for readdressing it and the hop limit.
#[inline(always)]
fn forward6_as(
    ctx: &TcContext,
    ip: &ipv6::Fixed,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> Option<()> {
    let frame = EthIp6Head {
        dst_mac,
        src_mac,
        ether_type: EtherType::Ipv6 as u16,
        vtc_flow: ip.vtc_flow,
        payload_len: ip.payload_len,
        next_header: ip.next_header,
        hop_limit: ip.hop_limit.checked_sub(1)?,
    };
    ctx.store(0, &frame, 0).ok()
}

const HOP_LIMIT_OFF: usize = L3_OFF + 7;

/// What forwarding does to the IPv6 header: the hop limit (`hop_limit`) down by one.
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext, hop_limit: u8) -> Option<()> {
    ctx.store(HOP_LIMIT_OFF, &(hop_limit - 1), 0).ok()
}

/// Whether the packet fits the MTU of interface `ifindex`, as forwarding checks it: a GSO
/// packet always does (it is segmented to the device's size).
#[inline(always)]
fn fits_mtu(ctx: &TcContext, ifindex: u32) -> bool {
    // 0: check the packet's own length.
    let mut mtu_len = 0u32;
    // SAFETY: `mtu_len` lives across the call.
    let ret = unsafe { bpf_check_mtu(ctx.skb.skb.cast(), ifindex, &mut mtu_len, 0, 0) };
    ret == i64::from(BPF_MTU_CHK_RET_SUCCESS)
}

/// The Ethernet header's addresses, in frame order.
#[derive(Clone, Copy)]
#[repr(C)]
struct EthAddrs {
    dst: [u8; 6],
    src: [u8; 6],
}

/// Readdresses the frame from `src` to `dst`: one helper call for both (each
/// `bpf_skb_store_bytes` call makes the skb writable and copies anew).
#[inline(always)]
pub fn set_macs(ctx: &TcContext, dst: [u8; 6], src: [u8; 6]) -> Result<(), c_long> {
    ctx.store(0, &EthAddrs { dst, src }, 0)
}

/// Where the FIB routes a packet a container sends beyond its network.
pub enum Route {
    /// Forwarded out of an interface.
    Out(Hop),
    /// Not forwarded: the stack delivers it to the host (a local destination), or drops it
    /// (no route, blackhole, forwarding off, TTL about to expire: it answers the sender).
    Stack,
    /// Forwarded somewhere the lookup can't say (a tunnel route), or the helper failed.
    Unknown,
}

/// The interface a packet is routed out of, and what the fast path needs to send it there.
pub struct Hop {
    pub ifindex: u32,
    /// The next hop's address (wire byte order).
    next_hop: u32,
    /// The frame's new addresses, when the lookup found the next hop's MAC.
    macs: Option<EthAddrs>,
    /// Whether the fast path may take it: not when it is too big (the stack fragments it or
    /// answers "fragmentation needed").
    fast: bool,
    ip: Ipv4Hdr,
}

/// The route the stack's forwarding would take for a container's packet, which it sees
/// arriving on the container's bridge (`bridge_ifindex`: policy rules on the bridge apply).
#[inline(always)]
pub fn route(ctx: &TcContext, bridge_ifindex: u32) -> Route {
    let Some(ip) = ctx.read::<Ipv4Hdr>(L3_OFF) else {
        return Route::Unknown;
    };
    if ip.ttl <= 1 {
        return Route::Stack;
    }
    let Some((mut ret, mut fib)) = lookup(ctx, &ip, bridge_ifindex, true) else {
        return Route::Unknown;
    };
    let mut fast = true;
    if ret == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // Too big for the route: the stack answers or fragments. The lookup stopped at the
        // MTU check, before naming the egress interface, which the policy still needs.
        let Some(unchecked) = lookup(ctx, &ip, bridge_ifindex, false) else {
            return Route::Unknown;
        };
        (ret, fib, fast) = (unchecked.0, unchecked.1, false);
    }
    match ret {
        BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH => {}
        BPF_FIB_LKUP_RET_BLACKHOLE
        | BPF_FIB_LKUP_RET_UNREACHABLE
        | BPF_FIB_LKUP_RET_PROHIBIT
        | BPF_FIB_LKUP_RET_NOT_FWDED
        | BPF_FIB_LKUP_RET_FWD_DISABLED => return Route::Stack,
        _ => return Route::Unknown,
    }
    Route::Out(Hop {
        ifindex: fib.ifindex,
        // SAFETY: the lookup of an IPv4 packet filled the IPv4 member: the next hop.
        next_hop: unsafe { fib.__bindgen_anon_4.ipv4_dst },
        macs: resolved(ret, &fib),
        fast,
        ip,
    })
}

/// Sends a container's packet straight to the egress of `hop`'s interface (where it is
/// masqueraded): readdressed to the next hop's MAC the lookup found, else with
/// `bpf_redirect_neigh` resolving it. `None`: the stack takes it.
#[inline(always)]
pub fn forward(ctx: &TcContext, hop: &Hop) -> Option<i32> {
    if !hop.fast {
        return None;
    }
    if let Some(macs) = hop.macs.filter(|_| !neighbour_use_due()) {
        ipv4_hdr::forward_as(ctx, &hop.ip, macs.dst, macs.src)?;
        return Some(redirect_out(hop.ifindex));
    }
    ipv4_hdr::decrement_ttl(ctx, &hop.ip)?;
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: hop.next_hop,
        },
    };
    // SAFETY: `nh` lives across the call, its size is passed with it.
    let action =
        unsafe { bpf_redirect_neigh(hop.ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) };
    Some(action as i32)
}

/// Where the stack's forwarding would send a container's IPv6 packet arriving on the bridge
/// `bridge_ifindex` (the interface the stack routes it from), as [`route`] for IPv4.
#[inline(always)]
pub fn route6(ctx: &TcContext, bridge_ifindex: u32) -> Route6 {
    let Ok(ip) = ctx.load::<ipv6::Fixed>(L3_OFF) else {
        return Route6::Unknown;
    };
    if ip.hop_limit <= 1 {
        return Route6::Stack;
    }
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let gso = unsafe { (*ctx.skb.skb).gso_segs } > 1;
    let tot_len = if gso {
        0
    } else {
        ipv6::FIXED_LEN as u16 + u16::from_be_bytes(ip.payload_len)
    };
    let mut found = lookup6(ctx, bridge_ifindex, ip.src, ip.dst, ip.next_header, tot_len);
    let mut fast = true;
    if found.ret == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
        // Too big: the stack answers with Packet Too Big (IPv6 routers never fragment). The
        // interface is still needed for the policy.
        found = lookup6(ctx, bridge_ifindex, ip.src, ip.dst, ip.next_header, 0);
        fast = false;
    }
    match u32::try_from(found.ret) {
        Ok(BPF_FIB_LKUP_RET_SUCCESS | BPF_FIB_LKUP_RET_NO_NEIGH) => Route6::Out(Hop6 {
            ifindex: found.ifindex,
            next_hop: found.next_hop,
            macs: found.macs,
            fast,
            ip,
        }),
        Ok(
            BPF_FIB_LKUP_RET_BLACKHOLE
            | BPF_FIB_LKUP_RET_UNREACHABLE
            | BPF_FIB_LKUP_RET_PROHIBIT
            | BPF_FIB_LKUP_RET_NOT_FWDED
            | BPF_FIB_LKUP_RET_FWD_DISABLED,
        ) => Route6::Stack,
        _ => Route6::Unknown,
    }
}

/// [`forward`] for IPv6.
#[inline(always)]
pub fn forward6(ctx: &TcContext, hop: &Hop6) -> Option<i32> {
    if !hop.fast {
        return None;
    }
    if let Some(macs) = hop.macs.filter(|_| !neighbour_use_due()) {
        forward6_as(ctx, &hop.ip, macs.dst, macs.src)?;
        return Some(redirect_out(hop.ifindex));
    }
    decrement_hop_limit(ctx, hop.ip.hop_limit)?;
    let mut nh = bpf_redir_neigh {
        nh_family: u32::from(AF_INET6),
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 {
            ipv6_nh: hop.next_hop,
        },
    };
    // SAFETY: as in `forward`.
    let action =
        unsafe { bpf_redirect_neigh(hop.ifindex, &mut nh, size_of::<bpf_redir_neigh>() as i32, 0) };
    Some(action as i32)
}

/// Whether `addr` is one of the host's own IPv6 addresses, as the FIB says for a packet to it
/// arriving on the skb's interface (a local route: not forwarded). The lookup answers only on
/// an interface that forwards IPv6 (netd turns forwarding on with a dual-stack network); a
/// multicast or link-local address never counts (the lookup doesn't forward those either).
#[inline(never)]
pub fn is_local6(ctx: &TcContext, addr: &Addr) -> bool {
    if ipv6::is_multicast(addr) || ipv6::is_link_local(addr) {
        return false;
    }
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    lookup6(ctx, ifindex, [0; 4], *addr, 0, 0).ret == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED)
}

/// What a FIB lookup for IPv6 answered: the helper's return, the interface and next hop
/// (and its MAC, when found).
struct Found6 {
    ret: i64,
    ifindex: u32,
    next_hop: Addr,
    macs: Option<EthAddrs>,
}

/// The FIB lookup for an IPv6 packet from `src` to `dst` (`proto`) arriving on `ifindex`,
/// its MTU checked against `tot_len` (0: not checked).
#[inline(always)]
fn lookup6(ctx: &TcContext, ifindex: u32, src: Addr, dst: Addr, proto: u8, tot_len: u16) -> Found6 {
    let mut fib = MaybeUninit::<bpf_fib_lookup>::uninit();
    // SAFETY: as in `lookup`.
    let fib = unsafe {
        zero_words(&mut fib);
        fib.assume_init_mut()
    };
    fib.family = AF_INET6;
    fib.l4_protocol = proto;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.__bindgen_anon_3.ipv6_src = src;
    fib.__bindgen_anon_4.ipv6_dst = dst;
    fib.ifindex = ifindex;
    // SAFETY: `fib` lives across the call, its size is passed with it.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    Found6 {
        ret,
        ifindex: fib.ifindex,
        // SAFETY: the lookup of an IPv6 packet filled the IPv6 member: the next hop.
        next_hop: unsafe { fib.__bindgen_anon_4.ipv6_dst },
        macs: u32::try_from(ret).ok().and_then(|ret| resolved(ret, fib)),
    }
}

/// [`Route`] for IPv6.
pub enum Route6 {
    Out(Hop6),
    Stack,
    Unknown,
}

/// [`Hop`] for IPv6 (no header checksum: the hop limit is all forwarding changes).
pub struct Hop6 {
    pub ifindex: u32,
    next_hop: Addr,
    macs: Option<EthAddrs>,
    fast: bool,
    ip: ipv6::Fixed,
}

/// The addresses a frame to the next hop takes, when the lookup found its MAC (the
/// neighbour is valid): then a plain redirect sends it, where `bpf_redirect_neigh` would look
/// the neighbour up again and copy its cached header. A neighbour the lookup has no valid
/// entry for (none yet, failed) is left to `bpf_redirect_neigh`, which resolves it.
#[inline(always)]
fn resolved(ret: u32, fib: &bpf_fib_lookup) -> Option<EthAddrs> {
    (ret == BPF_FIB_LKUP_RET_SUCCESS).then_some(EthAddrs {
        dst: fib.dmac,
        src: fib.smac,
    })
}

/// One packet in this many to a resolved next hop goes through `bpf_redirect_neigh` all the
/// same (see [`neighbour_use_due`]).
const NEIGHBOUR_USE_ONE_IN: u32 = 64;

/// Whether this packet goes through `bpf_redirect_neigh` though its next hop's MAC is known,
/// so that the kernel sees the neighbour used, as forwarding through the stack uses it: a
/// stale entry is probed, and a next hop whose MAC changed (without announcing it) is
/// resolved again. A plain redirect leaves the entry as it is, stale with the old MAC for
/// good.
#[inline(always)]
fn neighbour_use_due() -> bool {
    // SAFETY: a helper without preconditions.
    unsafe { bpf_get_prandom_u32() }.is_multiple_of(NEIGHBOUR_USE_ONE_IN)
}

/// Redirects the readdressed packet to the egress of interface `ifindex`.
#[inline(always)]
fn redirect_out(ifindex: u32) -> i32 {
    // SAFETY: a helper without preconditions; it returns TC_ACT_REDIRECT.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// The FIB lookup for `ip` arriving on interface `ifindex`, as the stack's forwarding would
/// make it (with `check_mtu`, MTU checked against the IP length, except for GSO packets that
/// the stack segments to the device's size anyway). `None` if the helper failed outright.
#[inline(always)]
fn lookup(
    ctx: &TcContext,
    ip: &Ipv4Hdr,
    ifindex: u32,
    check_mtu: bool,
) -> Option<(u32, bpf_fib_lookup)> {
    let mut fib = MaybeUninit::<bpf_fib_lookup>::uninit();
    // SAFETY: zeroed just before, and all zeros is a valid bpf_fib_lookup (plain integers and
    // unions of them).
    let fib = unsafe {
        zero_words(&mut fib);
        fib.assume_init_mut()
    };
    // SAFETY: the context's skb pointer is valid for the whole program run.
    let skb = unsafe { &*ctx.skb.skb };
    fib.family = AF_INET;
    fib.l4_protocol = ip.proto;
    fib.__bindgen_anon_1.tot_len = if !check_mtu || skb.gso_segs > 1 {
        0
    } else {
        u16::from_be_bytes(ip.tot_len)
    };
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    fib.ifindex = ifindex;
    // SAFETY: `fib` lives across the call, its size is passed with it.
    let ret = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            fib,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    Some((u32::try_from(ret).ok()?, *fib))
}

/// Zeroes `v` a word at a time: `mem::zeroed()` would be a call to aya-ebpf's `memset`, a
/// byte-at-a-time loop (bpf-linker keeps memsets out of line), some 300 instructions for a
/// `bpf_fib_lookup` on every forwarded packet. In place: a copy would be folded back into a
/// memset.
#[inline(always)]
fn zero_words<T>(v: &mut MaybeUninit<T>) {
    const { assert!(size_of::<T>().is_multiple_of(size_of::<u32>()) && align_of::<T>() >= 4) };
    let words = v.as_mut_ptr().cast::<u32>();
    for i in 0..size_of::<T>() / size_of::<u32>() {
        // SAFETY: within `v`, whose size and alignment are multiples of 4 (checked above).
        // Volatile, or LLVM folds the stores back into a memset.
        unsafe { ptr::write_volatile(words.add(i), 0) };
    }
}
