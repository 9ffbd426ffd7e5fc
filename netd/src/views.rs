//! What `ls`, `inspect` and `port` print: tables for people, JSON for scripts.

use anyhow::Result;
use serde_json::json;

use crate::{
    output,
    ports::proto_name,
    state::{Container, Mode, PortMapping, State},
};

pub fn network_ls(state: &State, json: bool) -> Result<()> {
    if json {
        return output::json(&state.networks.values().collect::<Vec<_>>());
    }
    let rows: Vec<Vec<String>> = state
        .networks
        .values()
        .map(|n| {
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
            vec![
                n.name.clone(),
                n.bridge.clone(),
                n.subnet.to_string(),
                n.gateway.to_string(),
                n.datapath.clone(),
                state.containers_on(&n.name).count().to_string(),
                flags.join(","),
            ]
        })
        .collect();
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

pub fn network_inspect(state: &State, name: &str) -> Result<()> {
    let net = state.network(name)?;
    let containers: Vec<_> = state
        .containers_on(name)
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

pub fn container_ls(state: &State, json: bool) -> Result<()> {
    if json {
        return output::json(&state.containers.values().collect::<Vec<_>>());
    }
    let rows: Vec<Vec<String>> = state
        .containers
        .values()
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

pub fn container_inspect(state: &State, name: &str) -> Result<()> {
    output::json(state.container(name)?)
}

pub fn port(state: &State, name: &str) -> Result<()> {
    for p in &state.container(name)?.ports {
        println!("{}", port_line(p));
    }
    Ok(())
}
