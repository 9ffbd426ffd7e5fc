//! The CNI verbs on netd's controller. Each call is one process with its own controller; the
//! store makes concurrent calls safe (a pod start storm), as it does concurrent CLI commands.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde_json::Value;

use super::types::{CniError, Code, Config, after_prev_result, prev_result_addresses, result_json};
use crate::{
    core::{
        self,
        spec::{NetworkSpec, PortMapping},
    },
    datapath::{DatapathKind, Protocol},
    engines::core::{AttachRequest, Core, check_attachment},
    store::{Network, Store},
};

/// What the runtime says about the container (the `CNI_*` variables).
#[derive(Debug)]
pub struct Call {
    pub container_id: String,
    pub ifname: String,
    /// Optional for DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` `IP=`: the address asked for.
    pub ip: Option<Ipv4Addr>,
}

/// Names netd's endpoint for an attachment: the spec's key is (network, container ID,
/// interface), and netd's names must be short, so it's a stable hash of the three.
pub fn endpoint_name(network: &str, container_id: &str, ifname: &str) -> String {
    // FNV-1a, 64 bits: stable across processes and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in [network, container_id, ifname].join("\0").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{ENDPOINT_PREFIX}{h:016x}")
}

/// Every endpoint netd-cni makes is named with this prefix, so GC leaves the CLI's alone.
const ENDPOINT_PREFIX: &str = "cni-";

/// The state dir the config names (the CLI's default when it doesn't).
fn state_dir(config: &Config) -> PathBuf {
    config
        .state_dir
        .clone()
        .unwrap_or_else(|| "/var/lib/netd".into())
}

/// The netd instance the config names (the CLI's defaults for what it doesn't).
fn open(config: &Config) -> Result<Core, CniError> {
    let mut c = core::Config::new(state_dir(config));
    if let Some(bpffs) = &config.bpffs {
        c.bpffs = bpffs.clone();
    }
    c.host_netns = config.host_netns.clone();
    c.tuning.host_cgroup = config.host_cgroup.clone();
    Ok(Core::open(c)?)
}

/// The netd network the config describes.
fn network_spec(config: &Config) -> Result<NetworkSpec, CniError> {
    let invalid = |e: anyhow::Error| CniError::new(Code::InvalidConfig, format!("{e:#}"));
    let mut spec = NetworkSpec::named(&config.name);
    spec.subnet = config.subnet;
    spec.gateway = config.gateway;
    spec.ip_range = config.ip_range;
    spec.ipv6 = config.ipv6.unwrap_or(false);
    spec.subnet6 = config.subnet6;
    spec.gateway6 = config.gateway6;
    spec.bridge = config.bridge.clone();
    spec.mtu = config.mtu.unwrap_or(spec.mtu);
    spec.icc = config.icc.unwrap_or(spec.icc);
    spec.internal = config.internal.unwrap_or(spec.internal);
    spec.masquerade = config.masquerade.unwrap_or(spec.masquerade);
    if let Some(dp) = &config.datapath {
        spec.datapath = dp.parse::<DatapathKind>().map_err(invalid)?;
    }
    spec.validate().map_err(invalid)?;
    Ok(spec)
}

/// The network of the config, made on first use; an existing one must match the config.
/// Returns whether this call made it.
async fn ensure_network(core: &mut Core, config: &Config) -> Result<bool, CniError> {
    let spec = network_spec(config)?;
    let existed = core.network(&config.name)?.is_some();
    let net = core.ensure_network(spec.clone()).await?;
    if let Some((what, want, have)) = difference(config, &spec, &net) {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "network {:?} exists with {what} {have}, the config asks for {want}",
                config.name
            ),
        ));
    }
    Ok(!existed)
}

/// The first setting of existing network `net` that isn't what the config asks (`spec` is
/// the config's network): what it names, and the config's and the network's values. Where
/// the config is silent, the isolation settings (ICC, internal, masquerade, datapath) are
/// compared with the defaults it would make a network with, so a container never joins a
/// network more open than its config says; the rest only where the config names them.
fn difference(
    config: &Config,
    spec: &NetworkSpec,
    net: &Network,
) -> Option<(&'static str, String, String)> {
    let given =
        |asked: Option<String>, have: String| asked.filter(|a| *a != have).map(|a| (a, have));
    let text = |s: Option<ipnet::Ipv6Net>| s.map_or("no IPv6".to_string(), |s| s.to_string());
    let ipv6 = config.ipv6.unwrap_or(false);
    let want6 = match config.subnet6 {
        Some(s) => s.to_string(),
        None if ipv6 => "IPv6".to_string(),
        None => "no IPv6".to_string(),
    };
    let ipv6_differs =
        ipv6 != net.subnet6.is_some() || config.subnet6.is_some_and(|s| Some(s) != net.subnet6);
    let string = |v: &dyn ToString| Some(v.to_string());
    [
        (
            "subnet",
            given(config.subnet.map(|s| s.to_string()), net.subnet.to_string()),
        ),
        (
            "gateway",
            given(
                config.gateway.map(|g| g.to_string()),
                net.gateway.to_string(),
            ),
        ),
        (
            "IPv6 subnet",
            ipv6_differs.then(|| (want6, text(net.subnet6))),
        ),
        (
            "ipRange",
            given(
                config.ip_range.map(|r| r.to_string()),
                net.ip_range.to_string(),
            ),
        ),
        ("bridge", given(config.bridge.clone(), net.bridge.clone())),
        (
            "mtu",
            given(config.mtu.map(|m| m.to_string()), net.mtu.to_string()),
        ),
        ("icc", given(string(&spec.icc), net.icc.to_string())),
        (
            "internal",
            given(string(&spec.internal), net.internal.to_string()),
        ),
        (
            "masquerade",
            given(string(&spec.masquerade), net.masquerade.to_string()),
        ),
        (
            "datapath",
            given(string(&spec.datapath), net.datapath.to_string()),
        ),
    ]
    .into_iter()
    .find_map(|(what, d)| d.map(|(want, have)| (what, want, have)))
}

fn ports_of(config: &Config) -> Result<Vec<PortMapping>, CniError> {
    config
        .runtime_config
        .port_mappings
        .iter()
        .map(|m| {
            let proto = match m.protocol.to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    return Err(CniError::new(
                        Code::UnsupportedField,
                        format!("portMappings protocol {other:?}: netd publishes tcp and udp"),
                    ));
                }
            };
            let host_ip = match m.host_ip.as_str() {
                "" | "0.0.0.0" => None,
                text => Some(text.parse::<IpAddr>().map_err(|_| {
                    CniError::new(
                        Code::InvalidConfig,
                        format!("portMappings hostIP {text:?} is not an IP address"),
                    )
                })?),
            };
            if m.host_port == 0 || m.container_port == 0 {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!(
                        "portMappings hostPort {} containerPort {}: ports are 1 to 65535",
                        m.host_port, m.container_port
                    ),
                ));
            }
            Ok(PortMapping {
                proto,
                host_ip,
                host_port: m.host_port,
                container_port: m.container_port,
            })
        })
        .collect()
}

/// The addresses asked for, if any (netd gives one of each family): the `ips` capability
/// (with the prefix length it names, if any), or `CNI_ARGS` `IP=`.
#[derive(Debug, Default, PartialEq)]
struct Requested {
    ip: Option<(Ipv4Addr, Option<u8>)>,
    ip6: Option<(Ipv6Addr, Option<u8>)>,
}

fn requested_ips(config: &Config, call: &Call) -> Result<Requested, CniError> {
    let invalid = |msg: String| CniError::new(Code::InvalidConfig, msg);
    let ips = &config.runtime_config.ips;
    let mut asked = Requested {
        ip: call.ip.filter(|_| ips.is_empty()).map(|ip| (ip, None)),
        ip6: None,
    };
    for one in ips {
        let (addr, prefix) = match one.parse::<IpNet>() {
            Ok(net) => (net.addr(), Some(net.prefix_len())),
            Err(_) => (
                one.parse::<IpAddr>()
                    .map_err(|_| invalid(format!("ips {one:?} is not an IP address")))?,
                None,
            ),
        };
        let taken = match addr {
            IpAddr::V4(v4) => asked.ip.replace((v4, prefix)).is_some(),
            IpAddr::V6(v6) => asked.ip6.replace((v6, prefix)).is_some(),
        };
        if taken {
            return Err(invalid(format!(
                "ips {ips:?}: netd gives a container one address of each family"
            )));
        }
    }
    Ok(asked)
}

/// Refuses an `ips` prefix length other than network `net`'s: the container's address gets
/// the network's, and a result saying otherwise would be wrong.
fn check_prefixes(asked: &Requested, net: &Network) -> Result<(), CniError> {
    let differs = |addr: String, given: Option<u8>, have: Option<u8>| match (given, have) {
        (Some(given), Some(have)) if given != have => Some(format!(
            "ips {addr}/{given}: network {:?} is a /{have}",
            net.name
        )),
        _ => None,
    };
    let v4 = asked
        .ip
        .and_then(|(ip, p)| differs(ip.to_string(), p, Some(net.subnet.prefix_len())));
    let v6 = asked
        .ip6
        .and_then(|(ip, p)| differs(ip.to_string(), p, net.subnet6.map(|s| s.prefix_len())));
    match v4.or(v6) {
        Some(msg) => Err(CniError::new(Code::InvalidConfig, msg)),
        None => Ok(()),
    }
}

fn require_netns(config: &Config, call: &Call) -> Result<PathBuf, CniError> {
    let netns = call
        .netns
        .clone()
        .ok_or_else(|| CniError::new(Code::InvalidEnvironment, "CNI_NETNS is not set"))?;
    if !netns.exists() {
        return Err(CniError::new(
            Code::UnknownContainer,
            format!("network namespace {} does not exist", netns.display()),
        ));
    }
    if same_file(&netns, &host_netns(config)) {
        return Err(CniError::new(
            Code::InvalidEnvironment,
            format!(
                "CNI_NETNS {} is the host's network namespace",
                netns.display()
            ),
        ));
    }
    Ok(netns)
}

/// The namespace netd manages as the host: the config's, or the one the plugin runs in.
fn host_netns(config: &Config) -> PathBuf {
    config
        .host_netns
        .clone()
        .unwrap_or_else(|| "/proc/self/ns/net".into())
}

/// Whether `a` and `b` are the same file (for namespaces: the same namespace).
fn same_file(a: &Path, b: &Path) -> bool {
    match (nix::sys::stat::stat(a), nix::sys::stat::stat(b)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

pub async fn add(config: &Config, call: &Call) -> Result<Value, CniError> {
    let netns = require_netns(config, call)?;
    let ports = ports_of(config)?;
    let asked = requested_ips(config, call)?;
    if config.prev_result.as_ref().is_some_and(|p| !p.is_object()) {
        return Err(CniError::new(
            Code::InvalidConfig,
            "prevResult is not a result object",
        ));
    }
    let mut core = open(config)?;
    let made = ensure_network(&mut core, config).await?;
    let attached = attach(&mut core, config, call, netns, ports, &asked).await;
    if attached.is_err() && made {
        // Nothing of this failed ADD stays: the network it made has no container yet.
        if let Err(e) = core.remove_network(&config.name).await {
            eprintln!(
                "netd-cni: warning: could not remove network {:?}: {e:#}",
                config.name
            );
        }
    }
    attached
}

/// ADD's part once the network is there: the attachment and its result.
async fn attach(
    core: &mut Core,
    config: &Config,
    call: &Call,
    netns: PathBuf,
    ports: Vec<PortMapping>,
    asked: &Requested,
) -> Result<Value, CniError> {
    let net = core
        .network(&config.name)?
        .ok_or_else(|| CniError::new(Code::Netd, format!("network {:?} is gone", config.name)))?;
    check_prefixes(asked, &net)?;
    remove_orphans(core, config).await?;
    let name = endpoint_name(&config.name, &call.container_id, &call.ifname);
    if core.attachment(&name)?.is_some() {
        return Err(CniError::new(
            Code::Netd,
            format!(
                "container {} already has {} on network {:?}: DEL it first",
                call.container_id, call.ifname, config.name
            ),
        ));
    }
    let request = AttachRequest {
        name,
        network: config.name.clone(),
        netns: Some(netns),
        ip: asked.ip.map(|(ip, _)| ip),
        ip6: asked.ip6.map(|(ip6, _)| ip6),
        mac: None,
        ports,
    };
    let attachment = core.attach_as(&request, Some(&call.ifname)).await?;
    let ours = result_json(&config.cni_version, &call.ifname, &attachment);
    Ok(match &config.prev_result {
        Some(prev) => after_prev_result(prev, ours),
        None => ours,
    })
}

/// Removes the attachments of the network whose namespace is gone (their runtime never
/// DELed them): a removal that fails is only warned about, as it must not block new ADDs.
async fn remove_orphans(core: &mut Core, config: &Config) -> Result<(), CniError> {
    for failure in core.remove_orphans(&config.name, ENDPOINT_PREFIX).await? {
        eprintln!("netd-cni: warning: could not remove the orphan {failure}");
    }
    Ok(())
}

/// Removes the attachment if there is one: a second DEL, or a DEL after a failed ADD, is fine.
/// On an instance that never ran there is none, and nothing is made.
pub async fn del(config: &Config, call: &Call) -> Result<(), CniError> {
    if !Store::exists(&state_dir(config)) {
        return Ok(());
    }
    let mut core = open(config)?;
    core.detach(&endpoint_name(
        &config.name,
        &call.container_id,
        &call.ifname,
    ))
    .await?;
    Ok(())
}

/// CHECK: the attachment is as ADD left it. On an instance that never ran there is none,
/// and nothing is made.
pub async fn check(config: &Config, call: &Call) -> Result<(), CniError> {
    let netns = require_netns(config, call)?;
    let unknown = || {
        CniError::new(
            Code::UnknownContainer,
            format!(
                "container {} has no {} on network {:?}",
                call.container_id, call.ifname, config.name
            ),
        )
    };
    if !Store::exists(&state_dir(config)) {
        return Err(unknown());
    }
    let mut core = open(config)?;
    let name = endpoint_name(&config.name, &call.container_id, &call.ifname);
    let a = core.attachment(&name)?.ok_or_else(unknown)?;
    if a.netns != netns {
        return Err(CniError::new(
            Code::Netd,
            format!(
                "the attachment is in {}, not {}",
                a.netns.display(),
                netns.display()
            ),
        ));
    }
    let addresses = [
        Some(format!("{}/{}", a.ip, a.prefix_len)),
        a.ip6.map(|(ip6, _)| ip6.to_string()),
    ];
    if let Some(prev) = &config.prev_result {
        if !prev.is_object() {
            return Err(CniError::new(
                Code::InvalidConfig,
                "prevResult is not a result object",
            ));
        }
        let listed = prev_result_addresses(prev);
        if let Some(address) = addresses
            .into_iter()
            .flatten()
            .find(|a| !listed.contains(a))
        {
            return Err(CniError::new(
                Code::Netd,
                format!("prevResult does not list the container's address {address}"),
            ));
        }
    }
    check_attachment(&a).await?;
    Ok(())
}

/// STATUS: ready when the netd instance can be opened (its state dir locked and read), or,
/// for one that never ran, when its state dir could be made (the first ADD makes it; STATUS
/// leaves nothing).
pub fn status(config: &Config) -> Result<(), CniError> {
    let dir = state_dir(config);
    if !Store::exists(&dir) {
        return can_make_dir_at(&dir).map_err(|e| CniError::new(Code::NotAvailable, e));
    }
    open(config)
        .and_then(|mut core| Ok(core.networks()?))
        .map(|_| ())
        .map_err(|e| CniError::new(Code::NotAvailable, e.msg))
}

/// Whether a directory can be made at `dir`: one is made and removed again in its nearest
/// existing ancestor.
fn can_make_dir_at(dir: &Path) -> Result<(), String> {
    let parent = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    let probe = parent.join(format!(".netd-cni-status-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .and_then(|()| std::fs::remove_dir(&probe))
        .map_err(|e| {
            format!(
                "state dir {}: can't be made in {}: {e}",
                dir.display(),
                parent.display()
            )
        })
}

/// GC: removes every attachment of this network the runtime no longer lists.
pub async fn gc(config: &Config) -> Result<(), CniError> {
    // Without the list, every attachment would look stale.
    let listed = config.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "GC without cni.dev/valid-attachments: nothing says which attachments are live",
        )
    })?;
    let valid: HashSet<String> = listed
        .iter()
        .map(|v| endpoint_name(&config.name, &v.container_id, &v.ifname))
        .collect();
    if !Store::exists(&state_dir(config)) {
        return Ok(());
    }
    let mut core = open(config)?;
    if core.network(&config.name)?.is_none() {
        return Ok(());
    }
    let mut failed = Vec::new();
    for a in core.attachments_on(&config.name, ENDPOINT_PREFIX)? {
        if !valid.contains(&a.name)
            && let Err(e) = core.detach(&a.name).await
        {
            failed.push(format!("{}: {e:#}", a.name));
        }
    }
    if !failed.is_empty() {
        return Err(CniError::new(
            Code::Netd,
            format!("could not remove {}", failed.join("; ")),
        ));
    }
    Ok(())
}
