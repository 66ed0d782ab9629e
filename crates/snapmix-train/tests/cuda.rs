//! CPU-vs-CUDA check of the fused SGD update: the CUDA kernel must give the CPU loop's
//! parameters and momentum buffers bit for bit, with Nesterov momentum and weight decay, over
//! several steps and parameter sizes (one element to more than one launch's worth of blocks).
//! Compiled only with `--features cuda`; without a visible GPU the test prints that it was
//! skipped and returns.
#![cfg(feature = "cuda")]

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use snapmix_train::{NamedVar, ParamGroup, Sgd, SgdSettings};

fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            let reason = e.to_string();
            let reason = reason.lines().next().unwrap_or_default();
            println!("{test}: CUDA check skipped for lack of a device ({reason})");
            None
        }
    }
}

/// Parameters with the given sizes on `device`, from the same host values on every device.
fn params(sizes: &[usize], values: &[Vec<f32>], device: &Device) -> Vec<NamedVar> {
    sizes
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (&size, v))| NamedVar {
            name: format!("p{i}"),
            var: Var::from_slice(v, size, device).unwrap(),
        })
        .collect()
}

fn optimizer(decayed: Vec<NamedVar>, plain: Vec<NamedVar>) -> Sgd {
    let group = |label: &str, weight_decay, params| ParamGroup {
        label: label.into(),
        base_lr: 0.05,
        weight_decay,
        params,
    };
    let settings = SgdSettings {
        momentum: 0.9,
        nesterov: true,
        decay_bn_and_bias: true,
    };
    Sgd::new(
        vec![group("decayed", 1e-4, decayed), group("plain", 0.0, plain)],
        settings,
    )
    .unwrap()
}

fn host(var: &Var) -> Vec<f32> {
    var.as_tensor()
        .to_device(&Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn fused_sgd_matches_the_cpu_bit_for_bit() {
    let Some(device) = gpu("fused_sgd_matches_the_cpu_bit_for_bit") else {
        return;
    };
    let sizes = [1usize, 255, 4097, 600_000];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut random = |n: usize| {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect::<Vec<_>>()
    };
    let values: Vec<Vec<f32>> = sizes.iter().map(|&n| random(n)).collect();
    let steps: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|_| sizes.iter().map(|&n| random(n)).collect())
        .collect();
    let run = |device: &Device| -> (Vec<NamedVar>, Sgd) {
        let all = params(&sizes, &values, device);
        let mut sgd = optimizer(all[..2].to_vec(), all[2..].to_vec());
        for gradients in &steps {
            // loss = sum(c * p): each gradient is exactly c on both devices.
            let mut loss = Tensor::zeros((), candle_core::DType::F32, device).unwrap();
            for (param, g) in all.iter().zip(gradients) {
                let c = Tensor::from_slice(g, g.len(), device).unwrap();
                let term = (param.var.as_tensor() * c).unwrap().sum_all().unwrap();
                loss = (loss + term).unwrap();
            }
            sgd.step(&loss.backward().unwrap()).unwrap();
        }
        (all, sgd)
    };
    let (cpu_params, cpu_sgd) = run(&Device::Cpu);
    let (gpu_params, gpu_sgd) = run(&device);
    for (cpu, gpu) in cpu_params.iter().zip(&gpu_params) {
        assert!(gpu.var.device().is_cuda());
        let (want, got) = (host(&cpu.var), host(&gpu.var));
        assert_ne!(want, values[cpu.name[1..].parse::<usize>().unwrap()]);
        assert_eq!(got, want, "{}: parameter after 3 steps", cpu.name);
    }
    let (cpu_state, gpu_state) = (
        cpu_sgd.state_tensors().unwrap(),
        gpu_sgd.state_tensors().unwrap(),
    );
    assert_eq!(cpu_state.len(), sizes.len());
    for (name, want) in &cpu_state {
        let got = gpu_state[name].to_device(&Device::Cpu).unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap(),
            "{name}: momentum buffer"
        );
    }
}
