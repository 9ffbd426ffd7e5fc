//! A container's /etc/hosts, /etc/resolv.conf and /etc/hostname, kept under
//! STATE/containers/NAME/ and mounted over /etc by `netd exec`.

use std::{collections::BTreeMap, fs, net::IpAddr, path::Path};

use anyhow::{Context as _, Result};

use crate::store::Container;

/// The current addresses of the containers a container links to, by name (IPv4, then IPv6
/// on a dual-stack network).
pub type Linked = BTreeMap<String, Vec<IpAddr>>;

/// What Docker's hosts files start with: localhost in both families, then the names of the
/// IPv6 prefixes and link-local groups (all nodes, all routers).
const DOCKER_HOSTS_HEADER: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
    fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n";

/// Docker's fallback when the host has no usable nameserver.
const FALLBACK_NAMESERVERS: [&str; 2] = ["8.8.8.8", "8.8.4.4"];

/// The hosts file: localhost, the container's own address and hostname, its links (at the
/// linked containers' current addresses) and `--add-host` entries.
pub fn hosts(c: &Container, linked: &Linked) -> String {
    let mut out = String::from(DOCKER_HOSTS_HEADER);
    let own = [c.ip.map(IpAddr::from), c.ip6.map(IpAddr::from)];
    for ip in own.into_iter().flatten() {
        out.push_str(&format!("{ip}\t{}\n", c.hostname));
    }
    for link in &c.links {
        let names = if link.alias == link.container {
            link.alias.clone()
        } else {
            format!("{} {}", link.alias, link.container)
        };
        for ip in linked.get(&link.container).into_iter().flatten() {
            out.push_str(&format!("{ip}\t{names}\n"));
        }
    }
    for (host, ip) in &c.add_hosts {
        out.push_str(&format!("{ip}\t{host}\n"));
    }
    out
}

/// The resolver config: `--dns`/`--dns-search` when given, otherwise the host's with loopback
/// nameservers dropped (they'd point into the container itself).
pub fn resolv_conf(c: &Container, host_resolv: &str) -> String {
    let mut out = String::new();
    let host_lines = host_resolv.lines().map(str::trim);
    if c.dns_search.is_empty() {
        host_lines
            .clone()
            .filter(|l| l.starts_with("search ") || l.starts_with("options "))
            .for_each(|l| out.push_str(&format!("{l}\n")));
    } else {
        out.push_str(&format!("search {}\n", c.dns_search.join(" ")));
    }
    let nameservers: Vec<String> = if c.dns.is_empty() {
        host_lines
            .filter_map(|l| l.strip_prefix("nameserver "))
            .map(str::trim)
            .filter(|ns| !is_loopback(ns))
            .map(String::from)
            .collect()
    } else {
        c.dns.iter().map(IpAddr::to_string).collect()
    };
    let nameservers = if nameservers.is_empty() {
        FALLBACK_NAMESERVERS.iter().map(|s| s.to_string()).collect()
    } else {
        nameservers
    };
    for ns in nameservers {
        out.push_str(&format!("nameserver {ns}\n"));
    }
    out
}

fn is_loopback(ns: &str) -> bool {
    ns.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Writes the three files of `c` into `dir`.
pub fn write(dir: &Path, c: &Container, linked: &Linked) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    fs::write(dir.join("hosts"), hosts(c, linked))?;
    fs::write(dir.join("resolv.conf"), resolv_conf(c, &host_resolv))?;
    fs::write(dir.join("hostname"), format!("{}\n", c.hostname))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        Status,
        model::{Link, Mode},
    };

    fn container(name: &str, ip: &str) -> Container {
        Container {
            name: name.into(),
            status: Status::Running,
            creator_pid: 0,
            endpoint_added: false,
            mode: Mode::Bridge,
            netns: "/run/netns/x".into(),
            owns_netns: true,
            network: Some("bridge".into()),
            ip: Some(ip.parse().unwrap()),
            ip6: None,
            mac: None,
            host_veth: None,
            ifname: None,
            host_ifindex: None,
            hostname: name.into(),
            dns: vec![],
            dns_search: vec![],
            add_hosts: vec![],
            links: vec![],
            peer_links: vec![],
            exposed: vec![],
            publish_allow: vec![],
            ports: vec![],
            conntrack_limit: None,
        }
    }

    #[test]
    fn hosts_has_self_links_and_extra_hosts() {
        let db = ["172.17.0.3".parse().unwrap(), "fd00::3".parse().unwrap()];
        let linked = Linked::from([("db".into(), db.to_vec())]);
        let mut web = container("web", "172.17.0.2");
        web.ip6 = Some("fd00::2".parse().unwrap());
        web.links.push(Link {
            container: "db".into(),
            alias: "database".into(),
        });
        web.add_hosts
            .push(("registry".into(), "10.0.0.9".parse().unwrap()));
        let hosts = hosts(&web, &linked);
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"));
        assert!(hosts.contains("172.17.0.2\tweb\n"));
        assert!(hosts.contains("fd00::2\tweb\n"));
        assert!(hosts.contains("172.17.0.3\tdatabase db\n"));
        assert!(hosts.contains("fd00::3\tdatabase db\n"));
        assert!(hosts.contains("10.0.0.9\tregistry\n"));
    }

    #[test]
    fn resolv_conf_drops_loopback_and_honours_flags() {
        let host = "nameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch corp.example\n";
        let c = container("a", "172.17.0.2");
        assert_eq!(
            resolv_conf(&c, host),
            "search corp.example\nnameserver 10.0.0.2\n"
        );
        assert_eq!(
            resolv_conf(&c, "nameserver 127.0.0.1\n"),
            "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
        let mut c = c;
        c.dns = vec!["9.9.9.9".parse().unwrap()];
        c.dns_search = vec!["a.example".into(), "b.example".into()];
        assert_eq!(
            resolv_conf(&c, host),
            "search a.example b.example\nnameserver 9.9.9.9\n"
        );
    }
}
