//! The cgroup sock_addr programs: a process of the host connecting or sending to a published
//! port (on a host address, or on loopback) talks straight to the container, so no userland
//! proxy and no NAT is needed; receiving and getpeername() show it the address it asked for.
//!
//! A cgroup program sees the sockets of every namespace whose processes are in the cgroup: it
//! only acts in the host namespace of its own netd instance, identified by its cookie.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use netd_common::datapath::{
    AF_INET, IPPROTO_TCP, IPPROTO_UDP, SOCK_REDIRECTS_MAX, SockRedirectKey, SockRedirectOrigin,
};

use crate::lib::{conntrack::v4, maps};

/// What a sock_addr program returns to let the call go on.
const ALLOW: i32 = 1;
const LOOPBACK_FIRST_OCTET: u8 = 127;

/// Which published address each redirected socket asked for, per container address.
#[map]
static SOCK_REDIRECTS: LruHashMap<SockRedirectKey, SockRedirectOrigin> =
    LruHashMap::pinned(SOCK_REDIRECTS_MAX, 0);

#[cgroup_sock_addr(connect4)]
pub fn host_connect4(ctx: SockAddrContext) -> i32 {
    redirect_to_container(&ctx);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn host_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect_to_container(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn host_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_original(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn host_getpeername4(ctx: SockAddrContext) -> i32 {
    show_original(&ctx);
    ALLOW
}

/// The socket address of `ctx`, when its socket is one of the host namespace's.
#[inline(always)]
fn host_sock_addr(ctx: &SockAddrContext) -> Option<*mut bpf_sock_addr> {
    let cfg = maps::config()?;
    // SAFETY: a helper valid for sock_addr programs.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        return None;
    }
    Some(ctx.sock_addr)
}

#[inline(always)]
fn redirect_key(ctx: &SockAddrContext, addr: u32, port: u16) -> SockRedirectKey {
    // SAFETY: a helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    SockRedirectKey {
        cookie,
        addr: v4(addr),
        port,
        family: AF_INET,
        _pad: [0; 5],
    }
}

/// Points a connect() or sendmsg() to a published port at its container, and remembers what
/// was asked for.
#[inline(always)]
fn redirect_to_container(ctx: &SockAddrContext) {
    let Some(cfg) = maps::config() else { return };
    let Some(sa) = host_sock_addr(ctx) else {
        return;
    };
    // SAFETY: the context's socket address is valid for the whole program run.
    let sa = unsafe { &mut *sa };
    let proto = match sa.protocol {
        p if p == u32::from(IPPROTO_TCP) => IPPROTO_TCP,
        p if p == u32::from(IPPROTO_UDP) => IPPROTO_UDP,
        _ => return,
    };
    let daddr = sa.user_ip4;
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let loopback = daddr.to_ne_bytes()[0] == LOOPBACK_FIRST_OCTET;
    let Some(target) = maps::published(daddr, port, proto, cfg, loopback) else {
        return;
    };
    // A local connection's source is the address it goes to: that is what `--publish-allow`
    // ranges are matched against (as the iptables datapath's DNAT with `-s RANGE` does).
    // Outside them, the call goes on to the host's own port, unredirected.
    if !maps::publish_allows(&target, proto, daddr) {
        return;
    }
    let key = redirect_key(ctx, target.addr[0], target.port);
    let origin = SockRedirectOrigin {
        addr: v4(daddr),
        port,
        _pad: [0; 2],
    };
    // Without the record, replies would show the container's address: still delivered.
    let _ = SOCK_REDIRECTS.insert(&key, &origin, u64::from(BPF_ANY));
    sa.user_ip4 = target.addr[0];
    sa.user_port = u32::from(target.port.to_be());
}

/// Shows the process the published address it asked for where the peer is a container it
/// was redirected to (received datagrams' source, getpeername()).
#[inline(always)]
fn show_original(ctx: &SockAddrContext) {
    let Some(sa) = host_sock_addr(ctx) else {
        return;
    };
    // SAFETY: the context's socket address is valid for the whole program run.
    let sa = unsafe { &mut *sa };
    let key = redirect_key(ctx, sa.user_ip4, u16::from_be(sa.user_port as u16));
    // SAFETY: read-only use of a map value written whole.
    let Some(origin) = (unsafe { SOCK_REDIRECTS.get(&key) }) else {
        return;
    };
    sa.user_ip4 = origin.addr[0];
    sa.user_port = u32::from(origin.port.to_be());
}
