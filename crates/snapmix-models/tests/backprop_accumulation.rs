//! Gradient accumulation in candle's backward pass, which the workspace patches (vendor/README.md:
//! a node's first gradient is stored as is instead of being added into zeros). Fan-in must
//! still sum every term, and gradients that share storage must stay independent values.

use candle_core::{Device, Result, Tensor, Var};

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

fn assert_close(got: &Tensor, want: &[f32], what: &str) -> Result<()> {
    let got = values(got)?;
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{what}: {got:?} vs {want:?}");
    }
    Ok(())
}

#[test]
fn fan_in_sums_every_gradient_term() -> Result<()> {
    let device = Device::Cpu;
    let x = Var::new(&[1.0f32, -2.0, 3.0], &device)?;
    let a = Tensor::new(&[0.5f32, 1.5, -1.0], &device)?;
    let b = Tensor::new(&[2.0f32, 0.25, 4.0], &device)?;
    // d/dx [sum(x*a) + sum(x*b) + sum(x) + sum(x*x)] = a + b + 1 + 2x
    let loss = ((x.as_tensor() * &a)?.sum_all()?
        + (x.as_tensor() * &b)?.sum_all()?
        + x.as_tensor().sum_all()?
        + (x.as_tensor() * x.as_tensor())?.sum_all()?)?;
    let grads = loss.backward()?;
    let want: Vec<f32> = [(0.5, 2.0, 1.0), (1.5, 0.25, -2.0), (-1.0, 4.0, 3.0)]
        .iter()
        .map(|&(a, b, x): &(f32, f32, f32)| a + b + 1.0 + 2.0 * x)
        .collect();
    assert_close(grads.get(&x).expect("x's gradient"), &want, "fan-in")
}

#[test]
fn a_tensor_added_to_itself_gets_twice_the_gradient() -> Result<()> {
    let device = Device::Cpu;
    let x = Var::new(&[1.0f32, 2.0], &device)?;
    let w = Tensor::new(&[3.0f32, -5.0], &device)?;
    let grads = ((x.as_tensor() + x.as_tensor())? * &w)?
        .sum_all()?
        .backward()?;
    assert_close(grads.get(&x).expect("x's gradient"), &[6.0, -10.0], "x + x")
}

#[test]
fn both_sides_of_an_add_get_equal_independent_gradients() -> Result<()> {
    let device = Device::Cpu;
    let p = Var::new(&[1.0f32, 2.0, 3.0], &device)?;
    let q = Var::new(&[4.0f32, 5.0, 6.0], &device)?;
    let w = Tensor::new(&[0.5f32, -1.0, 2.0], &device)?;
    // p feeds a second term, q only the sum: p's gradient is the stored one plus another.
    let z = (p.as_tensor() + q.as_tensor())?;
    let loss = ((&z * &w)?.sum_all()? + (p.as_tensor() * 3.0)?.sum_all()?)?;
    let grads = loss.backward()?;
    assert_close(grads.get(&q).expect("q's gradient"), &[0.5, -1.0, 2.0], "q")?;
    assert_close(grads.get(&p).expect("p's gradient"), &[3.5, 2.0, 5.0], "p")?;
    // Updating one parameter in place leaves the other's gradient as it was.
    p.set(&(p.as_tensor() - grads.get(&p).expect("p's gradient"))?)?;
    assert_close(
        grads.get(&q).expect("q's gradient"),
        &[0.5, -1.0, 2.0],
        "q after",
    )
}
