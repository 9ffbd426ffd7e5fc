//! What a front end asks the core for, typed and validated: every string a user typed has been
//! parsed by the time one of these exists (the CLI, the daemon's API and the engine plugins
//! each parse their own input into them), and `validate` checks what parsing alone can't.
//! Nothing here touches the kernel or the store.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Result, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

pub use crate::{
    core::ports::Publish,
    datapath::{DatapathKind, Protocol},
};

/// Docker's default network: created on first use.
pub const DEFAULT_NETWORK: &str = "bridge";
pub const DEFAULT_BRIDGE: &str = "netd0";
pub const DEFAULT_MTU: u32 = 1500;
/// The name of a container's end of its veth unless asked otherwise (Docker's, the runtimes').
pub const DEFAULT_IFNAME: &str = "eth0";
/// Linux's limit on interface names (IFNAMSIZ less the NUL).
pub const MAX_IFNAME: usize = 15;

/// A network to create. In JSON, every field but `name` may be left out (Docker's defaults).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkSpec {
    pub name: String,
    /// `None`: the first free private /16 or /20.
    pub subnet: Option<Ipv4Net>,
    /// `None`: the subnet's first host.
    pub gateway: Option<Ipv4Addr>,
    /// Where container addresses come from; `None`: the whole subnet.
    pub ip_range: Option<Ipv4Net>,
    /// Dual-stack (`--ipv6`): containers get an IPv6 address too.
    pub ipv6: bool,
    /// The IPv6 subnet; `None` with `ipv6`: a ULA /64 that overlaps nothing.
    pub subnet6: Option<Ipv6Net>,
    /// `None`: the IPv6 subnet's first host.
    pub gateway6: Option<Ipv6Addr>,
    /// `None`: netd0 for `bridge`, netd-brN otherwise.
    pub bridge: Option<String>,
    pub mtu: u32,
    pub icc: bool,
    pub internal: bool,
    pub masquerade: bool,
    /// Default host address of published ports; every address when `None`.
    pub host_ip: Option<Ipv4Addr>,
    /// The most flows its containers may have together (`--conntrack-limit`).
    pub conntrack_limit: Option<u32>,
    pub datapath: DatapathKind,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self::named("")
    }
}

impl NetworkSpec {
    /// A network with Docker's defaults.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            subnet: None,
            gateway: None,
            ip_range: None,
            ipv6: false,
            subnet6: None,
            gateway6: None,
            bridge: None,
            mtu: DEFAULT_MTU,
            icc: true,
            internal: false,
            masquerade: true,
            host_ip: None,
            conntrack_limit: None,
            datapath: DatapathKind::default(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_name("network", &self.name)?;
        // `--network host` and `--network none` name modes: such a network could never be
        // joined.
        if Mode::without_network(&self.name).is_some() {
            bail!(
                "invalid network name {:?}: reserved for `container create --network {}`",
                self.name,
                self.name
            );
        }
        if let Some(bridge) = &self.bridge {
            validate_ifname(bridge)?;
        }
        if let Some(subnet) = self.subnet {
            crate::core::ipam::check_subnet(subnet.into())?;
        }
        if !(68..=65535).contains(&self.mtu) {
            bail!("invalid MTU {}: must be 68-65535", self.mtu);
        }
        self.validate_ipv6()
    }

    fn validate_ipv6(&self) -> Result<()> {
        if !self.ipv6 {
            if let Some(subnet6) = self.subnet6 {
                bail!("IPv6 subnet {subnet6} needs --ipv6");
            }
            if let Some(gateway6) = self.gateway6 {
                bail!("IPv6 gateway {gateway6} needs --ipv6");
            }
            return Ok(());
        }
        if let Some(subnet6) = self.subnet6 {
            crate::core::ipam::check_subnet(subnet6.into())?;
        }
        if self.mtu < 1280 {
            bail!("invalid MTU {} for IPv6: must be at least 1280", self.mtu);
        }
        Ok(())
    }
}

/// Where a container's network namespace comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Netns {
    /// netd makes one named after the container (and removes it with the container).
    #[default]
    Own,
    /// An existing namespace file.
    Path(PathBuf),
    /// The namespace of a running process.
    Pid(u32),
}

/// How a container gets its network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Its own namespace with a veth on a netd network.
    Bridge(Attachment),
    /// The host's namespace.
    Host,
    /// Its own namespace, loopback only.
    None,
    /// Another container's namespace.
    Container(String),
}

impl Mode {
    /// The mode `--network NAME` names without a network (`host`, `none`): no network may
    /// take these names.
    pub fn without_network(name: &str) -> Option<Self> {
        match name {
            "host" => Some(Self::Host),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// A container's place on a bridge network.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Attachment {
    pub network: String,
    /// `None`: the pool's lowest free address.
    pub ip: Option<Ipv4Addr>,
    /// On a dual-stack network; `None`: the IPv6 pool's lowest free address.
    pub ip6: Option<Ipv6Addr>,
    /// `None`: Docker's MAC for the address.
    pub mac: Option<[u8; 6]>,
    /// The container end's name in its namespace; `None`: [`DEFAULT_IFNAME`]. A namespace
    /// on several networks (a CNI runtime's `eth1`, ...) has one endpoint per name.
    pub ifname: Option<String>,
    pub publish: Vec<Publish>,
    /// `-P`: publish every exposed port on a free host port.
    pub publish_all: bool,
    /// Published ports accept new flows only from these ranges (any when empty); a family
    /// with no range here accepts none once any range is given.
    pub publish_allow: Vec<IpNet>,
    /// The most flows the container may have (`--conntrack-limit`).
    #[serde(default)]
    pub conntrack_limit: Option<u32>,
}

impl Attachment {
    pub fn on(network: &str) -> Self {
        Self {
            network: network.to_string(),
            ..Self::default()
        }
    }
}

/// A `--link OTHER[:ALIAS]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub container: String,
    pub alias: String,
}

/// A container to create. In JSON, every field but `name` may be left out (a namespace of
/// its own on the default network).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerSpec {
    pub name: String,
    pub mode: Mode,
    pub netns: Netns,
    /// `None`: the container's name.
    pub hostname: Option<String>,
    pub dns: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub add_hosts: Vec<(String, IpAddr)>,
    pub links: Vec<Link>,
    /// `--expose`d ports: what `-P` publishes and a `--link` to the container opens.
    pub expose: Vec<Publish>,
}

impl Default for ContainerSpec {
    fn default() -> Self {
        Self::named("")
    }
}

impl ContainerSpec {
    /// A container on the default network, in a namespace of its own.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_string(),
            mode: Mode::Bridge(Attachment::on(DEFAULT_NETWORK)),
            netns: Netns::Own,
            hostname: None,
            dns: vec![],
            dns_search: vec![],
            add_hosts: vec![],
            links: vec![],
            expose: vec![],
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_name("container", &self.name)?;
        // Each is written into the container's /etc files, one per line or word.
        let names = self.hostname.iter().map(|h| ("--hostname", h));
        let names = names.chain(self.dns_search.iter().map(|d| ("--dns-search", d)));
        let names = names.chain(self.add_hosts.iter().map(|(h, _)| ("--add-host", h)));
        let names = names.chain(self.links.iter().map(|l| ("--link alias", &l.alias)));
        for (what, name) in names {
            validate_host_name(what, name)?;
        }
        if let Mode::Bridge(at) = &self.mode {
            for range in &at.publish_allow {
                crate::core::ipam::check_no_host_bits("--publish-allow", *range)?;
            }
        }
        match (&self.mode, &self.netns) {
            (Mode::Host | Mode::Container(_), Netns::Path(_) | Netns::Pid(_)) => {
                bail!(
                    "--netns and --pid need their own namespace, not --network host or container:"
                )
            }
            (Mode::Container(other), _) if other == &self.name => {
                bail!("container {:?} can't share its own namespace", self.name)
            }
            (
                Mode::Bridge(Attachment {
                    ifname: Some(name), ..
                }),
                _,
            ) => validate_ifname(name),
            _ => Ok(()),
        }
    }
}

/// One published port (a `-p` range is one entry per port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub proto: Protocol,
    /// `None`: every host address (of both families on a dual-stack network).
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
}

/// Addresses for the two ends of `netd link A B`: each end gets its container's own address
/// when it has one; these are for containers without one (`--network none`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkAddrs {
    pub a: Option<Ipv4Addr>,
    pub b: Option<Ipv4Addr>,
}

/// Checks a name for a network or container: what Docker accepts, and short enough for a
/// namespace file name.
pub fn validate_name(kind: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        bail!(
            "invalid {kind} name {name:?}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        );
    }
    Ok(())
}

/// Checks a host or domain name (`what` says which option gave it): dot-separated labels of
/// letters, digits, '-' and '_', at most 253 characters (RFC 1123, with Docker's underscores).
pub fn validate_host_name(what: &str, name: &str) -> Result<()> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        bail!(
            "invalid {what} {name:?}: a host name is dot-separated labels of letters, digits, '-' and '_'"
        );
    }
    Ok(())
}

/// Checks an interface name as the kernel does (`dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_IFNAME
        || name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
    {
        bail!(
            "invalid interface name {name:?}: must be 1-{MAX_IFNAME} bytes, not . or .., without '/', ':' or whitespace"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_labels_and_nothing_else() {
        for good in ["db", "web-1.example.com", "a_b", "x1"] {
            assert!(validate_host_name("--hostname", good).is_ok(), "{good}");
        }
        let long_label = "x".repeat(64);
        for bad in [
            "",
            "a b",
            "a\nnameserver 6.6.6.6",
            "a..b",
            ".a",
            "bad!",
            &long_label,
        ] {
            assert!(validate_host_name("--hostname", bad).is_err(), "{bad:?}");
        }
        let spec = ContainerSpec {
            dns_search: vec!["x\nnameserver 6.6.6.6".into()],
            ..ContainerSpec::named("c")
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.starts_with("invalid --dns-search"), "{err}");
    }

    #[test]
    fn host_and_none_are_no_network_names() {
        for name in ["host", "none"] {
            let err = NetworkSpec {
                name: name.into(),
                ..NetworkSpec::default()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(err.contains("reserved"), "{err}");
        }
    }

    #[test]
    fn names_and_interfaces() {
        assert!(validate_name("network", "web-1.a_b").is_ok());
        for bad in ["", "-x", "a/b", &"x".repeat(65)] {
            assert!(validate_name("network", bad).is_err(), "{bad}");
        }
        assert!(validate_ifname("netd-br1").is_ok());
        for bad in ["sixteen-letters!", "", ".", "..", "a/b", "a:b", "a\tb"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn network_spec_checks_mtu_and_subnet() {
        let mut spec = NetworkSpec::named("n");
        assert!(spec.validate().is_ok());
        spec.mtu = 67;
        assert!(spec.validate().unwrap_err().to_string().contains("MTU 67"));
        spec.mtu = 1500;
        spec.subnet = Some("10.0.0.0/31".parse().unwrap());
        assert!(spec.validate().is_err());
    }

    #[test]
    fn network_spec_checks_ipv6() {
        let mut spec = NetworkSpec::named("n6");
        spec.subnet6 = Some("fd00:60::/64".parse().unwrap());
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("needs --ipv6")
        );
        spec.ipv6 = true;
        // Masquerading dual-stack networks on either datapath (NAT66 on the eBPF one).
        assert_eq!(spec.datapath, DatapathKind::Ebpf);
        assert!(spec.masquerade && !spec.internal);
        assert!(spec.validate().is_ok());
        spec.datapath = DatapathKind::Iptables;
        assert!(spec.validate().is_ok());
        spec.subnet6 = Some("fd00:60::1/64".parse().unwrap());
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("host bits")
        );
        spec.subnet6 = None;
        spec.mtu = 1279;
        assert!(spec.validate().unwrap_err().to_string().contains("1280"));
    }

    #[test]
    fn container_spec_refuses_a_foreign_namespace_in_host_mode() {
        let mut spec = ContainerSpec::named("c");
        spec.mode = Mode::Host;
        spec.netns = Netns::Pid(1);
        assert!(spec.validate().is_err());
        spec.mode = Mode::Container("c".into());
        spec.netns = Netns::Own;
        assert!(spec.validate().is_err());
    }
}
