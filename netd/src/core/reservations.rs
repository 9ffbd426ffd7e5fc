//! Pools and addresses an engine's IPAM (Docker's) hands out before a netd network or
//! container holds them: Docker asks for a pool and its gateway, then creates the network;
//! for an address, then creates the endpoint. Kept in the state, so a `netd daemon` killed in
//! between forgets nothing it promised.

use std::{collections::HashSet, net::IpAddr};

use anyhow::Result;
use ipnet::IpNet;

use super::Controller;

impl Controller {
    /// The pools handed out and not released.
    pub fn reserved_pools(&mut self) -> Result<Vec<IpNet>> {
        self.store.read(|tx| tx.ipam_pools())
    }

    pub fn reserve_pool(&mut self, subnet: IpNet) -> Result<()> {
        self.store.write(|tx| tx.add_ipam_pool(subnet))
    }

    /// Releases pool `subnet` and every address handed out from it.
    pub fn release_pool(&mut self, subnet: IpNet) -> Result<()> {
        self.store.write(|tx| tx.delete_ipam_pool(subnet))
    }

    /// The addresses handed out from pool `subnet` and not released.
    pub fn reserved_addresses(&mut self, subnet: IpNet) -> Result<HashSet<IpAddr>> {
        self.store.read(|tx| tx.ipam_addresses(subnet))
    }

    pub fn reserve_address(&mut self, subnet: IpNet, ip: IpAddr) -> Result<()> {
        self.store.write(|tx| tx.add_ipam_address(subnet, ip))
    }

    pub fn release_address(&mut self, subnet: IpNet, ip: IpAddr) -> Result<()> {
        self.store.write(|tx| tx.delete_ipam_address(subnet, ip))
    }
}
