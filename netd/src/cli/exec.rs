//! `netd exec NAME -- CMD`: reads the container's record (no lock: a long-running command
//! blocks nobody) and runs CMD in its namespace.

use anyhow::Result;

use super::Global;
use crate::driver::exec;

#[derive(clap::Args)]
pub struct Args {
    name: String,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn run(global: &Global, args: Args) -> Result<()> {
    let mut ctl = global.controller()?;
    let c = ctl.container(&args.name)?;
    let dir = ctl.container_dir(&args.name);
    // The database is closed before the command runs.
    drop(ctl);
    let code = exec::run(&c, &dir, &args.command)?;
    std::process::exit(code);
}
