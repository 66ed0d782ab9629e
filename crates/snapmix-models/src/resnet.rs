//! The ResNet model: torchvision v1.5 layout (stride on the bottleneck's 3x3 conv), outputs for
//! CAMs (`layer4`) and the mid-level head (`layer3`), parameter groups and seeded init.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::arch::{Arch, BlockKind};
use crate::error::{ModelError, Result};
use crate::layers::{
    global_avg_pool, global_max_pool, torch_default_bound, BatchNorm2d, Conv2d, Linear,
    PointwiseConv, Registry, RunningStats,
};
use crate::ops::add_relu::add_relu;
use crate::ops::conv_bn::ShortcutLink;
use crate::ops::max_pool::MaxPool2d;

/// Names of the layers a pretrained body does not provide (the classifier and the mid-level
/// head): they form the "new layers" parameter group and may be freshly initialised on load.
pub const HEAD_PREFIXES: [&str; 3] = ["fc.", "mid_conv.", "mid_fc."];

/// Whether parameter `name` belongs to a new layer (see [`HEAD_PREFIXES`]).
pub fn is_head_param(name: &str) -> bool {
    HEAD_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// The mid-level head of SnapMix's "Baseline+" (after the official code): on `layer3`, a 1x1
/// conv with bias keeping the channel count -> ReLU -> global max pool -> linear to the classes.
/// Its parameters are `mid_conv.{weight,bias}` and `mid_fc.{weight,bias}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MidLevelConfig {
    /// Stop the head's gradient from reaching the body (the official default).
    pub detach_input: bool,
    /// With `detach_input`, the epoch (0-based, see [`ResNet::set_epoch`]) from which the
    /// input is no longer detached; `None` detaches for the whole run.
    pub stop_detach_epoch: Option<usize>,
}

impl Default for MidLevelConfig {
    /// Detached for the whole run, as in the official SnapMix code.
    fn default() -> Self {
        MidLevelConfig {
            detach_input: true,
            stop_detach_epoch: None,
        }
    }
}

/// Everything that fixes a model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetConfig {
    /// The depth.
    pub arch: Arch,
    /// Classifier outputs.
    pub num_classes: usize,
    /// The optional mid-level head.
    pub mid_level: Option<MidLevelConfig>,
    /// Channels of the stem and of `layer1`'s blocks (torchvision: 64); stages double it. A
    /// smaller width (e.g. 16) gives a fast model for tests and CPU demos; pretrained weights
    /// need 64.
    pub base_width: usize,
}

impl ResNetConfig {
    /// torchvision's width, no mid-level head.
    pub fn new(arch: Arch, num_classes: usize) -> Self {
        ResNetConfig {
            arch,
            num_classes,
            mid_level: None,
            base_width: 64,
        }
    }

    /// Channels of `layer3`'s output (the mid-level head's input and width).
    pub fn layer3_channels(&self) -> usize {
        self.base_width * 4 * self.arch.block().expansion()
    }

    /// Channels of `layer4`'s output (the CAM features, the classifier's input).
    pub fn layer4_channels(&self) -> usize {
        self.base_width * 8 * self.arch.block().expansion()
    }
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// Classifier scores `[B, K]`.
    pub logits: Tensor,
    /// `layer4`'s output `[B, C4, h, w]`: the CAM feature map.
    pub layer4: Tensor,
    /// `layer3`'s output `[B, C3, 2h, 2w]`.
    pub layer3: Tensor,
    /// The mid-level head's scores `[B, K]`, when the model has one.
    pub mid_logits: Option<Tensor>,
}

impl Outputs {
    /// The evaluation score: `logits + mid_logits` with a mid-level head, else `logits`.
    pub fn combined_logits(&self) -> candle_core::Result<Tensor> {
        match &self.mid_logits {
            Some(mid) => &self.logits + mid,
            None => Ok(self.logits.clone()),
        }
    }
}

/// The shortcut projection of a block whose shape changes: `downsample.0` (1x1 conv) and
/// `downsample.1` (batch norm).
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

/// A residual block: basic (two 3x3 convs) or bottleneck (1x1, 3x3 strided, 1x1).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<Conv2d>,
    bns: Vec<BatchNorm2d>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        vb: VarBuilder,
        registry: &mut Registry,
        kind: BlockKind,
        in_channels: usize,
        planes: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        let out_channels = planes * kind.expansion();
        // (in, out, kernel, stride, padding) of conv1, conv2[, conv3].
        let shapes: Vec<(usize, usize, usize, usize, usize)> = match kind {
            BlockKind::Basic => vec![
                (in_channels, planes, 3, stride, 1),
                (planes, planes, 3, 1, 1),
            ],
            BlockKind::Bottleneck => vec![
                (in_channels, planes, 1, 1, 0),
                (planes, planes, 3, stride, 1),
                (planes, out_channels, 1, 1, 0),
            ],
        };
        let mut convs = Vec::with_capacity(shapes.len());
        let mut bns = Vec::with_capacity(shapes.len());
        for (index, &(cin, cout, kernel, conv_stride, padding)) in shapes.iter().enumerate() {
            let conv_vb = vb.pp(format!("conv{}", index + 1));
            convs.push(Conv2d::new(
                conv_vb,
                registry,
                (cin, cout, kernel),
                conv_stride,
                padding,
            )?);
            bns.push(BatchNorm2d::new(
                vb.pp(format!("bn{}", index + 1)),
                registry,
                cout,
            )?);
        }
        let downsample = if stride != 1 || in_channels != out_channels {
            let vb = vb.pp("downsample");
            let conv = Conv2d::new(
                vb.pp("0"),
                registry,
                (in_channels, out_channels, 1),
                stride,
                0,
            )?;
            let bn = BatchNorm2d::new(vb.pp("1"), registry, out_channels)?;
            Some(Downsample { conv, bn })
        } else {
            None
        };
        Ok(Block {
            convs,
            bns,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let last = self.convs.len() - 1;
        if train && self.downsample.is_none() {
            // The identity shortcut's gradient skips candle's graph (see `ShortcutLink`).
            let link = ShortcutLink::new();
            let mut out = x.clone();
            for (index, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
                out = match index {
                    0 => bn.forward_conv_linked_train(conv, &out, true, &link)?,
                    i if i == last => bn.forward_conv_add_relu_train(conv, &out, x, &link)?,
                    _ => bn.forward_conv_t(conv, &out, true, true)?,
                };
            }
            return Ok(out);
        }
        let identity = match &self.downsample {
            Some(down) => down.bn.forward_conv_t(&down.conv, x, train, false)?,
            None => x.clone(),
        };
        let mut out = x.clone();
        for (index, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            out = match index {
                // Unlinked: the shortcut's gradient stays in candle's graph.
                i if i == last && train => {
                    bn.forward_conv_add_relu_train(conv, &out, &identity, &ShortcutLink::new())?
                }
                i if i == last => {
                    add_relu(&bn.forward_conv_t(conv, &out, false, false)?, &identity)?
                }
                _ => bn.forward_conv_t(conv, &out, train, true)?,
            };
        }
        Ok(out)
    }
}

/// The mid-level head's layers.
#[derive(Debug, Clone)]
struct MidHead {
    config: MidLevelConfig,
    conv: PointwiseConv,
    fc: Linear,
}

/// A trainable ResNet with torchvision's parameter names.
///
/// Build it from a `VarMap`-backed `VarBuilder` to train it (the parameters are then candle
/// `Var`s, see [`ResNet::param_groups`]); batch-norm running statistics are kept apart from the
/// parameters and appear in [`ResNet::state_dict`] under torchvision's names.
pub struct ResNet {
    config: ResNetConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: [Vec<Block>; 4],
    fc: Linear,
    mid: Option<MidHead>,
    pub(crate) params: Vec<(String, Tensor)>,
    pub(crate) batch_norms: Vec<(String, Arc<Mutex<RunningStats>>)>,
    epoch: AtomicUsize,
}

/// The trainable parameters split for different learning rates.
#[derive(Debug, Clone)]
pub struct ParamGroups {
    /// The (usually pretrained) body: stem and `layer1..layer4`.
    pub body: Vec<Var>,
    /// The new layers: classifier and mid-level head (see [`HEAD_PREFIXES`]).
    pub head: Vec<Var>,
}

impl ResNet {
    /// Builds `arch` at torchvision's width with a `num_classes` classifier and an optional
    /// mid-level head. Parameters come from `vb` by torchvision name; with a `VarMap` builder
    /// they are created with torchvision-like init (use [`ResNet::init_weights`] for a seeded
    /// one).
    pub fn new(
        arch: Arch,
        num_classes: usize,
        mid_level: Option<MidLevelConfig>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let config = ResNetConfig {
            mid_level,
            ..ResNetConfig::new(arch, num_classes)
        };
        Self::from_config(config, vb)
    }

    /// Builds a model of any [`ResNetConfig`] (e.g. a narrow one for tests and CPU demos).
    pub fn from_config(config: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        if config.num_classes == 0 {
            return Err(ModelError::InvalidConfig(
                "num_classes must be at least 1".into(),
            ));
        }
        if config.base_width == 0 {
            return Err(ModelError::InvalidConfig(
                "base_width must be at least 1".into(),
            ));
        }
        let mut registry = Registry::default();
        let width = config.base_width;
        let kind = config.arch.block();
        let conv1 = Conv2d::new(vb.pp("conv1"), &mut registry, (3, width, 7), 2, 3)?;
        let bn1 = BatchNorm2d::new(vb.pp("bn1"), &mut registry, width)?;
        let mut in_channels = width;
        let mut stages: [Vec<Block>; 4] = Default::default();
        for (stage, blocks) in config.arch.blocks_per_stage().into_iter().enumerate() {
            let planes = width << stage;
            let stage_vb = vb.pp(format!("layer{}", stage + 1));
            for index in 0..blocks {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                let block = Block::new(
                    stage_vb.pp(index),
                    &mut registry,
                    kind,
                    in_channels,
                    planes,
                    stride,
                )?;
                stages[stage].push(block);
                in_channels = planes * kind.expansion();
            }
        }
        let fc = Linear::new(vb.pp("fc"), &mut registry, in_channels, config.num_classes)?;
        let mid = match config.mid_level {
            Some(mid_config) => {
                let channels = config.layer3_channels();
                let conv =
                    PointwiseConv::new(vb.pp("mid_conv"), &mut registry, channels, channels)?;
                let fc = Linear::new(vb.pp("mid_fc"), &mut registry, channels, config.num_classes)?;
                Some(MidHead {
                    config: mid_config,
                    conv,
                    fc,
                })
            }
            None => None,
        };
        Ok(ResNet {
            config,
            conv1,
            bn1,
            stages,
            fc,
            mid,
            params: registry.params,
            batch_norms: registry.batch_norms,
            epoch: AtomicUsize::new(0),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }

    /// The stem's batch norm (`bn1`), e.g. to inspect its running statistics.
    pub fn bn1(&self) -> &BatchNorm2d {
        &self.bn1
    }

    /// Tells the mid-level head which epoch runs (0-based), for
    /// [`MidLevelConfig::stop_detach_epoch`].
    pub fn set_epoch(&self, epoch: usize) {
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    /// Whether the mid-level head's input is detached from the body at the current epoch.
    pub fn mid_input_detached(&self) -> bool {
        self.mid.as_ref().is_some_and(|mid| {
            let epoch = self.epoch.load(Ordering::Relaxed);
            mid.config.detach_input && mid.config.stop_detach_epoch.is_none_or(|stop| epoch < stop)
        })
    }

    /// Runs stem and `layer1..layer3`, then `layer4`: returns `(layer3, layer4)`.
    fn body(&self, images: &Tensor, train: bool) -> candle_core::Result<(Tensor, Tensor)> {
        let x = self.bn1.forward_conv_t(&self.conv1, images, train, true)?;
        let mut x = MaxPool2d::RESNET_STEM.forward(&x)?;
        let mut layer3 = None;
        for (stage, blocks) in self.stages.iter().enumerate() {
            for block in blocks {
                x = block.forward_t(&x, train)?;
            }
            if stage == 2 {
                layer3 = Some(x.clone());
            }
        }
        let layer3 =
            layer3.ok_or_else(|| candle_core::Error::Msg("ResNet has no layer3".into()))?;
        Ok((layer3, x))
    }

    /// Runs the network on `images` `[B, 3, rows, cols]`. `train` selects batch-norm mode:
    /// batch statistics plus running-stat updates, or the running statistics.
    pub fn forward_t(&self, images: &Tensor, train: bool) -> Result<Outputs> {
        let (layer3, layer4) = self.body(images, train)?;
        let logits = self.fc.forward(&global_avg_pool(&layer4)?)?;
        let mid_logits = match &self.mid {
            Some(mid) => {
                let input = if self.mid_input_detached() {
                    layer3.detach()
                } else {
                    layer3.clone()
                };
                let features = mid.conv.forward(&input)?.relu()?;
                Some(mid.fc.forward(&global_max_pool(&features)?)?)
            }
            None => None,
        };
        Ok(Outputs {
            logits,
            layer4,
            layer3,
            mid_logits,
        })
    }

    /// Every trainable parameter with its torchvision name, in construction order.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The trainable parameters as `Var`s, split into body and new layers. Fails if the model
    /// was not built from a `VarMap` (its tensors are then not variables).
    pub fn param_groups(&self) -> Result<ParamGroups> {
        let mut groups = ParamGroups {
            body: Vec::new(),
            head: Vec::new(),
        };
        for (name, tensor) in &self.params {
            if !tensor.is_variable() {
                return Err(ModelError::NotAVariable(name.clone()));
            }
            let var = Var::from_tensor(tensor)?;
            if is_head_param(name) {
                groups.head.push(var);
            } else {
                groups.body.push(var);
            }
        }
        Ok(groups)
    }

    /// Re-initialises every parameter from `seed` like torchvision: convs Kaiming normal
    /// (fan-out, ReLU), batch norms 1 and 0 with fresh running statistics, classifier and
    /// mid-level head like PyTorch's Linear/Conv2d default.
    pub fn init_weights(&self, seed: u64) -> Result<()> {
        self.init_selected(seed, |_| true)?;
        for (_, stats) in &self.batch_norms {
            let mut stats = crate::layers::lock_stats(stats);
            stats.mean = stats.mean.zeros_like()?;
            stats.var = stats.var.ones_like()?;
            stats.num_batches_tracked = 0;
        }
        Ok(())
    }

    /// Re-initialises only the new layers (classifier, mid-level head) from `seed`, like
    /// PyTorch's Linear/Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub fn init_new_layers(&self, seed: u64) -> Result<()> {
        self.init_selected(seed, is_head_param)
    }

    pub(crate) fn init_selected(&self, seed: u64, select: impl Fn(&str) -> bool) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shapes: Vec<(&str, Vec<usize>)> = self
            .params
            .iter()
            .map(|(name, t)| (name.as_str(), t.dims().to_vec()))
            .collect();
        for (name, tensor) in &self.params {
            if !select(name) {
                continue;
            }
            if !tensor.is_variable() {
                return Err(ModelError::NotAVariable(name.clone()));
            }
            let dims = tensor.dims();
            let count = tensor.elem_count();
            let values: Vec<f64> = if is_head_param(name) {
                // A bias shares its weight's fan-in.
                let weight_name = name.replace(".bias", ".weight");
                let fan_in = shapes
                    .iter()
                    .find(|(n, _)| *n == weight_name)
                    .map(|(_, d)| d[1..].iter().product())
                    .unwrap_or(1);
                let bound = torch_default_bound(fan_in);
                let dist = Uniform::new_inclusive(-bound, bound)
                    .map_err(|e| ModelError::InvalidConfig(format!("init of {name}: {e}")))?;
                (0..count).map(|_| dist.sample(&mut rng)).collect()
            } else if dims.len() == 4 {
                let fan_out = dims[0] * dims[2] * dims[3];
                let dist = Normal::new(0.0, (2.0 / fan_out as f64).sqrt())
                    .map_err(|e| ModelError::InvalidConfig(format!("init of {name}: {e}")))?;
                (0..count).map(|_| dist.sample(&mut rng)).collect()
            } else if name.ends_with(".weight") {
                vec![1.0; count]
            } else {
                vec![0.0; count]
            };
            let fresh =
                Tensor::from_vec(values, dims, tensor.device())?.to_dtype(tensor.dtype())?;
            Var::from_tensor(tensor)?.set(&fresh)?;
        }
        Ok(())
    }

    /// The dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.conv1.weight.dtype()
    }
}

impl snapmix_cam::CamSource for ResNet {
    fn cam_features(&self, images: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.body(images, train)?.1)
    }

    fn classifier_weight(&self) -> &Tensor {
        &self.fc.weight
    }

    fn classifier_bias(&self) -> Option<&Tensor> {
        Some(&self.fc.bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_bottleneck_strides_on_its_3x3_conv_and_the_basic_block_on_its_first() {
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let resnet50 = ResNet::new(Arch::ResNet50, 10, None, vb.clone()).unwrap();
        let strides = |block: &Block| block.convs.iter().map(|c| c.stride).collect::<Vec<_>>();
        assert_eq!(strides(&resnet50.stages[0][0]), [1, 1, 1]);
        for stage in 1..4 {
            assert_eq!(
                strides(&resnet50.stages[stage][0]),
                [1, 2, 1],
                "layer{}",
                stage + 1
            );
            assert_eq!(
                resnet50.stages[stage][0]
                    .downsample
                    .as_ref()
                    .unwrap()
                    .conv
                    .stride,
                2
            );
            assert_eq!(strides(&resnet50.stages[stage][1]), [1, 1, 1]);
        }
        let resnet18 = ResNet::new(Arch::ResNet18, 10, None, vb).unwrap();
        assert_eq!(strides(&resnet18.stages[1][0]), [2, 1]);
        assert!(resnet18.stages[0][0].downsample.is_none());
    }
}
