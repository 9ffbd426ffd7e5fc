//! The host's own sockets, seen from the TC programs: a translated port must not take a tuple
//! a host socket already uses, or the host's connection and the container's flow would be
//! the same connection on the wire.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use netd_common::datapath::{CtKey, IPPROTO_TCP, IPPROTO_UDP};

/// Whether a socket of the host (the namespace of the packet's device) would receive packets
/// with the tuple `incoming`: a TCP connection or listener, or a bound UDP socket.
#[inline(always)]
pub fn host_socket_owns(ctx: &TcContext, incoming: &CtKey) -> bool {
    // SAFETY: an all-zero tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
        saddr: incoming.saddr[0],
        daddr: incoming.daddr[0],
        sport: incoming.sport.to_be(),
        dport: incoming.dport.to_be(),
    };
    let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    owned(ctx, incoming.proto, &mut tuple, size)
}

/// [`host_socket_owns`] for an IPv6 tuple.
#[inline(always)]
pub fn host_socket_owns6(ctx: &TcContext, incoming: &CtKey) -> bool {
    // SAFETY: as above.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
        saddr: incoming.saddr,
        daddr: incoming.daddr,
        sport: incoming.sport.to_be(),
        dport: incoming.dport.to_be(),
    };
    let size = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32;
    owned(ctx, incoming.proto, &mut tuple, size)
}

/// Whether a host socket of `proto` matches `tuple`, of `size` bytes (the size tells the
/// helpers its family).
#[inline(always)]
fn owned(ctx: &TcContext, proto: u8, tuple: &mut bpf_sock_tuple, size: u32) -> bool {
    let netns = BPF_F_CURRENT_NETNS as u64;
    // SAFETY: the helpers read `size` bytes of the tuple on the stack; a socket they return
    // holds a reference, released before returning.
    unsafe {
        let sk = match proto {
            IPPROTO_TCP => bpf_skc_lookup_tcp(ctx.as_ptr(), tuple, size, netns, 0),
            IPPROTO_UDP => bpf_sk_lookup_udp(ctx.as_ptr(), tuple, size, netns, 0),
            _ => return false,
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}
