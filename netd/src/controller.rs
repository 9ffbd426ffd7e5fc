//! What every controller command gets: the locked state store, the host namespace, the
//! instance's pins and the datapath new networks use.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{
    bpf::Pins,
    datapath::{self, Datapath},
    state::Store,
};

pub struct Ctx {
    pub store: Store,
    /// The host namespace's path, for containers in `host` mode.
    pub host_netns: PathBuf,
    pub pins: Pins,
    /// `--datapath`: the driver new networks use.
    pub datapath: String,
    pub tuning: datapath::Tuning,
}

impl Ctx {
    /// Locks the state dir for the whole command.
    pub fn open(
        state_dir: &Path,
        host_netns: Option<&Path>,
        bpffs: &Path,
        datapath: &str,
        tuning: datapath::Tuning,
    ) -> Result<Self> {
        Ok(Self {
            store: Store::lock(state_dir)?,
            host_netns: host_netns
                .map_or_else(|| PathBuf::from("/proc/1/ns/net"), Path::to_path_buf),
            pins: Pins::open(bpffs)?,
            datapath: datapath.to_string(),
            tuning,
        })
    }

    /// The driver called `name` (each network records the one it was made with).
    pub fn datapath(&self, name: &str) -> Result<Box<dyn Datapath>> {
        datapath::open(name, &self.pins, &self.tuning)
    }
}
