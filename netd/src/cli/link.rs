//! `netd link A B [--ip A_IP --ip B_IP]`.

use std::net::Ipv4Addr;

use anyhow::{Result, bail};

use super::Global;
use crate::core::spec::LinkAddrs;

#[derive(clap::Args)]
pub struct Args {
    a: String,
    b: String,
    /// The ends' addresses, A's then B's, for containers without one of their own
    /// (`--network none`); from the link pool when not given.
    #[arg(long, value_name = "IP", num_args = 1)]
    ip: Vec<Ipv4Addr>,
}

pub async fn run(global: &Global, args: Args) -> Result<()> {
    let addrs = match args.ip.as_slice() {
        [] => LinkAddrs::default(),
        [a, b] => LinkAddrs {
            a: Some(*a),
            b: Some(*b),
        },
        _ => bail!("--ip is given twice or not at all: A's address, then B's"),
    };
    global.controller()?.link(&args.a, &args.b, addrs).await?;
    println!("linked {} <-> {}", args.a, args.b);
    Ok(())
}
