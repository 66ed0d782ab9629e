//! The CUDA paths against the CPU ones: forward values and every gradient of each op, and one
//! ResNet-18 training step. Each test prints a line and returns when there is no CUDA device.

use crate::ops::batch_norm::batch_norm_train;
use crate::ops::bn_add_relu::batch_norm_add_relu_train;
use crate::ops::conv2d::conv2d;
use crate::ops::dispatch::{set_allow_tf32, set_composed_ops};
use crate::ops::max_pool::MaxPool2d;
use candle_core::{Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Mutex, MutexGuard};

/// Strict fp32 (TF32 off): the bound for every custom op.
const STRICT: f32 = 1e-4;
/// With TF32 convolutions (10-bit mantissa products, ~5e-4 each), relative to the largest value.
const TF32: f32 = 5e-3;

/// The TF32 switch is process-wide: tests that depend on it run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The first CUDA device, or `None` after printing why the check is skipped.
fn cuda_or_skip(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(err) => {
            println!("{test}: skipped, no CUDA device ({err})");
            None
        }
    }
}

fn random(rng: &mut ChaCha8Rng, dims: &[usize], offset: f32) -> Result<Tensor> {
    let len = dims.iter().product();
    let data: Vec<f32> = (0..len)
        .map(|_| offset + rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// max |a - b| / max |b|, `a` brought to the CPU.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_device(&Device::Cpu)?;
    let diff = (&a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-12))
}

/// A CPU variable and its copy on `device`.
fn var_pair(value: &Tensor, device: &Device) -> Result<(Var, Var)> {
    Ok((
        Var::from_tensor(value)?,
        Var::from_tensor(&value.to_device(device)?)?,
    ))
}

/// Conv forward, input and weight gradients on CUDA against the CPU op.
fn check_conv(
    device: &Device,
    x_dims: [usize; 4],
    w_dims: [usize; 4],
    stride: usize,
    padding: usize,
    tolerance: f32,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (x_cpu, x_gpu) = var_pair(&random(&mut rng, &x_dims, 0.0)?, device)?;
    let (w_cpu, w_gpu) = var_pair(&random(&mut rng, &w_dims, 0.0)?, device)?;
    let want = conv2d(&x_cpu, &w_cpu, stride, padding)?;
    let got = conv2d(&x_gpu, &w_gpu, stride, padding)?;
    let what = format!("{x_dims:?} * {w_dims:?} s{stride} p{padding}");
    assert_eq!(got.dims(), want.dims(), "{what}");
    let err = rel_err(&got, &want)?;
    assert!(err < tolerance, "forward {what}: {err}");
    let probe = random(&mut rng, want.dims(), 0.0)?;
    let want_grads = (want * &probe)?.sum_all()?.backward()?;
    let got_grads = (got * probe.to_device(device)?)?.sum_all()?.backward()?;
    for (name, cpu, gpu) in [("input", &x_cpu, &x_gpu), ("weight", &w_cpu, &w_gpu)] {
        let err = rel_err(
            got_grads.get(gpu).expect("CUDA gradient"),
            want_grads.get(cpu).expect("CPU gradient"),
        )?;
        assert!(err < tolerance, "{name} gradient {what}: {err}");
    }
    Ok(())
}

/// Odd sizes, stride 2, 1x1 and 7x7 kernels: the ResNet geometries and a few awkward ones.
const CONV_CASES: &[([usize; 4], [usize; 4], usize, usize)] = &[
    ([2, 3, 17, 15], [4, 3, 7, 7], 2, 3), // stem
    ([2, 5, 9, 8], [6, 5, 3, 3], 1, 1),   // basic block
    ([2, 5, 9, 9], [6, 5, 3, 3], 2, 1),   // downsampling 3x3
    ([2, 5, 9, 7], [6, 5, 1, 1], 1, 0),   // bottleneck 1x1
    ([3, 5, 9, 7], [6, 5, 1, 1], 2, 0),   // projection shortcut
    ([1, 2, 4, 4], [3, 2, 3, 3], 3, 2),   // stride larger than the kernel reach
    ([4, 16, 13, 11], [8, 16, 3, 3], 1, 1),
    ([2, 3, 33, 31], [8, 3, 7, 7], 2, 3),
];

#[test]
fn conv_matches_the_cpu_in_strict_fp32() -> Result<()> {
    let _serial = serial();
    let Some(device) = cuda_or_skip("conv_matches_the_cpu_in_strict_fp32") else {
        return Ok(());
    };
    set_allow_tf32(false);
    let result = CONV_CASES
        .iter()
        .try_for_each(|&(x, w, s, p)| check_conv(&device, x, w, s, p, STRICT));
    set_allow_tf32(true);
    result
}

#[test]
fn conv_matches_the_cpu_with_tf32() -> Result<()> {
    let _serial = serial();
    let Some(device) = cuda_or_skip("conv_matches_the_cpu_with_tf32") else {
        return Ok(());
    };
    set_allow_tf32(true);
    CONV_CASES
        .iter()
        .try_for_each(|&(x, w, s, p)| check_conv(&device, x, w, s, p, TF32))
}

#[test]
fn conv_gives_the_image_batch_no_gradient_on_cuda() -> Result<()> {
    let _serial = serial();
    let Some(device) = cuda_or_skip("conv_gives_the_image_batch_no_gradient_on_cuda") else {
        return Ok(());
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let images = random(&mut rng, &[2, 3, 8, 8], 0.0)?.to_device(&device)?;
    let w = Var::from_tensor(&random(&mut rng, &[4, 3, 3, 3], 0.0)?.to_device(&device)?)?;
    let grads = conv2d(&images, &w, 1, 1)?.sum_all()?.backward()?;
    assert!(grads.get(&images).is_none());
    assert!(grads.get(&w).is_some());
    Ok(())
}

/// Batch norm (+ ReLU, or `relu(bn(x) + residual)` when `residual`) on CUDA against the CPU op:
/// output, statistics and every gradient.
fn check_batch_norm(
    device: &Device,
    dims: &[usize],
    offset: f32,
    relu: bool,
    residual: bool,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let channels = dims[1];
    let (x_cpu, x_gpu) = var_pair(&random(&mut rng, dims, offset)?, device)?;
    let (g_cpu, g_gpu) = var_pair(&random(&mut rng, &[channels], 1.0)?, device)?;
    let (b_cpu, b_gpu) = var_pair(&random(&mut rng, &[channels], 0.0)?, device)?;
    let (r_cpu, r_gpu) = var_pair(&random(&mut rng, dims, 0.0)?, device)?;
    let run = |x: &Var, g: &Var, b: &Var, r: &Var| {
        if residual {
            batch_norm_add_relu_train(x, g, b, 1e-5, r)
        } else {
            batch_norm_train(x, g, b, 1e-5, relu)
        }
    };
    let (want, want_mean, want_var) = run(&x_cpu, &g_cpu, &b_cpu, &r_cpu)?;
    let (got, got_mean, got_var) = run(&x_gpu, &g_gpu, &b_gpu, &r_gpu)?;
    assert!(got.device().is_cuda() && got_mean.device().is_cuda());
    let what = format!("{dims:?} offset {offset} relu {relu} residual {residual}");
    for (name, g, w) in [
        ("output", &got, &want),
        ("mean", &got_mean, &want_mean),
        ("var", &got_var, &want_var),
    ] {
        let err = rel_err(g, w)?;
        assert!(err < STRICT, "{name} {what}: {err}");
    }
    let probe = random(&mut rng, dims, 0.0)?;
    let want_grads = (want * &probe)?.sum_all()?.backward()?;
    let got_grads = (got * probe.to_device(device)?)?.sum_all()?.backward()?;
    let mut pairs = vec![
        ("input", &x_cpu, &x_gpu),
        ("gamma", &g_cpu, &g_gpu),
        ("beta", &b_cpu, &b_gpu),
    ];
    if residual {
        pairs.push(("residual", &r_cpu, &r_gpu));
    }
    for (name, cpu, gpu) in pairs {
        let err = rel_err(
            got_grads.get(gpu).expect("CUDA gradient"),
            want_grads.get(cpu).expect("CPU gradient"),
        )?;
        assert!(err < STRICT, "{name} gradient {what}: {err}");
    }
    Ok(())
}

#[test]
fn batch_norm_matches_the_cpu() -> Result<()> {
    let _serial = serial();
    let Some(device) = cuda_or_skip("batch_norm_matches_the_cpu") else {
        return Ok(());
    };
    check_batch_norm(&device, &[4, 3, 5, 7], 0.0, false, false)?;
    check_batch_norm(&device, &[4, 3, 5, 7], 0.0, true, false)?;
    // A large offset tests the shifted one-pass variance; odd sizes leave partial blocks.
    check_batch_norm(&device, &[3, 5, 6, 6], 50.0, false, false)?;
    check_batch_norm(&device, &[2, 4, 17, 3], 0.5, true, false)?;
    // Many values per channel: several blocks per channel add into the same sums.
    check_batch_norm(&device, &[8, 2, 61, 67], 0.25, true, false)?;
    check_batch_norm(&device, &[6, 8], 0.0, false, false) // BatchNorm1d-shaped input
}

#[test]
fn batch_norm_add_relu_matches_the_cpu() -> Result<()> {
    let _serial = serial();
    let Some(device) = cuda_or_skip("batch_norm_add_relu_matches_the_cpu") else {
        return Ok(());
    };
    check_batch_norm(&device, &[4, 3, 5, 7], 0.0, true, true)?;
    check_batch_norm(&device, &[3, 5, 6, 6], 50.0, true, true)?;
    check_batch_norm(&device, &[8, 2, 61, 67], 0.25, true, true)
}

/// Max-pool forward and backward on CUDA against the CPU op: bit-identical, since both take the
/// first maximum and sum each input's window gradients in the same order.
fn check_max_pool(device: &Device, dims: [usize; 4], pool: MaxPool2d) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut x = random(&mut rng, &dims, 0.0)?;
    // Ties: the first maximum must win on both sides.
    x = (x * 4.0)?.round()?;
    let (x_cpu, x_gpu) = var_pair(&x, device)?;
    let want = pool.forward(&x_cpu)?;
    let got = pool.forward(&x_gpu)?;
    let what = format!("{dims:?} {pool:?}");
    assert_eq!(
        got.to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        want.flatten_all()?.to_vec1::<f32>()?,
        "forward {what}"
    );
    let probe = random(&mut rng, want.dims(), 0.0)?;
    let want_grad = (want * &probe)?.sum_all()?.backward()?;
    let got_grad = (got * probe.to_device(device)?)?.sum_all()?.backward()?;
    let got_grad = got_grad.get(&x_gpu).expect("CUDA gradient");
    let want_grad = want_grad.get(&x_cpu).expect("CPU gradient");
    assert_eq!(
        got_grad
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        want_grad.flatten_all()?.to_vec1::<f32>()?,
        "gradient {what}"
    );
    Ok(())
}

#[test]
fn max_pool_matches_the_cpu_exactly() -> Result<()> {
    let _serial = serial();
    let Some(device) = cuda_or_skip("max_pool_matches_the_cpu_exactly") else {
        return Ok(());
    };
    check_max_pool(&device, [2, 3, 9, 8], MaxPool2d::RESNET_STEM)?;
    check_max_pool(&device, [1, 2, 7, 7], MaxPool2d::RESNET_STEM)?;
    check_max_pool(&device, [2, 4, 33, 30], MaxPool2d::RESNET_STEM)?;
    let pool = |kernel, stride, padding| MaxPool2d {
        kernel,
        stride,
        padding,
    };
    check_max_pool(&device, [1, 2, 6, 5], pool(2, 2, 0))?;
    check_max_pool(&device, [1, 1, 5, 6], pool(3, 1, 1))
}

#[test]
fn resnet18_training_step_matches_the_cpu() -> std::result::Result<(), Box<dyn std::error::Error>> {
    use crate::{Arch, ResNet};
    use candle_nn::{VarBuilder, VarMap};
    let _serial = serial();
    let Some(device) = cuda_or_skip("resnet18_training_step_matches_the_cpu") else {
        return Ok(());
    };
    let build = |device: &Device| -> crate::Result<ResNet> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, device);
        let model = ResNet::new(Arch::ResNet18, 10, None, vb)?;
        model.init_weights(0)?;
        Ok(model)
    };
    let (cpu_model, gpu_model) = (build(&Device::Cpu)?, build(&device)?);
    let composed_model = build(&Device::Cpu)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // Not square, but with the same remainders at every stride-2 stage in both dimensions
    // (37, 19, 10, 5, 3 and 69, 35, 18, 9, 5): candle's composed conv backward gives
    // conv_transpose2d one output padding for both.
    let images = random(&mut rng, &[3, 3, 37, 69], 0.0)?;
    let labels = Tensor::new(&[1u32, 7, 3], &Device::Cpu)?;
    let step = |model: &ResNet, device: &Device| -> crate::Result<_> {
        let logits = model.forward_t(&images.to_device(device)?, true)?.logits;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels.to_device(device)?)?;
        Ok((logits, loss.backward()?))
    };
    set_allow_tf32(false);
    let (want_logits, want_grads) = step(&cpu_model, &Device::Cpu)?;
    let got = step(&gpu_model, &device);
    set_allow_tf32(true);
    let (got_logits, got_grads) = got?;
    // The CPU's composed ops give a second strict-fp32 answer: how far two correct fp32 orders
    // of summation drift apart through this network (train-mode batch norm over 3 images
    // amplifies rounding layer by layer).
    set_composed_ops(true);
    let composed = step(&composed_model, &Device::Cpu);
    set_composed_ops(false);
    let (_, composed_grads) = composed?;
    // A whole network compounds each op's rounding: a looser bound than per op, and never
    // tighter than 4x the CPU's own two implementations' spread.
    let bound = 1e-3;
    let err = rel_err(&got_logits, &want_logits)?;
    assert!(err < bound, "logits: {err}");
    let parameters = cpu_model.named_parameters();
    for (((name, cpu), (_, gpu)), (_, composed)) in parameters
        .iter()
        .zip(gpu_model.named_parameters())
        .zip(composed_model.named_parameters())
    {
        let want = want_grads.get(cpu).expect("CPU gradient");
        let spread = rel_err(
            composed_grads.get(composed).expect("composed gradient"),
            want,
        )?;
        let err = rel_err(got_grads.get(gpu).expect("CUDA gradient"), want)?;
        assert!(
            err < bound.max(4.0 * spread),
            "gradient of {name}: {err} (CPU fused vs composed: {spread})"
        );
    }
    let (want_state, got_state) = (cpu_model.state_dict()?, gpu_model.state_dict()?);
    for (name, want) in want_state.iter().filter(|(n, _)| n.contains("running_")) {
        let err = rel_err(&got_state[name], want)?;
        assert!(err < STRICT, "{name}: {err}");
    }
    Ok(())
}
