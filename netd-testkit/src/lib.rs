//! What the integration tests and the benchmark share: a sandbox to run netd in, driven
//! through the `netd` binary named by `NETD_BIN`.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

pub mod sandbox;

/// The netd binary under test: `NETD_BIN`, which `cargo xtask test|bench|demo` set after
/// building it. There is no fallback: a binary found some other way may be a stale build.
pub fn netd_bin() -> Result<PathBuf> {
    let bin = PathBuf::from(std::env::var_os("NETD_BIN").context(
        "NETD_BIN is not set: run through `cargo xtask test` (or bench, demo), which builds netd and names it",
    )?);
    anyhow::ensure!(bin.is_file(), "NETD_BIN={}: no such file", bin.display());
    Ok(bin)
}
