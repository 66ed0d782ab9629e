//! The layers of a ResNet as small structs built from a `VarBuilder` with torchvision's names.
//!
//! Each forward calls one function for its math (`conv2d`, `batch_norm_train`,
//! `batch_norm_eval`, `linear`), so faster fused ops can replace those calls without touching
//! the model code.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::ops::conv_bn::{
    conv_batch_norm_add_relu_train, conv_batch_norm_train, conv_batch_norm_train_linked,
    ShortcutLink,
};
use crate::ops::{batch_norm::batch_norm_train, conv2d::conv2d};
use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// Every parameter and buffer of a model under construction, by full name, so that the model
/// can list, save and load them without a renaming table.
#[derive(Default)]
pub(crate) struct Registry {
    /// Trainable tensors (`conv1.weight`, `fc.bias`, ...), in construction order.
    pub params: Vec<(String, Tensor)>,
    /// Batch-norm running statistics, by the layer's prefix (`bn1`, `layer1.0.bn2`, ...).
    pub batch_norms: Vec<(String, Arc<Mutex<RunningStats>>)>,
}

impl Registry {
    fn param(&mut self, vb: &VarBuilder, name: &str, tensor: Tensor) -> Tensor {
        self.params.push((full_name(vb, name), tensor.clone()));
        tensor
    }
}

/// `prefix.name`, or `name` at the root.
pub(crate) fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// PyTorch's default init bound for conv and linear layers: `kaiming_uniform(a=sqrt(5))` gives
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weights and biases alike.
pub(crate) fn torch_default_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}

/// Evaluation-mode batch norm with fixed statistics, as one scale and shift per channel.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let channels = gamma.dim(0)?;
    let scale = (running_var.affine(1.0, eps)?.sqrt()?.recip()? * gamma)?;
    let shift = (beta - (running_mean * &scale)?)?;
    x.broadcast_mul(&scale.reshape((1, channels, 1, 1))?)?
        .broadcast_add(&shift.reshape((1, channels, 1, 1))?)
}

/// The linear math: `x` `[B, in]` times `weight` `[out, in]` transposed, plus `bias` `[out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.matmul(&weight.t()?)?.broadcast_add(bias)
}

/// A convolution without bias (every ResNet conv is followed by a batch norm).
#[derive(Debug, Clone)]
pub struct Conv2d {
    /// `[Cout, Cin, k, k]`.
    pub weight: Tensor,
    /// Step between output positions.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
}

impl Conv2d {
    /// Builds `prefix.weight`, initialised like torchvision's ResNet (Kaiming normal, fan-out,
    /// ReLU gain) when the builder creates it.
    pub(crate) fn new(
        vb: VarBuilder,
        registry: &mut Registry,
        (in_channels, out_channels, kernel): (usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let fan_out = out_channels * kernel * kernel;
        let init = Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_out as f64).sqrt(),
        };
        let weight =
            vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
        let weight = registry.param(&vb, "weight", weight);
        Ok(Conv2d {
            weight,
            stride,
            padding,
        })
    }

    /// Applies the convolution.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(x, &self.weight, self.stride, self.padding)
    }
}

/// Batch-norm running statistics: not trainable, updated by every training-mode forward, saved
/// and loaded under torchvision's names (`running_mean`, `running_var`, `num_batches_tracked`).
#[derive(Debug, Clone)]
pub struct RunningStats {
    /// Per-channel mean estimate `[C]`.
    pub mean: Tensor,
    /// Per-channel (unbiased) variance estimate `[C]`.
    pub var: Tensor,
    /// Training-mode forwards seen so far.
    pub num_batches_tracked: i64,
}

/// 2-D batch normalisation with affine parameters and running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    /// Scale `gamma` `[C]`.
    pub weight: Tensor,
    /// Shift `beta` `[C]`.
    pub bias: Tensor,
    /// Running statistics, shared with the model's registry so it can save and restore them.
    stats: Arc<Mutex<RunningStats>>,
    /// Weight of the new batch statistics in the running average (PyTorch: 0.1).
    pub momentum: f64,
    /// Added to the variance before the square root (PyTorch: 1e-5).
    pub eps: f64,
}

impl BatchNorm2d {
    /// Builds `prefix.{weight,bias}` (initialised to 1 and 0) and zero-mean, unit-variance
    /// running statistics in the builder's dtype.
    pub(crate) fn new(vb: VarBuilder, registry: &mut Registry, channels: usize) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let weight = registry.param(&vb, "weight", weight);
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let bias = registry.param(&vb, "bias", bias);
        let stats = RunningStats {
            mean: Tensor::zeros(channels, vb.dtype(), vb.device())?,
            var: Tensor::ones(channels, vb.dtype(), vb.device())?,
            num_batches_tracked: 0,
        };
        let stats = Arc::new(Mutex::new(stats));
        registry.batch_norms.push((vb.prefix(), stats.clone()));
        Ok(BatchNorm2d {
            weight,
            bias,
            stats,
            momentum: 0.1,
            eps: 1e-5,
        })
    }

    /// The running statistics, locked: drop the guard before the next forward, which locks
    /// them too.
    pub fn running_stats(&self) -> MutexGuard<'_, RunningStats> {
        lock_stats(&self.stats)
    }

    /// Normalises `x` `[B, C, rows, cols]`. In training mode with batch statistics, folding
    /// them into the running statistics (the variance unbiased, like PyTorch); otherwise with
    /// the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_maybe_relu_t(x, train, false)
    }

    /// `conv` then this batch norm (and ReLU when `relu`): in training mode as one fused op
    /// (see [`conv_batch_norm_train`]), so the conv output's gradient is never built.
    pub fn forward_conv_t(
        &self,
        conv: &Conv2d,
        x: &Tensor,
        train: bool,
        relu: bool,
    ) -> Result<Tensor> {
        if !train {
            return self.forward_maybe_relu_t(&conv.forward(x)?, false, relu);
        }
        self.keep_batch_stats(conv_batch_norm_train(
            x,
            &conv.weight,
            conv.stride,
            conv.padding,
            &self.weight,
            &self.bias,
            self.eps,
            relu,
        )?)
    }

    /// Training mode, a residual block's first conv: [`Self::forward_conv_t`] whose input
    /// gradient also carries the identity shortcut's, handed over through `link` by the
    /// block's last conv ([`Self::forward_conv_add_relu_train`]).
    pub fn forward_conv_linked_train(
        &self,
        conv: &Conv2d,
        x: &Tensor,
        relu: bool,
        link: &ShortcutLink,
    ) -> Result<Tensor> {
        self.keep_batch_stats(conv_batch_norm_train_linked(
            x,
            &conv.weight,
            conv.stride,
            conv.padding,
            &self.weight,
            &self.bias,
            self.eps,
            relu,
            link,
        )?)
    }

    /// Training mode, a residual block's last conv: `relu(bn(conv(x)) + shortcut)` as one op,
    /// the identity shortcut's gradient going through `link` to the block's first conv.
    pub fn forward_conv_add_relu_train(
        &self,
        conv: &Conv2d,
        x: &Tensor,
        shortcut: &Tensor,
        link: &ShortcutLink,
    ) -> Result<Tensor> {
        self.keep_batch_stats(conv_batch_norm_add_relu_train(
            x,
            &conv.weight,
            conv.stride,
            conv.padding,
            &self.weight,
            &self.bias,
            self.eps,
            shortcut,
            link,
        )?)
    }

    fn forward_maybe_relu_t(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !train {
            let stats = self.running_stats();
            let y = batch_norm_eval(
                x,
                &self.weight,
                &self.bias,
                &stats.mean,
                &stats.var,
                self.eps,
            )?;
            return if relu { y.relu() } else { Ok(y) };
        }
        self.keep_batch_stats(batch_norm_train(
            x,
            &self.weight,
            &self.bias,
            self.eps,
            relu,
        )?)
    }

    /// Folds the batch statistics of a training-mode output `y` into the running ones (the
    /// variance unbiased, like PyTorch) and returns `y`.
    fn keep_batch_stats(
        &self,
        (y, batch_mean, batch_var): (Tensor, Tensor, Tensor),
    ) -> Result<Tensor> {
        let (batch, _, rows, cols) = y.dims4()?;
        let count = batch * rows * cols;
        if count < 2 {
            candle_core::bail!(
                "batch norm in training mode needs more than one value per channel, got input {:?}",
                y.dims()
            )
        }
        let unbiased = (batch_var.detach() * (count as f64 / (count - 1) as f64))?;
        let mut stats = self.running_stats();
        let keep = 1.0 - self.momentum;
        let mean = ((&stats.mean * keep)? + (batch_mean.detach() * self.momentum)?)?;
        let var = ((&stats.var * keep)? + (unbiased * self.momentum)?)?;
        stats.mean = mean.to_dtype(stats.mean.dtype())?;
        stats.var = var.to_dtype(stats.var.dtype())?;
        stats.num_batches_tracked += 1;
        Ok(y)
    }
}

/// Locks running statistics; a poisoned lock (a panic elsewhere mid-update) still holds
/// complete tensors, so its value is used.
pub(crate) fn lock_stats(stats: &Mutex<RunningStats>) -> MutexGuard<'_, RunningStats> {
    stats
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fully connected layer with bias.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl Linear {
    /// Builds `prefix.{weight,bias}`, initialised like PyTorch's `nn.Linear` default.
    pub(crate) fn new(
        vb: VarBuilder,
        registry: &mut Registry,
        in_features: usize,
        out_features: usize,
    ) -> Result<Self> {
        let bound = torch_default_bound(in_features);
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_features, in_features), "weight", init)?;
        let weight = registry.param(&vb, "weight", weight);
        let bias = vb.get_with_hints(out_features, "bias", init)?;
        let bias = registry.param(&vb, "bias", bias);
        Ok(Linear { weight, bias })
    }

    /// Applies the layer to `x` `[B, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, &self.bias)
    }
}

/// A 1x1 convolution with bias (the mid-level head's), initialised like PyTorch's `nn.Conv2d`
/// default.
#[derive(Debug, Clone)]
pub struct PointwiseConv {
    /// `[Cout, Cin, 1, 1]`.
    pub weight: Tensor,
    /// `[Cout]`.
    pub bias: Tensor,
}

impl PointwiseConv {
    pub(crate) fn new(
        vb: VarBuilder,
        registry: &mut Registry,
        in_channels: usize,
        out_channels: usize,
    ) -> Result<Self> {
        let bound = torch_default_bound(in_channels);
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_channels, in_channels, 1, 1), "weight", init)?;
        let weight = registry.param(&vb, "weight", weight);
        let bias = vb.get_with_hints(out_channels, "bias", init)?;
        let bias = registry.param(&vb, "bias", bias);
        Ok(PointwiseConv { weight, bias })
    }

    /// Applies the convolution and bias.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let channels = self.bias.dim(0)?;
        conv2d(x, &self.weight, 1, 0)?.broadcast_add(&self.bias.reshape((1, channels, 1, 1))?)
    }
}

/// Global average pooling `[B, C, rows, cols] -> [B, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// Global max pooling `[B, C, rows, cols] -> [B, C]`; the gradient goes to the first maximum of
/// each map, like PyTorch's `adaptive_max_pool2d`.
pub fn global_max_pool(x: &Tensor) -> Result<Tensor> {
    let (batch, channels, rows, cols) = x.dims4()?;
    let flat = x.reshape((batch, channels, rows * cols))?;
    let first_max = flat.argmax_keepdim(D::Minus1)?;
    flat.gather(&first_max, D::Minus1)?.squeeze(D::Minus1)
}
