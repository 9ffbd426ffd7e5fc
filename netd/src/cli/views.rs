//! What the commands print: tables for people, JSON for scripts.

use std::io::Write as _;

use anyhow::Result;
use serde_json::json;

use super::output;
use crate::{
    core::{Controller, gc::Collected, ports::proto_name},
    datapath::{Counter, EndpointDrops, Flow},
    store::{
        Container, Network,
        model::{Mode, PortMapping},
    },
};

/// `netd network create`'s line.
pub fn network_created(net: &Network) -> String {
    format!(
        "{} {} gateway {} bridge {} ({})",
        net.name, net.subnet, net.gateway, net.bridge, net.datapath
    )
}

/// `netd container create`'s lines: name and address, then each published port.
pub fn container_created(c: &Container) -> String {
    let ip = c.ip.map(|ip| format!(" {ip}")).unwrap_or_default();
    let mut out = format!("{}{ip}\n", c.name);
    for p in &c.ports {
        out.push_str(&format!("  {}\n", port_line(p)));
    }
    out
}

/// `netd gc`'s summary.
pub fn collected(c: &Collected) -> String {
    let mut out = format!(
        "removed {} half-made container(s){}",
        c.containers.len(),
        if c.containers.is_empty() {
            String::new()
        } else {
            format!(": {}", c.containers.join(", "))
        }
    );
    if !c.networks.is_empty() {
        out.push_str(&format!(
            "\nremoved {} half-made network(s): {}",
            c.networks.len(),
            c.networks.join(", ")
        ));
    }
    if c.ports > 0 {
        out.push_str(&format!("\nremoved {} half-published port(s)", c.ports));
    }
    if c.links > 0 {
        out.push_str(&format!("\nremoved {} half-made link(s)", c.links));
    }
    out
}

pub fn network_ls(ctl: &mut Controller, json: bool) -> Result<()> {
    let networks = ctl.networks()?;
    if json {
        return output::json(&networks);
    }
    let mut rows = Vec::new();
    for n in &networks {
        let mut flags = vec![];
        if !n.icc {
            flags.push("icc=false");
        }
        if n.internal {
            flags.push("internal");
        }
        if !n.masquerade {
            flags.push("masquerade=false");
        }
        rows.push(vec![
            n.name.clone(),
            n.bridge.clone(),
            n.subnet.to_string(),
            n.gateway.to_string(),
            n.datapath.to_string(),
            ctl.containers_on(&n.name)?.len().to_string(),
            flags.join(","),
        ]);
    }
    output::table(
        &[
            "NAME",
            "BRIDGE",
            "SUBNET",
            "GATEWAY",
            "DATAPATH",
            "CONTAINERS",
            "FLAGS",
        ],
        &rows,
    );
    Ok(())
}

pub fn network_inspect(ctl: &mut Controller, name: &str) -> Result<()> {
    let net = ctl.network(name)?;
    let containers: Vec<_> = ctl
        .containers_on(name)?
        .iter()
        .map(|c| json!({"name": c.name, "ip": c.ip, "mac": c.mac}))
        .collect();
    output::json(&json!({"network": net, "containers": containers}))
}

fn mode_name(c: &Container) -> String {
    match &c.mode {
        Mode::Bridge => c.network.clone().unwrap_or_default(),
        Mode::Host => "host".into(),
        Mode::None => "none".into(),
        Mode::Container(other) => format!("container:{other}"),
    }
}

/// `80/tcp -> 0.0.0.0:8080`, as `docker port` prints it.
pub fn port_line(p: &PortMapping) -> String {
    let ip = p.host_ip.map_or("0.0.0.0".to_string(), |ip| ip.to_string());
    format!(
        "{}/{} -> {ip}:{}",
        p.container_port,
        proto_name(p.proto),
        p.host_port
    )
}

pub fn container_ls(ctl: &mut Controller, json: bool) -> Result<()> {
    let containers = ctl.containers()?;
    if json {
        return output::json(&containers);
    }
    let rows: Vec<Vec<String>> = containers
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                mode_name(c),
                c.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                c.mac.clone().unwrap_or_default(),
                c.ports.iter().map(port_line).collect::<Vec<_>>().join(", "),
            ]
        })
        .collect();
    output::table(&["NAME", "NETWORK", "IP", "MAC", "PORTS"], &rows);
    Ok(())
}

pub fn container_inspect(ctl: &mut Controller, name: &str) -> Result<()> {
    output::json(&ctl.container(name)?)
}

/// `netd conntrack ls`, printed a flow at a time as the tables are read.
pub struct FlowPrinter {
    out: output::Stream,
    json: Option<output::JsonArray>,
    count: usize,
}

impl FlowPrinter {
    pub fn new(json: bool) -> Self {
        Self {
            out: output::stream(),
            json: json.then(output::JsonArray::default),
            count: 0,
        }
    }

    pub fn print(&mut self, f: &Flow) -> Result<()> {
        self.count += 1;
        if let Some(array) = &mut self.json {
            return array.push(&mut self.out, f);
        }
        let (o, r) = (&f.original, &f.reply);
        writeln!(
            self.out,
            "{} {} {} {}s src={} dst={} sport={} dport={} packets={} bytes={} src={} dst={} sport={} dport={} packets={} bytes={} age={}s",
            f.proto,
            f.nat,
            f.state,
            f.expires_secs,
            o.src,
            o.dst,
            o.sport,
            o.dport,
            o.packets,
            o.bytes,
            r.src,
            r.dst,
            r.sport,
            r.dport,
            r.packets,
            r.bytes,
            f.age_secs
        )?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        match self.json {
            Some(array) => array.finish(&mut self.out)?,
            None => eprintln!("netd: {} flows", self.count),
        }
        self.out.flush()?;
        Ok(())
    }
}

/// `netd stats`.
pub fn stats(reasons: &[Counter], endpoints: &[EndpointDrops], json: bool) -> Result<()> {
    if json {
        return output::json(&json!({ "reasons": reasons, "endpoints": endpoints }));
    }
    let rows: Vec<Vec<String>> = reasons
        .iter()
        .map(|c| {
            vec![
                c.reason.to_string(),
                if c.dropped { "drop" } else { "pass" }.to_string(),
                c.packets.to_string(),
            ]
        })
        .collect();
    output::table(&["REASON", "VERDICT", "PACKETS"], &rows);
    if !endpoints.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = endpoints
            .iter()
            .map(|d| {
                let reasons: Vec<String> = d
                    .reasons
                    .iter()
                    .map(|r| format!("{}={}", r.reason, r.packets))
                    .collect();
                vec![
                    d.endpoint.to_string(),
                    d.dropped.to_string(),
                    reasons.join(","),
                ]
            })
            .collect();
        output::table(&["ENDPOINT", "DROPPED", "REASONS"], &rows);
    }
    Ok(())
}
