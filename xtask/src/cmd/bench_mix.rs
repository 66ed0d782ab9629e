//! `cargo xtask bench-mix`.

use crate::device::DeviceSpec;

/// Flags of `cargo xtask bench-mix`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `cargo xtask bench-mix`.
pub fn run(_args: Args, _device: DeviceSpec) -> anyhow::Result<()> {
    super::not_implemented("bench-mix")
}
