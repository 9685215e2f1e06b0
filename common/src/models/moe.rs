//! Sparse Mixture-of-Experts feed-forward blocks: Mixtral (Jiang et al. 2024), Qwen2-MoE,
//! Qwen3-MoE, OLMoE (Muennighoff et al. 2024) and gpt-oss (OpenAI 2025), which put them in
//! the Llama family's decoder layer in place of the MLP.
//!
//! Mirrors `transformers/models/mixtral/modeling_mixtral.py` (and `qwen2_moe`, `qwen3_moe`,
//! `olmoe`): a router (`gate`, a bias-free `[E, H]` weight) scores each token's experts;
//! the softmax (in f32) picks the top k, whose probabilities are renormalised to sum to one
//! (always in Mixtral, with `norm_topk_prob` in the others); each expert is a SwiGLU MLP
//! and a token's output is its experts' outputs weighted by those probabilities, plus, in
//! Qwen2-MoE, a shared expert (a SwiGLU MLP every token goes through) scaled by
//! σ(`shared_expert_gate`).
//!
//! Experts keep the checkpoints' per-expert names (`experts.{i}.gate_proj`, or Mixtral's
//! `w1`, `w3`, `w2`), as `transformers` saves them; gpt-oss's are stored fused
//! ([`FusedExperts`]), with a biased router whose softmax over the top k logits is the
//! renormalised top k of the others, and its checkpoints' MXFP4 experts are dequantized as
//! they are read ([`super::mxfp4`]). 4-bit loading never touches the router or the
//! experts, nor does module-targeted LoRA: transformers 5 holds the experts fused in 3-D
//! parameters, which bitsandbytes leaves unquantized and PEFT adapts only through
//! `target_parameters`, which here reaches gpt-oss's fused experts
//! ([`super::lora::ExpertsLora`]; the others' per-expert layers are not held in its
//! layout). Adapters go on the attention projections (and the dense layers' MLPs, and
//! Qwen2-MoE's shared expert, plain linear layers in transformers too), and the experts
//! train or stay frozen with the rest of the base.
//!
//! [`load_balancing_loss`] is the Switch Transformer auxiliary loss as `transformers`'
//! `load_balancing_loss_func` computes it, which the training stages add with
//! `--router-aux-loss-coef` (TRL's `router_aux_loss_coef`).

use tch::nn;
use tch::{Kind, Tensor};

use super::layers::{param, Linear};
use super::llama::SwiGlu;
use super::lora::{ExpertsLora, LoraConfig};
use super::options::ModelOptions;
use super::ModelType;

/// What a MoE layer needs from the config.
#[derive(Debug, Clone, Copy)]
pub struct MoeShape {
    pub hidden: i64,
    pub intermediate: i64,
    pub experts: i64,
    pub top_k: i64,
    /// Renormalise the top-k probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Mixtral's `router_jitter_noise`: in training forwards the block's input is scaled
    /// by uniform noise in [1 − j, 1 + j] before routing (experts see it too).
    pub jitter: f64,
    /// Qwen2-MoE's shared expert's width.
    pub shared_intermediate: Option<i64>,
    /// gpt-oss's experts (`α`, limit): see [`FusedExperts`].
    pub clamped_swiglu: Option<(f64, f64)>,
    pub std: f64,
}

/// One sparse MoE block (`mlp` in Qwen3-MoE and gpt-oss, `block_sparse_moe` in Mixtral).
#[derive(Debug)]
pub struct SparseMoe {
    /// The router's `[E, H]` weight (`gate.weight`; gpt-oss's `router.weight`, with a
    /// bias), never adapted or quantized.
    router: Tensor,
    router_bias: Option<Tensor>,
    experts: Experts,
    /// Qwen2-MoE's shared expert and its gate (`shared_expert`, `shared_expert_gate`).
    shared: Option<(SwiGlu, Linear)>,
    shape: MoeShape,
    /// Qwen3-MoE casts the routing weights to the activations' dtype before weighting the
    /// experts' outputs; Mixtral keeps them in f32 until the sum.
    weights_in_activation_kind: bool,
}

impl SparseMoe {
    pub fn new(p: nn::Path, model_type: ModelType, shape: MoeShape, opts: &ModelOptions) -> Self {
        let (h, i) = (shape.hidden, shape.intermediate);
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: shape.std,
        };
        let shared = shape.shared_intermediate.map(|s| {
            let names = ["gate_proj", "up_proj", "down_proj"];
            let path = &p / "shared_expert";
            let expert = SwiGlu::separate(&path, names, (h, s), (false, shape.std), opts);
            let gate = Linear::new(&p / "shared_expert_gate", (h, 1), false, shape.std, opts);
            (expert, gate)
        });
        // LoRA on the fused experts' parameters (PEFT's target_parameters).
        let adapters = (opts.lora.as_ref(), opts.trainable);
        // The base's own options, without adapters or quantization.
        let opts = &ModelOptions {
            trainable: opts.base_trains(),
            lora: None,
            prompt_tuning: None,
            quantization: None,
            ..opts.clone()
        };
        let fused = shape.clamped_swiglu.is_some();
        let router_path = &p / if fused { "router" } else { "gate" };
        let router = param(&router_path, "weight", &[shape.experts, h], init, opts);
        let router_bias = fused.then(|| param(&router_path, "bias", &[shape.experts], init, opts));
        let names = match model_type {
            ModelType::Mixtral => ["w1", "w3", "w2"],
            _ => ["gate_proj", "up_proj", "down_proj"],
        };
        let experts = match shape.clamped_swiglu {
            Some(swiglu) => Experts::Fused(FusedExperts::new(
                &(&p / "experts"),
                shape,
                swiglu,
                opts,
                adapters,
            )),
            None => Experts::Separate(
                (0..shape.experts)
                    .map(|e| {
                        SwiGlu::separate(
                            &(&p / "experts" / e),
                            names,
                            (h, i),
                            (false, shape.std),
                            opts,
                        )
                    })
                    .collect(),
            ),
        };
        SparseMoe {
            router,
            router_bias,
            experts,
            shared,
            shape,
            weights_in_activation_kind: model_type != ModelType::Mixtral,
        }
    }

    /// The block's output `[B, T, H]` for its input `x`, and the router logits `[B·T, E]`
    /// (in the activations' dtype, as `transformers` returns them).
    pub fn forward(&self, x: &Tensor, training: bool) -> (Tensor, Tensor) {
        let size = x.size();
        let h = self.shape.hidden;
        let mut flat = x.reshape([-1, h]);
        if training && self.shape.jitter > 0.0 {
            let j = self.shape.jitter;
            flat = &flat * flat.empty_like().uniform_(1.0 - j, 1.0 + j);
        }
        let bias = self.router_bias.as_ref().map(|b| b.to_kind(flat.kind()));
        let logits = flat.linear(&self.router.to_kind(flat.kind()), bias.as_ref());
        let probs = logits.softmax(-1, Kind::Float);
        let (mut top, chosen) = probs.topk(self.shape.top_k, -1, true, true);
        if self.shape.norm_topk_prob {
            top = &top / top.sum_dim_intlist(-1, true, Kind::Float);
        }
        if self.weights_in_activation_kind {
            top = top.to_kind(flat.kind());
        }
        // The (token, slot) choices sorted by expert on the device; only the experts'
        // counts come to the host, once per forward (transformers' loop over the experts
        // hit reads them too).
        let choices = chosen.reshape([-1]);
        let order = choices.argsort_stable(true, 0, false);
        let counts: Vec<i64> = Vec::try_from(choices.bincount::<Tensor>(None, self.shape.experts))
            .expect("int64 counts");
        let k = self.shape.top_k;
        let (all_tokens, all_slots) = (order.divide_scalar_mode(k, "floor"), order.remainder(k));
        let mut out = flat.zeros_like();
        let mut offset = 0;
        for (expert, &count) in counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let tokens = all_tokens.narrow(0, offset, count);
            let slots = all_slots.narrow(0, offset, count);
            offset += count;
            let y = self.experts.forward(expert, &flat.index_select(0, &tokens));
            let weight = top.index(&[Some(&tokens), Some(&slots)]).unsqueeze(-1);
            out = out.index_add(0, &tokens, &(y * weight).to_kind(out.kind()));
        }
        if let Some((expert, gate)) = &self.shared {
            out = &out + gate.forward(&flat).sigmoid() * expert.forward(&flat);
        }
        (out.reshape(size), logits)
    }
}

/// The experts of one block.
#[derive(Debug)]
enum Experts {
    /// One SwiGLU MLP per expert, under its own names.
    Separate(Vec<SwiGlu>),
    /// All in 3-D parameters (gpt-oss).
    Fused(FusedExperts),
}

impl Experts {
    fn forward(&self, expert: usize, x: &Tensor) -> Tensor {
        match self {
            Experts::Separate(experts) => experts[expert].forward(x),
            Experts::Fused(experts) => experts.forward(expert as i64, x),
        }
    }
}

/// The parameters of [`FusedExperts`] LoRA may adapt, in the module's order.
pub const FUSED_EXPERT_PARAMS: [&str; 2] = ["gate_up_proj", "down_proj"];

/// gpt-oss's experts, as stored: `gate_up_proj` `[E, H, 2I]` (gate and up interleaved
/// along the last dimension) and `down_proj` `[E, I, H]`, each with a bias; each expert is
/// `down((up + 1) · g·σ(α·g))` with the gate g clamped above at the limit and up clamped
/// to ±limit (`GptOssExperts`).
#[derive(Debug)]
struct FusedExperts {
    gate_up: Tensor,
    gate_up_bias: Tensor,
    down: Tensor,
    down_bias: Tensor,
    alpha: f64,
    limit: f64,
    /// LoRA on `gate_up_proj` and `down_proj` (PEFT's `target_parameters`).
    gate_up_lora: Option<ExpertsLora>,
    down_lora: Option<ExpertsLora>,
}

impl FusedExperts {
    /// `adapters`: the LoRA config, and whether the adapters train.
    fn new(
        p: &nn::Path,
        shape: MoeShape,
        (alpha, limit): (f64, f64),
        opts: &ModelOptions,
        adapters: (Option<&LoraConfig>, bool),
    ) -> Self {
        let (e, h, i) = (shape.experts, shape.hidden, shape.intermediate);
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: shape.std,
        };
        let module = p.components().collect::<Vec<_>>().join(".");
        let (mut gate_up_lora, mut down_lora) = (None, None);
        if let (Some(cfg), trainable) = adapters {
            for (param, path) in cfg.parameter_adapters(&module, &FUSED_EXPERT_PARAMS) {
                // `path` is this module's, under `base_layer` as many times as PEFT nests it.
                let depth = path.matches(".base_layer").count();
                let nested = (0..depth).fold(None::<nn::Path>, |q, _| match q {
                    None => Some(p / "base_layer"),
                    Some(q) => Some(&q / "base_layer"),
                });
                let at = nested.as_ref().unwrap_or(p);
                let gate_up = param.ends_with(".gate_up_proj");
                let dims = if gate_up { (e, h, 2 * i) } else { (e, i, h) };
                let lora = ExpertsLora::new(at, &param, dims, cfg);
                if !trainable {
                    let _ = lora.a.set_requires_grad(false);
                    let _ = lora.b.set_requires_grad(false);
                }
                match gate_up {
                    true => gate_up_lora = Some(lora),
                    false => down_lora = Some(lora),
                }
            }
        }
        FusedExperts {
            gate_up_lora,
            down_lora,
            gate_up: param(p, "gate_up_proj", &[e, h, 2 * i], init, opts),
            gate_up_bias: param(
                p,
                "gate_up_proj_bias",
                &[e, 2 * i],
                nn::Init::Const(0.0),
                opts,
            ),
            down: param(p, "down_proj", &[e, i, h], init, opts),
            down_bias: param(p, "down_proj_bias", &[e, h], nn::Init::Const(0.0), opts),
            alpha,
            limit,
        }
    }

    fn forward(&self, expert: i64, x: &Tensor) -> Tensor {
        let mut gate_up = x.matmul(&self.gate_up.get(expert)) + self.gate_up_bias.get(expert);
        if let Some(delta) = self.gate_up_lora.as_ref().and_then(|l| l.delta(expert, x)) {
            gate_up += delta;
        }
        let gate = gate_up.slice(-1, 0, None, 2).clamp_max(self.limit);
        let up = gate_up.slice(-1, 1, None, 2).clamp(-self.limit, self.limit);
        let glu = &gate * (&gate * self.alpha).sigmoid();
        let hidden = (up + 1.0) * glu;
        let out = hidden.matmul(&self.down.get(expert)) + self.down_bias.get(expert);
        match self
            .down_lora
            .as_ref()
            .and_then(|l| l.delta(expert, &hidden))
        {
            Some(delta) => out + delta,
            None => out,
        }
    }
}

/// `transformers`' `load_balancing_loss_func` over one forward's MoE layers: with f_e the
/// share of top-k choices that went to expert e and P_e its mean router probability, both
/// over every layer's tokens where `mask` (`[B·T]`, 1 for a real token) is set,
/// E · Σ_e f_e·P_e (k when routing is uniform: the shares f sum to k; only P_e carries a
/// gradient).
pub fn load_balancing_loss(router_logits: &[Tensor], mask: &Tensor, top_k: i64) -> Tensor {
    let Routing {
        probs,
        mask,
        counts,
        rows,
    } = Routing::new(router_logits, mask, top_k);
    let experts = counts.size()[0];
    let mut prob_sum = counts.zeros_like();
    for p in &probs {
        prob_sum += (p * mask.unsqueeze(-1)).sum_dim_intlist(0, false, Kind::Float);
    }
    (counts / &rows * (prob_sum / &rows)).sum(Kind::Float) * experts as f64
}

/// The coefficients c_e = E·f_e/R of [`load_balancing_loss`] (R: the real tokens of all
/// layers), without gradient: Σ_layers Σ_tokens Σ_e c_e·p_e·m is the loss, and its
/// gradient, so that each MoE layer's share can be backpropagated on its own (activation
/// recomputation backpropagates one layer at a time).
pub fn load_balancing_coefficients(router_logits: &[Tensor], mask: &Tensor, top_k: i64) -> Tensor {
    let _guard = tch::no_grad_guard();
    let Routing { counts, rows, .. } = Routing::new(router_logits, mask, top_k);
    let experts = counts.size()[0];
    counts / (&rows * &rows) * experts as f64
}

/// One forward's routing, as the loss reads it.
struct Routing {
    /// Every MoE layer's router probabilities `[B·T, E]` (f32).
    probs: Vec<Tensor>,
    /// `[B·T]` f32, 1 at real tokens.
    mask: Tensor,
    /// How many of every layer's top-k choices at real tokens went to each expert (`[E]`,
    /// no gradient).
    counts: Tensor,
    /// The real tokens of all layers, R.
    rows: Tensor,
}

impl Routing {
    fn new(router_logits: &[Tensor], mask: &Tensor, top_k: i64) -> Self {
        let mask = real_tokens(mask, &router_logits[0]);
        let probs: Vec<Tensor> = router_logits
            .iter()
            .map(|l| l.softmax(-1, Kind::Float))
            .collect();
        let _guard = tch::no_grad_guard();
        let experts = probs[0].size()[1];
        let mut counts = Tensor::zeros([experts], (Kind::Float, mask.device()));
        for p in &probs {
            let (_, chosen) = p.topk(top_k, -1, true, true);
            let weights = mask.unsqueeze(-1).expand_as(&chosen).reshape([-1]);
            counts = counts.scatter_add(0, &chosen.reshape([-1]), &weights);
        }
        let rows = mask.sum(Kind::Float) * probs.len() as f64;
        Routing {
            probs,
            mask,
            counts,
            rows,
        }
    }
}

/// `mask` (`[B·T]`, nonzero at real tokens) as f32 on the device of `logits`.
fn real_tokens(mask: &Tensor, logits: &Tensor) -> Tensor {
    mask.reshape([-1])
        .to_kind(Kind::Float)
        .to_device(logits.device())
}

/// One layer's share of the loss for coefficients `c` (see
/// [`load_balancing_coefficients`]): Σ_tokens Σ_e c_e·p_e·m.
pub fn load_balancing_share(logits: &Tensor, mask: &Tensor, c: &Tensor) -> Tensor {
    let m = real_tokens(mask, logits).unsqueeze(-1);
    (logits.softmax(-1, Kind::Float) * m * c).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_routing_scores_one_and_masked_tokens_do_not_count() {
        // Equal logits: every probability is 1/E = 1/4 and topk takes two experts for
        // every token, so f = (1, 1, 0, 0) in some order and E·Σ f·P = 4 · 2/4 = 2 = k.
        let logits = Tensor::zeros([6, 4], (Kind::Float, tch::Device::Cpu));
        let mask = Tensor::ones([6], (Kind::Int64, tch::Device::Cpu));
        let loss = load_balancing_loss(&[logits.shallow_clone()], &mask, 2).double_value(&[]);
        assert!((loss - 2.0).abs() < 1e-6, "{loss}");
        // A token routed elsewhere, masked out, changes nothing.
        let skewed = Tensor::cat(
            &[logits, Tensor::from_slice(&[0f32, 0., 9., 9.]).view([1, 4])],
            0,
        );
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 0]);
        let masked = load_balancing_loss(&[skewed], &mask, 2).double_value(&[]);
        assert!((masked - 2.0).abs() < 1e-6, "{masked}");
    }

    #[test]
    fn layer_shares_add_up_to_the_loss_and_its_gradient() {
        // Fixed, uneven logits (the global generator is shared with the tests beside).
        let layers: Vec<Tensor> = (0..3)
            .map(|l| {
                let t = Tensor::arange(20, (Kind::Float, tch::Device::Cpu)) * (1.3 + l as f64);
                (t.sin() * 3.0).view([5, 4]).set_requires_grad(true)
            })
            .collect();
        let mask = Tensor::from_slice(&[1i64, 1, 0, 1, 1]);
        let loss = load_balancing_loss(&layers, &mask, 2);
        let direct = Tensor::run_backward(&[&loss], &layers, false, false);
        let c = load_balancing_coefficients(&layers, &mask, 2);
        let shares: Vec<Tensor> = layers
            .iter()
            .map(|l| load_balancing_share(l, &mask, &c))
            .collect();
        let total = Tensor::stack(&shares, 0).sum(Kind::Float);
        assert!((total.double_value(&[]) - loss.double_value(&[])).abs() < 1e-6);
        let split = Tensor::run_backward(&[&total], &layers, false, false);
        for (a, b) in direct.iter().zip(&split) {
            assert!((a - b).abs().max().double_value(&[]) < 1e-6);
        }
    }
}
