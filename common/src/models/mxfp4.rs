//! gpt-oss checkpoints' MXFP4 experts (OCP microscaling: blocks of 32 FP4 E2M1 values
//! sharing one power-of-two scale), dequantized as they are read, as `transformers` does
//! where it has no MXFP4 kernels (`Mxfp4Config(dequantize=True)`, what TRL's gpt-oss
//! recipes load for training): the experts are then plain parameters in the model's dtype
//! and everything saved afterwards is unquantized.
//!
//! A stored `{name}_blocks` `[E, R, G, 16]` (bytes, two values each, low nibble first)
//! with `{name}_scales` `[E, R, G]` (biased exponents, 2^(s − 127)) is the parameter
//! `{name}` `[E, G·32, R]` (`convert_moe_packed_tensors`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

use serde_json::{Map, Value};
use tch::{Kind, Tensor};

use super::moe::FUSED_EXPERT_PARAMS;
use crate::checkpoint::Takes;
use crate::error::{Error, Result};

/// The FP4 (E2M1) values of the 16 codes.
const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Whether `config.json` says the checkpoint is stored in MXFP4.
pub fn stored(raw: &Map<String, Value>) -> bool {
    raw.get("quantization_config")
        .and_then(|q| q.get("quant_method"))
        .and_then(Value::as_str)
        == Some("mxfp4")
}

/// The parameter `[E, G·32, R]` in `kind` of MXFP4 `blocks` `[E, R, G, 16]` and `scales`
/// `[E, R, G]`, one expert at a time (the codes' index tensors stay small).
pub fn dequantize(
    blocks: &Tensor,
    scales: &Tensor,
    kind: Kind,
) -> std::result::Result<Tensor, String> {
    let b = blocks.size();
    if b.len() != 4 || b[3] != 16 || scales.size() != b[..3] {
        return Err(format!(
            "MXFP4 blocks {b:?} and scales {:?} do not pair (expected [E, R, G, 16] and [E, R, G])",
            scales.size()
        ));
    }
    if blocks.kind() != Kind::Uint8 || scales.kind() != Kind::Uint8 {
        return Err("MXFP4 blocks and scales must be stored as U8".into());
    }
    let lut = Tensor::from_slice(&FP4_VALUES);
    let (rows, groups) = (b[1], b[2]);
    let experts: Vec<Tensor> = (0..b[0])
        .map(|e| {
            let bytes = blocks.get(e).to_kind(Kind::Int64);
            let lo = lut.index_select(0, &bytes.remainder(16).reshape([-1]));
            let hi = lut.index_select(0, &bytes.divide_scalar_mode(16, "floor").reshape([-1]));
            // Low nibble first: [R, G, 16, 2] → [R, G, 32].
            let values = Tensor::stack(&[lo, hi], -1).reshape([rows, groups, 32]);
            let exponent = (scales.get(e).to_kind(Kind::Int) - 127).unsqueeze(-1);
            values
                .ldexp(&exponent)
                .to_kind(kind)
                .reshape([rows, groups * 32])
                .transpose(0, 1)
        })
        .collect();
    Ok(Tensor::stack(&experts, 0))
}

/// For a checkpoint stored in MXFP4, how a load fills the fused experts' `gate_up_proj`
/// and `down_proj` (taken out of `vars`): from their `_blocks` and `_scales`, whichever is
/// read first waiting for the other.
pub fn takes(vars: &mut HashMap<String, Tensor>) -> Takes<'static> {
    let mut takes = Takes::new();
    let names: Vec<String> = vars
        .keys()
        .filter(|n| {
            FUSED_EXPERT_PARAMS
                .iter()
                .any(|p| n.ends_with(&format!(".experts.{p}")))
        })
        .cloned()
        .collect();
    for name in names {
        let var = vars.remove(&name).expect("listed");
        let pending: Rc<RefCell<(Option<Tensor>, Option<Tensor>)>> = Rc::default();
        for part in ["blocks", "scales"] {
            let key = format!("{name}_{part}");
            let (var, pending, name) = (var.shallow_clone(), pending.clone(), name.clone());
            let take = move |path: &Path, t: Tensor| -> Result<()> {
                let mut pair = pending.borrow_mut();
                match part {
                    "blocks" => pair.0 = Some(t),
                    _ => pair.1 = Some(t),
                }
                let (Some(blocks), Some(scales)) = (&pair.0, &pair.1) else {
                    return Ok(());
                };
                let full = dequantize(blocks, scales, var.kind())
                    .map_err(|m| Error::checkpoint(path, format!("'{name}': {m}")))?;
                if full.size() != var.size() {
                    return Err(Error::checkpoint(
                        path,
                        format!(
                            "'{name}' dequantizes to {:?}, the model expects {:?}",
                            full.size(),
                            var.size()
                        ),
                    ));
                }
                let _guard = tch::no_grad_guard();
                var.shallow_clone().copy_(&full.to_device(var.device()));
                *pair = (None, None);
                Ok(())
            };
            takes.insert(key, Box::new(take));
        }
    }
    takes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_scales_decode_as_transformers_lays_them_out() {
        // One expert, R = 2 rows, G = 1 group: row 0's bytes hold codes (lo, hi) = (1, 2)
        // → 0.5, 1.0, with scale 128 (×2); row 1's (15, 8) → −6, −0 with scale 126 (×½).
        let mut bytes = vec![0u8; 32];
        bytes[0] = 1 | (2 << 4);
        bytes[16] = 15 | (8 << 4);
        let blocks = Tensor::from_slice(&bytes).view([1, 2, 1, 16]);
        let scales = Tensor::from_slice(&[128u8, 126]).view([1, 2, 1]);
        let w = dequantize(&blocks, &scales, Kind::Float).unwrap();
        assert_eq!(w.size(), [1, 32, 2]);
        let at = |i: i64, r: i64| w.double_value(&[0, i, r]);
        assert_eq!((at(0, 0), at(1, 0), at(2, 0)), (1.0, 2.0, 0.0));
        assert_eq!((at(0, 1), at(1, 1)), (-3.0, 0.0));
        assert!(dequantize(&blocks, &scales.view([1, 1, 2]), Kind::Float).is_err());
    }
}
