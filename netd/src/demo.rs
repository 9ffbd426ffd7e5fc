//! `netd demo`: the main job, end to end, in a sandbox it builds and removes.
use anyhow::Result;

pub async fn run() -> Result<()> {
    anyhow::bail!("demo: not written yet")
}
