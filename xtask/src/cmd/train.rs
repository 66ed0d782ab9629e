//! `cargo xtask train`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask train`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask train`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("train")
}
