//! `netd stats`: the datapath's per-reason packet counters, summed over CPUs.

use std::net::Ipv4Addr;

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

/// Dropped packets of one container.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct EndpointDrops {
    pub endpoint: Ipv4Addr,
    pub dropped: u64,
}

/// Drops per container, for the containers that had any.
pub fn read_endpoint_drops(pins: &Pins) -> Result<Vec<EndpointDrops>> {
    let drops = maps::endpoint_drops(pins)?;
    let mut out = Vec::new();
    for item in drops.iter() {
        let (key, per_cpu) = item.context("read the endpoint drops map")?;
        out.push(EndpointDrops {
            endpoint: Ipv4Addr::from(v4_octets(&key.addr)),
            dropped: per_cpu.iter().sum(),
        });
    }
    out.sort_by_key(|d| d.endpoint);
    Ok(out)
}
