//! Builds the kernel programs (`node-ebpf`) with the nightly toolchain for
//! `bpfel-unknown-none` and leaves the object in OUT_DIR, where
//! `redirect.rs` embeds it. Needs bpf-linker and the nightly rust-src
//! (`scripts/setup.sh` installs both).
fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "node-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../node-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
