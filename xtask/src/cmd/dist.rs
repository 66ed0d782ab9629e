//! `cargo xtask dist`: a release binary plus a run script, packed as
//! `target/dist/snapmix-<version>-<target>.tar.xz` for GPU machines that have no Rust.

use crate::device::DeviceSpec;
use anyhow::{bail, ensure, Context, Result};
use object::{Object, ObjectKind};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Flags of `cargo xtask dist`.
#[derive(clap::Args)]
pub struct Args {
    /// Cargo features of the packed binary, e.g. `cuda` (comma-separated).
    #[arg(long, default_value = "")]
    features: String,
    /// xz preset, 0 (fast) to 9 (small).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(0..=9))]
    xz_level: u32,
}

/// The run script shipped next to the binary.
const RUN_SCRIPT: &str = include_str!("../../dist/run.sh");

/// Libraries every Linux machine has: not worth checking for.
const SYSTEM_LIBS: &[&str] = &[
    "libc.so",
    "libm.so",
    "libdl.so",
    "librt.so",
    "libpthread.so",
    "libgcc_s.so",
    "libstdc++.so",
    "ld-linux",
];

/// Runs `cargo xtask dist`.
pub fn run(args: Args, _device: DeviceSpec) -> Result<()> {
    let root = super::repo_root();
    let binary = build_release(&root, &args.features)?;
    let target = host_triple()?;
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("snapmix-{version}-{target}");
    let out_dir = root.join("target").join("dist");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let needed = dynamic_libraries(&binary)?;
    let archive = out_dir.join(format!("{name}.tar.xz"));
    pack(&archive, &name, &binary, &needed, args.xz_level)?;
    let size = std::fs::metadata(&archive)?.len();
    println!(
        "{} ({:.1} MiB; features: [{}]; libraries checked by run.sh: {})",
        archive.display(),
        size as f64 / (1024.0 * 1024.0),
        args.features,
        if needed.is_empty() {
            "none".to_string()
        } else {
            needed.join(" ")
        }
    );
    println!("on the target machine: tar -xJf {name}.tar.xz && {name}/run.sh train --device cuda");
    Ok(())
}

/// Builds `xtask` in release mode and returns the path cargo reports for the executable.
fn build_release(root: &Path, features: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--release", "--package", "xtask"])
        .args(["--message-format", "json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !features.is_empty() {
        cmd.args(["--features", features]);
    }
    eprintln!("dist: cargo build --release --package xtask --features '{features}'");
    let output = cmd.output().context("cannot start cargo")?;
    ensure!(
        output.status.success(),
        "cargo build --release failed (see above)"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "xtask")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .context("cargo built no xtask executable")
}

fn host_triple() -> Result<String> {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("cannot run rustc -vV")?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.lines().find_map(|line| line.strip_prefix("host: ")) {
        Some(host) => Ok(host.trim().to_string()),
        None => bail!("rustc -vV printed no host line"),
    }
}

/// The shared libraries the executable names (ELF DT_NEEDED), less the C runtime's.
fn dynamic_libraries(binary: &Path) -> Result<Vec<String>> {
    let data =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an executable object file", binary.display()))?;
    ensure!(
        file.kind() == ObjectKind::Executable || file.kind() == ObjectKind::Dynamic,
        "{} is not an executable",
        binary.display()
    );
    let libraries = match file {
        object::File::Elf64(ref elf) => elf_needed(elf)?,
        _ => Vec::new(), // Mach-O/PE: nothing for run.sh to look for.
    };
    Ok(libraries
        .into_iter()
        .filter(|lib| !SYSTEM_LIBS.iter().any(|sys| lib.starts_with(sys)))
        .collect())
}

fn elf_needed(elf: &object::read::elf::ElfFile64) -> Result<Vec<String>> {
    use object::read::elf::{Dyn, FileHeader, SectionHeader};
    let endian = elf.endian();
    let header = elf.elf_header();
    let sections = header.sections(endian, elf.data())?;
    let mut needed = Vec::new();
    for section in sections.iter() {
        if let Some((entries, link)) = section.dynamic(endian, elf.data())? {
            let strings = sections.strings(endian, elf.data(), link)?;
            for entry in entries {
                if entry.tag32(endian) == Some(object::elf::DT_NEEDED) {
                    let name = entry.string(endian, strings)?;
                    needed.push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }
    Ok(needed)
}

/// Writes `<name>/bin/snapmix`, `<name>/run.sh` and `<name>/NEEDED` into an xz tarball.
fn pack(archive: &Path, name: &str, binary: &Path, needed: &[String], level: u32) -> Result<()> {
    let file =
        File::create(archive).with_context(|| format!("cannot create {}", archive.display()))?;
    let encoder = xz2::write::XzEncoder::new(file, level);
    let mut tar = tar::Builder::new(encoder);
    let mut exe = BufReader::new(File::open(binary)?);
    append(
        &mut tar,
        &format!("{name}/bin/snapmix"),
        0o755,
        std::fs::metadata(binary)?.len(),
        &mut exe,
    )?;
    append(
        &mut tar,
        &format!("{name}/run.sh"),
        0o755,
        RUN_SCRIPT.len() as u64,
        &mut RUN_SCRIPT.as_bytes(),
    )?;
    let needed_text = needed
        .iter()
        .map(|lib| format!("{lib}\n"))
        .collect::<String>();
    append(
        &mut tar,
        &format!("{name}/NEEDED"),
        0o644,
        needed_text.len() as u64,
        &mut needed_text.as_bytes(),
    )?;
    tar.into_inner()?.finish()?.sync_all()?;
    Ok(())
}

fn append<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    size: u64,
    data: &mut impl std::io::Read,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(size);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(&mut header, path, data)
        .with_context(|| format!("cannot pack {path}"))
}
