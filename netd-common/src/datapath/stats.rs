//! What the programs count (`STATS`, per reason; `ENDPOINT_DROPS`, per container) and
//! report (`DROP_EVENTS`).

use super::{Addr, EndpointKey};

/// `STATS`: per-CPU array of `u64` indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";
/// `ENDPOINT_DROPS`: per-CPU hash [`EndpointDropKey`] → packets of that container dropped
/// for that reason.
pub const ENDPOINT_DROPS_MAP: &str = "ENDPOINT_DROPS";
/// `DROP_EVENTS`: ring buffer of [`DropEvent`], read by `netd monitor`.
pub const DROP_EVENTS_MAP: &str = "DROP_EVENTS";
/// Size of `DROP_EVENTS` in bytes (a power of two, a multiple of the page size).
pub const DROP_EVENTS_BYTES: u32 = 256 * 1024;

/// A container's drops for one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EndpointDropKey {
    pub endpoint: EndpointKey,
    /// The [`Stat`] the drop is counted under.
    pub reason: u32,
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

crate::user_pod!(EndpointDropKey, DropEvent);

/// Defines [`Stat`] from one list: each reason's doc, name as `netd stats` shows it, and
/// whether its packets are dropped (`drop`) or go on (`pass`). A counter's index in `STATS`
/// is its place in the list.
macro_rules! stats {
    ($($(#[doc = $doc:literal])* $variant:ident $name:literal $verdict:ident,)*) => {
        /// Counters in `STATS`: what the programs did with each packet, and why they dropped
        /// one.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Stat {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Stat {
            pub const COUNT: u32 = [$(stringify!($variant)),*].len() as u32;
            pub const ALL: [Stat; Self::COUNT as usize] = [$(Stat::$variant),*];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Stat::$variant => $name,)*
                }
            }

            /// Whether packets counted here are dropped (the others go on).
            pub const fn drops(self) -> bool {
                match self {
                    $(Stat::$variant => stats!(@drops $verdict),)*
                }
            }
        }
    };
    (@drops drop) => { true };
    (@drops pass) => { false };
}

stats! {
    /// A new masqueraded flow.
    SnatNew "snat_new" pass,
    /// A packet of a masqueraded flow, either direction.
    SnatHit "snat_hit" pass,
    /// A new flow to a published port.
    DnatNew "dnat_new" pass,
    /// A packet of a published-port flow, either direction.
    DnatHit "dnat_hit" pass,
    /// IPv4 that needs no translation (not from a masqueraded network, no flow, no port), or
    /// that NAT can't translate but is no container's business (the host's own traffic, a
    /// routed network's): passed untouched.
    NoNat "no_nat" pass,
    /// Not IPv4, on the uplink (the host's: passed untouched; a container's veth program holds
    /// it to its own rules).
    NotIpv4 "not_ipv4" pass,
    /// VLAN- or priority-tagged (in the frame or in the skb), to or from a container:
    /// dropped (the stack would untag a priority tag and route what it carries).
    Vlan "vlan" drop,
    /// Shorter than an Ethernet header, to or from a container: dropped.
    TruncatedL2 "truncated_l2" drop,
    /// Shorter than its IPv4 header or its total length, to or from a container: dropped.
    TruncatedL3 "truncated_l3" drop,
    /// Shorter than its TCP/UDP/ICMP header, to or from a container: dropped.
    TruncatedL4 "truncated_l4" drop,
    /// IPv4 with a version or header length that is not valid, to or from a container:
    /// dropped.
    BadIpHeader "bad_ip_header" drop,
    /// An IPv4 fragment that NAT would have to translate (later fragments carry no ports):
    /// dropped.
    Fragment "fragment" drop,
    /// An L4 protocol the NAT doesn't translate (ICMP other than echo included), to a
    /// container or from one of a masquerading network: dropped.
    UnsupportedProto "unsupported_proto" drop,
    /// No free source port or echo id towards that destination: dropped.
    PortExhausted "port_exhausted" drop,
    /// The conntrack table refused an insert: dropped.
    ConntrackFull "conntrack_full" drop,
    /// A helper failed while rewriting: dropped, the packet may be half written.
    RewriteFailed "rewrite_failed" drop,
    /// An ICMP error about a tracked flow, translated with the packet it quotes.
    IcmpError "icmp_error" pass,
    /// A new hairpin flow (a container to a published port through a host address).
    HairpinNew "hairpin_new" pass,
    /// A packet of a hairpin flow, either direction.
    HairpinHit "hairpin_hit" pass,
    /// A hairpin packet whose container is gone, or a frame from or to a container netd no
    /// longer has (its veth's entry gone, or its network's while it is removed): dropped.
    NoEndpoint "no_endpoint" drop,
    /// From a container, with a source MAC (or ARP sender) that isn't the container's: dropped.
    SpoofedMac "spoofed_mac" drop,
    /// From a container, with a source address (or ARP sender address) that isn't its own:
    /// dropped.
    SpoofedAddr "spoofed_addr" drop,
    /// From a container to another network's container: dropped.
    OtherNetwork "other_network" drop,
    /// Between containers of an `--icc=false` network, not along a `--link`: dropped.
    IccDenied "icc_denied" drop,
    /// Leaving an `--internal` network, or arriving at one from outside: dropped.
    Internal "internal" drop,
    /// From a container, allowed by the policy, on to the bridge.
    PolicyPass "policy_pass" pass,
    /// From a container to a container of the same network, delivered straight into its
    /// namespace (no bridge, no netfilter).
    FastPathLocal "fast_path_local" pass,
    /// Translated on the uplink's ingress and delivered straight into the container's
    /// namespace.
    FastPathIn "fast_path_in" pass,
    /// From a container to the outside, sent straight to the uplink's egress.
    FastPathOut "fast_path_out" pass,
    /// A new flow to a published port from a source its `--publish-allow` ranges don't
    /// cover: dropped.
    PublishDenied "publish_denied" drop,
    /// A new flow from outside straight to a container of a masquerading network (not through
    /// a published port): dropped, as Docker's FORWARD policy does.
    Unsolicited "unsolicited" drop,
    /// IPv6 nothing would check: beyond the link from a container of a network without
    /// IPv6, from a container whose veth's IPv6 program is missing (`ENDPOINT6_PROGS` empty),
    /// or on a NAT interface whose NAT66 program is missing (`NAT66_PROGS` empty).
    Ipv6 "ipv6" drop,
    /// From a container, neither IPv4, IPv6 nor ARP: dropped.
    NotIp "not_ip" drop,
    /// An ICMP error to a container that quotes no tracked flow of it: dropped.
    IcmpNoFlow "icmp_no_flow" drop,
    /// A new flow to a published port from a source that can't be outside (a host address,
    /// loopback, a container, multicast or broadcast), or one with a container's source that
    /// came into the host elsewhere than through that container's veth or bridge: dropped,
    /// as rp_filter would.
    Martian "martian" drop,
    /// Leaving the uplink with the source of a container of a masquerading or internal
    /// network, not masqueraded, or routed by a container of a masquerading network out of an
    /// interface netd doesn't masquerade on: dropped.
    Unmasqueraded "unmasqueraded" drop,
    /// Arriving at a container (on its host-side veth), let in: from the host, from its own
    /// network, or translated by netd.
    ToContainer "to_container" pass,
    /// A new flow of a container or network at its `--conntrack-limit`: dropped.
    ConntrackLimit "conntrack_limit" drop,
    /// A TCP RST whose sequence number is outside the receiver's window (RFC 5961): passed
    /// on, the flow's state unchanged.
    RstOutOfWindow "rst_out_of_window" pass,
    /// IPv6 from a container whose extension headers netd doesn't follow (more than six, a
    /// hop-by-hop header not first, two fragment headers, a routing header with segments
    /// left: its real destination is not the one checked) or fragmented neighbour discovery:
    /// dropped.
    Ipv6Header "ipv6_header" drop,
    /// From a container, an IPv6 router advertisement or redirect (a container is no router:
    /// the others would route through it), or neighbour discovery naming a MAC or target
    /// address that isn't its own: dropped.
    SpoofedNd "spoofed_nd" drop,
}

impl Stat {
    /// The counter at index `n` of `STATS` (what a [`DropEvent`] names as its reason).
    pub fn from_index(n: u32) -> Option<Stat> {
        Self::ALL.get(n as usize).copied()
    }
}
