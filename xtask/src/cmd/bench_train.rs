//! `cargo xtask bench-train`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask bench-train`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask bench-train`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("bench-train")
}
