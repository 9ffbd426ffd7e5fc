//! The CNI wire formats netd-cni reads and writes: the network configuration on stdin, the
//! result and error objects on stdout (CNI spec 0.4.0, 1.0.0 and 1.1.0).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engines::core::Attachment;

/// The spec versions netd-cni speaks (Debian's podman and containerd write 0.4.0 configs).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// The spec's error codes (1-99 are the spec's; 100+ are the plugin's own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    /// STATUS: the plugin can't serve ADDs.
    NotAvailable = 50,
    /// netd's controller refused or failed.
    Netd = 100,
}

/// An error as the spec prints it: `{cniVersion, code, msg, details}`.
#[derive(Debug)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }

    pub fn to_json(&self, version: &str) -> Value {
        json!({ "cniVersion": version, "code": self.code as u32, "msg": self.msg })
    }
}

impl From<anyhow::Error> for CniError {
    fn from(e: anyhow::Error) -> Self {
        Self::new(Code::Netd, format!("{e:#}"))
    }
}

/// One plugin's configuration as the runtime hands it over (the conflist's plugin entry with
/// `name`, `cniVersion`, `runtimeConfig` and `prevResult` added). Unknown keys are ignored,
/// as the spec asks.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub cni_version: String,
    pub name: String,
    /// netd's network options, as `netd network create` takes them.
    pub subnet: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub ip_range: Option<Ipv4Net>,
    /// Dual-stack (on the eBPF datapath IPv6 `portMappings` answer from outside only: from the
    /// host, hairpin or on `::1` they need the iptables one): `subnet6`/`gateway6` as
    /// `--subnet`/`--gateway` of IPv6, a free ULA /64 without `subnet6`.
    pub ipv6: Option<bool>,
    pub subnet6: Option<Ipv6Net>,
    pub gateway6: Option<Ipv6Addr>,
    pub bridge: Option<String>,
    pub icc: Option<bool>,
    pub internal: Option<bool>,
    pub masquerade: Option<bool>,
    pub mtu: Option<u32>,
    pub datapath: Option<String>,
    /// Which netd instance (the CLI's defaults when absent).
    pub state_dir: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub host_netns: Option<PathBuf>,
    /// The cgroup whose processes reach published ports through host addresses and loopback.
    pub host_cgroup: Option<PathBuf>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    pub prev_result: Option<Value>,
    /// GC: the attachments the runtime still has; every other one of this network goes.
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// The capabilities netd-cni declares: `portMappings` and `ips`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    #[serde(default)]
    pub ips: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    #[serde(rename = "hostIP", default)]
    pub host_ip: String,
}

fn tcp() -> String {
    "tcp".into()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The result of ADD: the container's interface, its addresses and default routes (IPv4,
/// then IPv6 on a dual-stack network).
pub fn result_json(version: &str, ifname: &str, a: &Attachment) -> Value {
    let mut ips = vec![(
        format!("{}/{}", a.ip, a.prefix_len),
        a.gateway.to_string(),
        "4",
    )];
    let mut routes = vec![json!({ "dst": "0.0.0.0/0", "gw": a.gateway.to_string() })];
    if let Some((ip6, gateway6)) = a.ip6 {
        ips.push((ip6.to_string(), gateway6.to_string(), "6"));
        routes.push(json!({ "dst": "::/0", "gw": gateway6.to_string() }));
    }
    let ips: Vec<Value> = ips
        .into_iter()
        .map(|(address, gateway, family)| {
            let mut ip = json!({ "address": address, "gateway": gateway, "interface": 0 });
            // 0.3.x/0.4.0 results name the IP version of each address; 1.0.0 dropped it.
            if version.starts_with("0.") {
                ip["version"] = json!(family);
            }
            ip
        })
        .collect();
    json!({
        "cniVersion": version,
        "interfaces": [{
            "name": ifname,
            "mac": crate::core::ipam::format_mac(a.mac),
            "sandbox": a.netns.display().to_string(),
        }],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// ADD's result when an earlier plugin of the chain handed over `prev` (an object): its
/// interfaces, addresses and routes, then this plugin's (whose addresses' `interface`
/// indexes move past the earlier interfaces); its DNS unless this plugin has some.
pub fn after_prev_result(prev: &Value, ours: Value) -> Value {
    let list = |v: &Value, key: &str| v[key].as_array().cloned().unwrap_or_default();
    let earlier = list(prev, "interfaces");
    let offset = earlier.len();
    let mut interfaces = earlier;
    interfaces.extend(list(&ours, "interfaces"));
    let mut ips = list(prev, "ips");
    ips.extend(list(&ours, "ips").into_iter().map(|mut ip| {
        if let Some(i) = ip["interface"].as_u64() {
            ip["interface"] = json!(i + offset as u64);
        }
        ip
    }));
    let mut routes = list(prev, "routes");
    routes.extend(list(&ours, "routes"));
    let dns = match &ours["dns"] {
        Value::Object(d) if !d.is_empty() => ours["dns"].clone(),
        _ => prev.get("dns").cloned().unwrap_or_else(|| json!({})),
    };
    json!({
        "cniVersion": ours["cniVersion"],
        "interfaces": interfaces,
        "ips": ips,
        "routes": routes,
        "dns": dns,
    })
}

/// The addresses a previous result (CHECK's `prevResult`) says the container has.
pub fn prev_result_addresses(prev: &Value) -> Vec<String> {
    prev["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// VERSION's answer.
pub fn version_json(requested: Option<&str>) -> Value {
    json!({
        "cniVersion": requested.unwrap_or(SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1]),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}
