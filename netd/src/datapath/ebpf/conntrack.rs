//! The conntrack tables seen from userspace: `netd conntrack ls`, `flush` and `sweep` (which
//! also recounts the flows of capped containers and networks), and the clean-ups the driver
//! does when an endpoint or a network goes.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Result;
use aya::maps::IterableMap as _;
use ipnet::IpNet;
use netd_common::datapath::{
    AF_INET, AF_INET6, Addr, CT_ASSURED, CT_CLOSE, CT_DIR_ORIGINAL, CT_ESTABLISHED, CT_FIN_WAIT,
    CT_NAT_DNAT, CT_NAT_SNAT, CT_NEW, CT_SEEN_REPLY, CT_SYN_RECV, CT_SYN_SENT,
    CT_TAKE_OVER_TIMEOUTS, CT_TIME_WAIT, CtEntry, CtKey, CtLimit, EndpointInfo, EndpointKey,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Timeouts, VethInfo, v4_octets,
    v6_octets,
};
use serde::Serialize;

use super::maps::{self, Conntrack};
use crate::bpf::Pins;

/// One direction of a flow, like a tuple of `conntrack -L`; IPv4 or IPv6 (NAT66).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports; for ICMP echo, the identifier is `sport` of the original direction.
    pub sport: u16,
    pub dport: u16,
    pub packets: u64,
    pub bytes: u64,
}

/// A tracked flow.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Flow {
    pub proto: &'static str,
    pub state: &'static str,
    /// `snat` (masquerade) or `dnat` (published port).
    pub nat: &'static str,
    /// In the assured table: a flood of new flows can't evict it.
    pub assured: bool,
    pub original: Tuple,
    pub reply: Tuple,
    pub age_secs: u64,
    /// Seconds until the flow times out if idle.
    pub expires_secs: u64,
}

/// Dead keys deleted at once: what a sweep or flush holds stays this small whatever the
/// table's size.
const DELETE_BATCH: usize = 4096;

/// How many times its size a walk of a table may visit entries before it stops. The kernel
/// restarts a walk whose last key went meanwhile (the datapath or its LRU removed it); a
/// table churned that hard is walked again by the next sweep.
const WALK_LAPS: usize = 4;

/// The entries of `table`, read one at a time (the walk holds one key, never the table). An
/// entry can come twice if the datapath removes the key the walk stands on.
fn walk(table: &Conntrack) -> Result<impl Iterator<Item = (CtKey, CtEntry)> + '_> {
    let size = table.map().info()?.max_entries() as usize;
    Ok(table
        .iter()
        .filter_map(Result::ok)
        .take(WALK_LAPS.saturating_mul(size)))
}

/// The entry of `key` in either table (a flow's two entries are in one).
fn lookup(tables: &[Conntrack; 2], key: &CtKey) -> Option<CtEntry> {
    tables.iter().find_map(|table| table.get(key, 0).ok())
}

/// Calls `visit` with the original entry of each live flow: not timed out, and with a reply
/// entry pointing back.
fn for_each_live_flow(pins: &Pins, mut visit: impl FnMut(&CtEntry) -> Result<()>) -> Result<()> {
    let timeouts = maps::read_config(pins)?.timeouts;
    let now = monotonic_ns();
    let tables = maps::conntrack(pins)?;
    for table in &tables {
        for (_, e) in walk(table)?.filter(|(_, e)| e.dir == CT_DIR_ORIGINAL) {
            let paired = lookup(&tables, &e.reply)
                .is_some_and(|r| r.dir != CT_DIR_ORIGINAL && r.original == e.original);
            if paired && remaining_ns(&e, &timeouts, now).is_some() {
                visit(&e)?;
            }
        }
    }
    Ok(())
}

/// Removes the entries `doomed` picks from both tables, walking them in place and deleting in
/// batches of [`DELETE_BATCH`]. Returns how many entries went.
fn remove_where(
    pins: &Pins,
    mut doomed: impl FnMut(&[Conntrack; 2], &CtKey, &CtEntry) -> bool,
) -> Result<usize> {
    let tables = maps::conntrack(pins)?;
    // A second handle on each table deletes while the first one walks.
    let mut deleters = maps::conntrack(pins)?;
    let mut removed = 0;
    for (table, deleter) in tables.iter().zip(&mut deleters) {
        let mut batch = Vec::with_capacity(DELETE_BATCH);
        for (key, e) in walk(table)? {
            // Deleted only once the walk has moved past them: deleting the key it stands on
            // would restart it from the first entry.
            if batch.len() == DELETE_BATCH {
                removed += remove_keys(deleter, &batch);
                batch.clear();
            }
            if doomed(&tables, &key, &e) {
                batch.push(key);
            }
        }
        removed += remove_keys(deleter, &batch);
    }
    Ok(removed)
}

/// Calls `visit` with each live flow, in the tables' order (assured flows first), as it reads
/// them: a full table has half a million.
pub fn for_each_flow(pins: &Pins, mut visit: impl FnMut(Flow) -> Result<()>) -> Result<()> {
    let timeouts = maps::read_config(pins)?.timeouts;
    let now = monotonic_ns();
    for_each_live_flow(pins, |e| {
        // 0: it timed out since `for_each_live_flow` looked.
        let left_ns = remaining_ns(e, &timeouts, now).unwrap_or(0);
        visit(Flow {
            proto: proto_name(e.original.proto),
            state: state_name(e),
            nat: if e.nat == CT_NAT_SNAT { "snat" } else { "dnat" },
            assured: e.flags & CT_ASSURED != 0,
            original: tuple(&e.original, e.packets[0], e.bytes[0]),
            reply: tuple(&e.reply, e.packets[1], e.bytes[1]),
            age_secs: now.saturating_sub(e.created_ns) / NS_PER_SEC,
            expires_secs: left_ns / NS_PER_SEC,
        })
    })
}

/// Removes the entries of timed-out flows once no new flow may take them over (idle for
/// `CT_TAKE_OVER_TIMEOUTS` times their timeout; the datapath already ignores them, this frees
/// their slots before the LRU would), and sets the flow counts of capped containers and
/// networks to their live flows (the datapath counts up only). Returns how many entries
/// went.
pub fn sweep(pins: &Pins) -> Result<usize> {
    let timeouts = maps::read_config(pins)?.timeouts;
    let now = monotonic_ns();
    let removed = remove_where(pins, |tables, key, e| {
        let flow = if e.dir == CT_DIR_ORIGINAL && *key == e.original {
            Some(*e)
        } else {
            lookup(tables, &e.original).filter(|f| f.dir == CT_DIR_ORIGINAL)
        };
        let Some(flow) = flow else {
            return true;
        };
        // A reply entry left behind by an older flow of the same original tuple.
        let superseded = e.dir != CT_DIR_ORIGINAL && flow.reply != *key;
        superseded || past_take_over(&flow, &timeouts, now)
    })?;
    recount_limits(pins)?;
    Ok(removed)
}

/// `bpf_map_update_elem`'s flag: only replace an existing value.
const BPF_EXIST: u64 = 2;

/// Sets each capped container's and network's flow count to its live flows.
fn recount_limits(pins: &Pins) -> Result<()> {
    let mut limits = maps::ct_limits(pins)?;
    let capped: Vec<_> = limits.iter().filter_map(Result::ok).collect();
    if capped.is_empty() {
        return Ok(());
    }
    let endpoints = maps::endpoints(pins)?;
    let veths = maps::veths(pins)?;
    let mut per_container: HashMap<(Addr, u8), u64> = HashMap::new();
    let mut per_network: HashMap<u32, u64> = HashMap::new();
    for_each_live_flow(pins, |flow| {
        let charged = charged(
            flow,
            |key| endpoints.get(key, 0).ok(),
            |ifindex| veths.get(&ifindex, 0).ok(),
        );
        if let Some(container) = charged.container {
            *per_container.entry(container).or_default() += 1;
        }
        if let Some(network) = charged.network {
            *per_network.entry(network).or_default() += 1;
        }
        Ok(())
    })?;
    for (key, limit) in capped {
        let count = if key.network_id == 0 {
            per_container.get(&(key.addr, key.family))
        } else {
            per_network.get(&key.network_id)
        };
        let recounted = CtLimit {
            count: count.copied().unwrap_or(0),
            ..limit
        };
        // Gone meanwhile (its container or network was removed): nothing to recount.
        let _ = limits.insert(key, recounted, BPF_EXIST);
    }
    Ok(())
}

/// The container address a flow belongs to: the one that started it, or the published
/// port's (in the flow's family).
fn owner(flow: &CtEntry) -> Addr {
    if flow.nat == CT_NAT_DNAT {
        flow.reply.saddr
    } else {
        flow.original.saddr
    }
}

/// Whose flow caps a flow counts against, as the datapath charges them.
#[derive(Debug, Default, PartialEq, Eq)]
struct Charged {
    /// The container's `CT_LIMITS` key (address, family): its IPv4 address, whatever the
    /// flow's family (one cap covers both).
    container: Option<(Addr, u8)>,
    /// Its network's id.
    network: Option<u32>,
}

/// Whom `flow` is charged to, looking containers up in `ENDPOINTS` (`endpoint`) and
/// `VETHS` (`veth`). An IPv4 flow counts against its owner's address (and its network, when
/// the address is an endpoint's); an IPv6 one against the IPv4 address of the container
/// behind the veth its IPv6 endpoint sits on (and that endpoint's network), nobody's when
/// that chain breaks (its container is going).
fn charged(
    flow: &CtEntry,
    endpoint: impl Fn(&EndpointKey) -> Option<EndpointInfo>,
    veth: impl Fn(u32) -> Option<VethInfo>,
) -> Charged {
    let family = flow.original.family;
    let owner = owner(flow);
    let ep = endpoint(&EndpointKey {
        addr: owner,
        family,
        _pad: [0; 3],
    });
    let network = ep.map(|ep| ep.network_id);
    if family != AF_INET6 {
        return Charged {
            container: Some((owner, family)),
            network,
        };
    }
    let container = ep
        .and_then(|ep| veth(ep.ifindex))
        .map(|v| (v.addr, AF_INET));
    Charged { container, network }
}

/// Empties the table; returns how many entries (two per flow) went.
pub fn flush(pins: &Pins) -> Result<usize> {
    flush_matching(pins, |_| true)
}

/// Removes the flows of any of a container's addresses (a dual-stack one has two), in one
/// walk of the tables.
pub fn flush_addresses(pins: &Pins, ips: &[IpAddr]) -> Result<usize> {
    flush_matching(pins, |e| touches(e, |ip| ips.contains(&ip)))
}

/// Removes the flows of an address in any of `subnets` (a dual-stack network's two), in one
/// walk of the tables.
pub fn flush_networks(pins: &Pins, subnets: &[IpNet]) -> Result<usize> {
    flush_matching(pins, |e| {
        touches(e, |ip| subnets.iter().any(|net| net.contains(&ip)))
    })
}

/// Whether an end of either of the flow's tuples is an address `matches` picks.
fn touches(e: &CtEntry, matches: impl Fn(IpAddr) -> bool) -> bool {
    [&e.original, &e.reply]
        .iter()
        .any(|k| ends(k).into_iter().any(&matches))
}

fn flush_matching(pins: &Pins, matches: impl Fn(&CtEntry) -> bool) -> Result<usize> {
    remove_where(pins, |_, _, e| matches(e))
}

/// Deletes `keys` from `table`; returns how many were still there (the datapath or the LRU
/// may have removed some meanwhile).
fn remove_keys(table: &mut Conntrack, keys: &[CtKey]) -> usize {
    keys.iter().filter(|key| table.remove(key).is_ok()).count()
}

/// The source and destination of `key`, in its family.
fn ends(key: &CtKey) -> [IpAddr; 2] {
    [ip(&key.saddr, key.family), ip(&key.daddr, key.family)]
}

/// The address `addr` of family `family` (`AF_INET6`, else IPv4).
fn ip(addr: &Addr, family: u8) -> IpAddr {
    if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(v6_octets(addr)))
    } else {
        IpAddr::V4(Ipv4Addr::from(v4_octets(addr)))
    }
}

fn tuple(key: &CtKey, packets: u64, bytes: u64) -> Tuple {
    let [src, dst] = ends(key);
    Tuple {
        src,
        dst,
        sport: key.sport,
        dport: key.dport,
        packets,
        bytes,
    }
}

fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        IPPROTO_ICMPV6 => "icmpv6",
        _ => "other",
    }
}

fn state_name(e: &CtEntry) -> &'static str {
    if e.original.proto != IPPROTO_TCP {
        return if e.flags & CT_ASSURED != 0 {
            "ASSURED"
        } else if e.flags & CT_SEEN_REPLY != 0 {
            "REPLIED"
        } else {
            "UNREPLIED"
        };
    }
    match e.state {
        CT_NEW => "NONE",
        CT_SYN_SENT => "SYN_SENT",
        CT_SYN_RECV => "SYN_RECV",
        CT_ESTABLISHED => "ESTABLISHED",
        CT_FIN_WAIT => "FIN_WAIT",
        CT_TIME_WAIT => "TIME_WAIT",
        CT_CLOSE => "CLOSE",
        _ => "UNKNOWN",
    }
}

const NS_PER_SEC: u64 = 1_000_000_000;

/// How long the flow of original entry `e` may still stay idle at `now`; `None` once it timed
/// out. In nanoseconds, as the datapath compares: whole seconds would keep a flow listed up to
/// a second after the datapath stopped matching it.
fn remaining_ns(e: &CtEntry, timeouts: &Timeouts, now: u64) -> Option<u64> {
    e.timeout_ns(timeouts)
        .checked_sub(now.saturating_sub(e.last_seen_ns))
}

/// Whether the flow of original entry `e` has been idle longer than `CT_TAKE_OVER_TIMEOUTS`
/// times its timeout: no new flow takes its entries over any more, so they may go.
fn past_take_over(e: &CtEntry, timeouts: &Timeouts, now: u64) -> bool {
    now.saturating_sub(e.last_seen_ns) > e.timeout_ns(timeouts) * CT_TAKE_OVER_TIMEOUTS
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * NS_PER_SEC + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use netd_common::datapath::{addr_v4, addr_v6};

    use super::*;

    /// A UDP flow last seen at 0 (timeout: `Timeouts::default().udp` seconds).
    fn udp_flow() -> (CtEntry, Timeouts, u64) {
        let mut e = CtEntry::default();
        e.original.proto = IPPROTO_UDP;
        let timeouts = Timeouts::default();
        let timeout_ns = u64::from(timeouts.udp) * NS_PER_SEC;
        (e, timeouts, timeout_ns)
    }

    const C4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x60, 0, 0, 0, 0, 0, 2);
    const UPLINK6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x53);

    fn key6(saddr: Ipv6Addr, sport: u16, daddr: Ipv6Addr, dport: u16) -> CtKey {
        CtKey {
            saddr: addr_v6(saddr.octets()),
            daddr: addr_v6(daddr.octets()),
            sport,
            dport,
            proto: IPPROTO_UDP,
            family: AF_INET6,
            _pad: [0; 2],
        }
    }

    /// C6's flow to SERVER6, masqueraded to UPLINK6.
    fn masqueraded6() -> CtEntry {
        CtEntry {
            original: key6(C6, 5000, SERVER6, 53),
            reply: key6(SERVER6, 53, UPLINK6, 5000),
            nat: CT_NAT_SNAT,
            ..CtEntry::default()
        }
    }

    /// C4's IPv4 flow to 198.18.0.53.
    fn flow4() -> CtEntry {
        let mut e = CtEntry::default();
        e.original.saddr = addr_v4(C4.octets());
        e.original.daddr = addr_v4([198, 18, 0, 53]);
        e.original.family = AF_INET;
        e.reply = e.original.reversed();
        e.nat = CT_NAT_SNAT;
        e
    }

    /// The endpoints C4 and C6 of one container (network 7, veth 42).
    fn endpoint(key: &EndpointKey) -> Option<EndpointInfo> {
        let ours = [
            (addr_v4(C4.octets()), AF_INET),
            (addr_v6(C6.octets()), AF_INET6),
        ];
        ours.contains(&(key.addr, key.family))
            .then_some(EndpointInfo {
                ifindex: 42,
                network_id: 7,
                ..EndpointInfo::default()
            })
    }

    fn veth(ifindex: u32) -> Option<VethInfo> {
        (ifindex == 42).then_some(VethInfo {
            addr: addr_v4(C4.octets()),
            network_id: 7,
            ..VethInfo::default()
        })
    }

    #[test]
    fn v6_octets_undo_addr_v6() {
        assert_eq!(v6_octets(&addr_v6(C6.octets())), C6.octets());
    }

    #[test]
    fn ipv6_tuples_show_ipv6_addresses() {
        let t = tuple(&masqueraded6().reply, 3, 300);
        assert_eq!((t.src, t.dst), (IpAddr::V6(SERVER6), IpAddr::V6(UPLINK6)));
        assert_eq!((t.sport, t.dport, t.packets, t.bytes), (53, 5000, 3, 300));
        let t = tuple(&flow4().original, 0, 0);
        assert_eq!(t.src, IpAddr::V4(C4));
        assert_eq!(proto_name(IPPROTO_ICMPV6), "icmpv6");
        assert_eq!(proto_name(IPPROTO_ICMP), "icmp");
    }

    #[test]
    fn an_ipv6_flow_is_charged_to_its_containers_ipv4_cap_and_network() {
        let v4 = Some((addr_v4(C4.octets()), AF_INET));
        let expected = Charged {
            container: v4,
            network: Some(7),
        };
        assert_eq!(charged(&masqueraded6(), endpoint, veth), expected);
        assert_eq!(charged(&flow4(), endpoint, veth), expected);
        // A published port's flow: the container is the reply's source.
        let mut published = masqueraded6();
        published.nat = CT_NAT_DNAT;
        published.original = key6(SERVER6, 53, UPLINK6, 8080);
        published.reply = key6(C6, 80, SERVER6, 53);
        assert_eq!(charged(&published, endpoint, veth), expected);
    }

    #[test]
    fn an_ipv6_flow_of_no_known_container_is_charged_to_nobody() {
        assert_eq!(
            charged(&masqueraded6(), endpoint, |_| None),
            Charged {
                container: None,
                network: Some(7),
            }
        );
        assert_eq!(charged(&masqueraded6(), |_| None, veth), Charged::default());
        // An IPv4 flow still counts against its address (the datapath's key needs no lookup).
        assert_eq!(
            charged(&flow4(), |_| None, veth).container,
            Some((addr_v4(C4.octets()), AF_INET))
        );
    }

    #[test]
    fn flushes_match_addresses_and_subnets_of_the_flows_family() {
        let e6 = masqueraded6();
        assert!(touches(&e6, |ip| ip == IpAddr::V6(C6)));
        assert!(touches(&e6, |ip| ip == IpAddr::V6(UPLINK6)));
        assert!(!touches(&e6, |ip| ip == IpAddr::V4(C4)));
        let subnet6: IpNet = "fd00:60::/64".parse().unwrap();
        let subnet4: IpNet = "10.0.0.0/24".parse().unwrap();
        assert!(touches(&e6, |ip| subnet6.contains(&ip)));
        assert!(!touches(&e6, |ip| subnet4.contains(&ip)));
        let e4 = flow4();
        assert!(touches(&e4, |ip| subnet4.contains(&ip)));
        assert!(!touches(&e4, |ip| subnet6.contains(&ip)));
        // An IPv6 address whose last 96 bits are zero is not the IPv4 address of its first
        // 32 (the same word 0 in the map).
        let mut odd = masqueraded6();
        odd.original.saddr =
            addr_v6(Ipv6Addr::from([10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).octets());
        odd.reply.daddr = odd.original.saddr;
        assert!(!touches(&odd, |ip| ip == IpAddr::V4(C4)));
    }

    #[test]
    fn a_flow_lives_until_its_timeout_to_the_nanosecond() {
        let (e, timeouts, timeout_ns) = udp_flow();
        assert_eq!(remaining_ns(&e, &timeouts, timeout_ns - 1), Some(1));
        assert_eq!(remaining_ns(&e, &timeouts, timeout_ns), Some(0));
    }

    #[test]
    fn a_flow_is_gone_a_nanosecond_after_its_timeout() {
        let (e, timeouts, timeout_ns) = udp_flow();
        assert_eq!(remaining_ns(&e, &timeouts, timeout_ns + 1), None);
        // Whole seconds called this idle time equal to the timeout, and the flow live.
        assert_eq!(
            remaining_ns(&e, &timeouts, timeout_ns + NS_PER_SEC - 1),
            None
        );
    }

    #[test]
    fn a_timed_out_flow_is_swept_only_once_no_new_flow_may_take_it_over() {
        let (e, timeouts, timeout_ns) = udp_flow();
        let span = timeout_ns * CT_TAKE_OVER_TIMEOUTS;
        assert!(!past_take_over(&e, &timeouts, timeout_ns + 1));
        assert!(!past_take_over(&e, &timeouts, span));
        assert!(past_take_over(&e, &timeouts, span + 1));
    }
}
