//! The iptables datapath: the rules Docker 20.10 installs, so netd can set up the path its users
//! benchmark the eBPF datapath against, on the same controller and topology.
//!
//! Rule set source: moby/libnetwork v20.10, `drivers/bridge/setup_ip_tables.go` (base chains,
//! per-network FORWARD/ISOLATION/MASQUERADE rules, internal networks, icc) and
//! `drivers/bridge/port_mapping.go` + `iptables/iptables.go` `Forward` (per-port DNAT, hairpin
//! MASQUERADE and the ACCEPT in the DOCKER filter chain), with the chain names prefixed for netd:
//! DOCKER → NETD, DOCKER-USER → NETD-USER, DOCKER-ISOLATION-STAGE-n → NETD-ISOLATION-STAGE-n.
//!
//! netd runs no docker-proxy, so this is the rule set of Docker's `--userland-proxy=false`
//! (hairpin mode): DNAT rules match on the bridge too (no `! -i BRIDGE`, no `-i BRIDGE -j
//! RETURN` skip), so a container reaches a published port through the host's address.
//!
//! Every change is one `iptables-restore --noflush` transaction: it applies whole or not at all.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::{Datapath, EndpointSpec, NetworkSpec, PortSpec, Protocol};
use crate::netlink::set_sysctl;

const CHAIN: &str = "NETD";
const USER: &str = "NETD-USER";
const ISOLATION_1: &str = "NETD-ISOLATION-STAGE-1";
const ISOLATION_2: &str = "NETD-ISOLATION-STAGE-2";

pub struct IptablesDatapath;

/// A restore script: rules grouped by table, in order.
#[derive(Default)]
struct Script {
    nat: Vec<String>,
    filter: Vec<String>,
}

impl Script {
    fn render(&self) -> String {
        let mut out = String::new();
        for (table, rules) in [("nat", &self.nat), ("filter", &self.filter)] {
            if rules.is_empty() {
                continue;
            }
            out.push_str(&format!("*{table}\n"));
            for rule in rules {
                out.push_str(rule);
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }

    /// The same rules with every `-A`/`-I` turned into a `-D`, last first.
    fn deletions(&self) -> Self {
        let delete = |rules: &Vec<String>| {
            rules
                .iter()
                .rev()
                .map(|r| delete_form(r))
                .collect::<Vec<_>>()
        };
        Self {
            nat: delete(&self.nat),
            filter: delete(&self.filter),
        }
    }
}

/// `-A CHAIN spec` / `-I CHAIN spec` → `-D CHAIN spec`.
fn delete_form(rule: &str) -> String {
    let rest = rule
        .strip_prefix("-A ")
        .or_else(|| rule.strip_prefix("-I "))
        .unwrap_or(rule);
    format!("-D {rest}")
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Applies `script` atomically in the host namespace (netd's threads are already in it).
fn restore(script: &Script) -> Result<()> {
    let text = script.render();
    let mut child = Command::new("iptables-restore")
        .args(["--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run iptables-restore (is iptables installed?)")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "iptables-restore failed: {}",
            err.lines().next().unwrap_or("").trim()
        );
    }
    Ok(())
}

/// The rules of `table` as `iptables-save` prints them.
fn saved(table: &str) -> Result<String> {
    let out = Command::new("iptables-save")
        .args(["-t", table])
        .output()
        .context("run iptables-save")?;
    if !out.status.success() {
        bail!("iptables-save -t {table} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The chains and jumps every network relies on (`setupIPChains` in Docker).
fn base_rules() -> Script {
    Script {
        nat: vec![
            format!(":{CHAIN} - [0:0]"),
            format!("-A PREROUTING -m addrtype --dst-type LOCAL -j {CHAIN}"),
            format!("-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j {CHAIN}"),
        ],
        filter: vec![
            format!(":{CHAIN} - [0:0]"),
            format!(":{ISOLATION_1} - [0:0]"),
            format!(":{ISOLATION_2} - [0:0]"),
            format!(":{USER} - [0:0]"),
            format!("-A FORWARD -j {USER}"),
            format!("-A FORWARD -j {ISOLATION_1}"),
            format!("-A {ISOLATION_1} -j RETURN"),
            format!("-A {ISOLATION_2} -j RETURN"),
            format!("-A {USER} -j RETURN"),
        ],
    }
}

/// Removes what [`base_rules`] made.
fn base_removal() -> Script {
    let mut script = Script {
        nat: vec![
            format!("-D PREROUTING -m addrtype --dst-type LOCAL -j {CHAIN}"),
            format!("-D OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j {CHAIN}"),
            format!("-F {CHAIN}"),
            format!("-X {CHAIN}"),
        ],
        filter: vec![
            format!("-D FORWARD -j {USER}"),
            format!("-D FORWARD -j {ISOLATION_1}"),
        ],
    };
    for chain in [CHAIN, ISOLATION_1, ISOLATION_2, USER] {
        script.filter.push(format!("-F {chain}"));
        script.filter.push(format!("-X {chain}"));
    }
    script
}

/// A network's rules (`setupIPTablesInternal`, `setIcc`, `setupInternalNetworkRules` and the
/// isolation rules in Docker). FORWARD rules go to the top, then the USER and ISOLATION jumps
/// are moved back above them, as Docker does.
fn network_rules(net: &NetworkSpec) -> Script {
    let br = &net.bridge;
    let subnet = net.subnet;
    let mut s = Script::default();
    if net.masquerade && !net.internal {
        s.nat.push(format!(
            "-A POSTROUTING -s {subnet} ! -o {br} -j MASQUERADE"
        ));
    }

    let icc = if net.icc { "ACCEPT" } else { "DROP" };
    s.filter
        .push(format!("-I FORWARD -i {br} -o {br} -j {icc}"));
    if !net.internal {
        s.filter
            .push(format!("-I FORWARD -i {br} ! -o {br} -j ACCEPT"));
    }
    s.filter.push(format!("-I FORWARD -o {br} -j {CHAIN}"));
    s.filter.push(format!(
        "-I FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    if net.internal {
        s.filter
            .push(format!("-I {ISOLATION_1} ! -s {subnet} -o {br} -j DROP"));
        s.filter
            .push(format!("-I {ISOLATION_1} ! -d {subnet} -i {br} -j DROP"));
    }
    s.filter.push(format!(
        "-I {ISOLATION_1} -i {br} ! -o {br} -j {ISOLATION_2}"
    ));
    s.filter.push(format!("-I {ISOLATION_2} -o {br} -j DROP"));
    if net.masquerade && !net.internal {
        // What Docker's FORWARD policy DROP does to new flows routed straight to a container,
        // without changing the host's policy; only where masquerading, as the eBPF datapath.
        s.filter.push(format!("-A FORWARD -o {br} -j DROP"));
    }
    s
}

/// Moves the USER and ISOLATION-1 jumps back to the top of FORWARD.
fn forward_jumps_first() -> Vec<String> {
    vec![
        format!("-D FORWARD -j {ISOLATION_1}"),
        format!("-D FORWARD -j {USER}"),
        format!("-I FORWARD -j {ISOLATION_1}"),
        format!("-I FORWARD -j {USER}"),
    ]
}

/// One published port's rules (`Forward` in Docker's iptables package).
fn port_rules(net: &NetworkSpec, port: &PortSpec) -> Script {
    let br = &net.bridge;
    let p = proto(port.proto);
    let dst = port
        .host_ip
        .map(|ip| format!("-d {ip}/32 "))
        .unwrap_or_default();
    let (cip, cport, hport) = (port.container_ip, port.container_port, port.host_port);
    // One DNAT per allowed source range (`--publish-allow`); one from anywhere without.
    let sources: Vec<String> = if port.allow.is_empty() {
        vec![String::new()]
    } else {
        port.allow.iter().map(|net| format!("-s {net} ")).collect()
    };
    let mut nat: Vec<String> = sources
        .iter()
        .map(|src| {
            format!(
                "-A {CHAIN} {src}{dst}-p {p} -m {p} --dport {hport} -j DNAT --to-destination {cip}:{cport}"
            )
        })
        .collect();
    nat.push(format!(
        "-A POSTROUTING -s {cip}/32 -d {cip}/32 -p {p} -m {p} --dport {cport} -j MASQUERADE"
    ));
    Script {
        nat,
        filter: vec![format!(
            "-I {CHAIN} -d {cip}/32 ! -i {br} -o {br} -p {p} -m {p} --dport {cport} -j ACCEPT"
        )],
    }
}

/// Docker's pair of ACCEPT rules for each port a `--link` opens (`linkContainers`): to the
/// linked container's port, and its replies from it. They sit in the chain FORWARD jumps to
/// before the `--icc=false` DROP.
fn link_rules(net: &NetworkSpec, ep: &EndpointSpec) -> Script {
    let br = &net.bridge;
    let a = ep.ip;
    let filter = ep
        .links
        .iter()
        .flat_map(|link| {
            let (b, port, p) = (link.peer, link.port, proto(link.proto));
            [
                format!(
                    "-I {CHAIN} -s {a}/32 -d {b}/32 -i {br} -o {br} -p {p} -m {p} --dport {port} -j ACCEPT"
                ),
                format!(
                    "-I {CHAIN} -s {b}/32 -d {a}/32 -i {br} -o {br} -p {p} -m {p} --sport {port} -j ACCEPT"
                ),
            ]
        })
        .collect();
    Script {
        nat: vec![],
        filter,
    }
}

/// The rules of `filter` (iptables-save output) that [`link_rules`] made on bridge `br` with
/// `ip` on either side.
fn link_rules_naming(filter: &str, br: &str, ip: std::net::Ipv4Addr) -> Vec<String> {
    let chain = format!("-A {CHAIN} ");
    let bridged = format!(" -i {br} -o {br} ");
    let (src, dst) = (format!("-s {ip}/32 "), format!("-d {ip}/32 "));
    filter
        .lines()
        .filter(|l| l.starts_with(&chain) && l.contains(&bridged) && l.ends_with("-j ACCEPT"))
        .filter(|l| l.contains(&src) || l.contains(&dst))
        .map(String::from)
        .collect()
}

impl IptablesDatapath {
    fn ensure_base(&self) -> Result<()> {
        if !saved("filter")?.contains(&format!(":{ISOLATION_1} ")) {
            restore(&base_rules())?;
        }
        Ok(())
    }

    /// Whether any network still has rules in the isolation chain.
    fn networks_remain(&self) -> Result<bool> {
        let filter = saved("filter")?;
        Ok(filter
            .lines()
            .any(|l| l.starts_with(&format!("-A {ISOLATION_1} ")) && !l.ends_with("-j RETURN")))
    }
}

impl Datapath for IptablesDatapath {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn setup_network(&self, net: &NetworkSpec) -> Result<()> {
        refuse_conntrack_limit(net.conntrack_limit)?;
        self.ensure_base()?;
        // Container to container on one bridge only crosses iptables with br_netfilter on;
        // --icc=false depends on it. Kernels without br_netfilter have no such sysctl.
        let _ = set_sysctl(None, "net.bridge.bridge-nf-call-iptables", "1");
        // And only untagged frames do, unless told otherwise: a container's VLAN-tagged frame
        // to its neighbour would be bridged past the --icc=false DROP, and a priority-tagged
        // one (VLAN 0) is taken by the receiving stack as the untagged IPv4 it carries.
        let _ = set_sysctl(None, "net.bridge.bridge-nf-filter-vlan-tagged", "1");
        let mut script = network_rules(net);
        script.filter.extend(forward_jumps_first());
        restore(&script).with_context(|| format!("install iptables rules for network {}", net.name))
    }

    fn teardown_network(&self, net: &NetworkSpec) -> Result<()> {
        restore(&network_rules(net).deletions())
            .with_context(|| format!("remove iptables rules of network {}", net.name))?;
        if !self.networks_remain()? {
            restore(&base_removal()).context("remove netd's iptables chains")?;
        }
        Ok(())
    }

    // Docker writes no rule per container (links aside); the bridge carries them.
    fn add_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()> {
        refuse_conntrack_limit(ep.conntrack_limit)?;
        if ep.links.is_empty() {
            return Ok(());
        }
        restore(&link_rules(net, ep)).context("install iptables rules of links")
    }

    /// Removes every link rule naming the endpoint's address, on either side: its own links
    /// may be gone from `ep` already (the linked container was removed first), and other
    /// containers' links to it must not pass on to the next container with its address.
    fn remove_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()> {
        let stale = link_rules_naming(&saved("filter")?, &net.bridge, ep.ip);
        if stale.is_empty() {
            return Ok(());
        }
        let script = Script {
            nat: vec![],
            filter: stale.iter().map(|rule| delete_form(rule)).collect(),
        };
        restore(&script).context("remove iptables rules of links")
    }

    fn publish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()> {
        let mut script = Script::default();
        for port in ports {
            let rules = port_rules(net, port);
            script.nat.extend(rules.nat);
            script.filter.extend(rules.filter);
        }
        restore(&script).context("install iptables rules for published ports")
    }

    fn unpublish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()> {
        let mut script = Script::default();
        for port in ports {
            let rules = port_rules(net, port).deletions();
            script.nat.extend(rules.nat);
            script.filter.extend(rules.filter);
        }
        restore(&script).context("remove iptables rules of published ports")
    }
}

/// Docker's rules have no per-container or per-network flow cap: asking for one here is an
/// error rather than a cap silently not enforced.
fn refuse_conntrack_limit(limit: Option<u32>) -> Result<()> {
    if limit.is_some() {
        anyhow::bail!("--conntrack-limit needs the ebpf datapath");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> NetworkSpec {
        NetworkSpec {
            id: 1,
            name: "bridge".into(),
            bridge: "netd0".into(),
            subnet: "172.17.0.0/16".parse().unwrap(),
            gateway: "172.17.0.1".parse().unwrap(),
            icc: true,
            internal: false,
            masquerade: true,
            conntrack_limit: None,
        }
    }

    #[test]
    fn published_port_rules_match_docker() {
        let port = PortSpec {
            network_id: 1,
            proto: Protocol::Tcp,
            host_ip: None,
            host_port: 8080,
            container_ip: "172.17.0.2".parse().unwrap(),
            container_port: 80,
            allow: vec![],
        };
        let s = port_rules(&net(), &port);
        assert_eq!(
            s.nat,
            [
                "-A NETD -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80",
                "-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE",
            ]
        );
        assert_eq!(
            s.filter,
            ["-I NETD -d 172.17.0.2/32 ! -i netd0 -o netd0 -p tcp -m tcp --dport 80 -j ACCEPT"]
        );
    }

    #[test]
    fn link_rules_match_docker() {
        let ep = EndpointSpec {
            network_id: 1,
            container: "client".into(),
            ip: "172.17.0.3".parse().unwrap(),
            mac: [0x02, 0x42, 172, 17, 0, 3],
            host_ifname: "veth0000001".into(),
            host_ifindex: 7,
            links: vec![super::super::LinkSpec {
                peer: "172.17.0.2".parse().unwrap(),
                proto: Protocol::Tcp,
                port: 80,
            }],
            conntrack_limit: None,
        };
        assert_eq!(
            link_rules(&net(), &ep).filter,
            [
                "-I NETD -s 172.17.0.3/32 -d 172.17.0.2/32 -i netd0 -o netd0 -p tcp -m tcp --dport 80 -j ACCEPT",
                "-I NETD -s 172.17.0.2/32 -d 172.17.0.3/32 -i netd0 -o netd0 -p tcp -m tcp --sport 80 -j ACCEPT",
            ]
        );
    }

    #[test]
    fn deletions_reverse_and_delete() {
        let s = network_rules(&net()).deletions();
        assert_eq!(
            s.nat.last().unwrap(),
            "-D POSTROUTING -s 172.17.0.0/16 ! -o netd0 -j MASQUERADE"
        );
        assert!(s.filter.iter().all(|r| r.starts_with("-D ")));
    }

    #[test]
    fn internal_network_drops_and_does_not_masquerade() {
        let mut n = net();
        n.internal = true;
        n.icc = false;
        let s = network_rules(&n);
        assert!(!s.nat.iter().any(|r| r.contains("MASQUERADE")));
        assert!(s.filter.contains(
            &"-I NETD-ISOLATION-STAGE-1 ! -s 172.17.0.0/16 -o netd0 -j DROP".to_string()
        ));
        assert!(
            s.filter
                .contains(&"-I FORWARD -i netd0 -o netd0 -j DROP".to_string())
        );
    }
}
