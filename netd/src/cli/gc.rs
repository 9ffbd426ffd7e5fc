//! `netd gc`.

use anyhow::Result;

use super::{Global, views};

pub async fn run(global: &Global) -> Result<()> {
    let collected = global.controller()?.gc().await?;
    println!("{}", views::collected(&collected));
    Ok(())
}
