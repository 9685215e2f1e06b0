//! Per-token log-probs, entropies, mean logits and divergences from a teacher's
//! distributions (distillation's generalized JSD) from hidden states with the LM head
//! applied to chunks of positions, so that no `[B, T, V]` tensor exists at once (as fused
//! linear–cross-entropy kernels do). Under `no_grad` the chunks are computed and dropped.
//! With grad, the forward still runs chunk by chunk without keeping anything, and returns
//! leaves; after `loss.backward()` has put the loss's gradient on them, [`backward_head`]
//! recomputes each chunk with its graph and pulls the gradient back into the head weight
//! and the hidden states. The numbers are the direct computation's (`ops::logprobs_of`,
//! `ops::entropy` over the whole logits tensor): every operation is per position.

use tch::{Kind, Tensor};

use super::recompute::pull_back;
use crate::ops::{entropy, generalized_jsd, logprobs_of, topk_generalized_jsd};

/// Positions whose logits exist at once: 1024 × a 152k vocabulary is 0.6 GB in f32.
pub const POSITIONS_PER_CHUNK: i64 = 1024;

/// What [`super::Model::token_outputs`] computes at each position besides the log-prob.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenSpec {
    /// Logits are divided by it (PPO's sampling temperature); 1 elsewhere.
    pub temperature: f64,
    /// The entropy of the distribution, detached.
    pub entropy: bool,
    /// The entropy with its gradient (an entropy bonus in the loss).
    pub entropy_grad: bool,
    /// The mean logit over the vocabulary (TRL's `logits/chosen` metric), detached.
    pub mean_logit: bool,
    /// Whether the label is the argmax (lm-eval's `is_greedy`).
    pub greedy: bool,
    /// log Σ_v p(v)², detached: the log of the probability that two draws agree (WPO's
    /// weights, TRL's `log_sum_sq_probs`).
    pub log_sum_sq_probs: bool,
    /// The generalized JSD at this β against a [`Target`]'s distributions, with its
    /// gradient (knowledge distillation).
    pub jsd: Option<f64>,
    /// With `jsd`: taken over this model's k likeliest tokens only, renormalised, or with a
    /// bucket for the rest (`true`), see [`crate::ops::topk_generalized_jsd`].
    pub jsd_topk: Option<(i64, bool)>,
}

impl Default for TokenSpec {
    fn default() -> Self {
        TokenSpec {
            temperature: 1.0,
            entropy: false,
            entropy_grad: false,
            mean_logit: false,
            greedy: false,
            log_sum_sq_probs: false,
            jsd: None,
            jsd_topk: None,
        }
    }
}

/// The distributions a student's are compared with (a teacher's): its head and its hidden
/// states `[R, H']`, a row for each of the student's rows, without gradient.
#[derive(Debug)]
pub(crate) struct Target {
    pub head: LmHead,
    pub hidden: Tensor,
}

impl Target {
    /// The target of rows `start..start + n`.
    fn rows(&self, start: i64, n: i64) -> Target {
        Target {
            head: LmHead {
                weight: self.head.weight.shallow_clone(),
                ..self.head
            },
            hidden: self.hidden.narrow(0, start, n),
        }
    }
}

/// The LM head: a bias-free linear map, Granite's division by `logits_scaling`, then Gemma
/// 2's final-logit soft-capping (`cap · tanh(logits / cap)`) where the model has them.
#[derive(Debug)]
pub(crate) struct LmHead {
    pub weight: Tensor,
    pub softcap: Option<f64>,
    /// Granite's `logits_scaling` (1 elsewhere).
    pub divisor: f64,
}

impl LmHead {
    /// Logits in the weight's dtype (an f32 head, `cast_lm_head_to_fp32`, takes the hidden
    /// states cast up to f32).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let mut logits = hidden
            .to_kind(self.weight.kind())
            .linear::<Tensor>(&self.weight, None);
        if self.divisor != 1.0 {
            logits /= self.divisor;
        }
        match self.softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }
}

/// Per-position results, each `[B, T]` f32.
#[derive(Debug)]
pub struct TokenOutputs {
    pub logprobs: Tensor,
    pub entropy: Option<Tensor>,
    pub mean_logit: Option<Tensor>,
    /// `[B, T]` bool: the label is the first argmax of the logits.
    pub greedy: Option<Tensor>,
    pub log_sum_sq_probs: Option<Tensor>,
    /// The generalized JSD against the target (`TokenSpec::jsd`).
    pub jsd: Option<Tensor>,
}

/// What a forward with grad keeps for [`backward_head`].
#[derive(Debug)]
pub(crate) struct HeadSaved {
    /// The head the forward used (adapters may be switched off by then).
    pub head: LmHead,
    /// `[R, H]` hidden states with their graph.
    pub hidden: Tensor,
    pub labels: Tensor,
    pub spec: TokenSpec,
    pub chunk: i64,
    /// The leaves handed to the loss: log-probs, (with `entropy_grad`) entropies and
    /// (with `jsd`) divergences.
    pub logprobs: Tensor,
    pub entropy: Option<Tensor>,
    pub jsd: Option<Tensor>,
    pub target: Option<Target>,
    /// When the head's weight is a leaf standing for a tensor computed with grad: that
    /// tensor, which the leaf's gradient is pulled back through after the chunks.
    pub weight_source: Option<Tensor>,
}

/// The outputs of rows `[R, H]` of hidden states for `labels` `[R]`, `chunk` rows at a
/// time, `[R]` each (f32, or bool for `greedy`).
fn chunked(
    head: &LmHead,
    hidden: &Tensor,
    labels: &Tensor,
    (spec, target): (TokenSpec, Option<&Target>),
    chunk: i64,
) -> TokenOutputs {
    let rows = hidden.size()[0];
    let (mut lp, mut ent, mut mean, mut greedy, mut sq) = (vec![], vec![], vec![], vec![], vec![]);
    let mut jsd = vec![];
    for start in (0..rows).step_by(chunk.max(1) as usize) {
        let n = chunk.min(rows - start);
        let logits = head.logits(&hidden.narrow(0, start, n));
        let logits = if spec.temperature == 1.0 {
            logits
        } else {
            logits / spec.temperature
        };
        let labels = labels.narrow(0, start, n);
        lp.push(logprobs_of(&logits, &labels));
        if spec.entropy || spec.entropy_grad {
            ent.push(entropy(&logits));
        }
        if spec.mean_logit {
            mean.push(
                logits
                    .to_kind(Kind::Float)
                    .mean_dim([-1].as_slice(), false, Kind::Float),
            );
        }
        if spec.greedy {
            greedy.push(logits.argmax(-1, false).eq_tensor(&labels));
        }
        if spec.log_sum_sq_probs {
            let logp = logits.log_softmax(-1, Kind::Float);
            sq.push((logp * 2.0).logsumexp([-1].as_slice(), false));
        }
        if let (Some(beta), Some(t)) = (spec.jsd, target) {
            // At the same temperature as ours.
            let theirs = tch::no_grad(|| t.head.logits(&t.hidden.narrow(0, start, n)));
            let theirs = if spec.temperature == 1.0 {
                theirs
            } else {
                theirs / spec.temperature
            };
            jsd.push(match spec.jsd_topk {
                None => generalized_jsd(&logits, &theirs, beta),
                Some((k, tail)) => topk_generalized_jsd(&logits, &theirs, (k, beta), tail),
            });
        }
    }
    let cat = |v: Vec<Tensor>| (!v.is_empty()).then(|| Tensor::cat(&v, 0));
    TokenOutputs {
        logprobs: cat(lp).unwrap_or_else(|| Tensor::zeros([0], (Kind::Float, hidden.device()))),
        entropy: cat(ent),
        mean_logit: cat(mean),
        greedy: cat(greedy),
        log_sum_sq_probs: cat(sq),
        jsd: cat(jsd),
    }
}

/// [`super::Model::token_outputs`] for hidden states `[B, T, H]` and labels `[B, T]`, the
/// head applied `chunk` positions at a time. Returns the outputs and, when the hidden
/// states carry a graph and grad is on, what the backward needs.
pub(crate) fn token_outputs(
    head: LmHead,
    hidden: &Tensor,
    labels: &Tensor,
    (spec, target): (TokenSpec, Option<Target>),
    chunk: i64,
) -> (TokenOutputs, Option<HeadSaved>) {
    let (b, t, h) = hidden.size3().expect("[B, T, H] hidden states");
    let rows = hidden.reshape([b * t, h]);
    let flat_labels = labels.reshape([b * t]);
    let with_grad = super::grad_enabled() && hidden.requires_grad();
    let TokenOutputs {
        logprobs: lp,
        entropy: ent,
        mean_logit: mean,
        greedy,
        log_sum_sq_probs: sq,
        jsd,
    } = {
        let _guard = with_grad.then(tch::no_grad_guard);
        chunked(
            &head,
            &rows.detach(),
            &flat_labels,
            (spec, target.as_ref()),
            chunk,
        )
    };
    let shape = |x: Tensor| x.reshape([b, t]);
    if !with_grad {
        let outputs = TokenOutputs {
            logprobs: shape(lp),
            entropy: ent.map(shape),
            mean_logit: mean.map(shape),
            greedy: greedy.map(shape),
            log_sum_sq_probs: sq.map(shape),
            jsd: jsd.map(shape),
        };
        return (outputs, None);
    }
    let lp = lp.set_requires_grad(true);
    let jsd = jsd.map(|j| j.set_requires_grad(true));
    let ent = ent.map(|e| {
        if spec.entropy_grad {
            e.set_requires_grad(true)
        } else {
            e
        }
    });
    let saved = HeadSaved {
        head,
        hidden: rows,
        labels: flat_labels,
        spec,
        chunk,
        logprobs: lp.shallow_clone(),
        entropy: ent
            .as_ref()
            .filter(|_| spec.entropy_grad)
            .map(Tensor::shallow_clone),
        jsd: jsd.as_ref().map(Tensor::shallow_clone),
        target,
        weight_source: None,
    };
    let outputs = TokenOutputs {
        logprobs: shape(lp),
        entropy: ent.map(shape),
        mean_logit: mean.map(shape),
        greedy: greedy.map(shape),
        log_sum_sq_probs: sq.map(shape),
        jsd: jsd.map(shape),
    };
    (outputs, Some(saved))
}

/// Pulls the gradients the loss left on a forward's leaves back through the head, one
/// recomputed chunk at a time, into the head weight and the hidden states' graph.
pub(crate) fn backward_head(saved: HeadSaved) {
    let grad_of = |leaf: &Tensor| {
        let g = leaf.grad();
        g.defined().then_some(g)
    };
    let lp_grad = grad_of(&saved.logprobs);
    let ent_grad = saved.entropy.as_ref().and_then(grad_of);
    let jsd_grad = saved.jsd.as_ref().and_then(grad_of);
    if lp_grad.is_none() && ent_grad.is_none() && jsd_grad.is_none() {
        return;
    }
    let rows = saved.hidden.size()[0];
    if rows == 0 {
        return;
    }
    let spec = TokenSpec {
        entropy: false,
        entropy_grad: ent_grad.is_some(),
        mean_logit: false,
        greedy: false,
        log_sum_sq_probs: false,
        jsd: saved.spec.jsd.filter(|_| jsd_grad.is_some()),
        ..saved.spec
    };
    let mut hidden_grads = vec![];
    for start in (0..rows).step_by(saved.chunk.max(1) as usize) {
        let n = saved.chunk.min(rows - start);
        let h = saved
            .hidden
            .narrow(0, start, n)
            .detach()
            .set_requires_grad(true);
        let labels = saved.labels.narrow(0, start, n);
        let target = saved.target.as_ref().map(|t| t.rows(start, n));
        let TokenOutputs {
            logprobs: lp,
            entropy: ent,
            jsd,
            ..
        } = chunked(&saved.head, &h, &labels, (spec, target.as_ref()), n);
        let mut surrogate = Tensor::zeros([], (Kind::Float, h.device()));
        if let Some(g) = &lp_grad {
            surrogate += (lp * g.narrow(0, start, n)).sum(Kind::Float);
        }
        if let (Some(e), Some(g)) = (ent, &ent_grad) {
            surrogate += (e * g.narrow(0, start, n)).sum(Kind::Float);
        }
        if let (Some(j), Some(g)) = (jsd, &jsd_grad) {
            surrogate += (j * g.narrow(0, start, n)).sum(Kind::Float);
        }
        surrogate.backward();
        hidden_grads.push(h.grad());
    }
    pull_back(&saved.hidden, &Tensor::cat(&hidden_grads, 0));
    if let Some(source) = &saved.weight_source {
        let g = saved.head.weight.grad();
        if g.defined() {
            pull_back(source, &g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Chunked (5 positions at a time over 2 × 7, so the chunks do not divide the rows)
    /// equals the direct computation: values (1e-6, relative above 1) and gradients of the
    /// hidden states and the head (1e-5), with a temperature and an entropy bonus.
    #[test]
    fn chunks_give_the_direct_numbers_and_gradients() {
        tch::manual_seed(1);
        let opts = (Kind::Float, Device::Cpu);
        let head = Tensor::randn([29, 8], opts).set_requires_grad(true);
        let base = Tensor::randn([2, 7, 8], opts).set_requires_grad(true);
        let labels = Tensor::randint(29, [2, 7], (Kind::Int64, Device::Cpu));
        let mask =
            Tensor::from_slice2(&[[1f32, 1., 1., 1., 1., 1., 1.], [0., 0., 1., 1., 1., 1., 0.]]);
        let weights = Tensor::randn([2, 7], opts);
        let spec = TokenSpec {
            temperature: 0.7,
            entropy: true,
            entropy_grad: true,
            mean_logit: true,
            greedy: true,
            log_sum_sq_probs: true,
            jsd: None,
            jsd_topk: None,
        };
        let loss_of =
            |lp: &Tensor, ent: &Tensor| ((lp * &weights - ent * 0.3) * &mask).sum(Kind::Float);
        // Direct: the whole logits tensor.
        let hidden = &base * 2.0;
        let logits = hidden.linear::<Tensor>(&head, None) / 0.7;
        let (lp, ent) = (logprobs_of(&logits, &labels), entropy(&logits));
        let mean = logits.mean_dim([-1].as_slice(), false, Kind::Float);
        loss_of(&lp, &ent).backward();
        let (g_base, g_head) = (base.grad().copy(), head.grad().copy());
        let _ = base.grad().zero_();
        let _ = head.grad().zero_();
        // Chunked, then the recomputing backward.
        let hidden = &base * 2.0;
        let lm = |softcap| LmHead {
            weight: head.shallow_clone(),
            softcap,
            divisor: 1.0,
        };
        let (out, saved) = token_outputs(lm(None), &hidden, &labels, (spec, None), 5);
        // Relative above 1: f32's spacing at a log-prob of −30 is 2e-6.
        let close = |a: &Tensor, b: &Tensor, tol: f64| {
            let d = ((a - b).abs() / (b.abs() + 1.0)).max().double_value(&[]);
            assert!(d < tol, "differs by {d:e}");
        };
        close(&out.logprobs, &lp, 1e-6);
        close(out.entropy.as_ref().unwrap(), &ent, 1e-6);
        close(out.mean_logit.as_ref().unwrap(), &mean, 1e-6);
        let greedy = logits.argmax(-1, false).eq_tensor(&labels);
        assert!(out.greedy.as_ref().unwrap().equal(&greedy));
        let probs = logits.softmax(-1, Kind::Float);
        let sum_sq = (&probs * &probs).sum_dim_intlist([-1].as_slice(), false, Kind::Float);
        close(out.log_sum_sq_probs.as_ref().unwrap(), &sum_sq.log(), 1e-6);
        loss_of(&out.logprobs, out.entropy.as_ref().unwrap()).backward();
        backward_head(saved.expect("grad is on"));
        close(&base.grad(), &g_base, 1e-5);
        close(&head.grad(), &g_head, 1e-5);
        // Under no_grad nothing is kept.
        let _guard = tch::no_grad_guard();
        assert!(token_outputs(lm(None), &hidden, &labels, (spec, None), 5)
            .1
            .is_none());
        // Gemma 2's soft-capped logits, chunked, equal the direct ones.
        let capped = (hidden.linear::<Tensor>(&head, None) / 2.0).tanh() * 2.0 / 0.7;
        let out = token_outputs(lm(Some(2.0)), &hidden, &labels, (spec, None), 5).0;
        close(&out.logprobs, &logprobs_of(&capped, &labels), 1e-6);
        close(out.entropy.as_ref().unwrap(), &entropy(&capped), 1e-6);
    }

    /// The generalized JSD against a teacher, chunked (4 rows at a time over 11) with the
    /// recomputing backward, equals the direct computation on whole logits: values (1e-6),
    /// and the gradients of the student's hidden states and head (1e-5); the teacher gets
    /// none. Also over the student's top 5 tokens, renormalised and with the tail bucket, at
    /// a temperature.
    #[test]
    fn chunked_distillation_gives_the_direct_numbers_and_gradients() {
        tch::manual_seed(2);
        let opts = (Kind::Float, Device::Cpu);
        let head = Tensor::randn([29, 8], opts).set_requires_grad(true);
        let base = Tensor::randn([11, 8], opts).set_requires_grad(true);
        let teacher_head = Tensor::randn([29, 6], opts).set_requires_grad(true);
        let teacher_hidden = Tensor::randn([11, 6], opts);
        let weights = Tensor::randn([11], opts);
        let cases = [
            (0.0, None, 1.0),
            (0.3, None, 1.0),
            (1.0, None, 1.0),
            (0.5, Some((5, false)), 0.8),
            (0.3, Some((5, true)), 1.0),
        ];
        for (beta, topk, temperature) in cases {
            let hidden = &base * 2.0;
            let ours = hidden.linear::<Tensor>(&head, None) / temperature;
            let theirs = teacher_hidden
                .linear::<Tensor>(&teacher_head, None)
                .detach()
                / temperature;
            let direct = match topk {
                None => generalized_jsd(&ours, &theirs, beta),
                Some((k, tail)) => topk_generalized_jsd(&ours, &theirs, (k, beta), tail),
            };
            (&direct * &weights).sum(Kind::Float).backward();
            let (g_base, g_head) = (base.grad().copy(), head.grad().copy());
            let _ = base.grad().zero_();
            let _ = head.grad().zero_();
            let spec = TokenSpec {
                jsd: Some(beta),
                jsd_topk: topk,
                temperature,
                ..TokenSpec::default()
            };
            let target = Target {
                head: LmHead {
                    weight: teacher_head.shallow_clone(),
                    softcap: None,
                    divisor: 1.0,
                },
                hidden: teacher_hidden.shallow_clone(),
            };
            let lm = LmHead {
                weight: head.shallow_clone(),
                softcap: None,
                divisor: 1.0,
            };
            let hidden = &base * 2.0;
            let labels = Tensor::zeros([1, 11], (Kind::Int64, Device::Cpu));
            let (out, saved) =
                token_outputs(lm, &hidden.unsqueeze(0), &labels, (spec, Some(target)), 4);
            let jsd = out.jsd.unwrap().squeeze_dim(0);
            let close = |a: &Tensor, b: &Tensor, tol: f64| {
                let d = ((a - b).abs() / (b.abs() + 1.0)).max().double_value(&[]);
                assert!(d < tol, "β {beta}: differs by {d:e}");
            };
            close(&jsd, &direct, 1e-6);
            (&jsd * &weights).sum(Kind::Float).backward();
            backward_head(saved.expect("grad is on"));
            close(&base.grad(), &g_base, 1e-5);
            close(&head.grad(), &g_head, 1e-5);
            let _ = base.grad().zero_();
            let _ = head.grad().zero_();
            assert!(
                !teacher_head.grad().defined()
                    || teacher_head.grad().abs().max().double_value(&[]) == 0.0
            );
        }
    }
}
