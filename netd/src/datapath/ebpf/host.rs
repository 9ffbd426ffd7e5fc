//! What the datapath learns about the host (the calling thread's network namespace): the
//! uplink (the interface of the default route) and its IPv4 address (the masquerade source),
//! the other interfaces with an IPv4 address (masqueraded through too), each interface's
//! IPv6 address NAT66 masquerades to (a global one it can send from, stable and preferred
//! first), the ports masquerade may translate to, the namespace's cookie, and where cgroup v2
//! is mounted.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Context as _, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressFlags, AddressMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::{
    ifaddrs::getifaddrs,
    net::if_::{InterfaceFlags, if_nametoindex},
};

/// An interface and the IPv4 address masquerade translates to there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub addr: Ipv4Addr,
}

/// The uplink of the calling thread's namespace.
pub fn find_uplink() -> Result<Iface> {
    // thread-self, not self: /proc/self/net shows the main thread's namespace, and netd may
    // be on a thread that entered another one.
    let routes =
        fs::read_to_string("/proc/thread-self/net/route").context("read the routing table")?;
    let name = default_route_iface(&routes)
        .ok_or_else(|| anyhow!("no IPv4 default route: netd needs an uplink"))?;
    let index = if_nametoindex(name.as_str()).with_context(|| format!("index of {name}"))?;
    let addr = first_ipv4(&name)?;
    Ok(Iface { name, index, addr })
}

/// The interface of the first default route in /proc/net/route's text.
fn default_route_iface(routes: &str) -> Option<String> {
    routes.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
            .then(|| fields[0].to_string())
    })
}

fn first_ipv4(iface: &str) -> Result<Ipv4Addr> {
    getifaddrs()
        .context("list addresses")?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| {
            a.address
                .and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
        })
        .ok_or_else(|| anyhow!("uplink {iface} has no IPv4 address"))
}

/// Every interface of the calling thread's namespace with an IPv4 address, loopback aside,
/// each with its first address (the one the kernel picks as the source of what it sends
/// there), in index order.
pub fn ipv4_interfaces() -> Result<Vec<Iface>> {
    let mut ifaces: Vec<Iface> = Vec::new();
    for a in getifaddrs().context("list addresses")? {
        let Some(addr) = a
            .address
            .and_then(|s| s.as_sockaddr_in().map(|sin| sin.ip()))
        else {
            continue;
        };
        if a.flags.contains(InterfaceFlags::IFF_LOOPBACK)
            || ifaces.iter().any(|i| i.name == a.interface_name)
        {
            continue;
        }
        // Gone since the listing: nothing to attach to.
        let Ok(index) = if_nametoindex(a.interface_name.as_str()) else {
            continue;
        };
        ifaces.push(Iface {
            name: a.interface_name,
            index,
            addr,
        });
    }
    ifaces.sort_by_key(|i| i.index);
    Ok(ifaces)
}

/// Each interface of the calling thread's namespace with a global IPv6 address it can send
/// from, by index, with the one NAT66 masquerades to there: the best ranked by
/// [`nat66_rank`], the kernel's listing order between equals.
pub fn nat66_addrs() -> Result<HashMap<u32, Ipv6Addr>> {
    let mut best: HashMap<u32, (u8, Ipv6Addr)> = HashMap::new();
    for (index, ip, flags) in ipv6_addrs().context("list the IPv6 addresses")? {
        let Some(rank) = nat66_rank(flags).filter(|_| is_global_ipv6(&ip)) else {
            continue;
        };
        let kept = best.entry(index).or_insert((rank, ip));
        if rank < kept.0 {
            *kept = (rank, ip);
        }
    }
    Ok(best
        .into_iter()
        .map(|(index, (_, ip))| (index, ip))
        .collect())
}

/// How good a source address with `flags` is for masqueraded flows (lower is better), or
/// `None` for one the kernel won't send from (duplicate address detection still running, or
/// failed). A stable address beats a temporary (privacy) one, whose flows die when it
/// expires; a preferred one beats a deprecated one, which new flows should no longer use.
fn nat66_rank(flags: AddressFlags) -> Option<u8> {
    if flags.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed) {
        return None;
    }
    // IFA_F_SECONDARY is IFA_F_TEMPORARY for IPv6.
    let temporary = flags.contains(AddressFlags::Secondary);
    Some(u8::from(flags.contains(AddressFlags::Deprecated)) * 2 + u8::from(temporary))
}

/// Every IPv6 address of the calling thread's namespace: interface index, address and flags
/// (a netlink dump: getifaddrs doesn't carry the flags).
fn ipv6_addrs() -> Result<Vec<(u32, Ipv6Addr, AddressFlags)>> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("open a netlink socket")?;
    socket.bind_auto().context("bind a netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connect a netlink socket")?;
    let mut request = AddressMessage::default();
    request.header.family = AddressFamily::Inet6;
    let mut request = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetAddress(request)),
    );
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0).context("ask for the addresses")?;
    let mut addrs = Vec::new();
    loop {
        let (reply, _) = socket.recv_from_full().context("read the addresses")?;
        let mut rest = &reply[..];
        while !rest.is_empty() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .context("parse a netlink message")?;
            rest = rest.get(msg.header.length as usize..).unwrap_or_default();
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(addrs),
                NetlinkPayload::Error(e) => bail!("the address dump failed: {e}"),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(a)) => {
                    addrs.extend(address_of(&a));
                }
                _ => {}
            }
        }
    }
}

/// An IPv6 address message's interface, address and flags (the 32-bit attribute when the
/// kernel sends it, else the header's 8 bits).
fn address_of(msg: &AddressMessage) -> Option<(u32, Ipv6Addr, AddressFlags)> {
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    let mut ip = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Address(IpAddr::V6(a)) => ip = Some(*a),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    Some((msg.header.index, ip?, flags))
}

/// Whether `ip` can be a masqueraded flow's source beyond the link: not link-local
/// (fe80::/10), loopback, multicast or unspecified. Unique local addresses (fc00::/7) count: a
/// network behind the host may well route them.
fn is_global_ipv6(ip: &Ipv6Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_unicast_link_local())
}

/// The interfaces of the calling thread's namespace that are netd's bridges, of either
/// datapath: netd gives a bridge the MAC it derives from the bridge's address (the gateway's,
/// [`crate::core::ipam::mac_for`]).
pub fn netd_bridges() -> Result<HashSet<String>> {
    let mut macs = HashMap::new();
    let mut addrs: Vec<(String, Ipv4Addr)> = Vec::new();
    for a in getifaddrs().context("list addresses")? {
        let Some(address) = a.address else {
            continue;
        };
        if let Some(link) = address.as_link_addr().and_then(|l| l.addr()) {
            macs.insert(a.interface_name, link);
        } else if let Some(sin) = address.as_sockaddr_in() {
            addrs.push((a.interface_name, sin.ip()));
        }
    }
    Ok(addrs
        .into_iter()
        .filter(|(name, addr)| macs.get(name) == Some(&crate::core::ipam::mac_for(*addr)))
        .map(|(name, _)| name)
        .collect())
}

/// Every address of the calling thread's namespace but loopback ones (a port published
/// without an address is not reached on 127.0.0.0/8 from outside, unlike Docker's
/// `--dst-type LOCAL`, which let a neighbour reach it there).
pub fn host_addrs() -> Result<Vec<IpAddr>> {
    Ok(getifaddrs()
        .context("list addresses")?
        .filter_map(|a| {
            let address = a.address?;
            let v4 = address.as_sockaddr_in().map(|sin| IpAddr::V4(sin.ip()));
            v4.or_else(|| address.as_sockaddr_in6().map(|sin6| IpAddr::V6(sin6.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect())
}

/// The lowest port a translated source takes (below are the well-known ports).
const NAT_PORT_FLOOR: u16 = 1024;

/// The ports masquerade translates sources to: the larger of the two ranges on either side
/// of the namespace's ephemeral ports (`ip_local_port_range`) above 1023, so a socket the
/// host makes later never picks a port a translated flow holds.
pub fn nat_port_range() -> Result<(u16, u16)> {
    // /proc/sys/net answers for the namespace of the thread that opens it.
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .context("read net.ipv4.ip_local_port_range")?;
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next()) {
        (Some(Ok(low)), Some(Ok(high))) => Ok(outside_range(low, high)),
        _ => Err(anyhow!("unexpected net.ipv4.ip_local_port_range {text:?}")),
    }
}

/// The larger of `NAT_PORT_FLOOR..low` and `high+1..=65535`.
fn outside_range(low: u16, high: u16) -> (u16, u16) {
    let below = (NAT_PORT_FLOOR, low.saturating_sub(1));
    let above = (high.saturating_add(1).max(NAT_PORT_FLOOR), u16::MAX);
    let size = |(a, b): (u16, u16)| if b >= a { u32::from(b - a) + 1 } else { 0 };
    if size(below) >= size(above) {
        below
    } else {
        above
    }
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14).
pub fn netns_cookie() -> Result<u64> {
    // Not in the libc crate's constants for every target yet.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("open a socket")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("get the network namespace cookie");
    }
    Ok(cookie)
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a
/// hybrid system), if it is.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 2 && fields[2] == "cgroup2").then(|| PathBuf::from(fields[1]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_ports_are_the_larger_side_of_the_ephemeral_range() {
        // Linux's default range: 1024..=32767 is the larger side.
        assert_eq!(outside_range(32768, 60999), (1024, 32767));
        assert_eq!(outside_range(40000, 40000), (1024, 39999));
        assert_eq!(outside_range(1024, 20000), (20001, 65535));
        // An ephemeral range reaching 65535 leaves the ports below it.
        assert_eq!(outside_range(50000, 65535), (1024, 49999));
    }

    #[test]
    fn nat66_prefers_stable_then_temporary_then_deprecated_and_never_tentative() {
        let rank = nat66_rank;
        let stable = rank(AddressFlags::Permanent).unwrap();
        let temporary = rank(AddressFlags::Secondary).unwrap();
        let deprecated = rank(AddressFlags::Permanent | AddressFlags::Deprecated).unwrap();
        let both = rank(AddressFlags::Secondary | AddressFlags::Deprecated).unwrap();
        assert!(stable < temporary && temporary < deprecated && deprecated < both);
        assert_eq!(rank(AddressFlags::Tentative), None);
        assert_eq!(
            rank(AddressFlags::Permanent | AddressFlags::Dadfailed),
            None
        );
    }

    #[test]
    fn nat66_sources_are_global_and_unique_local_addresses() {
        let global = |s: &str| is_global_ipv6(&s.parse().unwrap());
        assert!(global("2001:2::1"));
        assert!(global("fd00:60::1"));
        assert!(global("fd4e:6574:6400::1"));
        assert!(!global("fe80::1"));
        assert!(!global("febf::1"));
        assert!(!global("::1"));
        assert!(!global("::"));
        assert!(!global("ff02::1"));
    }

    #[test]
    fn default_route_is_found_in_proc_net_route_text() {
        let text = "Iface\\tDestination\\tGateway\\tFlags\\tRefCnt\\tUse\\tMetric\\tMask\\tMTU\\tWindow\\tIRTT\n\
                    up0\\t000012C6\\t00000000\\t0001\\t0\\t0\\t0\\t00FFFFFF\\t0\\t0\\t0\n\
                    up0\\t00000000\\t010012C6\\t0003\\t0\\t0\\t0\\t00000000\\t0\\t0\\t0\n"
            .replace("\\t", "\t");
        assert_eq!(default_route_iface(&text).as_deref(), Some("up0"));
        assert_eq!(
            default_route_iface(text.lines().take(2).collect::<Vec<_>>().join("\n").as_str()),
            None
        );
    }
}
