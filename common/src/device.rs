//! Device and dtype selection from the command line's `--device` and `--dtype`.

use std::fmt;
use std::str::FromStr;

use tch::{Device, Kind};

use crate::error::Error;

/// `--device auto|cpu|cuda|cuda:N`; `auto` picks CUDA when libtorch sees a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    pub fn resolve(self) -> Device {
        match self {
            DeviceChoice::Auto if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceChoice::Auto | DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda(n) => Device::Cuda(n),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidOption {
            what: "device",
            value: s.to_string(),
            expected: "expected auto, cpu, cuda or cuda:N".into(),
        };
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceChoice::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--dtype auto|f32|bf16|f16`; `auto` is bf16 on CUDA and f32 on CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl DtypeChoice {
    pub fn resolve(self, device: Device) -> Kind {
        match self {
            DtypeChoice::Auto if device.is_cuda() => Kind::BFloat16,
            DtypeChoice::Auto | DtypeChoice::F32 => Kind::Float,
            DtypeChoice::Bf16 => Kind::BFloat16,
            DtypeChoice::F16 => Kind::Half,
        }
    }
}

impl FromStr for DtypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(DtypeChoice::Auto),
            "f32" | "float32" => Ok(DtypeChoice::F32),
            "bf16" | "bfloat16" => Ok(DtypeChoice::Bf16),
            "f16" | "float16" => Ok(DtypeChoice::F16),
            _ => Err(Error::InvalidOption {
                what: "dtype",
                value: s.to_string(),
                expected: "expected auto, f32, bf16 or f16".into(),
            }),
        }
    }
}

impl fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "f32",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::F16 => "f16",
        };
        f.write_str(s)
    }
}

/// Name of a floating dtype as Hugging Face writes it in `config.json`.
pub fn hf_dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
        Device::Cuda(n) => format!("cuda:{n} ({} GPUs visible)", tch::Cuda::device_count()),
        other => format!("{other:?}"),
    }
}

macro_rules! serialize_as_text {
    ($($t:ty),*) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
serialize_as_text!(DeviceChoice, DtypeChoice);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!(DtypeChoice::Auto.resolve(Device::Cpu), Kind::Float);
        assert_eq!(DtypeChoice::Auto.resolve(Device::Cuda(0)), Kind::BFloat16);
        assert!("f64".parse::<DtypeChoice>().is_err());
    }
}
