//! `netd publish NAME -p SPEC...`, `netd unpublish NAME SPEC...` and `netd port NAME
//! [--json]`.

use anyhow::Result;

use super::{Global, output, views};
use crate::core::ports;

#[derive(clap::Args)]
pub struct Args {
    name: String,
    /// [IP:]HOSTPORT[-END]:CPORT[-END][/tcp|/udp]
    #[arg(short = 'p', long = "publish", required = true)]
    publish: Vec<String>,
}

#[derive(clap::Args)]
pub struct UnpublishArgs {
    name: String,
    /// [IP:][HOSTPORT[-END]:]CPORT[-END][/tcp|/udp], as published (without a host port: every
    /// mapping of the container port)
    #[arg(required = true, value_name = "PORTSPEC")]
    ports: Vec<String>,
}

#[derive(clap::Args)]
pub struct PortArgs {
    name: String,
    #[arg(long)]
    json: bool,
}

pub async fn run(global: &Global, args: Args) -> Result<()> {
    let requests = parse_all(&args.publish)?;
    for p in global.controller()?.publish(&args.name, &requests).await? {
        println!("{}", views::port_line(&p));
    }
    Ok(())
}

/// Prints each mapping unpublished.
pub async fn unpublish(global: &Global, args: UnpublishArgs) -> Result<()> {
    let requests = parse_all(&args.ports)?;
    for p in global
        .controller()?
        .unpublish(&args.name, &requests)
        .await?
    {
        println!("{}", views::port_line(&p));
    }
    Ok(())
}

fn parse_all(specs: &[String]) -> Result<Vec<ports::Publish>> {
    specs.iter().map(|p| ports::parse_publish(p)).collect()
}

pub fn port(global: &Global, args: PortArgs) -> Result<()> {
    let ports = global.controller()?.container(&args.name)?.ports;
    if args.json {
        return output::json(&ports);
    }
    for p in &ports {
        println!("{}", views::port_line(p));
    }
    Ok(())
}
