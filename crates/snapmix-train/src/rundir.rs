//! The run directory: the effective config, metrics and crash-safe checkpoints (each written
//! to a temporary folder, fsynced, renamed into place; `last`/`best` pointers replaced
//! atomically), with the rules for starting, resuming and overwriting a run.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::TrainError;

/// How to treat a run directory that may already hold a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Start a new run; refuse a directory that already holds one.
    New,
    /// Continue the run in the directory from its last checkpoint.
    Resume,
    /// Delete the run in the directory and start over.
    Overwrite,
}

/// Files of a run directory.
const CONFIG_FILE: &str = "config.toml";
const METRICS_FILE: &str = "metrics.jsonl";
const CHECKPOINTS_DIR: &str = "checkpoints";
const LAST_POINTER: &str = "last.json";
const BEST_POINTER: &str = "best.json";
/// Files of one checkpoint folder.
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";

/// Where the training stands, saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The epoch to continue in (0-based).
    pub epoch: usize,
    /// Batches of `epoch` already trained.
    pub step_in_epoch: usize,
    /// Optimiser steps since the start.
    pub global_step: usize,
    /// Where the random streams stand.
    pub rng: RngState,
    /// The best evaluation so far.
    pub best: Option<EvalRecord>,
    /// The latest evaluation.
    pub last_eval: Option<EvalRecord>,
    /// Training time so far, in seconds (excluding evaluation).
    pub train_seconds: f64,
    /// The config of the run.
    pub config: TrainConfig,
}

/// The random state: every random draw of the run (data order, augmentation, mixing) comes from
/// a ChaCha8 stream keyed by the seed and the position `(epoch, step)`, so the seed and the
/// position in [`TrainState`] restore it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// How streams are derived from it (for readers of the file).
    pub scheme: String,
}

/// One evaluation on the test split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// 0-based epoch after which it ran.
    pub epoch: usize,
    /// Top-1 accuracy of the classifier, in [0, 1].
    pub top1: f64,
    /// Top-1 of logits + mid-level logits, with a mid-level head.
    pub top1_combined: Option<f64>,
    /// Mean cross-entropy on the test split.
    pub loss: f64,
}

impl EvalRecord {
    /// The score runs are ranked by: the combined accuracy with a mid-level head (as the
    /// official code), else top-1.
    pub fn score(&self) -> f64 {
        self.top1_combined.unwrap_or(self.top1)
    }
}

/// A saved checkpoint folder.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The folder.
    pub dir: PathBuf,
    /// Its state.
    pub state: TrainState,
}

impl Checkpoint {
    /// The model weights (torchvision names, batch-norm running statistics included).
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(MODEL_FILE)
    }

    /// The optimiser state tensors.
    pub fn optimizer_path(&self) -> PathBuf {
        self.dir.join(OPTIMIZER_FILE)
    }

    /// Reads the optimiser state tensors onto `device`.
    pub fn load_optimizer_tensors(
        &self,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>, TrainError> {
        let path = self.optimizer_path();
        candle_core::safetensors::load(&path, device).map_err(|err| TrainError::BadCheckpoint {
            path,
            reason: err.to_string(),
        })
    }

    fn read(dir: PathBuf) -> Result<Self, TrainError> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let state =
            serde_json::from_str(&text).map_err(|source| TrainError::Json { path, source })?;
        for file in [MODEL_FILE, OPTIMIZER_FILE] {
            if !dir.join(file).is_file() {
                return Err(TrainError::BadCheckpoint {
                    path: dir.clone(),
                    reason: format!("{file} is missing"),
                });
            }
        }
        Ok(Self { dir, state })
    }
}

/// What a pointer file (`last.json`, `best.json`) holds.
#[derive(Debug, Serialize, Deserialize)]
struct Pointer {
    /// The checkpoint folder's name inside `checkpoints/`.
    dir: String,
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Opens `root` for a run. `New` refuses a directory that already holds a run (a
    /// `config.toml`, metrics or checkpoints) and any other non-empty directory; `Overwrite`
    /// deletes a previous run first (but refuses a non-empty directory that is not a run, so a
    /// typo cannot wipe unrelated files); `Resume` requires a run with a checkpoint.
    pub fn open(root: &Path, mode: StartMode) -> Result<Self, TrainError> {
        let run = Self {
            root: root.to_path_buf(),
        };
        let holds_run = run.holds_run();
        match mode {
            StartMode::Resume => {
                if !holds_run {
                    return Err(TrainError::CannotResume {
                        path: run.root,
                        reason: "no run there (no config.toml)".into(),
                    });
                }
                if run.last_checkpoint()?.is_none() {
                    return Err(TrainError::CannotResume {
                        path: run.root,
                        reason: "the run has no checkpoint yet".into(),
                    });
                }
            }
            StartMode::New | StartMode::Overwrite => {
                if holds_run && mode == StartMode::New {
                    return Err(TrainError::RunExists(run.root));
                }
                if !holds_run && dir_has_entries(&run.root)? {
                    return Err(TrainError::InvalidSetting(format!(
                        "{} is not empty and does not hold a run: choose another run directory",
                        run.root.display()
                    )));
                }
                if holds_run {
                    fs::remove_dir_all(&run.root).map_err(|source| TrainError::Io {
                        path: run.root.clone(),
                        source,
                    })?;
                }
                fs::create_dir_all(run.checkpoints_dir()).map_err(|source| TrainError::Io {
                    path: run.checkpoints_dir(),
                    source,
                })?;
            }
        }
        Ok(run)
    }

    /// Opens an existing run for reading (evaluation, plots) without changing it.
    pub fn existing(root: &Path) -> Result<Self, TrainError> {
        let run = Self {
            root: root.to_path_buf(),
        };
        if !run.holds_run() {
            return Err(TrainError::InvalidSetting(format!(
                "{} holds no run (no {CONFIG_FILE} or {METRICS_FILE})",
                root.display()
            )));
        }
        Ok(run)
    }

    fn holds_run(&self) -> bool {
        self.config_path().is_file()
            || self.metrics_path().is_file()
            || self.checkpoints_dir().is_dir()
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The effective config of the run.
    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }

    /// The metrics, one JSON object per line.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }

    /// The folder of checkpoint folders.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join(CHECKPOINTS_DIR)
    }

    /// Writes the effective config (atomically).
    pub fn write_config(&self, config: &TrainConfig) -> Result<(), TrainError> {
        write_atomic(&self.config_path(), config.to_toml()?.as_bytes())
    }

    /// Reads the run's config.
    pub fn read_config(&self) -> Result<TrainConfig, TrainError> {
        TrainConfig::from_toml_file(&self.config_path())
    }

    /// Saves a checkpoint: the model tensors, the optimiser tensors and the state, into a fresh
    /// folder that is fsynced and renamed into place; then `last` (and `best` when `is_best`)
    /// are pointed at it and folders no pointer names are deleted. A crash at any moment leaves
    /// the previous `last` intact and readable.
    pub fn save_checkpoint(
        &self,
        model: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
        state: &TrainState,
        is_best: bool,
    ) -> Result<Checkpoint, TrainError> {
        let checkpoints = self.checkpoints_dir();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        fs::create_dir_all(&checkpoints).map_err(io(&checkpoints))?;
        let name = format!("epoch{:04}-step{:08}", state.epoch, state.global_step);
        let tmp = checkpoints.join(format!("{name}.tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        fs::create_dir(&tmp).map_err(io(&tmp))?;
        save_tensors(&tmp.join(MODEL_FILE), model)?;
        save_tensors(&tmp.join(OPTIMIZER_FILE), optimizer)?;
        let state_json = serde_json::to_vec_pretty(state).map_err(|source| TrainError::Json {
            path: tmp.join(STATE_FILE),
            source,
        })?;
        write_synced(&tmp.join(STATE_FILE), &state_json)?;
        sync_dir(&tmp)?;

        let final_dir = checkpoints.join(&name);
        if final_dir.exists() {
            // The same position saved again (e.g. after a resume): move the old one aside so
            // the rename below cannot fail, and drop it once the new one is in place.
            let old = checkpoints.join(format!("{name}.old"));
            if old.exists() {
                fs::remove_dir_all(&old).map_err(io(&old))?;
            }
            fs::rename(&final_dir, &old).map_err(io(&final_dir))?;
        }
        fs::rename(&tmp, &final_dir).map_err(io(&tmp))?;
        sync_dir(&checkpoints)?;

        let pointer = serde_json::to_vec(&Pointer { dir: name.clone() }).map_err(|source| {
            TrainError::Json {
                path: checkpoints.join(LAST_POINTER),
                source,
            }
        })?;
        write_atomic(&checkpoints.join(LAST_POINTER), &pointer)?;
        if is_best {
            write_atomic(&checkpoints.join(BEST_POINTER), &pointer)?;
        }
        self.remove_unreferenced()?;
        Checkpoint::read(final_dir)
    }

    /// The checkpoint `last.json` points at, if any.
    pub fn last_checkpoint(&self) -> Result<Option<Checkpoint>, TrainError> {
        self.pointed(LAST_POINTER)
    }

    /// The checkpoint `best.json` points at, if any.
    pub fn best_checkpoint(&self) -> Result<Option<Checkpoint>, TrainError> {
        self.pointed(BEST_POINTER)
    }

    fn read_pointer(&self, pointer: &str) -> Result<Option<String>, TrainError> {
        let path = self.checkpoints_dir().join(pointer);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TrainError::Io { path, source }),
        };
        let pointer: Pointer =
            serde_json::from_str(&text).map_err(|source| TrainError::Json { path, source })?;
        Ok(Some(pointer.dir))
    }

    fn pointed(&self, pointer: &str) -> Result<Option<Checkpoint>, TrainError> {
        match self.read_pointer(pointer)? {
            Some(name) => Ok(Some(Checkpoint::read(self.checkpoints_dir().join(name))?)),
            None => Ok(None),
        }
    }

    /// Deletes checkpoint folders (and leftovers of interrupted saves) no pointer names.
    fn remove_unreferenced(&self) -> Result<(), TrainError> {
        let keep: Vec<String> = [LAST_POINTER, BEST_POINTER]
            .iter()
            .filter_map(|p| self.read_pointer(p).transpose())
            .collect::<Result<_, _>>()?;
        let dir = self.checkpoints_dir();
        let entries = fs::read_dir(&dir).map_err(|source| TrainError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| TrainError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() && !keep.contains(&name) {
                fs::remove_dir_all(&path).map_err(|source| TrainError::Io { path, source })?;
            }
        }
        Ok(())
    }
}

fn dir_has_entries(dir: &Path) -> Result<bool, TrainError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(TrainError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Writes `bytes` to `path` and fsyncs the file.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::create(path).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Replaces `path` atomically: a temporary sibling is written and fsynced, renamed over `path`,
/// and the directory is fsynced so the rename itself survives a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let file_name = path.file_name().ok_or_else(|| {
        TrainError::InvalidSetting(format!("{} is not a file path", path.display()))
    })?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Saves tensors as safetensors and fsyncs the file.
fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    candle_core::safetensors::save(tensors, path).map_err(|err| TrainError::BadCheckpoint {
        path: path.to_path_buf(),
        reason: format!("cannot write: {err}"),
    })?;
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    File::open(path).map_err(io)?.sync_all().map_err(io)
}

/// Fsyncs a directory so that renames and new entries in it are durable (a no-op where the
/// platform cannot open directories).
fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    #[cfg(unix)]
    {
        let io = |source| TrainError::Io {
            path: dir.to_path_buf(),
            source,
        };
        File::open(dir).map_err(io)?.sync_all().map_err(io)?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Overrides};
    use candle_core::DType;

    fn state(epoch: usize, global_step: usize) -> TrainState {
        TrainState {
            epoch,
            step_in_epoch: 0,
            global_step,
            rng: RngState {
                seed: 0,
                scheme: "test".into(),
            },
            best: None,
            last_eval: None,
            train_seconds: 0.0,
            config: resolve(None, None, &Overrides::new()).unwrap(),
        }
    }

    fn tensors(value: f32) -> HashMap<String, Tensor> {
        HashMap::from([(
            "fc.weight".to_string(),
            Tensor::full(value, (2, 3), &Device::Cpu).unwrap(),
        )])
    }

    fn weight_of(checkpoint: &Checkpoint) -> f32 {
        let loaded = candle_core::safetensors::load(checkpoint.model_path(), &Device::Cpu).unwrap();
        loaded["fc.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn new_refuses_an_existing_run_resume_and_overwrite_handle_it() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        let err = RunDir::open(&root, StartMode::Resume).unwrap_err();
        assert!(err.to_string().contains("no run there"), "{err}");

        let run = RunDir::open(&root, StartMode::New).unwrap();
        run.write_config(&state(0, 0).config).unwrap();
        let err = RunDir::open(&root, StartMode::New).unwrap_err();
        assert!(err.to_string().contains("--resume"), "{err}");
        let err = RunDir::open(&root, StartMode::Resume).unwrap_err();
        assert!(err.to_string().contains("no checkpoint"), "{err}");

        run.save_checkpoint(&tensors(1.0), &HashMap::new(), &state(1, 10), true)
            .unwrap();
        let resumed = RunDir::open(&root, StartMode::Resume).unwrap();
        assert_eq!(resumed.last_checkpoint().unwrap().unwrap().state.epoch, 1);
        assert_eq!(resumed.read_config().unwrap(), state(0, 0).config);

        RunDir::open(&root, StartMode::Overwrite).unwrap();
        assert!(!root.join(CONFIG_FILE).exists());
        assert!(root.join(CHECKPOINTS_DIR).is_dir());

        // A non-empty folder that is not a run is never wiped.
        let other = tmp.path().join("photos");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("cat.jpg"), b"x").unwrap();
        for mode in [StartMode::New, StartMode::Overwrite] {
            let err = RunDir::open(&other, mode).unwrap_err();
            assert!(err.to_string().contains("does not hold a run"), "{err}");
        }
        assert!(other.join("cat.jpg").exists());
    }

    #[test]
    fn keeps_last_and_best_and_drops_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::open(tmp.path(), StartMode::New).unwrap();
        run.save_checkpoint(&tensors(1.0), &HashMap::new(), &state(1, 10), true)
            .unwrap();
        run.save_checkpoint(&tensors(2.0), &HashMap::new(), &state(2, 20), false)
            .unwrap();
        run.save_checkpoint(&tensors(3.0), &HashMap::new(), &state(3, 30), false)
            .unwrap();
        let last = run.last_checkpoint().unwrap().unwrap();
        let best = run.best_checkpoint().unwrap().unwrap();
        assert_eq!((last.state.epoch, weight_of(&last)), (3, 3.0));
        assert_eq!((best.state.epoch, weight_of(&best)), (1, 1.0));
        let mut dirs: Vec<String> = fs::read_dir(run.checkpoints_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        dirs.sort();
        assert_eq!(
            dirs,
            vec![
                "best.json",
                "epoch0001-step00000010",
                "epoch0003-step00000030",
                "last.json"
            ]
        );
        // Saving the same position again replaces it in place.
        run.save_checkpoint(&tensors(4.0), &HashMap::new(), &state(3, 30), true)
            .unwrap();
        let best = run.best_checkpoint().unwrap().unwrap();
        assert_eq!(weight_of(&best), 4.0);
    }

    #[test]
    fn an_interrupted_save_leaves_last_intact() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::open(tmp.path(), StartMode::New).unwrap();
        run.save_checkpoint(&tensors(1.0), &HashMap::new(), &state(1, 10), false)
            .unwrap();
        // What a crash in the middle of the next save leaves: a half-written temp folder.
        let partial = run.checkpoints_dir().join("epoch0002-step00000020.tmp");
        fs::create_dir(&partial).unwrap();
        fs::write(partial.join(MODEL_FILE), b"trunc").unwrap();
        let last = run.last_checkpoint().unwrap().unwrap();
        assert_eq!((last.state.epoch, weight_of(&last)), (1, 1.0));
        // The next save cleans it up.
        run.save_checkpoint(&tensors(2.0), &HashMap::new(), &state(2, 20), false)
            .unwrap();
        assert!(!partial.exists());
    }

    #[test]
    fn optimizer_tensors_round_trip_and_damage_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::open(tmp.path(), StartMode::New).unwrap();
        let optim = HashMap::from([(
            "momentum.fc.weight".to_string(),
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        )]);
        let saved = run
            .save_checkpoint(&tensors(1.0), &optim, &state(0, 5), false)
            .unwrap();
        let loaded = saved.load_optimizer_tensors(&Device::Cpu).unwrap();
        assert_eq!(
            loaded["momentum.fc.weight"].to_vec1::<f32>().unwrap(),
            vec![1.0; 3]
        );
        fs::remove_file(saved.optimizer_path()).unwrap();
        let err = run.last_checkpoint().unwrap_err();
        assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
    }
}
