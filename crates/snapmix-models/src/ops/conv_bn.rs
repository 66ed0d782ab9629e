//! Conv2d followed by training-mode batch norm (and ReLU) as one CPU op: candle's autograd then
//! never materialises the gradient of the conv output, which it would otherwise zero-fill and
//! add into a fresh buffer (three passes over the largest tensors of a ResNet step). The same op
//! ends a residual block with an identity shortcut (`relu(bn(conv(h)) + x)`), the shortcut's
//! gradient reaching the block's first conv through a [`ShortcutLink`] rather than the graph.

use super::add_relu::add_relu;
use super::batch_norm::{self, batch_norm_train, BackwardInputs, BatchStats, BnDims};
use super::bn_add_relu::batch_norm_add_relu_train;
use super::conv2d::{self as conv, conv2d, ConvGeometry, InputGradient};
use super::cpu::{cpu_tensor, storage_f32, with_tensor_f32, Scratch};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex, OnceLock};

/// Links a residual block's first conv, which reads the block input, to its last, which adds
/// that input back as the identity shortcut: the last one's backward leaves the shortcut's
/// gradient here and the first one's backward adds it to the input gradient it returns. candle's
/// autograd then sees the block input consumed once, so it never zero-fills and sums the input's
/// gradient, nor builds the sum's.
///
/// Make one per block and forward pass; pass it to [`conv_batch_norm_train_linked`] for the
/// first conv, then to [`conv_batch_norm_add_relu_train`] for the last.
#[derive(Clone, Default)]
pub struct ShortcutLink(Arc<Mutex<LinkState>>);

#[derive(Default)]
struct LinkState {
    /// Whether a fused first conv will collect the gradient (else the add stays in the graph).
    collector: bool,
    gradient: Option<Vec<f32>>,
}

impl ShortcutLink {
    /// A link with nothing collected yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, LinkState>> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("shortcut link: poisoned lock".into()))
    }
}

/// `batch_norm_train(&conv2d(x, weight, stride, padding)?, gamma, beta, eps, relu)`, with the
/// same outputs `(output, batch_mean, batch_var)`.
///
/// On the CPU with f32 tensors it is one custom op whose backward chains the two backward
/// passes internally; elsewhere (CUDA, Metal, other dtypes, or after
/// [`set_composed_ops(true)`](super::dispatch::set_composed_ops)) it is exactly that composition.
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let conv = ConvArgs {
        x,
        weight,
        stride,
        padding,
    };
    conv_batch_norm(conv, gamma, beta, eps, Tail::Plain { relu, link: None })
}

/// [`conv_batch_norm_train`] for a residual block's first conv: the input gradient it returns
/// also carries the identity shortcut's, left in `link` by the block's last conv
/// ([`conv_batch_norm_add_relu_train`]).
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_train_linked(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
    link: &ShortcutLink,
) -> Result<(Tensor, Tensor, Tensor)> {
    let conv = ConvArgs {
        x,
        weight,
        stride,
        padding,
    };
    let tail = Tail::Plain {
        relu,
        link: Some(link),
    };
    conv_batch_norm(conv, gamma, beta, eps, tail)
}

/// A residual block's last conv with its shortcut added: `relu(bn(conv(x)) + shortcut)`, with
/// the batch statistics. When the block's first conv ran fused with the same `link` (an identity
/// shortcut on the CPU), the shortcut's gradient goes through `link` instead of candle's graph;
/// otherwise this is `add_relu(batch_norm_train(conv2d(x)), shortcut)`, computed on the CPU as
/// the fused conv + batch norm and [`add_relu`], elsewhere as `conv2d` and
/// [`batch_norm_add_relu_train`]. A fresh [`ShortcutLink`] takes the unlinked route (a
/// downsample shortcut).
#[allow(clippy::too_many_arguments)]
pub fn conv_batch_norm_add_relu_train(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    shortcut: &Tensor,
    link: &ShortcutLink,
) -> Result<(Tensor, Tensor, Tensor)> {
    let conv = ConvArgs {
        x,
        weight,
        stride,
        padding,
    };
    conv_batch_norm(conv, gamma, beta, eps, Tail::AddRelu { shortcut, link })
}

/// The conv half of the arguments.
#[derive(Clone, Copy)]
struct ConvArgs<'a> {
    x: &'a Tensor,
    weight: &'a Tensor,
    stride: usize,
    padding: usize,
}

/// What follows the batch norm.
#[derive(Clone, Copy)]
enum Tail<'a> {
    /// Optional ReLU; with a link, the input gradient also carries the linked shortcut's.
    Plain {
        relu: bool,
        link: Option<&'a ShortcutLink>,
    },
    /// `relu(. + shortcut)`, the shortcut's gradient going to the link.
    AddRelu {
        shortcut: &'a Tensor,
        link: &'a ShortcutLink,
    },
}

fn conv_batch_norm(
    conv: ConvArgs,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    tail: Tail,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ConvArgs {
        x,
        weight,
        stride,
        padding,
    } = conv;
    let fused = matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && !super::dispatch::composed_ops();
    let (relu, collects, shortcut) = match tail {
        Tail::Plain { relu, link } => (relu, link, None),
        Tail::AddRelu { shortcut, link } => {
            let linked = fused && shortcut.dtype() == DType::F32 && link.lock()?.collector;
            if !linked {
                if fused {
                    // The CPU: conv + batch norm as one op, then the fused add + ReLU.
                    let plain = Tail::Plain {
                        relu: false,
                        link: None,
                    };
                    let (y, mean, var) = conv_batch_norm(conv, gamma, beta, eps, plain)?;
                    return Ok((add_relu(&y, shortcut)?, mean, var));
                }
                // Elsewhere batch norm, add and ReLU as one op (on CUDA: keeps neither the
                // normalised tensor nor the sum alive for backward).
                let conv_out = conv2d(x, weight, stride, padding)?;
                return batch_norm_add_relu_train(&conv_out, gamma, beta, eps, shortcut);
            }
            (true, None, Some((shortcut, link)))
        }
    };
    if !fused {
        return batch_norm_train(&conv2d(x, weight, stride, padding)?, gamma, beta, eps, relu);
    }
    let geometry = ConvGeometry::new(x.dims(), weight.dims(), stride, padding)?;
    let dims = BnDims::new(geometry.out_shape().dims(), gamma.dims(), beta.dims())?;
    if eps.is_nan() || eps <= 0.0 {
        bail!("conv_batch_norm_train: eps must be positive, got {eps}");
    }
    if let Some((shortcut, _)) = shortcut {
        if shortcut.dims() != geometry.out_shape().dims() {
            bail!(
                "conv_batch_norm_add_relu_train: shortcut {:?} differs from the output {:?}",
                shortcut.dims(),
                geometry.out_shape().dims()
            );
        }
    }
    if let Some(link) = collects {
        let mut link = link.lock()?;
        link.collector = x.track_op();
        link.gradient = None;
    }
    let state = Arc::new(OnceLock::new());
    let op = ConvBatchNormOp {
        geometry,
        dims,
        eps: eps as f32,
        relu,
        input_grad: x.track_op(),
        state: state.clone(),
        shortcut: match shortcut {
            Some((shortcut, link)) => Some((shortcut.contiguous()?.detach(), link.clone())),
            None => None,
        },
        collects: collects.cloned(),
    };
    let gamma_beta = Tensor::cat(&[gamma, beta], 0)?;
    let output = x.contiguous()?.apply_op3_arc(
        &weight.contiguous()?,
        &gamma_beta,
        Arc::new(Box::new(op)),
    )?;
    let Some(state) = state.get() else {
        bail!("conv_batch_norm_train: the forward pass left no statistics");
    };
    let mean = cpu_tensor(state.stats.mean.clone(), dims.channels())?;
    let var = cpu_tensor(state.stats.var.clone(), dims.channels())?;
    Ok((output, mean, var))
}

/// What the forward pass keeps for backward: the conv output (the batch norm's input) and the
/// batch statistics.
struct ForwardState {
    conv_out: Vec<f32>,
    stats: BatchStats,
    /// The conv's batch-wide copy of its input (im2col or pixel-major), reused by its weight
    /// gradient.
    patches: Option<Scratch>,
}

/// The fused op on `(x, weight, [gamma; beta])`.
struct ConvBatchNormOp {
    geometry: ConvGeometry,
    dims: BnDims,
    eps: f32,
    relu: bool,
    /// Whether backward must produce the input gradient (false for the image batch).
    input_grad: bool,
    state: Arc<OnceLock<ForwardState>>,
    /// The identity shortcut added before the ReLU (as data) and where its gradient goes.
    shortcut: Option<(Tensor, ShortcutLink)>,
    /// Where a linked shortcut gradient to add to the input gradient comes from.
    collects: Option<ShortcutLink>,
}

impl CustomOp3 for ConvBatchNormOp {
    fn name(&self) -> &'static str {
        "snapmix-conv-batch-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        w_layout: &Layout,
        gamma_beta: &CpuStorage,
        gb_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = storage_f32(x, x_layout, "conv_batch_norm_train input")?;
        let weight = storage_f32(weight, w_layout, "conv_batch_norm_train weight")?;
        let gamma_beta = storage_f32(gamma_beta, gb_layout, "conv_batch_norm_train gamma/beta")?;
        let (gamma, beta) = gamma_beta.split_at(self.dims.channels());
        let conv::TrainingForward {
            out: conv_out,
            planes,
            patches,
        } = conv::forward_for_training(&self.geometry, x, weight)?;
        let stats = match planes {
            Some(planes) => batch_norm::channel_stats_from_planes(&self.dims, &planes, self.eps)?,
            None => batch_norm::channel_stats(&self.dims, &conv_out, self.eps),
        };
        let normalise = |residual: Option<&[f32]>| {
            batch_norm::normalise(
                &self.dims, &conv_out, gamma, beta, &stats, self.relu, residual,
            )
        };
        let out = match &self.shortcut {
            Some((shortcut, _)) => {
                with_tensor_f32(shortcut, "conv_batch_norm_add_relu_train shortcut", |s| {
                    Ok(normalise(Some(s)))
                })?
            }
            None => normalise(None),
        };
        let state = ForwardState {
            conv_out,
            stats,
            patches,
        };
        if self.state.set(state).is_err() {
            bail!("conv_batch_norm_train: an op instance ran its forward pass twice");
        }
        Ok((CpuStorage::F32(out), self.geometry.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        gamma_beta: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !matches!(grad_out.device(), Device::Cpu) {
            bail!("snapmix-conv-batch-norm: backward runs on the CPU only");
        }
        let Some(state) = self.state.get() else {
            bail!("snapmix-conv-batch-norm: backward before forward");
        };
        let grad_out = grad_out.contiguous()?;
        let channels = self.dims.channels();
        // The shortcut's gradient: the output gradient where the ReLU let it through.
        let mut grad_shortcut = Vec::new();
        let wants_shortcut = self.shortcut.is_some();
        let (grad_conv_out, grad_gamma, grad_beta) =
            with_tensor_f32(gamma_beta, "conv_batch_norm_train gamma", |gamma_beta| {
                with_tensor_f32(out, "conv_batch_norm_train output", |out| {
                    with_tensor_f32(&grad_out, "conv_batch_norm_train gradient", |grad| {
                        Ok(batch_norm::backward(
                            &self.dims,
                            BackwardInputs {
                                x: &state.conv_out,
                                gamma: &gamma_beta[..channels],
                                out,
                                grad,
                                stats: &state.stats,
                                relu: self.relu,
                                input_grad: true,
                                relu_grad: wants_shortcut.then_some(&mut grad_shortcut),
                            },
                        ))
                    })
                })
            })?;
        let Some(grad_conv_out) = grad_conv_out else {
            bail!("snapmix-conv-batch-norm: the batch norm returned no input gradient");
        };
        // A linked shortcut's gradient (from the block's last conv) is where the input's starts.
        let linked = match &self.collects {
            Some(link) => link.lock()?.gradient.take(),
            None => None,
        };
        let input_grad = match linked {
            Some(shortcut) if self.input_grad => InputGradient::AddTo(shortcut),
            _ => InputGradient::new_if(self.input_grad),
        };
        let (grad_x, grad_w) = with_tensor_f32(x, "conv_batch_norm_train input", |x| {
            with_tensor_f32(weight, "conv_batch_norm_train weight", |weight| {
                let patches = state.patches.as_deref();
                conv::backward(
                    &self.geometry,
                    x,
                    weight,
                    &grad_conv_out,
                    input_grad,
                    patches,
                )
            })
        })?;
        if let Some((_, link)) = &self.shortcut {
            link.lock()?.gradient = Some(grad_shortcut);
        }
        let grad_x = match grad_x {
            Some(data) => Some(cpu_tensor(data, x.shape())?),
            None => None,
        };
        let mut grad_gamma_beta = grad_gamma;
        grad_gamma_beta.extend_from_slice(&grad_beta);
        Ok((
            grad_x,
            Some(cpu_tensor(grad_w, weight.shape())?),
            Some(cpu_tensor(grad_gamma_beta, 2 * channels)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{on_two_threads, random, rel_err};
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The fused op against candle's conv2d and the batch norm composed from candle ops: output,
    /// statistics, and the gradients of x, weight, gamma and beta.
    fn check(x_dims: [usize; 4], w_dims: [usize; 4], stride: usize, padding: usize, relu: bool) {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let x = Var::from_tensor(&random(&mut rng, &x_dims, 0.0).unwrap()).unwrap();
        let w = Var::from_tensor(&random(&mut rng, &w_dims, 0.0).unwrap()).unwrap();
        let gamma = Var::from_tensor(&random(&mut rng, &[w_dims[0]], 1.0).unwrap()).unwrap();
        let beta = Var::from_tensor(&random(&mut rng, &[w_dims[0]], 0.0).unwrap()).unwrap();
        let conv_out = x.conv2d(&w, padding, stride, 1, 1).unwrap();
        let (want, want_mean, want_var) =
            batch_norm::reference(&conv_out, &gamma, &beta, 1e-5, relu).unwrap();
        let (got, got_mean, got_var) =
            conv_batch_norm_train(&x, &w, stride, padding, &gamma, &beta, 1e-5, relu).unwrap();
        let case = format!("{x_dims:?} {w_dims:?} s{stride} p{padding} relu {relu}");
        for (name, got, want) in [
            ("output", &got, &want),
            ("mean", &got_mean, &want_mean),
            ("var", &got_var, &want_var),
        ] {
            let err = rel_err(got, want).unwrap();
            assert!(err < 1e-4, "{name} {case}: {err}");
        }
        let probe = random(&mut rng, want.dims(), 0.0).unwrap();
        let want_grads = (want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let got_grads = (got * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [
            ("x", &x),
            ("weight", &w),
            ("gamma", &gamma),
            ("beta", &beta),
        ] {
            let err = rel_err(
                got_grads.get(var).expect("fused gradient"),
                want_grads.get(var).expect("reference gradient"),
            )
            .unwrap();
            assert!(err < 1e-4, "{name} gradient {case}: {err}");
        }
    }

    #[test]
    fn matches_conv_then_batch_norm_composed() {
        check([2, 3, 11, 10], [5, 3, 3, 3], 1, 1, true);
        check([2, 4, 9, 9], [6, 4, 3, 3], 2, 1, false);
        check([3, 4, 7, 6], [5, 4, 1, 1], 1, 0, true);
        // One GEMM per image, the batch norm's statistics from the per-image plane moments.
        on_two_threads(|| {
            check([2, 3, 34, 30], [4, 3, 7, 7], 2, 3, true);
            check([3, 5, 12, 12], [6, 5, 3, 3], 1, 1, false);
        });
    }

    /// A residual block (conv-BN-ReLU, conv-BN, + identity, ReLU) through the linked ops
    /// against the same block composed from candle ops: output and every gradient, including
    /// the block input's, which reaches it through the link.
    fn check_linked_block(x_dims: [usize; 4], first_kernel: usize) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let channels = x_dims[1];
        let input = Var::from_tensor(&random(&mut rng, &x_dims, 0.0)?)?;
        // Something upstream of the block, so its input is an inner node like in a ResNet.
        let x = (input.as_tensor() * 1.5)?;
        let pad1 = first_kernel / 2;
        let w1 = Var::from_tensor(&random(
            &mut rng,
            &[channels, channels, first_kernel, first_kernel],
            0.0,
        )?)?;
        let w2 = Var::from_tensor(&random(&mut rng, &[channels, channels, 3, 3], 0.0)?)?;
        let gamma = Var::from_tensor(&random(&mut rng, &[channels], 1.0)?)?;
        let beta = Var::from_tensor(&random(&mut rng, &[channels], 0.0)?)?;

        let link = ShortcutLink::new();
        let (h, _, _) =
            conv_batch_norm_train_linked(&x, &w1, 1, pad1, &gamma, &beta, 1e-5, true, &link)?;
        let (got, _, _) =
            conv_batch_norm_add_relu_train(&h, &w2, 1, 1, &gamma, &beta, 1e-5, &x, &link)?;
        assert!(
            link.lock()?.collector,
            "the first conv should collect the shortcut gradient"
        );

        let h = x.conv2d(&w1, pad1, 1, 1, 1)?;
        let h = batch_norm::reference(&h, &gamma, &beta, 1e-5, true)?.0;
        let z = batch_norm::reference(&h.conv2d(&w2, 1, 1, 1, 1)?, &gamma, &beta, 1e-5, false)?.0;
        let want = (z + &x)?.relu()?;
        let case = format!("{x_dims:?} first kernel {first_kernel}");
        assert!(rel_err(&got, &want)? < 1e-4, "{case}");

        let probe = random(&mut rng, want.dims(), 0.0)?;
        let got_grads = (got * &probe)?.sum_all()?.backward()?;
        let want_grads = (want * &probe)?.sum_all()?.backward()?;
        for (name, var) in [
            ("input", &input),
            ("w1", &w1),
            ("w2", &w2),
            ("gamma", &gamma),
            ("beta", &beta),
        ] {
            let err = rel_err(
                got_grads.get(var).expect("linked gradient"),
                want_grads.get(var).expect("composed gradient"),
            )?;
            assert!(err < 1e-4, "{name} gradient {case}: {err}");
        }
        assert!(
            link.lock()?.gradient.is_none(),
            "the first conv took the gradient"
        );
        Ok(())
    }

    #[test]
    fn linked_block_matches_the_composed_block() -> Result<()> {
        on_two_threads(|| {
            check_linked_block([3, 4, 6, 5], 3)?; // batch-wide conv paths
            check_linked_block([16, 4, 3, 3], 3)?; // tap GEMMs
            check_linked_block([2, 4, 12, 12], 3)?; // one GEMM per image
            check_linked_block([2, 4, 12, 12], 1) // pointwise first conv, as in a bottleneck
        })
    }

    #[test]
    fn without_a_fused_first_conv_the_shortcut_stays_in_the_graph() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(19);
        let x = Var::from_tensor(&random(&mut rng, &[2, 4, 5, 5], 0.0)?)?;
        let w = Var::from_tensor(&random(&mut rng, &[4, 4, 3, 3], 0.0)?)?;
        let gamma = Var::from_tensor(&random(&mut rng, &[4], 1.0)?)?;
        let beta = Var::from_tensor(&random(&mut rng, &[4], 0.0)?)?;
        // No linked first conv ran: the link has no collector.
        let link = ShortcutLink::new();
        let (got, _, _) =
            conv_batch_norm_add_relu_train(&x, &w, 1, 1, &gamma, &beta, 1e-5, &x, &link)?;
        let z = batch_norm::reference(&x.conv2d(&w, 1, 1, 1, 1)?, &gamma, &beta, 1e-5, false)?.0;
        let want = (z + x.as_tensor())?.relu()?;
        let got_grad = got.sum_all()?.backward()?;
        let want_grad = want.sum_all()?.backward()?;
        let err = rel_err(got_grad.get(&x).unwrap(), want_grad.get(&x).unwrap())?;
        assert!(err < 1e-4, "input gradient: {err}");
        let bad = Tensor::zeros((2, 4, 5, 4), DType::F32, &Device::Cpu)?;
        let first = ShortcutLink::new();
        conv_batch_norm_train_linked(&x, &w, 1, 1, &gamma, &beta, 1e-5, true, &first)?;
        let err = conv_batch_norm_add_relu_train(&x, &w, 1, 1, &gamma, &beta, 1e-5, &bad, &first)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shortcut [2, 4, 5, 4]"), "{err}");
        Ok(())
    }

    #[test]
    fn the_image_batch_gets_no_gradient() -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let images = random(&mut rng, &[2, 3, 8, 8], 0.0)?;
        let w = Var::from_tensor(&random(&mut rng, &[4, 3, 3, 3], 0.0)?)?;
        let gamma = Var::from_tensor(&random(&mut rng, &[4], 1.0)?)?;
        let beta = Var::from_tensor(&random(&mut rng, &[4], 0.0)?)?;
        let (out, _, _) = conv_batch_norm_train(&images, &w, 1, 1, &gamma, &beta, 1e-5, true)?;
        let grads = out.sum_all()?.backward()?;
        assert!(grads.get(&images).is_none());
        assert!(grads.get(&w).is_some() && grads.get(&gamma).is_some());
        Ok(())
    }

    #[test]
    fn rejects_a_gamma_of_the_wrong_length() -> Result<()> {
        let x = Tensor::zeros((2, 3, 8, 8), DType::F32, &Device::Cpu)?;
        let w = Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu)?;
        let gamma = Tensor::ones(5, DType::F32, &Device::Cpu)?;
        let beta = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let err = conv_batch_norm_train(&x, &w, 1, 1, &gamma, &beta, 1e-5, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gamma [5]"), "{err}");
        Ok(())
    }
}
