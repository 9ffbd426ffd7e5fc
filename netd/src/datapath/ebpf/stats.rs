//! `netd stats`: the datapath's per-reason packet counters, summed over CPUs.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use netd_common::datapath::{Stat, v4_octets};
use serde::Serialize;

use super::maps;
use crate::bpf::Pins;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Counter {
    pub reason: &'static str,
    /// Whether packets counted here were dropped (the others passed, translated or not).
    pub dropped: bool,
    pub packets: u64,
}

pub fn read(pins: &Pins) -> Result<Vec<Counter>> {
    let stats = maps::stats(pins)?;
    Stat::ALL
        .iter()
        .map(|&stat| {
            let per_cpu = stats.get(&(stat as u32), 0).context("read the stats map")?;
            Ok(Counter {
                reason: stat.name(),
                dropped: stat.drops(),
                packets: per_cpu.iter().sum(),
            })
        })
        .collect()
}

/// Dropped packets of one container, in all and per reason.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EndpointDrops {
    pub endpoint: Ipv4Addr,
    pub dropped: u64,
    pub reasons: Vec<ReasonCount>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ReasonCount {
    pub reason: &'static str,
    pub packets: u64,
}

/// Drops per container, for the containers that had any.
pub fn read_endpoint_drops(pins: &Pins) -> Result<Vec<EndpointDrops>> {
    let drops = maps::endpoint_drops(pins)?;
    let mut by_endpoint: BTreeMap<Ipv4Addr, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for item in drops.iter() {
        let (key, per_cpu) = item.context("read the endpoint drops map")?;
        let endpoint = Ipv4Addr::from(v4_octets(&key.endpoint.addr));
        let reason = Stat::from_index(key.reason).map_or("unknown", Stat::name);
        *by_endpoint
            .entry(endpoint)
            .or_default()
            .entry(reason)
            .or_default() += per_cpu.iter().sum::<u64>();
    }
    Ok(by_endpoint
        .into_iter()
        .map(|(endpoint, reasons)| EndpointDrops {
            endpoint,
            dropped: reasons.values().sum(),
            reasons: reasons
                .into_iter()
                .map(|(reason, packets)| ReasonCount { reason, packets })
                .collect(),
        })
        .collect())
}

/// Forgets the drop counts of the container at `ip` (its address may go to another one).
pub fn forget_endpoint(pins: &Pins, ip: Ipv4Addr) -> Result<()> {
    let mut drops = maps::endpoint_drops(pins)?;
    let stale: Vec<_> = drops
        .keys()
        .filter_map(Result::ok)
        .filter(|k| v4_octets(&k.endpoint.addr) == ip.octets())
        .collect();
    for key in stale {
        drops.remove(&key)?;
    }
    Ok(())
}
