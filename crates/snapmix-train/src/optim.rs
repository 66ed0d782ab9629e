//! SGD with (Nesterov) momentum and weight decay, with parameter groups, in PyTorch's exact
//! semantics; candle-nn's SGD has no momentum.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::TrainError;
use crate::optim_cpu::{self, SgdUpdate};

/// A trainable tensor with the name it has in the weights file (torchvision naming).
#[derive(Debug, Clone)]
pub struct NamedVar {
    /// The parameter's name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// The parameter itself.
    pub var: Var,
}

/// A set of parameters sharing one learning rate and weight decay, like a PyTorch param group.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// A label for logs and errors, e.g. `body` or `new_layers`.
    pub label: String,
    /// The group's learning rate before any schedule factor.
    pub base_lr: f64,
    /// L2 penalty added to the gradient: `d = g + weight_decay * p`.
    pub weight_decay: f64,
    /// The group's parameters.
    pub params: Vec<NamedVar>,
}

/// The settings shared by every group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdSettings {
    /// Momentum factor `mu` (the official recipe: 0.9).
    pub momentum: f64,
    /// Nesterov momentum (the official recipe: on).
    pub nesterov: bool,
    /// When false, parameters of rank <= 1 (BatchNorm weights and biases, every bias) get no
    /// weight decay. The official recipe decays all parameters (true).
    pub decay_bn_and_bias: bool,
}

/// One group as the optimiser holds it: its current lr and, per parameter, the decay it gets.
#[derive(Debug)]
struct GroupState {
    label: String,
    base_lr: f64,
    lr: f64,
    params: Vec<(NamedVar, f64)>,
}

/// Stochastic gradient descent with momentum, PyTorch semantics (dampening 0):
/// `d = g + wd*p`; `buf = d` at a parameter's first step, else `buf = mu*buf + d`;
/// with Nesterov `d = d + mu*buf`, else `d = buf`; `p -= lr*d`.
///
/// A parameter without a gradient in a step is skipped, its buffer untouched (as in PyTorch).
#[derive(Debug)]
pub struct Sgd {
    groups: Vec<GroupState>,
    settings: SgdSettings,
    momentum_buffers: HashMap<String, Tensor>,
}

/// The prefix of momentum-buffer names in [`Sgd::state_tensors`].
const MOMENTUM_PREFIX: &str = "momentum.";

impl Sgd {
    /// Builds the optimiser. Parameter names must be unique across all groups, because
    /// momentum buffers are saved and restored by name.
    pub fn new(groups: Vec<ParamGroup>, settings: SgdSettings) -> Result<Self, TrainError> {
        if !(0.0..1.0).contains(&settings.momentum) {
            return Err(TrainError::InvalidSetting(format!(
                "momentum must be in [0, 1), got {}",
                settings.momentum
            )));
        }
        let mut seen = HashSet::new();
        let mut states = Vec::with_capacity(groups.len());
        for group in groups {
            if !(group.base_lr.is_finite() && group.base_lr >= 0.0) {
                return Err(TrainError::InvalidSetting(format!(
                    "learning rate of group `{}` must be finite and >= 0, got {}",
                    group.label, group.base_lr
                )));
            }
            if !(group.weight_decay.is_finite() && group.weight_decay >= 0.0) {
                return Err(TrainError::InvalidSetting(format!(
                    "weight decay of group `{}` must be finite and >= 0, got {}",
                    group.label, group.weight_decay
                )));
            }
            let mut params = Vec::with_capacity(group.params.len());
            for param in group.params {
                if !seen.insert(param.name.clone()) {
                    return Err(TrainError::InvalidSetting(format!(
                        "parameter `{}` appears twice in the optimiser's groups",
                        param.name
                    )));
                }
                let decays = settings.decay_bn_and_bias || param.var.rank() > 1;
                let weight_decay = if decays { group.weight_decay } else { 0.0 };
                params.push((param, weight_decay));
            }
            states.push(GroupState {
                label: group.label,
                base_lr: group.base_lr,
                lr: group.base_lr,
                params,
            });
        }
        Ok(Self {
            groups: states,
            settings,
            momentum_buffers: HashMap::new(),
        })
    }

    /// Applies one update from the gradients of a `loss.backward()`. On the CPU each parameter
    /// and its momentum buffer are updated in place in one pass; elsewhere through candle ops.
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        for group in &self.groups {
            for (param, weight_decay) in &group.params {
                let Some(grad) = grads.get(param.var.as_tensor()) else {
                    continue;
                };
                let update = SgdUpdate {
                    lr: group.lr as f32,
                    weight_decay: *weight_decay as f32,
                    momentum: self.settings.momentum as f32,
                    nesterov: self.settings.nesterov,
                };
                let p = param.var.as_tensor();
                if update.momentum != 0.0 && fusable(&[p, grad]) {
                    if !self.momentum_buffers.contains_key(&param.name) {
                        // Zeros make the first update `buf = d`, as PyTorch's.
                        self.momentum_buffers
                            .insert(param.name.clone(), p.zeros_like()?);
                    }
                    let buffer = &self.momentum_buffers[&param.name];
                    if fusable(&[p, grad, buffer]) {
                        fused_update(p, grad, buffer, update)?;
                        continue;
                    }
                }
                let buffer = self.momentum_buffers.get(&param.name);
                let (new_param, new_buffer) = composed_update(p, grad, buffer, update)?;
                param.var.set(&new_param)?;
                if let Some(buffer) = new_buffer {
                    self.momentum_buffers.insert(param.name.clone(), buffer);
                }
            }
        }
        Ok(())
    }

    /// Sets every group's lr to `base_lr * factor` (what a schedule does).
    pub fn set_lr_factor(&mut self, factor: f64) {
        for group in &mut self.groups {
            group.lr = group.base_lr * factor;
        }
    }

    /// The current learning rate of each group, by label, in group order.
    pub fn learning_rates(&self) -> Vec<(&str, f64)> {
        self.groups
            .iter()
            .map(|group| (group.label.as_str(), group.lr))
            .collect()
    }

    /// The optimiser's state to checkpoint: one momentum buffer per parameter that has stepped,
    /// named `momentum.<parameter name>`.
    pub fn state_tensors(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        self.momentum_buffers
            .iter()
            .map(|(name, buf)| Ok((format!("{MOMENTUM_PREFIX}{name}"), buf.copy()?)))
            .collect()
    }

    /// Restores the state saved by [`Sgd::state_tensors`], replacing the current one. Every
    /// buffer must belong to a known parameter and have its shape; the buffers are moved to the
    /// parameter's device and dtype.
    pub fn load_state_tensors(
        &mut self,
        tensors: HashMap<String, Tensor>,
    ) -> Result<(), TrainError> {
        let params: HashMap<&str, &Var> = self
            .groups
            .iter()
            .flat_map(|group| group.params.iter())
            .map(|(param, _)| (param.name.as_str(), &param.var))
            .collect();
        let mut buffers = HashMap::with_capacity(tensors.len());
        for (key, tensor) in tensors {
            let Some(name) = key.strip_prefix(MOMENTUM_PREFIX) else {
                return Err(TrainError::OptimizerState(format!(
                    "unexpected tensor `{key}` in the optimiser state"
                )));
            };
            let Some(var) = params.get(name) else {
                return Err(TrainError::OptimizerState(format!(
                    "momentum buffer for unknown parameter `{name}`"
                )));
            };
            if tensor.dims() != var.dims() {
                return Err(TrainError::OptimizerState(format!(
                    "momentum buffer `{name}` has shape {:?}, the parameter {:?}",
                    tensor.dims(),
                    var.dims()
                )));
            }
            // A copy: the buffers are updated in place and must not alias the caller's tensors.
            let tensor = tensor
                .to_device(var.device())?
                .to_dtype(var.dtype())?
                .copy()?;
            buffers.insert(name.to_string(), tensor);
        }
        self.momentum_buffers = buffers;
        Ok(())
    }

    /// Every parameter the optimiser updates, in group order.
    pub fn params(&self) -> impl Iterator<Item = &NamedVar> {
        self.groups
            .iter()
            .flat_map(|group| group.params.iter().map(|(param, _)| param))
    }
}

/// The update with candle ops, for every device (the CPU uses the fused pass): the new
/// parameter and, with momentum, the new buffer (`None` buffer: the parameter's first step).
/// Whether the fused in-place update takes these tensors: f32 and contiguous, all on the CPU
/// or (with the `cuda` feature) all on CUDA.
fn fusable(tensors: &[&Tensor]) -> bool {
    #[cfg(feature = "cuda")]
    if crate::optim_cuda::fusable(tensors) {
        return true;
    }
    optim_cpu::fusable(tensors)
}

/// The fused in-place update of tensors that [`fusable`] accepted, on their device.
fn fused_update(
    p: &Tensor,
    grad: &Tensor,
    buffer: &Tensor,
    update: SgdUpdate,
) -> candle_core::Result<()> {
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() {
        return crate::optim_cuda::sgd_update_in_place(p, grad, buffer, update);
    }
    optim_cpu::sgd_update_in_place(p, grad, buffer, update)
}

fn composed_update(
    p: &Tensor,
    grad: &Tensor,
    buffer: Option<&Tensor>,
    update: SgdUpdate,
) -> candle_core::Result<(Tensor, Option<Tensor>)> {
    // Untracked inputs: otherwise the new buffer's graph would hold this step's gradient graph
    // (forward activations included) and the previous buffer, and every later step's buffer
    // would chain onto it: device memory grew by about 0.4 GiB per ResNet-50 step on CUDA.
    let (p, grad) = (&p.detach(), &grad.detach());
    let mu = f64::from(update.momentum);
    let mut d = if update.weight_decay != 0.0 {
        (grad + p.affine(f64::from(update.weight_decay), 0.0)?)?
    } else {
        grad.clone()
    };
    let mut new_buffer = None;
    if mu != 0.0 {
        let buf = match buffer {
            Some(buf) => (buf.affine(mu, 0.0)? + &d)?,
            None => d.copy()?,
        };
        d = if update.nesterov {
            (d + buf.affine(mu, 0.0)?)?
        } else {
            buf.clone()
        };
        new_buffer = Some(buf);
    }
    Ok(((p - d.affine(f64::from(update.lr), 0.0)?)?, new_buffer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn var(name: &str, values: &[f32], shape: &[usize]) -> NamedVar {
        NamedVar {
            name: name.to_string(),
            var: Var::from_slice(values, shape, &Device::Cpu).unwrap(),
        }
    }

    fn grads_of(loss: &Tensor) -> GradStore {
        loss.backward().unwrap()
    }

    /// loss = sum(c * p) so the gradient is exactly `c`.
    fn linear_loss(param: &NamedVar, coeffs: &[f32]) -> Tensor {
        let c = Tensor::from_slice(coeffs, param.var.dims(), &Device::Cpu).unwrap();
        (param.var.as_tensor() * c).unwrap().sum_all().unwrap()
    }

    fn values(param: &NamedVar) -> Vec<f32> {
        param
            .var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn settings(nesterov: bool, decay_bn_and_bias: bool) -> SgdSettings {
        SgdSettings {
            momentum: 0.9,
            nesterov,
            decay_bn_and_bias,
        }
    }

    /// Nesterov SGD at lr 0.1 and weight decay 0.01 over `w` alone.
    fn nesterov_with_decay(w: &NamedVar) -> Sgd {
        let group = ParamGroup {
            label: "all".into(),
            base_lr: 0.1,
            weight_decay: 0.01,
            params: vec![w.clone()],
        };
        Sgd::new(vec![group], settings(true, true)).unwrap()
    }

    #[test]
    fn composed_updates_keep_no_graph() {
        // f64 takes the composed path; the gradient `c` is itself tracked (it comes from
        // another variable), as a layer's gradient is when it depends on activations.
        let w = NamedVar {
            name: "w".into(),
            var: Var::from_slice(&[1.0f64, -2.0, 0.5], 3, &Device::Cpu).unwrap(),
        };
        let source = Var::from_slice(&[0.5f64, 1.0, -1.0], 3, &Device::Cpu).unwrap();
        let mut sgd = nesterov_with_decay(&w);
        for _ in 0..3 {
            let c = (source.as_tensor() * 2.0).unwrap();
            let loss = (w.var.as_tensor() * c).unwrap().sum_all().unwrap();
            let grads = grads_of(&loss);
            assert!(grads.get(w.var.as_tensor()).unwrap().track_op());
            sgd.step(&grads).unwrap();
            let buffer = &sgd.momentum_buffers["w"];
            assert!(!buffer.track_op(), "the momentum buffer holds a graph");
        }
    }

    #[test]
    fn two_nesterov_steps_match_hand_computation() {
        let w = var("w", &[1.0, -2.0, 0.5, 4.0], &[2, 2]);
        let mut sgd = nesterov_with_decay(&w);
        let g1 = [0.5f32, 1.0, -1.0, 2.0];
        let g2 = [1.0f32, 0.0, 0.25, -0.5];

        // Hand computation in f64, PyTorch's formulas.
        let (lr, wd, mu) = (0.1f64, 0.01f64, 0.9f64);
        let mut p = [1.0f64, -2.0, 0.5, 4.0];
        let mut buf = [0.0f64; 4];
        for (step, g) in [g1, g2].iter().enumerate() {
            for i in 0..4 {
                let d = g[i] as f64 + wd * p[i];
                buf[i] = if step == 0 { d } else { mu * buf[i] + d };
                let d = d + mu * buf[i];
                p[i] -= lr * d;
            }
        }
        sgd.step(&grads_of(&linear_loss(&w, &g1))).unwrap();
        sgd.step(&grads_of(&linear_loss(&w, &g2))).unwrap();
        for (got, want) in values(&w).iter().zip(&p) {
            assert!(
                ((*got as f64) - want).abs() < 1e-6,
                "got {got}, want {want}"
            );
        }
        // Concretely, the first element: d1 = 0.51, buf1 = 0.51, p = 1 - 0.1*(0.51+0.459) = 0.9031.
        let first_after_one = 1.0 - 0.1 * (0.51 + 0.9 * 0.51);
        assert!((first_after_one - 0.9031f64).abs() < 1e-12);
    }

    #[test]
    fn plain_momentum_uses_the_buffer_as_the_step() {
        let w = var("w", &[2.0], &[1, 1]);
        let mut sgd = Sgd::new(
            vec![ParamGroup {
                label: "all".into(),
                base_lr: 0.5,
                weight_decay: 0.0,
                params: vec![w.clone()],
            }],
            settings(false, true),
        )
        .unwrap();
        sgd.step(&grads_of(&linear_loss(&w, &[1.0]))).unwrap(); // buf 1, p = 2 - 0.5
        sgd.step(&grads_of(&linear_loss(&w, &[1.0]))).unwrap(); // buf 1.9, p = 1.5 - 0.95
        assert!((values(&w)[0] - 0.55).abs() < 1e-6);
    }

    #[test]
    fn groups_get_their_own_lr_and_schedule_factor() {
        let body = var("body.weight", &[1.0, 1.0], &[1, 2]);
        let head = var("fc.weight", &[1.0, 1.0], &[1, 2]);
        let mut sgd = Sgd::new(
            vec![
                ParamGroup {
                    label: "body".into(),
                    base_lr: 0.001,
                    weight_decay: 0.0,
                    params: vec![body.clone()],
                },
                ParamGroup {
                    label: "new_layers".into(),
                    base_lr: 0.01,
                    weight_decay: 0.0,
                    params: vec![head.clone()],
                },
            ],
            settings(true, true),
        )
        .unwrap();
        sgd.set_lr_factor(0.1);
        assert_eq!(
            sgd.learning_rates(),
            vec![("body", 0.001 * 0.1), ("new_layers", 0.01 * 0.1)]
        );
        let loss = (linear_loss(&body, &[1.0, 1.0]) + linear_loss(&head, &[1.0, 1.0])).unwrap();
        sgd.step(&grads_of(&loss)).unwrap();
        // First Nesterov step: d = g + mu*g = 1.9 g.
        assert!((values(&body)[0] - (1.0 - 0.0001 * 1.9)).abs() < 1e-7);
        assert!((values(&head)[0] - (1.0 - 0.001 * 1.9)).abs() < 1e-7);
    }

    #[test]
    fn bn_and_biases_can_be_excluded_from_weight_decay() {
        let conv = var("conv.weight", &[1.0, 1.0], &[1, 2]);
        let bias = var("fc.bias", &[1.0], &[1]);
        let mut sgd = Sgd::new(
            vec![ParamGroup {
                label: "all".into(),
                base_lr: 1.0,
                weight_decay: 0.5,
                params: vec![conv.clone(), bias.clone()],
            }],
            SgdSettings {
                momentum: 0.0,
                nesterov: false,
                decay_bn_and_bias: false,
            },
        )
        .unwrap();
        let loss = (linear_loss(&conv, &[0.0, 0.0]) + linear_loss(&bias, &[0.0])).unwrap();
        sgd.step(&grads_of(&loss)).unwrap();
        assert_eq!(values(&conv), vec![0.5, 0.5]); // decayed: p - 1.0 * 0.5 * p
        assert_eq!(values(&bias), vec![1.0]); // not decayed
    }

    #[test]
    fn params_without_gradient_are_untouched() {
        let used = var("a", &[1.0], &[1]);
        let unused = var("b", &[1.0], &[1]);
        let mut sgd = Sgd::new(
            vec![ParamGroup {
                label: "all".into(),
                base_lr: 1.0,
                weight_decay: 0.1,
                params: vec![used.clone(), unused.clone()],
            }],
            settings(true, true),
        )
        .unwrap();
        sgd.step(&grads_of(&linear_loss(&used, &[1.0]))).unwrap();
        assert_eq!(values(&unused), vec![1.0]);
        assert_eq!(sgd.state_tensors().unwrap().len(), 1);
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let make = || {
            let w = var("w", &[1.0, 2.0, 3.0], &[3, 1]);
            let sgd = Sgd::new(
                vec![ParamGroup {
                    label: "all".into(),
                    base_lr: 0.1,
                    weight_decay: 1e-4,
                    params: vec![w.clone()],
                }],
                settings(true, true),
            )
            .unwrap();
            (w, sgd)
        };
        let g = [0.3f32, -0.2, 0.1];
        // Uninterrupted: two steps.
        let (w1, mut sgd1) = make();
        sgd1.step(&grads_of(&linear_loss(&w1, &g))).unwrap();
        let weights_after_one = w1.var.as_tensor().copy().unwrap();
        let saved = sgd1.state_tensors().unwrap();
        sgd1.step(&grads_of(&linear_loss(&w1, &g))).unwrap();

        // Restarted: a fresh optimiser given the weights and state after one step.
        let (w2, mut sgd2) = make();
        w2.var.set(&weights_after_one).unwrap();
        sgd2.load_state_tensors(saved).unwrap();
        sgd2.step(&grads_of(&linear_loss(&w2, &g))).unwrap();
        assert_eq!(values(&w1), values(&w2));

        // Without the buffers the second step differs: the state matters.
        let (w3, mut sgd3) = make();
        w3.var.set(&weights_after_one).unwrap();
        sgd3.step(&grads_of(&linear_loss(&w3, &g))).unwrap();
        assert_ne!(values(&w1), values(&w3));
    }

    #[test]
    fn bad_state_and_settings_are_named() {
        let w = var("w", &[1.0], &[1]);
        let group = ParamGroup {
            label: "all".into(),
            base_lr: 0.1,
            weight_decay: 0.0,
            params: vec![w.clone(), w.clone()],
        };
        let err = Sgd::new(vec![group], settings(true, true)).unwrap_err();
        assert!(err.to_string().contains("`w` appears twice"), "{err}");

        let mut sgd = Sgd::new(
            vec![ParamGroup {
                label: "all".into(),
                base_lr: 0.1,
                weight_decay: 0.0,
                params: vec![w],
            }],
            settings(true, true),
        )
        .unwrap();
        let wrong_shape = HashMap::from([(
            "momentum.w".to_string(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        )]);
        let err = sgd.load_state_tensors(wrong_shape).unwrap_err();
        assert!(err.to_string().contains("[2, 2]"), "{err}");
        let unknown = HashMap::from([(
            "momentum.nope".to_string(),
            Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
        )]);
        let err = sgd.load_state_tensors(unknown).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    /// The in-place CPU pass and the candle-ops path (what CUDA and Metal run) agree bitwise
    /// over several steps, on a tensor spanning several rayon chunks and an odd tail.
    #[test]
    fn fused_cpu_update_matches_the_candle_ops_path() {
        let len = 3 * (1 << 14) + 77;
        let wave = |scale: f32, phase: f32| -> Vec<f32> {
            (0..len)
                .map(|i| scale * (i as f32 * 0.37 + phase).sin())
                .collect()
        };
        for (nesterov, weight_decay) in [(true, 1e-4f32), (false, 0.0), (false, 5e-4)] {
            let update = SgdUpdate {
                lr: 0.05,
                weight_decay,
                momentum: 0.9,
                nesterov,
            };
            let fused = Tensor::from_vec(wave(1.0, 0.0), len, &Device::Cpu).unwrap();
            let buffer = Tensor::zeros(len, DType::F32, &Device::Cpu).unwrap();
            let mut composed = fused.copy().unwrap();
            let mut composed_buffer = None;
            for step in 0..3 {
                let grad = Tensor::from_vec(wave(0.5, step as f32), len, &Device::Cpu).unwrap();
                optim_cpu::sgd_update_in_place(&fused, &grad, &buffer, update).unwrap();
                let (p, b) =
                    composed_update(&composed, &grad, composed_buffer.as_ref(), update).unwrap();
                composed = p;
                composed_buffer = b;
            }
            let as_vec = |t: &Tensor| t.to_vec1::<f32>().unwrap();
            assert_eq!(as_vec(&fused), as_vec(&composed), "nesterov {nesterov}");
            assert_eq!(as_vec(&buffer), as_vec(&composed_buffer.unwrap()));
        }
    }

    #[test]
    fn saved_state_is_a_snapshot_not_the_live_buffers() {
        let p = var("w", &[1.0, 2.0], &[2]);
        let mut sgd = Sgd::new(
            vec![ParamGroup {
                label: "all".into(),
                base_lr: 0.1,
                weight_decay: 0.0,
                params: vec![p.clone()],
            }],
            settings(false, true),
        )
        .unwrap();
        sgd.step(&grads_of(&linear_loss(&p, &[1.0, 1.0]))).unwrap();
        let saved = sgd.state_tensors().unwrap();
        sgd.step(&grads_of(&linear_loss(&p, &[3.0, 3.0]))).unwrap();
        let saved: Vec<f32> = saved["momentum.w"].to_vec1().unwrap();
        assert_eq!(saved, vec![1.0, 1.0]);
    }
}
