//! Docker's network driver verbs on netd's networks and containers.
//!
//! A Docker network `ID` is the netd network `docker-ID[..12]`; an endpoint `ID` is the netd
//! container `docker-ID[..12]`, made at CreateEndpoint in a namespace of netd's own (so it is
//! in netd's state from then on, and a restarted daemon knows it), then handed to Docker at
//! Join: the container end of the veth moves to the host namespace, and Docker moves it into
//! the sandbox, names it `eth0`, gives it the address and MAC of the endpoint and a default
//! route via the gateway Join answers. ProgramExternalConnectivity publishes its ports and
//! RevokeExternalConnectivity unpublishes them; DeleteEndpoint removes the netd container
//! (veth, ports, datapath entries).

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Value, json};

use super::protocol::{
    CreateEndpoint, CreateEndpointResponse, CreateNetwork, EXPOSED_PORTS, EndpointInterface,
    EndpointRef, ExternalConnectivity, GENERIC_OPTIONS, INTERNAL, InterfaceName, Join,
    JoinResponse, NetworkRef, PORT_MAP, PortBinding, TransportPort,
};
use crate::{
    core::{
        ipam,
        ports::{self, Publish},
        spec::NetworkSpec,
    },
    datapath::{DatapathKind, Protocol},
    engines::core::{AttachRequest, Attachment, Core, hand_out_interface},
    store::model::Exposed,
};

/// How netd names what it makes for a Docker object (an ID is 64 hex characters).
pub fn netd_name(docker_id: &str) -> Result<String> {
    let valid = docker_id.len() == 64
        && docker_id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    if !valid {
        bail!("invalid Docker ID {docker_id:?}: not 64 lowercase hex characters");
    }
    Ok(format!("docker-{}", &docker_id[..12]))
}

/// The endpoint `endpoint_id` of network `network_id`: `None` when there is no such endpoint,
/// an error when it is another network's.
fn endpoint_of(core: &mut Core, network_id: &str, endpoint_id: &str) -> Result<Option<Attachment>> {
    let network = netd_name(network_id)?;
    let Some(a) = core.attachment(&netd_name(endpoint_id)?)? else {
        return Ok(None);
    };
    if a.network != network {
        bail!("endpoint {endpoint_id} is not on network {network_id}");
    }
    Ok(Some(a))
}

/// The host-side name of an endpoint's container interface between Join and Docker's move.
fn handover_name(endpoint_id: &str) -> Result<String> {
    Ok(format!("nde{}", &netd_name(endpoint_id)?[7..]))
}

pub fn capabilities() -> Value {
    json!({ "Scope": "local", "ConnectivityScope": "local" })
}

/// The netd network a CreateNetwork asks for (on `datapath` unless its options name one).
pub fn network_spec(req: CreateNetwork, datapath: DatapathKind) -> Result<NetworkSpec> {
    let [ipv4] = req.ipv4_data.as_slice() else {
        bail!(
            "netd takes exactly one IPv4 pool per network, Docker gave {}",
            req.ipv4_data.len()
        );
    };
    let mut spec = NetworkSpec::named(&netd_name(&req.network_id)?);
    spec.subnet = Some(ipam::parse_subnet4(&ipv4.pool)?);
    spec.gateway = cidr_address(&ipv4.gateway, "gateway", |n: Ipv4Net| n.addr())?;
    match req.ipv6_data.as_deref().unwrap_or_default() {
        [] => {}
        [ipv6] => {
            spec.ipv6 = true;
            spec.subnet6 = match ipam::parse_subnet(&ipv6.pool)? {
                IpNet::V6(net) => Some(net),
                IpNet::V4(net) => bail!("IPv6 pool {net} is an IPv4 subnet"),
            };
            spec.gateway6 = cidr_address(&ipv6.gateway, "IPv6 gateway", |n: Ipv6Net| n.addr())?;
        }
        more => bail!(
            "netd takes one IPv6 pool per network, Docker gave {}",
            more.len()
        ),
    }
    spec.internal = req.options.get(INTERNAL).is_some_and(|v| v == &json!(true));
    spec.datapath = datapath;
    if let Some(generic) = req.options.get(GENERIC_OPTIONS) {
        apply_options(&mut spec, generic)?;
    }
    spec.validate()?;
    Ok(spec)
}

pub async fn create_network(core: &mut Core, spec: NetworkSpec) -> Result<Value> {
    core.create_network(spec).await?;
    Ok(json!({}))
}

/// The address of a Docker `ADDRESS/PREFIX` (`None` when Docker left it empty), parsed as
/// the subnet type `N` (one family) and taken from it by `addr`.
fn cidr_address<N: std::str::FromStr, A>(
    text: &str,
    what: &str,
    addr: impl Fn(N) -> A,
) -> Result<Option<A>> {
    if text.is_empty() {
        return Ok(None);
    }
    let net = text
        .parse::<N>()
        .map_err(|_| anyhow::anyhow!("invalid {what} {text:?}"))?;
    Ok(Some(addr(net)))
}

/// `-o KEY=VALUE` of `docker network create`: netd's network options, under their netd names
/// or the names Docker's bridge driver uses.
fn apply_options(opts: &mut NetworkSpec, generic: &Value) -> Result<()> {
    let map = match generic {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        other => bail!("{GENERIC_OPTIONS} must be an object of options, not {other}"),
    };
    for (key, value) in map {
        // `-o KEY=VALUE` gives strings: anything else (a null, a number) is no one's option.
        let Value::String(text) = value else {
            bail!("option {key}: expected a string, not {value}");
        };
        let text = text.clone();
        let flag = || -> Result<bool> {
            text.parse()
                .with_context(|| format!("option {key}={text}: expected true or false"))
        };
        match key.as_str() {
            "icc" | "com.docker.network.bridge.enable_icc" => opts.icc = flag()?,
            "internal" => opts.internal = flag()?,
            "masquerade" | "com.docker.network.bridge.enable_ip_masquerade" => {
                opts.masquerade = flag()?
            }
            "mtu" | "com.docker.network.driver.mtu" => {
                opts.mtu = text
                    .parse()
                    .with_context(|| format!("option {key}={text}: expected a number"))?
            }
            "host_ip" | "com.docker.network.bridge.host_binding_ipv4" => {
                opts.host_ip =
                    Some(text.parse().with_context(|| {
                        format!("option {key}={text}: expected an IPv4 address")
                    })?)
            }
            "bridge" | "com.docker.network.bridge.name" => opts.bridge = Some(text),
            "datapath" => opts.datapath = text.parse()?,
            other => bail!(
                "unknown option {other:?} (netd takes icc, internal, masquerade, mtu, host_ip, bridge, datapath)"
            ),
        }
    }
    Ok(())
}

pub async fn delete_network(core: &mut Core, req: NetworkRef) -> Result<Value> {
    let name = netd_name(&req.network_id)?;
    if core.network(&name)?.is_some() {
        core.remove_network(&name).await?;
    }
    Ok(json!({}))
}

pub async fn create_endpoint(core: &mut Core, req: CreateEndpoint) -> Result<Value> {
    let given = req.interface.unwrap_or_default();
    let ip6 = cidr_address(&given.address_ipv6, "IPv6 address", |n: Ipv6Net| n.addr())?;
    let ip = cidr_address(&given.address, "address", |n: Ipv4Net| n.addr())?;
    let mac = match given.mac_address.as_str() {
        "" => None,
        text => Some(ipam::parse_mac(text)?),
    };
    let name = netd_name(&req.endpoint_id)?;
    let a = core
        .attach(&AttachRequest {
            name,
            network: netd_name(&req.network_id)?,
            netns: None,
            ip,
            ip6,
            mac,
            ports: vec![],
        })
        .await?;
    // Fill only what Docker left empty: it refuses an answer that changes what it gave.
    let filled = EndpointInterface {
        address: if ip.is_none() {
            format!("{}/{}", a.ip, a.prefix_len)
        } else {
            String::new()
        },
        address_ipv6: match (ip6, a.ip6) {
            (None, Some((given, _))) => given.to_string(),
            _ => String::new(),
        },
        mac_address: if mac.is_none() {
            ipam::format_mac(a.mac)
        } else {
            String::new()
        },
    };
    Ok(serde_json::to_value(CreateEndpointResponse {
        interface: filled,
    })?)
}

pub async fn delete_endpoint(core: &mut Core, req: EndpointRef) -> Result<Value> {
    if let Some(a) = endpoint_of(core, &req.network_id, &req.endpoint_id)? {
        core.detach(&a.name).await?;
    }
    Ok(json!({}))
}

pub fn endpoint_oper_info(core: &mut Core, req: EndpointRef) -> Result<Value> {
    let a = core
        .attachment(&netd_name(&req.endpoint_id)?)?
        .with_context(|| format!("no endpoint {}", req.endpoint_id))?;
    Ok(json!({ "Value": {
        "ip": a.ip.to_string(),
        "ip6": a.ip6.map(|(ip6, _)| ip6.addr().to_string()),
        "mac": ipam::format_mac(a.mac),
        "host_veth": a.host_veth,
    }}))
}

pub async fn join(core: &mut Core, req: Join) -> Result<Value> {
    let a = endpoint_of(core, &req.network_id, &req.endpoint_id)?.with_context(|| {
        format!(
            "no endpoint {} (network {})",
            req.endpoint_id, req.network_id
        )
    })?;
    let handover = handover_name(&req.endpoint_id)?;
    hand_out_interface(&a, &handover).await?;
    // The gateway makes Docker add the default route (and no docker_gwbridge endpoint); an
    // internal network has no way out, so no default route.
    let internal = core.network(&a.network)?.is_some_and(|n| n.internal);
    Ok(serde_json::to_value(JoinResponse {
        interface_name: InterfaceName {
            src_name: handover,
            dst_prefix: "eth".into(),
        },
        gateway: if internal {
            String::new()
        } else {
            a.gateway.to_string()
        },
        gateway_ipv6: match a.ip6 {
            Some((_, gateway6)) if !internal => gateway6.to_string(),
            _ => String::new(),
        },
    })?)
}

/// Leave: Docker moves the interface back out of the sandbox itself; it goes with the
/// endpoint at DeleteEndpoint.
pub fn leave(_req: EndpointRef) -> Value {
    json!({})
}

/// `-p` and `--expose`: Docker's port bindings become the endpoint's published ports, its
/// exposed ports netd's exposed ports (what a `--link` to it opens). Docker programs again
/// after a restart of its own: what is published stays, and twice is the same as once.
pub async fn program_external_connectivity(
    core: &mut Core,
    req: ExternalConnectivity,
) -> Result<Value> {
    let name = netd_name(&req.endpoint_id)?;
    let a = core
        .attachment(&name)?
        .with_context(|| format!("no endpoint {}", req.endpoint_id))?;
    let bindings: Vec<PortBinding> = option_list(&req, PORT_MAP)?;
    let exposed: Vec<TransportPort> = option_list(&req, EXPOSED_PORTS)?;
    let exposed = exposed
        .iter()
        .map(|p| {
            Ok(Exposed {
                proto: protocol(p.proto)?,
                port: p.port,
            })
        })
        .collect::<Result<_>>()?;
    let host_ip = core
        .network(&a.network)?
        .and_then(|n| n.host_ip)
        .map(IpAddr::from);
    let mut requests = Vec::new();
    for b in &bindings {
        let req = publish_of(b)?;
        // Programmed again (a restart of the same endpoint): what is published stays.
        if !ports::is_published(&req, host_ip, &a.ports) {
            requests.push(req);
        }
    }
    if !requests.is_empty() {
        core.publish(&name, &requests).await?;
    }
    core.set_exposed(&name, exposed)?;
    Ok(json!({}))
}

/// Revoke (`docker stop`, or the container's way out moving to another network): its
/// published ports go, as on Docker's bridge (new connections are refused, established ones
/// carry on), and so do its exposed ports. Twice is the same as once.
pub async fn revoke_external_connectivity(
    core: &mut Core,
    req: ExternalConnectivity,
) -> Result<Value> {
    let name = netd_name(&req.endpoint_id)?;
    let a = core
        .attachment(&name)?
        .with_context(|| format!("no endpoint {}", req.endpoint_id))?;
    if !a.ports.is_empty() {
        core.unpublish(&name, &a.ports).await?;
    }
    core.set_exposed(&name, vec![])?;
    Ok(json!({}))
}

/// The list under option `key` of a Program/RevokeExternalConnectivity (none: empty).
fn option_list<T: serde::de::DeserializeOwned>(
    req: &ExternalConnectivity,
    key: &str,
) -> Result<Vec<T>> {
    match req.options.get(key) {
        Some(Value::Null) | None => Ok(vec![]),
        Some(v) => serde_json::from_value(v.clone()).with_context(|| format!("invalid {key}")),
    }
}

/// An IP protocol number as netd's protocol.
fn protocol(number: u8) -> Result<Protocol> {
    match number {
        6 => Ok(Protocol::Tcp),
        17 => Ok(Protocol::Udp),
        other => bail!("netd publishes TCP and UDP ports, not IP protocol {other}"),
    }
}

/// One binding as netd publishes it. A host port range (`-p 8000-8010:80`, with `HostPortEnd`)
/// is Docker's "any free one of these" for the one container port.
fn publish_of(b: &PortBinding) -> Result<Publish> {
    let proto = protocol(b.proto)?;
    // Docker sends "" for `-p H:C` (every address of both families, as netd's own -p);
    // 0.0.0.0 and :: are every address of one family.
    let host_ip = match b.host_ip.as_deref().unwrap_or("") {
        "" => None,
        text => Some(
            text.parse::<IpAddr>()
                .with_context(|| format!("invalid host IP {text:?}"))?,
        ),
    };
    if b.port == 0 {
        bail!("container port 0: no such port");
    }
    if b.host_port == 0 {
        bail!(
            "port {}: netd needs a host port (give -p HOSTPORT:{})",
            b.port,
            b.port
        );
    }
    Ok(Publish {
        host_ip,
        host_ports: Some((b.host_port, b.host_port_end.max(b.host_port))),
        container_ports: (b.port, b.port),
        proto,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn docker_ids_name_netd_objects() {
        let id = "0123456789abcdef".repeat(4);
        assert_eq!(netd_name(&id).unwrap(), "docker-0123456789ab");
        assert_eq!(handover_name(&id).unwrap(), "nde0123456789ab");
        assert!(netd_name("short").is_err());
        assert!(netd_name(&"Z".repeat(64)).is_err());
    }

    #[test]
    fn a_port_binding_publishes_its_one_container_port() {
        let b: PortBinding = serde_json::from_value(json!(
            {"Proto": 17, "IP": "", "Port": 53, "HostIP": "127.0.0.1", "HostPort": 5353, "HostPortEnd": 5354}
        ))
        .unwrap();
        // A host range is one free port of it, for the one container port.
        let req = publish_of(&b).unwrap();
        assert_eq!(req.host_ports, Some((5353, 5354)));
        assert_eq!(req.container_ports, (53, 53));
        assert_eq!(req.host_ip, Some(Ipv4Addr::LOCALHOST.into()));
        assert_eq!(req.proto, Protocol::Udp);
        let sctp = PortBinding {
            proto: 132,
            ..b.clone()
        };
        assert!(publish_of(&sctp).is_err());
        for (text, ip) in [
            ("", None),
            ("0.0.0.0", Some(Ipv4Addr::UNSPECIFIED.into())),
            ("::", Some(Ipv6Addr::UNSPECIFIED.into())),
            ("2001:db8::1", Some("2001:db8::1".parse().unwrap())),
        ] {
            let b = PortBinding {
                host_ip: Some(text.into()),
                ..b.clone()
            };
            assert_eq!(publish_of(&b).unwrap().host_ip, ip, "{text:?}");
        }
        let bad = PortBinding {
            host_ip: Some("[::1]".into()),
            ..b
        };
        assert!(publish_of(&bad).is_err());
    }

    #[test]
    fn options_take_netd_and_docker_bridge_names() {
        let mut spec = NetworkSpec::named("n");
        let opts = json!({"icc": "false", "com.docker.network.driver.mtu": "1400", "datapath": "iptables"});
        apply_options(&mut spec, &opts).unwrap();
        assert!(!spec.icc);
        assert_eq!(spec.mtu, 1400);
        assert_eq!(spec.datapath, DatapathKind::Iptables);
        for (bad, why) in [
            (json!({"bridge": null}), "expected a string, not null"),
            (json!({"mtu": 1400}), "expected a string, not 1400"),
            (json!(["icc"]), "must be an object of options"),
        ] {
            let err = apply_options(&mut spec, &bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let err = apply_options(&mut spec, &json!({"icc": "maybe"})).unwrap_err();
        assert!(err.to_string().contains("icc=maybe"), "{err}");
    }
}
