//! Garbage collection: finishes or undoes what a netd process that died midway left, for
//! every kind of object (networks, containers, published ports, `netd link`s). Run by `netd
//! gc`, by the daemon, and at the start of every command that changes the kernel. A record
//! is garbage when its owner process is gone (or it has none: a removal that failed).
//! `netd gc` and the daemon also put back the processes the datapaths run for published
//! ports (the iptables datapath's userland proxies) where they died or were left behind.

use std::collections::HashMap;

use anyhow::Result;

use super::Controller;
use crate::{
    datapath::{DatapathKind, PortSpec, proxy::Reconciled},
    driver::{bridge, p2p},
    store::{Status, View as _},
};

/// What a collection removed.
#[derive(Debug, Default)]
pub struct Collected {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    /// Published ports whose publish or unpublish didn't finish.
    pub ports: usize,
    /// `netd link`s whose making didn't finish.
    pub links: usize,
    /// Userland proxies started again or ended (`gc` and the daemon only).
    pub proxies: Reconciled,
}

impl Collected {
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
            && self.networks.is_empty()
            && self.ports == 0
            && self.links == 0
            && self.proxies == Reconciled::default()
    }
}

fn orphaned(owner_pid: u32) -> bool {
    owner_pid == 0
        || nix::sys::signal::kill(nix::unistd::Pid::from_raw(owner_pid as i32), None).is_err()
}

impl Controller {
    /// `netd gc`: collects garbage under the kernel lock, then reconciles the datapaths'
    /// processes with the ports published. Not part of every command's collection: it reads
    /// every container.
    pub async fn gc(&mut self) -> Result<Collected> {
        let _lock = self.store.lock()?;
        let mut out = self.collect_garbage().await?;
        out.proxies = self.reconcile_ports()?;
        Ok(out)
    }

    /// Has each datapath with networks start again the processes it runs for their published
    /// ports that died, and end those no port needs (see `Datapath::reconcile_ports`).
    fn reconcile_ports(&mut self) -> Result<Reconciled> {
        let published = self.store.read(|tx| {
            let mut published: HashMap<DatapathKind, Vec<PortSpec>> = HashMap::new();
            for net in tx.networks()? {
                let specs = published.entry(net.datapath).or_default();
                for c in tx.containers_on(&net.name)? {
                    if c.status == Status::Running {
                        specs.extend(bridge::port_specs(&c, &c.ports, net.id));
                    }
                }
            }
            Ok(published)
        })?;
        let mut done = Reconciled::default();
        for (kind, ports) in published {
            let reconciled = self.datapaths.open(kind)?.reconcile_ports(&ports)?;
            done.started += reconciled.started;
            done.ended += reconciled.ended;
        }
        Ok(done)
    }

    /// Collects garbage; the caller holds the kernel lock. Fails naming what it couldn't
    /// remove (which stays recorded for the next try).
    pub(super) async fn collect_garbage(&mut self) -> Result<Collected> {
        let mut out = Collected::default();
        let mut errors = Vec::new();
        self.collect_links(&mut out).await?;
        self.collect_ports(&mut out).await?;
        let containers = self.store.read(|tx| tx.pending_containers())?;
        for c in containers.into_iter().filter(|c| orphaned(c.creator_pid)) {
            let failed = self.teardown(&c).await?;
            let what = anyhow::anyhow!("clean up container {:?}", c.name);
            match self.settle_container(&c, failed, what).into_result() {
                Ok(()) => out.containers.push(c.name),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        let networks = self.store.read(|tx| tx.pending_networks())?;
        for net in networks.into_iter().filter(|n| orphaned(n.owner_pid)) {
            let dp = self.datapaths.open(net.datapath)?;
            let failed = bridge::teardown_network(&net, &*dp, false).await;
            let what = anyhow::anyhow!("clean up network {:?}", net.name);
            match self.settle_network(&net, failed, what).into_result() {
                Ok(()) => out.networks.push(net.name),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if !errors.is_empty() {
            anyhow::bail!("{}", errors.join("; "));
        }
        Ok(out)
    }

    /// Unpublishes ports whose publish or unpublish didn't finish (the datapath may or may
    /// not have them).
    async fn collect_ports(&mut self, out: &mut Collected) -> Result<()> {
        let rows = self.store.read(|tx| tx.pending_ports())?;
        for row in rows.into_iter().filter(|r| orphaned(r.owner_pid)) {
            let (c, net) = self.store.read(|tx| {
                let c = tx.container_record(&row.container)?;
                let net = c
                    .network
                    .as_deref()
                    .map(|n| tx.network(n))
                    .transpose()?
                    .flatten();
                Ok((c, net))
            })?;
            // A container being created or removed takes its ports with it.
            if c.status != Status::Running {
                continue;
            }
            if let Some(net) = net {
                let dp = self.datapaths.open(net.datapath)?;
                let on = bridge::OnNetwork {
                    net: &net,
                    dp: &*dp,
                    links: vec![],
                };
                bridge::unpublish_if_there(&on, &c, std::slice::from_ref(&row.mapping));
            }
            self.store
                .write(|tx| tx.delete_ports(&row.container, std::slice::from_ref(&row.mapping)))?;
            out.ports += 1;
        }
        Ok(())
    }

    /// Removes the veths of `netd link`s whose making didn't finish.
    async fn collect_links(&mut self, out: &mut Collected) -> Result<()> {
        let pending = self.store.read(|tx| tx.pending_links())?;
        for link in pending.into_iter().filter(|l| orphaned(l.owner_pid)) {
            let netns = self.store.read(|tx| {
                Ok([&link.a, &link.b].map(|n| {
                    tx.container(n)
                        .ok()
                        .flatten()
                        .map(|c| c.netns)
                        .unwrap_or_default()
                }))
            })?;
            p2p::teardown([(&netns[0], &link.end_a), (&netns[1], &link.end_b)])
                .await
                .into_result(&format!("clean up the link {} <-> {}", link.a, link.b))?;
            self.store
                .write(|tx| tx.delete_pending_link(&link.a, &link.b))?;
            out.links += 1;
        }
        Ok(())
    }
}
