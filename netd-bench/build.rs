//! Builds the `redirect` arm's program (`netd-bench-ebpf`) with the nightly toolchain and
//! bpf-linker (`cargo xtask setup` installs both), for `bench::arms` to embed.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let package = Package {
        name: "netd-bench-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../netd-bench-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}
