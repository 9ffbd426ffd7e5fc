//! `publish`: more published ports for a running container. The new ports are recorded
//! (`creating`) before the datapath has them; the change touches only their rows, so its
//! cost doesn't grow with the number of mappings already published.

use anyhow::{Result, bail};

use super::{Controller, ports, spec::Publish};
use crate::{
    driver::bridge,
    fault,
    store::{Status, View as _, model::PortMapping},
};

impl Controller {
    /// Publishes `requests` for container `name` (checked for clashes like at create) and
    /// returns the new mappings.
    pub async fn publish(&mut self, name: &str, requests: &[Publish]) -> Result<Vec<PortMapping>> {
        let _lock = self.store.lock()?;
        self.collect_garbage().await?;
        let (c, net) = self.store.read(|tx| {
            let c = tx.container_record(name)?;
            let net = match c.network.as_deref() {
                Some(n) if c.mode == crate::store::model::Mode::Bridge => tx.network_required(n)?,
                _ => bail!(
                    "container {name:?} is not on a bridge network: it has no ports to publish"
                ),
            };
            Ok((c, net))
        })?;
        if c.status != Status::Running {
            bail!("container {name:?} is {}", c.status.name());
        }
        let dp = self.datapaths.open(net.datapath)?;
        let added = self.store.write(|tx| {
            let added = ports::assign(requests, net.host_ip, |m| tx.port_clash(m))?;
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
}
