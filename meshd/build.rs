//! Builds the eBPF programs (`meshd-ebpf`) with nightly and bpf-linker and
//! leaves the object in `OUT_DIR` for `include_bytes_aligned!`.
use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    // The eBPF package sits beside this one in the workspace.
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../meshd-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "meshd-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
