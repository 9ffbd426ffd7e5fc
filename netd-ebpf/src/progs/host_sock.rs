//! The cgroup sock_addr programs: a process of the host connecting or sending to a published
//! port (on a host address, or on loopback) talks straight to the container, so no userland
//! proxy and no NAT is needed; receiving and getpeername() show it the address it asked for.
//! The IPv6 programs do the same for IPv6 ports, and for IPv4 ones asked for by an IPv6
//! socket through an IPv4-mapped address (`::ffff:a.b.c.d`).
//!
//! A cgroup program sees the sockets of every namespace whose processes are in the cgroup: it
//! only acts in the host namespace of its own netd instance, identified by its cookie.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::LruHashMap,
    programs::SockAddrContext,
};
use netd_common::datapath::{
    AF_INET, AF_INET6, Addr, Config, IPPROTO_TCP, IPPROTO_UDP, PublishedTarget, SOCK_REDIRECTS_MAX,
    SockRedirectKey, SockRedirectOrigin,
};

use crate::lib::{
    conntrack::v4,
    maps::{self, LOOPBACK_FIRST_OCTET},
};

/// What a sock_addr program returns to let the call go on.
const ALLOW: i32 = 1;
/// `::1`, as `user_ip6` holds it (each word in wire byte order).
const LOOPBACK6: Addr = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Which published address each redirected socket asked for, per container address.
#[map]
static SOCK_REDIRECTS: LruHashMap<SockRedirectKey, SockRedirectOrigin> =
    LruHashMap::pinned(SOCK_REDIRECTS_MAX, 0);

#[cgroup_sock_addr(connect4)]
pub fn host_connect4(ctx: SockAddrContext) -> i32 {
    redirect_to_container(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn host_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect_to_container(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn host_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_original(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn host_getpeername4(ctx: SockAddrContext) -> i32 {
    show_original(&ctx, Family::V4);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn host_connect6(ctx: SockAddrContext) -> i32 {
    redirect_to_container(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn host_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect_to_container(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn host_recvmsg6(ctx: SockAddrContext) -> i32 {
    show_original(&ctx, Family::V6);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn host_getpeername6(ctx: SockAddrContext) -> i32 {
    show_original(&ctx, Family::V6);
    ALLOW
}

/// The socket address field a program reads and writes: `user_ip4`, or `user_ip6`.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

/// A socket's peer address, as the published ports are keyed: an IPv4-mapped IPv6 address is
/// the IPv4 one (an IPv6 socket reaching an IPv4 port).
#[derive(Clone, Copy)]
enum Peer {
    V4(u32),
    V6(Addr),
}

impl Peer {
    #[inline(always)]
    fn read(sa: &bpf_sock_addr, family: Family) -> Self {
        match family {
            Family::V4 => Peer::V4(sa.user_ip4),
            Family::V6 => {
                let ip = read_ip6(sa);
                if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD {
                    Peer::V4(ip[3])
                } else {
                    Peer::V6(ip)
                }
            }
        }
    }

    /// Writes this address where [`Peer::read`] found the one it replaces.
    #[inline(always)]
    fn write(self, sa: &mut bpf_sock_addr, family: Family) {
        match (family, self) {
            (Family::V4, Peer::V4(addr)) => sa.user_ip4 = addr,
            (Family::V6, Peer::V4(addr)) => write_ip6(sa, [0, 0, V4_MAPPED_WORD, addr]),
            (Family::V6, Peer::V6(addr)) => write_ip6(sa, addr),
            // An IPv4 socket has no IPv6 peer: nothing is recorded or published so.
            (Family::V4, Peer::V6(_)) => {}
        }
    }

    #[inline(always)]
    fn key(self) -> (Addr, u8) {
        match self {
            Peer::V4(addr) => (v4(addr), AF_INET),
            Peer::V6(addr) => (addr, AF_INET6),
        }
    }

    /// The container port published where this address and `port` lead, for a process of the
    /// host: on this address, or on every address when it is the host's or loopback.
    #[inline(always)]
    fn published(self, port: u16, proto: u8, cfg: &Config) -> Option<PublishedTarget> {
        match self {
            Peer::V4(addr) => {
                let loopback = addr.to_ne_bytes()[0] == LOOPBACK_FIRST_OCTET;
                maps::published_for_host(addr, port, proto, cfg, loopback)
            }
            Peer::V6(addr) => maps::published6(&addr, port, proto).or_else(|| {
                maps::published6(&[0; 4], port, proto)
                    .filter(|_| addr == LOOPBACK6 || maps::is_host_addr6(&addr))
            }),
        }
    }

    /// Whether a flow from this address may reach `target` (its `--publish-allow` ranges).
    #[inline(always)]
    fn allowed_to(self, target: &PublishedTarget, proto: u8) -> bool {
        match self {
            Peer::V4(addr) => maps::publish_allows(target, proto, addr),
            Peer::V6(addr) => maps::publish_allows6(target, proto, addr),
        }
    }

    /// The container of `target`, in this address's family.
    #[inline(always)]
    fn container(self, target: &PublishedTarget) -> Self {
        match self {
            Peer::V4(_) => Peer::V4(target.addr[0]),
            Peer::V6(_) => Peer::V6(target.addr),
        }
    }
}

/// `user_ip6`, a word at a time: the verifier allows no other access to the context (a
/// plain copy may become a byte-wise `memcpy`).
#[inline(always)]
fn read_ip6(sa: &bpf_sock_addr) -> Addr {
    let words = sa.user_ip6.as_ptr();
    // SAFETY: four words of the context's `user_ip6`, read in place.
    unsafe {
        [
            read_volatile(words),
            read_volatile(words.add(1)),
            read_volatile(words.add(2)),
            read_volatile(words.add(3)),
        ]
    }
}

/// Sets `user_ip6` to `addr`, a word at a time (see [`read_ip6`]).
#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, addr: Addr) {
    let words = sa.user_ip6.as_mut_ptr();
    // SAFETY: four words of the context's `user_ip6`, written in place.
    unsafe {
        write_volatile(words, addr[0]);
        write_volatile(words.add(1), addr[1]);
        write_volatile(words.add(2), addr[2]);
        write_volatile(words.add(3), addr[3]);
    }
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
fn redirect_key(ctx: &SockAddrContext, peer: Peer, port: u16) -> SockRedirectKey {
    // SAFETY: a helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (addr, family) = peer.key();
    SockRedirectKey {
        cookie,
        addr,
        port,
        family,
        _pad: [0; 5],
    }
}

/// Points a connect() or sendmsg() to a published port at its container, and remembers what
/// was asked for.
#[inline(always)]
fn redirect_to_container(ctx: &SockAddrContext, family: Family) {
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
    let asked = Peer::read(sa, family);
    // user_port holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(sa.user_port as u16);
    let Some(target) = asked.published(port, proto, cfg) else {
        return;
    };
    // A local connection's source is the address it goes to: that is what `--publish-allow`
    // ranges are matched against (as the iptables datapath's DNAT with `-s RANGE` does).
    // Outside them, the call goes on to the host's own port, unredirected.
    if !asked.allowed_to(&target, proto) {
        return;
    }
    let container = asked.container(&target);
    let key = redirect_key(ctx, container, target.port);
    let origin = SockRedirectOrigin {
        addr: asked.key().0,
        port,
        _pad: [0; 2],
    };
    // Without the record, replies would show the container's address: still delivered.
    let _ = SOCK_REDIRECTS.insert(&key, &origin, u64::from(BPF_ANY));
    container.write(sa, family);
    sa.user_port = u32::from(target.port.to_be());
}

/// Shows the process the published address it asked for where the peer is a container it
/// was redirected to (received datagrams' source, getpeername()).
#[inline(always)]
fn show_original(ctx: &SockAddrContext, family: Family) {
    let Some(sa) = host_sock_addr(ctx) else {
        return;
    };
    // SAFETY: the context's socket address is valid for the whole program run.
    let sa = unsafe { &mut *sa };
    let peer = Peer::read(sa, family);
    let key = redirect_key(ctx, peer, u16::from_be(sa.user_port as u16));
    // SAFETY: read-only use of a map value written whole.
    let Some(origin) = (unsafe { SOCK_REDIRECTS.get(&key) }) else {
        return;
    };
    let asked = match peer {
        Peer::V4(_) => Peer::V4(origin.addr[0]),
        Peer::V6(_) => Peer::V6(origin.addr),
    };
    asked.write(sa, family);
    sa.user_port = u32::from(origin.port.to_be());
}
