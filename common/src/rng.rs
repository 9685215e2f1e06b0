//! The state of libtorch's default random generators — the CPU's and each GPU's a run
//! uses — read and restored through `shim/rng.cpp` (tch exposes none). A checkpoint keeps
//! every rank's as `rng_state_{rank}.safetensors` (tensors `cpu`, `cuda:{i}`; bytes), as
//! Hugging Face's Trainer keeps `rng_state_{rank}.pth`, so that what draws from them
//! after a resume (LoRA dropout) draws what the uninterrupted run drew.

#![allow(unsafe_code)] // FFI to the shim; every call is checked

use std::collections::HashMap;
use std::ffi::c_int;
use std::path::{Path, PathBuf};

use tch::Device;

use crate::error::{Error, Result};

unsafe extern "C" {
    fn rlhf_rng_get_state(
        device_type: c_int,
        index: c_int,
        out: *mut *mut u8,
        len: *mut usize,
    ) -> c_int;
    fn rlhf_rng_set_state(device_type: c_int, index: c_int, data: *const u8, len: usize) -> c_int;
}

/// A seed for (step, purpose) of a run seeded `seed`: a resumed run draws at a step what
/// the uninterrupted run drew there (PPO's shuffles and samples, distillation's draws).
pub fn derived_seed(seed: u64, step: u64, purpose: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ purpose.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
}

/// The generator of `device` (CPU, or CUDA device i) as the shim names it.
fn code(device: Device) -> (c_int, c_int) {
    match device {
        Device::Cuda(i) => (1, i as c_int),
        _ => (0, 0),
    }
}

fn name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// The state of `device`'s default generator.
pub fn get(device: Device) -> Result<Vec<u8>> {
    let (kind, index) = code(device);
    let (mut out, mut len) = (std::ptr::null_mut(), 0usize);
    // SAFETY: out/len are written by the shim on success, then copied and freed.
    unsafe {
        if rlhf_rng_get_state(kind, index, &mut out, &mut len) != 0 {
            return Err(Error::InvalidArgument(format!(
                "cannot read the {} generator's state: {}",
                name(device),
                crate::shim::last_error()
            )));
        }
        Ok(crate::shim::take_buffer(out, len))
    }
}

/// Restores `device`'s default generator to `state` (from [`get`]).
pub fn set(device: Device, state: &[u8]) -> Result<()> {
    let (kind, index) = code(device);
    // SAFETY: the pointer is valid for the call; the shim copies the bytes.
    if unsafe { rlhf_rng_set_state(kind, index, state.as_ptr(), state.len()) } != 0 {
        return Err(Error::InvalidArgument(format!(
            "cannot restore the {} generator's state: {}",
            name(device),
            crate::shim::last_error()
        )));
    }
    Ok(())
}

/// The generators a process uses: the CPU's, and those of the GPUs among `devices`.
fn generators(devices: &[Device]) -> Vec<Device> {
    let mut out = vec![Device::Cpu];
    for d in devices {
        if matches!(d, Device::Cuda(_)) && !out.contains(d) {
            out.push(*d);
        }
    }
    out
}

/// This process's generator states as the bytes of its `rng_state_{rank}.safetensors`.
pub fn snapshot(devices: &[Device]) -> Result<Vec<u8>> {
    let states = generators(devices)
        .into_iter()
        .map(|d| Ok((name(d), get(d)?)))
        .collect::<Result<Vec<_>>>()?;
    let views = states
        .iter()
        .map(|(n, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![bytes.len()], bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("random generator state: {e}")))?;
    safetensors::tensor::serialize(views, None)
        .map_err(|e| Error::InvalidArgument(format!("random generator state: {e}")))
}

/// Where rank `rank`'s generator states are in checkpoint `dir`.
pub fn file(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("rng_state_{rank}.safetensors"))
}

/// Restores this process's generators from `path` (a [`snapshot`] written to a file). A
/// generator the file lacks (a GPU the saving run did not use) keeps its state.
pub fn restore(path: &Path, devices: &[Device]) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::checkpoint(path, e.to_string()))?;
    let stored: HashMap<String, Vec<u8>> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    for d in generators(devices) {
        if let Some(state) = stored.get(&name(d)) {
            set(d, state).map_err(|e| Error::checkpoint(path, e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// Draws after a restore repeat the draws after the snapshot.
    #[test]
    fn restored_cpu_generator_repeats_its_draws() {
        let _ = Tensor::rand([3], (Kind::Float, Device::Cpu));
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path(), 0);
        std::fs::write(&path, snapshot(&[Device::Cpu]).unwrap()).unwrap();
        let first = Tensor::rand([5], (Kind::Float, Device::Cpu));
        let _ = Tensor::rand([7], (Kind::Float, Device::Cpu));
        restore(&path, &[Device::Cpu]).unwrap();
        let again = Tensor::rand([5], (Kind::Float, Device::Cpu));
        assert!(first.equal(&again));
        assert!(set(Device::Cpu, &[1, 2, 3]).is_err(), "a truncated state");
    }
}
