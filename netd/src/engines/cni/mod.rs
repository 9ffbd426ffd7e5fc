//! `netd-cni`: netd as a CNI plugin (for Podman, containerd, CRI-O and Kubernetes).
//!
//! Invoked as the spec says: the verb and the container in `CNI_*` variables, the network
//! configuration on stdin, the result (or an error object) on stdout, exit status 0 or 1.
//! The plugin's configuration names the netd network (`name`), netd's network options and
//! the instance (`stateDir`, `bpffs`, `hostNetns`); the network is made on the first ADD.

pub mod commands;
pub mod types;

use std::{io::Read as _, path::PathBuf};

use serde_json::Value;

use commands::Call;
use types::{CniError, Code, Config, SUPPORTED_VERSIONS, version_json};

/// The largest config read from stdin: a runtime's is a few KiB even with thousands of port
/// mappings; past this only memory would grow.
const MAX_CONFIG: u64 = 16 << 20;

/// Runs one CNI call and returns the process's exit status.
pub fn main() -> i32 {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    let read = std::io::stdin()
        .take(MAX_CONFIG + 1)
        .read_to_string(&mut stdin)
        .and_then(|n| {
            if n as u64 > MAX_CONFIG {
                Err(std::io::Error::other(format!(
                    "the config is over {} MiB",
                    MAX_CONFIG >> 20
                )))
            } else {
                Ok(n)
            }
        });
    // Errors carry the config's version when it has a supported one.
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_string());
    let outcome = match read {
        Ok(_) => run(&command, &stdin),
        Err(e) => Err(CniError::new(Code::Io, format!("read stdin: {e}"))),
    };
    match outcome {
        Ok(Some(out)) => {
            println!("{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            println!("{}", e.to_json(&version));
            1
        }
    }
}

fn run(command: &str, stdin: &str) -> Result<Option<Value>, CniError> {
    if command == "VERSION" {
        let requested = serde_json::from_str::<Value>(stdin).ok();
        let requested = requested.as_ref().and_then(|v| v["cniVersion"].as_str());
        return Ok(Some(version_json(requested)));
    }
    let config = parse_config(stdin)?;
    let at_least_1_1 = config.cni_version == "1.1.0";
    if matches!(command, "STATUS" | "GC") && !at_least_1_1 {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "{command} needs cniVersion 1.1.0, the config has {}",
                config.cni_version
            ),
        ));
    }
    if let Some(ns) = &config.host_netns {
        // Before any thread exists: the runtime's threads inherit the host namespace.
        crate::netns::enter(ns)
            .map_err(|e| CniError::new(Code::InvalidConfig, format!("{e:#}")))?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(Code::Io, format!("start the runtime: {e}")))?;
    runtime.block_on(async {
        match command {
            "ADD" => commands::add(&config, &call()?).await.map(Some),
            "DEL" => commands::del(&config, &call()?).await.map(|()| None),
            "CHECK" => commands::check(&config, &call()?).await.map(|()| None),
            "STATUS" => commands::status(&config).map(|()| None),
            "GC" => commands::gc(&config).await.map(|()| None),
            "" => Err(CniError::new(
                Code::InvalidEnvironment,
                "CNI_COMMAND is not set",
            )),
            other => Err(CniError::new(
                Code::InvalidEnvironment,
                format!("unknown CNI_COMMAND {other:?}"),
            )),
        }
    })
}

fn parse_config(stdin: &str) -> Result<Config, CniError> {
    let config: Config = serde_json::from_str(stdin).map_err(|e| {
        let code = if e.is_data() {
            Code::InvalidConfig
        } else {
            Code::Decode
        };
        CniError::new(code, format!("network configuration: {e}"))
    })?;
    if !SUPPORTED_VERSIONS.contains(&config.cni_version.as_str()) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "cniVersion {:?} is not one netd-cni speaks ({})",
                config.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    crate::core::spec::validate_name("network", &config.name)
        .map_err(|e| CniError::new(Code::InvalidConfig, format!("{e:#}")))?;
    Ok(config)
}

fn env(name: &str) -> Result<String, CniError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CniError::new(Code::InvalidEnvironment, format!("{name} is not set")))
}

/// The container the call is about, from `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_NETNS` and
/// `CNI_ARGS`.
fn call() -> Result<Call, CniError> {
    Ok(Call {
        container_id: env("CNI_CONTAINERID")?,
        ifname: ifname(env("CNI_IFNAME")?)?,
        netns: env("CNI_NETNS").ok().map(PathBuf::from),
        ip: args_ip(&std::env::var("CNI_ARGS").unwrap_or_default())?,
    })
}

/// `CNI_IFNAME`, any name the spec (and the kernel) allow: each is an endpoint of its own, so
/// a namespace can be on several networks (podman's `eth1`, ...).
fn ifname(name: String) -> Result<String, CniError> {
    crate::core::spec::validate_ifname(&name)
        .map_err(|e| CniError::new(Code::InvalidEnvironment, format!("CNI_IFNAME: {e:#}")))?;
    Ok(name)
}

/// `CNI_ARGS` (`KEY=VALUE;...`): `IP` asks for an address (podman's `--ip`); other keys
/// are refused unless `IgnoreUnknown` is set, as libcni's argument loading does.
fn args_ip(args: &str) -> Result<Option<std::net::Ipv4Addr>, CniError> {
    let pairs: Vec<(&str, &str)> = args
        .split(';')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let ignore_unknown = pairs
        .iter()
        .any(|(k, v)| *k == "IgnoreUnknown" && matches!(*v, "1" | "true"));
    let mut ip = None;
    for (key, value) in pairs {
        match key {
            "IP" => {
                ip = Some(value.parse().map_err(|_| {
                    CniError::new(
                        Code::InvalidEnvironment,
                        format!("CNI_ARGS IP={value}: not an IPv4 address"),
                    )
                })?)
            }
            "IgnoreUnknown" => {}
            other if !ignore_unknown => {
                return Err(CniError::new(
                    Code::UnsupportedField,
                    format!("CNI_ARGS {other}: netd-cni takes IP (or set IgnoreUnknown=1)"),
                ));
            }
            _ => {}
        }
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_give_the_address_and_refuse_unknown_keys_unless_told() {
        assert_eq!(args_ip("").unwrap(), None);
        assert_eq!(
            args_ip("IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.1.0.9").unwrap(),
            Some("10.1.0.9".parse().unwrap())
        );
        assert_eq!(
            args_ip("K8S_POD_NAME=web").unwrap_err().code,
            Code::UnsupportedField
        );
        assert_eq!(
            args_ip("IP=banana").unwrap_err().code,
            Code::InvalidEnvironment
        );
    }

    #[test]
    fn any_interface_name_the_kernel_takes_and_no_other() {
        for good in ["eth0", "eth1", "net1", "a"] {
            assert_eq!(ifname(good.into()).unwrap(), good);
        }
        for bad in ["", ".", "..", "eth/1", "eth:1", "eth 1", "a-sixteen-letter"] {
            assert_eq!(
                ifname(bad.into()).unwrap_err().code,
                Code::InvalidEnvironment,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn config_errors_carry_the_spec_codes() {
        assert_eq!(parse_config("{").unwrap_err().code, Code::Decode);
        let bad_type = r#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#;
        assert_eq!(
            parse_config(bad_type).unwrap_err().code,
            Code::InvalidConfig
        );
        let old = r#"{"cniVersion":"0.3.1","name":"n"}"#;
        assert_eq!(
            parse_config(old).unwrap_err().code,
            Code::IncompatibleVersion
        );
        assert!(parse_config(r#"{"cniVersion":"0.4.0","name":"n"}"#).is_ok());
    }

    #[test]
    fn endpoint_names_are_stable_and_distinct() {
        let a = commands::endpoint_name("n", "ctr", "eth0");
        assert_eq!(a, commands::endpoint_name("n", "ctr", "eth0"));
        assert_ne!(a, commands::endpoint_name("m", "ctr", "eth0"));
        assert_ne!(a, commands::endpoint_name("n", "ctr", "eth1"));
        assert!(a.starts_with("cni-") && a.len() == 20, "{a}");
    }
}
