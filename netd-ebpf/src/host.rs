//! The cgroup connect4 program: a process of the host connecting to a published port (on a
//! host address, or on loopback) is connected straight to the container, so no userland proxy
//! and no NAT is needed. A cgroup program sees the sockets of every namespace whose processes
//! are in the cgroup: it only acts in the host namespace of its own netd instance, identified
//! by its cookie.

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_netns_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use netd_common::datapath::{IPPROTO_TCP, IPPROTO_UDP};

use crate::maps;

/// What a sock_addr program returns to let the call go on.
const ALLOW: i32 = 1;
const LOOPBACK_FIRST_OCTET: u8 = 127;

#[cgroup_sock_addr(connect4)]
pub fn host_connect4(ctx: SockAddrContext) -> i32 {
    redirect_published(&ctx);
    ALLOW
}

#[inline(always)]
fn redirect_published(ctx: &SockAddrContext) {
    let Some(cfg) = maps::config() else { return };
    // SAFETY: a helper valid for sock_addr programs.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        return;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let proto = match sa.protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return,
    };
    let daddr = sa.user_ip4;
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let is_host = daddr == cfg.uplink_addr[0] || daddr.to_ne_bytes()[0] == LOOPBACK_FIRST_OCTET;
    let Some(target) = maps::published(daddr, port, proto, is_host) else {
        return;
    };
    sa.user_ip4 = target.addr[0];
    sa.user_port = u32::from(target.port.to_be());
}
