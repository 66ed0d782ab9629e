//! `cargo xtask train` killed with SIGKILL in the middle of an epoch and resumed with
//! `--resume` ends with bitwise the same weights as an uninterrupted run (CPU, tiny model).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tiny SnapMix run: 4 classes x 16 images at 32x32, batch 8 (8 steps per epoch), 2 epochs,
/// a width-4 ResNet-18, a checkpoint after every step.
const SETTINGS: &[&str] = &[
    "data.synthetic.classes=4",
    "data.synthetic.train_per_class=16",
    "data.synthetic.test_per_class=4",
    "data.synthetic.image_size=32",
    "data.resize=32",
    "data.crop=32",
    "data.batch_size=8",
    "data.workers=1",
    "model.base_width=4",
    "mix.method=\"snapmix\"",
    "schedule.epochs=2",
    "schedule.milestones=[1]",
    "run.checkpoint_every_steps=1",
    "run.log_every_steps=1",
    "seed=11",
];
const TOTAL_STEPS: u64 = 16;

fn train(run_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_xtask"));
    command.args(["train", "--plain", "--run-dir"]).arg(run_dir);
    for setting in SETTINGS {
        command.args(["--set", setting]);
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

/// The global step of the checkpoint `last.json` points at, if one is complete.
fn last_step(run_dir: &Path) -> Option<u64> {
    let pointer = std::fs::read_to_string(run_dir.join("checkpoints/last.json")).ok()?;
    let pointer: serde_json::Value = serde_json::from_str(&pointer).ok()?;
    let dir = run_dir.join("checkpoints").join(pointer["dir"].as_str()?);
    let state = std::fs::read_to_string(dir.join("state.json")).ok()?;
    let state: serde_json::Value = serde_json::from_str(&state).ok()?;
    state["global_step"].as_u64()
}

fn last_weights(run_dir: &Path) -> PathBuf {
    let pointer = std::fs::read_to_string(run_dir.join("checkpoints/last.json")).unwrap();
    let pointer: serde_json::Value = serde_json::from_str(&pointer).unwrap();
    run_dir
        .join("checkpoints")
        .join(pointer["dir"].as_str().unwrap())
        .join("model.safetensors")
}

fn check(output: std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[cfg(unix)]
#[test]
fn sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    let split = tmp.path().join("split");
    check(train(&whole).output().unwrap(), "the uninterrupted run");
    assert_eq!(last_step(&whole), Some(TOTAL_STEPS));

    // Kill as soon as a checkpoint past the first steps exists: mid-epoch 0 or 1, possibly in
    // the middle of writing the next checkpoint.
    let mut child = train(&split).spawn().unwrap();
    let start = Instant::now();
    let killed_after = loop {
        if let Some(step) = last_step(&split).filter(|&s| s >= 3) {
            child.kill().unwrap(); // SIGKILL on Unix
            break step;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before it could be killed");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    };
    child.wait().unwrap();
    let at_kill = last_step(&split).unwrap();
    assert!(
        at_kill < TOTAL_STEPS,
        "killed too late (checkpoint at step {at_kill}, first seen at {killed_after})"
    );

    let mut resume = Command::new(env!("CARGO_BIN_EXE_xtask"));
    resume
        .args(["train", "--plain", "--resume"])
        .arg(&split)
        .stdout(Stdio::null());
    check(resume.output().unwrap(), "the resumed run");
    assert_eq!(last_step(&split), Some(TOTAL_STEPS));
    assert!(
        std::fs::read(last_weights(&whole)).unwrap()
            == std::fs::read(last_weights(&split)).unwrap(),
        "weights after kill + resume (from step {at_kill}) differ from the uninterrupted run"
    );

    // A second start in the same directory is refused.
    let refused = train(&whole).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
}
