//! Command-line pieces every stage shares.

use clap::Args;
use tch::{Device, Kind};

use crate::device::{self, DeviceChoice, DtypeChoice};

/// `--device` and `--dtype`.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// Where to run: auto (CUDA when present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Weights and activations: auto (bf16 on CUDA, f32 on CPU), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: DtypeChoice,
}

impl DeviceArgs {
    /// Resolves the choice and logs it, as every command does at start.
    pub fn resolve(&self) -> (Device, Kind) {
        let device = self.device.resolve();
        let kind = self.dtype.resolve(device);
        tracing::info!(
            "device {} · dtype {}",
            device::describe(device),
            device::hf_dtype_name(kind)
        );
        (device, kind)
    }
}
