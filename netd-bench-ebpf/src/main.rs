//! The `redirect` arm's program, on the ingress of each of the routed topology's host-side
//! interfaces: a packet to an address in `ROUTES` gets that route's MACs and is redirected
//! (into a container's namespace, or out of the uplink); anything else (ARP, neighbour
//! discovery, the host's own traffic) goes to the stack. No parsing past the destination, no
//! checks, no conntrack, no NAT, no TTL: less than any datapath that forwards correctly does,
//! so what it measures bounds what netd's programs could reach on this topology.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_redirect_peer},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use netd_bench_ebpf::Route;

/// Destination address → route; filled by netd-bench when it attaches the program.
#[map]
static ROUTES: HashMap<[u32; 4], Route> = HashMap::with_max_entries(8, 0);

const ETHER_TYPE_OFF: usize = 12;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// The destination address's offset in an untagged frame, IPv4 and IPv6.
const IPV4_DST_OFF: usize = 14 + 16;
const IPV6_DST_OFF: usize = 14 + 24;

#[classifier]
pub fn forward(ctx: TcContext) -> i32 {
    let Some(route) = route_of(&ctx) else {
        return TC_ACT_OK;
    };
    if ctx.store(0, &route.macs, 0).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: helpers without preconditions.
    let action = unsafe {
        if route.peer != 0 {
            bpf_redirect_peer(route.ifindex, 0)
        } else {
            bpf_redirect(route.ifindex, 0)
        }
    };
    action as i32
}

/// The route of the packet's destination, if the map has one.
#[inline(always)]
fn route_of(ctx: &TcContext) -> Option<&'static Route> {
    let dst = match u16::from_be(ctx.load::<u16>(ETHER_TYPE_OFF).ok()?) {
        ETH_P_IP => [ctx.load::<u32>(IPV4_DST_OFF).ok()?, 0, 0, 0],
        ETH_P_IPV6 => ctx.load::<[u32; 4]>(IPV6_DST_OFF).ok()?,
        _ => return None,
    };
    // SAFETY: read-only use of a value the program never writes.
    unsafe { ROUTES.get(dst) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
