//! SDFT, self-distillation fine-tuning (Shenfeld et al. 2026, "Self-Distillation Enables
//! Continual Learning"; TRL's experimental `SDFTTrainer`): `ppo train
//! --advantage-estimator sdft`.
//!
//! Each prompt row carries a `privileged_context` (a demonstration, the answer, feedback).
//! The policy samples responses to the plain prompt, as every rollout does; the teacher is
//! the same kind of model shown the prompt *with* the context (`--teacher-prompt-template`,
//! `{prompt}\n\n{privileged_context}`) and reading the same response. The loss pulls the
//! student's next-token distribution at each response token towards the teacher's: a
//! divergence over the student's top-k tokens (TRL's default), over the whole vocabulary,
//! or on the sampled token alone. No reward is needed.
//!
//! The teacher (`--teacher-model-kind`): `base`, the starting policy (the run's reference:
//! a frozen copy, or the policy with its fresh adapter off); `ema`, that copy moved towards
//! the policy by `--teacher-update-rate` every `--teacher-sync-steps` steps (TR-DPO's
//! update, as the reference's `--sync-ref-model`), or with a fresh LoRA adapter an average
//! of the adapter's weights alone ([`AdapterEma`]); `live`, the policy itself, without
//! gradient.
//!
//! SDPO (Hübotter et al. 2026, "Reinforcement Learning via Self-Distillation"; TRL's
//! experimental `SDPOTrainer`): `--advantage-estimator sdpo` is GRPO whose loss is
//! blended with the same distillation (`--distillation-weight`), the teacher shown, for each
//! response, a successful response of its group ([`sdpo_teacher_prompts`]) and, with
//! `--include-environment-feedback`, the row's `privileged_context` as feedback.
//!
//! The divergence is GKD's generalized JSD (`common::ops`: TRL's `compute_divergence` at
//! α is it at β = α), over the vocabulary or the student's top k, run through the chunked
//! LM heads; [`token_losses`] runs the two forwards. The teacher prompts and the losses are
//! checked against TRL's own code in `ppo/tests/sdft.rs`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use clap::Args;
use common::models::adapter::without_adapters;
use common::models::TokenSpec;
use common::ops::{generalized_jsd, topk_generalized_jsd};
use common::Model;
use data::formats::{Content, Message, PromptExample, PromptFields};
use data::Tokenizer;
use serde::Serialize;
use serde_json::Value;
use tch::{Kind, Tensor};

use common::python_str::python_str;

/// The options of `--advantage-estimator sdft` and `sdpo`, under TRL's `SDFTConfig` and
/// `SDPOConfig` names.
#[derive(Debug, Clone, Args, Serialize)]
pub struct SdftArgs {
    /// SDFT's and SDPO's teacher: base (the starting policy), ema (the starting policy
    /// moved towards the policy by --teacher-update-rate every --teacher-sync-steps steps)
    /// or live (the policy itself, without gradient). TRL's `teacher_model_kind`; default
    /// base with sdft, ema with sdpo (TRL's defaults).
    #[arg(long, value_enum)]
    pub teacher_model_kind: Option<TeacherKind>,
    /// --teacher-model-kind ema: teacher ← rate·policy + (1 − rate)·teacher.
    #[arg(long, default_value_t = 0.05)]
    pub teacher_update_rate: f64,
    /// --teacher-model-kind ema: steps between the teacher's updates.
    #[arg(long, default_value_t = 1)]
    pub teacher_sync_steps: u64,
    /// SDFT: the teacher's prompt, a Python format string over `{prompt}` (the row's
    /// prompt; of a conversation, its last user turn's text, which the teacher's user turn
    /// replaces) and `{privileged_context}` (the row's field; a list of messages gives
    /// their texts a line each).
    #[arg(long, default_value = "{prompt}\n\n{privileged_context}")]
    pub teacher_prompt_template: String,
    /// The per-token distillation objective: topk_logits (a divergence over the student's
    /// --distillation-topk likeliest tokens), full_logits (over the vocabulary) or
    /// sampled_token (reverse KL on the sampled token, as a policy gradient). Default
    /// topk_logits with sdft, sampled_token with sdpo (TRL's defaults).
    #[arg(long, value_enum)]
    pub distillation_mode: Option<DistillationMode>,
    /// α of the divergence: 0 is KL(teacher‖student), 1 KL(student‖teacher), between them
    /// (1 − α)·KL(student‖m) + α·KL(teacher‖m) against the mixture m = (1 − α)·student +
    /// α·teacher. Default 0.5 with sdft, 1 with sdpo (TRL's defaults).
    #[arg(long)]
    pub distillation_alpha: Option<f64>,
    /// topk_logits: how many of the student's likeliest tokens the divergence covers.
    #[arg(long, default_value_t = 100)]
    pub distillation_topk: i64,
    /// topk_logits: add one bucket holding the probability left outside the top k
    /// (instead of renormalising the top k).
    #[arg(long)]
    pub distillation_add_tail: bool,
    /// Where a rollout feeds more than one optimiser step (--ppo-epochs or
    /// --num-minibatches above 1), each token's loss is weighted by π/π_old capped at this
    /// ("none": no weight). TRL's `distillation_is_clip`.
    #[arg(long, default_value = "2", value_parser = parse_clip)]
    pub distillation_is_clip: Clip,
    /// SDFT: sample the responses after the teacher's prompt (the policy shown the
    /// privileged context) instead of the plain prompt; the student still learns on them
    /// after the plain prompt, without the importance weight (TRL's
    /// `generate_from_teacher`). Evaluations sample after the plain prompt.
    #[arg(long)]
    pub generate_from_teacher: bool,
    /// SDFT: the first response tokens left out of the loss (teacher-prompt artifacts).
    #[arg(long, default_value_t = 0)]
    pub num_loss_tokens_to_skip: i64,
    /// SDPO: the loss is (1 − w)·GRPO's policy loss + w·the distillation loss, w in [0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub distillation_weight: f64,
    /// SDPO: a response scoring at least this is a successful demonstration for the others
    /// of its group.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub success_reward_threshold: f64,
    /// SDPO: whether a response's own success may serve as its demonstration (false, TRL's
    /// `dont_reprompt_on_self_success=True`: only the others of its group).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dont_reprompt_on_self_success: bool,
    /// SDPO: the teacher's prompt kept to its last this many tokens.
    #[arg(long, default_value_t = 10240)]
    pub max_reprompt_len: usize,
    /// SDPO: the teacher's prompt over `{prompt}`, `{solution}` and `{feedback}`.
    #[arg(
        long,
        default_value = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
    )]
    pub reprompt_template: String,
    /// SDPO: how a successful response is shown (`{successful_previous_attempt}`).
    #[arg(
        long,
        default_value = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
    )]
    pub solution_template: String,
    /// SDPO: how the row's feedback is shown (`{feedback_raw}`).
    #[arg(
        long,
        default_value = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
    )]
    pub feedback_template: String,
    /// SDPO: show the row's `privileged_context` (a string) to the teacher as feedback.
    #[arg(long)]
    pub include_environment_feedback: bool,
    /// SDPO: the feedback only for responses with no successful demonstration.
    #[arg(long)]
    pub environment_feedback_only_without_solution: bool,
    /// SDPO: take `<think>…</think>` out of a demonstration.
    #[arg(long)]
    pub remove_thinking_from_demonstration: bool,
}

/// `--distillation-is-clip`: a cap, or none.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Clip(pub Option<f64>);

fn parse_clip(s: &str) -> Result<Clip, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Clip(None));
    }
    let c: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number or none"))?;
    Ok(Clip(Some(c)))
}

/// `--teacher-model-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TeacherKind {
    Base,
    Ema,
    Live,
}

/// `--distillation-mode`, under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DistillationMode {
    #[value(name = "topk_logits")]
    TopkLogits,
    #[value(name = "full_logits")]
    FullLogits,
    #[value(name = "sampled_token")]
    SampledToken,
}

/// The self-distillation settings of a run, its estimator's defaults filled in.
#[derive(Debug, Clone, Copy)]
pub struct Resolved {
    pub teacher: TeacherKind,
    pub mode: DistillationMode,
    pub alpha: f64,
}

impl SdftArgs {
    /// The options with SDFT's defaults (`sdpo`: false) or SDPO's.
    pub fn resolved(&self, sdpo: bool) -> Resolved {
        Resolved {
            teacher: self.teacher_model_kind.unwrap_or(match sdpo {
                true => TeacherKind::Ema,
                false => TeacherKind::Base,
            }),
            mode: self.distillation_mode.unwrap_or(match sdpo {
                true => DistillationMode::SampledToken,
                false => DistillationMode::TopkLogits,
            }),
            alpha: self
                .distillation_alpha
                .unwrap_or(if sdpo { 1.0 } else { 0.5 }),
        }
    }

    /// What can be wrong with the options alone, in one line each (`sdpo`: with SDPO's
    /// defaults).
    pub fn problems(&self, sdpo: bool) -> Vec<(bool, &'static str)> {
        let r = self.resolved(sdpo);
        let fills = |t: &str, names: &[&str]| {
            let values: Vec<(&str, &str)> = names.iter().map(|n| (*n, "")).collect();
            format_named(t, &values).is_ok()
        };
        vec![
            (
                (0.0..=1.0).contains(&r.alpha),
                "--distillation-alpha must be in [0, 1]",
            ),
            (
                (0.0..=1.0).contains(&self.distillation_weight),
                "--distillation-weight must be in [0, 1]",
            ),
            (
                fills(&self.reprompt_template, &["prompt", "solution", "feedback"])
                    && fills(&self.solution_template, &["successful_previous_attempt"])
                    && fills(&self.feedback_template, &["feedback_raw"]),
                "--reprompt-template fills in {prompt}, {solution} and {feedback}, --solution-template {successful_previous_attempt}, --feedback-template {feedback_raw}, nothing else (write a literal brace as {{ or }})",
            ),
            (self.max_reprompt_len > 0, "--max-reprompt-len must be at least 1"),
            (
                r.mode != DistillationMode::SampledToken || r.alpha == 1.0,
                "--distillation-mode sampled_token is the reverse KL on the sampled token: it needs --distillation-alpha 1",
            ),
            (
                self.distillation_topk >= 1,
                "--distillation-topk must be at least 1",
            ),
            (
                self.distillation_is_clip.0.is_none_or(|c| c > 0.0 && c.is_finite()),
                "--distillation-is-clip must be > 0 (or none)",
            ),
            (
                self.num_loss_tokens_to_skip >= 0,
                "--num-loss-tokens-to-skip must be ≥ 0",
            ),
            (
                self.teacher_update_rate > 0.0 && self.teacher_update_rate <= 1.0,
                "--teacher-update-rate must be in (0, 1]",
            ),
            (
                self.teacher_sync_steps > 0,
                "--teacher-sync-steps must be at least 1",
            ),
            (
                fills(&self.teacher_prompt_template, &["prompt", "privileged_context"]),
                "--teacher-prompt-template: only {prompt} and {privileged_context} may be filled in (write a literal brace as {{ or }})",
            ),
        ]
    }
}

/// Python's `template.format(prompt=..., privileged_context=...)`.
pub fn format_template(template: &str, prompt: &str, context: &str) -> Result<String> {
    format_named(
        template,
        &[("prompt", prompt), ("privileged_context", context)],
    )
}

/// Python's `template.format(**values)`: `{{` and `}}` are braces, `{name}` the value
/// named, in one pass (a value's own braces are left as they are); any other name is an
/// error.
pub fn format_named(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            bail!("a single '}}' in the template");
        }
        let end = tail
            .find('}')
            .ok_or_else(|| anyhow::anyhow!("a '{{' never closed in the template"))?;
        let name = &tail[1..end];
        match values.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => out.push_str(value),
            None => bail!("the template names '{name}'"),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A row's `privileged_context` as text, as TRL's `_stringify_privileged_context`: a string
/// as it is, a list of messages their texts a line each, anything else Python's `str()`.
pub fn context_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.first().is_some_and(Value::is_object) => items
            .iter()
            .map(|m| match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                    .map(|p| p.get("text").and_then(Value::as_str).unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join(" "),
                Some(other) => python_str(other),
                None => String::new(),
            })
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
        other => python_str(other),
    }
}

/// The teacher's prompt for a row (`prompt` as given, `fields` its other fields), as TRL's
/// `DemonstrationTeacherContextBuilder`: a text prompt through the template; a
/// conversation with its last turn (which must be the user's) replaced by a user turn of
/// the template over that turn's text. The error says which field is wrong.
pub fn teacher_prompt(
    prompt: &PromptExample,
    fields: &PromptFields,
    template: &str,
) -> std::result::Result<PromptExample, (&'static str, String)> {
    let context = match fields.get("privileged_context") {
        None | Some(Value::Null) => {
            return Err((
                "privileged_context",
                "missing: --advantage-estimator sdft shows it to the teacher".into(),
            ))
        }
        Some(v) => context_text(v),
    };
    with_user_text(prompt, |text| format_template(template, text, &context))
        .map_err(|e| ("messages", e.to_string()))
}

/// The teacher prompt of each prompt row (as read, with its other fields), tokenized and
/// cut to its last `max_prompt_length` tokens as the prompts are. A row without a
/// `privileged_context` stops the run naming its file, line and field.
pub fn teacher_prompts(
    rows: &data::rows::Rows<(PromptExample, PromptFields)>,
    template: &str,
    tok: &Tokenizer,
    max_prompt_length: usize,
) -> Result<Vec<Vec<i64>>> {
    let mut out = Vec::with_capacity(rows.len());
    for (i, (prompt, fields)) in rows.iter().enumerate() {
        let example =
            teacher_prompt(prompt, fields, template).map_err(|(f, m)| rows.error(i, Some(f), m))?;
        let ids = tok.encode_prompt(&example).map_err(|e| rows.locate(i, e))?;
        out.push(ids[ids.len().saturating_sub(max_prompt_length)..].to_vec());
    }
    Ok(out)
}

/// The teacher's inputs for a rollout: its prompts (left-padded) and the same responses.
pub struct TeacherInputs {
    pub full_ids: Tensor,
    pub full_mask: Tensor,
    pub prompt_len: i64,
    /// SDPO: 1 on the rows the teacher was shown something for (`[B]`, f32); the others
    /// are left out of the distillation.
    pub active: Option<Tensor>,
    /// SDPO: what the prompts were built from, this rank's.
    pub counts: Option<SdpoCounts>,
}

impl TeacherInputs {
    /// `prompts` (one per rollout row) before the rollout's responses (`response`,
    /// `response_mask`, right-padded).
    pub fn new(
        prompts: &[&[i64]],
        pad_id: i64,
        (response, response_mask): (&Tensor, &Tensor),
    ) -> Self {
        let batch = data::prompts::collate_left(prompts, pad_id, response.device());
        let prompt_len = batch.input_ids.size()[1];
        TeacherInputs {
            full_ids: Tensor::cat(&[batch.input_ids, response.shallow_clone()], 1),
            full_mask: Tensor::cat(
                &[
                    batch.attention_mask.shallow_clone(),
                    response_mask.to_kind(batch.attention_mask.kind()),
                ],
                1,
            ),
            prompt_len,
            active: None,
            counts: None,
        }
    }

    /// Rows `idx` of the inputs.
    pub fn pick(&self, idx: &Tensor) -> TeacherInputs {
        TeacherInputs {
            full_ids: self.full_ids.index_select(0, idx),
            full_mask: self.full_mask.index_select(0, idx),
            prompt_len: self.prompt_len,
            active: self.active.as_ref().map(|a| a.index_select(0, idx)),
            counts: None,
        }
    }

    /// `mask` `[B, N]` less the rows the teacher was shown nothing for.
    pub fn loss_mask(&self, mask: &Tensor) -> Tensor {
        match &self.active {
            Some(active) => mask * active.unsqueeze(1).to_kind(mask.kind()),
            None => mask.shallow_clone(),
        }
    }
}

/// What SDPO's teacher prompts of a rollout were built from (TRL's
/// `self_distillation/*_fraction` metrics, as counts to sum over ranks).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SdpoCounts {
    pub rows: f64,
    pub groups: f64,
    /// Groups with a response at or above the threshold.
    pub success_groups: f64,
    /// Responses shown a successful demonstration.
    pub with_solution: f64,
    /// Responses whose row has feedback, and those shown it.
    pub feedback_available: f64,
    pub feedback_used: f64,
    /// Responses shown anything: distilled.
    pub active: f64,
}

impl SdpoCounts {
    pub fn as_array(&self) -> [f64; 7] {
        [
            self.rows,
            self.groups,
            self.success_groups,
            self.with_solution,
            self.feedback_available,
            self.feedback_used,
            self.active,
        ]
    }

    /// TRL's metrics of the counts (summed over ranks).
    pub fn scalars(c: [f64; 7]) -> Vec<(&'static str, f64)> {
        let [rows, groups, success_groups, with_solution, available, used, active] = c;
        let (rows, groups) = (rows.max(1.0), groups.max(1.0));
        vec![
            (
                "self_distillation/success_group_fraction",
                success_groups / groups,
            ),
            (
                "self_distillation/success_sample_fraction",
                with_solution / rows,
            ),
            (
                "self_distillation/feedback_available_fraction",
                available / rows,
            ),
            ("self_distillation/feedback_used_fraction", used / rows),
            ("self_distillation/reprompt_sample_fraction", active / rows),
        ]
    }
}

/// SDPO's teacher prompts for a rollout of `group` responses per prompt (TRL's
/// `SuccessfulRolloutTeacherContextBuilder`): for each response, the first other response
/// of its group (or any, with `--dont-reprompt-on-self-success false`) scoring at least
/// `--success-reward-threshold` is its demonstration (`demos`: the responses' texts), and
/// with `--include-environment-feedback` its row's `privileged_context` (a non-blank
/// string) is feedback; the prompt is `--reprompt-template` over them (of a conversation,
/// its last user turn's text, that turn replaced). A response given neither keeps its own
/// prompt and is not distilled (`false`).
pub fn sdpo_teacher_prompts(
    (prompts, fields): (&[&PromptExample], &[&PromptFields]),
    (scores, demos): (&[f64], &[String]),
    group: usize,
    args: &SdftArgs,
) -> Result<(Vec<PromptExample>, Vec<bool>, SdpoCounts)> {
    let n = prompts.len();
    let group = group.max(1);
    let success = |j: &usize| scores[*j] >= args.success_reward_threshold;
    let mut counts = SdpoCounts {
        rows: n as f64,
        groups: (n / group) as f64,
        ..SdpoCounts::default()
    };
    let think = regex::Regex::new(r"(?s)<think>.*?</think>").expect("a valid pattern");
    let (mut out, mut active) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let start = i / group * group;
        let range = start..(start + group).min(n);
        if i == start && range.clone().any(|j| success(&j)) {
            counts.success_groups += 1.0;
        }
        let demo = range
            .filter(|&j| !(args.dont_reprompt_on_self_success && j == i))
            .find(success);
        let feedback = match fields[i].get("privileged_context") {
            Some(Value::String(f)) if !f.trim().is_empty() => Some(f.as_str()),
            _ => None,
        };
        counts.feedback_available += f64::from(u8::from(feedback.is_some()));
        let feedback = feedback.filter(|_| {
            args.include_environment_feedback
                && !(args.environment_feedback_only_without_solution && demo.is_some())
        });
        if demo.is_none() && feedback.is_none() {
            out.push(prompts[i].clone());
            active.push(false);
            continue;
        }
        counts.with_solution += f64::from(u8::from(demo.is_some()));
        counts.feedback_used += f64::from(u8::from(feedback.is_some()));
        counts.active += 1.0;
        let solution = match demo {
            Some(j) => {
                let text = match args.remove_thinking_from_demonstration {
                    true => think.replace_all(&demos[j], "").trim().to_string(),
                    false => demos[j].clone(),
                };
                format_named(
                    &args.solution_template,
                    &[("successful_previous_attempt", &text)],
                )?
            }
            None => String::new(),
        };
        let feedback = match feedback {
            Some(f) => format_named(&args.feedback_template, &[("feedback_raw", f)])?,
            None => String::new(),
        };
        let fill = |prompt: &str| {
            format_named(
                &args.reprompt_template,
                &[
                    ("prompt", prompt),
                    ("solution", &solution),
                    ("feedback", &feedback),
                ],
            )
        };
        out.push(with_user_text(prompts[i], fill)?);
        active.push(true);
    }
    Ok((out, active, counts))
}

/// Whether a teacher prompt can be made of `prompt`: a text, or a conversation ending with
/// a user turn (which the teacher's replaces).
pub fn rewritable(prompt: &PromptExample) -> bool {
    match &prompt.prompt {
        Content::Text(_) => true,
        Content::Messages(m) => m.last().is_some_and(|l| l.role == "user"),
    }
}

/// `prompt` with its text through `fill`: a text prompt's whole text; a conversation's last
/// turn (the user's) replaced by a user turn of its text filled.
fn with_user_text(
    prompt: &PromptExample,
    fill: impl Fn(&str) -> Result<String>,
) -> Result<PromptExample> {
    let content = match &prompt.prompt {
        Content::Text(t) => Content::Text(fill(t)?),
        Content::Messages(m) => {
            let Some(last) = m.last().filter(|l| l.role == "user") else {
                bail!("the teacher's prompt replaces the conversation's last user turn: the conversation must end with one");
            };
            let mut messages = m[..m.len() - 1].to_vec();
            messages.push(Message::new("user", &fill(&last.content)?));
            Content::Messages(messages)
        }
    };
    Ok(PromptExample {
        prompt: content,
        template: prompt.template.clone(),
    })
}

/// Which weights give the teacher's logits.
#[derive(Clone, Copy)]
pub enum Teacher<'a> {
    /// A frozen (or EMA-moved) copy of the starting policy.
    Copy(&'a Model),
    /// The policy with its fresh adapter off: the starting policy.
    AdapterOff,
    /// The policy with its LoRA adapter's EMA in place of the adapter (`ema` with a fresh
    /// adapter).
    AdapterEma(&'a AdapterEma),
    /// The policy as it is now (`--teacher-model-kind live`).
    Live,
}

/// One micro-batch's SDFT loss, `[B, N]` over response tokens.
pub struct TokenLosses {
    /// The per-token loss with the student's gradient (0 off `loss_mask`), the
    /// importance weight applied.
    pub loss: Tensor,
    /// The student's log-probs of the sampled tokens (with the gradient: SDPO's policy loss
    /// takes them) and its entropies (detached).
    pub logprobs: Tensor,
    pub entropy: Tensor,
}

/// The student's (the policy's, with gradient) and the teacher's (without) next-token
/// distributions at the responses of one micro-batch, and the per-token loss on
/// `loss_mask`'s tokens. `old_logprobs`: the rollout's log-probs, for the importance
/// weight, when the rollout feeds more than one optimiser step.
///
/// The LM heads run a chunk of positions at a time ([`Model::token_outputs`],
/// [`Model::token_outputs_against`]), no `[B, N, V]` logits kept, for `sampled_token` and,
/// against a teacher of its own weights or the live policy, the divergences; against the
/// policy with its adapter off or its EMA adapter in (whose head is then the other one, or
/// whose weights must be back before the student's forward) they take the whole
/// `[B, N, V]`. The teacher's side runs first, before the student's graph exists.
pub fn token_losses(
    (policy, teacher): (&Model, Teacher),
    (ids, mask, prompt_len): (&Tensor, &Tensor, i64),
    teacher_inputs: &TeacherInputs,
    (loss_mask, old_logprobs): (&Tensor, Option<&Tensor>),
    (args, settings, temperature): (&SdftArgs, Resolved, f64),
) -> TokenLosses {
    let n = ids.size()[1] - prompt_len;
    let response = ids.narrow(1, prompt_len, n);
    let t = teacher_inputs;
    // What the teacher's weights give, without gradient.
    let as_teacher = |f: &dyn Fn(&Model) -> Tensor| {
        tch::no_grad(|| match teacher {
            Teacher::Copy(m) => f(m),
            Teacher::AdapterOff => without_adapters(|| f(policy)),
            Teacher::AdapterEma(ema) => ema.teaching(policy, || f(policy)),
            Teacher::Live => f(policy),
        })
    };
    let teacher_h = as_teacher(&|m| {
        m.hidden(&t.full_ids, &t.full_mask, None)
            .narrow(1, t.prompt_len - 1, n)
    });
    let logits = |m: &Model, h: &Tensor| m.head_output(h).to_kind(Kind::Float) / temperature;
    let plain = TokenSpec {
        temperature,
        ..TokenSpec::default()
    };
    // The teacher's log-probs of the sampled tokens, or (where its head cannot run beside the
    // student's in chunks) its whole logits.
    let chunked = matches!(teacher, Teacher::Copy(_) | Teacher::Live);
    let theirs = match settings.mode {
        DistillationMode::SampledToken => Some(as_teacher(&|m| {
            m.token_outputs(&teacher_h, &response, plain).logprobs
        })),
        _ if chunked => None,
        _ => Some(as_teacher(&|m| logits(m, &teacher_h))),
    };
    let student_h = policy.hidden(ids, mask, None).narrow(1, prompt_len - 1, n);
    let spec = TokenSpec {
        entropy: true,
        ..plain
    };
    let alpha = settings.alpha;
    let (logprobs, entropy, divergence) = match (settings.mode, theirs) {
        (DistillationMode::SampledToken, Some(theirs)) => {
            let out = policy.token_outputs(&student_h, &response, spec);
            let loss = sampled_token_loss(&out.logprobs, &theirs);
            (out.logprobs, out.entropy.expect("asked for"), loss)
        }
        (mode, None) => {
            let model = match teacher {
                Teacher::Copy(m) => m,
                _ => policy,
            };
            let topk = mode == DistillationMode::TopkLogits;
            let spec = TokenSpec {
                jsd: Some(alpha),
                jsd_topk: topk.then_some((args.distillation_topk, args.distillation_add_tail)),
                ..spec
            };
            let out =
                policy.token_outputs_against((&student_h, &response), (model, &teacher_h), spec);
            let jsd = out.jsd.expect("asked for");
            (out.logprobs, out.entropy.expect("asked for"), jsd)
        }
        (mode, Some(theirs)) => {
            let student = logits(policy, &student_h);
            let log_p = student.log_softmax(-1, Kind::Float);
            let logprobs = log_p
                .gather(-1, &response.unsqueeze(-1), false)
                .squeeze_dim(-1);
            let entropy = tch::no_grad(|| {
                -(log_p.exp() * &log_p).sum_dim_intlist([-1].as_slice(), false, Kind::Float)
            });
            let divergence = match mode {
                DistillationMode::TopkLogits => topk_generalized_jsd(
                    &student,
                    &theirs,
                    (args.distillation_topk, alpha),
                    args.distillation_add_tail,
                ),
                _ => generalized_jsd(&student, &theirs, alpha),
            };
            (logprobs, entropy, divergence)
        }
    };
    let weight = match (old_logprobs, args.distillation_is_clip.0) {
        (Some(old), Some(clip)) => importance_weight(&logprobs, old, clip),
        _ => Tensor::ones_like(&divergence),
    };
    let mask = loss_mask.to_kind(Kind::Float);
    TokenLosses {
        loss: &divergence * weight * &mask,
        logprobs,
        entropy: entropy.detach(),
    }
}

/// SDFT's and SDPO's EMA teacher of a policy trained through LoRA alone (TRL's
/// `PEFTAdapterEMACallback`): a second set of the adapter's weights, zeros at first (the
/// teacher starts as the base model), moved towards the policy's as
/// `teacher ← (1 − rate)·teacher + rate·policy` every --teacher-sync-steps steps. The
/// teacher is the policy with these weights in place of its adapter's: no second base.
pub struct AdapterEma {
    weights: BTreeMap<String, Tensor>,
}

impl AdapterEma {
    /// The teacher's adapter in a checkpoint directory.
    pub const FILE: &'static str = "teacher_adapter.safetensors";

    /// Zeros for each of `policy`'s trained tensors, which must all be LoRA's; else the
    /// name of one that is not.
    pub fn new(policy: &Model) -> std::result::Result<Self, String> {
        let mut weights = BTreeMap::new();
        for (name, t) in policy.named_tensors() {
            if !t.requires_grad() {
                continue;
            }
            if !name.contains("lora_") {
                return Err(name);
            }
            weights.insert(name, t.detach().zeros_like());
        }
        Ok(AdapterEma { weights })
    }

    /// `teacher ← (1 − rate)·teacher + rate·policy`.
    pub fn update(&self, policy: &Model, rate: f64) {
        let _guard = tch::no_grad_guard();
        let named = policy.named_tensors();
        for (name, e) in &self.weights {
            let _ = e.shallow_clone().lerp_(&named[name], rate);
        }
    }

    /// `f` run with the teacher's weights in the policy's adapter (without gradient), the
    /// policy's put back after. No graph of the policy's may be alive across it.
    pub fn teaching<T>(&self, policy: &Model, f: impl FnOnce() -> T) -> T {
        let _guard = tch::no_grad_guard();
        let named = policy.named_tensors();
        let kept: Vec<(Tensor, Tensor)> = self
            .weights
            .iter()
            .map(|(name, e)| {
                let mut p = named[name].shallow_clone();
                let own = p.copy();
                p.copy_(e);
                (p, own)
            })
            .collect();
        let out = f();
        for (mut p, own) in kept {
            p.copy_(&own);
        }
        out
    }

    /// Writes the teacher's adapter into checkpoint directory `dir`.
    pub fn save(&self, dir: &std::path::Path) -> common::Result<()> {
        common::checkpoint::save_file(&self.weights, &dir.join(Self::FILE))
    }

    /// Reads the teacher's adapter back from checkpoint directory `dir`, when it holds one.
    pub fn restore(&self, dir: &std::path::Path) -> common::Result<bool> {
        let path = dir.join(Self::FILE);
        if !path.exists() {
            return Ok(false);
        }
        let vars: std::collections::HashMap<String, Tensor> = self
            .weights
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        common::checkpoint::load_file(&vars, &path)?;
        Ok(true)
    }
}

/// The sampled-token objective (TRL's `compute_sampled_token_self_distillation_loss`):
/// `sg(log π_s − log π_t)·log π_s` on each sampled token, whose gradient is the reverse
/// KL's policy gradient.
pub fn sampled_token_loss(student: &Tensor, teacher: &Tensor) -> Tensor {
    (student - teacher).detach() * student
}

/// π/π_old of each token, capped at `clip`, without gradient (TRL's
/// `apply_importance_sampling_clipping`; the log-ratio held in [−20, 20]).
pub fn importance_weight(logprobs: &Tensor, old: &Tensor, clip: f64) -> Tensor {
    (logprobs - old)
        .detach()
        .clamp(-20.0, 20.0)
        .exp()
        .clamp_max(clip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6 * b.abs().max(1.0)
    }

    #[test]
    fn templates_fill_in_one_pass_as_python_format() {
        let t = "{prompt}\n\n{privileged_context}";
        assert_eq!(format_template(t, "a {x}", "b").unwrap(), "a {x}\n\nb");
        assert_eq!(
            format_template("{{lit}} {prompt}", "p", "c").unwrap(),
            "{lit} p"
        );
        assert!(format_template("{answer}", "p", "c").is_err());
        assert!(format_template("{prompt", "p", "c").is_err());
        assert!(format_template("a } b", "p", "c").is_err());
    }

    #[test]
    fn contexts_read_as_trls() {
        let v: Value = serde_json::json!([
            {"role": "assistant", "content": "12 rabbits"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]);
        assert_eq!(context_text(&v), "12 rabbits\na b");
        assert_eq!(context_text(&serde_json::json!(35)), "35");
        assert_eq!(context_text(&serde_json::json!({"x": true})), "{'x': True}");
    }

    #[test]
    fn conversations_get_their_last_user_turn_replaced() {
        let prompt = PromptExample {
            prompt: Content::Messages(vec![
                Message::new("system", "be brief"),
                Message::new("user", "heads 35, legs 94?"),
            ]),
            template: Default::default(),
        };
        let mut fields = PromptFields::new();
        let t = "{prompt}\n\n{privileged_context}";
        assert_eq!(
            teacher_prompt(&prompt, &fields, t).unwrap_err().0,
            "privileged_context"
        );
        fields.insert(
            "privileged_context".into(),
            "12 rabbits, 23 chickens".into(),
        );
        let got = teacher_prompt(&prompt, &fields, t).unwrap();
        let Content::Messages(m) = got.prompt else {
            panic!("a conversation")
        };
        assert_eq!(m[0], Message::new("system", "be brief"));
        assert_eq!(
            m[1],
            Message::new("user", "heads 35, legs 94?\n\n12 rabbits, 23 chickens")
        );
        let ends_with_assistant = PromptExample {
            prompt: Content::Messages(vec![Message::new("assistant", "hi")]),
            template: Default::default(),
        };
        assert_eq!(
            teacher_prompt(&ends_with_assistant, &fields, t)
                .unwrap_err()
                .0,
            "messages"
        );
    }

    /// The divergence (GKD's generalized JSD, which is TRL's `compute_divergence` at α = β)
    /// against its definition on two 3-token distributions.
    #[test]
    fn divergences_are_the_kl_and_the_mixture_jsd() {
        let p = [0.7f64, 0.2, 0.1];
        let q = [0.3f64, 0.3, 0.4];
        let lp = |d: &[f64]| Tensor::from_slice(&d.iter().map(|x| x.ln()).collect::<Vec<_>>());
        let kl =
            |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * (x / y).ln()).sum() };
        let (s, t) = (lp(&p), lp(&q));
        let d = |alpha| generalized_jsd(&s, &t, alpha).double_value(&[]);
        assert!(close(d(0.0), kl(&q, &p)));
        assert!(close(d(1.0), kl(&p, &q)));
        for alpha in [0.25, 0.5, 0.9] {
            let m: Vec<f64> = p
                .iter()
                .zip(&q)
                .map(|(a, b)| (1.0 - alpha) * a + alpha * b)
                .collect();
            let want = (1.0 - alpha) * kl(&p, &m) + alpha * kl(&q, &m);
            assert!(close(d(alpha), want), "α {alpha}: {} vs {want}", d(alpha));
        }
        // Top-k on the student's two likeliest tokens, renormalised: p → (7/9, 2/9), q's
        // same tokens → (1/2, 1/2); with the tail bucket: (0.7, 0.2, 0.1), (0.3, 0.3, 0.4).
        let logits = |d: &[f64]| lp(d) + 3.0;
        let top = topk_generalized_jsd(&logits(&p), &logits(&q), (2, 1.0), false).double_value(&[]);
        assert!(close(top, kl(&[7.0 / 9.0, 2.0 / 9.0], &[0.5, 0.5])));
        let tail = topk_generalized_jsd(&logits(&p), &logits(&q), (2, 1.0), true).double_value(&[]);
        assert!(
            close(tail, kl(&[0.7, 0.2, 0.1], &[0.3, 0.3, 0.4])),
            "{tail}"
        );
        // k past the vocabulary covers all of it.
        let all =
            topk_generalized_jsd(&logits(&p), &logits(&q), (50, 0.5), false).double_value(&[]);
        assert!(close(all, d(0.5)));
    }

    /// SDPO's prompts: the first other success of the group; none for a group without one
    /// (or whose only success is the response itself); the feedback only when asked for.
    #[test]
    fn sdpo_prompts_show_the_groups_first_other_success() {
        let text = |t: &str| PromptExample {
            prompt: Content::Text(t.into()),
            template: Default::default(),
        };
        let (p, q) = (text("P"), text("Q"));
        let prompts = [&p, &p, &p, &q, &q, &q];
        let mut with_feedback = PromptFields::new();
        with_feedback.insert("privileged_context".into(), "too short".into());
        let none = PromptFields::new();
        let fields = [
            &none,
            &none,
            &none,
            &with_feedback,
            &with_feedback,
            &with_feedback,
        ];
        let scores = [0.0, 1.0, 2.0, 1.0, 0.0, 0.0];
        let demos: Vec<String> = ["a", "<think>x\ny</think> b ", "c", "d", "e", "f"]
            .map(String::from)
            .to_vec();
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: SdftArgs,
        }
        let mut args = <Defaults as clap::Parser>::parse_from(["sdpo"]).args;
        args.reprompt_template = "{prompt}|{solution}|{feedback}".into();
        args.solution_template = "S:{successful_previous_attempt}".into();
        args.feedback_template = "F:{feedback_raw}".into();
        let shown = |args: &SdftArgs| {
            let (out, active, counts) =
                sdpo_teacher_prompts((&prompts, &fields), (&scores, &demos), 3, args).unwrap();
            let texts: Vec<String> = out
                .iter()
                .map(|e| match &e.prompt {
                    Content::Text(t) => t.clone(),
                    _ => unreachable!(),
                })
                .collect();
            (texts, active, counts)
        };
        let (texts, active, counts) = shown(&args);
        assert_eq!(
            texts,
            [
                "P|S:<think>x\ny</think> b |",
                "P|S:c|",
                "P|S:<think>x\ny</think> b |",
                "Q",
                "Q|S:d|",
                "Q|S:d|"
            ]
        );
        assert_eq!(active, [true, true, true, false, true, true]);
        assert_eq!(counts.as_array(), [6.0, 2.0, 2.0, 5.0, 3.0, 0.0, 5.0]);
        args.include_environment_feedback = true;
        args.remove_thinking_from_demonstration = true;
        args.dont_reprompt_on_self_success = false;
        let (texts, active, counts) = shown(&args);
        assert_eq!(texts[0], "P|S:b|");
        assert_eq!(texts[3], "Q|S:d|F:too short");
        assert_eq!(active, [true; 6]);
        assert_eq!(counts.feedback_used, 3.0);
        args.environment_feedback_only_without_solution = true;
        assert_eq!(shown(&args).0[3], "Q|S:d|");
    }

    #[test]
    fn importance_weights_are_capped_ratios() {
        let new = Tensor::from_slice(&[0.0f32, 1.0, -30.0]);
        let old = Tensor::from_slice(&[0.0f32, 0.0, 0.0]);
        let w = Vec::<f32>::try_from(importance_weight(&new, &old, 2.0)).unwrap();
        assert_eq!(w[0], 1.0);
        assert_eq!(w[1], 2.0);
        assert!((w[2] as f64 - (-20f64).exp()).abs() < 1e-12);
    }
}
