//! `netd counter`: the per-protocol packet counter, attached with TCX and read from its pinned
//! map by any later netd process.

use anyhow::{Context as _, Result};
use aya::{
    maps::{Map, MapData, PerCpuArray},
    programs::TcAttachType,
};
use netd_common::counter::{COUNTER_PROG, PROTO_COUNTS_MAP, Proto, ProtoCount};
use serde::Serialize;

use crate::bpf::Pins;

/// Packets and bytes for one protocol, summed over CPUs.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Count {
    pub proto: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

pub fn direction(egress: bool) -> TcAttachType {
    if egress { TcAttachType::Egress } else { TcAttachType::Ingress }
}

/// Attaches the counter to `iface`.
pub fn attach(pins: &Pins, iface: &str, dir: TcAttachType) -> Result<()> {
    let mut ebpf = pins.load()?;
    pins.attach_tc(&mut ebpf, COUNTER_PROG, iface, dir)
}

/// Detaches the counter from `iface`; returns whether it was attached.
pub fn detach(pins: &Pins, iface: &str, dir: TcAttachType) -> Result<bool> {
    pins.detach_tc(COUNTER_PROG, iface, dir)
}

/// Reads the pinned counts. They add up every interface the counter is attached to.
pub fn read(pins: &Pins) -> Result<Vec<Count>> {
    let path = pins.map(PROTO_COUNTS_MAP);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("open {} (is the counter attached?)", path.display()))?;
    let array: PerCpuArray<_, ProtoCount> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    Proto::ALL
        .iter()
        .map(|&proto| {
            let per_cpu = array.get(&(proto as u32), 0).context("read the counter map")?;
            Ok(Count {
                proto: proto.name(),
                packets: per_cpu.iter().map(|c| c.packets).sum(),
                bytes: per_cpu.iter().map(|c| c.bytes).sum(),
            })
        })
        .collect()
}
