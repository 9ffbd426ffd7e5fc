//! Published ports: `-p`/`--expose` parsing, `-P` and random host ports, conflict checks.

use std::{collections::HashMap, net::IpAddr};

use anyhow::{Context as _, Result, bail};

use serde::{Deserialize, Serialize};

use crate::{core::spec::PortMapping, datapath::Protocol};

/// Host ports `-P` and `-p CPORT` take from (Docker's ephemeral range).
pub const RANDOM_PORTS: std::ops::RangeInclusive<u16> = 49153..=65535;

/// One `-p [IP:][HOSTPORT[-END]:]CPORT[-END][/PROTO]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub host_ip: Option<IpAddr>,
    /// `None`: pick free host ports.
    pub host_ports: Option<(u16, u16)>,
    pub container_ports: (u16, u16),
    pub proto: Protocol,
}

impl From<&PortMapping> for Publish {
    /// One mapping as a request: its host port to its container port.
    fn from(p: &PortMapping) -> Self {
        Self {
            host_ip: p.host_ip,
            host_ports: Some((p.host_port, p.host_port)),
            container_ports: (p.container_port, p.container_port),
            proto: p.proto,
        }
    }
}

fn parse_proto(text: &str, spec: &str) -> Result<Protocol> {
    match text {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        other => bail!("invalid port spec {spec:?}: unknown protocol {other:?} (tcp or udp)"),
    }
}

fn parse_port(text: &str, spec: &str) -> Result<u16> {
    match text.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => bail!("invalid port spec {spec:?}: port {text:?} is not in 1-65535"),
    }
}

/// `PORT` or `PORT-END` as an inclusive range.
fn parse_range(text: &str, spec: &str) -> Result<(u16, u16)> {
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (parse_port(lo, spec)?, parse_port(hi, spec)?),
        None => {
            let p = parse_port(text, spec)?;
            (p, p)
        }
    };
    if hi < lo {
        bail!("invalid port spec {spec:?}: range {text} ends before it starts");
    }
    Ok((lo, hi))
}

fn len((lo, hi): (u16, u16)) -> u32 {
    u32::from(hi - lo) + 1
}

/// Parses a `-p` value.
pub fn parse_publish(spec: &str) -> Result<Publish> {
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((ports, proto)) => (ports, parse_proto(proto, spec)?),
        None => (spec, Protocol::Tcp),
    };
    // An IPv6 host address is bracketed: `[::1]:8080:80`.
    let (bracketed, ports) = match ports
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("]:"))
    {
        Some((ip, rest)) => (Some(ip), rest),
        None => (None, ports),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let (ip, host, container) = match (bracketed, parts.as_slice()) {
        (Some(ip), [h, c]) => (Some(ip), Some(*h).filter(|h| !h.is_empty()), *c),
        (Some(_), _) => {
            bail!("invalid port spec {spec:?}: expected [IPV6]:HOSTPORT:CONTAINERPORT[/PROTO]")
        }
        (None, parts) => match parts {
            [c] => (None, None, *c),
            [h, c] => (None, Some(*h), *c),
            [ip, h, c] => (Some(*ip), Some(*h).filter(|h| !h.is_empty()), *c),
            _ => {
                bail!("invalid port spec {spec:?}: expected [IP:][HOSTPORT:]CONTAINERPORT[/PROTO]")
            }
        },
    };
    let host_ip = ip
        .map(|ip| {
            ip.parse::<IpAddr>()
                .with_context(|| format!("invalid port spec {spec:?}: bad host address {ip:?}"))
        })
        .transpose()?;
    let container_ports = parse_range(container, spec)?;
    let host_ports = host.map(|h| parse_range(h, spec)).transpose()?;
    // A host range for one container port is Docker's "any free one of these".
    if let Some(h) = host_ports
        && len(h) != len(container_ports)
        && len(container_ports) != 1
    {
        bail!("invalid port spec {spec:?}: host and container ranges have different lengths");
    }
    Ok(Publish {
        host_ip,
        host_ports,
        container_ports,
        proto,
    })
}

/// Parses an `--expose PORT[-END][/PROTO]` into a `Publish` with random host ports.
pub fn parse_expose(spec: &str) -> Result<Publish> {
    let (ports, proto) = match spec.rsplit_once('/') {
        Some((ports, proto)) => (ports, parse_proto(proto, spec)?),
        None => (spec, Protocol::Tcp),
    };
    Ok(Publish {
        host_ip: None,
        host_ports: None,
        container_ports: parse_range(ports, spec)?,
        proto,
    })
}

/// Whether two mappings would take the same host address, port and protocol. No address is
/// every address; an unspecified one (`0.0.0.0`, `::`) every address of its family.
pub fn clash(a: &PortMapping, b: &PortMapping) -> bool {
    let covers = |wide: Option<IpAddr>, ip: Option<IpAddr>| match (wide, ip) {
        (None, _) => true,
        (Some(w), Some(ip)) => w == ip || w.is_unspecified() && w.is_ipv4() == ip.is_ipv4(),
        (Some(_), None) => false,
    };
    a.proto == b.proto
        && a.host_port == b.host_port
        && (covers(a.host_ip, b.host_ip) || covers(b.host_ip, a.host_ip))
}

/// Turns publish requests into one mapping per port, choosing free random host ports where
/// none was given and refusing any clash with what `taken` finds (the mapping already
/// published that takes the same host port) or among themselves. `default_ip` is the
/// network's `--host-ip`.
pub fn assign(
    requests: &[Publish],
    default_ip: Option<IpAddr>,
    taken: impl Fn(&PortMapping) -> Result<Option<PortMapping>>,
) -> Result<Vec<PortMapping>> {
    let mut out = Planned::default();
    let clashing = |m: &PortMapping, out: &Planned| -> Result<Option<PortMapping>> {
        match out.clash(m) {
            Some(t) => Ok(Some(t.clone())),
            None => taken(m),
        }
    };
    for req in requests {
        let host_ip = req.host_ip.or(default_ip);
        for offset in 0..len(req.container_ports) {
            let offset = offset as u16;
            let container_port = req.container_ports.0 + offset;
            let mapping = match req.host_ports {
                Some(_) if let Some(range) = one_of_range(req) => {
                    free_port_in(range, req.proto, host_ip, container_port, |m| {
                        clashing(m, &out)
                    })?
                }
                Some((lo, _)) => {
                    let m = PortMapping {
                        proto: req.proto,
                        host_ip,
                        host_port: lo + offset,
                        container_port,
                    };
                    if let Some(other) = clashing(&m, &out)? {
                        bail!(
                            "host port {}/{} is already published{}",
                            m.host_port,
                            proto_name(m.proto),
                            other
                                .host_ip
                                .map(|ip| format!(" on {ip}"))
                                .unwrap_or_default()
                        );
                    }
                    m
                }
                None => free_port_in(RANDOM_PORTS, req.proto, host_ip, container_port, |m| {
                    clashing(m, &out)
                })?,
            };
            out.push(mapping);
        }
    }
    Ok(out.all)
}

/// The mappings planned so far for one set of requests, found by protocol and host port (a
/// request may hold 100,000 of them).
#[derive(Default)]
struct Planned {
    all: Vec<PortMapping>,
    by_port: HashMap<(Protocol, u16), Vec<usize>>,
}

impl Planned {
    /// The planned mapping `m` would clash with, if any.
    fn clash(&self, m: &PortMapping) -> Option<&PortMapping> {
        self.by_port
            .get(&(m.proto, m.host_port))?
            .iter()
            .map(|&i| &self.all[i])
            .find(|t| clash(t, m))
    }

    fn push(&mut self, m: PortMapping) {
        self.by_port
            .entry((m.proto, m.host_port))
            .or_default()
            .push(self.all.len());
        self.all.push(m);
    }
}

/// The mappings of `published` (container `name`'s) that unpublish `requests` name: one with
/// host ports names exactly the mappings publishing it would make (on its address, else the
/// network's `--host-ip` `default_ip`); one without names every mapping of its container
/// ports (on its address, if it gives one). Fails naming the first port not published.
pub fn select_published(
    name: &str,
    requests: &[Publish],
    default_ip: Option<IpAddr>,
    published: &[PortMapping],
) -> Result<Vec<PortMapping>> {
    let mut out: Vec<PortMapping> = Vec::new();
    for req in requests {
        for offset in 0..len(req.container_ports) {
            let offset = offset as u16;
            let named = named_by(req, offset, default_ip, published);
            if named.is_empty() {
                bail!(
                    "container {name:?} does not publish {}",
                    describe_request(req, offset)
                );
            }
            for p in named {
                if !out.contains(p) {
                    out.push(p.clone());
                }
            }
        }
    }
    Ok(out)
}

/// Whether every port of `req` is published already (see [`select_published`]).
pub fn is_published(req: &Publish, default_ip: Option<IpAddr>, published: &[PortMapping]) -> bool {
    (0..len(req.container_ports))
        .all(|offset| !named_by(req, offset as u16, default_ip, published).is_empty())
}

/// The mappings of `published` that port `offset` of `req` names (see [`select_published`]).
fn named_by<'a>(
    req: &Publish,
    offset: u16,
    default_ip: Option<IpAddr>,
    published: &'a [PortMapping],
) -> Vec<&'a PortMapping> {
    let container_port = req.container_ports.0 + offset;
    match req.host_ports {
        Some(_) if let Some(range) = one_of_range(req) => published
            .iter()
            .filter(|p| {
                p.proto == req.proto
                    && p.host_ip == req.host_ip.or(default_ip)
                    && p.container_port == container_port
                    && range.contains(&p.host_port)
            })
            .collect(),
        Some((lo, _)) => {
            let m = PortMapping {
                proto: req.proto,
                host_ip: req.host_ip.or(default_ip),
                host_port: lo + offset,
                container_port,
            };
            published.iter().filter(|p| **p == m).collect()
        }
        None => published
            .iter()
            .filter(|p| {
                p.proto == req.proto
                    && p.container_port == container_port
                    && (req.host_ip.is_none() || p.host_ip == req.host_ip)
            })
            .collect(),
    }
}

/// One port of a request as `-p` writes it: `[IP:][HOSTPORT:]CPORT/PROTO`.
fn describe_request(req: &Publish, offset: u16) -> String {
    let ip = req.host_ip.map(|ip| format!("{ip}:")).unwrap_or_default();
    let host = req
        .host_ports
        .map(|(lo, _)| format!("{}:", lo + offset))
        .unwrap_or_default();
    format!(
        "{ip}{host}{}/{}",
        req.container_ports.0 + offset,
        proto_name(req.proto)
    )
}

/// The lowest port of [`RANDOM_PORTS`] no mapping takes yet.
/// The first host port of `range` free for `container_port`.
fn free_port_in(
    range: std::ops::RangeInclusive<u16>,
    proto: Protocol,
    host_ip: Option<IpAddr>,
    container_port: u16,
    clashing: impl Fn(&PortMapping) -> Result<Option<PortMapping>>,
) -> Result<PortMapping> {
    for host_port in range.clone() {
        let m = PortMapping {
            proto,
            host_ip,
            host_port,
            container_port,
        };
        if clashing(&m)?.is_none() {
            return Ok(m);
        }
    }
    bail!(
        "no free host port left in {}-{}/{}",
        range.start(),
        range.end(),
        proto_name(proto)
    )
}

/// Whether `req` gives a range of host ports for one container port (`-p 8000-8010:80`): as
/// Docker, one free port of the range is taken.
fn one_of_range(req: &Publish) -> Option<std::ops::RangeInclusive<u16>> {
    req.host_ports
        .filter(|h| len(*h) > 1 && len(req.container_ports) == 1)
        .map(|(lo, hi)| lo..=hi)
}

pub fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_forms() {
        let p = parse_publish("8080:80").unwrap();
        assert_eq!(
            (p.host_ports, p.container_ports, p.proto, p.host_ip),
            (Some((8080, 8080)), (80, 80), Protocol::Tcp, None)
        );
        let p = parse_publish("198.18.0.2:5000-5002:6000-6002/udp").unwrap();
        assert_eq!(
            (p.host_ip, p.host_ports, p.container_ports, p.proto),
            (
                Some("198.18.0.2".parse().unwrap()),
                Some((5000, 5002)),
                (6000, 6002),
                Protocol::Udp
            )
        );
        assert_eq!(parse_publish("80").unwrap().host_ports, None);
        assert_eq!(parse_publish("1.2.3.4::80").unwrap().host_ports, None);
        let p = parse_publish("[2001:2::2]:8080:80/udp").unwrap();
        assert_eq!(
            (p.host_ip, p.host_ports, p.proto),
            (
                Some("2001:2::2".parse().unwrap()),
                Some((8080, 8080)),
                Protocol::Udp
            )
        );
        assert_eq!(parse_publish("[::1]::80").unwrap().host_ports, None);
    }

    #[test]
    fn rejects_bad_specs() {
        for (spec, why) in [
            ("0:80", "not in 1-65535"),
            ("8080:70000", "not in 1-65535"),
            ("8000-8002:80-81", "different lengths"),
            ("8080:80/sctp", "unknown protocol"),
            ("8082-8080:80-82", "ends before"),
            ("a:b:c:d", "expected"),
            ("x.y:80:80", "bad host address"),
            ("::1:80:80", "expected"),
            ("[::1]:80", "expected [IPV6]"),
            ("[fe::zz]:80:80", "bad host address"),
        ] {
            let err = parse_publish(spec).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(spec), "{spec}: {err}");
        }
    }

    /// What the store answers, over a list.
    fn in_list(taken: &[PortMapping]) -> impl Fn(&PortMapping) -> Result<Option<PortMapping>> + '_ {
        |m| Ok(taken.iter().find(|t| clash(t, m)).cloned())
    }

    #[test]
    fn a_host_range_for_one_container_port_takes_one_free_port_of_it() {
        let req = parse_publish("8000-8002:80").unwrap();
        let at = |host_port| PortMapping {
            proto: Protocol::Tcp,
            host_ip: None,
            host_port,
            container_port: 80,
        };
        assert_eq!(
            assign(std::slice::from_ref(&req), None, in_list(&[])).unwrap(),
            [at(8000)]
        );
        let taken = [at(8000), at(8001)];
        assert_eq!(
            assign(std::slice::from_ref(&req), None, in_list(&taken)).unwrap(),
            [at(8002)]
        );
        let full = [at(8000), at(8001), at(8002)];
        let err = assign(std::slice::from_ref(&req), None, in_list(&full))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no free host port left in 8000-8002/tcp"),
            "{err}"
        );
        // Unpublished by the same range: whichever port of it was taken.
        assert_eq!(
            select_published("c", &[req], None, &[at(8001)]).unwrap(),
            [at(8001)]
        );
    }

    #[test]
    fn assigns_random_ports_and_refuses_clashes() {
        let taken = vec![PortMapping {
            proto: Protocol::Tcp,
            host_ip: None,
            host_port: 49153,
            container_port: 1,
        }];
        let got = assign(
            &[parse_publish("80").unwrap(), parse_expose("81-82").unwrap()],
            None,
            in_list(&taken),
        )
        .unwrap();
        assert_eq!(
            got.iter().map(|m| m.host_port).collect::<Vec<_>>(),
            [49154, 49155, 49156]
        );
        let err = assign(&[parse_publish("49153:80").unwrap()], None, in_list(&taken)).unwrap_err();
        assert!(
            err.to_string().contains("49153/tcp is already published"),
            "{err}"
        );
        // Another protocol, or a different specific address against a specific one, is free.
        assert!(
            assign(
                &[parse_publish("49153:80/udp").unwrap()],
                None,
                in_list(&taken)
            )
            .is_ok()
        );
        let on_a = vec![PortMapping {
            proto: Protocol::Tcp,
            host_ip: Some("10.0.0.1".parse().unwrap()),
            host_port: 80,
            container_port: 80,
        }];
        assert!(
            assign(
                &[parse_publish("10.0.0.2:80:80").unwrap()],
                None,
                in_list(&on_a)
            )
            .is_ok()
        );
        assert!(assign(&[parse_publish("80:80").unwrap()], None, in_list(&on_a)).is_err());
        assert!(
            assign(
                &[
                    parse_publish("90:80").unwrap(),
                    parse_publish("90:81").unwrap()
                ],
                None,
                in_list(&[])
            )
            .is_err()
        );
    }

    #[test]
    fn an_unspecified_address_covers_its_family() {
        let on = |ip: Option<&str>| PortMapping {
            proto: Protocol::Tcp,
            host_ip: ip.map(|ip| ip.parse().unwrap()),
            host_port: 80,
            container_port: 80,
        };
        let (any, any4, any6) = (on(None), on(Some("0.0.0.0")), on(Some("::")));
        let (a4, a6) = (on(Some("198.18.0.2")), on(Some("2001:2::2")));
        for (x, y) in [
            (&any4, &a4),
            (&any6, &a6),
            (&any, &any4),
            (&any, &a6),
            (&a4, &a4),
        ] {
            assert!(clash(x, y) && clash(y, x), "{x:?} {y:?}");
        }
        for (x, y) in [(&any4, &a6), (&any6, &a4), (&any4, &any6), (&a4, &a6)] {
            assert!(!clash(x, y) && !clash(y, x), "{x:?} {y:?}");
        }
    }

    #[test]
    fn selects_what_unpublish_names() {
        let m = |host_ip: Option<&str>, host_port, container_port| PortMapping {
            proto: Protocol::Tcp,
            host_ip: host_ip.map(|ip| ip.parse().unwrap()),
            host_port,
            container_port,
        };
        let published = [
            m(None, 8080, 80),
            m(None, 49153, 80),
            m(Some("127.0.0.1"), 8443, 443),
            m(None, 9000, 90),
            m(None, 9001, 91),
        ];
        let select = |specs: &[&str]| {
            let requests: Vec<Publish> = specs.iter().map(|s| parse_publish(s).unwrap()).collect();
            select_published("web", &requests, None, &published)
        };
        assert_eq!(select(&["8080:80"]).unwrap(), [m(None, 8080, 80)]);
        // Without a host port: every mapping of the container port, once.
        assert_eq!(
            select(&["80", "8080:80"]).unwrap(),
            [m(None, 8080, 80), m(None, 49153, 80)]
        );
        assert_eq!(
            select(&["9000-9001:90-91"]).unwrap(),
            [m(None, 9000, 90), m(None, 9001, 91)]
        );
        assert_eq!(
            select(&["127.0.0.1:8443:443"]).unwrap(),
            [m(Some("127.0.0.1"), 8443, 443)]
        );
        for (spec, named) in [
            ("8443:443", "8443:443/tcp"),
            ("8080:80/udp", "8080:80/udp"),
            ("8081:80", "8081:80/tcp"),
            ("9000-9002:90-92", "9002:92/tcp"),
            ("10.0.0.1::80", "10.0.0.1:80/tcp"),
        ] {
            let err = select(&[spec]).unwrap_err().to_string();
            assert_eq!(err, format!("container \"web\" does not publish {named}"));
            assert!(!is_published(
                &parse_publish(spec).unwrap(),
                None,
                &published
            ));
        }
        for spec in ["8080:80", "80", "9000-9001:90-91", "127.0.0.1:8443:443"] {
            assert!(
                is_published(&parse_publish(spec).unwrap(), None, &published),
                "{spec}"
            );
        }
        // The network's --host-ip is where a port without an address was published.
        let on_host_ip = [m(Some("198.18.0.2"), 8080, 80)];
        let requests = [parse_publish("8080:80").unwrap()];
        let host_ip = Some("198.18.0.2".parse().unwrap());
        assert_eq!(
            select_published("web", &requests, host_ip, &on_host_ip).unwrap(),
            on_host_ip
        );
    }
}
