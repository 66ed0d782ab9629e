//! `cargo xtask eval`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask eval`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask eval`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("eval")
}
