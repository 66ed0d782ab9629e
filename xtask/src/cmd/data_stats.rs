//! `cargo xtask data-stats`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask data-stats`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask data-stats`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("data-stats")
}
