//! `cargo xtask bench-data`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask bench-data`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask bench-data`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("bench-data")
}
