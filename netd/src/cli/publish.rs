//! `netd publish NAME -p SPEC...` and `netd port NAME`.

use anyhow::Result;

use super::{Global, views};
use crate::core::ports;

#[derive(clap::Args)]
pub struct Args {
    name: String,
    /// [IP:]HOSTPORT[-END]:CPORT[-END][/tcp|/udp]
    #[arg(short = 'p', long = "publish", required = true)]
    publish: Vec<String>,
}

#[derive(clap::Args)]
pub struct PortArgs {
    name: String,
}

pub async fn run(global: &Global, args: Args) -> Result<()> {
    let requests: Vec<ports::Publish> = args
        .publish
        .iter()
        .map(|p| ports::parse_publish(p))
        .collect::<Result<_>>()?;
    for p in global.controller()?.publish(&args.name, &requests).await? {
        println!("{}", views::port_line(&p));
    }
    Ok(())
}

pub fn port(global: &Global, args: PortArgs) -> Result<()> {
    for p in &global.controller()?.container(&args.name)?.ports {
        println!("{}", views::port_line(p));
    }
    Ok(())
}
