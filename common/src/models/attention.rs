//! What every architecture's attention shares: positions from the attention mask, the
//! boolean mask for `scaled_dot_product_attention` (causal + padding, left or right), and
//! the key/value cache used by generation.

use tch::{Kind, Tensor};

/// Keys and values of the tokens seen so far, per layer (`[B, H_kv, S, D]`).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// Number of positions cached (0 before the first forward).
    pub fn len(&self) -> i64 {
        match &self.layers[0] {
            Some((k, _)) => k.size()[2],
            None => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values to layer `layer` and returns all of them.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.shallow_clone(), v.shallow_clone()));
        (k, v)
    }

    /// Keeps only the rows in `index` (rows that finished generating can be dropped).
    pub fn select_rows(&mut self, index: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, index);
            *v = v.index_select(0, index);
        }
    }
}

/// Position ids from a `[B, S]` 0/1 attention mask: the count of real tokens before each
/// one, so left-padded and unpadded rows give the same numbers. Padding gets position 0
/// (never attended to; `transformers`' generate gives it 1, which changes nothing).
pub fn positions_from_mask(mask: &Tensor) -> Tensor {
    (mask.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1).clamp_min(0)
}

/// How the queries of one forward may attend.
#[derive(Debug)]
pub struct Masking {
    /// `[B, 1, T, S]`, true where a query may attend a key; `None` with `causal` or when
    /// every key is visible to every query.
    pub mask: Option<Tensor>,
    pub causal: bool,
}

impl Masking {
    /// `key_mask` is the `[B, S]` attention mask over cached and new tokens; the `q_len`
    /// queries are the last ones. A query always sees itself, so padded queries never get
    /// an empty softmax (their outputs are garbage that nothing reads, but finite).
    pub fn new(key_mask: &Tensor, q_len: i64, sliding_window: Option<i64>) -> Self {
        let s = key_mask.size()[1];
        let window_matters = sliding_window.is_some_and(|w| s > w);
        let no_padding = key_mask.min().int64_value(&[]) == 1;
        if no_padding && !window_matters {
            if q_len == 1 {
                return Masking {
                    mask: None,
                    causal: false,
                };
            }
            if q_len == s {
                return Masking {
                    mask: None,
                    causal: true,
                };
            }
        }
        let device = key_mask.device();
        let q_abs = Tensor::arange_start(s - q_len, s, (Kind::Int64, device)).unsqueeze(1);
        let k_abs = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0);
        let mut allowed = k_abs.le_tensor(&q_abs);
        if let Some(w) = sliding_window.filter(|_| window_matters) {
            allowed = allowed.logical_and(&k_abs.gt_tensor(&(&q_abs - w)));
        }
        let keys = key_mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
        let mask = allowed
            .unsqueeze(0)
            .unsqueeze(0)
            .logical_and(&keys)
            .logical_or(&k_abs.eq_tensor(&q_abs).unsqueeze(0).unsqueeze(0));
        Masking {
            mask: Some(mask),
            causal: false,
        }
    }

    /// `scaled_dot_product_attention` over `[B, H, T, D]` queries and `[B, H_kv, S, D]`
    /// keys/values; grouped-query attention when `H_kv < H`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: Option<f64>) -> Tensor {
        let gqa = k.size()[1] != q.size()[1];
        Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            self.mask.as_ref(),
            0.0,
            self.causal,
            scale,
            gqa,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_left_padding() {
        let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 0]).view([2, 4]);
        let pos = positions_from_mask(&mask);
        assert_eq!(
            Vec::<i64>::try_from(pos.view([-1])).unwrap(),
            [0, 0, 0, 1, 0, 1, 2, 2]
        );
    }

    #[test]
    fn mask_is_causal_and_hides_padding() {
        let key_mask = Tensor::from_slice(&[0i64, 1, 1]).view([1, 3]);
        let m = Masking::new(&key_mask, 3, None).mask.unwrap();
        let got = Vec::<bool>::try_from(m.view([-1])).unwrap();
        // row 0 (a pad query) sees only itself; rows 1, 2 skip the pad key.
        assert_eq!(
            got,
            [true, false, false, false, true, false, false, true, true]
        );
        let full = Tensor::ones([2, 5], (Kind::Int64, tch::Device::Cpu));
        assert!(Masking::new(&full, 5, None).causal);
        let windowed = Masking::new(&full, 5, Some(2)).mask.unwrap();
        let last_row = Vec::<bool>::try_from(windowed.get(0).get(0).get(4)).unwrap();
        assert_eq!(last_row, [false, false, false, true, true]);
    }
}
