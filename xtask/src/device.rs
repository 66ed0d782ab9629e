//! The `--device` flag: parsing, and re-running `cargo xtask` with the GPU feature it needs.

use anyhow::{bail, Context, Result};
use std::fmt;
use std::str::FromStr;

/// Where tensors live: `cpu`, `cuda[:N]` or `metal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            "metal" => Ok(Self::Metal),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| format!("bad CUDA ordinal in `{s}`: expected cuda:N")),
                None => Err(format!(
                    "unknown device `{s}`: expected cpu, cuda[:N] or metal"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// The cargo feature this binary needs for the device, if any.
    pub fn required_feature(self) -> Option<&'static str> {
        match self {
            Self::Cpu => None,
            Self::Cuda(_) => Some("cuda"),
            Self::Metal => Some("metal"),
        }
    }

    /// Whether this binary was compiled with support for the device.
    pub fn compiled_in(self) -> bool {
        match self {
            Self::Cpu => true,
            Self::Cuda(_) => cfg!(feature = "cuda"),
            Self::Metal => cfg!(feature = "metal"),
        }
    }

    /// Opens the candle device.
    pub fn open(self) -> Result<candle_core::Device> {
        Ok(match self {
            Self::Cpu => candle_core::Device::Cpu,
            Self::Cuda(n) => {
                let device = candle_core::Device::new_cuda(n)
                    .with_context(|| format!("cannot open CUDA device {n}"))?;
                // Only speed depends on it, so a driver that refuses is a warning.
                #[cfg(feature = "cuda")]
                if let Err(err) = snapmix_models::ops::cuda::memory::retain_freed_memory(&device) {
                    eprintln!(
                        "warning: CUDA device {n}'s memory pool keeps its default release \
                         threshold ({err}); steps may re-map freed memory"
                    );
                }
                device
            }
            Self::Metal => {
                candle_core::Device::new_metal(0).context("cannot open the Metal device")?
            }
        })
    }
}

/// Set on the child when `cargo xtask` re-runs itself, so it can never loop.
const REINVOKED_ENV: &str = "SNAPMIX_XTASK_REINVOKED";

/// If `device` needs a feature this binary lacks, re-run the same command through cargo with
/// `--release --features <feature>` and return its exit code; `None` means carry on here.
pub fn reinvoke_with_feature(device: DeviceSpec) -> Result<Option<i32>> {
    let Some(feature) = device.required_feature() else {
        return Ok(None);
    };
    if device.compiled_in() {
        return Ok(None);
    }
    let Ok(cargo) = std::env::var("CARGO") else {
        bail!(
            "this binary was built without the `{feature}` feature, so `--device {device}` \
             cannot work; rebuild it with `cargo build --release -p xtask --features {feature}` \
             (or run it through `cargo xtask`, which does so)"
        );
    };
    if std::env::var_os(REINVOKED_ENV).is_some() {
        bail!("rebuilt with `--features {feature}` but the feature is still missing");
    }
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    eprintln!("xtask: `--device {device}` needs the `{feature}` feature: rebuilding with `cargo run --release --features {feature}`");
    let status = std::process::Command::new(cargo)
        .args(["run", "--release", "--quiet", "--manifest-path", manifest])
        .args(["--features", feature, "--"])
        .args(std::env::args_os().skip(1))
        .env(REINVOKED_ENV, "1")
        .status()
        .context("cannot start cargo to rebuild xtask")?;
    Ok(Some(status.code().unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_device_form() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("metal".parse(), Ok(DeviceSpec::Metal));
        assert!("cuda:x"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .contains("cuda:x"));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("tpu"));
    }

    #[test]
    fn cpu_never_needs_a_rebuild() {
        assert_eq!(reinvoke_with_feature(DeviceSpec::Cpu).unwrap(), None);
        assert!(DeviceSpec::Cpu.compiled_in());
    }
}
