//! The iptables datapath: the rules Docker 20.10 installs, so netd can set up the path its users
//! benchmark the eBPF datapath against, on the same controller and topology.
//!
//! Rule set source: moby/libnetwork v20.10, `drivers/bridge/setup_ip_tables.go` (base chains,
//! per-network FORWARD/ISOLATION/MASQUERADE rules, internal networks, icc) and
//! `drivers/bridge/port_mapping.go` + `iptables/iptables.go` `Forward` (per-port DNAT, hairpin
//! MASQUERADE and the ACCEPT in the DOCKER filter chain), with the chain names prefixed for netd:
//! DOCKER → NETD, DOCKER-USER → NETD-USER, DOCKER-ISOLATION-STAGE-n → NETD-ISOLATION-STAGE-n.
//!
//! The rules are those of Docker's `--userland-proxy=false` (hairpin mode): DNAT rules match
//! on the bridge too (no `! -i BRIDGE`, no `-i BRIDGE -j RETURN` skip), so a container reaches
//! a published port through the host's address. Loopback is what the rules can't serve (the
//! nat OUTPUT jump skips it, below): there, as Docker's default `--userland-proxy=true` does,
//! a userland proxy per port and address forwards to the container ([`super::proxy`]).
//!
//! Every change is one `iptables-restore --noflush` transaction: it applies whole or not at all.

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;

use super::{
    Datapath, EndpointSpec, NetworkSpec, PortSpec, Protocol,
    proxy::{self, Proxies, Proxy, Reconciled},
};
use crate::{fault, netlink::set_sysctl};

const CHAIN: &str = "NETD";
const USER: &str = "NETD-USER";
const ISOLATION_1: &str = "NETD-ISOLATION-STAGE-1";
const ISOLATION_2: &str = "NETD-ISOLATION-STAGE-2";

pub struct IptablesDatapath {
    proxies: Proxies,
}

/// Which of the two rule sets: iptables for IPv4, ip6tables for a dual-stack network's IPv6
/// (Docker's `ip6tables=true`): the same chains and rules, with each family's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// The families network `net` has rules in, each with its subnet of that family.
    fn subnets_of(net: &NetworkSpec) -> impl Iterator<Item = (Family, IpNet)> {
        let v6 = net.subnet6.map(|s| (Family::V6, IpNet::from(s)));
        [Some((Family::V4, IpNet::from(net.subnet))), v6]
            .into_iter()
            .flatten()
    }
}

/// `ip` as a one-address source or destination.
fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// `ip:port` as DNAT takes it (`[ip]:port` for IPv6).
fn socket(ip: IpAddr, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip, port)
}

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

    fn is_empty(&self) -> bool {
        self.nat.is_empty() && self.filter.is_empty()
    }

    fn extend(&mut self, other: Script) {
        self.nat.extend(other.nat);
        self.filter.extend(other.filter);
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
fn restore(family: Family, script: &Script) -> Result<()> {
    let tool = format!("{}-restore", family.tool());
    let text = script.render();
    let mut child = Command::new(&tool)
        .args(["--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {tool} (is iptables installed?)"))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("{tool} failed: {}", err.lines().next().unwrap_or("").trim());
    }
    Ok(())
}

/// Applies each family's script in turn; if one fails, undoes those applied before it, so
/// the change is whole in both families or in neither.
fn restore_all(steps: &[(Family, Script)]) -> Result<()> {
    for (done, (family, script)) in steps.iter().enumerate() {
        if script.is_empty() {
            continue;
        }
        if let Err(e) = restore(*family, script) {
            for (family, script) in steps[..done].iter().rev() {
                if !script.is_empty() {
                    let _ = restore(*family, &script.deletions());
                }
            }
            return Err(e);
        }
    }
    Ok(())
}

/// The rules of `table` as `iptables-save` (or `ip6tables-save`) prints them.
fn saved(family: Family, table: &str) -> Result<String> {
    let tool = format!("{}-save", family.tool());
    let out = Command::new(&tool)
        .args(["-t", table])
        .output()
        .with_context(|| format!("run {tool}"))?;
    if !out.status.success() {
        bail!("{tool} -t {table} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nat PREROUTING jump into netd's chain: never for loopback destinations. Arriving from
/// outside, those would be DNATed to a container before the stack drops them as martians (a
/// port published on 127.0.0.1, or on every address, reachable from the host's neighbours);
/// the userland proxy serves loopback.
fn prerouting_jump(family: Family) -> String {
    let lo = family.loopback();
    format!("-A PREROUTING ! -d {lo} -m addrtype --dst-type LOCAL -j {CHAIN}")
}

/// The jump earlier builds made, with loopback: replaced by [`prerouting_jump`] wherever
/// netd finds it.
fn unguarded_prerouting_jump() -> String {
    format!("-A PREROUTING -m addrtype --dst-type LOCAL -j {CHAIN}")
}

/// Replaces an earlier build's [`unguarded_prerouting_jump`] in `family`'s nat table.
fn guard_prerouting(family: Family) -> Result<()> {
    let old = unguarded_prerouting_jump();
    if saved(family, "nat")?.lines().any(|l| l == old) {
        let script = Script {
            nat: vec![delete_form(&old), prerouting_jump(family)],
            filter: vec![],
        };
        restore(family, &script).context("keep loopback out of netd's PREROUTING jump")?;
    }
    Ok(())
}

/// The chains and jumps every network relies on (`setupIPChains` in Docker).
fn base_rules(family: Family) -> Script {
    let lo = family.loopback();
    Script {
        nat: vec![
            format!(":{CHAIN} - [0:0]"),
            prerouting_jump(family),
            format!("-A OUTPUT ! -d {lo} -m addrtype --dst-type LOCAL -j {CHAIN}"),
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
fn base_removal(family: Family) -> Script {
    let lo = family.loopback();
    let mut script = Script {
        nat: vec![
            delete_form(&prerouting_jump(family)),
            format!("-D OUTPUT ! -d {lo} -m addrtype --dst-type LOCAL -j {CHAIN}"),
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

/// A network's rules of one family, on its subnet of that family (`setupIPTablesInternal`,
/// `setIcc`, `setupInternalNetworkRules` and the isolation rules in Docker). Rules go to the
/// top of their chains, newest network first, except the `--icc=false` DROP, which Docker
/// appends; then the USER and ISOLATION jumps are moved back above them, as Docker does. An
/// internal network gets only its isolation and icc rules: nothing routes in or out of it.
fn network_rules(net: &NetworkSpec, subnet: IpNet) -> Script {
    let br = &net.bridge;
    let mut s = Script::default();
    if net.masquerade && !net.internal {
        s.nat.push(format!(
            "-I POSTROUTING -s {subnet} ! -o {br} -j MASQUERADE"
        ));
    }

    s.filter.push(if net.icc {
        format!("-I FORWARD -i {br} -o {br} -j ACCEPT")
    } else {
        format!("-A FORWARD -i {br} -o {br} -j DROP")
    });
    // Neighbour discovery is IPv6's ARP, but unlike ARP iptables sees it between containers
    // (br_netfilter): --icc=false would keep links from opening, and an internal network's
    // isolation (to solicited-node multicast, not the subnet) its containers from each other.
    let ndp = |then: &str| {
        ["neighbour-solicitation", "neighbour-advertisement"].map(|kind| {
            format!("-i {br} -o {br} -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j {then}")
        })
    };
    let ipv6 = matches!(subnet, IpNet::V6(_));
    if ipv6 && !net.icc {
        s.filter
            .extend(ndp("ACCEPT").map(|rule| format!("-I FORWARD {rule}")));
    }
    if net.internal {
        s.filter
            .push(format!("-I {ISOLATION_1} ! -d {subnet} -i {br} -j DROP"));
        s.filter
            .push(format!("-I {ISOLATION_1} ! -s {subnet} -o {br} -j DROP"));
        if ipv6 {
            s.filter
                .extend(ndp("RETURN").map(|rule| format!("-I {ISOLATION_1} {rule}")));
        }
        return s;
    }
    s.filter
        .push(format!("-I FORWARD -i {br} ! -o {br} -j ACCEPT"));
    s.filter.push(format!("-I FORWARD -o {br} -j {CHAIN}"));
    s.filter.push(format!(
        "-I FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    ));
    s.filter.push(format!(
        "-I {ISOLATION_1} -i {br} ! -o {br} -j {ISOLATION_2}"
    ));
    s.filter.push(format!("-I {ISOLATION_2} -o {br} -j DROP"));
    if net.masquerade {
        // What Docker's FORWARD policy DROP does to new flows routed straight to a container,
        // without changing the host's policy; only where masquerading, as the eBPF datapath.
        s.filter.push(format!("-A FORWARD -o {br} -j DROP"));
        // The subnet's source from anywhere but the bridge is spoofed: MASQUERADE (any way
        // in) would start a flow in a container's name and let its answers in. Docker has no
        // such rule; the eBPF datapath drops these as `martian`.
        s.filter
            .push(format!("-I {ISOLATION_1} -s {subnet} ! -i {br} -j DROP"));
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

/// One published port's rules in `family` (`Forward` in Docker's iptables package): none when
/// the port isn't published in that family (its host address is of the other one, the
/// container has no address in it, or `--publish-allow` names only the other family's
/// ranges: a restricted port opens to no one rather than to everyone).
fn port_rules(net: &NetworkSpec, port: &PortSpec, family: Family) -> Script {
    let cip: IpAddr = match family {
        Family::V4 => port.container_ip.into(),
        Family::V6 => match port.container_ip6 {
            Some(ip) => ip.into(),
            None => return Script::default(),
        },
    };
    // Loopback is the userland proxy's alone: neither jump into netd's chain takes it.
    if port
        .host_ip
        .is_some_and(|ip| Family::of(ip) != family || ip.is_loopback())
    {
        return Script::default();
    }
    let allowed: Vec<&IpNet> = port
        .allow
        .iter()
        .filter(|r| Family::of(r.addr()) == family)
        .collect();
    if !port.allow.is_empty() && allowed.is_empty() {
        return Script::default();
    }
    let br = &net.bridge;
    let p = proto(port.proto);
    // An unspecified address (`0.0.0.0`, `::`) is every address of its family.
    let dst = port
        .host_ip
        .filter(|ip| !ip.is_unspecified())
        .map(|ip| format!("-d {} ", host(ip)))
        .unwrap_or_default();
    let (cport, hport) = (port.container_port, port.host_port);
    let (target, chost) = (socket(cip, cport), host(cip));
    // One DNAT per allowed source range (`--publish-allow`); one from anywhere without.
    let sources: Vec<String> = if allowed.is_empty() {
        vec![String::new()]
    } else {
        allowed.iter().map(|net| format!("-s {net} ")).collect()
    };
    let mut nat: Vec<String> = sources
        .iter()
        .map(|src| {
            format!(
                "-A {CHAIN} {src}{dst}-p {p} -m {p} --dport {hport} -j DNAT --to-destination {target}"
            )
        })
        .collect();
    nat.push(format!(
        "-A POSTROUTING -s {chost} -d {chost} -p {p} -m {p} --dport {cport} -j MASQUERADE"
    ));
    // An internal network's ports serve its own containers (hairpin) and the host: nothing
    // comes in from elsewhere to accept.
    // From the allowed sources only, as the DNAT: routed straight to the container's address,
    // the others would get in all the same.
    let filter = if net.internal {
        vec![]
    } else {
        sources
            .iter()
            .map(|src| {
                format!(
                    "-A {CHAIN} {src}-d {chost} ! -i {br} -o {br} -p {p} -m {p} --dport {cport} -j ACCEPT"
                )
            })
            .collect()
    };
    Script { nat, filter }
}

/// Every family's rules of `ports`, made by `rules` (the rules or their deletions).
fn ports_script(
    net: &NetworkSpec,
    ports: &[PortSpec],
    rules: impl Fn(Script) -> Script,
) -> Vec<(Family, Script)> {
    Family::ALL
        .into_iter()
        .map(|family| {
            let mut script = Script::default();
            for port in ports {
                script.extend(rules(port_rules(net, port, family)));
            }
            (family, script)
        })
        .collect()
}

/// Docker's pair of ACCEPT rules for each port a `--link` opens (`linkContainers`): to the
/// linked container's port, and its replies from it, in each family both ends have an
/// address in. They sit in the chain FORWARD jumps to before the `--icc=false` DROP.
fn link_rules(net: &NetworkSpec, ep: &EndpointSpec, family: Family) -> Script {
    let br = &net.bridge;
    let filter = ep
        .links
        .iter()
        .filter_map(|link| {
            let ends: Option<(IpAddr, IpAddr)> = match family {
                Family::V4 => Some((ep.ip.into(), link.peer.into())),
                Family::V6 => ep.ip6.zip(link.peer6).map(|(a, b)| (a.into(), b.into())),
            };
            ends.map(|(a, b)| (host(a), host(b), link))
        })
        .flat_map(|(a, b, link)| {
            let (port, p) = (link.port, proto(link.proto));
            [
                format!(
                    "-I {CHAIN} -s {a} -d {b} -i {br} -o {br} -p {p} -m {p} --dport {port} -j ACCEPT"
                ),
                format!(
                    "-I {CHAIN} -s {b} -d {a} -i {br} -o {br} -p {p} -m {p} --sport {port} -j ACCEPT"
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
fn link_rules_naming(filter: &str, br: &str, ip: IpAddr) -> Vec<String> {
    let chain = format!("-A {CHAIN} ");
    let bridged = format!(" -i {br} -o {br} ");
    let (src, dst) = (format!("-s {} ", host(ip)), format!("-d {} ", host(ip)));
    filter
        .lines()
        .filter(|l| l.starts_with(&chain) && l.contains(&bridged) && l.ends_with("-j ACCEPT"))
        .filter(|l| l.contains(&src) || l.contains(&dst))
        .map(String::from)
        .collect()
}

/// Every rule of `saved` (an `iptables-save` table) naming bridge `br` as its in or out
/// interface, but in the user's chain (theirs to keep).
fn rules_naming_bridge(saved: &str, br: &str) -> Vec<String> {
    let users = format!("-A {USER} ");
    saved
        .lines()
        .filter(|l| l.starts_with("-A ") && !l.starts_with(&users))
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words
                .windows(2)
                .any(|w| matches!(w[0], "-i" | "-o") && w[1] == br)
        })
        .map(String::from)
        .collect()
}

/// Deletes a network's rules of `family`: those naming its bridge, as the kernel has them
/// rather than as this netd would write them, so a rule deleted by hand fails none of the
/// others, and those an older netd wrote, or a setup killed midway, go too.
fn remove_bridge_rules(family: Family, br: &str) -> Result<()> {
    let deletions = |table| -> Result<Vec<String>> {
        let rules = rules_naming_bridge(&saved(family, table)?, br);
        Ok(rules.iter().map(|rule| delete_form(rule)).collect())
    };
    let script = Script {
        nat: deletions("nat")?,
        filter: deletions("filter")?,
    };
    if script.is_empty() {
        return Ok(());
    }
    restore(family, &script)
}

/// The userland proxies `ports` need (on loopback), on [::1] too if `ipv6_loopback`.
fn proxies_of(ports: &[PortSpec], ipv6_loopback: bool) -> Vec<Proxy> {
    ports
        .iter()
        .flat_map(|p| Proxy::for_port(p, ipv6_loopback))
        .collect()
}

/// Removes the rules of `ports` in every family, each family tried whatever the other did.
fn remove_port_rules(net: &NetworkSpec, ports: &[PortSpec]) -> Vec<String> {
    ports_script(net, ports, |rules| rules.deletions())
        .into_iter()
        .filter(|(_, script)| !script.is_empty())
        .filter_map(|(family, script)| restore(family, &script).err())
        .map(|e| format!("{e:#}"))
        .collect()
}

impl IptablesDatapath {
    pub fn new(proxies: Proxies) -> Self {
        Self { proxies }
    }

    fn ensure_base(&self, family: Family) -> Result<()> {
        if !saved(family, "filter")?.contains(&format!(":{ISOLATION_1} ")) {
            return restore(family, &base_rules(family));
        }
        guard_prerouting(family)
    }

    /// Whether any network still has rules in the isolation chain of `family`.
    fn networks_remain(&self, family: Family) -> Result<bool> {
        let filter = saved(family, "filter")?;
        Ok(filter
            .lines()
            .any(|l| l.starts_with(&format!("-A {ISOLATION_1} ")) && !l.ends_with("-j RETURN")))
    }

    /// Removes the base chains of `family` when no network uses them any more.
    fn remove_base_if_unused(&self, family: Family) -> Result<()> {
        if !self.networks_remain(family)? {
            guard_prerouting(family)?;
            restore(family, &base_removal(family))
                .with_context(|| format!("remove netd's {} chains", family.tool()))?;
        }
        Ok(())
    }
}

impl Datapath for IptablesDatapath {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn setup_network(&self, net: &NetworkSpec) -> Result<()> {
        refuse_conntrack_limit(net.conntrack_limit)?;
        // Container to container on one bridge only crosses iptables with br_netfilter on;
        // --icc=false depends on it. Kernels without br_netfilter have no such sysctl.
        let _ = set_sysctl(None, "net.bridge.bridge-nf-call-iptables", "1");
        if net.subnet6.is_some() {
            let _ = set_sysctl(None, "net.bridge.bridge-nf-call-ip6tables", "1");
        }
        // And only untagged frames do, unless told otherwise: a container's VLAN-tagged frame
        // to its neighbour would be bridged past the --icc=false DROP, and a priority-tagged
        // one (VLAN 0) is taken by the receiving stack as the untagged IPv4 it carries.
        let _ = set_sysctl(None, "net.bridge.bridge-nf-filter-vlan-tagged", "1");
        let mut steps = Vec::new();
        for (family, subnet) in Family::subnets_of(net) {
            self.ensure_base(family)?;
            let mut script = network_rules(net, subnet);
            script.filter.extend(forward_jumps_first());
            steps.push((family, script));
        }
        // The jumps moved first are not undone on failure: they stay in place either way.
        restore_all(&steps)
            .with_context(|| format!("install iptables rules for network {}", net.name))
    }

    fn teardown_network(&self, net: &NetworkSpec) -> Result<()> {
        let mut failed = Vec::new();
        // Its containers' proxies went with their ports; these are any a killed command left.
        if let Err(e) = self.proxies.end_network(net.id) {
            failed.push(format!("{e:#}"));
        }
        for (family, _) in Family::subnets_of(net) {
            // The base chains go when no network uses them, even if this network's rules were
            // never (all) made: a setup that failed or was killed midway leaves them behind.
            let rules = remove_bridge_rules(family, &net.bridge);
            let base = self.remove_base_if_unused(family);
            failed.extend(
                [rules, base]
                    .into_iter()
                    .filter_map(|r| r.err())
                    .map(|e| format!("{e:#}")),
            );
        }
        if !failed.is_empty() {
            bail!(
                "remove iptables rules of network {}: {}",
                net.name,
                failed.join("; ")
            );
        }
        Ok(())
    }

    // Docker writes no rule per container (links aside); the bridge carries them. Without
    // ICC, netd adds ebtables rules for the container's tagged frames.
    fn add_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()> {
        refuse_conntrack_limit(ep.conntrack_limit)?;
        let bridged = bridged_frame_rules(net, ep);
        for (added, rule) in bridged.iter().enumerate() {
            if let Err(e) = ebtables("-A", rule) {
                remove_ebtables_rules(&bridged[..added]);
                return Err(e).context("install ebtables rules for a network without ICC");
            }
        }
        let steps: Vec<(Family, Script)> = Family::ALL
            .into_iter()
            .map(|family| (family, link_rules(net, ep, family)))
            .collect();
        restore_all(&steps)
            .inspect_err(|_| remove_ebtables_rules(&bridged))
            .context("install iptables rules of links")
    }

    /// Removes every link rule naming the endpoint's addresses, on either side: its own links
    /// may be gone from `ep` already (the linked container was removed first), and other
    /// containers' links to it must not pass on to the next container with its address.
    /// Its flows go too. Each address's rules and flows are tried whatever the other's did;
    /// what failed is reported.
    fn remove_endpoint(&self, net: &NetworkSpec, ep: &EndpointSpec) -> Result<()> {
        let ips = [Some(IpAddr::from(ep.ip)), ep.ip6.map(IpAddr::from)];
        let mut failed: Vec<String> = ips
            .into_iter()
            .flatten()
            .flat_map(|ip| {
                [
                    remove_link_rules_naming(&net.bridge, ip),
                    flush_flows_of(ip),
                ]
            })
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        failed.extend(
            bridged_frame_rules(net, ep)
                .iter()
                .filter_map(|rule| remove_ebtables_rule(rule).err().map(|e| format!("{e:#}"))),
        );
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }

    fn publish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()> {
        restore_all(&ports_script(net, ports, |rules| rules))
            .context("install iptables rules for published ports")?;
        if let Err(e) = self
            .proxies
            .start(&proxies_of(ports, proxy::ipv6_loopback()))
        {
            // The proxies started have been ended; the rules go too.
            remove_port_rules(net, ports);
            return Err(e);
        }
        fault::step("publish-proxies");
        Ok(())
    }

    /// Ends the ports' proxies first: from then on their loopback addresses refuse too. Those
    /// on [::1] whether or not the host has IPv6 loopback now (it may have had it).
    fn unpublish(&self, net: &NetworkSpec, ports: &[PortSpec]) -> Result<()> {
        let mut failed: Vec<String> = self
            .proxies
            .end(&proxies_of(ports, true))
            .err()
            .map(|e| format!("{e:#}"))
            .into_iter()
            .collect();
        let rules = remove_port_rules(net, ports);
        if !rules.is_empty() {
            failed.push(format!(
                "remove iptables rules of published ports: {}",
                rules.join("; ")
            ));
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }

    fn reconcile_ports(&self, published: &[PortSpec]) -> Result<Reconciled> {
        self.proxies
            .reconcile(&proxies_of(published, proxy::ipv6_loopback()))
    }

    /// DNAT sends a container's packet to its own published port back where it came from;
    /// Docker's `--userland-proxy=false` sets hairpin mode on its bridge ports for the same.
    fn bridge_hairpin(&self) -> bool {
        true
    }
}

/// The ebtables rules for container `ep`'s frames on a network without ICC (none with ICC):
/// br_netfilter looks behind one tag only, so a frame with two would pass the
/// `-i BR -o BR -j DROP` (and the neighbour's stack strips both and takes the IPv4 behind
/// them): every tagged frame (C-tag, S-tag: the outer one) the container's veth brings to the
/// bridge is dropped, as the eBPF datapath does. On a network without IPv6, whose containers
/// have none and which no ip6tables rule looks at, so is every IPv6 frame: a crafted one
/// would reach a neighbour's IPv6 sockets (its link-local multicast above all).
fn bridged_frame_rules(net: &NetworkSpec, ep: &EndpointSpec) -> Vec<String> {
    if net.icc {
        return vec![];
    }
    // By number: the names come from /etc/ethertypes, which a host may lack.
    let ipv6 = net.subnet6.is_none().then_some("0x86dd");
    ["0x8100", "0x88a8"]
        .into_iter()
        .chain(ipv6)
        .map(|proto| format!("FORWARD -i {} -p {proto} -j DROP", ep.host_ifname))
        .collect()
}

/// Runs `ebtables ACTION RULE` in the host namespace.
fn ebtables(action: &str, rule: &str) -> Result<()> {
    let out = Command::new("ebtables")
        .arg(action)
        .args(rule.split(' '))
        .stdin(Stdio::null())
        .output()
        .context("run ebtables (is iptables installed?)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "ebtables {action} {rule}: {}",
            err.lines().next().unwrap_or("").trim()
        );
    }
    Ok(())
}

/// Removes ebtables `rule`; one that isn't there (never added: a create that failed first;
/// or removed before) is fine (ebtables-nft's words, then ebtables-legacy's).
fn remove_ebtables_rule(rule: &str) -> Result<()> {
    match ebtables("-D", rule) {
        Err(e)
            if ["does a matching rule exist", "rule does not exist"]
                .iter()
                .any(|gone| format!("{e:#}").contains(gone)) =>
        {
            Ok(())
        }
        done => done,
    }
}

/// Undoes `rules` after a failure (best effort: the failure is what gets reported).
fn remove_ebtables_rules(rules: &[String]) {
    for rule in rules {
        let _ = remove_ebtables_rule(rule);
    }
}

/// Removes the link rules on bridge `br` naming `ip`.
fn remove_link_rules_naming(br: &str, ip: IpAddr) -> Result<()> {
    let family = Family::of(ip);
    let stale = link_rules_naming(&saved(family, "filter")?, br, ip);
    if stale.is_empty() {
        return Ok(());
    }
    let script = Script {
        nat: vec![],
        filter: stale.iter().map(|rule| delete_form(rule)).collect(),
    };
    restore(family, &script).context("remove iptables rules of links")
}

/// Deletes the kernel's conntrack entries of the flows from or to `ip` (Docker's
/// `clearEndpointConnections`): a flow through a published port outlives the port's rules,
/// and would go on to the next container given the address. Without the `conntrack` tool
/// it warns and leaves them.
fn flush_flows_of(ip: IpAddr) -> Result<()> {
    let family = match ip {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    };
    // The original source is the container's for flows it started; the reply source, for
    // flows to it (published ports included).
    for side in ["--orig-src", "--reply-src"] {
        let run = Command::new("conntrack")
            .args(["-D", "-f", family, side, &ip.to_string()])
            .stdout(Stdio::null())
            .output();
        let out = match run {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!(
                    "netd: warning: no conntrack tool: the flows of {ip} stay until they time out"
                );
                return Ok(());
            }
            Err(e) => return Err(e).context("run conntrack"),
        };
        let err = String::from_utf8_lossy(&out.stderr);
        // It fails saying so when there was nothing to delete.
        if !out.status.success() && !err.contains(" 0 flow entries") {
            bail!(
                "conntrack -D {side} {ip}: {}",
                err.lines().next().unwrap_or("").trim()
            );
        }
    }
    Ok(())
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

    #[test]
    fn a_networks_rules_are_those_naming_its_bridge_but_in_the_users_chain() {
        let saved = "*filter\n\
            :FORWARD ACCEPT [0:0]\n\
            -A FORWARD -j NETD-USER\n\
            -A FORWARD -o netd-br1 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
            -A FORWARD -i netd-br1 ! -o netd-br1 -j ACCEPT\n\
            -A FORWARD -o netd-br10 -j DROP\n\
            -A NETD -d 10.0.0.2/32 ! -i netd-br1 -o netd-br1 -p tcp -m tcp --dport 80 -j ACCEPT\n\
            -A NETD-USER -i netd-br1 -j DROP\n\
            COMMIT\n";
        assert_eq!(
            rules_naming_bridge(saved, "netd-br1"),
            [
                "-A FORWARD -o netd-br1 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A FORWARD -i netd-br1 ! -o netd-br1 -j ACCEPT",
                "-A NETD -d 10.0.0.2/32 ! -i netd-br1 -o netd-br1 -p tcp -m tcp --dport 80 -j ACCEPT",
            ]
        );
    }

    fn net() -> NetworkSpec {
        NetworkSpec {
            id: 1,
            name: "bridge".into(),
            bridge: "netd0".into(),
            subnet: "172.17.0.0/16".parse().unwrap(),
            gateway: "172.17.0.1".parse().unwrap(),
            subnet6: Some("fd00:17::/64".parse().unwrap()),
            gateway6: Some("fd00:17::1".parse().unwrap()),
            icc: true,
            internal: false,
            masquerade: true,
            conntrack_limit: None,
        }
    }

    fn port() -> PortSpec {
        PortSpec {
            network_id: 1,
            proto: Protocol::Tcp,
            host_ip: None,
            host_port: 8080,
            container_ip: "172.17.0.2".parse().unwrap(),
            container_ip6: Some("fd00:17::2".parse().unwrap()),
            container_port: 80,
            allow: vec![],
        }
    }

    #[test]
    fn published_port_rules_match_docker() {
        let s = port_rules(&net(), &port(), Family::V4);
        assert_eq!(
            s.nat,
            [
                "-A NETD -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80",
                "-A POSTROUTING -s 172.17.0.2/32 -d 172.17.0.2/32 -p tcp -m tcp --dport 80 -j MASQUERADE",
            ]
        );
        assert_eq!(
            s.filter,
            ["-A NETD -d 172.17.0.2/32 ! -i netd0 -o netd0 -p tcp -m tcp --dport 80 -j ACCEPT"]
        );
        let s = port_rules(&net(), &port(), Family::V6);
        assert_eq!(
            s.nat,
            [
                "-A NETD -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:17::2]:80",
                "-A POSTROUTING -s fd00:17::2/128 -d fd00:17::2/128 -p tcp -m tcp --dport 80 -j MASQUERADE",
            ]
        );
    }

    #[test]
    fn a_port_is_published_only_in_the_families_it_names() {
        let mut on_v6 = port();
        on_v6.host_ip = Some("2001:2::2".parse().unwrap());
        assert!(port_rules(&net(), &on_v6, Family::V4).is_empty());
        assert!(port_rules(&net(), &on_v6, Family::V6).nat[0].contains("-d 2001:2::2/128 "));
        let mut v4_only = port();
        v4_only.container_ip6 = None;
        assert!(port_rules(&net(), &v4_only, Family::V6).is_empty());
        // A restricted port opens to the listed ranges only: to no one in a family with none.
        let mut restricted = port();
        restricted.allow = vec!["198.18.0.0/24".parse().unwrap()];
        assert!(port_rules(&net(), &restricted, Family::V6).is_empty());
        // An unspecified address: every address of its family, and none of the other.
        let mut any4 = port();
        any4.host_ip = Some("0.0.0.0".parse().unwrap());
        assert!(port_rules(&net(), &any4, Family::V4).nat[0].starts_with("-A NETD -p tcp "));
        assert!(port_rules(&net(), &any4, Family::V6).is_empty());
        let v4 = port_rules(&net(), &restricted, Family::V4);
        assert!(
            v4.nat[0].starts_with("-A NETD -s 198.18.0.0/24 "),
            "{}",
            v4.nat[0]
        );
    }

    #[test]
    fn link_rules_match_docker() {
        let ep = EndpointSpec {
            network_id: 1,
            container: "client".into(),
            ip: "172.17.0.3".parse().unwrap(),
            ip6: Some("fd00:17::3".parse().unwrap()),
            mac: [0x02, 0x42, 172, 17, 0, 3],
            host_ifname: "veth0000001".into(),
            host_ifindex: 7,
            links: vec![super::super::LinkSpec {
                peer: "172.17.0.2".parse().unwrap(),
                peer6: Some("fd00:17::2".parse().unwrap()),
                proto: Protocol::Tcp,
                port: 80,
            }],
            conntrack_limit: None,
        };
        assert_eq!(
            link_rules(&net(), &ep, Family::V4).filter,
            [
                "-I NETD -s 172.17.0.3/32 -d 172.17.0.2/32 -i netd0 -o netd0 -p tcp -m tcp --dport 80 -j ACCEPT",
                "-I NETD -s 172.17.0.2/32 -d 172.17.0.3/32 -i netd0 -o netd0 -p tcp -m tcp --sport 80 -j ACCEPT",
            ]
        );
        assert_eq!(
            link_rules(&net(), &ep, Family::V6).filter[0],
            "-I NETD -s fd00:17::3/128 -d fd00:17::2/128 -i netd0 -o netd0 -p tcp -m tcp --dport 80 -j ACCEPT"
        );
    }

    #[test]
    fn deletions_reverse_and_delete() {
        let s = network_rules(&net(), net().subnet.into()).deletions();
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
        let s = network_rules(&n, n.subnet.into());
        assert!(!s.nat.iter().any(|r| r.contains("MASQUERADE")));
        assert!(s.filter.contains(
            &"-I NETD-ISOLATION-STAGE-1 ! -s 172.17.0.0/16 -o netd0 -j DROP".to_string()
        ));
        assert!(
            s.filter
                .contains(&"-A FORWARD -i netd0 -o netd0 -j DROP".to_string())
        );
    }
}
