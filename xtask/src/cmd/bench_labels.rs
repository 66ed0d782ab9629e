//! `cargo xtask bench-labels`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask bench-labels`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask bench-labels`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("bench-labels")
}
