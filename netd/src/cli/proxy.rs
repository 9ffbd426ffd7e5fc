//! `netd proxy` (hidden): one userland proxy of the iptables datapath, which netd starts
//! itself for a port published on loopback (see `datapath::proxy`); not a command for users.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Result, anyhow};

use crate::{
    core::ports::proto_name,
    datapath::{Protocol, proxy},
};

#[derive(clap::Parser)]
pub struct Args {
    /// tcp or udp
    #[arg(long, value_parser = parse_proto)]
    proto: Protocol,
    /// The loopback address and port to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The container's address and port to forward to.
    #[arg(long)]
    to: SocketAddr,
    /// Where the proxy records itself (its PID and arguments).
    #[arg(long, value_name = "FILE")]
    pid_file: PathBuf,
}

fn parse_proto(name: &str) -> Result<Protocol> {
    [Protocol::Tcp, Protocol::Udp]
        .into_iter()
        .find(|p| proto_name(*p) == name)
        .ok_or_else(|| anyhow!("unknown protocol {name:?} (known: tcp, udp)"))
}

/// Runs the proxy and returns its exit status. Its error is one line on stderr, without
/// netd's prefix: netd hands it on as the publish's own.
pub fn main(args: Args) -> i32 {
    match proxy::run(args.proto, args.listen, args.to, &args.pid_file) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e:#}");
            1
        }
    }
}

/// `netd-cni proxy ARGS`: the proxies netd-cni starts run its own executable, as netd's run
/// netd's.
pub fn standalone() -> i32 {
    use clap::Parser as _;
    // Parsed as if `proxy` were the program's name.
    main(Args::parse_from(std::env::args_os().skip(1)))
}
