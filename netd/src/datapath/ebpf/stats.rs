//! `netd stats`: the datapath's per-reason packet counters, summed over CPUs.

use anyhow::{Context as _, Result};
use netd_common::datapath::Stat;
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
