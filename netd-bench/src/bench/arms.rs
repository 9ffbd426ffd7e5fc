//! The benchmark's arms. Each is built fresh in its own sandbox for every round and removed
//! after it: `ceiling` (a plain veth pair), `routed` (plain kernel routing through a host
//! namespace: the floor of any path that crosses the host), `redirect` (routed's topology
//! forwarded by the least an eBPF program can do: the bound of any eBPF datapath there), netd
//! with each datapath (the eBPF one twice: TC only, and with the uplink's XDP program), and a
//! real Docker.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::OnceLock,
};

use anyhow::{Context as _, Result};

use super::{
    Family, Path,
    docker::{Dockerd, Protocol},
    keepalive::KEEPALIVE_PORT,
    tools::{CRR_PORT, Endpoint, IPERF_PORT, PUBLISH_SHIFT, SOCKPERF_PORT},
};
use netd::{
    netlink::{Netlink, set_sysctl},
    netns,
};
use netd_bench_ebpf::Route;
use netd_testkit::{
    HOST_ADDR, HOST_ADDR6, Instance, OUTSIDE_ADDR, OUTSIDE_ADDR6,
    cleanup::Cleanup,
    sandbox::{OUTSIDE_LINK, Sandbox, UPLINK, enable_ipv6_on},
    traffic::try_output_in,
};

/// Every arm the benchmark runs by default, in the order it alternates them. One more,
/// `baseline`, runs when a baseline binary is given ([`set_baseline`]).
pub const ARMS: &[&str] = &[
    "ceiling", "routed", "redirect", "ebpf", "ebpf-xdp", "iptables", "docker",
];

/// The arm of another netd build (`--baseline BIN`): the eBPF datapath, driven by that binary.
pub const BASELINE: &str = "baseline";

static BASELINE_BIN: OnceLock<PathBuf> = OnceLock::new();

/// Names the netd binary the `baseline` arm drives: another build of netd (an earlier
/// commit's), measured beside this one in the same run.
pub fn set_baseline(bin: PathBuf) -> Result<()> {
    anyhow::ensure!(bin.is_file(), "baseline {}: no such file", bin.display());
    BASELINE_BIN
        .set(bin)
        .map_err(|_| anyhow::anyhow!("the baseline binary is already set"))
}

/// The netd options an arm runs with (`None`: not a netd arm). `iptables-legacy` and
/// `iptables-nft` are the iptables arm with one backend named (`iptables` takes the
/// machine's default, nft on Debian); the scaling measurement runs both.
fn netd_options(arm: &str) -> Option<&'static [&'static str]> {
    match arm {
        "ebpf" | BASELINE => Some(&["--datapath", "ebpf"]),
        "ebpf-xdp" => Some(&["--datapath", "ebpf", "--uplink-xdp"]),
        "iptables" | "iptables-legacy" | "iptables-nft" => Some(&["--datapath", "iptables"]),
        _ => None,
    }
}

/// The iptables backend an arm names: `legacy` (x_tables) or `nft` (nf_tables).
pub fn iptables_backend(arm: &str) -> Option<&'static str> {
    arm.strip_prefix("iptables-").and_then(|b| match b {
        "legacy" => Some("legacy"),
        "nft" => Some("nft"),
        _ => None,
    })
}

/// A directory to put first on netd's PATH, where `iptables`, `iptables-save` and
/// `iptables-restore` are `backend`'s (what update-alternatives would switch machine-wide).
fn backend_bin_dir(dir: &std::path::Path, backend: &str) -> Result<std::ffi::OsString> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for tool in ["iptables", "iptables-save", "iptables-restore"] {
        let real = format!(
            "/usr/sbin/{}",
            tool.replacen("iptables", &format!("iptables-{backend}"), 1)
        );
        let link = dir.join(tool);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link)
            .with_context(|| format!("link {} to {real}", link.display()))?;
    }
    let mut path = dir.as_os_str().to_owned();
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    Ok(path)
}

/// Whether the arm has a control plane of its own (ebpf-xdp's is ebpf's: only the uplink's
/// programs differ; the reference arms have none), so scaling and container set-up are
/// measured on it.
pub fn has_own_control_plane(arm: &str) -> bool {
    !matches!(
        arm,
        "ceiling" | "routed" | "redirect" | "ebpf-xdp" | BASELINE
    )
}

/// The subnet of netd's benchmark network and its two containers' addresses.
const SUBNET: &str = "172.30.0.0/22";
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 10);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 11);
/// The same network's IPv6 subnet (unique local) and addresses, in its IPv6 worlds.
const SUBNET6: &str = "fd00:30::/64";
const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0x10);
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0x11);

// The addresses a world of each family uses (an impl of the bench's `Family` kept beside the
// topologies they address).
impl Family {
    /// The sandbox host's uplink address.
    fn host_addr(self) -> IpAddr {
        match self {
            Family::V4 => HOST_ADDR.into(),
            Family::V6 => HOST_ADDR6.into(),
        }
    }

    /// The outside namespace's address (the masquerade path's server).
    fn outside_addr(self) -> IpAddr {
        match self {
            Family::V4 => OUTSIDE_ADDR.into(),
            Family::V6 => OUTSIDE_ADDR6.into(),
        }
    }

    /// The benchmark containers' addresses: server, client.
    fn container_addrs(self) -> [IpAddr; 2] {
        match self {
            Family::V4 => [SERVER_IP.into(), CLIENT_IP.into()],
            Family::V6 => [SERVER_IP6.into(), CLIENT_IP6.into()],
        }
    }

    /// The route to everything.
    fn default_route(self) -> ipnet::IpNet {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
        .parse()
        .expect("a default route")
    }

    /// The sysctl that makes a namespace route this family.
    fn forwarding_sysctl(self) -> &'static str {
        match self {
            Family::V4 => "net.ipv4.ip_forward",
            Family::V6 => "net.ipv6.conf.all.forwarding",
        }
    }

    /// What lists a namespace's netfilter rules of this family.
    fn rules_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
}

/// What the kernel shows for an arm: evidence that each arm uses only its own datapath.
#[derive(Debug, Default, serde::Serialize)]
pub struct Fairness {
    /// Netfilter rules of the world's family (iptables-save, ip6tables-save) in the host.
    pub netfilter_rules: usize,
    pub kernel_conntrack: u64,
    pub bpf_programs_attached: usize,
    /// Netfilter tables (nf_tables and x_tables) in the host namespace: with none, no packet
    /// there pays for netfilter or conntrack (see `netfilter_tables_in`).
    pub nf_tables_host: usize,
    /// The same in the server container's namespace.
    pub nf_tables_container: usize,
    /// `net.bridge.bridge-nf-call-iptables` in the host namespace (bridged frames through
    /// iptables; only matters where a frame crosses a bridge).
    pub bridge_nf_call_iptables: String,
}

/// Ports a container publishes (TCP): `host:container` pairs, or a same-numbered range (on
/// one host address, or all of them).
pub enum Publish {
    Pairs(Vec<(u16, u16)>),
    Range {
        ip: Option<Ipv4Addr>,
        first: u16,
        count: u16,
    },
}

/// A container made by an arm: where to run things inside it, and its address (the one it was
/// given, or, for Docker, the one it got).
pub struct Created {
    pub netns: PathBuf,
    pub ip: IpAddr,
}

/// An arm that manages containers: netd (with a datapath) or Docker, in a sandbox.
pub enum Control {
    /// netd, with the PATH its iptables backend needs (`None`: the machine's).
    Netd {
        inst: Instance,
        path: Option<std::ffi::OsString>,
    },
    // Field order is drop order: dockerd stops before its sandbox goes.
    Docker {
        dockerd: Dockerd,
        inst: Instance,
    },
}

impl Control {
    /// A sandbox with the arm ready to make containers (netd: a network `bench` exists).
    pub async fn build(arm: &str, prefix: &str) -> Result<Self> {
        Self::build_with(arm, prefix, Family::V4, &[]).await
    }

    /// [`Control::build`], over `family` (IPv6: the sandbox's uplink carries IPv6 too and
    /// `bench` is dual-stack), with more global options for netd (`--conntrack-max N`, ...).
    pub async fn build_with(
        arm: &str,
        prefix: &str,
        family: Family,
        options: &[&str],
    ) -> Result<Self> {
        let inst = match arm {
            BASELINE => {
                let bin = BASELINE_BIN
                    .get()
                    .context("the baseline arm needs a baseline binary (--baseline BIN)")?;
                Instance::create_with(prefix, bin.clone()).await?
            }
            _ => Instance::create(prefix).await?,
        };
        if family == Family::V6 {
            anyhow::ensure!(arm != "docker", "the Docker arm has no IPv6 datapath");
            inst.sandbox
                .enable_ipv6()
                .await
                .context("IPv6 on the sandbox's uplink")?;
        }
        if arm == "docker" {
            let workdir = inst.state_dir.join("docker");
            let dockerd = Dockerd::start(&inst.sandbox.host_path(), &workdir)?;
            return Ok(Self::Docker { dockerd, inst });
        }
        let mut args = netd_options(arm)
            .with_context(|| format!("unknown benchmark arm {arm:?}"))?
            .to_vec();
        args.extend(options);
        args.extend(["network", "create", "bench", "--subnet", SUBNET]);
        if family == Family::V6 {
            args.extend(["--ipv6", "--subnet", SUBNET6]);
        }
        let path = iptables_backend(arm)
            .map(|b| backend_bin_dir(&inst.state_dir.join("xtables"), b))
            .transpose()?;
        let ctl = Self::Netd { inst, path };
        ctl.netd(&args)?;
        Ok(ctl)
    }

    pub fn instance(&self) -> &Instance {
        match self {
            Self::Netd { inst, .. } | Self::Docker { inst, .. } => inst,
        }
    }

    /// The command `netd ARGS` for a netd arm, in its sandbox with its iptables backend.
    pub fn netd_cmd(&self, args: &[&str]) -> Result<std::process::Command> {
        let Self::Netd { inst, path } = self else {
            anyhow::bail!("netd {}: not a netd arm", args.join(" "));
        };
        let mut cmd = inst.netd_cmd(args);
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        Ok(cmd)
    }

    /// Runs `netd ARGS` for a netd arm (with its iptables backend); fails with netd's error
    /// line.
    pub fn netd(&self, args: &[&str]) -> Result<String> {
        let out = self.netd_cmd(args)?.output().context("run netd")?;
        if !out.status.success() {
            anyhow::bail!(
                "netd {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates container `base` (netd: at `ip`, of either family) publishing `publish`.
    pub fn create(&self, base: &str, ip: Option<IpAddr>, publish: Publish) -> Result<Created> {
        let name = self.instance().name(base);
        match self {
            Self::Netd { .. } => {
                let mut args = vec!["container".to_string(), "create".into(), name.clone()];
                args.extend(["--network".into(), "bench".into()]);
                match ip {
                    Some(IpAddr::V4(ip)) => args.extend(["--ip".into(), ip.to_string()]),
                    Some(IpAddr::V6(ip)) => args.extend(["--ip6".into(), ip.to_string()]),
                    None => {}
                }
                match publish {
                    Publish::Pairs(pairs) => {
                        for (host, container) in pairs {
                            args.extend(["-p".into(), format!("{host}:{container}")]);
                        }
                    }
                    Publish::Range { ip, first, count } => {
                        let last = first + count - 1;
                        let ip = ip.map(|ip| format!("{ip}:")).unwrap_or_default();
                        args.extend(["-p".into(), format!("{ip}{first}-{last}:{first}-{last}")]);
                    }
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                self.netd(&args)?;
                Ok(Created {
                    netns: netns::path_of(&name),
                    ip: ip.unwrap_or(Ipv4Addr::UNSPECIFIED.into()),
                })
            }
            Self::Docker { dockerd, .. } => {
                let ports: Vec<(u16, u16, Protocol)> = match publish {
                    Publish::Pairs(pairs) => pairs
                        .into_iter()
                        .map(|(h, c)| (h, c, Protocol::Tcp))
                        .collect(),
                    Publish::Range { ip: Some(ip), .. } => {
                        anyhow::bail!("the Docker arm publishes on every address, not on {ip}")
                    }
                    Publish::Range {
                        ip: None,
                        first,
                        count,
                    } => (first..first + count)
                        .map(|p| (p, p, Protocol::Tcp))
                        .collect(),
                };
                let c = dockerd.run(&name, &ports)?;
                Ok(Created {
                    netns: c.netns,
                    ip: c.ip.into(),
                })
            }
        }
    }

    /// Publishes one more port of an existing container. Docker can't: its arm re-creates the
    /// container with the port, which is what a Docker user would have to do. Returns the
    /// container as it is afterwards.
    pub fn publish(&self, base: &str, (host, container): (u16, u16)) -> Result<Created> {
        let name = self.instance().name(base);
        match self {
            Self::Netd { .. } => {
                self.netd(&["publish", &name, "-p", &format!("{host}:{container}")])?;
                Ok(Created {
                    netns: netns::path_of(&name),
                    ip: Ipv4Addr::UNSPECIFIED.into(),
                })
            }
            Self::Docker { .. } => {
                self.remove(base)?;
                self.create(base, None, Publish::Pairs(vec![(host, container)]))
            }
        }
    }

    /// Unpublishes one port of a container (netd only: a Docker user re-creates the container).
    pub fn unpublish(&self, base: &str, (host, container): (u16, u16)) -> Result<()> {
        let name = self.instance().name(base);
        match self {
            Self::Netd { .. } => self
                .netd(&["unpublish", &name, &format!("{host}:{container}")])
                .map(drop),
            Self::Docker { .. } => anyhow::bail!("the Docker arm can't unpublish a port"),
        }
    }

    /// What netd records of container `base` (`netd container inspect`).
    pub fn inspect(&self, base: &str) -> Result<netd::store::model::Container> {
        let name = self.instance().name(base);
        let json = self.netd(&["container", "inspect", &name])?;
        serde_json::from_str(&json).with_context(|| format!("netd container inspect {name}"))
    }

    pub fn remove(&self, base: &str) -> Result<()> {
        let name = self.instance().name(base);
        match self {
            Self::Netd { .. } => self.netd(&["container", "rm", &name]).map(drop),
            Self::Docker { dockerd, .. } => dockerd.remove(&name),
        }
    }
}

/// The names (before the instance's prefix) of a world's two containers.
pub const SERVER: &str = "srv";
pub const CLIENT: &str = "cli";

/// A built arm with its two benchmark containers, over one family.
pub enum World {
    Ceiling(Ceiling),
    Routed(Routed),
    Redirect(Redirect),
    Managed {
        ctl: Box<Control>,
        family: Family,
        server: Created,
        client: Created,
    },
}

impl World {
    pub async fn build(arm: &str, prefix: &str, family: Family) -> Result<Self> {
        match arm {
            "ceiling" => return Ok(Self::Ceiling(Ceiling::build(prefix, family).await?)),
            "routed" => return Ok(Self::Routed(Routed::build(prefix, family).await?)),
            "redirect" => return Ok(Self::Redirect(Redirect::build(prefix, family).await?)),
            _ => {}
        }
        let ctl = Box::new(Control::build_with(arm, prefix, family, &[]).await?);
        // The server container publishes the three servers' ports, shifted.
        let published =
            [IPERF_PORT, SOCKPERF_PORT, CRR_PORT, KEEPALIVE_PORT].map(|p| (p + PUBLISH_SHIFT, p));
        let [server_ip, client_ip] = family.container_addrs();
        let server = ctl.create(SERVER, Some(server_ip), Publish::Pairs(published.to_vec()))?;
        let client = ctl.create(CLIENT, Some(client_ip), Publish::Pairs(vec![]))?;
        if family == Family::V4 {
            // The outside can route to the server container (for the unsolicited flood).
            Netlink::in_ns(Some(&ctl.instance().sandbox.outside_path()))?
                .add_route(
                    ipnet::IpNet::new(server.ip, 32)?,
                    Some(HOST_ADDR.into()),
                    None,
                )
                .await?;
        }
        Ok(Self::Managed {
            ctl,
            family,
            server,
            client,
        })
    }

    /// Where a path's client and server run in this arm.
    pub fn endpoint(&self, path: Path) -> Endpoint {
        let (ctl, family, server, client) = match self {
            // One veth pair is the ceiling for every path.
            Self::Ceiling(c) => {
                return Endpoint {
                    client_ns: netns::path_of(&c.client),
                    server_ns: netns::path_of(&c.server),
                    target: c.server_ip,
                    port_shift: 0,
                };
            }
            Self::Routed(r) => return r.endpoint(path),
            Self::Redirect(r) => return r.routed.endpoint(path),
            Self::Managed {
                ctl,
                family,
                server,
                client,
            } => (ctl, *family, server, client),
        };
        let sandbox = &ctl.instance().sandbox;
        match path {
            Path::Published => Endpoint {
                client_ns: sandbox.outside_path(),
                server_ns: server.netns.clone(),
                target: family.host_addr(),
                port_shift: PUBLISH_SHIFT,
            },
            Path::Masquerade => Endpoint {
                client_ns: client.netns.clone(),
                server_ns: sandbox.outside_path(),
                target: family.outside_addr(),
                port_shift: 0,
            },
            Path::ContainerToContainer => Endpoint {
                client_ns: client.netns.clone(),
                server_ns: server.netns.clone(),
                target: server.ip,
                port_shift: 0,
            },
        }
    }

    /// The unsolicited flood's ends: from the outside straight to the server container's
    /// address (routed through the host), to a port nothing publishes. `None` for the ceiling,
    /// the routed floor and the redirect bound, and over IPv6 (what got in is counted by
    /// IPv4's UDP counters).
    pub fn unsolicited(&self) -> Option<Endpoint> {
        let Self::Managed {
            ctl,
            family: Family::V4,
            server,
            ..
        } = self
        else {
            return None;
        };
        Some(Endpoint {
            client_ns: ctl.instance().sandbox.outside_path(),
            server_ns: server.netns.clone(),
            target: server.ip,
            port_shift: 0,
        })
    }

    /// The namespace whose datapath this arm exercises (the host, or the ceiling's server).
    pub fn datapath_ns(&self) -> PathBuf {
        match self {
            Self::Ceiling(c) => netns::path_of(&c.server),
            Self::Routed(r) => r.sandbox.host_path(),
            Self::Redirect(r) => r.routed.sandbox.host_path(),
            Self::Managed { ctl, .. } => ctl.instance().sandbox.host_path(),
        }
    }

    fn family(&self) -> Family {
        match self {
            Self::Ceiling(c) => c.family,
            Self::Routed(r) => r.family,
            Self::Redirect(r) => r.routed.family,
            Self::Managed { family, .. } => *family,
        }
    }

    pub fn fairness(&self) -> Result<Fairness> {
        let container = self.endpoint(Path::Published).server_ns;
        fairness_of(&self.datapath_ns(), &container, self.family())
    }
}

/// Two namespaces joined by a veth pair: no bridge, no netfilter, no eBPF.
pub struct Ceiling {
    family: Family,
    client: String,
    server: String,
    server_ip: IpAddr,
}

impl Ceiling {
    /// The client's and the server's addresses over `family`, and their prefix length.
    fn addrs(family: Family) -> (IpAddr, IpAddr, u8) {
        match family {
            Family::V4 => (
                Ipv4Addr::new(198, 19, 0, 1).into(),
                Ipv4Addr::new(198, 19, 0, 2).into(),
                24,
            ),
            Family::V6 => (
                Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 1).into(),
                Ipv6Addr::new(0x2001, 2, 0, 0x100, 0, 0, 0, 2).into(),
                64,
            ),
        }
    }

    async fn build(prefix: &str, family: Family) -> Result<Self> {
        let (client_ip, server_ip, len) = Self::addrs(family);
        let this = Self {
            family,
            client: format!("{prefix}-a"),
            server: format!("{prefix}-b"),
            server_ip,
        };
        let client = netns::create(&this.client)?;
        let server = netns::create(&this.server)?;
        for ns in [&client, &server] {
            // As in the netd sandboxes: no IPv6 autoconfiguration traffic (IPv6 is turned on
            // below for the links that carry it).
            set_sysctl(Some(ns), "net.ipv6.conf.all.disable_ipv6", "1")?;
            set_sysctl(Some(ns), "net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        let c = Netlink::in_ns(Some(&client))?;
        let s = Netlink::in_ns(Some(&server))?;
        c.add_veth("ca", "cb", None).await?;
        let peer = c.require_link("cb").await?;
        c.move_to_ns(peer, &server).await?;
        for (ns, nl, link, addr) in [
            (&client, &c, "ca", client_ip),
            (&server, &s, "cb", server_ip),
        ] {
            if family == Family::V6 {
                for ifname in ["lo", link] {
                    enable_ipv6_on(ns, ifname)?;
                }
            }
            let index = nl.require_link(link).await?;
            nl.add_addr(index, ipnet::IpNet::new(addr, len)?).await?;
            nl.set_up(index).await?;
            let lo = nl.require_link("lo").await?;
            nl.set_up(lo).await?;
        }
        Ok(this)
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let mut cleanup = Cleanup::of(format!("the ceiling arm {}", self.client));
        cleanup.check(netns::remove(&self.client));
        cleanup.check(netns::remove(&self.server));
        cleanup.finish();
    }
}

/// Plain kernel routing, the floor of the paths that cross the host: the sandbox (outside and
/// host) and two container namespaces, each joined to the host by a veth pair of its own and
/// routed by it: no bridge, no NAT, no netfilter rule, no eBPF. From the outside to a
/// container or back, a packet crosses two veth pairs where the ceiling's crosses one.
pub struct Routed {
    family: Family,
    sandbox: Sandbox,
    server: String,
    client: String,
}

/// The host ends of the routed arm's veth pairs to its server and its client.
const ROUTED_SERVER_END: &str = "rtsrv";
const ROUTED_CLIENT_END: &str = "rtcli";

/// The routed arm's subnets over one family: the server's and the client's (the host's end
/// has the first address, the container the second), and the prefix holding both, which the
/// outside routes to the host.
struct RoutedNets {
    server: ipnet::IpNet,
    client: ipnet::IpNet,
    both: ipnet::IpNet,
}

impl RoutedNets {
    fn of(family: Family) -> Self {
        let [server, client, both] = match family {
            Family::V4 => ["198.19.2.0/24", "198.19.3.0/24", "198.19.0.0/16"],
            Family::V6 => [
                "2001:2:0:102::/64",
                "2001:2:0:103::/64",
                "2001:2:0:100::/56",
            ],
        }
        .map(|net| net.parse().expect("a routed subnet"));
        Self {
            server,
            client,
            both,
        }
    }
}

/// Address number `n` of `net` (0: the network's own).
fn nth_addr(net: ipnet::IpNet, n: u8) -> IpAddr {
    match net.network() {
        IpAddr::V4(a) => Ipv4Addr::from(u32::from(a) + u32::from(n)).into(),
        IpAddr::V6(a) => Ipv6Addr::from(u128::from(a) + u128::from(n)).into(),
    }
}

impl Routed {
    async fn build(prefix: &str, family: Family) -> Result<Self> {
        let this = Self {
            family,
            sandbox: Sandbox::create(prefix).await?,
            server: format!("{prefix}-srv"),
            client: format!("{prefix}-cli"),
        };
        // Dropped on error: everything made so far goes.
        if family == Family::V6 {
            this.sandbox.enable_ipv6().await?;
        }
        let host = this.sandbox.host_path();
        set_sysctl(Some(&host), family.forwarding_sysctl(), "1")?;
        let nets = RoutedNets::of(family);
        for (name, host_end, net) in [
            (&this.server, ROUTED_SERVER_END, nets.server),
            (&this.client, ROUTED_CLIENT_END, nets.client),
        ] {
            attach_routed(&host, name, host_end, net).await?;
        }
        Netlink::in_ns(Some(&this.sandbox.outside_path()))?
            .add_route(nets.both, Some(family.host_addr()), None)
            .await?;
        Ok(this)
    }

    fn endpoint(&self, path: Path) -> Endpoint {
        let server_ip = nth_addr(RoutedNets::of(self.family).server, 2);
        let (client_ns, server_ns, target) = match path {
            Path::Published => (
                self.sandbox.outside_path(),
                netns::path_of(&self.server),
                server_ip,
            ),
            Path::Masquerade => (
                netns::path_of(&self.client),
                self.sandbox.outside_path(),
                self.family.outside_addr(),
            ),
            Path::ContainerToContainer => (
                netns::path_of(&self.client),
                netns::path_of(&self.server),
                server_ip,
            ),
        };
        Endpoint {
            client_ns,
            server_ns,
            target,
            port_shift: 0,
        }
    }
}

/// Makes namespace `name` with the second address of `net`, behind a veth pair to `host`
/// (its host end `host_end`) whose host end has the first and is the namespace's default
/// gateway.
async fn attach_routed(
    host: &std::path::Path,
    name: &str,
    host_end: &str,
    net: ipnet::IpNet,
) -> Result<()> {
    let family = match net {
        ipnet::IpNet::V4(_) => Family::V4,
        ipnet::IpNet::V6(_) => Family::V6,
    };
    let ns = netns::create(name)?;
    set_sysctl(Some(&ns), "net.ipv6.conf.all.disable_ipv6", "1")?;
    set_sysctl(Some(&ns), "net.ipv6.conf.default.disable_ipv6", "1")?;
    let gateway = nth_addr(net, 1);
    let h = Netlink::in_ns(Some(host))?;
    let inner = Netlink::in_ns(Some(&ns))?;
    h.add_veth(host_end, "eth0", None).await?;
    let peer = h.require_link("eth0").await?;
    h.move_to_ns(peer, &ns).await?;
    if family == Family::V6 {
        enable_ipv6_on(host, host_end)?;
        for ifname in ["lo", "eth0"] {
            enable_ipv6_on(&ns, ifname)?;
        }
    }
    let host_index = h.require_link(host_end).await?;
    h.add_addr(host_index, ipnet::IpNet::new(gateway, net.prefix_len())?)
        .await?;
    h.set_up(host_index).await?;
    let index = inner.require_link("eth0").await?;
    inner
        .add_addr(
            index,
            ipnet::IpNet::new(nth_addr(net, 2), net.prefix_len())?,
        )
        .await?;
    inner.set_up(index).await?;
    let lo = inner.require_link("lo").await?;
    inner.set_up(lo).await?;
    inner
        .add_route(family.default_route(), Some(gateway), None)
        .await
}

impl Drop for Routed {
    fn drop(&mut self) {
        let mut cleanup = Cleanup::of(format!("the routed arm {}", self.sandbox.host));
        cleanup.check(netns::remove(&self.server));
        cleanup.check(netns::remove(&self.client));
        cleanup.check(self.sandbox.remove());
        cleanup.finish();
    }
}

/// The routed arm's topology with the least an eBPF datapath can do on it: `netd-bench-ebpf`'s
/// program on the ingress of each host-side interface, redirecting by destination address alone
/// (into a container's namespace, or out of the uplink). Where netd's ebpf arm misses a target
/// set against routed, this arm tells the topology's share (what crossing the host costs any
/// eBPF datapath) from netd's programs'.
pub struct Redirect {
    /// The loaded program, first so it is detached before the namespaces go.
    _program: aya::Ebpf,
    routed: Routed,
}

static REDIRECT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netd-bench-ebpf"));

impl Redirect {
    async fn build(prefix: &str, family: Family) -> Result<Self> {
        let routed = Routed::build(prefix, family).await?;
        // Dropped on error: the routed arm goes with everything in it.
        let routes = redirect_routes(&routed).await?;
        let host = routed.sandbox.host_path();
        let program = netns::run_in(Some(&host), || attach_redirect(&routes))
            .context("attach the redirect program")?;
        // The host forwards nothing itself: a packet the program didn't redirect goes
        // nowhere, so every one measured went its way.
        set_sysctl(Some(&host), family.forwarding_sysctl(), "0")?;
        Ok(Self {
            _program: program,
            routed,
        })
    }
}

/// The redirect program's routes on `routed`'s topology: its server, its client and the
/// outside, each by its address.
async fn redirect_routes(routed: &Routed) -> Result<Vec<([u32; 4], Route)>> {
    let nets = RoutedNets::of(routed.family);
    let host = Netlink::in_ns(Some(&routed.sandbox.host_path()))?;
    let mut routes = Vec::new();
    for (addr, ns, link, host_end, peer) in [
        (
            nth_addr(nets.server, 2),
            netns::path_of(&routed.server),
            "eth0",
            ROUTED_SERVER_END,
            true,
        ),
        (
            nth_addr(nets.client, 2),
            netns::path_of(&routed.client),
            "eth0",
            ROUTED_CLIENT_END,
            true,
        ),
        (
            routed.family.outside_addr(),
            routed.sandbox.outside_path(),
            OUTSIDE_LINK,
            UPLINK,
            false,
        ),
    ] {
        let ifindex = host.require_link(host_end).await?;
        let dst = mac_of(&Netlink::in_ns(Some(&ns))?, link).await?;
        let src = mac_of(&host, host_end).await?;
        let mut macs = [0; 12];
        macs[..6].copy_from_slice(&dst);
        macs[6..].copy_from_slice(&src);
        let route = Route {
            macs,
            ifindex,
            peer: u32::from(peer),
        };
        routes.push((route_key(addr), route));
    }
    Ok(routes)
}

pub async fn mac_of(nl: &Netlink, link: &str) -> Result<[u8; 6]> {
    let index = nl.require_link(link).await?;
    nl.link_mac(index)
        .await?
        .with_context(|| format!("{link} has no MAC address"))
}

/// `addr` as the redirect program's map key: the words as the packet carries them, an IPv4
/// address in the first.
fn route_key(addr: IpAddr) -> [u32; 4] {
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    match addr {
        IpAddr::V4(a) => [word(&a.octets()), 0, 0, 0],
        IpAddr::V6(a) => {
            let o = a.octets();
            std::array::from_fn(|i| word(&o[4 * i..]))
        }
    }
}

/// Loads the redirect program with `routes` and attaches it to the ingress of the host's
/// interfaces (in the calling thread's namespace, the sandbox host's).
fn attach_redirect(routes: &[([u32; 4], Route)]) -> Result<aya::Ebpf> {
    use aya::programs::{SchedClassifier, TcAttachType, tc};
    let mut ebpf = aya::Ebpf::load(REDIRECT_OBJECT).context("load the program")?;
    let mut map: aya::maps::HashMap<_, [u32; 4], Route> =
        aya::maps::HashMap::try_from(ebpf.map_mut("ROUTES").context("no ROUTES map")?)?;
    for (key, route) in routes {
        map.insert(key, route, 0)?;
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut("forward")
        .context("no forward program")?
        .try_into()?;
    program.load()?;
    for iface in [UPLINK, ROUTED_SERVER_END, ROUTED_CLIENT_END] {
        // TCX (Linux 6.6) needs no qdisc; older kernels attach to clsact's, and without one the
        // attach below says so.
        let _ = tc::qdisc_add_clsact(iface);
        program
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attach to {iface}"))?;
    }
    Ok(ebpf)
}

/// What `ns` (and the server `container`'s namespace) held: `family`'s netfilter rules, the
/// rest whatever the family.
fn fairness_of(
    ns: &std::path::Path,
    container: &std::path::Path,
    family: Family,
) -> Result<Fairness> {
    let rules = try_output_in(ns, family.rules_tool(), &[])?;
    let conntrack = try_output_in(ns, "conntrack", &["-C"])?;
    let bridge_nf = netns::run_in(Some(ns), || {
        Ok(
            std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
                .map_or_else(|_| "absent".to_string(), |v| v.trim().to_string()),
        )
    })?;
    Ok(Fairness {
        netfilter_rules: rules.lines().filter(|l| l.starts_with("-A ")).count(),
        kernel_conntrack: conntrack.trim().parse().unwrap_or(0),
        bpf_programs_attached: tcx_programs_in(ns)?,
        nf_tables_host: netfilter_tables_in(ns)?,
        nf_tables_container: netfilter_tables_in(container)?,
        bridge_nf_call_iptables: bridge_nf,
    })
}

/// Netfilter tables in `ns`, nf_tables (`nft list ruleset`: iptables-nft's and nft's) and
/// x_tables (`iptables-legacy-save`). The kernel registers a namespace's netfilter hooks, and
/// conntrack's, only for tables and the rules that need them, so with none there no packet in
/// `ns` pays for netfilter or conntrack, whatever the kernel has built in. (`nft list hooks`
/// would list the hooks themselves; this kernel doesn't answer it.)
fn netfilter_tables_in(ns: &std::path::Path) -> Result<usize> {
    let nft = try_output_in(ns, "nft", &["list", "ruleset"])?;
    let legacy = try_output_in(ns, "iptables-legacy-save", &[])?;
    Ok(nft.lines().filter(|l| l.starts_with("table ")).count()
        + legacy.lines().filter(|l| l.starts_with('*')).count())
}

/// eBPF programs attached to the interfaces of `ns`.
fn tcx_programs_in(ns: &std::path::Path) -> Result<usize> {
    Ok(program_stats(ns)?.len())
}

/// Run counters of one attached program (kept by the kernel while stats are enabled).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgStats {
    pub program: String,
    pub interface: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// Every eBPF program attached in `ns` (TCX, XDP, legacy TC filters) with its counters.
pub fn program_stats(ns: &std::path::Path) -> Result<Vec<ProgStats>> {
    let mut stats = tcx_program_stats(ns)?;
    let mut by_id = xdp_program_ids(ns)?;
    by_id.extend(filter_program_ids(ns)?);
    stats.extend(stats_of(&by_id));
    Ok(stats)
}

/// Every TCX program attached in `ns` with its counters (Debian's bpftool is too old to list
/// TCX, so the kernel is asked directly).
fn tcx_program_stats(ns: &std::path::Path) -> Result<Vec<ProgStats>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    netns::run_in(Some(ns), || {
        let mut out = Vec::new();
        for name in interface_names()? {
            for dir in [TcAttachType::Ingress, TcAttachType::Egress] {
                let Ok((_, progs)) = SchedClassifier::query_tcx(&name, dir) else {
                    continue;
                };
                for p in progs {
                    out.push(ProgStats {
                        program: p.name_as_str().unwrap_or("?").to_string(),
                        interface: name.clone(),
                        runs: p.run_count(),
                        run_time_ns: p.run_time().as_nanos() as u64,
                    });
                }
            }
        }
        Ok(out)
    })
}

/// The XDP programs attached in `ns`, by id, with their interfaces: `ip link` names the
/// program on each interface that has one (`prog/xdp id N`).
fn xdp_program_ids(ns: &std::path::Path) -> Result<Vec<(u32, String)>> {
    let links = try_output_in(ns, "ip", &["-o", "link", "show"])?;
    let mut attached = Vec::new();
    for line in links.lines() {
        let Some(iface) = line.split(": ").nth(1) else {
            continue;
        };
        let iface = iface.split('@').next().unwrap_or(iface);
        if let Some(id) = id_after(line, &["prog/xdp", "id"]) {
            attached.push((id, iface.to_string()));
        }
    }
    Ok(attached)
}

/// The programs of the legacy TC filters on both directions of `ns`'s interfaces, by id, with
/// their interfaces (`tc filter show` names each: `... jited`, after `id N`). A program on
/// several interfaces (every container's veth has the same one) is listed once, with the
/// first: the kernel's counters are the program's, not an attachment's.
fn filter_program_ids(ns: &std::path::Path) -> Result<Vec<(u32, String)>> {
    let mut attached: Vec<(u32, String)> = Vec::new();
    for iface in netns::run_in(Some(ns), interface_names)? {
        for dir in ["ingress", "egress"] {
            let filters = try_output_in(ns, "tc", &["filter", "show", "dev", &iface, dir])?;
            for line in filters.lines() {
                if let Some(id) = id_after(line, &["not_in_hw", "id"])
                    && !attached.iter().any(|(known, _)| *known == id)
                {
                    attached.push((id, iface.clone()));
                }
            }
        }
    }
    Ok(attached)
}

/// The number after the words `before` in `line`.
fn id_after(line: &str, before: &[&str]) -> Option<u32> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.windows(before.len()).position(|w| w == before)?;
    words.get(at + before.len())?.parse().ok()
}

/// The kernel's counters of the programs `attached` names by id.
fn stats_of(attached: &[(u32, String)]) -> Vec<ProgStats> {
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs().filter_map(Result::ok) {
        for (id, iface) in attached {
            if info.id() == *id {
                out.push(ProgStats {
                    program: info.name_as_str().unwrap_or("?").to_string(),
                    interface: iface.clone(),
                    runs: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                });
            }
        }
    }
    out
}

/// Interface names of the calling thread's namespace, from /proc/thread-self/net/dev.
pub fn interface_names() -> Result<Vec<String>> {
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    Ok(dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .collect())
}
