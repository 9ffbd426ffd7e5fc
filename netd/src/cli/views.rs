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
    let ipv6 = match (net.subnet6, net.gateway6) {
        (Some(subnet6), Some(gateway6)) => format!(", ipv6 {subnet6} gateway {gateway6}"),
        _ => String::new(),
    };
    format!(
        "{} {} gateway {} bridge {} ({}){ipv6}",
        net.name, net.subnet, net.gateway, net.bridge, net.datapath
    )
}

/// A record's addresses of both families, IPv4 first, as one table cell.
fn both(v4: Option<impl ToString>, v6: Option<impl ToString>) -> String {
    let v4 = v4.map(|a| a.to_string());
    let v6 = v6.map(|a| a.to_string());
    [v4, v6]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
}

/// `netd container create`'s lines: name and address, then each published port.
pub fn container_created(c: &Container) -> String {
    let ips = [
        c.ip.map(|ip| ip.to_string()),
        c.ip6.map(|ip| ip.to_string()),
    ];
    let mut out = c.name.clone();
    for ip in ips.into_iter().flatten() {
        out.push_str(&format!(" {ip}"));
    }
    out.push('\n');
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
    if c.proxies.started > 0 {
        out.push_str(&format!(
            "\nrestarted {} userland proxy(ies) that had stopped",
            c.proxies.started
        ));
    }
    if c.proxies.ended > 0 {
        out.push_str(&format!(
            "\nended {} userland proxy(ies) no port needed",
            c.proxies.ended
        ));
    }
    out
}

pub fn network_ls(ctl: &mut Controller, json: bool) -> Result<()> {
    let networks = ctl.networks()?;
    if json {
        // Each network's record with its container count, as the table shows it.
        let mut listed = Vec::new();
        for n in &networks {
            let mut entry = serde_json::to_value(n)?;
            entry["containers"] = ctl.containers_on(&n.name)?.len().into();
            listed.push(entry);
        }
        return output::json(&listed);
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
            both(Some(n.subnet), n.subnet6),
            both(Some(n.gateway), n.gateway6),
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
        .map(|c| json!({"name": c.name, "ip": c.ip, "ip6": c.ip6, "mac": c.mac}))
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
    let host = match p.host_ip {
        Some(ip) => std::net::SocketAddr::new(ip, p.host_port).to_string(),
        None => format!("0.0.0.0:{}", p.host_port),
    };
    format!("{}/{} -> {host}", p.container_port, proto_name(p.proto))
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
                c.status.name().to_string(),
                mode_name(c),
                both(c.ip, c.ip6),
                c.mac.clone().unwrap_or_default(),
                c.ports.iter().map(port_line).collect::<Vec<_>>().join(", "),
            ]
        })
        .collect();
    output::table(&["NAME", "STATUS", "NETWORK", "IP", "MAC", "PORTS"], &rows);
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
