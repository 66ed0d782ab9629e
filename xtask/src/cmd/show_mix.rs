//! `cargo xtask show-mix`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask show-mix`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask show-mix`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("show-mix")
}
