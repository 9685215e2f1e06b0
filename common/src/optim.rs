//! AdamW with state we can save and restore exactly (tch's optimiser hides its moments),
//! f32 master weights for half-precision models, no weight decay on biases, norm weights
//! and embeddings, and global-norm gradient clipping that reports the pre-clip norm.
//!
//! The update is `torch.optim.AdamW`'s (non-fused, non-amsgrad) step, term for term.
//! With `eight_bit` (`--optim adamw_8bit`) it is bitsandbytes' `AdamW8bit`: the moments of
//! each parameter of at least [`MIN_8BIT_SIZE`] elements are held as 8-bit codes of
//! bitsandbytes' dynamic maps (signed for the first, unsigned for the second) in blocks of
//! 256 of that parameter with an f32 absmax each, dequantized, updated and quantized again
//! in every step. In a data-parallel run it sums the gradients over the ranks, and with ZeRO stage 1
//! ([`ZeroStage`]) each rank keeps and updates only its shard of the state.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::models::quant;
use crate::overlap::{self, Member, Overlap};
use crate::world::World;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// LoRA+ (Hayou et al. 2024; PEFT's `create_loraplus_optimizer`): LoRA's B matrices
    /// (and DoRA's magnitudes, PEFT's one-dimensional adapter tensors) learn at lr × this.
    #[serde(default)]
    pub loraplus_lr_ratio: Option<f64>,
    /// bitsandbytes' 8-bit moments (`--optim adamw_8bit`).
    #[serde(default)]
    pub eight_bit: bool,
}

/// `--optim`: Hugging Face's `TrainingArguments.optim` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
pub enum OptimName {
    /// `torch.optim.AdamW`.
    #[default]
    #[value(name = "adamw_torch")]
    AdamwTorch,
    /// bitsandbytes' `AdamW8bit` (`adamw_bnb_8bit`).
    #[value(name = "adamw_8bit", alias = "adamw_bnb_8bit")]
    Adamw8bit,
}

/// bitsandbytes' `min_8bit_size`: smaller parameters keep f32 moments.
pub const MIN_8BIT_SIZE: i64 = 4096;
/// bitsandbytes' block size for 8-bit optimizer states.
const STATE_BLOCK: i64 = 256;

impl AdamWConfig {
    /// The multiple of the learning rate that the parameter `name` learns at.
    pub fn lr_scale(&self, name: &str) -> f64 {
        match self.loraplus_lr_ratio {
            Some(ratio) if loraplus_fast(name) => ratio,
            _ => 1.0,
        }
    }
}

/// The adapter tensors LoRA+ gives the larger learning rate: PEFT's group B (`lora_B`
/// and one-dimensional adapter tensors).
pub fn loraplus_fast(name: &str) -> bool {
    name.contains(".lora_B.") || name.ends_with(crate::models::lora::MAGNITUDE)
}

/// Whether a parameter is exempt from weight decay: biases, norm weights and embeddings.
pub fn no_decay(name: &str) -> bool {
    name.ends_with(".bias")
        || name.contains("norm")
        || name.contains(".ln_")
        || name.contains("embed_tokens")
        || name.contains(".wte.")
        || name.contains(".wpe.")
}

/// Where a parameter lies in its group's flat buffers.
#[derive(Debug, Clone)]
struct Slot {
    group: usize,
    offset: i64,
    shape: Vec<i64>,
    /// Its first block in an 8-bit group's absmax buffers.
    block: i64,
}

impl Slot {
    fn numel(&self) -> i64 {
        self.shape.iter().product()
    }
}

/// Parameters of one weight-decay class and dtype, stored back to back: every parameter
/// and its gradient are views of `params` and `grads`, so a step is a few whole-buffer
/// operations instead of a dozen per parameter (and the gradient norm one reduction).
/// The optimiser state covers this rank's range of the buffers: all of it, or its ZeRO-1
/// shard.
#[derive(Debug)]
struct Group {
    decay: bool,
    /// Its learning rate as a multiple of the schedule's (LoRA+).
    lr_scale: f64,
    params: Tensor,
    grads: Tensor,
    /// This rank's range `(start, len)` of `params`/`grads`: the elements it updates.
    owned: (i64, i64),
    /// f32 master copy of the owned range when the parameters are half precision.
    master: Option<Tensor>,
    /// f32, or u8 codes in an 8-bit group.
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    eight_bit: Option<EightBit>,
}

/// An 8-bit group's block scales and maps, and where each member's blocks start.
#[derive(Debug)]
struct EightBit {
    absmax1: Tensor,
    absmax2: Tensor,
    /// (offset, numel, first block) of each member.
    members: Vec<(i64, i64, i64)>,
    map1: Tensor,
    map2: Tensor,
    /// The maps' midpoints (both are sorted): quantizing is one `bucketize`.
    bounds1: Tensor,
    bounds2: Tensor,
}

impl Group {
    fn total(&self) -> i64 {
        self.params.size()[0]
    }

    /// The owned range of a whole-length buffer.
    fn owned_part(&self, t: &Tensor) -> Tensor {
        t.narrow(0, self.owned.0, self.owned.1)
    }

    /// The state buffers, by the name prefix a checkpoint stores them under.
    fn state(&self) -> Vec<(&'static str, &Tensor)> {
        let mut out = vec![("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)];
        if let Some(e) = &self.eight_bit {
            out.push((ABSMAX1, &e.absmax1));
            out.push((ABSMAX2, &e.absmax2));
        }
        if let Some(m) = &self.master {
            out.push(("master", m));
        }
        out
    }
}

/// The checkpoint names of an 8-bit group's block scales (one per block of a parameter).
const ABSMAX1: &str = "exp_avg_absmax";
const ABSMAX2: &str = "exp_avg_sq_absmax";

/// Elements per update chunk: bounds the step's temporaries (about 3 × 4 bytes each).
const CHUNK: i64 = 1 << 26;

/// How the optimiser state is spread over data-parallel ranks (DeepSpeed's ZeRO stages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ZeroStage {
    /// Every rank holds all of it and updates every parameter.
    #[default]
    Off,
    /// Stage 1: each rank holds the master weights and moments of its shard of every flat
    /// buffer, receives only its shard of the summed gradients (reduce-scatter), updates
    /// that shard, and sends it to the others (all-gather).
    Optimizer,
}

/// How a data-parallel run exchanges its gradients (and shards the optimiser state).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct GradExchange {
    pub zero: ZeroStage,
    /// `--overlap-grad-reduce`: the exchange runs during the step's last backward, in
    /// buckets of at most this many bytes ([`crate::overlap`]).
    pub overlap_bucket_bytes: Option<usize>,
}

#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    groups: Vec<Group>,
    slots: BTreeMap<String, Slot>,
    /// The ranks the gradients are summed over (and, under ZeRO-1, the state sharded).
    world: World,
    zero: ZeroStage,
    /// The bucketed exchange overlapped with the last backward, when asked for in a run of
    /// several processes.
    pub(crate) overlap: Option<Overlap>,
    /// Optimiser steps taken.
    pub step: i64,
}

/// The optimiser's state as a checkpoint holds it: every parameter's moments (and master
/// weights) by name, whole, whatever the sharding.
#[derive(Debug)]
pub struct OptimizerState {
    step: i64,
    config: AdamWConfig,
    tensors: BTreeMap<String, Tensor>,
}

impl OptimizerState {
    /// Every parameter's state tensors, by checkpoint name (`exp_avg.<parameter>`, …).
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    /// Writes the moments (and master weights) to `dir/optimizer.safetensors` and the
    /// step and hyperparameters to `dir/optimizer.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        checkpoint::save_file(&self.tensors, &dir.join("optimizer.safetensors"))?;
        let meta = serde_json::json!({"step": self.step, "config": self.config});
        checkpoint::write_atomic(&dir.join("optimizer.json"), meta.to_string().as_bytes())
    }
}

impl AdamW {
    /// Over the trainable variables `vars` (name → variable), in one process.
    pub fn new(vars: HashMap<String, Tensor>, config: AdamWConfig) -> Self {
        Self::distributed(vars, config, &World::single(), GradExchange::default())
    }

    /// Over the trainable variables `vars` (name → variable), their gradients summed over
    /// `world`'s ranks as `exchange` says. The variables (and their gradients) are moved
    /// into the optimiser's flat buffers, values kept, in the order a backward pass
    /// completes them ([`overlap::layout_key`]); gradients start at zero, and a parameter
    /// that gets no gradient in a step is updated with a zero one.
    pub fn distributed(
        vars: HashMap<String, Tensor>,
        config: AdamWConfig,
        world: &World,
        exchange: GradExchange,
    ) -> Self {
        let zero = exchange.zero;
        let trainable: BTreeMap<String, Tensor> = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        // Every gradient defined (zero), so that it can be re-seated in the flat buffer;
        // backward then accumulates into it in place.
        if !trainable.is_empty() {
            tch::with_grad(|| {
                trainable
                    .values()
                    .map(|p| p.sum(Kind::Float) * 0.0)
                    .reduce(|a, b| a + b)
                    .unwrap()
                    .backward()
            });
        }
        let _guard = tch::no_grad_guard();
        // (decay, lr scale's bits, dtype, device, 8-bit moments) → members
        type Class = (bool, u64, String, String, bool);
        let mut classes: BTreeMap<Class, Vec<(&String, &Tensor)>> = BTreeMap::new();
        for (name, p) in &trainable {
            let key = (
                !no_decay(name),
                config.lr_scale(name).to_bits(),
                format!("{:?}", p.kind()),
                format!("{:?}", p.device()),
                config.eight_bit && p.numel() as i64 >= MIN_8BIT_SIZE,
            );
            classes.entry(key).or_default().push((name, p));
        }
        let mut groups = vec![];
        let mut slots = BTreeMap::new();
        let mut members_in_order = vec![];
        for ((decay, lr_scale, _, _, eight_bit), mut members) in classes {
            members.sort_by_key(|(name, _)| overlap::layout_key(name));
            let (kind, device) = (members[0].1.kind(), members[0].1.device());
            let total: i64 = members.iter().map(|(_, p)| p.numel() as i64).sum();
            let flat = Tensor::empty([total], (kind, device));
            let grads = Tensor::zeros([total], (kind, device));
            let mut offset = 0;
            let mut block = 0;
            let mut blocks = vec![];
            for (name, p) in &members {
                let n = p.numel() as i64;
                let view = |t: &Tensor| t.narrow(0, offset, n).view(p.size().as_slice());
                let pv = view(&flat);
                pv.shallow_clone().copy_(p);
                let _ = p.shallow_clone().set_source_tensor_(&pv);
                let _ = p.grad().set_source_tensor_(&view(&grads));
                let slot = Slot {
                    group: groups.len(),
                    offset,
                    shape: p.size(),
                    block,
                };
                blocks.push((offset, n, block));
                block += (n + STATE_BLOCK - 1) / STATE_BLOCK;
                slots.insert((*name).clone(), slot);
                members_in_order.push(Member {
                    name: name.as_str(),
                    group: groups.len(),
                    offset,
                    numel: n,
                    tensor: p,
                });
                offset += n;
            }
            let owned = match zero {
                ZeroStage::Off => (0, total),
                ZeroStage::Optimizer => world.shard_of(total),
            };
            let state_kind = if eight_bit { Kind::Uint8 } else { Kind::Float };
            let moments = || Tensor::zeros([owned.1], (state_kind, device));
            let master = (kind != Kind::Float)
                .then(|| flat.narrow(0, owned.0, owned.1).to_kind(Kind::Float));
            let eight_bit = eight_bit.then(|| {
                let (map1, map2) = (
                    quant::dynamic_map(true, device),
                    quant::dynamic_map(false, device),
                );
                EightBit {
                    absmax1: Tensor::zeros([block], (Kind::Float, device)),
                    absmax2: Tensor::zeros([block], (Kind::Float, device)),
                    members: blocks,
                    bounds1: quant::midpoints(&map1),
                    bounds2: quant::midpoints(&map2),
                    map1,
                    map2,
                }
            });
            groups.push(Group {
                decay,
                lr_scale: f64::from_bits(lr_scale),
                params: flat,
                grads,
                owned,
                master,
                exp_avg: moments(),
                exp_avg_sq: moments(),
                eight_bit,
            });
        }
        let overlap = exchange
            .overlap_bucket_bytes
            .filter(|_| world.is_distributed())
            .map(|cap| {
                let grads: Vec<Tensor> = groups.iter().map(|g| g.grads.shallow_clone()).collect();
                let overlap = Overlap::new(&members_in_order, &grads, cap, world, zero);
                tracing::info!(
                    "--overlap-grad-reduce: the gradients go in {} buckets of up to {:.1} MB during the last backward",
                    overlap.bucket_count(),
                    cap as f64 / 1e6
                );
                overlap
            });
        let optimizer = AdamW {
            config,
            groups,
            slots,
            world: world.clone(),
            zero,
            overlap,
            step: 0,
        };
        if zero == ZeroStage::Optimizer {
            let (held, whole) = optimizer.state_bytes();
            tracing::info!(
                "--zero-stage 1: this rank holds {:.1} MB of optimizer state instead of {:.1} MB ({:.1} MB saved, {} ranks)",
                held as f64 / 1e6,
                whole as f64 / 1e6,
                (whole - held) as f64 / 1e6,
                world.size()
            );
        }
        optimizer
    }

    /// Bytes of optimiser state (moments and master weights) this rank holds, and what
    /// one rank would hold without sharding.
    pub fn state_bytes(&self) -> (i64, i64) {
        self.groups.iter().fold((0, 0), |(held, whole), g| {
            let bytes: i64 = g
                .state()
                .iter()
                .map(|(_, t)| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
                .sum();
            // Sharded (ZeRO-1, f32 state only): the shard's share of the whole.
            (held + bytes, whole + bytes * g.total() / g.owned.1.max(1))
        })
    }

    /// The names of the parameters it trains (those that require a gradient).
    pub fn parameter_names(&self) -> Vec<String> {
        self.slots.keys().cloned().collect()
    }

    pub fn zero_grad(&self) {
        for g in &self.groups {
            let _ = g.grads.shallow_clone().zero_();
        }
    }

    /// Sums the gradients over the ranks (after a step's backward passes): every flat
    /// buffer whole, or under ZeRO-1 only this rank's shard of it (the rest is not read).
    pub fn reduce_gradients(&self) {
        if let Some(overlap) = &self.overlap {
            return overlap.reduce();
        }
        for g in &self.groups {
            match self.zero {
                ZeroStage::Off => self.world.sum_(&g.grads),
                ZeroStage::Optimizer => self.world.reduce_scatter_(&g.grads),
            }
        }
    }

    /// Runs `backward`, the last backward pass before the step: with the overlapped
    /// exchange, the gradients are summed over the ranks while it runs (and
    /// [`AdamW::reduce_gradients`] then has nothing left to do).
    pub fn last_backward(&self, backward: impl FnOnce()) {
        match &self.overlap {
            Some(overlap) => overlap.during(backward),
            None => backward(),
        }
    }

    /// Global L2 norm of all gradients (over every rank's shard under ZeRO-1), read from
    /// the device once.
    pub fn grad_norm(&self) -> f64 {
        let _guard = tch::no_grad_guard();
        let squares: Vec<Tensor> = self
            .groups
            .iter()
            .map(|g| {
                g.owned_part(&g.grads)
                    .to_kind(Kind::Float)
                    .square()
                    .sum(Kind::Float)
            })
            .collect();
        let local = match squares.is_empty() {
            true => 0.0,
            false => Tensor::stack(&squares, 0)
                .sum(Kind::Double)
                .double_value(&[]),
        };
        match self.zero {
            ZeroStage::Off => local,
            ZeroStage::Optimizer => self.world.sum(local),
        }
        .sqrt()
    }

    /// Scales the gradients so their global norm is at most `max_norm` (when > 0), as
    /// `torch.nn.utils.clip_grad_norm_` does. Returns the norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm.is_finite() {
            let coef = max_norm / (norm + 1e-6);
            if coef < 1.0 {
                let _guard = tch::no_grad_guard();
                for g in &self.groups {
                    let _ = g.owned_part(&g.grads).g_mul_scalar_(coef);
                }
            }
        }
        norm
    }

    /// One AdamW step at learning rate `lr` using the current gradients, on the owned
    /// range of every buffer; under ZeRO-1 the updated shards then go to every rank.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - c.beta2.powi(self.step as i32);
        for g in &self.groups {
            let lr = lr * g.lr_scale;
            if let Some(e) = &g.eight_bit {
                self.step_eight_bit(g, e, lr, (bias_correction1, bias_correction2));
                continue;
            }
            let step_size = lr / bias_correction1;
            let (params, grads) = (g.owned_part(&g.params), g.owned_part(&g.grads));
            let total = g.owned.1;
            let mut start = 0;
            while start < total {
                let n = CHUNK.min(total - start);
                let part = |t: &Tensor| t.narrow(0, start, n);
                let grad = part(&grads).to_kind(Kind::Float);
                let mut p = part(g.master.as_ref().unwrap_or(&params));
                let mut exp_avg = part(&g.exp_avg);
                let mut exp_avg_sq = part(&g.exp_avg_sq);
                if g.decay && c.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = exp_avg.lerp_(&grad, 1.0 - c.beta1);
                let _ = exp_avg_sq
                    .g_mul_scalar_(c.beta2)
                    .addcmul_(&grad, &(&grad * (1.0 - c.beta2)));
                let denom = (exp_avg_sq.sqrt() / bias_correction2.sqrt()) + c.eps;
                let _ = p.addcdiv_(&(&exp_avg * -step_size), &denom);
                if g.master.is_some() {
                    part(&params).copy_(&p);
                }
                start += n;
            }
            if self.zero == ZeroStage::Optimizer {
                self.world.all_gather_shards_(&g.params);
            }
        }
    }

    /// bitsandbytes' 8-bit blockwise AdamW step (`optimizer_update_8bit_blockwise`'s
    /// fallback, term for term) on each member of an 8-bit group: its moments dequantized
    /// (code × its block's absmax), updated in f32, its weight moved, the moments quantized
    /// again per block of 256 of the member.
    fn step_eight_bit(&self, g: &Group, e: &EightBit, lr: f64, (bc1, bc2): (f64, f64)) {
        let c = self.config;
        let codes = |map: &Tensor, t: &Tensor| map.index_select(0, &t.to_kind(Kind::Int));
        for &(offset, n, first) in &e.members {
            let blocks = (n + STATE_BLOCK - 1) / STATE_BLOCK;
            let part = |t: &Tensor| t.narrow(0, offset, n);
            let (a1, a2) = (
                e.absmax1.narrow(0, first, blocks),
                e.absmax2.narrow(0, first, blocks),
            );
            let (m8, v8) = (part(&g.exp_avg), part(&g.exp_avg_sq));
            let m = quant::blockwise(&codes(&e.map1, &m8), &a1, STATE_BLOCK);
            let v = quant::blockwise(&codes(&e.map2, &v8), &a2, STATE_BLOCK);
            let grad = part(&g.grads).to_kind(Kind::Float);
            let mut p = part(g.master.as_ref().unwrap_or(&g.params));
            let m = m * c.beta1 + &grad * (1.0 - c.beta1);
            let v = v * c.beta2 + (&grad * &grad) * (1.0 - c.beta2);
            let denom = v.sqrt() / bc2.sqrt() + c.eps;
            if g.decay && c.weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = p.addcdiv_(&(&m * (-lr / bc1)), &denom);
            if g.master.is_some() {
                part(&g.params).copy_(&p);
            }
            for (moment, bounds, codes, absmax) in
                [(&m, &e.bounds1, &m8, &a1), (&v, &e.bounds2, &v8, &a2)]
            {
                let (scaled, scale) = quant::scale_blocks(moment, STATE_BLOCK);
                let nearest = scaled.bucketize(bounds, false, false);
                codes.shallow_clone().copy_(&nearest.to_kind(Kind::Uint8));
                absmax.shallow_clone().copy_(&scale);
            }
        }
    }

    /// Each parameter's views of whole-length state buffers (`whole[group][i]` matching
    /// `Group::state`), named as a checkpoint stores them.
    fn named(&self, whole: &[Vec<(&'static str, Tensor)>]) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (name, slot) in &self.slots {
            for (prefix, buffer) in &whole[slot.group] {
                let view = match *prefix {
                    ABSMAX1 | ABSMAX2 => buffer.narrow(
                        0,
                        slot.block,
                        (slot.numel() + STATE_BLOCK - 1) / STATE_BLOCK,
                    ),
                    _ => buffer
                        .narrow(0, slot.offset, slot.numel())
                        .view(slot.shape.as_slice()),
                };
                out.insert(format!("{prefix}.{name}"), view);
            }
        }
        out
    }

    /// The state a checkpoint holds, whole: on the main rank (gathered from every rank's
    /// shard under ZeRO-1), `None` on the others. Every rank must call it.
    pub fn state(&self) -> Option<OptimizerState> {
        let mut whole = vec![];
        for g in &self.groups {
            let mut buffers = vec![];
            for (prefix, t) in g.state() {
                let t = match self.zero {
                    ZeroStage::Off => Some(t.shallow_clone()),
                    ZeroStage::Optimizer => self.world.gather_shards(t, g.total()),
                };
                buffers.push(t.map(|t| (prefix, t)));
            }
            whole.push(buffers.into_iter().collect::<Option<Vec<_>>>());
        }
        let whole = match self.world.is_main() {
            true => whole.into_iter().collect::<Option<Vec<_>>>()?,
            false => return None,
        };
        Some(OptimizerState {
            step: self.step,
            config: self.config,
            tensors: self.named(&whole),
        })
    }

    /// Restores what [`OptimizerState::save`] wrote (every parameter's state must be
    /// there), keeping this rank's shard of it under ZeRO-1.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let meta_path = dir.join("optimizer.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: meta_path.clone(),
                source,
            })?;
        self.step = meta["step"]
            .as_i64()
            .ok_or_else(|| Error::checkpoint(&meta_path, "field 'step' is missing"))?;
        let stored_8bit = meta["config"]["eight_bit"].as_bool().unwrap_or(false);
        if stored_8bit != self.config.eight_bit {
            let name = |b: bool| if b { "adamw_8bit" } else { "adamw_torch" };
            return Err(Error::checkpoint(
                &meta_path,
                format!(
                    "the optimizer state is {}'s; this run's --optim is {}: resume with the same --optim",
                    name(stored_8bit),
                    name(self.config.eight_bit)
                ),
            ));
        }
        // Whole-length buffers: the state itself when this rank holds all of it, otherwise
        // CPU buffers whose owned range is then copied in.
        let whole: Vec<Vec<(&'static str, Tensor)>> = self
            .groups
            .iter()
            .map(|g| {
                g.state()
                    .into_iter()
                    .map(|(prefix, t)| {
                        let buffer = match g.owned.1 == g.total() {
                            true => t.shallow_clone(),
                            false => Tensor::zeros([g.total()], (Kind::Float, tch::Device::Cpu)),
                        };
                        (prefix, buffer)
                    })
                    .collect()
            })
            .collect();
        let vars: HashMap<String, Tensor> = self.named(&whole).into_iter().collect();
        checkpoint::load_file(&vars, &dir.join("optimizer.safetensors"))?;
        let _guard = tch::no_grad_guard();
        for (g, buffers) in self.groups.iter().zip(&whole) {
            if g.owned.1 != g.total() {
                for ((_, own), (_, buffer)) in g.state().into_iter().zip(buffers) {
                    own.shallow_clone().copy_(&g.owned_part(buffer));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, OptimizerConfig};
    use tch::Device;

    const FLOAT_CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

    fn config(wd: f64) -> AdamWConfig {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-5,
            weight_decay: wd,
            loraplus_lr_ratio: None,
            eight_bit: false,
        }
    }

    /// Same trajectory as libtorch's own AdamW over several steps.
    #[test]
    fn matches_libtorch_adamw() {
        tch::manual_seed(0);
        let init = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        let ours_vs = nn::VarStore::new(Device::Cpu);
        let w = (ours_vs.root() / "layer").var_copy("weight", &init);
        // A second parameter of the same group: its slice of the flat buffer must not
        // disturb the first one's.
        let init_u = Tensor::randn([5], (Kind::Float, Device::Cpu));
        let u = (ours_vs.root() / "other").var_copy("weight", &init_u);
        let theirs_vs = nn::VarStore::new(Device::Cpu);
        let w2 = (theirs_vs.root() / "layer").var_copy("weight", &init);
        let u2 = (theirs_vs.root() / "other").var_copy("weight", &init_u);
        let mut ours = AdamW::new(ours_vs.variables(), config(0.1));
        let mut theirs = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.1,
            eps: 1e-5,
            amsgrad: false,
        }
        .build(&theirs_vs, 1e-2)
        .unwrap();
        let target = Tensor::randn([4, 3], (Kind::Float, Device::Cpu));
        for _ in 0..5 {
            ours.zero_grad();
            ((&w - &target).square().sum(Kind::Float) + (&u * 3.0).sin().sum(Kind::Float))
                .backward();
            ours.step(1e-2);
            theirs.zero_grad();
            ((&w2 - &target).square().sum(Kind::Float) + (&u2 * 3.0).sin().sum(Kind::Float))
                .backward();
            theirs.step();
        }
        for (a, b) in [(&w, &w2), (&u, &u2)] {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "AdamW differs from libtorch's by {diff}");
        }
        assert!(
            (&w - &init).abs().max().double_value(&[]) > 1e-3,
            "w did not move"
        );
    }

    /// LoRA+: B and DoRA's magnitude follow the trajectory plain AdamW takes at lr × ratio
    /// (weight decay included), A the one at lr.
    #[test]
    fn loraplus_scales_the_learning_rate_of_b_and_magnitudes() {
        // Constant starts: the global generator is shared with the tests running beside.
        let run = |ratio: Option<f64>, lr: f64| {
            let vs = nn::VarStore::new(Device::Cpu);
            let p = vs.root() / "q_proj";
            let a = (&p / "lora_A").var("weight", &[2, 3], nn::Init::Const(0.7));
            let b = (&p / "lora_B").var("weight", &[3, 2], nn::Init::Const(-0.4));
            let m = p.var("lora_magnitude_vector", &[3], nn::Init::Const(1.5));
            let mut opt = AdamW::new(
                vs.variables(),
                AdamWConfig {
                    loraplus_lr_ratio: ratio,
                    ..config(0.1)
                },
            );
            for _ in 0..4 {
                opt.zero_grad();
                ((&a * 2.0).sin().sum(Kind::Float)
                    + (&b - 0.3).square().sum(Kind::Float)
                    + m.exp().sum(Kind::Float))
                .backward();
                opt.step(lr);
            }
            [a, b, m]
        };
        let plus = run(Some(4.0), 1e-2);
        let slow = run(None, 1e-2);
        let fast = run(None, 4e-2);
        let diff = |x: &Tensor, y: &Tensor| (x - y).abs().max().double_value(&[]);
        assert!(diff(&plus[0], &slow[0]) < 1e-7, "A");
        assert!(diff(&plus[1], &fast[1]) < 1e-7, "B");
        assert!(diff(&plus[2], &fast[2]) < 1e-7, "magnitude");
        assert!(diff(&plus[1], &slow[1]) > 1e-2, "B moved as without LoRA+");
    }

    /// Half-precision parameters: updated through the f32 master, which they follow.
    #[test]
    fn bf16_parameters_follow_their_master() {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let init = Tensor::from_slice(&[1f32, -2.0, 0.5]);
        let w = vs.root().var_copy("w", &init);
        let b = (vs.root() / "b").var_copy("bias", &init);
        vs.bfloat16();
        assert_eq!(w.kind(), Kind::BFloat16);
        let mut opt = AdamW::new(vs.variables(), config(0.1));
        for _ in 0..3 {
            opt.zero_grad();
            ((&w * &w).sum(Kind::Float) + b.sum(Kind::Float)).backward();
            opt.step(0.1);
        }
        let state = opt.state().unwrap();
        for (name, t) in [("w", &w), ("b.bias", &b)] {
            let master = &state.tensors[&format!("master.{name}")];
            assert!(t.equal(&master.to_kind(Kind::BFloat16)), "{name}");
            assert!(
                (master - &init).abs().min().double_value(&[]) > 0.1,
                "{name} moved"
            );
        }
    }

    /// ZeRO-1 over two ranks (threads; buckets of 2 elements, smaller than a shard): bf16
    /// parameters in two weight-decay groups, each rank with its own gradients, end where
    /// the unsharded optimizer takes them, on both ranks, and the state gathered for a
    /// checkpoint is the unsharded one.
    #[test]
    fn zero1_over_two_ranks_equals_the_unsharded_optimizer() {
        let run = |zero: ZeroStage| {
            crate::world::in_threads(2, 8, move |world| {
                let mut vs = nn::VarStore::new(Device::Cpu);
                let init = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25, 1.5, -0.75, 3.0]);
                let w = vs.root().var_copy("w", &init);
                let b = (vs.root() / "b").var_copy("bias", &init.narrow(0, 0, 3));
                vs.bfloat16();
                let exchange = GradExchange {
                    zero,
                    overlap_bucket_bytes: None,
                };
                let mut opt = AdamW::distributed(vs.variables(), config(0.1), &world, exchange);
                let k = world.rank() as f64 + 1.0;
                for _ in 0..3 {
                    ((&w * &w).sum(Kind::Float) * k + (&b * k).sin().sum(Kind::Float)).backward();
                    opt.reduce_gradients();
                    opt.clip_grad_norm(1.0);
                    opt.step(0.1);
                    opt.zero_grad();
                }
                let moved = (&w.to_kind(Kind::Float) - &init)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(moved > 0.1, "w did not move");
                let params = Tensor::cat(&[w.to_kind(Kind::Float), b.to_kind(Kind::Float)], 0);
                (params, opt.state().map(|s| s.tensors), opt.state_bytes())
            })
        };
        let (whole, sharded) = (run(ZeroStage::Off), run(ZeroStage::Optimizer));
        for ((p0, _, _), (p1, _, bytes)) in whole.iter().zip(&sharded) {
            assert!(
                p1.equal(&sharded[0].0),
                "the ranks hold different parameters"
            );
            let diff = (p0 - p1).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "ZeRO-1 parameters differ by {diff:e}");
            // bf16: moments and master, 12 bytes per element; 10 elements, 2 groups.
            assert_eq!(bytes.1, 120);
            assert!(bytes.0 < bytes.1, "nothing sharded: {bytes:?}");
        }
        let (a, b) = (whole[0].1.as_ref().unwrap(), sharded[0].1.as_ref().unwrap());
        assert!(
            sharded[1].1.is_none(),
            "only the main rank holds the whole state"
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        assert!(a.contains_key("master.w") && a.contains_key("exp_avg_sq.b.bias"));
        for (key, t) in a {
            let diff = (t - &b[key]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{key}: gathered state differs by {diff:e}");
        }
    }

    #[test]
    fn no_decay_groups() {
        assert!(no_decay("model.layers.0.input_layernorm.weight"));
        assert!(no_decay("transformer.h.0.ln_1.weight"));
        assert!(no_decay("transformer.h.0.attn.c_attn.bias"));
        assert!(no_decay("model.embed_tokens.weight"));
        assert!(no_decay("transformer.wte.weight"));
        assert!(!no_decay("model.layers.0.self_attn.q_proj.weight"));
        assert!(!no_decay("lm_head.weight"));
    }

    #[test]
    fn clipping_reports_the_pre_clip_norm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[3f32, 4.0]));
        let opt = AdamW::new(vs.variables(), config(0.0));
        (&w * &w).sum(Kind::Float).backward(); // grad = [6, 8], norm 10
        assert!((opt.clip_grad_norm(1.0) - 10.0).abs() < 1e-5);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1f32, -1.0]));
        let mut opt = AdamW::new(vs.variables(), config(0.0));
        (&w * 3.0).sum(Kind::Float).backward();
        opt.step(0.1);
        opt.state().unwrap().save(dir.path()).unwrap();
        let mut fresh = AdamW::new(vs.variables(), config(0.0));
        fresh.load(dir.path()).unwrap();
        assert_eq!(fresh.step, 1);
        let (a, b) = (opt.state().unwrap(), fresh.state().unwrap());
        for key in ["exp_avg.w", "exp_avg_sq.w"] {
            assert!(a.tensors[key].equal(&b.tensors[key]), "{key}");
        }
    }

    /// 8-bit moments: a quarter of the f32 state (plus a scale per 256), saved and
    /// restored exactly (a resumed step equals the uninterrupted one), and a checkpoint of
    /// the other kind refused by name.
    #[test]
    fn eight_bit_state_is_small_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        tch::manual_seed(1);
        let eight = AdamWConfig {
            eight_bit: true,
            ..config(0.1)
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let w = (vs.root() / "l").var_copy("weight", &Tensor::randn([64, 80], FLOAT_CPU));
        let b = (vs.root() / "l").var_copy("bias", &Tensor::randn([10], FLOAT_CPU));
        let grads: Vec<(Tensor, Tensor)> = (0..4)
            .map(|_| {
                (
                    Tensor::randn([64, 80], FLOAT_CPU),
                    Tensor::randn([10], FLOAT_CPU),
                )
            })
            .collect();
        let step = |opt: &mut AdamW, (gw, gb): &(Tensor, Tensor)| {
            let _guard = tch::no_grad_guard();
            w.grad().copy_(gw);
            b.grad().copy_(gb);
            opt.step(1e-2);
        };
        let mut opt = AdamW::new(vs.variables(), eight);
        let (held, _) = opt.state_bytes();
        // 5120 codes of each moment and 20 scales each; the bias's f32 moments.
        assert_eq!(held, 2 * (5120 + 20 * 4) + 2 * 4 * 10);
        for g in &grads[..3] {
            step(&mut opt, g);
        }
        opt.state().unwrap().save(dir.path()).unwrap();
        let saved = (w.detach().copy(), b.detach().copy());
        step(&mut opt, &grads[3]);
        let straight = (w.detach().copy(), b.detach().copy());

        let vs2 = nn::VarStore::new(Device::Cpu);
        let w2 = (vs2.root() / "l").var_copy("weight", &saved.0);
        let b2 = (vs2.root() / "l").var_copy("bias", &saved.1);
        let mut resumed = AdamW::new(vs2.variables(), eight);
        resumed.load(dir.path()).unwrap();
        {
            let _guard = tch::no_grad_guard();
            w2.grad().copy_(&grads[3].0);
            b2.grad().copy_(&grads[3].1);
        }
        resumed.step(1e-2);
        assert!(w2.equal(&straight.0) && b2.equal(&straight.1));
        // The f32 moments would differ: the 8-bit ones are not f32 ones in disguise.
        let mut f32_opt = AdamW::new(vs2.variables(), config(0.1));
        let e = f32_opt.load(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("the optimizer state is adamw_8bit's; this run's --optim is adamw_torch"),
            "{e}"
        );
    }
}
