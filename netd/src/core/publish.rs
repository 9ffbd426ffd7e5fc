//! `publish` and `unpublish`: more or fewer published ports for a running container. The
//! ports changed are recorded (`creating`, `removing`) before the datapath changes; the change
//! touches only their rows, so its cost doesn't grow with the number of mappings published.

use anyhow::{Result, bail};

use super::{Controller, ports, spec::Publish};
use crate::{
    driver::bridge,
    fault,
    store::{
        Container, Network, Status, Tx, View as _,
        model::{Exposed, Mode, PortMapping},
    },
};

impl Controller {
    /// Publishes `requests` for container `name` (checked for clashes like at create) and
    /// returns the new mappings.
    pub async fn publish(&mut self, name: &str, requests: &[Publish]) -> Result<Vec<PortMapping>> {
        bridge::check_host_has(requests.iter().filter_map(|p| p.host_ip))?;
        let _lock = self.store.lock()?;
        self.collect_garbage().await?;
        let (c, net) = self.store.read(|tx| running_on_bridge(tx, name))?;
        let dp = self.datapaths.open(net.datapath)?;
        let added = self.store.write(|tx| {
            let added = ports::assign(requests, net.host_ip.map(Into::into), |m| tx.port_clash(m))?;
            tx.add_ports(name, &added, Status::Creating)?;
            Ok(added)
        })?;
        fault::step("publish-record");
        if let Err(e) = dp.publish(&net.spec(), &bridge::port_specs(&c, &added, net.id)) {
            // The datapath rolled back its own partial work.
            self.store.write(|tx| tx.delete_ports(name, &added))?;
            return Err(e);
        }
        fault::step("publish-datapath");
        self.store
            .write(|tx| tx.set_ports_status(name, &added, Status::Running))?;
        Ok(added)
    }

    /// Unpublishes the ports of container `name` that `requests` name (see
    /// [`ports::select_published`]; every one must be published) and returns them. New flows
    /// to them are refused from then on; established ones carry on until they end, as under
    /// Docker (the datapath's connection tracking keeps their translation).
    pub async fn unpublish(
        &mut self,
        name: &str,
        requests: &[Publish],
    ) -> Result<Vec<PortMapping>> {
        let _lock = self.store.lock()?;
        self.collect_garbage().await?;
        let (c, net, published) = self.store.read(|tx| {
            let (c, net) = running_on_bridge(tx, name)?;
            Ok((c, net, tx.ports_of(name)?))
        })?;
        let gone =
            ports::select_published(name, requests, net.host_ip.map(Into::into), &published)?;
        let dp = self.datapaths.open(net.datapath)?;
        self.store
            .write(|tx| tx.set_ports_status(name, &gone, Status::Removing))?;
        fault::step("unpublish-removing");
        if let Err(e) = dp.unpublish(&net.spec(), &bridge::port_specs(&c, &gone, net.id)) {
            // What the datapath still has stays recorded, ownerless: `gc` retries.
            self.store.write(|tx| tx.disown_ports(name, &gone))?;
            return Err(e);
        }
        fault::step("unpublish-datapath");
        self.store.write(|tx| tx.delete_ports(name, &gone))?;
        Ok(gone)
    }

    /// Sets container `name`'s exposed ports: what a `--link` to it opens from then on (for
    /// an engine that tells them after making the container, as Docker does).
    pub fn set_exposed(&mut self, name: &str, exposed: Vec<Exposed>) -> Result<()> {
        let exposed = Exposed::canonical(exposed);
        self.store.write(|tx| {
            let c = tx.container_record(name)?;
            tx.put_container(&Container { exposed, ..c })
        })
    }
}

/// Container `name` (its record, without its ports) and its network, when it is running on a
/// bridge network (the only kind with ports to publish).
fn running_on_bridge(tx: &Tx, name: &str) -> Result<(Container, Network)> {
    let c = tx.container_record(name)?;
    let net = match c.network.as_deref() {
        Some(n) if c.mode == Mode::Bridge => tx.network_required(n)?,
        _ => bail!("container {name:?} is not on a bridge network: it has no ports to publish"),
    };
    if c.status != Status::Running {
        bail!("container {name:?} is {}", c.status.name());
    }
    Ok((c, net))
}
