//! State dicts with torchvision names: save and load our checkpoints, load pretrained files of
//! any float dtype (f16 included) with a report, and fetch pretrained weights from the hub.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::arch::Arch;
use crate::error::{ModelError, Result};
use crate::layers::lock_stats;
use crate::resnet::{is_head_param, ResNet, ResNetConfig};

/// Buffer suffixes of a batch norm, as torchvision names them.
const RUNNING_MEAN: &str = "running_mean";
const RUNNING_VAR: &str = "running_var";
const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// How strictly [`ResNet::load_state_dict`] treats the new layers (classifier, mid-level head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Accept new-layer tensors that are absent from the source or shaped differently (another
    /// class count): the model's own values are kept and reported as newly initialised, and the
    /// source's head tensors are reported as skipped. Body tensors are always strict.
    pub allow_new_head: bool,
    /// With `allow_new_head`, re-initialise the kept new layers from this seed (PyTorch's Linear
    /// default) so the result does not depend on how the model was built.
    pub new_head_seed: Option<u64>,
}

impl LoadOptions {
    /// Every parameter and buffer must be present with the right shape (our own checkpoints).
    pub fn strict() -> Self {
        LoadOptions {
            allow_new_head: false,
            new_head_seed: None,
        }
    }

    /// Pretrained-body loading: the head may be replaced, and is then initialised from `seed`.
    pub fn pretrained(seed: u64) -> Self {
        LoadOptions {
            allow_new_head: true,
            new_head_seed: Some(seed),
        }
    }
}

/// What a load did, by tensor name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Where the tensors came from (a path, or a caller-given name).
    pub source: String,
    /// Model tensors (parameters and buffers) taken from the source.
    pub loaded: Vec<String>,
    /// New-layer parameters not taken from the source (absent or shaped for another head).
    pub newly_initialised: Vec<String>,
    /// Source tensors of a replaced head that were not used.
    pub skipped: Vec<String>,
    /// `num_batches_tracked` counters absent from the source, left at their current value.
    pub defaulted: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: loaded {} tensors, newly initialised {}",
            self.source,
            self.loaded.len(),
            if self.newly_initialised.is_empty() {
                "none".to_string()
            } else {
                self.newly_initialised.join(", ")
            }
        )?;
        if !self.skipped.is_empty() {
            write!(f, "; skipped from source: {}", self.skipped.join(", "))?;
        }
        if !self.defaulted.is_empty() {
            write!(f, "; {} batch counters absent", self.defaulted.len())?;
        }
        Ok(())
    }
}

/// Where pretrained weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightSource {
    /// A local safetensors file with torchvision/timm names.
    File(PathBuf),
    /// A file in a Hugging Face hub repository, through the hub's cache.
    Hub(HubWeights),
}

impl WeightSource {
    /// torchvision's ImageNet weights for `arch` on the hub (see [`HubWeights::for_arch`]).
    pub fn hub(arch: Arch) -> Self {
        WeightSource::Hub(HubWeights::for_arch(arch))
    }

    /// The local path of the weights, downloading into the hub cache if needed.
    pub fn resolve(&self) -> Result<PathBuf> {
        match self {
            WeightSource::File(path) => Ok(path.clone()),
            WeightSource::Hub(hub) => hub.fetch(),
        }
    }
}

/// A safetensors file on the Hugging Face hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubWeights {
    /// `owner/name`, e.g. `timm/resnet50.tv_in1k`.
    pub repo_id: String,
    /// The file in the repository, e.g. `model.safetensors`.
    pub filename: String,
    /// A branch, tag or commit; `None` is the main branch.
    pub revision: Option<String>,
    /// The hub cache directory; `None` uses `HF_HUB_CACHE` / `HF_HOME` / `~/.cache/huggingface`.
    pub cache_dir: Option<PathBuf>,
    /// Only look in the cache, never the network.
    pub offline: bool,
}

impl HubWeights {
    /// torchvision's ImageNet-1k weights for `arch` as timm publishes them
    /// (`timm/resnet{18,34,50,101,152}.tv_in1k`, `model.safetensors`; timm's ResNet names equal
    /// torchvision's). Offline when the environment sets `HF_HUB_OFFLINE=1`.
    pub fn for_arch(arch: Arch) -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        HubWeights {
            repo_id: arch.hub_repo(),
            filename: "model.safetensors".to_string(),
            revision: None,
            cache_dir: None,
            offline,
        }
    }

    /// Downloads the file into the hub cache (or finds it there) and returns its path.
    pub fn fetch(&self) -> Result<PathBuf> {
        let fail = |message: String| ModelError::Hub {
            repo_id: self.repo_id.clone(),
            filename: self.filename.clone(),
            offline: self.offline,
            message,
        };
        let (owner, name) = self
            .repo_id
            .split_once('/')
            .ok_or_else(|| fail("the repo id must look like `owner/name`".to_string()))?;
        let mut builder = hf_hub::HFClient::builder();
        if let Some(dir) = &self.cache_dir {
            builder = builder.cache_dir(dir);
        }
        let client = builder.build_sync().map_err(|e| fail(e.to_string()))?;
        client
            .model(owner, name)
            .download_file()
            .filename(self.filename.clone())
            .maybe_revision(self.revision.clone())
            .local_files_only(self.offline)
            .send()
            .map_err(|e| fail(e.to_string()))
    }
}

/// A model built around pretrained weights, with the `VarMap` holding its trainable variables.
pub struct Pretrained {
    /// The model.
    pub model: ResNet,
    /// Its parameters, for an optimiser or for saving.
    pub varmap: VarMap,
    /// What was loaded and what was newly initialised.
    pub report: LoadReport,
}

/// Builds an f32 model of `config` on `device` and loads `source` into it: the body must match
/// the file; a classifier for another class count (and the mid-level head) are initialised
/// from `seed` like PyTorch's Linear default.
pub fn load_pretrained(
    config: ResNetConfig,
    source: &WeightSource,
    seed: u64,
    device: &Device,
) -> Result<Pretrained> {
    let path = source.resolve()?;
    let varmap = VarMap::new();
    let model = ResNet::from_config(config, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    model.init_weights(seed)?;
    let report = model.load_safetensors(&path, LoadOptions::pretrained(seed))?;
    Ok(Pretrained {
        model,
        varmap,
        report,
    })
}

/// Reads every tensor of a safetensors file onto `device`, as stored.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| ModelError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(tensors.into_iter().collect())
}

/// The expected shape of every model tensor, by name, and what it is.
enum Slot<'a> {
    Param(&'a Tensor),
    Mean(usize),
    Var(usize),
    Counter(usize),
}

impl ResNet {
    /// Parameters and batch-norm buffers by torchvision name (`conv1.weight`,
    /// `bn1.running_mean`, `bn1.num_batches_tracked` as an i64 scalar, ...). A snapshot: the
    /// parameters are copied, so later training steps do not change it.
    pub fn state_dict(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut dict = BTreeMap::new();
        for (name, tensor) in &self.params {
            dict.insert(name.clone(), tensor.detach().copy()?);
        }
        for (prefix, stats) in &self.batch_norms {
            let stats = lock_stats(stats);
            let device = stats.mean.device().clone();
            dict.insert(format!("{prefix}.{RUNNING_MEAN}"), stats.mean.clone());
            dict.insert(format!("{prefix}.{RUNNING_VAR}"), stats.var.clone());
            dict.insert(
                format!("{prefix}.{NUM_BATCHES_TRACKED}"),
                Tensor::new(stats.num_batches_tracked, &device)?,
            );
        }
        Ok(dict)
    }

    /// Writes [`ResNet::state_dict`] to a safetensors file.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let dict: HashMap<String, Tensor> = self.state_dict()?.into_iter().collect();
        candle_core::safetensors::save(&dict, path).map_err(|e| ModelError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Loads a safetensors file (any float dtype, converted to the model's) by torchvision name.
    pub fn load_safetensors(&self, path: &Path, options: LoadOptions) -> Result<LoadReport> {
        let device = self.conv1_device();
        let tensors = read_safetensors(path, &device)?;
        self.load_state_dict(&tensors, &path.display().to_string(), options)
    }

    fn param_name(&self, tensor: &Tensor) -> String {
        self.params
            .iter()
            .find(|(_, t)| t.id() == tensor.id())
            .map(|(name, _)| name.clone())
            .unwrap_or_default()
    }

    fn conv1_device(&self) -> Device {
        self.params
            .first()
            .map(|(_, t)| t.device().clone())
            .unwrap_or(Device::Cpu)
    }

    /// Copies `tensors` into the model. Everything is checked before anything is written: a
    /// shape mismatch, a tensor the model does not have, or a missing parameter or running
    /// statistic is an error naming the tensors (new layers excepted, see [`LoadOptions`]).
    pub fn load_state_dict(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        source_name: &str,
        options: LoadOptions,
    ) -> Result<LoadReport> {
        let mut slots: BTreeMap<String, Slot> = BTreeMap::new();
        for (name, tensor) in &self.params {
            slots.insert(name.clone(), Slot::Param(tensor));
        }
        for (index, (prefix, _)) in self.batch_norms.iter().enumerate() {
            slots.insert(format!("{prefix}.{RUNNING_MEAN}"), Slot::Mean(index));
            slots.insert(format!("{prefix}.{RUNNING_VAR}"), Slot::Var(index));
            slots.insert(
                format!("{prefix}.{NUM_BATCHES_TRACKED}"),
                Slot::Counter(index),
            );
        }
        let mut report = LoadReport {
            source: source_name.to_string(),
            ..LoadReport::default()
        };
        let unexpected: BTreeSet<&String> = tensors
            .keys()
            .filter(|name| !slots.contains_key(*name))
            .collect();
        let mut unexpected_names = Vec::new();
        for name in unexpected {
            if options.allow_new_head && is_head_param(name) {
                report.skipped.push(name.clone());
            } else {
                unexpected_names.push(name.clone());
            }
        }
        if !unexpected_names.is_empty() {
            return Err(ModelError::UnexpectedTensors {
                source_name: source_name.to_string(),
                names: unexpected_names,
            });
        }

        // Validate and convert; writes happen only once everything checks out.
        let mut writes: Vec<(&Slot, Tensor)> = Vec::new();
        let mut missing = Vec::new();
        for (name, slot) in &slots {
            let Some(source) = tensors.get(name) else {
                match slot {
                    Slot::Counter(_) => report.defaulted.push(name.clone()),
                    Slot::Param(_) if options.allow_new_head && is_head_param(name) => {
                        report.newly_initialised.push(name.clone())
                    }
                    _ => missing.push(name.clone()),
                }
                continue;
            };
            let expected: Vec<usize> = match slot {
                Slot::Param(t) => t.dims().to_vec(),
                Slot::Mean(i) | Slot::Var(i) => {
                    vec![lock_stats(&self.batch_norms[*i].1).mean.dim(0)?]
                }
                Slot::Counter(_) => Vec::new(),
            };
            if source.dims() != expected.as_slice() {
                if options.allow_new_head && is_head_param(name) {
                    report.newly_initialised.push(name.clone());
                    report.skipped.push(name.clone());
                    continue;
                }
                return Err(ModelError::ShapeMismatch {
                    source_name: source_name.to_string(),
                    name: name.clone(),
                    expected,
                    found: source.dims().to_vec(),
                });
            }
            let converted = match slot {
                Slot::Counter(_) => {
                    if source.dtype().is_float() {
                        return Err(ModelError::UnsupportedDtype {
                            source_name: source_name.to_string(),
                            name: name.clone(),
                            dtype: format!("{:?} (expected an integer counter)", source.dtype()),
                        });
                    }
                    source.to_dtype(DType::I64)?
                }
                _ => {
                    if !source.dtype().is_float() {
                        return Err(ModelError::UnsupportedDtype {
                            source_name: source_name.to_string(),
                            name: name.clone(),
                            dtype: format!("{:?}", source.dtype()),
                        });
                    }
                    source.to_dtype(self.dtype())?
                }
            };
            writes.push((slot, converted));
            report.loaded.push(name.clone());
        }
        if !missing.is_empty() {
            return Err(ModelError::MissingTensors {
                source_name: source_name.to_string(),
                names: missing,
            });
        }

        for (slot, value) in writes {
            match slot {
                Slot::Param(tensor) => {
                    if !tensor.is_variable() {
                        return Err(ModelError::NotAVariable(self.param_name(tensor)));
                    }
                    Var::from_tensor(tensor)?.set(&value.to_device(tensor.device())?)?;
                }
                Slot::Mean(i) => {
                    let mut stats = lock_stats(&self.batch_norms[*i].1);
                    stats.mean = value.to_device(stats.mean.device())?;
                }
                Slot::Var(i) => {
                    let mut stats = lock_stats(&self.batch_norms[*i].1);
                    stats.var = value.to_device(stats.var.device())?;
                }
                Slot::Counter(i) => {
                    lock_stats(&self.batch_norms[*i].1).num_batches_tracked =
                        value.to_scalar::<i64>()?
                }
            }
        }
        if let (true, Some(seed)) = (options.allow_new_head, options.new_head_seed) {
            let fresh: BTreeSet<&str> = report
                .newly_initialised
                .iter()
                .map(String::as_str)
                .collect();
            self.init_selected(seed, |name| fresh.contains(name))?;
        }
        Ok(report)
    }
}
