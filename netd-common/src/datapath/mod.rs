//! The eBPF datapath's maps: networks, endpoints, published ports (and their allowed sources),
//! connection tracking, the uplink configuration, the isolation policy (veths, links), the
//! per-reason packet counters and the drop events, split by concern and re-exported here.
//!
//! Addresses are 16 bytes ([`Addr`]) with a family byte next to them, so IPv6 is an addition to
//! these layouts, not a rewrite. IPv4 addresses sit in word 0 in network byte order (the bytes
//! as they are on the wire), the other words zero. Ports are in host byte order.

mod conntrack;
mod maps;
mod stats;

pub use conntrack::*;
pub use maps::*;
pub use stats::*;

/// TC program on the uplink's ingress: reverse SNAT and DNAT of published ports.
pub const UPLINK_INGRESS_PROG: &str = "uplink_ingress";
/// TC program on the uplink's egress: SNAT (masquerade) and reverse DNAT.
pub const UPLINK_EGRESS_PROG: &str = "uplink_egress";
/// NAT66 on the uplink's egress and ingress: the IPv4 programs hand IPv6 packets over to them
/// (tail calls through `NAT66_PROGS`, slots 0 and 1).
pub const UPLINK_EGRESS6_PROG: &str = "uplink_egress6";
pub const UPLINK_INGRESS6_PROG: &str = "uplink_ingress6";
/// `NAT66_PROGS`: the program array of those two, in that order.
pub const NAT66_PROGS_MAP: &str = "NAT66_PROGS";
pub const NAT66_PROGS: [&str; 2] = [UPLINK_EGRESS6_PROG, UPLINK_INGRESS6_PROG];
/// XDP program on the uplink (`--uplink-xdp`): drops what `uplink_ingress` would refuse
/// before the kernel builds an skb for it.
pub const UPLINK_XDP_PROG: &str = "uplink_xdp";
/// TC program on each network bridge's ingress: hairpin to published ports.
pub const BRIDGE_INGRESS_PROG: &str = "bridge_ingress";
/// IPv6 hairpin: `bridge_ingress` hands IPv6 frames over to it (a tail call through
/// `BRIDGE6_PROGS`, slot 0).
pub const BRIDGE_INGRESS6_PROG: &str = "bridge_ingress6";
/// `BRIDGE6_PROGS`: the program array of that one.
pub const BRIDGE6_PROGS_MAP: &str = "BRIDGE6_PROGS";
pub const BRIDGE6_PROGS: [&str; 1] = [BRIDGE_INGRESS6_PROG];
/// TC program on each container's host-side veth, egress (towards the container): lets in
/// only what comes from the host, from the container's own network, or was translated by netd
/// (the destination side of the isolation, whatever interface a packet was routed in through).
pub const ENDPOINT_EGRESS_PROG: &str = "endpoint_egress";
/// The `skb->mark` bit the NAT programs set on a packet they translated to a container and
/// left to the stack to deliver: `endpoint_egress` lets such packets in.
pub const MARK_ADMITTED: u32 = 0x0200_0000;
/// TC program on each container's host-side veth, ingress: the isolation policy (anti-spoofing,
/// other networks, `--icc`, `--link`, `--internal`) and the container-to-container fast path.
pub const ENDPOINT_INGRESS_PROG: &str = "endpoint_ingress";
/// The same for IPv6, with the fast path out: `endpoint_ingress` hands IPv6 frames over to it
/// (a tail call through `ENDPOINT6_PROGS`, slot 0).
pub const ENDPOINT_INGRESS6_PROG: &str = "endpoint_ingress6";
/// `ENDPOINT6_PROGS`: the program array of that one.
pub const ENDPOINT6_PROGS_MAP: &str = "ENDPOINT6_PROGS";
pub const ENDPOINT6_PROGS: [&str; 1] = [ENDPOINT_INGRESS6_PROG];
/// cgroup connect4 program: host processes connecting to published ports go to the container.
pub const HOST_CONNECT4_PROG: &str = "host_connect4";
/// cgroup sendmsg4 program: the same for unconnected UDP sends.
pub const HOST_SENDMSG4_PROG: &str = "host_sendmsg4";
/// cgroup recvmsg4 and getpeername4 programs: the process sees the address it asked for.
pub const HOST_RECVMSG4_PROG: &str = "host_recvmsg4";
pub const HOST_GETPEERNAME4_PROG: &str = "host_getpeername4";
/// The same four for IPv6 sockets (IPv6 ports, and IPv4 ones through IPv4-mapped addresses).
pub const HOST_CONNECT6_PROG: &str = "host_connect6";
pub const HOST_SENDMSG6_PROG: &str = "host_sendmsg6";
pub const HOST_RECVMSG6_PROG: &str = "host_recvmsg6";
pub const HOST_GETPEERNAME6_PROG: &str = "host_getpeername6";
/// Every cgroup program of the host redirection.
pub const HOST_SOCK_PROGS: [&str; 8] = [
    HOST_CONNECT4_PROG,
    HOST_SENDMSG4_PROG,
    HOST_RECVMSG4_PROG,
    HOST_GETPEERNAME4_PROG,
    HOST_CONNECT6_PROG,
    HOST_SENDMSG6_PROG,
    HOST_RECVMSG6_PROG,
    HOST_GETPEERNAME6_PROG,
];
/// Redirected sockets remembered for `recvmsg4`/`getpeername4` (LRU).
pub const SOCK_REDIRECTS_MAX: u32 = 65_536;

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An IPv4 or IPv6 address: IPv4 in word 0 (wire byte order), words 1..3 zero.
pub type Addr = [u32; 4];

/// The map form of the IPv4 address whose wire bytes are `octets`.
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// The map form of the IPv6 address whose wire bytes are `octets`.
pub const fn addr_v6(o: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The wire bytes of the IPv4 address in `addr`.
pub const fn v4_octets(addr: &Addr) -> [u8; 4] {
    addr[0].to_ne_bytes()
}

/// The wire bytes of the IPv6 address in `addr` (the inverse of [`addr_v6`]).
pub const fn v6_octets(addr: &Addr) -> [u8; 16] {
    let [a, b, c, d] = [
        addr[0].to_ne_bytes(),
        addr[1].to_ne_bytes(),
        addr[2].to_ne_bytes(),
        addr[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
