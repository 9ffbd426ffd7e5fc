//! Address management: subnet choice and validation, container addresses, MACs.
//! All CIDR math is `ipnet`'s.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Result, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The pools Docker takes bridge subnets from, in order: 172.17-31.0.0/16, then
/// 192.168.0-240.0/20.
fn default_pool() -> impl Iterator<Item = Ipv4Net> {
    let big = (17..=31).map(|b| Ipv4Net::new(Ipv4Addr::new(172, b, 0, 0), 16).unwrap());
    let small = (0..16).map(|i| Ipv4Net::new(Ipv4Addr::new(192, 168, i * 16, 0), 20).unwrap());
    big.chain(small)
}

/// The /64s netd takes IPv6 subnets from: fd4e:6574:6400::/48, a ULA prefix ("Netd"), in
/// order.
fn default_pool6() -> impl Iterator<Item = Ipv6Net> {
    (0..=u16::MAX)
        .map(|i| Ipv6Net::new(Ipv6Addr::new(0xfd4e, 0x6574, 0x6400, i, 0, 0, 0, 0), 64).unwrap())
}

pub fn overlaps<N: Into<IpNet> + Copy>(a: &N, b: &N) -> bool {
    let (a, b): (IpNet, IpNet) = ((*a).into(), (*b).into());
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Whether `candidate` overlaps nothing in `in_use` (subnets of either family).
fn overlaps_none(candidate: impl Into<IpNet>, in_use: &[IpNet]) -> bool {
    let candidate = candidate.into();
    !in_use.iter().any(|used| overlaps(&candidate, used))
}

/// The first pool subnet that overlaps nothing in `in_use`.
pub fn free_subnet(in_use: &[IpNet]) -> Result<Ipv4Net> {
    default_pool()
        .find(|candidate| overlaps_none(*candidate, in_use))
        .ok_or_else(|| anyhow::anyhow!("no free subnet left in 172.17.0.0/12 and 192.168.0.0/16"))
}

/// The first /64 of netd's ULA pool that overlaps nothing in `in_use`.
pub fn free_subnet6(in_use: &[IpNet]) -> Result<Ipv6Net> {
    default_pool6()
        .find(|candidate| overlaps_none(*candidate, in_use))
        .ok_or_else(|| anyhow::anyhow!("no free IPv6 subnet left in fd4e:6574:6400::/48"))
}

/// Parses a `--subnet`: an IPv4 or IPv6 CIDR with no host bits, room for a gateway and a
/// container.
pub fn parse_subnet(text: &str) -> Result<IpNet> {
    let net: IpNet = text.parse().map_err(|_| {
        anyhow::anyhow!("invalid subnet {text:?}: expected a CIDR like 10.1.0.0/24 or fd00:1::/64")
    })?;
    check_subnet(net)?;
    Ok(net)
}

/// Parses an IPv4 `--subnet` (where only IPv4 fits: an engine's IPv4 pool).
pub fn parse_subnet4(text: &str) -> Result<Ipv4Net> {
    match parse_subnet(text)? {
        IpNet::V4(net) => Ok(net),
        IpNet::V6(net) => bail!("invalid subnet \"{net}\": an IPv4 subnet is needed here"),
    }
}

/// Checks `--gateway` of an IPv6 subnet and fills in its default (the first host address).
pub fn gateway6(subnet: Ipv6Net, gateway: Option<Ipv6Addr>) -> Result<Ipv6Addr> {
    let first = Ipv6Addr::from(u128::from(subnet.network()) + 1);
    let gateway = gateway.unwrap_or(first);
    if !is_host_of(subnet.into(), gateway.into()) {
        bail!("gateway {gateway} is not a host address of subnet {subnet}");
    }
    Ok(gateway)
}

/// Checks a subnet of either family: no host bits, room for a gateway and a container (an
/// IPv4 one's broadcast address aside).
pub fn check_subnet(net: IpNet) -> Result<()> {
    check_no_host_bits("subnet", net)?;
    let longest = match net {
        IpNet::V4(_) => 30,
        IpNet::V6(_) => 126,
    };
    if net.prefix_len() > longest {
        bail!(
            "invalid subnet \"{net}\": a /{} has no room for a gateway and containers",
            net.prefix_len()
        );
    }
    if let Some((range, what)) = SPECIAL_RANGES.iter().find_map(|(range, what)| {
        let range: IpNet = range.parse().expect("a valid CIDR");
        (range.contains(&net.network()) || net.contains(&range.network())).then_some((range, what))
    }) {
        bail!("invalid subnet \"{net}\": it overlaps {range}, {what}");
    }
    Ok(())
}

/// Ranges no network's subnet may overlap: addresses that are not unicast between hosts, and
/// netd's own pool for `netd link` (link-local).
const SPECIAL_RANGES: [(&str, &str); 8] = [
    ("0.0.0.0/8", "\"this\" network"),
    ("127.0.0.0/8", "loopback"),
    (super::link::LINK_POOL, "link-local (netd link's pool)"),
    ("224.0.0.0/3", "multicast and reserved"),
    ("::/127", "the unspecified and loopback addresses"),
    ("::ffff:0:0/96", "IPv4-mapped addresses"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// Checks that `net` (given as `what`) is a network, not an address with a prefix: the host
/// bits would be dropped without a word.
pub fn check_no_host_bits(what: &str, net: IpNet) -> Result<()> {
    if net.trunc() != net {
        bail!(
            "invalid {what} \"{net}\": host bits set (did you mean {}?)",
            net.trunc()
        );
    }
    Ok(())
}

/// Parses an `--ip-range`.
pub fn parse_range(text: &str) -> Result<Ipv4Net> {
    let range: Ipv4Net = text
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid ip-range {text:?}: expected an IPv4 CIDR"))?;
    check_no_host_bits("ip-range", range.into())?;
    Ok(range)
}

/// Checks `--gateway` and `--ip-range` against the subnet and fills in their defaults (the
/// first host address; the whole subnet).
pub fn gateway_and_range(
    subnet: Ipv4Net,
    gateway: Option<Ipv4Addr>,
    ip_range: Option<Ipv4Net>,
) -> Result<(Ipv4Addr, Ipv4Net)> {
    let gateway = gateway.unwrap_or_else(|| first_host(subnet));
    if !is_host_of(subnet.into(), gateway.into()) {
        bail!("gateway {gateway} is not a host address of subnet {subnet}");
    }
    let range = match ip_range {
        None => subnet,
        Some(range) => {
            if !subnet.contains(&range) {
                bail!("ip-range {range} is not inside subnet {subnet}");
            }
            range.trunc()
        }
    };
    Ok((gateway, range))
}

fn first_host(net: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + 1)
}

/// Whether `ip` is in `net` and is neither its network (IPv6's subnet-router anycast) nor
/// its IPv4 broadcast address.
fn is_host_of(net: IpNet, ip: IpAddr) -> bool {
    let broadcast = matches!(net, IpNet::V4(_)) && ip == net.broadcast();
    net.contains(&ip) && ip != net.network() && !broadcast
}

/// What a network's addresses of one family are constrained by.
pub struct Pool<'a> {
    pub subnet: IpNet,
    pub range: IpNet,
    pub gateway: IpAddr,
    pub used: &'a HashSet<IpAddr>,
}

impl Pool<'_> {
    /// The lowest free address of the range.
    pub fn allocate(&self) -> Result<IpAddr> {
        self.range
            .hosts()
            .find(|ip| self.is_free(*ip))
            .ok_or_else(|| anyhow::anyhow!("address pool {} is exhausted", self.range))
    }

    /// Checks a requested `--ip` or `--ip6`.
    pub fn check(&self, ip: IpAddr) -> Result<()> {
        if !self.range.contains(&ip) || !is_host_of(self.subnet, ip) {
            bail!("address {ip} is outside the pool {}", self.range);
        }
        if !self.is_free(ip) {
            bail!("address {ip} is already in use");
        }
        Ok(())
    }

    fn is_free(&self, ip: IpAddr) -> bool {
        is_host_of(self.subnet, ip) && ip != self.gateway && !self.used.contains(&ip)
    }
}

/// Docker's MAC for an address: 02:42 followed by the four address bytes.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `--mac`: a unicast MAC written as six colon-separated hex bytes.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|p| {
            if p.len() == 2 {
                u8::from_str_radix(p, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .filter(|b: &Vec<u8>| b.len() == 6)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "invalid MAC address {text:?}: expected 6 hex bytes like 02:42:ac:11:00:02"
            )
        })?;
    if bytes[0] & 1 == 1 {
        bail!("invalid MAC address {text:?}: multicast bit set");
    }
    if bytes.iter().all(|&b| b == 0) {
        bail!("invalid MAC address {text:?}: all zero");
    }
    Ok(bytes.try_into().expect("six bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn subnets_of_addresses_that_are_no_hosts_are_refused() {
        for bad in [
            "0.0.0.0/8",
            "127.0.0.0/16",
            "169.254.0.0/16",
            "224.0.0.0/16",
            "255.255.255.0/24",
            "0.0.0.0/0",
            "fe80::/64",
            "ff00::/64",
            "::ffff:0:0/112",
        ] {
            let err = check_subnet(bad.parse().unwrap()).unwrap_err().to_string();
            assert!(err.contains("overlaps"), "{bad}: {err}");
        }
        for good in [
            "10.0.0.0/8",
            "172.17.0.0/16",
            "192.168.0.0/20",
            "fd00::/64",
            "2001:db8::/64",
        ] {
            check_subnet(good.parse().unwrap()).unwrap();
        }
    }

    #[test]
    fn free_subnet_skips_overlaps() {
        assert_eq!(free_subnet(&[]).unwrap(), net("172.17.0.0/16"));
        let used: [IpNet; 3] = [
            net("172.17.5.0/24").into(),
            net("172.16.0.0/12").trunc().into(),
            "fd00::/8".parse().unwrap(),
        ];
        assert_eq!(free_subnet(&used[..1]).unwrap(), net("172.18.0.0/16"));
        assert_eq!(free_subnet(&used[1..]).unwrap(), net("192.168.0.0/20"));
        assert_eq!(free_subnet(&used[2..]).unwrap(), net("172.17.0.0/16"));
    }

    #[test]
    fn subnet_validation() {
        assert!(parse_subnet("10.1.0.0/24").is_ok());
        assert!(parse_subnet("fd00:60::/64").is_ok());
        assert!(
            parse_subnet("fd00:60::1/64")
                .unwrap_err()
                .to_string()
                .contains("host bits")
        );
        assert!(parse_subnet("fd00:60::/127").is_err());
        assert!(
            parse_subnet("10.1.0.5/24")
                .unwrap_err()
                .to_string()
                .contains("host bits")
        );
        assert!(parse_subnet("10.1.0.0/33").is_err());
        assert!(parse_subnet("10.1.0.0/31").is_err());
        assert!(
            parse_subnet("banana")
                .unwrap_err()
                .to_string()
                .contains("banana")
        );
    }

    #[test]
    fn gateway_and_range_defaults_and_errors() {
        let s = net("10.1.0.0/24");
        assert_eq!(
            gateway_and_range(s, None, None).unwrap(),
            ("10.1.0.1".parse().unwrap(), s)
        );
        assert!(gateway_and_range(s, Some("10.2.0.1".parse().unwrap()), None).is_err());
        assert!(gateway_and_range(s, Some("10.1.0.255".parse().unwrap()), None).is_err());
        assert!(gateway_and_range(s, None, Some(net("10.1.1.0/25"))).is_err());
        let (_, r) = gateway_and_range(s, None, Some(net("10.1.0.128/25"))).unwrap();
        assert_eq!(r, net("10.1.0.128/25"));
    }

    #[test]
    fn ipv6_subnets_and_gateways() {
        let first: Ipv6Net = "fd4e:6574:6400::/64".parse().unwrap();
        assert_eq!(free_subnet6(&[]).unwrap(), first);
        let used: [IpNet; 2] = [
            "fd4e:6574:6400::/60".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        assert_eq!(
            free_subnet6(&used).unwrap(),
            "fd4e:6574:6400:10::/64".parse::<Ipv6Net>().unwrap()
        );
        assert_eq!(
            gateway6(first, None).unwrap(),
            "fd4e:6574:6400::1".parse::<Ipv6Addr>().unwrap()
        );
        assert!(gateway6(first, Some("fd4e:6574:6400::".parse().unwrap())).is_err());
        assert!(gateway6(first, Some("fd00::1".parse().unwrap())).is_err());
    }

    #[test]
    fn ipv6_allocation_skips_the_anycast_address_and_gateway() {
        let subnet: IpNet = "fd00:60::/64".parse().unwrap();
        let used: HashSet<IpAddr> = ["fd00:60::2".parse().unwrap()].into();
        let pool = Pool {
            subnet,
            range: subnet,
            gateway: "fd00:60::1".parse().unwrap(),
            used: &used,
        };
        assert_eq!(
            pool.allocate().unwrap(),
            "fd00:60::3".parse::<IpAddr>().unwrap()
        );
        assert!(pool.check("fd00:60::".parse().unwrap()).is_err());
        assert!(pool.check("fd00:61::5".parse().unwrap()).is_err());
    }

    #[test]
    fn allocation_skips_gateway_and_used_and_exhausts() {
        let used: HashSet<IpAddr> = ["10.1.0.2".parse().unwrap()].into();
        let pool = Pool {
            subnet: net("10.1.0.0/29").into(),
            range: net("10.1.0.0/29").into(),
            gateway: "10.1.0.1".parse().unwrap(),
            used: &used,
        };
        assert_eq!(
            pool.allocate().unwrap(),
            "10.1.0.3".parse::<IpAddr>().unwrap()
        );
        assert!(
            pool.check("10.1.0.2".parse().unwrap())
                .unwrap_err()
                .to_string()
                .contains("in use")
        );
        assert!(pool.check("10.1.0.1".parse().unwrap()).is_err());
        assert!(
            pool.check("10.1.0.9".parse().unwrap())
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
        let all: HashSet<IpAddr> = (2..=6).map(|i| Ipv4Addr::new(10, 1, 0, i).into()).collect();
        let full = Pool { used: &all, ..pool };
        assert!(
            full.allocate()
                .unwrap_err()
                .to_string()
                .contains("exhausted")
        );
    }

    #[test]
    fn macs() {
        assert_eq!(
            format_mac(mac_for("172.17.0.2".parse().unwrap())),
            "02:42:ac:11:00:02"
        );
        assert_eq!(
            parse_mac("02:42:ac:11:00:09").unwrap(),
            [2, 0x42, 0xac, 0x11, 0, 9]
        );
        assert!(parse_mac("01:00:00:00:00:01").is_err());
        assert!(parse_mac("zz").is_err());
        assert!(parse_mac("00:00:00:00:00:00").is_err());
    }
}
