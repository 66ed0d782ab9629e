//! `cargo xtask plot`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask plot`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask plot`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("plot")
}
