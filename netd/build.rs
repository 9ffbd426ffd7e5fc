//! Builds the eBPF programs of `netd-ebpf` with the nightly toolchain and bpf-linker
//! (`cargo xtask setup` installs both), for `datapath::pins` to embed.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let package = Package {
        name: "netd-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../netd-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}
