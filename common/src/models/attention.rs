//! What every architecture's attention shares: positions from the attention mask, the
//! boolean mask for `scaled_dot_product_attention` (causal + padding, left or right), and
//! the key/value cache used by generation.

use tch::{Device, Kind, Tensor};

/// Keys and values of the tokens seen so far, per layer (`[B, H_kv, S, D]`).
///
/// With a capacity, each layer's buffers are allocated once at the first append and later
/// steps copy into them (no `cat` of the whole cache per token); past the capacity the
/// cache grows by `cat`. After [`KvCache::write_at`] the cache is static: each forward of
/// one token writes it at a slot held on the device and attends over the whole buffer
/// (the caller's mask hides the slots not written yet), so a decode step has fixed shapes
/// and addresses and can be captured in a CUDA graph. The cache also remembers whether
/// the prompt had padding: tokens appended after the first forward must be real ones
/// (generation appends mask ones), so later forwards need not ask the device again.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
    capacity: i64,
    pub(crate) padded: Option<bool>,
    /// Static mode: the `[1]` slot the next token's keys and values go to.
    slot: Option<Tensor>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers hold `capacity` positions without reallocation.
    pub fn with_capacity(num_layers: usize, capacity: i64) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            capacity,
            padded: None,
            slot: None,
        }
    }

    /// Number of positions cached (0 before the first forward).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold (the capacity once they are allocated).
    pub fn buffer_len(&self) -> i64 {
        match &self.layers[0] {
            Some((k, _)) => k.size()[2],
            None => self.capacity,
        }
    }

    /// Switches to static mode: later forwards (one token each) write their keys and values
    /// at `slot` (a `[1]` int64 tensor on the device, which the caller advances in place)
    /// and see the whole buffer. Needs the buffers allocated by a first forward that left
    /// room (a capacity beyond it).
    pub fn write_at(&mut self, slot: &Tensor) {
        assert!(
            self.layers
                .iter()
                .all(|l| l.as_ref().is_some_and(|(k, _)| k.size()[2] > self.len)),
            "a static cache needs buffers with room left"
        );
        self.slot = Some(slot.shallow_clone());
    }

    /// Appends this step's keys and values to layer `layer` and returns all of them (the
    /// positions cached before this forward and the new ones). Every layer appends the
    /// same number of positions per forward; the last layer's append advances `len`.
    /// In static mode, writes them at the slot and returns the whole buffers.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if let Some(slot) = &self.slot {
            let (bk, bv) = self.layers[layer].as_ref().expect("static cache buffers");
            let (mut bk, mut bv) = (bk.shallow_clone(), bv.shallow_clone());
            let _ = bk.index_copy_(2, slot, &k);
            let _ = bv.index_copy_(2, slot, &v);
            return (bk, bv);
        }
        let (start, t) = (self.len, k.size()[2]);
        let end = start + t;
        let stored = match self.layers[layer].take() {
            None if end < self.capacity => {
                let mut shape = k.size();
                shape[2] = self.capacity;
                // Zeros, not garbage: a static cache attends over slots not written yet
                // with weight 0, and 0 × NaN would still be NaN.
                let bk = Tensor::zeros(&shape[..], (k.kind(), k.device()));
                let bv = Tensor::zeros(&shape[..], (v.kind(), v.device()));
                bk.narrow(2, 0, t).copy_(&k);
                bv.narrow(2, 0, t).copy_(&v);
                (bk, bv)
            }
            None => (k, v),
            Some((bk, bv)) if end <= bk.size()[2] => {
                bk.narrow(2, start, t).copy_(&k);
                bv.narrow(2, start, t).copy_(&v);
                (bk, bv)
            }
            Some((bk, bv)) => (
                Tensor::cat(&[bk.narrow(2, 0, start), k], 2),
                Tensor::cat(&[bv.narrow(2, 0, start), v], 2),
            ),
        };
        let out = (stored.0.narrow(2, 0, end), stored.1.narrow(2, 0, end));
        self.layers[layer] = Some(stored);
        if layer + 1 == self.layers.len() {
            self.len = end;
        }
        out
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

/// Position ids of packed rows from `[B, T]` segment ids (1, 2, … per row, 0 for
/// padding): each row's tokens count from 0, as the position ids TRL's padding-free
/// collator gives `transformers`.
pub fn positions_from_segments(segments: &Tensor) -> Tensor {
    let t = segments.size()[1];
    let index = Tensor::arange(t, (Kind::Int64, segments.device()))
        .unsqueeze(0)
        .expand_as(segments);
    let previous = segments.narrow(1, 0, t - 1);
    let starts = Tensor::cat(
        &[
            Tensor::ones_like(&segments.narrow(1, 0, 1)).to_kind(Kind::Bool),
            segments.narrow(1, 1, t - 1).ne_tensor(&previous),
        ],
        1,
    );
    let row_start = index.where_scalarother(&starts, 0).cummax(1).0;
    index - row_start
}

/// `[T, S]` bools for the last `q_len` of `s` positions attending over all `s`: which keys
/// each query may see (at or before it, and within `window` when given), and which key is
/// the query's own.
fn causal_window(q_len: i64, s: i64, window: Option<i64>, device: Device) -> (Tensor, Tensor) {
    let q_abs = Tensor::arange_start(s - q_len, s, (Kind::Int64, device)).unsqueeze(1);
    let k_abs = Tensor::arange(s, (Kind::Int64, device)).unsqueeze(0);
    let mut allowed = k_abs.le_tensor(&q_abs);
    if let Some(w) = window {
        allowed = allowed.logical_and(&k_abs.gt_tensor(&(&q_abs - w)));
    }
    (allowed, k_abs.eq_tensor(&q_abs))
}

/// How the queries of one forward may attend.
#[derive(Debug)]
pub struct Masking {
    /// `[B, 1, T, S]`, true where a query may attend a key; `None` with `causal` or when
    /// every key is visible to every query.
    pub mask: Option<Tensor>,
    pub causal: bool,
    /// Gemma's sliding-window layers beside global ones: their masking (the window
    /// applied); `None` when every layer attends alike.
    pub local: Option<Box<Masking>>,
}

impl Masking {
    /// `key_mask` is the `[B, S]` attention mask over cached and new tokens; the `q_len`
    /// queries are the last ones. A query always sees itself, so padded queries never get
    /// an empty softmax (their outputs are garbage that nothing reads, but finite).
    /// `padded` says whether `key_mask` has a 0 when the caller knows; `None` asks the
    /// device (one host sync).
    pub fn new(
        key_mask: &Tensor,
        q_len: i64,
        sliding_window: Option<i64>,
        padded: Option<bool>,
    ) -> Self {
        let s = key_mask.size()[1];
        let window_matters = sliding_window.is_some_and(|w| s > w);
        let padded = padded.unwrap_or_else(|| Self::has_padding(key_mask));
        if !padded && !window_matters {
            if q_len == 1 {
                return Masking {
                    mask: None,
                    causal: false,
                    local: None,
                };
            }
            if q_len == s {
                return Masking {
                    mask: None,
                    causal: true,
                    local: None,
                };
            }
        }
        let window = sliding_window.filter(|_| window_matters);
        let (allowed, own) = causal_window(q_len, s, window, key_mask.device());
        let keys = key_mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
        let mask = allowed
            .unsqueeze(0)
            .unsqueeze(0)
            .logical_and(&keys)
            .logical_or(&own.unsqueeze(0).unsqueeze(0));
        Masking {
            mask: Some(mask),
            causal: false,
            local: None,
        }
    }

    /// Packed rows (`[B, T]` segment ids, 0 for padding): causal within each row, never
    /// across rows, within the sliding window; a query always sees itself.
    pub fn packed(segments: &Tensor, sliding_window: Option<i64>) -> Self {
        let t = segments.size()[1];
        let window = sliding_window.filter(|&w| t > w);
        let (allowed, own) = causal_window(t, t, window, segments.device());
        let same_row = segments
            .unsqueeze(2)
            .eq_tensor(&segments.unsqueeze(1))
            .logical_and(&segments.ne(0).unsqueeze(1));
        let mask = same_row
            .logical_and(&allowed.unsqueeze(0))
            .logical_or(&own.unsqueeze(0));
        Masking {
            mask: Some(mask.unsqueeze(1)),
            causal: false,
            local: None,
        }
    }

    /// One query at cache slot `slot` (`[1]`, on the device) over a static cache whose
    /// `[B, S]` bool `key_valid` marks real keys (prompt padding false): it sees the valid
    /// keys at or before its slot, within the sliding window. Never waits for the device.
    /// The mask is additive (0 or −∞ in `kind`, the activations' dtype), built once per
    /// step rather than converted from booleans in every layer.
    pub fn at_slot(
        key_valid: &Tensor,
        slot: &Tensor,
        sliding_window: Option<i64>,
        kind: Kind,
    ) -> Self {
        let s = key_valid.size()[1];
        let k_abs = Tensor::arange(s, (Kind::Int64, key_valid.device()));
        let mut allowed = k_abs.le_tensor(slot);
        if let Some(w) = sliding_window {
            allowed = allowed.logical_and(&k_abs.gt_tensor(&(slot - w)));
        }
        let hidden = key_valid.logical_and(&allowed).logical_not();
        let bias =
            Tensor::zeros([1], (kind, key_valid.device())).masked_fill(&hidden, f64::NEG_INFINITY);
        Masking {
            mask: Some(bias.unsqueeze(1).unsqueeze(1)),
            causal: false,
            local: None,
        }
    }

    /// With `local`, the masking of the sliding-window layers.
    pub fn with_local(self, local: Masking) -> Self {
        Masking {
            local: Some(Box::new(local)),
            ..self
        }
    }

    /// The masking of a layer: the local one for a sliding-window layer when there is one.
    pub fn for_layer(&self, sliding: bool) -> &Masking {
        match &self.local {
            Some(local) if sliding => local,
            _ => self,
        }
    }

    /// Whether a `[B, S]` 0/1 mask has a 0 (one host sync).
    pub fn has_padding(key_mask: &Tensor) -> bool {
        key_mask.min().int64_value(&[]) != 1
    }

    /// `scaled_dot_product_attention` over `[B, H, T, D]` queries and `[B, H_kv, S, D]`
    /// keys/values; grouped-query attention when `H_kv < H`.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: Option<f64>) -> Tensor {
        let (b, h, t, d) = q.size4().unwrap();
        let h_kv = k.size()[1];
        if t == 1 && h_kv != h {
            // One query per head (decoding): the heads sharing a key/value head become that
            // head's queries, so no kernel repeats the cache for each query head and the
            // fused kernels that take a mask but not grouped heads apply.
            let grouped = q.reshape([b, h_kv, h / h_kv, d]);
            let out = Tensor::scaled_dot_product_attention(
                &grouped,
                k,
                v,
                self.mask.as_ref(),
                0.0,
                false,
                scale,
                false,
            );
            return out.reshape([b, h, 1, d]);
        }
        let gqa = h_kv != h;
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

impl Masking {
    /// Attention written out, for what `scaled_dot_product_attention` cannot apply: Gemma
    /// 2's soft-capped logits (`cap · tanh(s / cap)` before the mask), and gpt-oss's sinks
    /// (one learned logit per head `[H]` joining each query's softmax, with no value: the
    /// keys' weights sum to less than one). Scores in the activations' dtype as
    /// `transformers`' eager attention, softmax in f32.
    pub fn attend_written_out(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        softcap: Option<f64>,
        sinks: Option<&Tensor>,
    ) -> Tensor {
        let (b, h, t) = (q.size()[0], q.size()[1], q.size()[2]);
        let (h_kv, s) = (k.size()[1], k.size()[2]);
        let repeat = |x: &Tensor| {
            if h_kv == h {
                x.shallow_clone()
            } else {
                x.repeat_interleave_self_int(h / h_kv, 1, None)
            }
        };
        let (k, v) = (repeat(k), repeat(v));
        let mut scores = q.matmul(&k.transpose(2, 3)) * scale;
        if let Some(cap) = softcap {
            scores = (scores / cap).tanh() * cap;
        }
        let scores = match (&self.mask, self.causal) {
            (Some(m), _) if m.kind() == Kind::Bool => {
                scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY)
            }
            (Some(bias), _) => scores + bias,
            (None, true) => {
                let (allowed, _) = causal_window(t, s, None, q.device());
                scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
            }
            (None, false) => scores,
        };
        let probs = match sinks {
            Some(sinks) => {
                let sink = sinks
                    .to_kind(scores.kind())
                    .view([1, h, 1, 1])
                    .expand([b, h, t, 1], false);
                Tensor::cat(&[scores, sink], -1)
                    .softmax(-1, Kind::Float)
                    .narrow(-1, 0, s)
            }
            None => scores.softmax(-1, Kind::Float),
        };
        probs.to_kind(q.kind()).matmul(&v)
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
    fn packed_rows_restart_positions_and_never_see_each_other() {
        let segments = Tensor::from_slice(&[1i64, 1, 2, 2, 2, 0]).view([1, 6]);
        let pos = positions_from_segments(&segments);
        assert_eq!(
            Vec::<i64>::try_from(pos.view([-1])).unwrap(),
            [0, 1, 0, 1, 2, 0]
        );
        let m = Masking::packed(&segments, None).mask.unwrap();
        let rows: Vec<Vec<bool>> = (0..6)
            .map(|q| Vec::<bool>::try_from(m.get(0).get(0).get(q)).unwrap())
            .collect();
        let (t, f) = (true, false);
        assert_eq!(rows[1], [t, t, f, f, f, f]);
        assert_eq!(rows[2], [f, f, t, f, f, f]);
        assert_eq!(rows[4], [f, f, t, t, t, f]);
        assert_eq!(rows[5], [f, f, f, f, f, t]); // padding sees itself only
        let windowed = Masking::packed(&segments, Some(2)).mask.unwrap();
        let last = Vec::<bool>::try_from(windowed.get(0).get(0).get(4)).unwrap();
        assert_eq!(last, [f, f, f, t, t, f]);
    }

    #[test]
    fn mask_is_causal_and_hides_padding() {
        let key_mask = Tensor::from_slice(&[0i64, 1, 1]).view([1, 3]);
        let m = Masking::new(&key_mask, 3, None, None).mask.unwrap();
        let got = Vec::<bool>::try_from(m.view([-1])).unwrap();
        // row 0 (a pad query) sees only itself; rows 1, 2 skip the pad key.
        assert_eq!(
            got,
            [true, false, false, false, true, false, false, true, true]
        );
        let full = Tensor::ones([2, 5], (Kind::Int64, tch::Device::Cpu));
        assert!(Masking::new(&full, 5, None, None).causal);
        let windowed = Masking::new(&full, 5, Some(2), None).mask.unwrap();
        let last_row = Vec::<bool>::try_from(windowed.get(0).get(0).get(4)).unwrap();
        assert_eq!(last_row, [false, false, false, true, true]);
    }
}
