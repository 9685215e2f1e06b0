//! What an iteration logs: TRL's metric names (so curves compare with TRL's), the built-in
//! checks, and sample prompts and responses for TensorBoard's Text tab and
//! `samples.jsonl`. Every scalar is averaged over the world's ranks.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use common::ops::masked_mean;
use common::train::Session;
use data::Tokenizer;
use tch::{Kind, Tensor};

use crate::math::{explained_variance, known_moments, nan_std, var_over};
use crate::rollout::Rollout;
use crate::train::{per_sequence_mean, Iteration};

/// Seconds spent in one iteration.
pub struct Timings {
    pub rollout: f64,
    pub train: f64,
    pub total: f64,
}

/// The scalars of one iteration, in the order they are written.
pub(crate) fn iteration_scalars(
    it: &Iteration,
    session: &Session,
    group: i64,
) -> Vec<(String, f64)> {
    let (ro, stats, world) = (&it.ro, &it.stats, &session.world);
    let mean = |x: f64| world.mean(x);
    let response_tokens = ro.mask.sum(Kind::Float).double_value(&[]);
    let rows = ro.mask.size()[0] as f64;
    let eos = ro.ended_with_eos.iter().filter(|&&e| e).count() as f64;
    let non_score = mean(per_sequence_mean(&it.non_score));
    let scored_mask = &ro.mask * ro.scores.isnan().logical_not().unsqueeze(1);
    // A per-token quantity's mean over every rank's sampled tokens.
    let token_mean = |x: &Tensor| {
        let sum = (x * &ro.mask).sum(Kind::Double).double_value(&[]);
        let [sum, tokens] = world.sums([sum, response_tokens]);
        sum / tokens.max(1.0)
    };
    let mut scalars = vec![
        (
            "objective/entropy",
            mean(per_sequence_mean(&(&ro.entropy * &ro.mask))),
        ),
        ("objective/non_score_reward", non_score),
        ("objective/rlhf_reward", it.mean_score + non_score),
        ("objective/scores", it.mean_score),
        ("policy/approxkl_avg", mean(stats.approxkl)),
        ("policy/clipfrac_avg", mean(stats.clipfrac)),
        ("policy/first_ratio_max_dev", stats.first_ratio_max_dev),
        ("policy/rollout_logprob_diff", ro.logprob_check),
        ("loss/policy_avg", mean(stats.policy_loss)),
    ];
    let correction = ro.correction.as_ref().map(|w| {
        // TRL's sampling/importance_sampling_ratio/{min,mean,max} over the real tokens.
        let real = ro.mask.to_kind(Kind::Bool);
        let values = w.masked_select(&real);
        let n = values.numel() as f64;
        let sum = values.sum(Kind::Double).double_value(&[]);
        let (lo, hi) = match n > 0.0 {
            true => (
                values.min().double_value(&[]),
                values.max().double_value(&[]),
            ),
            false => (f64::INFINITY, f64::NEG_INFINITY),
        };
        let [n, sum] = world.sums([n, sum]);
        let (lo, hi) = world.min_max((lo, hi));
        [lo, sum / n.max(1.0), hi]
    });
    if let Some([lo, mean_ratio, hi]) = correction {
        scalars.push(("sampling/importance_sampling_ratio/min", lo));
        scalars.push(("sampling/importance_sampling_ratio/mean", mean_ratio));
        scalars.push(("sampling/importance_sampling_ratio/max", hi));
        // TRL's |log-prob at sampling − log-prob recomputed| over the sampled tokens.
        let gap = (&ro.logprobs - &ro.sampler_logprobs).abs();
        let (_, gap_max) = world.min_max((0.0, (&gap * &ro.mask).max().double_value(&[])));
        scalars.push(("sampling/sampling_logp_difference/mean", token_mean(&gap)));
        scalars.push(("sampling/sampling_logp_difference/max", gap_max));
    }
    if let (Some(values), Some(returns)) = (&ro.values, &it.adv.returns) {
        scalars.push(("loss/value_avg", mean(stats.value_loss)));
        scalars.push(("loss/ptx_avg", mean(stats.ptx_loss)));
        scalars.push(("val/clipfrac_avg", mean(stats.value_clipfrac)));
        scalars.push((
            "val/explained_variance",
            explained_variance(values, returns, &ro.mask, world),
        ));
    } else {
        scalars.push(("loss/ptx_avg", mean(stats.ptx_loss)));
    }
    scalars.extend([
        ("val/ratio", mean(stats.ratio)),
        (
            "val/mean_reward",
            // Over the responses a source scored (the others' rewards are NaN).
            mean(
                masked_mean(&it.rewards.nan_to_num(0.0, None, None), &scored_mask)
                    .double_value(&[]),
            ),
        ),
        ("kl_coef", it.beta),
        ("response_length", mean(response_tokens / rows)),
        ("eos_rate", mean(eos / ro.ended_with_eos.len() as f64)),
        ("time/rollout", it.timings.rollout),
        ("time/train", it.timings.train),
        (
            "train/tokens_per_second",
            world.sum(response_tokens) / it.timings.total.max(1e-9),
        ),
        ("train/lr", stats.outcome.lr),
        ("train/grad_norm", stats.outcome.grad_norm),
        ("train/skipped_steps", session.state.skipped_steps as f64),
        ("completions/mean_length", mean(response_tokens / rows)),
        (
            "completions/clipped_ratio",
            mean(1.0 - eos / ro.ended_with_eos.len() as f64),
        ),
        ("clip_ratio/low_mean", mean(stats.clip_low)),
        ("clip_ratio/low_min", stats.clip_low_min),
        ("clip_ratio/high_mean", mean(stats.clip_high)),
        ("clip_ratio/high_max", stats.clip_high_max),
        (
            "clip_ratio/region_mean",
            mean(stats.clip_low + stats.clip_high),
        ),
        ("reward", it.mean_score),
        ("num_tokens", it.num_tokens),
    ]);
    scalars.extend(completion_lengths(ro, world));
    // TRL's `entropy`: the mean over every rank's sampled tokens.
    scalars.push(("entropy", token_mean(&ro.entropy)));
    if let Some(kl) = it.mean_kl {
        scalars.insert(0, ("objective/kl", kl));
        // TRL's GRPO `kl`: the k3 estimate's mean over every rank's sampled tokens (here
        // at sampling, where TRL's is taken in the update's forwards).
        let log_ratio = &ro.ref_logprobs - &ro.logprobs;
        scalars.push(("kl", token_mean(&(log_ratio.exp() - &log_ratio - 1.0))));
    }
    if it.stats.kl_loss != 0.0 {
        scalars.push(("loss/kl_avg", mean(it.stats.kl_loss)));
    }
    if let Some(coef) = it.entropy_coef {
        scalars.push(("entropy_coef", coef));
    }
    if let Some(share) = it.stats.cispo_clip {
        scalars.push(("cispo_clip_ratio", mean(share)));
    }
    if let Some(phi) = it.stats.vespo_phi {
        scalars.push(("vespo/phi_seq_mean", mean(phi)));
    }
    if let Some(masked) = it.stats.off_policy_masked {
        scalars.push(("off_policy_mask/masked_ratio", mean(masked)));
    }
    if let Some(d) = it.stats.online_dpo {
        // TRL's `OnlineDPOTrainer` names.
        scalars.extend([
            ("rewards/chosen", mean(d.chosen)),
            ("rewards/rejected", mean(d.rejected)),
            ("rewards/margins", mean(d.chosen - d.rejected)),
            ("rewards/accuracies", mean(d.accuracy)),
            ("logps/chosen", mean(d.logps_chosen)),
            ("logps/rejected", mean(d.logps_rejected)),
            ("val/contain_eos_token", mean(eos / rows)),
            ("beta", it.beta),
        ]);
        // The chosen response's score less the rejected one's, over every rank's pairs:
        // the preference is +1 on the chosen response's tokens, −1 on the other's.
        let sign = it.adv.advantages.select(1, 0).to_kind(Kind::Double);
        let margin = (sign * ro.scores.to_kind(Kind::Double)).sum(Kind::Double);
        let [margin, pairs] = world.sums([margin.double_value(&[]), rows / 2.0]);
        scalars.push(("objective/scores_margin", margin / pairs));
    }
    if let Some((implicit, advantage)) = it.stats.a2po {
        // TRL's `A2POTrainer` names: β·Σ(log π − log π_ref), r − V*, and V*.
        scalars.extend([
            ("implicit_reward", mean(implicit)),
            ("advantage", mean(advantage)),
            ("v_star", it.v_star.unwrap_or(f64::NAN)),
            ("beta", it.beta),
        ]);
    }
    if let Some(loss) = it.stats.distillation_loss {
        // TRL's `SDFTTrainer` and `SDPOTrainer` log it under both names.
        scalars.push(("self_distillation/distillation_loss", mean(loss)));
        let own = match it.stats.sdpo_policy_loss {
            Some(_) => "sdpo/distillation_loss",
            None => "sdft/distillation_loss",
        };
        scalars.push((own, mean(loss)));
    }
    if let Some(loss) = it.stats.sdpo_policy_loss {
        scalars.push(("self_distillation/policy_loss", mean(loss)));
    }
    if let Some(aux) = it.stats.aux_loss {
        scalars.push(("aux_loss", aux));
    }
    if let Some(counts) = ro.teacher.as_ref().and_then(|t| t.counts) {
        scalars.extend(crate::sdft::SdpoCounts::scalars(
            world.sums(counts.as_array()),
        ));
    }
    if let Some(batches) = ro.gen_batches {
        // The same on every rank (they decide together).
        scalars.push(("num_gen_batches", batches as f64));
    }
    if let Some(t) = ro.tool_stats {
        scalars.extend(t.frequencies(rows, world));
    }
    let mut named: Vec<(String, f64)> = scalars
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    if group > 1 {
        // TRL's GRPO names: the std of every rank's rewards, and the share of groups whose
        // rewards are all equal (which teach nothing); responses no source scored (NaN) are
        // left out of both.
        named.push((
            "reward_std".into(),
            var_over(world, known_moments(&ro.scores)).sqrt(),
        ));
        let scores = ro.scores.to_kind(Kind::Float).view([-1, group]);
        // TRL's `isclose(std, 0)`; a group with fewer than two scored has no std (NaN).
        let zero = nan_std(&scores, 1)
            .le(1e-8)
            .to_kind(Kind::Float)
            .mean(Kind::Float);
        named.push(("frac_reward_zero_std".into(), mean(zero.double_value(&[]))));
    }
    // Each source's mean and std over every rank's responses it scored (TRL's `nanmean`,
    // `nanstd`).
    for (k, name) in ro.source_names.iter().enumerate() {
        let moments = known_moments(&ro.source_scores.select(1, k as i64));
        let [n, sum] = world.sums([moments.0, moments.1]);
        named.push((format!("rewards/{name}/mean"), sum / n));
        named.push((
            format!("rewards/{name}/std"),
            var_over(world, moments).sqrt(),
        ));
    }
    if ro.source_names.is_empty() {
        // SDFT without a reward source: no response has a score to average.
        named.retain(|(_, v)| !v.is_nan());
    }
    named
}

/// The reward functions' own metrics (TRL's `log_metric`; `metrics`: each name's sum and
/// count of values), each the mean of every rank's values, named `prefix` + its name. The
/// ranks first agree on the names: a rank without values of one counts none.
pub(crate) fn logged_metrics(
    world: &common::World,
    metrics: &BTreeMap<String, (f64, f64)>,
    prefix: &str,
) -> Vec<(String, f64)> {
    let mine: Vec<&String> = metrics.keys().collect();
    let names: BTreeSet<String> = world
        .gather_bytes(&serde_json::to_vec(&mine).expect("names serialise"))
        .iter()
        .flat_map(|part| serde_json::from_slice::<Vec<String>>(part).expect("a rank's names"))
        .collect();
    let sums: Vec<f64> = names
        .iter()
        .flat_map(|name| {
            let (sum, n) = metrics.get(name).copied().unwrap_or((0.0, 0.0));
            [sum, n]
        })
        .collect();
    let sums = world.sum_vec(&sums);
    names
        .iter()
        .zip(sums.chunks(2))
        .map(|(name, s)| (format!("{prefix}{name}"), s[0] / s[1]))
        .collect()
}

/// A name that `scalars` hold twice, or that `metrics.jsonl` gives its step (`step`): a
/// reward function's metric named as one of the run's.
pub(crate) fn twice_named(scalars: &[(String, f64)]) -> Option<&str> {
    let mut seen = BTreeSet::from(["step"]);
    scalars
        .iter()
        .map(|(name, _)| name.as_str())
        .find(|name| !seen.insert(name))
}

/// TRL's `completions/min_length`, `/max_length` and the same of the responses that ended
/// with EOS (`…_terminated_length`, `/mean_terminated_length`; 0 when none did), in
/// sampled tokens (the EOS counted, tool results not), over every rank.
fn completion_lengths(ro: &Rollout, world: &common::World) -> Vec<(&'static str, f64)> {
    let lengths: Vec<f64> = Vec::<f64>::try_from(
        ro.mask
            .sum_dim_intlist([1].as_slice(), false, Kind::Double)
            .to_device(tch::Device::Cpu),
    )
    .expect("a length per row");
    let range = |xs: &mut dyn Iterator<Item = f64>| {
        xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        })
    };
    let (lo, hi) = world.min_max(range(&mut lengths.iter().copied()));
    let ended = || {
        lengths
            .iter()
            .zip(&ro.ended_with_eos)
            .filter(|(_, &e)| e)
            .map(|(&l, _)| l)
    };
    let [count, sum] = world.sums([ended().count() as f64, ended().sum::<f64>()]);
    let (term_lo, term_hi) = world.min_max(range(&mut ended()));
    let none = count == 0.0;
    let or_zero = |x: f64| if none { 0.0 } else { x };
    vec![
        ("completions/min_length", lo),
        ("completions/max_length", hi),
        ("completions/min_terminated_length", or_zero(term_lo)),
        ("completions/mean_terminated_length", or_zero(sum / count)),
        ("completions/max_terminated_length", or_zero(term_hi)),
    ]
}

/// The first `n` prompts, responses and scores of this rank's rollout, as Markdown in
/// TensorBoard and as lines of `samples.jsonl`, with what TRL's completions table shows
/// beside them: each source's reward (`"rewards"`, null where it did not score), the
/// response's advantage where it is one per response (`sequence_advantages`: the group
/// estimators'), and the columns reward functions logged (`"extra"`).
pub(crate) fn write_samples(
    session: &mut Session,
    (ro, sequence_advantages): (&Rollout, Option<&Tensor>),
    tok: &Tokenizer,
    n: usize,
) -> Result<()> {
    let step = session.state.step;
    let cpu = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(tch::Device::Cpu));
    let scores = cpu(&ro.scores)?;
    let by_source = cpu(&ro.source_scores.contiguous().view([-1]))?;
    // Each response's advantage: the same on each of its tokens.
    let advantages = sequence_advantages
        .map(|a| cpu(&a.select(1, 0)))
        .transpose()?;
    let k = ro.source_names.len();
    let mut markdown = String::from("| prompt | response | score |\n|---|---|---|\n");
    let mut lines = String::new();
    for (i, ((prompt_ids, text), score)) in ro
        .prompts
        .iter()
        .zip(&ro.texts)
        .zip(&scores)
        .take(n)
        .enumerate()
    {
        let prompt = tok.decode(prompt_ids, true);
        let mut line =
            serde_json::json!({"step": step, "prompt": prompt, "response": text, "score": score});
        // The sampled tokens exactly (the EOS included), which the text may not give back.
        let n = ro
            .response_mask()
            .get(i as i64)
            .sum(Kind::Int64)
            .int64_value(&[]);
        let ids = Vec::<i64>::try_from(
            ro.response
                .get(i as i64)
                .narrow(0, 0, n)
                .to_device(tch::Device::Cpu),
        )?;
        line["completion_ids"] = serde_json::json!(ids);
        if let Some(teacher) = &ro.teacher {
            // SDFT: what the teacher read before the response.
            let row = teacher
                .full_ids
                .get(i as i64)
                .narrow(0, 0, teacher.prompt_len);
            let keep = teacher
                .full_mask
                .get(i as i64)
                .narrow(0, 0, teacher.prompt_len);
            let ids = Vec::<i64>::try_from(
                row.masked_select(&keep.to_kind(Kind::Bool))
                    .to_device(tch::Device::Cpu),
            )?;
            line["teacher_prompt"] = serde_json::json!(tok.decode(&ids, true));
        }
        let rewards: serde_json::Map<String, serde_json::Value> = ro
            .source_names
            .iter()
            .zip(&by_source[i * k..(i + 1) * k])
            .map(|(name, &x)| (name.to_string(), serde_json::json!(x)))
            .collect();
        line["rewards"] = serde_json::Value::Object(rewards);
        if let Some(advantages) = &advantages {
            line["advantage"] = serde_json::json!(advantages[i]);
        }
        // The columns a reward function logged for this response (TRL's `log_extra`).
        if let Some(extra) = ro.logged.extra.get(i).filter(|e| !e.is_empty()) {
            line["extra"] = serde_json::Value::Object(extra.clone());
        }
        lines.push_str(&format!("{line}\n"));
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        markdown.push_str(&format!(
            "| {} | {} | {:.3} |\n",
            cell(&prompt),
            cell(text),
            score
        ));
    }
    session.append("samples.jsonl", &lines)?;
    session.text(step, "samples", &markdown);
    Ok(())
}
