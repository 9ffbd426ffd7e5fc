//! The eBPF datapath's maps: networks, endpoints, published ports (and their allowed sources),
//! connection tracking, the uplink configuration, the isolation policy (veths, links), the
//! per-reason packet counters and the drop events.
//!
//! Addresses are 16 bytes ([`Addr`]) with a family byte next to them, so IPv6 is an addition to
//! these layouts, not a rewrite. IPv4 addresses sit in word 0 in network byte order (the bytes
//! as they are on the wire), the other words zero. Ports are in host byte order.

/// `NETWORKS`: network id (`u32`) → [`NetworkInfo`].
pub const NETWORKS_MAP: &str = "NETWORKS";
/// `ENDPOINTS`: [`EndpointKey`] → [`EndpointInfo`], the controller's IPAM mirror.
pub const ENDPOINTS_MAP: &str = "ENDPOINTS";
/// `PUBLISHED`: [`PublishedKey`] → [`PublishedTarget`].
pub const PUBLISHED_MAP: &str = "PUBLISHED";
/// `CONNTRACK`: LRU hash [`CtKey`] → [`CtEntry`], one entry per direction of each flow.
pub const CONNTRACK_MAP: &str = "CONNTRACK";
/// `CONFIG`: a one-slot array holding [`Config`].
pub const CONFIG_MAP: &str = "CONFIG";
/// `STATS`: per-CPU array of `u64` indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";
/// `ENDPOINT_DROPS`: per-CPU hash [`EndpointDropKey`] → packets of that container dropped
/// for that reason.
pub const ENDPOINT_DROPS_MAP: &str = "ENDPOINT_DROPS";
/// `PUBLISH_ALLOW`: LPM trie of [`PublishAllowKey`] → `u8` (1): the sources a published port
/// flagged [`PUBLISH_RESTRICTED`] accepts new flows from.
pub const PUBLISH_ALLOW_MAP: &str = "PUBLISH_ALLOW";
pub const PUBLISH_ALLOW_MAX: u32 = 65_536;
/// `VETHS`: host-side veth ifindex (`u32`) → the [`VethInfo`] of the container behind it.
pub const VETHS_MAP: &str = "VETHS";
/// `LINKS`: [`LinkKey`] → `u8` (1): what `--link` opens on a network with `--icc=false`.
pub const LINKS_MAP: &str = "LINKS";
/// `DROP_EVENTS`: ring buffer of [`DropEvent`], read by `netd monitor`.
pub const DROP_EVENTS_MAP: &str = "DROP_EVENTS";
/// Size of `DROP_EVENTS` in bytes (a power of two, a multiple of the page size).
pub const DROP_EVENTS_BYTES: u32 = 256 * 1024;

/// TC program on the uplink's ingress: reverse SNAT and DNAT of published ports.
pub const UPLINK_INGRESS_PROG: &str = "uplink_ingress";
/// TC program on the uplink's egress: SNAT (masquerade) and reverse DNAT.
pub const UPLINK_EGRESS_PROG: &str = "uplink_egress";
/// XDP program on the uplink (`--uplink-xdp`): drops what `uplink_ingress` would refuse
/// before the kernel builds an skb for it.
pub const UPLINK_XDP_PROG: &str = "uplink_xdp";
/// TC program on each network bridge's ingress: hairpin to published ports.
pub const BRIDGE_INGRESS_PROG: &str = "bridge_ingress";
/// TC program on each container's host-side veth, ingress: the isolation policy (anti-spoofing,
/// other networks, `--icc`, `--link`, `--internal`) and the container-to-container fast path.
pub const ENDPOINT_INGRESS_PROG: &str = "endpoint_ingress";
/// cgroup connect4 program: host processes connecting to published ports go to the container.
pub const HOST_CONNECT4_PROG: &str = "host_connect4";
/// cgroup sendmsg4 program: the same for unconnected UDP sends.
pub const HOST_SENDMSG4_PROG: &str = "host_sendmsg4";
/// cgroup recvmsg4 and getpeername4 programs: the process sees the address it asked for.
pub const HOST_RECVMSG4_PROG: &str = "host_recvmsg4";
pub const HOST_GETPEERNAME4_PROG: &str = "host_getpeername4";
/// Every cgroup program of the host redirection.
pub const HOST_SOCK_PROGS: [&str; 4] = [
    HOST_CONNECT4_PROG,
    HOST_SENDMSG4_PROG,
    HOST_RECVMSG4_PROG,
    HOST_GETPEERNAME4_PROG,
];
/// Redirected sockets remembered for `recvmsg4`/`getpeername4` (LRU).
pub const SOCK_REDIRECTS_MAX: u32 = 65_536;

/// Default size of the conntrack table (entries; each flow takes two).
pub const CONNTRACK_DEFAULT_MAX: u32 = 262_144;
pub const ENDPOINTS_MAX: u32 = 65_536;
pub const NETWORKS_MAX: u32 = 1_024;
pub const PUBLISHED_MAX: u32 = 65_536;
pub const LINKS_MAX: u32 = 65_536;

pub const AF_INET: u8 = 2;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// An IPv4 or IPv6 address: IPv4 in word 0 (wire byte order), words 1..3 zero.
pub type Addr = [u32; 4];

/// The map form of the IPv4 address whose wire bytes are `octets`.
pub const fn addr_v4(octets: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(octets), 0, 0, 0]
}

/// The wire bytes of the IPv4 address in `addr`.
pub const fn v4_octets(addr: &Addr) -> [u8; 4] {
    addr[0].to_ne_bytes()
}

/// Network flags.
pub const NET_MASQUERADE: u8 = 1;
pub const NET_ICC: u8 = 2;
pub const NET_INTERNAL: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NetworkInfo {
    pub subnet: Addr,
    pub gateway: Addr,
    pub prefix_len: u8,
    pub family: u8,
    /// `NET_*` bits.
    pub flags: u8,
    /// The bridge's MAC, set when the network is made: the source of frames the host routes
    /// to the network's containers.
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EndpointKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A container's drops for one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EndpointDropKey {
    pub endpoint: EndpointKey,
    /// The [`Stat`] the drop is counted under.
    pub reason: u32,
}

/// What the program on a container's host-side veth checks every frame against, in one
/// lookup: the container's address, MAC and network, with the network's `NET_*` flags (fixed
/// when the network is made).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VethInfo {
    pub addr: Addr,
    pub network_id: u32,
    pub mac: [u8; 6],
    pub net_flags: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EndpointInfo {
    /// The host end of the container's veth.
    pub ifindex: u32,
    pub network_id: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// One port `--link` opens: `src` may reach `dst` on `proto`/`port`, and `dst` may answer from
/// it (Docker's pair of ACCEPT rules per exposed port of a linked container).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LinkKey {
    pub src: Addr,
    pub dst: Addr,
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// A packet the policy dropped, as `netd monitor` shows it. Ports are 0 when the packet has
/// none (or was not parsed that far); addresses are zero for non-IP frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DropEvent {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    /// A [`Stat`] that drops.
    pub reason: u32,
    /// The interface the packet arrived on.
    pub ifindex: u32,
}

/// A published port: `addr` is the host address it is bound to, all zero for any.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PublishedKey {
    pub addr: Addr,
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PublishedTarget {
    pub addr: Addr,
    pub port: u16,
    /// `PUBLISH_*` bits.
    pub flags: u16,
    pub network_id: u32,
}

/// `PublishedTarget::flags`: new flows only from the sources in `PUBLISH_ALLOW`
/// (`--publish-allow`).
pub const PUBLISH_RESTRICTED: u16 = 1;

/// A source range a published port accepts, as the data of an LPM trie key: the published
/// target (container address, port, protocol) is matched whole, then `src` by prefix. The
/// key's prefix length is therefore [`PublishAllowKey::TARGET_BITS`] + the range's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PublishAllowKey {
    pub target: Addr,
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub src: Addr,
}

impl PublishAllowKey {
    /// The bits before `src`.
    pub const TARGET_BITS: u32 = (16 + 2 + 1 + 1) * 8;
}

/// A host socket (by cookie) redirected to a container address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRedirectKey {
    pub cookie: u64,
    pub addr: Addr,
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// The address and port the socket's process asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SockRedirectOrigin {
    pub addr: Addr,
    pub port: u16,
    pub _pad: [u8; 2],
}

/// One direction of a flow as seen on the wire at the uplink. For ICMP echo, the identifier
/// is `sport` of a request and `dport` of a reply (the other port is 0), so a reply's tuple
/// is the request's reversed, as for TCP and UDP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl CtKey {
    /// The same flow seen from the other end.
    pub const fn reversed(&self) -> Self {
        Self {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Which direction of its flow a conntrack entry matches.
pub const CT_DIR_ORIGINAL: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// What a flow's translation is.
pub const CT_NAT_SNAT: u8 = 1;
pub const CT_NAT_DNAT: u8 = 2;
/// A container to a published port through a host address: DNAT plus SNAT to the gateway.
pub const CT_NAT_HAIRPIN: u8 = 3;

/// Which end of the packet an entry's rewrite changes.
pub const CT_REWRITE_SRC: u8 = 1;
pub const CT_REWRITE_DST: u8 = 2;
/// The destination to `nat_addr`/`nat_port`, the source to `nat2_addr`/`nat2_port`.
pub const CT_REWRITE_BOTH: u8 = 3;

/// Flow states. TCP walks them like netfilter; UDP and ICMP use `NEW` and `ESTABLISHED`
/// (once a reply was seen: netfilter's assured stream).
pub const CT_NEW: u8 = 0;
pub const CT_SYN_SENT: u8 = 1;
pub const CT_SYN_RECV: u8 = 2;
pub const CT_ESTABLISHED: u8 = 3;
pub const CT_FIN_WAIT: u8 = 4;
pub const CT_TIME_WAIT: u8 = 5;
pub const CT_CLOSE: u8 = 6;

/// `CtEntry::flags` bits.
pub const CT_SEEN_REPLY: u8 = 1;
pub const CT_FIN_ORIGINAL: u8 = 2;
pub const CT_FIN_REPLY: u8 = 4;

/// A conntrack entry. Both entries of a flow carry the flow's two tuples and their own
/// rewrite; state, timestamps and counters live in the original-direction entry only, so a
/// reply-direction hit also looks up `original`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtEntry {
    /// The flow's original direction, before translation (the key of the flow's state).
    pub original: CtKey,
    /// The flow's reply direction, as it arrives (after translation of the original).
    pub reply: CtKey,
    /// The address and port (ICMP: echo identifier) this entry's rewrite puts in place.
    pub nat_addr: Addr,
    pub nat_port: u16,
    /// `CT_DIR_*`: the direction this entry's key matches.
    pub dir: u8,
    /// `CT_REWRITE_*`.
    pub rewrite: u8,
    /// `CT_NAT_*`.
    pub nat: u8,
    /// `CT_*` state (original entry only).
    pub state: u8,
    /// `CT_SEEN_REPLY` | `CT_FIN_*` (original entry only).
    pub flags: u8,
    pub _pad: u8,
    /// The source rewrite of a `CT_REWRITE_BOTH` entry.
    pub nat2_addr: Addr,
    pub nat2_port: u16,
    pub _pad2: [u8; 6],
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of creation and of the last packet.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Per direction (`CT_DIR_*` index).
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

impl CtEntry {
    /// How long the flow of this original-direction entry may stay idle in its state.
    #[inline(always)]
    pub fn timeout_secs(&self, t: &Timeouts) -> u32 {
        match self.original.proto {
            IPPROTO_TCP => match self.state {
                CT_SYN_SENT => t.tcp_syn_sent,
                CT_SYN_RECV => t.tcp_syn_recv,
                CT_ESTABLISHED => t.tcp_established,
                CT_FIN_WAIT => t.tcp_fin_wait,
                CT_TIME_WAIT => t.tcp_time_wait,
                _ => t.tcp_close,
            },
            IPPROTO_UDP if self.flags & CT_SEEN_REPLY != 0 => t.udp_stream,
            IPPROTO_UDP => t.udp,
            _ => t.icmp,
        }
    }
}

/// Conntrack timeouts in seconds (netfilter's defaults).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Timeouts {
    pub tcp_syn_sent: u32,
    pub tcp_syn_recv: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub udp: u32,
    pub udp_stream: u32,
    pub icmp: u32,
    pub _pad: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn_sent: 120,
            tcp_syn_recv: 60,
            tcp_established: 432_000,
            tcp_fin_wait: 120,
            tcp_time_wait: 120,
            tcp_close: 10,
            udp: 30,
            udp_stream: 120,
            icmp: 30,
            _pad: 0,
        }
    }
}

/// The uplink the NAT programs are attached to, and the conntrack timeouts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Config {
    /// The uplink's address: the masquerade source, and the address "any" published ports
    /// answer on.
    pub uplink_addr: Addr,
    pub uplink_ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub timeouts: Timeouts,
    /// The cookie of the host network namespace: the cgroup program acts only there.
    pub netns_cookie: u64,
}

/// Counters in `STATS`: what the programs did with each packet, and why they left one alone.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A new masqueraded flow.
    SnatNew = 0,
    /// A packet of a masqueraded flow, either direction.
    SnatHit = 1,
    /// A new flow to a published port.
    DnatNew = 2,
    /// A packet of a published-port flow, either direction.
    DnatHit = 3,
    /// IPv4 that needs no translation (not from a masqueraded network, no flow, no port).
    NoNat = 4,
    /// Not IPv4 (passed untouched).
    NotIpv4 = 5,
    /// VLAN-tagged, in the frame or in the skb (passed untouched).
    Vlan = 6,
    /// Shorter than an Ethernet header.
    TruncatedL2 = 7,
    /// Shorter than its IPv4 header or its total length.
    TruncatedL3 = 8,
    /// Shorter than its TCP/UDP/ICMP header.
    TruncatedL4 = 9,
    /// IPv4 with a version or header length that is not valid.
    BadIpHeader = 10,
    /// IPv4 with options (never translated).
    IpOptions = 11,
    /// An IPv4 fragment (never translated: later fragments carry no ports).
    Fragment = 12,
    /// An L4 protocol the NAT doesn't translate (ICMP other than echo included).
    UnsupportedProto = 13,
    /// No free source port or echo id towards that destination: dropped.
    PortExhausted = 14,
    /// The conntrack table refused an insert: dropped.
    ConntrackFull = 15,
    /// A helper failed while rewriting: dropped, the packet may be half written.
    RewriteFailed = 16,
    /// An ICMP error about a tracked flow, translated with the packet it quotes.
    IcmpError = 17,
    /// A new hairpin flow (a container to a published port through a host address).
    HairpinNew = 18,
    /// A packet of a hairpin flow, either direction.
    HairpinHit = 19,
    /// A hairpin packet whose container is gone: dropped.
    NoEndpoint = 20,
    /// From a container, with a source MAC (or ARP sender) that isn't the container's: dropped.
    SpoofedMac = 21,
    /// From a container, with a source address (or ARP sender address) that isn't its own:
    /// dropped.
    SpoofedAddr = 22,
    /// From a container to another network's container: dropped.
    OtherNetwork = 23,
    /// Between containers of an `--icc=false` network, not along a `--link`: dropped.
    IccDenied = 24,
    /// Leaving an `--internal` network, or arriving at one from outside: dropped.
    Internal = 25,
    /// From a container, allowed by the policy, on to the bridge.
    PolicyPass = 26,
    /// From a container to a container of the same network, delivered straight into its
    /// namespace (no bridge, no netfilter).
    FastPathLocal = 27,
    /// Translated on the uplink's ingress and delivered straight into the container's
    /// namespace.
    FastPathIn = 28,
    /// From a container to the outside, sent straight to the uplink's egress.
    FastPathOut = 29,
    /// A new flow to a published port from a source its `--publish-allow` ranges don't
    /// cover: dropped.
    PublishDenied = 30,
    /// A new flow from outside straight to a container of a masquerading network (not through
    /// a published port): dropped, as Docker's FORWARD policy does.
    Unsolicited = 31,
}

impl Stat {
    pub const COUNT: u32 = 32;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::SnatNew,
        Stat::SnatHit,
        Stat::DnatNew,
        Stat::DnatHit,
        Stat::NoNat,
        Stat::NotIpv4,
        Stat::Vlan,
        Stat::TruncatedL2,
        Stat::TruncatedL3,
        Stat::TruncatedL4,
        Stat::BadIpHeader,
        Stat::IpOptions,
        Stat::Fragment,
        Stat::UnsupportedProto,
        Stat::PortExhausted,
        Stat::ConntrackFull,
        Stat::RewriteFailed,
        Stat::IcmpError,
        Stat::HairpinNew,
        Stat::HairpinHit,
        Stat::NoEndpoint,
        Stat::SpoofedMac,
        Stat::SpoofedAddr,
        Stat::OtherNetwork,
        Stat::IccDenied,
        Stat::Internal,
        Stat::PolicyPass,
        Stat::FastPathLocal,
        Stat::FastPathIn,
        Stat::FastPathOut,
        Stat::PublishDenied,
        Stat::Unsolicited,
    ];

    /// The counter at index `n` of `STATS` (what a [`DropEvent`] names as its reason).
    pub fn from_index(n: u32) -> Option<Stat> {
        Self::ALL.iter().copied().find(|s| *s as u32 == n)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Stat::SnatNew => "snat_new",
            Stat::SnatHit => "snat_hit",
            Stat::DnatNew => "dnat_new",
            Stat::DnatHit => "dnat_hit",
            Stat::NoNat => "no_nat",
            Stat::NotIpv4 => "not_ipv4",
            Stat::Vlan => "vlan",
            Stat::TruncatedL2 => "truncated_l2",
            Stat::TruncatedL3 => "truncated_l3",
            Stat::TruncatedL4 => "truncated_l4",
            Stat::BadIpHeader => "bad_ip_header",
            Stat::IpOptions => "ip_options",
            Stat::Fragment => "fragment",
            Stat::UnsupportedProto => "unsupported_proto",
            Stat::PortExhausted => "port_exhausted",
            Stat::ConntrackFull => "conntrack_full",
            Stat::RewriteFailed => "rewrite_failed",
            Stat::IcmpError => "icmp_error",
            Stat::HairpinNew => "hairpin_new",
            Stat::HairpinHit => "hairpin_hit",
            Stat::NoEndpoint => "no_endpoint",
            Stat::SpoofedMac => "spoofed_mac",
            Stat::SpoofedAddr => "spoofed_addr",
            Stat::OtherNetwork => "other_network",
            Stat::IccDenied => "icc_denied",
            Stat::Internal => "internal",
            Stat::PolicyPass => "policy_pass",
            Stat::FastPathLocal => "fast_path_local",
            Stat::FastPathIn => "fast_path_in",
            Stat::FastPathOut => "fast_path_out",
            Stat::PublishDenied => "publish_denied",
            Stat::Unsolicited => "unsolicited",
        }
    }

    /// Whether packets counted here are dropped (the others pass).
    pub const fn drops(self) -> bool {
        matches!(
            self,
            Stat::PortExhausted
                | Stat::ConntrackFull
                | Stat::RewriteFailed
                | Stat::SpoofedMac
                | Stat::SpoofedAddr
                | Stat::OtherNetwork
                | Stat::IccDenied
                | Stat::Internal
                | Stat::PublishDenied
                | Stat::Unsolicited
        )
    }
}

crate::user_pod!(
    SockRedirectKey,
    SockRedirectOrigin,
    NetworkInfo,
    EndpointKey,
    EndpointDropKey,
    EndpointInfo,
    VethInfo,
    PublishedKey,
    PublishedTarget,
    LinkKey,
    DropEvent,
    PublishAllowKey,
    CtKey,
    CtEntry,
    Timeouts,
    Config
);
