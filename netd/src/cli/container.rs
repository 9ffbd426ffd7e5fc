//! `netd container create/rm/ls/inspect`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{Result, bail};
use clap::Subcommand;
use ipnet::IpNet;

use super::{Global, views};
use crate::core::{
    ipam, ports,
    spec::{Attachment, ContainerSpec, Link, Mode, Netns},
};

// Parsed once per process: the size of the biggest variant doesn't matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum ContainerCommand {
    /// Create a container's network: a namespace (or an existing one) joined to a network.
    Create(CreateArgs),
    /// Remove a container's network.
    Rm { name: String },
    /// List containers.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show a container as JSON.
    Inspect { name: String },
}

/// `netd container create` as typed.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    pub name: String,
    /// A network name, or host, none, container:OTHER.
    #[arg(long, default_value = "bridge")]
    pub network: String,
    /// Configure this existing network namespace instead of making one.
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Configure the network namespace of this process instead of making one.
    #[arg(long)]
    pub pid: Option<u32>,
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
    /// The IPv6 address on a dual-stack network.
    #[arg(long)]
    pub ip6: Option<Ipv6Addr>,
    #[arg(long)]
    pub mac: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    #[arg(long)]
    pub dns: Vec<IpAddr>,
    #[arg(long)]
    pub dns_search: Vec<String>,
    /// HOST:IP
    #[arg(long = "add-host")]
    pub add_hosts: Vec<String>,
    /// OTHER[:ALIAS]
    #[arg(long = "link")]
    pub links: Vec<String>,
    /// [IP:]HOSTPORT[-END]:CPORT[-END][/tcp|/udp]; an IPv6 IP in brackets, [::1]:8080:80
    #[arg(short = 'p', long)]
    pub publish: Vec<String>,
    /// Publish every --expose'd port on a free host port.
    #[arg(short = 'P', long)]
    pub publish_all: bool,
    /// Published ports accept new connections only from this source range (repeatable;
    /// from anywhere when not given).
    #[arg(long, value_name = "CIDR")]
    pub publish_allow: Vec<IpNet>,
    /// PORT[-END][/tcp|/udp]
    #[arg(long)]
    pub expose: Vec<String>,
    /// The most connections (tracked flows) the container may have; new ones over it are
    /// dropped (eBPF datapath).
    #[arg(long, value_name = "FLOWS")]
    pub conntrack_limit: Option<u32>,
}

impl CreateArgs {
    /// The spec these arguments ask for.
    pub fn spec(self) -> Result<ContainerSpec> {
        let netns = match (self.netns, self.pid) {
            (Some(_), Some(_)) => bail!("--netns and --pid are alternatives: give one"),
            (Some(path), None) => Netns::Path(path),
            (None, Some(pid)) => Netns::Pid(pid),
            (None, None) => Netns::Own,
        };
        // Checked after `mode` took it (a bridge attachment's).
        let publish_allow = !self.publish_allow.is_empty();
        let mode = match Mode::without_network(&self.network) {
            Some(mode) => mode,
            None => match self.network.strip_prefix("container:") {
                Some(c) => Mode::Container(c.to_string()),
                None => Mode::Bridge(Attachment {
                    network: self.network.clone(),
                    ip: self.ip,
                    ip6: self.ip6,
                    mac: self.mac.as_deref().map(ipam::parse_mac).transpose()?,
                    ifname: None,
                    publish: self
                        .publish
                        .iter()
                        .map(|p| ports::parse_publish(p))
                        .collect::<Result<_>>()?,
                    publish_all: self.publish_all,
                    publish_allow: self.publish_allow,
                    conntrack_limit: self.conntrack_limit,
                }),
            },
        };
        if !matches!(mode, Mode::Bridge(_)) {
            if !self.publish.is_empty() || self.publish_all || publish_allow {
                bail!(
                    "published ports (and --publish-allow) need a bridge network, not --network {}",
                    self.network
                );
            }
            if self.ip.is_some() || self.ip6.is_some() || self.mac.is_some() {
                bail!(
                    "--ip, --ip6 and --mac need a bridge network, not --network {}",
                    self.network
                );
            }
            if self.conntrack_limit.is_some() {
                bail!(
                    "--conntrack-limit needs a bridge network, not --network {}",
                    self.network
                );
            }
        }
        let spec = ContainerSpec {
            name: self.name,
            mode,
            netns,
            hostname: self.hostname,
            dns: self.dns,
            dns_search: self.dns_search,
            add_hosts: self
                .add_hosts
                .iter()
                .map(|h| parse_add_host(h))
                .collect::<Result<_>>()?,
            links: self.links.iter().map(|l| parse_link(l)).collect(),
            expose: self
                .expose
                .iter()
                .map(|e| ports::parse_expose(e))
                .collect::<Result<_>>()?,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// `--add-host HOST:IP`.
fn parse_add_host(spec: &str) -> Result<(String, IpAddr)> {
    // Split at the first colon: a host name has none, an IPv6 address several.
    let (host, ip) = spec
        .split_once(':')
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("invalid --add-host {spec:?}: expected HOST:IP"))?;
    let ip = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid --add-host {spec:?}: {ip:?} is not an IP address"))?;
    Ok((host.to_string(), ip))
}

/// `--link OTHER[:ALIAS]`.
fn parse_link(spec: &str) -> Link {
    let (container, alias) = spec.split_once(':').unwrap_or((spec, spec));
    Link {
        container: container.to_string(),
        alias: alias.to_string(),
    }
}

pub async fn run(global: &Global, cmd: ContainerCommand) -> Result<()> {
    match cmd {
        ContainerCommand::Create(args) => {
            let spec = args.spec()?;
            let c = global.controller()?.create_container(spec).await?;
            print!("{}", views::container_created(&c));
        }
        ContainerCommand::Rm { name } => {
            global.controller()?.remove_container(&name).await?;
            println!("{name}");
        }
        ContainerCommand::Ls { json } => views::container_ls(&mut global.controller()?, json)?,
        ContainerCommand::Inspect { name } => {
            views::container_inspect(&mut global.controller()?, &name)?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn spec(args: &[&str]) -> Result<ContainerSpec> {
        Cli::try_parse_from([&["x"], args].concat())
            .unwrap()
            .args
            .spec()
    }

    #[test]
    fn parses_every_mode() {
        let s = spec(&[
            "c",
            "--network",
            "n",
            "--ip",
            "10.0.0.5",
            "-p",
            "80",
            "--mac",
            "02:42:00:00:00:01",
        ])
        .unwrap();
        let Mode::Bridge(at) = s.mode else { panic!() };
        assert_eq!((at.network.as_str(), at.publish.len()), ("n", 1));
        assert_eq!(at.mac, Some([2, 0x42, 0, 0, 0, 1]));
        assert_eq!(spec(&["c", "--network", "host"]).unwrap().mode, Mode::Host);
        assert_eq!(
            spec(&["c", "--network", "container:o"]).unwrap().mode,
            Mode::Container("o".into())
        );
        let s = spec(&["c", "--network", "none", "--pid", "7", "--link", "a:b"]).unwrap();
        assert_eq!(s.netns, Netns::Pid(7));
        assert_eq!(s.links[0].alias, "b");
        let s = spec(&[
            "c",
            "--ip6",
            "fd00::5",
            "--add-host",
            "v6:fd00::9",
            "--add-host",
            "v4:10.0.0.9",
            "--dns",
            "2001:db8::53",
        ])
        .unwrap();
        let Mode::Bridge(at) = s.mode else { panic!() };
        assert_eq!(at.ip6, Some("fd00::5".parse().unwrap()));
        assert_eq!(s.add_hosts[0], ("v6".into(), "fd00::9".parse().unwrap()));
        assert_eq!(s.add_hosts[1], ("v4".into(), "10.0.0.9".parse().unwrap()));
        assert_eq!(s.dns, ["2001:db8::53".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn refuses_in_one_line() {
        for (args, why) in [
            (
                &["c", "--network", "none", "-p", "80"][..],
                "need a bridge network",
            ),
            (
                &["c", "--network", "host", "--ip", "10.0.0.1"],
                "--ip, --ip6 and --mac",
            ),
            (
                &["c", "--network", "none", "--ip6", "fd00::2"],
                "--ip, --ip6 and --mac",
            ),
            (&["c", "-p", "[::1]:80"], "expected [IPV6]"),
            (
                &["c", "--network", "none", "--conntrack-limit", "5"],
                "--conntrack-limit needs a bridge network",
            ),
            (&["c", "--netns", "/x", "--pid", "1"], "alternatives"),
            (&["c", "--add-host", "nocolon"], "HOST:IP"),
            (&["c", "--mac", "zz"], "MAC"),
            (&["c", "--expose", "0"], "not in 1-65535"),
            (&["bad/name"], "invalid container name"),
        ] {
            let err = format!("{:#}", spec(args).unwrap_err());
            assert!(err.contains(why) && !err.contains('\n'), "{args:?}: {err}");
        }
    }
}
