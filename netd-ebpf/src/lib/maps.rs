//! The maps userspace fills (configuration, networks, endpoints, published ports), and the
//! lookups the programs make in them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::TcContext,
};
use netd_common::datapath::{
    AF_INET, AF_INET6, Addr, Config, ENDPOINTS_MAX, EndpointInfo, EndpointKey, HOST_ADDRS_MAX,
    LINKS_MAX, LinkKey, NAT_IFACES_MAX, NET_INTERNAL, NET_MASQUERADE, NETWORKS_MAX, NatIface,
    NetworkInfo, PUBLISH_ALLOW_MAX, PUBLISH_RESTRICTED, PUBLISHED_FLAGS, PUBLISHED_MAX,
    PublishAllowKey, PublishedKey, PublishedTarget, VethInfo,
};

use super::{conntrack::v4, fib, ipv6};

/// The first octet of 127/8, loopback.
pub const LOOPBACK_FIRST_OCTET: u8 = 127;

/// Whether IPv4 `addr` (wire byte order) is in 0/8 ("this" network) or 127/8 (loopback): the
/// host's own, which no packet on an interface carries, as source or destination.
#[inline(always)]
pub fn local_only(addr: u32) -> bool {
    let first = addr.to_ne_bytes()[0];
    first == 0 || first == LOOPBACK_FIRST_OCTET
}

#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static NETWORKS: HashMap<u32, NetworkInfo> = HashMap::pinned(NETWORKS_MAX, 0);
#[map]
static NETWORKS6: HashMap<u32, NetworkInfo> = HashMap::pinned(NETWORKS_MAX, 0);
#[map]
static ENDPOINTS: HashMap<EndpointKey, EndpointInfo> = HashMap::pinned(ENDPOINTS_MAX, 0);
#[map]
static PUBLISHED: HashMap<PublishedKey, PublishedTarget> =
    HashMap::pinned(PUBLISHED_MAX, PUBLISHED_FLAGS);
#[map]
static PUBLISH_ALLOW: LpmTrie<PublishAllowKey, u8> = LpmTrie::pinned(PUBLISH_ALLOW_MAX, 0);
#[map]
static SUBNETS: LpmTrie<u32, u32> = LpmTrie::pinned(NETWORKS_MAX, 0);
#[map]
static SUBNETS6: LpmTrie<Addr, u32> = LpmTrie::pinned(NETWORKS_MAX, 0);
#[map]
static VETHS: HashMap<u32, VethInfo> = HashMap::pinned(ENDPOINTS_MAX, 0);
#[map]
static LINKS: HashMap<LinkKey, u8> = HashMap::pinned(LINKS_MAX, 0);
#[map]
static HOST_ADDRS: HashMap<u32, u8> = HashMap::pinned(HOST_ADDRS_MAX, 0);
#[map]
static HOST_ADDRS6: HashMap<Addr, u8> = HashMap::pinned(HOST_ADDRS_MAX, 0);
#[map]
static NAT_IFACES: HashMap<u32, NatIface> = HashMap::pinned(NAT_IFACES_MAX, 0);
#[map]
static NAT6_ADDRS: HashMap<u32, NatIface> = HashMap::pinned(NAT_IFACES_MAX, 0);

/// The datapath configuration; `None` until userspace wrote it.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0).filter(|c| c.uplink_ifindex != 0)
}

/// Whether the egress of interface `ifindex` masquerades a container's packets: the uplink's,
/// and every other interface netd attached the NAT programs to (`NAT_IFACES`).
#[inline(always)]
pub fn masquerades_on(ifindex: u32) -> bool {
    config().is_some_and(|cfg| masquerade_addr(ifindex, cfg).is_some())
}

/// The address masquerade translates to on interface `ifindex` (wire byte order): the
/// uplink's (no lookup: most flows leave there), else the one netd recorded for the
/// interface; `None` where netd masquerades nothing.
#[inline(always)]
pub fn masquerade_addr(ifindex: u32, cfg: &Config) -> Option<u32> {
    if ifindex == cfg.uplink_ifindex {
        return Some(cfg.uplink_addr[0]);
    }
    // SAFETY: as above.
    unsafe { NAT_IFACES.get(&ifindex) }.map(|iface| iface.addr[0])
}

/// The IPv6 address NAT66 translates to on interface `ifindex`; `None` where netd
/// masquerades no IPv6 (no NAT programs there, or no global IPv6 address).
#[inline(always)]
pub fn masquerade_addr6(ifindex: u32) -> Option<Addr> {
    // SAFETY: as above.
    unsafe { NAT6_ADDRS.get(&ifindex) }.map(|iface| iface.addr)
}

/// The key of the container with address `addr` (wire byte order).
#[inline(always)]
pub fn endpoint_key(addr: u32) -> EndpointKey {
    EndpointKey {
        addr: v4(addr),
        family: AF_INET,
        // Spelled out: `[0; 3]` would be a call of aya-ebpf's byte-at-a-time memset.
        _pad: [0, 0, 0],
    }
}

/// The container with address `addr` (wire byte order).
#[inline(always)]
pub fn endpoint(addr: u32) -> Option<&'static EndpointInfo> {
    // SAFETY: read-only use of a map value that userspace replaces whole.
    unsafe { ENDPOINTS.get(&endpoint_key(addr)) }
}

/// The container with IPv6 address `addr` (wire byte order words).
#[inline(always)]
pub fn endpoint6(addr: Addr) -> Option<&'static EndpointInfo> {
    let key = EndpointKey {
        addr,
        family: AF_INET6,
        _pad: [0, 0, 0],
    };
    // SAFETY: as above.
    unsafe { ENDPOINTS.get(&key) }
}

/// The container with IPv6 address `addr`, as its veth's programs know it (its IPv4
/// address, network and the network's flags).
#[inline(always)]
pub fn container6(addr: Addr) -> Option<&'static VethInfo> {
    veth(endpoint6(addr)?.ifindex)
}

/// The container behind the host-side veth `ifindex`.
#[inline(always)]
pub fn veth(ifindex: u32) -> Option<&'static VethInfo> {
    // SAFETY: as above.
    unsafe { VETHS.get(&ifindex) }
}

/// Whether a `--link` lets `src` reach `dst` on `proto`/`port`.
#[inline(always)]
pub fn linked(src: u32, dst: u32, proto: u8, port: u16) -> bool {
    let key = LinkKey {
        src: v4(src),
        dst: v4(dst),
        port,
        proto,
        family: AF_INET,
    };
    // SAFETY: as above.
    unsafe { LINKS.get(&key) }.is_some()
}

/// Whether a `--link` lets `src` reach `dst` on `proto`/`port` over IPv6.
#[inline(always)]
pub fn linked6(src: Addr, dst: Addr, proto: u8, port: u16) -> bool {
    let key = LinkKey {
        src,
        dst,
        port,
        proto,
        family: AF_INET6,
    };
    // SAFETY: as above.
    unsafe { LINKS.get(&key) }.is_some()
}

/// The IPv6 side of dual-stack network `id`.
#[inline(always)]
pub fn network6(id: u32) -> Option<&'static NetworkInfo> {
    // SAFETY: as above.
    unsafe { NETWORKS6.get(&id) }
}

#[inline(always)]
pub fn network(id: u32) -> Option<&'static NetworkInfo> {
    // SAFETY: as above.
    unsafe { NETWORKS.get(&id) }
}

/// The container a packet starting a new flow to `daddr:port` goes to: [`published_for_host`],
/// never for a destination in 0/8 or 127/8. A packet on an interface has no such destination
/// (the stack drops it as a martian): a port published on loopback is for the host's own
/// processes alone, and 0.0.0.0 is the key of a port published on every address.
#[inline(always)]
pub fn published(
    daddr: u32,
    port: u16,
    proto: u8,
    cfg: &Config,
    also_host: bool,
) -> Option<PublishedTarget> {
    if local_only(daddr) {
        return None;
    }
    published_for_host(daddr, port, proto, cfg, also_host)
}

/// The container a host process's new flow to `daddr:port` goes to: a port published on that
/// address, else one published on any address when `daddr` is one of the host's
/// ([`is_host_addr`], or `also_host`: an address the caller knows to be the host's, such as a
/// gateway or loopback). The host's addresses are looked up last, only for a published
/// wildcard port.
#[inline(always)]
pub fn published_for_host(
    daddr: u32,
    port: u16,
    proto: u8,
    cfg: &Config,
    also_host: bool,
) -> Option<PublishedTarget> {
    let mut key = PublishedKey {
        addr: v4(daddr),
        port,
        proto,
        family: AF_INET,
    };
    // SAFETY: as above.
    if let Some(target) = unsafe { PUBLISHED.get(&key) } {
        return Some(*target);
    }
    key.addr = [0; 4];
    // SAFETY: as above.
    let target = unsafe { PUBLISHED.get(&key) }.copied()?;
    (also_host || is_host_addr(daddr, cfg)).then_some(target)
}

/// The container port published on IPv6 address `addr` (all zero: on every address).
#[inline(always)]
pub fn published6(addr: &Addr, port: u16, proto: u8) -> Option<PublishedTarget> {
    let key = PublishedKey {
        addr: *addr,
        port,
        proto,
        family: AF_INET6,
    };
    // SAFETY: as above.
    unsafe { PUBLISHED.get(&key) }.copied()
}

/// [`published`] for IPv6: a port published on `daddr`, else one published on every address
/// when `daddr` is one of the host's (`also_host`: an address the caller knows to be the
/// host's, such as a gateway; else one the controller mirrored into `HOST_ADDRS6`, as IPv4's
/// [`is_host_addr`], or failing that one the FIB says is local, as for the packet in `ctx`:
/// the mirror answers a new flow to the host's own address for a fraction of a FIB lookup,
/// and the FIB covers an address added since the controller last mirrored them). Never for a
/// destination embedding an IPv4 address, `::1` and `::` (the key of a port published on
/// every address) included, which no packet on an interface has.
#[inline(always)]
pub fn published_to6(
    ctx: &TcContext,
    daddr: &Addr,
    port: u16,
    proto: u8,
    also_host: bool,
) -> Option<PublishedTarget> {
    if ipv6::embeds_ipv4(daddr) {
        return None;
    }
    published6(daddr, port, proto).or_else(|| {
        published6(&[0; 4], port, proto)
            .filter(|_| also_host || is_host_addr6(daddr) || fib::is_local6(ctx, daddr))
    })
}

/// [`publish_allows`] for an IPv6 source.
#[inline(always)]
pub fn publish_allows6(target: &PublishedTarget, proto: u8, saddr: Addr) -> bool {
    if target.flags & PUBLISH_RESTRICTED == 0 {
        return true;
    }
    let key = Key::new(
        PublishAllowKey::TARGET_BITS + 128,
        PublishAllowKey {
            target: target.addr,
            port: target.port,
            proto,
            family: AF_INET6,
            src: saddr,
        },
    );
    PUBLISH_ALLOW.get(&key).is_some()
}

/// Whether `addr` (wire byte order) is one of the host namespace's addresses: the uplink's,
/// or another the controller mirrored into `HOST_ADDRS` (a second address, another NIC's).
#[inline(always)]
pub fn is_host_addr(addr: u32, cfg: &Config) -> bool {
    // SAFETY: as above.
    addr == cfg.uplink_addr[0] || unsafe { HOST_ADDRS.get(&addr) }.is_some()
}

/// Whether IPv6 `addr` is one of the host namespace's addresses (`HOST_ADDRS6`): what the
/// programs that can't ask the FIB ([`super::fib::is_local6`]) go by, the cgroup ones, and
/// what the others ask before it.
#[inline(always)]
pub fn is_host_addr6(addr: &Addr) -> bool {
    // SAFETY: as above.
    unsafe { HOST_ADDRS6.get(addr) }.is_some()
}

/// Whether `addr` is a container of a masquerading or internal network: nothing from beyond
/// its network reaches it untranslated, nothing of it leaves with its own address. So is a
/// container whose network is gone (being removed): what its network was is unknown.
#[inline(always)]
pub fn is_sealed(addr: u32) -> bool {
    endpoint(addr).is_some_and(|ep| {
        network(ep.network_id).is_none_or(|net| net.flags & (NET_MASQUERADE | NET_INTERNAL) != 0)
    })
}

/// Whether `addr` (wire byte order) is in a netd network's subnet (a container, a gateway).
#[inline(always)]
pub fn in_container_subnet(addr: u32) -> bool {
    SUBNETS.get(&Key::new(32, addr)).is_some()
}

/// Whether `addr` is in a netd network's IPv6 subnet (a container, a gateway, an address not
/// given out yet).
#[inline(always)]
pub fn in_container_subnet6(addr: &Addr) -> bool {
    SUBNETS6.get(&Key::new(128, *addr)).is_some()
}

/// Whether network `id` is `--internal`: nothing gets in from beyond it.
#[inline(always)]
pub fn is_internal(id: u32) -> bool {
    network(id).is_some_and(|net| net.flags & NET_INTERNAL != 0)
}

/// Whether a new flow from `saddr` may reach `target` (on `proto`): always, unless the port
/// was published with `--publish-allow` ranges and none covers `saddr`.
#[inline(always)]
pub fn publish_allows(target: &PublishedTarget, proto: u8, saddr: u32) -> bool {
    if target.flags & PUBLISH_RESTRICTED == 0 {
        return true;
    }
    let key = Key::new(
        PublishAllowKey::TARGET_BITS + 32,
        PublishAllowKey {
            target: target.addr,
            port: target.port,
            proto,
            family: AF_INET,
            src: v4(saddr),
        },
    );
    PUBLISH_ALLOW.get(&key).is_some()
}
