//! `cargo xtask dist`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask dist`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask dist`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("dist")
}
