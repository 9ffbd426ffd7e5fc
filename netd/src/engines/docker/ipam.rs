//! Docker's IPAM driver on netd's address management. Docker asks for a pool, then the
//! gateway and each endpoint's address, before it creates the network and the endpoints; netd
//! records addresses with the containers that hold them. So the pools and addresses handed out
//! are kept in netd's state until Docker releases them (`core::reservations`): a `netd daemon`
//! killed between a RequestPool and its CreateNetwork forgets nothing.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
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

fn pool_id(subnet: Ipv4Net) -> String {
    format!("{POOL_ID_PREFIX}{subnet}")
}

fn subnet_of(pool_id: &str) -> Result<Ipv4Net> {
    pool_id
        .strip_prefix(POOL_ID_PREFIX)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unknown pool {pool_id:?}"))
}

/// The netd network on `subnet`, if it exists yet.
fn network_on(core: &mut Core, subnet: Ipv4Net) -> Result<Option<Network>> {
    Ok(core.networks()?.into_iter().find(|n| n.subnet == subnet))
}

/// A pool: the one asked for, or the first free private subnet (as `netd network create`
/// picks). Asking for the same pool again gets the same answer.
pub async fn request_pool(core: &mut Core, req: RequestPool) -> Result<Value> {
    if req.v6 {
        bail!("netd's Docker IPAM gives IPv4 addresses only: no IPv6 pool");
    }
    if !req.sub_pool.is_empty() {
        bail!(
            "netd's IPAM takes no --ip-range (sub-pool {})",
            req.sub_pool
        );
    }
    let subnet = if req.pool.is_empty() {
        let pending = core.reserved_pools()?;
        core.free_subnet(&pending).await?
    } else {
        let subnet = ipam::parse_subnet4(&req.pool)?;
        let clash = core
            .networks()?
            .into_iter()
            .find(|n| n.subnet != subnet && ipam::overlaps(&n.subnet, &subnet));
        if let Some(n) = clash {
            bail!(
                "pool {subnet} overlaps netd network {:?} ({})",
                n.name,
                n.subnet
            );
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

/// The gateway (when asked for with Docker's gateway option), the address asked for, or
/// the lowest free one.
pub fn request_address(core: &mut Core, req: RequestAddress) -> Result<Value> {
    let subnet = subnet_of(&req.pool_id)?;
    let asked: Option<Ipv4Addr> = match req.address.as_str() {
        "" => None,
        text => Some(
            text.parse()
                .with_context(|| format!("invalid address {text:?}"))?,
        ),
    };
    let network = network_on(core, subnet)?;
    let wants_gateway = req
        .options
        .as_ref()
        .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
        .is_some_and(|t| t == GATEWAY_REQUEST);
    let address = if wants_gateway {
        let (gateway, _) =
            ipam::gateway_and_range(subnet, asked.or(network.as_ref().map(|n| n.gateway)), None)?;
        gateway
    } else {
        let mut used: HashSet<IpAddr> = core
            .reserved_addresses(subnet)?
            .into_iter()
            .map(IpAddr::from)
            .collect();
        if let Some(n) = &network {
            used.extend(
                core.attachments_on(&n.name, "")?
                    .iter()
                    .map(|a| IpAddr::from(a.ip)),
            );
        }
        let (gateway, range) = match &network {
            Some(n) => (n.gateway, n.ip_range),
            None => ipam::gateway_and_range(subnet, None, None)?,
        };
        let pool = ipam::Pool {
            subnet: subnet.into(),
            range: range.into(),
            gateway: gateway.into(),
            used: &used,
        };
        let address = match asked {
            Some(ip) => pool.check(ip.into()).map(|()| ip.into())?,
            None => pool.allocate()?,
        };
        match address {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => bail!("pool {subnet} gave the IPv6 address {ip}"),
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
    let ip: Ipv4Addr = req
        .address
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("invalid address {:?}", req.address))?;
    core.release_address(subnet, ip)?;
    Ok(json!({}))
}
