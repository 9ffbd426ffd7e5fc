//! Networks: create and remove. A network is recorded (`creating`) before its bridge exists
//! and stays recorded (`removing`) until its bridge and datapath part are gone.

use std::net::IpAddr;

use anyhow::{Result, bail};
use ipnet::IpNet;

use super::{
    Controller, plan,
    spec::{DEFAULT_NETWORK, NetworkSpec},
};
use crate::{
    driver::bridge,
    fault,
    store::{Network, Status, View as _},
};

impl Controller {
    /// Creates network `spec`. On failure nothing is left.
    pub async fn create_network(&mut self, spec: NetworkSpec) -> Result<Network> {
        spec.validate()?;
        bridge::check_host_has(spec.host_ip.map(IpAddr::from))?;
        let _lock = self.store.lock()?;
        self.collect_garbage().await?;
        self.create_network_locked(spec).await
    }

    /// Creates the default network if it isn't there yet.
    pub(super) async fn ensure_default_network(&mut self) -> Result<()> {
        if self.store.read(|tx| tx.network(DEFAULT_NETWORK))?.is_none() {
            let mut spec = NetworkSpec::named(DEFAULT_NETWORK);
            spec.datapath = self.default_datapath;
            self.create_network_locked(spec).await?;
        }
        Ok(())
    }

    async fn create_network_locked(&mut self, spec: NetworkSpec) -> Result<Network> {
        let mut in_use = bridge::host_subnets().await?;
        // Not a pool promised to Docker for a network it is about to create, when picking
        // a subnet of that pool's family.
        let picks = |pool: &IpNet| match pool {
            IpNet::V4(_) => spec.subnet.is_none(),
            IpNet::V6(_) => spec.subnet6.is_none(),
        };
        in_use.extend(
            self.store
                .read(|tx| tx.ipam_pools())?
                .into_iter()
                .filter(picks),
        );
        let planned = self.store.read(|tx| plan::network(tx, &spec, &in_use))?;
        bridge::check_network(&planned).await?;
        let dp = self.datapaths.open(planned.datapath)?;
        let mut net = self.store.write(|tx| {
            // Planned again in the write transaction: what it read is what it records.
            let net = plan::network(tx, &spec, &in_use)?;
            tx.put_network(&net)?;
            tx.set_next_network_id(net.id + 1)?;
            Ok(net)
        })?;
        fault::step("network-record");
        if let Err(e) = bridge::setup_network(&net, &*dp).await {
            let failed = bridge::teardown_network(&net, &*dp, false).await;
            return Err(self.settle_network(&net, failed, e).into());
        }
        net.status = Status::Running;
        net.owner_pid = 0;
        self.store.write(|tx| tx.put_network(&net))?;
        Ok(net)
    }

    /// Removes network `name` (refused while containers use it).
    pub async fn remove_network(&mut self, name: &str) -> Result<()> {
        let _lock = self.store.lock()?;
        self.collect_garbage().await?;
        let mut net = self.store.read(|tx| tx.network_required(name))?;
        let users: Vec<String> = self
            .store
            .read(|tx| tx.containers_on(name))?
            .into_iter()
            .map(|c| c.name)
            .collect();
        if !users.is_empty() {
            bail!("network {name:?} has containers: {}", users.join(", "));
        }
        if net.status != Status::Running {
            bail!("network {name:?} is {}", net.status.name());
        }
        let dp = self.datapaths.open(net.datapath)?;
        net.status = Status::Removing;
        net.owner_pid = std::process::id();
        self.store.write(|tx| tx.put_network(&net))?;
        fault::step("network-removing");
        let failed = bridge::teardown_network(&net, &*dp, true).await;
        self.settle_network(&net, failed, anyhow::anyhow!("remove network {name:?}"))
            .into_result()
    }

    /// After a teardown of `net`: forgets it when everything went, else keeps it as
    /// `removing` for `gc` to retry, and returns `error` with what failed.
    pub(super) fn settle_network(
        &mut self,
        net: &Network,
        failed: crate::driver::Failures,
        error: anyhow::Error,
    ) -> Settled {
        let kept = !failed.is_empty();
        let recorded = self.store.write(|tx| {
            if kept {
                tx.put_network(&Network {
                    status: Status::Removing,
                    owner_pid: 0,
                    ..net.clone()
                })
            } else {
                tx.delete_network(&net.name)
            }
        });
        Settled::new(error, failed, recorded)
    }
}

/// How a teardown ended: with the error that caused it (if any) and what it couldn't remove.
pub struct Settled {
    error: anyhow::Error,
    failed: crate::driver::Failures,
    recorded: Result<()>,
}

impl Settled {
    pub(super) fn new(
        error: anyhow::Error,
        failed: crate::driver::Failures,
        recorded: Result<()>,
    ) -> Self {
        Self {
            error,
            failed,
            recorded,
        }
    }

    /// For a removal: `Ok` when everything went, else an error naming each failure.
    pub fn into_result(self) -> Result<()> {
        self.recorded?;
        let context = format!("{:#}", self.error);
        self.failed.into_result(&context)
    }
}

impl From<Settled> for anyhow::Error {
    /// For a failed create: its error, and what its undo couldn't remove.
    fn from(s: Settled) -> Self {
        match (s.recorded, s.failed.into_result("and its undo failed")) {
            (Err(e), _) => s.error.context(format!("{e:#}")),
            (Ok(()), Err(undo)) => anyhow::anyhow!("{:#}; {undo:#}", s.error),
            (Ok(()), Ok(())) => s.error,
        }
    }
}
