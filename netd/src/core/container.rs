//! Containers: create and remove. A container is recorded (`creating`, with the pid of the
//! process making it) before any kernel object exists for it, and stays recorded (`removing`)
//! until everything is gone; a failure midway is undone by the same teardown `rm` uses, and
//! `gc` does the same for a process that died.

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};

use super::{
    Controller,
    network::Settled,
    plan,
    spec::{ContainerSpec, DEFAULT_NETWORK, Mode},
};
use crate::{
    datapath::{Datapath, LinkSpec},
    driver::{
        Failures,
        bridge::{self, OnNetwork, Published, Stage},
        etcfiles::{self, Linked},
    },
    fault,
    store::{Container, Network, Status, Tx, View as _, model::PortMapping},
};

impl Controller {
    /// Creates container `spec`. On failure nothing is left.
    pub async fn create_container(&mut self, spec: ContainerSpec) -> Result<Container> {
        spec.validate()?;
        let _lock = self.store.lock()?;
        self.collect_garbage().await?;
        if !matches!(spec.mode, Mode::Host | Mode::Container(_)) {
            bridge::check_netns(&spec.name, &spec.netns)?;
        }
        let free_veth = match &spec.mode {
            Mode::Bridge(at) => {
                bridge::check_host_has(at.publish.iter().filter_map(|p| p.host_ip))?;
                if at.network == DEFAULT_NETWORK {
                    self.ensure_default_network().await?;
                }
                bridge::free_veth_name(&spec.name).await?
            }
            _ => String::new(),
        };
        let host = plan::Host {
            netns: self.host_netns.clone(),
            free_veth,
        };
        let mut c = self.store.write(|tx| {
            let c = plan::container(tx, &spec, &host)?;
            tx.put_container(&c)?;
            tx.add_ports(&c.name, &c.ports, Status::Creating)?;
            Ok(c)
        })?;
        fault::step("container-record");
        if let Err(e) = self.realize(&mut c).await {
            // As recorded: which datapath steps completed.
            let c = self.store.read(|tx| tx.container_required(&c.name))?;
            let failed = self.teardown(&c).await?;
            return Err(self.settle_container(&c, failed, e).into());
        }
        c.status = Status::Running;
        self.store.write(|tx| tx.put_container(&c))?;
        self.refresh_linkers(&c.name)?;
        Ok(c)
    }

    /// Makes planned container `c`'s kernel objects and files, recording each datapath step
    /// once it is done.
    async fn realize(&mut self, c: &mut Container) -> Result<()> {
        let attached = self.attached(c)?;
        let on = attached.as_ref().map(Attached::on);
        let store = &mut self.store;
        bridge::setup_container(c, on.as_ref(), |stage| {
            store.write(|tx| match stage {
                Stage::Endpoint(ifindex) => {
                    let mut rec = tx.container_record(&c.name)?;
                    rec.endpoint_added = true;
                    rec.host_ifindex = Some(ifindex);
                    tx.put_container(&rec)
                }
                Stage::Published => tx.set_ports_status(&c.name, &c.ports, Status::Running),
            })
        })
        .await?;
        // What the stages recorded.
        let recorded = self.store.read(|tx| tx.container_record(&c.name))?;
        c.endpoint_added = recorded.endpoint_added;
        c.host_ifindex = recorded.host_ifindex;
        let linked = self.store.read(|tx| linked_addresses(tx, c))?;
        etcfiles::write(&self.store.container_dir(&c.name), c, &linked)?;
        fault::step("container-files");
        Ok(())
    }

    /// For a bridge-mode container: its network, that network's datapath, and what its
    /// `--link`s open.
    fn attached(&mut self, c: &Container) -> Result<Option<Attached>> {
        let Some(network) = c.network.as_deref() else {
            return Ok(None);
        };
        let (net, links) = self
            .store
            .read(|tx| Ok((tx.network_required(network)?, link_specs(tx, c)?)))?;
        let dp = self.datapaths.open(net.datapath)?;
        Ok(Some(Attached { net, dp, links }))
    }

    /// Removes container `name`: everything it has, then its record. What can't be removed
    /// stays recorded for `gc` to retry, and the command fails naming it.
    pub async fn remove_container(&mut self, name: &str) -> Result<()> {
        let _lock = self.store.lock()?;
        // A container whose earlier removal failed midway is finished by the garbage
        // collection: then it is removed, as asked.
        let half_removed = self
            .store
            .read(|tx| tx.container(name))?
            .is_some_and(|c| c.status == Status::Removing);
        self.collect_garbage().await?;
        let Some(c) = self.store.read(|tx| tx.container(name))? else {
            if half_removed {
                return Ok(());
            }
            bail!("no container named {name:?}");
        };
        let sharers = self.store.read(|tx| tx.sharers_of(name))?;
        if !sharers.is_empty() {
            bail!(
                "container {name:?} shares its network namespace with: {}",
                sharers.join(", ")
            );
        }
        if c.status != Status::Running {
            bail!("container {name:?} is {}", c.status.name());
        }
        self.store.write(|tx| {
            tx.put_container(&Container {
                status: Status::Removing,
                creator_pid: std::process::id(),
                ..c.clone()
            })
        })?;
        fault::step("container-removing");
        let failed = self.teardown(&c).await?;
        self.settle_container(&c, failed, anyhow::anyhow!("remove container {name:?}"))
            .into_result()?;
        self.refresh_linkers(name)
    }

    /// Removes every kernel object and file of `c` (as it was before its removal started:
    /// what a `running` container has must go; what a `creating` or `removing` one may have
    /// goes if it is there).
    pub(super) async fn teardown(&mut self, c: &Container) -> Result<Failures> {
        let attached = self.attached(c)?;
        let on = attached.as_ref().map(Attached::on);
        let rows = self.store.read(|tx| tx.port_rows(&c.name))?;
        let (sure, maybe): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|(_, status)| *status == Status::Running && c.status != Status::Removing);
        let ports =
            |rows: Vec<(PortMapping, Status)>| rows.into_iter().map(|(p, _)| p).collect::<Vec<_>>();
        let (sure, maybe) = (ports(sure), ports(maybe));
        let endpoint_sure = c.endpoint_added && c.status != Status::Removing;
        let record = Container {
            endpoint_added: endpoint_sure,
            ..c.clone()
        };
        Ok(bridge::teardown_container(
            &record,
            on.as_ref(),
            Published {
                sure: &sure,
                maybe: &maybe,
            },
            &self.store.container_dir(&c.name),
        )
        .await)
    }

    /// After a teardown of `c`: forgets it (and the other ends of its `netd link`s) when
    /// everything went, else keeps it as `removing` for `gc` to retry.
    pub(super) fn settle_container(
        &mut self,
        c: &Container,
        failed: Failures,
        error: anyhow::Error,
    ) -> Settled {
        let kept = !failed.is_empty();
        let recorded = self.store.write(|tx| {
            if kept {
                return tx.put_container(&Container {
                    status: Status::Removing,
                    creator_pid: 0,
                    ..c.clone()
                });
            }
            tx.delete_container(&c.name)?;
            for link in &c.peer_links {
                if let Some(mut peer) = tx.container(&link.peer)? {
                    peer.peer_links.retain(|l| l.peer != c.name);
                    tx.put_container(&peer)?;
                }
            }
            Ok(())
        });
        Settled::new(error, failed, recorded)
    }

    /// Rewrites the files of the containers that link to `name`, so their hosts entries follow
    /// it when it is re-created with another address (or goes).
    fn refresh_linkers(&mut self, name: &str) -> Result<()> {
        let linkers = self.store.read(|tx| {
            tx.linkers_of(name)?
                .into_iter()
                .filter(|c| c.status == Status::Running)
                .map(|c| Ok((linked_addresses(tx, &c)?, c)))
                .collect::<Result<Vec<_>>>()
        })?;
        for (linked, c) in linkers {
            etcfiles::write(&self.store.container_dir(&c.name), &c, &linked)
                .with_context(|| format!("rewrite the files of {}", c.name))?;
        }
        Ok(())
    }
}

/// A bridge-mode container's network, that network's datapath, and what its `--link`s open.
struct Attached {
    net: Network,
    dp: Box<dyn Datapath>,
    links: Vec<LinkSpec>,
}

impl Attached {
    fn on(&self) -> OnNetwork<'_> {
        OnNetwork {
            net: &self.net,
            dp: &*self.dp,
            links: self.links.clone(),
        }
    }
}

/// The current addresses of the containers `c` links to.
fn linked_addresses(tx: &Tx, c: &Container) -> Result<Linked> {
    let mut linked = Linked::new();
    for link in &c.links {
        if let Some(other) = tx.container(&link.container)? {
            let ips = [other.ip.map(IpAddr::from), other.ip6.map(IpAddr::from)];
            let ips: Vec<IpAddr> = ips.into_iter().flatten().collect();
            if !ips.is_empty() {
                linked.insert(link.container.clone(), ips);
            }
        }
    }
    Ok(linked)
}

/// What `c`'s `--link`s open: every exposed and published port of each linked container
/// still there.
fn link_specs(tx: &Tx, c: &Container) -> Result<Vec<LinkSpec>> {
    let mut specs = Vec::new();
    for link in &c.links {
        let Some(peer) = tx.container(&link.container)? else {
            continue;
        };
        let Some(ip) = peer.ip else { continue };
        // Over IPv6 too when both ends have an IPv6 address.
        let peer6 = peer.ip6.filter(|_| c.ip6.is_some());
        specs.extend(peer.link_ports().into_iter().map(|(proto, port)| LinkSpec {
            peer: ip,
            peer6,
            proto,
            port,
        }));
    }
    Ok(specs)
}
