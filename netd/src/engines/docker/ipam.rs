//! Docker's IPAM driver on netd's address management. Docker asks for a pool, then the
//! gateway and each endpoint's address, before it creates the network and the endpoints; netd
//! records addresses with the containers that hold them. So the pools and addresses handed out
//! are kept in netd's state until Docker releases them (`core::reservations`): a `netd daemon`
//! killed between a RequestPool and its CreateNetwork forgets nothing.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use serde_json::{Value, json};

use super::protocol::{
    GATEWAY_REQUEST, PoolRef, REQUEST_ADDRESS_TYPE, ReleaseAddress, RequestAddress, RequestPool,
    RequestPoolResponse,
};
use crate::{core::ipam, engines::core::Core, store::Network};

/// The one address space netd has (Docker wants a local and a global name).
pub const ADDRESS_SPACE: &str = "netd";
const POOL_ID_PREFIX: &str = "netd/";

pub fn capabilities() -> Value {
    json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })
}

pub fn default_address_spaces() -> Value {
    json!({
        "LocalDefaultAddressSpace": ADDRESS_SPACE,
        "GlobalDefaultAddressSpace": ADDRESS_SPACE,
    })
}

fn pool_id(subnet: IpNet) -> String {
    format!("{POOL_ID_PREFIX}{subnet}")
}

fn subnet_of(pool_id: &str) -> Result<IpNet> {
    pool_id
        .strip_prefix(POOL_ID_PREFIX)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unknown pool {pool_id:?}"))
}

/// The netd network with `subnet` (of either family), if it exists yet.
fn network_on(core: &mut Core, subnet: IpNet) -> Result<Option<Network>> {
    Ok(core
        .networks()?
        .into_iter()
        .find(|n| IpNet::from(n.subnet) == subnet || n.subnet6.map(IpNet::from) == Some(subnet)))
}

/// A pool: the one asked for, if no network or other pool has any of it, or the first free
/// private subnet (as `netd network create` picks: a ULA /64 for IPv6).
pub async fn request_pool(core: &mut Core, req: RequestPool) -> Result<Value> {
    if !req.sub_pool.is_empty() {
        bail!(
            "netd's IPAM takes no --ip-range (sub-pool {})",
            req.sub_pool
        );
    }
    let subnet = if req.pool.is_empty() {
        let pending = core.reserved_pools()?;
        core.free_subnet(req.v6, &pending).await?
    } else {
        let subnet = ipam::parse_subnet(&req.pool)?;
        if subnet.addr().is_ipv6() != req.v6 {
            bail!("pool {subnet} is not of the family Docker asks for");
        }
        // A pool is one network's: releasing a second grant of it would take the first's
        // addresses with it.
        for n in core.networks()? {
            let theirs = [Some(IpNet::from(n.subnet)), n.subnet6.map(IpNet::from)];
            if let Some(other) = theirs
                .into_iter()
                .flatten()
                .find(|t| ipam::overlaps(t, &subnet))
            {
                bail!("pool {subnet} overlaps netd network {:?} ({other})", n.name);
            }
        }
        if let Some(other) = core
            .reserved_pools()?
            .into_iter()
            .find(|t| ipam::overlaps(t, &subnet))
        {
            bail!("pool {subnet} overlaps pool {other}, already handed out");
        }
        subnet
    };
    core.reserve_pool(subnet)?;
    Ok(serde_json::to_value(RequestPoolResponse {
        pool_id: pool_id(subnet),
        pool: subnet.to_string(),
        data: BTreeMap::new(),
    })?)
}

pub fn release_pool(core: &mut Core, req: PoolRef) -> Result<Value> {
    core.release_pool(subnet_of(&req.pool_id)?)?;
    Ok(json!({}))
}

/// The gateway of `subnet`: `asked`, or its first host.
fn gateway_of(subnet: IpNet, asked: Option<IpAddr>) -> Result<IpAddr> {
    Ok(match (subnet, asked) {
        (IpNet::V4(s), None) => ipam::gateway_and_range(s, None, None)?.0.into(),
        (IpNet::V4(s), Some(IpAddr::V4(a))) => ipam::gateway_and_range(s, Some(a), None)?.0.into(),
        (IpNet::V6(s), None) => ipam::gateway6(s, None)?.into(),
        (IpNet::V6(s), Some(IpAddr::V6(a))) => ipam::gateway6(s, Some(a))?.into(),
        (s, Some(a)) => bail!("address {a} is not of pool {s}'s family"),
    })
}

/// The gateway (when asked for with Docker's gateway option), the address asked for, or
/// the lowest free one.
pub fn request_address(core: &mut Core, req: RequestAddress) -> Result<Value> {
    let subnet = subnet_of(&req.pool_id)?;
    let asked: Option<IpAddr> = match req.address.as_str() {
        "" => None,
        text => Some(
            text.parse()
                .with_context(|| format!("invalid address {text:?}"))?,
        ),
    };
    let network = network_on(core, subnet)?;
    if network.is_none() && !core.reserved_pools()?.contains(&subnet) {
        bail!(
            "unknown pool {:?}: never requested, or released",
            req.pool_id
        );
    }
    let v6 = subnet.addr().is_ipv6();
    // The network's gateway and address range in the pool's family.
    let (net_gateway, range) = match &network {
        Some(n) if v6 => (n.gateway6.map(IpAddr::from), subnet),
        Some(n) => (Some(n.gateway.into()), n.ip_range.into()),
        None => (None, subnet),
    };
    let wants_gateway = req
        .options
        .as_ref()
        .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
        .is_some_and(|t| t == GATEWAY_REQUEST);
    let mut used = core.reserved_addresses(subnet)?;
    let address = if wants_gateway {
        let gateway = gateway_of(subnet, asked.or(net_gateway))?;
        if used.contains(&gateway) {
            bail!("address {gateway} of pool {subnet} is already handed out");
        }
        gateway
    } else {
        if let Some(n) = &network {
            for a in core.attachments_on(&n.name, "")? {
                used.insert(a.ip.into());
                used.extend(a.ip6.map(|(ip6, _)| IpAddr::from(ip6.addr())));
            }
        }
        let pool = ipam::Pool {
            subnet,
            range,
            gateway: gateway_of(subnet, net_gateway)?,
            used: &used,
        };
        match asked {
            Some(ip) => pool.check(ip).map(|()| ip)?,
            None => pool.allocate()?,
        }
    };
    core.reserve_address(subnet, address)?;
    Ok(json!({
        "Address": format!("{address}/{}", subnet.prefix_len()),
        "Data": {},
    }))
}

pub fn release_address(core: &mut Core, req: ReleaseAddress) -> Result<Value> {
    let subnet = subnet_of(&req.pool_id)?;
    let ip: IpAddr = req
        .address
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("invalid address {:?}", req.address))?;
    core.release_address(subnet, ip)?;
    Ok(json!({}))
}
