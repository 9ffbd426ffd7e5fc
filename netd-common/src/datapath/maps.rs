//! The maps userspace fills and the programs read: configuration, networks, endpoints,
//! published ports, the isolation policy, and the host sockets redirected to containers.

use super::{Addr, Timeouts};

/// `NETWORKS`: network id (`u32`) → [`NetworkInfo`].
pub const NETWORKS_MAP: &str = "NETWORKS";
/// `NETWORKS6`: network id (`u32`) → the IPv6 side of a dual-stack network, as a
/// [`NetworkInfo`] of family `AF_INET6` (a map of its own: `NETWORKS` keeps its layout).
pub const NETWORKS6_MAP: &str = "NETWORKS6";
/// `ENDPOINTS`: [`EndpointKey`] → [`EndpointInfo`], the controller's IPAM mirror: a
/// dual-stack container has an entry for each of its addresses.
pub const ENDPOINTS_MAP: &str = "ENDPOINTS";
/// `PUBLISHED`: [`PublishedKey`] → [`PublishedTarget`].
pub const PUBLISHED_MAP: &str = "PUBLISHED";
/// `CONFIG`: a one-slot array holding [`Config`].
pub const CONFIG_MAP: &str = "CONFIG";
/// `PUBLISH_ALLOW`: LPM trie of [`PublishAllowKey`] → `u8` (1): the sources a published port
/// flagged [`PUBLISH_RESTRICTED`] accepts new flows from.
pub const PUBLISH_ALLOW_MAP: &str = "PUBLISH_ALLOW";
/// As many as published ports: one range each, at least.
pub const PUBLISH_ALLOW_MAX: u32 = PUBLISHED_MAX;
/// `SUBNETS`: LPM trie of IPv4 subnets (the key's data: the address in wire byte order) →
/// network id: every netd network's subnet, gateway included.
pub const SUBNETS_MAP: &str = "SUBNETS";
/// `SUBNETS6`: the same for IPv6 subnets (the key's data: an [`Addr`]).
pub const SUBNETS6_MAP: &str = "SUBNETS6";
/// `VETHS`: host-side veth ifindex (`u32`) → the [`VethInfo`] of the container behind it.
pub const VETHS_MAP: &str = "VETHS";
/// `LINKS`: [`LinkKey`] → `u8` (1): what `--link` opens on a network with `--icc=false`.
pub const LINKS_MAP: &str = "LINKS";
/// `HOST_ADDRS`: IPv4 address (`u32`, wire byte order) → `u8` (1): the host namespace's
/// addresses (loopback aside), where a port published without an address is reached.
pub const HOST_ADDRS_MAP: &str = "HOST_ADDRS";
pub const HOST_ADDRS_MAX: u32 = 4_096;
/// `HOST_ADDRS6`: the same for IPv6: [`Addr`] → `u8` (1), loopback aside.
pub const HOST_ADDRS6_MAP: &str = "HOST_ADDRS6";
/// `NAT_IFACES`: ifindex (`u32`) → [`NatIface`]: the host's interfaces besides the uplink that
/// route out (a second NIC, a VPN) and carry the NAT programs, with the address masquerade
/// translates to there. An interface missing here masquerades nothing: a container's packet
/// routed out of it is dropped (`unmasqueraded`).
pub const NAT_IFACES_MAP: &str = "NAT_IFACES";
pub const NAT_IFACES_MAX: u32 = 1_024;
/// `NAT6_ADDRS`: ifindex (`u32`) → [`NatIface`] of family `AF_INET6`: the IPv6 address NAT66
/// masquerades to on the uplink and each `NAT_IFACES` interface that has a global one. A
/// masquerading network's IPv6 packet routed out of an interface missing here is dropped
/// (`unmasqueraded`). A map of its own: `NAT_IFACES` and `Config` keep their layouts.
pub const NAT6_ADDRS_MAP: &str = "NAT6_ADDRS";

pub const ENDPOINTS_MAX: u32 = 65_536;
pub const NETWORKS_MAX: u32 = 1_024;
/// Published ports (all host addresses, both protocols): 100,000 over several addresses fit.
pub const PUBLISHED_MAX: u32 = 131_072;
/// `PUBLISHED`'s map flags: `BPF_F_NO_PREALLOC`. Preallocated, 131,072 entries take 14 MiB of
/// kernel memory whether one port is published or none; allocated per entry, 2 MiB of buckets
/// plus 104 bytes a published port (12.5 MB at 100,000; `bytes_memlock`, Linux 6.18). Only
/// userspace adds entries (a publish: one allocation), and a lookup costs the same.
pub const PUBLISHED_FLAGS: u32 = 1;
pub const LINKS_MAX: u32 = 65_536;

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
    /// The network's bridge: what its containers route through the gateway comes from there.
    pub bridge_ifindex: u32,
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
    /// The ports masquerade translates to: outside the host's ephemeral range
    /// (`ip_local_port_range`), so a host socket made later never gets a flow's tuple.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub _pad2: u32,
}

/// An interface masquerade translates through (`NAT_IFACES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NatIface {
    /// The interface's own address: the masquerade source of flows leaving through it.
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}

crate::user_pod!(
    NatIface,
    SockRedirectKey,
    SockRedirectOrigin,
    NetworkInfo,
    EndpointKey,
    EndpointInfo,
    VethInfo,
    PublishedKey,
    PublishedTarget,
    LinkKey,
    PublishAllowKey,
    Config
);
