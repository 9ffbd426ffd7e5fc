//! The eBPF datapath: TC programs from netd-ebpf and pinned maps under the instance's bpffs dir.
//!
//! PLACEHOLDER until the datapath lands: it records nothing and attaches nothing.
use anyhow::Result;

use super::{Datapath, EndpointSpec, NetworkSpec, PortSpec};
use crate::bpf::Pins;

pub struct EbpfDatapath {
    #[allow(dead_code)]
    pins: Pins,
}

impl EbpfDatapath {
    pub fn new(pins: Pins) -> Self {
        Self { pins }
    }
}

impl Datapath for EbpfDatapath {
    fn name(&self) -> &'static str {
        "ebpf"
    }
    fn setup_network(&self, _net: &NetworkSpec) -> Result<()> {
        Ok(())
    }
    fn teardown_network(&self, _net: &NetworkSpec) -> Result<()> {
        Ok(())
    }
    fn add_endpoint(&self, _net: &NetworkSpec, _ep: &EndpointSpec) -> Result<()> {
        Ok(())
    }
    fn remove_endpoint(&self, _net: &NetworkSpec, _ep: &EndpointSpec) -> Result<()> {
        Ok(())
    }
    fn publish(&self, _net: &NetworkSpec, _ports: &[PortSpec]) -> Result<()> {
        Ok(())
    }
    fn unpublish(&self, _net: &NetworkSpec, _ports: &[PortSpec]) -> Result<()> {
        Ok(())
    }
}
