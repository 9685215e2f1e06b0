//! The libtorch link works end to end: a tensor op, a backward pass and an AdamW step,
//! checked against values computed by hand.

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

#[test]
fn tensor_op_backward_and_adamw_step() {
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs
        .root()
        .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0, 3.0]));
    // loss = sum(w²) / 2  ⇒  grad = w
    let loss = (&w * &w).sum(Kind::Float) / 2.0;
    assert!((loss.double_value(&[]) - 7.0).abs() < 1e-6);
    let mut opt = nn::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        wd: 0.0,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(&vs, 0.1)
    .unwrap();
    opt.zero_grad();
    loss.backward();
    assert!(w.grad().equal(&Tensor::from_slice(&[1.0f32, -2.0, 3.0])));
    opt.step();
    // First Adam step: m̂ = g, v̂ = g², so w ← w − lr·g/(|g| + eps) = w − 0.1·sign(g).
    let expected = Tensor::from_slice(&[0.9f32, -1.9, 2.9]);
    let diff = (&w - expected).abs().max().double_value(&[]);
    assert!(diff < 1e-6, "AdamW step off by {diff}");
}

#[test]
fn cuda_availability_is_reported_without_crashing() {
    // On a CPU machine this is false; on a GPU machine the same binary must say true
    // (the CUDA backend is linked with --no-as-needed, see build/link.rs).
    let available = tch::Cuda::is_available();
    assert_eq!(available, tch::Cuda::device_count() > 0);
}
