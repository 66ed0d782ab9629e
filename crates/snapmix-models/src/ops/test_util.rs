//! Helpers shared by the ops' tests: seeded random tensors and a whole-tensor relative error.

use candle_core::{Device, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A CPU f32 tensor of `dims` with values uniform in `offset + [-1, 1)`.
pub(crate) fn random(rng: &mut ChaCha8Rng, dims: &[usize], offset: f32) -> Result<Tensor> {
    let len = dims.iter().product();
    let data: Vec<f32> = (0..len)
        .map(|_| offset + rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// max |a - b| / max |b|: the relative error of a whole tensor.
pub(crate) fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-12))
}

/// Runs `f` on a 2-thread rayon pool, as on the 2-core machines: which conv path a geometry
/// takes (batch-wide or per image) depends on the thread count.
pub(crate) fn on_two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a 2-thread pool")
        .install(f)
}
