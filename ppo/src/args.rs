//! The options of `ppo train` (each also settable from the `--config` TOML file).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use common::cli::{
    require, AdapterArgs, DecodeArgs, DeviceArgs, MemoryArgs, OptimArgs, RunArgs, SyncRefArgs,
};
use serde::Serialize;

use crate::math::{
    AdaptiveEntropy, AdvantageEstimator, Clip, EntropyController, ImportanceSampling, KlEstimator,
    LossAggregation, Objective, PairLoss, RewardScale, SamplingCorrection, Surrogate,
};

/// `--advantage-estimator`: the names users give; [`TrainArgs::advantage_estimator`] turns
/// one into the [`AdvantageEstimator`] with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EstimatorName {
    Gae,
    Grpo,
    DrGrpo,
    Rloo,
    ReinforcePlusPlus,
    OnlineDpo,
    A2po,
    Sdft,
    Sdpo,
}

impl EstimatorName {
    const ALL: [(&'static str, EstimatorName); 9] = [
        ("gae", EstimatorName::Gae),
        ("grpo", EstimatorName::Grpo),
        ("dr-grpo", EstimatorName::DrGrpo),
        ("rloo", EstimatorName::Rloo),
        ("reinforce-plus-plus", EstimatorName::ReinforcePlusPlus),
        ("online-dpo", EstimatorName::OnlineDpo),
        ("a2po", EstimatorName::A2po),
        ("sdft", EstimatorName::Sdft),
        ("sdpo", EstimatorName::Sdpo),
    ];
}

impl std::str::FromStr for EstimatorName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, e)| *e).ok_or_else(|| {
            format!("'{s}' is not an advantage estimator (expected gae, grpo, dr-grpo, rloo, reinforce-plus-plus, online-dpo, a2po, sdft or sdpo)")
        })
    }
}

impl std::fmt::Display for EstimatorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::ALL.iter().find(|(_, e)| e == self).unwrap().0)
    }
}

/// `--policy-loss`: the names users give; [`TrainArgs::surrogate`] turns one into the
/// [`Objective`] with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PolicyLossName {
    /// PPO's clipped surrogate.
    Clip,
    /// CISPO: the importance weight capped at --cliprange-high, no gradient lost.
    Cispo,
    /// SAPO: a soft, temperature-controlled gate in place of the clip.
    Sapo,
    /// VESPO: a Gamma weight of the sequence's importance weight scales the policy
    /// gradient, in place of the clip.
    Vespo,
    /// GMPO: the geometric mean of each response's token weights, clipped in log space.
    Gmpo,
}

/// `--multi-objective-aggregation`: how GRPO combines several reward sources (TRL's
/// `multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MultiObjective {
    /// The weighted sum of the sources, then GRPO's group normalisation.
    #[default]
    SumThenNormalize,
    /// GDPO: each source normalised within its group, the weighted sum then normalised
    /// over the batch.
    NormalizeThenSum,
}

/// `--reward-rule`: a reward computed by a rule over the response and the prompt row
/// (`exact-answer`) or over the response alone (the others: the reward functions TRL ships
/// in `trl.rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RewardRule {
    /// 1 when the answer extracted from the response equals the row's `answer`, else 0.
    ExactAnswer,
    /// DAPO's soft overlong punishment (TRL's `get_soft_overlong_punishment`): 0 up to
    /// --response-length − --soft-punish-cache tokens, then falling linearly to −1.
    SoftOverlong,
    /// The share of repeated token n-grams times --repetition-max-penalty (TRL's
    /// `get_repetition_penalty_reward`).
    Repetition,
    /// 1 for a response that opens with one `<think>…</think>` block, else 0 (TRL's
    /// `think_format_reward`).
    ThinkFormat,
    /// 1 for a response that --format-pattern matches from its start (Python's
    /// `re.match`, as TRL's and Open-R1's format rewards use it), else 0.
    Format,
    /// exact-answer's verdict scaled by the response's length on a cosine schedule (TRL's
    /// `get_cosine_scaled_reward`): short correct answers earn most, short wrong ones lose
    /// most.
    CosineScaled,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct TrainArgs {
    /// The SFT policy (Hugging Face directory); also the frozen reference.
    #[arg(long)]
    pub policy: PathBuf,
    /// The reward model from `reward train` (its normalisation is applied), or any
    /// sequence classifier, of the policy's family or another. Repeat it for several (at
    /// most 8), each a reward source: `reward_model`, `reward_model_2`, … in the metrics.
    /// Optional when another reward source is given.
    #[arg(long)]
    #[serde(serialize_with = "one_or_list", skip_serializing_if = "Vec::is_empty")]
    pub reward_model: Vec<PathBuf>,
    /// Weight of each reward model's score in the summed reward, in the order of the
    /// models (one per model; default 1 each).
    #[arg(long)]
    #[serde(serialize_with = "weights_one_or_list")]
    pub reward_model_weight: Vec<f64>,
    /// A reward computed by a rule, repeatable: exact-answer (the answer extracted from
    /// the response against the prompt row's "answer" field), soft-overlong (DAPO's length
    /// penalty), repetition (repeated n-grams), think-format (a leading think block),
    /// format (--format-pattern matches) or cosine-scaled (exact-answer scaled by length).
    #[arg(long, value_enum)]
    pub reward_rule: Vec<RewardRule>,
    /// Weight of each rule's reward in the summed reward, in the order of the rules (one
    /// per rule; default 1 each).
    #[arg(long)]
    pub reward_rule_weight: Vec<f64>,
    /// A reward program: `sh -c CMD` started once, one JSON line per response on its stdin
    /// ({"prompt", "response", …the prompt row's fields}), one {"reward": x} line back each
    /// (x null where the reward does not apply to the response, as TRL's `None`). Repeat
    /// it for several (at most 8, as TRL's list of reward functions), each a reward
    /// source: `reward_command`, `reward_command_2`, … in the metrics.
    #[arg(long)]
    #[serde(serialize_with = "one_or_list", skip_serializing_if = "Vec::is_empty")]
    pub reward_command: Vec<String>,
    /// Weight of each command's reward in the summed reward, in the order of the commands
    /// (one per command; default 1 each).
    #[arg(long)]
    #[serde(serialize_with = "weights_one_or_list")]
    pub reward_command_weight: Vec<f64>,
    /// Seconds to wait for each answer of --reward-command.
    #[arg(long, default_value_t = 60.0)]
    pub reward_timeout: f64,
    /// Tools the responses may call (TRL's `GRPOTrainer(tools=…)`): `sh -c CMD` started
    /// once, one {"name", "arguments"} JSON line per call on its stdin, one {"result": …} or
    /// {"error": "…"} line back each. A response that calls tools (in its chat template's
    /// tool-call form) gets their results appended as `tool` messages and continues;
    /// the results' tokens are kept out of every loss. Critic-free estimators only.
    #[arg(long, conflicts_with = "environment_command")]
    pub tool_command: Option<String>,
    /// Tools with state (TRL's `GRPOTrainer(environment_factory=…)`): `sh -c CMD` started
    /// once, holding one environment per response. It gets {"reset": E, "prompt", …the
    /// row's fields} before a batch is sampled (answer {}, or {"observation": "…"}: text
    /// appended to the prompt's last message), then the calls of response E
    /// as {"episode": E, "name", "arguments"} (answered as --tool-command's), and with
    /// --environment-reward {"get_reward": E} (answer {"reward": x}). Critic-free
    /// estimators only.
    #[arg(long)]
    pub environment_command: Option<String>,
    /// The environment owns a reward (TRL's `get_reward`): each episode's, asked once its
    /// response is complete, is a reward source (`rewards/environment/mean`).
    #[arg(long, requires = "environment_command")]
    pub environment_reward: bool,
    /// The weight of --environment-reward in the summed reward.
    #[arg(long, default_value_t = 1.0)]
    pub environment_reward_weight: f64,
    /// The tools' schemas, a JSON list as `apply_chat_template(tools=…)` takes them
    /// ([{"type": "function", "function": {"name", "description", "parameters"}}]),
    /// rendered into every prompt that has no `tools` of its own.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// Most rounds of tool calls in one response (TRL's `max_tool_calling_iterations`;
    /// default: no limit but --response-length).
    #[arg(long)]
    pub max_tool_calling_iterations: Option<usize>,
    /// Seconds to wait for each answer of --tool-command.
    #[arg(long, default_value_t = 60.0)]
    pub tool_timeout: f64,
    /// exact-answer: a regular expression whose first capture group is the answer
    /// (default: the text after the last "The answer is").
    #[arg(long)]
    pub answer_pattern: Option<String>,
    /// exact-answer: subtracted when no answer can be extracted (the reward is then −p).
    #[arg(long, default_value_t = 0.0)]
    pub format_penalty: f64,
    /// cosine-scaled: the length at which the schedule ends (default: --response-length).
    #[arg(long)]
    pub cosine_max_len: Option<usize>,
    /// cosine-scaled: a wrong response's reward at length 0.
    #[arg(long, default_value_t = -1.0, allow_hyphen_values = true)]
    pub cosine_min_value_wrong: f64,
    /// cosine-scaled: a wrong response's reward at --cosine-max-len.
    #[arg(long, default_value_t = -0.5, allow_hyphen_values = true)]
    pub cosine_max_value_wrong: f64,
    /// cosine-scaled: a correct response's reward at --cosine-max-len.
    #[arg(long, default_value_t = 0.5, allow_hyphen_values = true)]
    pub cosine_min_value_correct: f64,
    /// cosine-scaled: a correct response's reward at length 0.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub cosine_max_value_correct: f64,
    /// format: the regular expression a well-formed response matches from its start (add
    /// `$` to match all of it, `(?s)` for `.` to match newlines), e.g.
    /// '(?s)<think>.*?</think>\s*<answer>.*?</answer>$'.
    #[arg(long)]
    pub format_pattern: Option<String>,
    /// soft-overlong: the last tokens before --response-length over which the penalty
    /// falls from 0 to −1 (DAPO's L_cache; TRL's soft_punish_cache).
    #[arg(long)]
    pub soft_punish_cache: Option<usize>,
    /// repetition: the n of the token n-grams counted.
    #[arg(long, default_value_t = 3)]
    pub repetition_ngram_size: usize,
    /// repetition: the reward of a response that is nothing but repeats (≤ 0).
    #[arg(long, default_value_t = -1.0, allow_hyphen_values = true)]
    pub repetition_max_penalty: f64,
    /// Initial value model (default: the reward model, as InstructGPT does).
    #[arg(long)]
    pub value_model: Option<PathBuf>,
    /// Prompts: {"prompt"} or {"messages"} per line.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Draw the prompts in a new random order each epoch (TRL's `shuffle_dataset`,
    /// default true); false: in the file's order every epoch (a curriculum).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub shuffle_dataset: bool,
    /// Prompts per iteration (rollout batch).
    #[arg(long, default_value_t = 16)]
    pub rollout_batch_size: usize,
    /// Longest prompt in tokens; longer prompts keep their last tokens.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_length: usize,
    /// Most tokens sampled per response.
    #[arg(long, default_value_t = 64)]
    pub response_length: i64,
    /// Most responses sampled at once in a rollout (default: all of them).
    #[arg(long)]
    pub generation_batch_size: Option<usize>,
    /// Most sequences through each model's forward at once in a rollout (policy,
    /// reference, value and reward; default: all of them).
    #[arg(long)]
    pub forward_batch_size: Option<usize>,
    /// Sampling temperature (> 0); log-probs are computed at this temperature.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Sample among the K most likely tokens; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    /// Nucleus sampling mass; 1 keeps all.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample among the tokens at least this many times as likely as the most likely one
    /// (TRL's and transformers' `min_p`); 0 keeps all. The log-probs the loss uses are the
    /// unfiltered distribution's, as with --top-k and --top-p.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f64,
    /// transformers' `repetition_penalty` in the sampling (TRL's GRPO has it): the logits
    /// of the tokens already in a row are divided by it where positive and multiplied where
    /// negative; 1 is off. The log-probs the loss uses are the unpenalised distribution's,
    /// as with --top-k and --top-p.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Subtracted from the score of a response that did not end with EOS.
    #[arg(long)]
    pub missing_eos_penalty: Option<f64>,
    /// Clip scores to [−c, c].
    #[arg(long)]
    pub score_clip: Option<f64>,
    /// Clip scores to [MIN, MAX] (TRL's RLOO `reward_clip_range`), e.g. `-1,1`.
    #[arg(long, value_parser = parse_range, allow_hyphen_values = true)]
    pub reward_clip_range: Option<(f64, f64)>,
    /// Whiten the per-token rewards over the batch before GAE.
    #[arg(long)]
    pub whiten_rewards: bool,
    /// Initial KL coefficient β. At 0 (TRL's GRPO default) no reference model is loaded
    /// or run, and no KL is measured.
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    /// Per-token KL estimator: k1 (log π − log π_ref) or k3.
    #[arg(long, default_value = "k1")]
    pub kl_estimator: KlEstimator,
    /// Adapt β towards this KL (Ziegler et al.); unset keeps β fixed.
    #[arg(long)]
    pub kl_target: Option<f64>,
    /// Horizon of the adaptive KL controller, in samples.
    #[arg(long, default_value_t = 10000.0)]
    pub kl_horizon: f64,
    /// How advantages are estimated: gae (with a value model), or critic-free: grpo,
    /// dr-grpo, rloo (groups of --num-generations responses per prompt) or
    /// reinforce-plus-plus; or online-dpo (TRL's OnlineDPOTrainer: two responses per
    /// prompt, the better rewarded chosen, DPO's loss on the pair with β = --kl-coef); or
    /// a2po (A*-PO, TRL's experimental A2POTrainer: one response per prompt, β·log π/π_ref
    /// regressed onto r − V*, β = --kl-coef, V* estimated before training from
    /// --num-value-samples responses of the starting policy to every prompt); or sdft
    /// (SDFT, TRL's experimental SDFTTrainer: no reward, the policy distilled on its own
    /// responses from a teacher shown each row's privileged_context, see --teacher-model-kind);
    /// or sdpo (SDPO, TRL's experimental SDPOTrainer: grpo with the distillation from a
    /// teacher shown a successful response of the group, see --distillation-weight).
    #[arg(long, default_value = "gae")]
    pub advantage_estimator: EstimatorName,
    /// A*-PO: responses sampled from the starting policy (the reference) to every training
    /// prompt before training, whose rewards estimate the prompt's optimal value V*
    /// (TRL's `num_value_samples`).
    #[arg(long, default_value_t = 8)]
    pub num_value_samples: usize,
    /// A*-PO: the KL temperature of V* = β₁·log mean exp(r/β₁) (TRL's `beta1`); the
    /// regression's own β (TRL's `beta2`) is --kl-coef.
    #[arg(long, default_value_t = 0.5)]
    pub beta1: f64,
    /// A*-PO: leave out of training the prompts whose --num-value-samples responses all
    /// scored 0 (true, TRL's `filter_all_incorrect` default) or keep them (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub filter_all_incorrect: bool,
    /// Online DPO's loss on a pair: sigmoid (DPO's) or ipo (TRL's `loss_type`).
    #[arg(long, value_enum, default_value = "sigmoid")]
    pub online_dpo_loss: PairLoss,
    /// Responses sampled per prompt (the group of grpo, dr-grpo and rloo).
    #[arg(long, default_value_t = 1)]
    pub num_generations: usize,
    /// DAPO's dynamic sampling (veRL's algorithm.filter_groups): groups whose rewards are
    /// all equal (no advantage, nothing learned) are dropped, and more batches of prompts
    /// sampled until --rollout-batch-size groups remain (the first of them are kept).
    #[arg(long)]
    pub filter_groups: bool,
    /// With --filter-groups: the most batches of prompts sampled for one iteration; the
    /// run stops when they leave too few groups (veRL's max_num_gen_batches; 0: no limit).
    #[arg(long, default_value_t = 10)]
    pub max_num_gen_batches: usize,
    /// Held-out prompts (the --prompts format): every --eval-every iterations and after
    /// the last, --num-generations-eval responses to each are sampled as the rollouts are
    /// and rewarded, and eval/reward, eval/reward_std, eval/rewards/NAME/mean and
    /// eval/completions/* are logged. Nothing trains on them.
    #[arg(long)]
    pub eval_prompts: Option<PathBuf>,
    /// Iterations between evaluations of --eval-prompts (0: only after the last).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Responses sampled per evaluation prompt (default: --num-generations; TRL's
    /// `num_generations_eval`).
    #[arg(long)]
    pub num_generations_eval: Option<usize>,
    /// The KL penalty as a loss term (k3 of policy and reference, times β, aggregated as
    /// the policy loss; GRPO's form) instead of in the per-token rewards.
    #[arg(long)]
    pub kl_in_loss: bool,
    /// With --kl-in-loss: each token's k3 times its importance weight π/π_old (at
    /// --importance-sampling-level), DeepSeek-V3.2's unbiased estimate of the KL of the
    /// current policy from tokens the rollout's policy sampled (TRL's
    /// `use_bias_correction_kl`).
    #[arg(long)]
    pub use_bias_correction_kl: bool,
    /// δ of DeepSeek-V3.2's off-policy sequence masking (TRL's
    /// `off_policy_mask_threshold`): a response with a negative advantage whose mean
    /// per-token log π_old − log π (the rollout's policy against the current one) exceeds
    /// δ carries no policy loss (it still counts in the denominators). Off when absent.
    #[arg(long)]
    pub off_policy_mask_threshold: Option<f64>,
    /// Correct the policy loss for the sampler's drift from the training forward (the KV
    /// cache and CUDA-graph decoding against the full forward, which differ in bf16):
    /// each token's loss weighted by π_old/π_sampler, per token or per response (exp of
    /// the sum), truncated to [--sampling-correction-min, --sampling-correction-max]
    /// (token-truncate, sequence-truncate) or zeroed outside it (token-mask,
    /// sequence-mask). TRL's `vllm_importance_sampling_correction` with its
    /// `vllm_importance_sampling_mode`. Off when absent.
    #[arg(long, value_enum)]
    pub sampling_correction: Option<SamplingCorrection>,
    /// Upper bound of --sampling-correction's ratio (TRL's
    /// `vllm_importance_sampling_clip_max`).
    #[arg(long, default_value_t = 3.0)]
    pub sampling_correction_max: f64,
    /// Lower bound of --sampling-correction's ratio (none when absent; TRL's
    /// `vllm_importance_sampling_clip_min`).
    #[arg(long)]
    pub sampling_correction_min: Option<f64>,
    /// How the per-token policy loss is averaged: token-mean, seq-mean-token-mean (GRPO)
    /// or seq-mean-token-sum-norm (Dr. GRPO: over --response-length).
    #[arg(long, default_value = "token-mean")]
    pub loss_aggregation: LossAggregation,
    /// Upper clip of the policy ratio, 1 + this (DAPO's clip-higher; default --cliprange).
    #[arg(long)]
    pub cliprange_high: Option<f64>,
    /// Cap of the unclipped policy ratio (two-sided GRPO, INTELLECT-2; TRL's `delta`):
    /// the loss of a negative advantage stays bounded however much a response's
    /// probability grew. Above 1 (INTELLECT-2 recommends above 1 + --cliprange-high).
    #[arg(long)]
    pub delta: Option<f64>,
    /// What the policy loss does with the importance weight: clip (PPO's clipped
    /// surrogate), cispo (MiniMax-M1: the weight capped at --cliprange-high, an absolute
    /// bound as TRL's epsilon_high for cispo, ScaleRL uses 5; every token keeps its
    /// gradient), sapo (a soft gate, --sapo-temperature-pos/-neg) or vespo (the gradient
    /// scaled by a Gamma weight of the sequence's importance weight, --vespo-k-pos/-neg,
    /// --vespo-lambda-pos/-neg) or gmpo (TRL's GMPOTrainer: per response, the geometric
    /// mean of its token weights, each clipped in log space to [−--cliprange,
    /// --cliprange-high] — GMPO's paper uses 0.4 — and the loss averaged over responses,
    /// whatever --loss-aggregation says; needs grpo, dr-grpo or rloo). TRL's `loss_type`
    /// cispo, sapo and vespo (whose aggregation is --loss-aggregation here).
    #[arg(long, value_enum, default_value = "clip")]
    pub policy_loss: PolicyLossName,
    /// SAPO's gate temperature for tokens with a positive advantage.
    #[arg(long, default_value_t = 1.0)]
    pub sapo_temperature_pos: f64,
    /// SAPO's gate temperature for the other tokens.
    #[arg(long, default_value_t = 1.05)]
    pub sapo_temperature_neg: f64,
    /// VESPO's k (the power of w) for responses with a non-negative advantage.
    #[arg(long, default_value_t = 2.0)]
    pub vespo_k_pos: f64,
    /// VESPO's λ (the decay in w) for responses with a non-negative advantage.
    #[arg(long, default_value_t = 3.0)]
    pub vespo_lambda_pos: f64,
    /// VESPO's k for the other responses.
    #[arg(long, default_value_t = 3.0)]
    pub vespo_k_neg: f64,
    /// VESPO's λ for the other responses.
    #[arg(long, default_value_t = 2.0)]
    pub vespo_lambda_neg: f64,
    /// The ratio the surrogate clips: token (PPO's, GRPO's) or sequence (GSPO: one
    /// length-normalised likelihood ratio per response; GSPO's paper clips it at
    /// --cliprange 3e-4 --cliprange-high 4e-4).
    #[arg(long, default_value = "token")]
    pub importance_sampling_level: ImportanceSampling,
    /// How --advantage-estimator grpo combines several reward sources:
    /// sum-then-normalize (their weighted sum is the reward) or normalize-then-sum (GDPO:
    /// each source normalised within its group, the weighted sum normalised over the
    /// whole batch). TRL's `multi_objective_aggregation`.
    #[arg(long, value_enum, default_value = "sum-then-normalize")]
    pub multi_objective_aggregation: MultiObjective,
    /// With --advantage-estimator rloo: normalise the advantages over the whole rollout
    /// batch (every rank's), to mean 0 and std 1 (TRL's RLOO `normalize_advantages`).
    #[arg(long)]
    pub normalize_advantages: bool,
    /// What --advantage-estimator grpo divides an advantage by: the std of the group
    /// (default), of the whole rollout batch (batch: Lite PPO), or nothing (none: Dr.
    /// GRPO's advantage). TRL's `scale_rewards`.
    #[arg(long)]
    pub scale_rewards: Option<RewardScale>,
    /// Leave responses that did not end with EOS (cut at --response-length) out of the
    /// policy loss: their tokens carry no gradient (DAPO's overlong filtering; TRL's
    /// `mask_truncated_completions`). Their rewards still count in the advantages, and
    /// the critic still learns from them.
    #[arg(long)]
    pub mask_truncated_completions: bool,
    /// ρ of "Beyond the 80/20 rule" (Wang et al. 2025; TRL's `top_entropy_quantile`, which
    /// recommends 0.2): only the tokens whose entropy under the current policy is in the
    /// top ρ of the minibatch's tokens (every rank's) carry the policy loss; the others
    /// still count in its denominator, as in TRL. 1 keeps every token; 0 keeps the most
    /// uncertain ones.
    #[arg(long, default_value_t = 1.0)]
    pub top_entropy_quantile: f64,
    /// GAE (and REINFORCE++) discount γ.
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    /// GAE λ.
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    /// Passes over each rollout batch.
    #[arg(long, default_value_t = 4)]
    pub ppo_epochs: usize,
    /// Minibatches per pass (one optimiser step each).
    #[arg(long, default_value_t = 1)]
    pub num_minibatches: usize,
    /// Micro-batches per minibatch (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Policy ratio clip ε.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange: f64,
    /// Value clip around the rollout's values.
    #[arg(long, default_value_t = 0.2)]
    pub cliprange_value: f64,
    /// Weight of the value loss.
    #[arg(long, default_value_t = 0.1)]
    pub vf_coef: f64,
    /// Entropy bonus weight (0: none; with --use-adaptive-entropy, its starting value).
    #[arg(long, default_value_t = 0.0)]
    pub entropy_coef: f64,
    /// Skywork-OR1's adaptive entropy control (TRL's `use_adaptive_entropy`): after each
    /// optimiser step the coefficient grows by --entropy-coef-delta while the step's mean
    /// token entropy (every rank's) is at or below --entropy-target, and shrinks by it
    /// otherwise, within [--entropy-coef-min, --entropy-coef-max]; the bonus applies only
    /// on a step after one whose entropy was at or below the target.
    #[arg(long)]
    pub use_adaptive_entropy: bool,
    /// The lowest coefficient adaptive entropy control steps down to.
    #[arg(long, default_value_t = 0.0)]
    pub entropy_coef_min: f64,
    /// The highest coefficient adaptive entropy control steps up to.
    #[arg(long, default_value_t = 1.0)]
    pub entropy_coef_max: f64,
    /// How far adaptive entropy control moves the coefficient after each optimiser step.
    #[arg(long, default_value_t = 0.005)]
    pub entropy_coef_delta: f64,
    /// The mean token entropy (nats) adaptive control keeps the policy above.
    #[arg(long, default_value_t = 0.2)]
    pub entropy_target: f64,
    /// Learning rate of the value model (default: --lr).
    #[arg(long)]
    pub value_lr: Option<f64>,
    /// PPO-ptx: SFT-format rows whose language-modelling loss is added to the policy loss.
    #[arg(long)]
    pub ptx_data: Option<PathBuf>,
    /// PPO-ptx weight γ.
    #[arg(long, default_value_t = 0.0)]
    pub ptx_coef: f64,
    /// Longest PPO-ptx row in tokens (longer rows are cut at the end).
    #[arg(long, default_value_t = 512)]
    pub ptx_max_length: usize,
    /// Keep an exponential moving average of the policy weights with this decay (e.g. 0.992).
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Write sample prompts/responses/scores every N iterations (0: never).
    #[arg(long, default_value_t = 10)]
    pub sample_every: u64,
    /// How many samples each time.
    #[arg(long, default_value_t = 4)]
    pub num_samples: usize,
    /// An adapter (LoRA or a soft prompt) on the policy and the critic: the reference is
    /// the policy with its adapter off, and (without --value-model) the reward model is the
    /// critic with its adapter off.
    #[command(flatten)]
    #[serde(flatten)]
    pub adapter: AdapterArgs,
    /// The policy's tokenizer as the run changes it (prompts, PPO-ptx rows, generation's
    /// EOS, and the tokenizer files the policy is saved with).
    #[command(flatten)]
    #[serde(flatten)]
    pub tokenizer: common::cli::TokenizerArgs,
    /// TR-DPO's reference updates, as TRL's GRPO has them: every N iterations.
    #[command(flatten)]
    #[serde(flatten)]
    pub sync: SyncRefArgs,
    /// SDFT's teacher and objective (--advantage-estimator sdft).
    #[command(flatten)]
    #[serde(flatten)]
    pub sdft: crate::sdft::SdftArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub memory: MemoryArgs,
    /// Turn off LoRA's dropout in training (TRL's disable_dropout: false by default in
    /// GRPOConfig and RLOOConfig; the adapter's lora_dropout stays in its files).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub disable_dropout: bool,
    /// Hold and apply the policy's and the reference's LM head in f32 (TRL's
    /// cast_lm_head_to_fp32, the ScaleRL recipe: fewer mismatches between the sampler's
    /// and the trainer's log-probs in bf16). Not with tied embeddings, as TRL documents.
    #[arg(long)]
    pub cast_lm_head_to_fp32: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub decode: DecodeArgs,
}

/// `MIN,MAX` (`--reward-clip-range`).
fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("'{s}' is not MIN,MAX (two numbers, e.g. -1,1)");
    let (lo, hi) = s.split_once(',').ok_or_else(bad)?;
    let num = |x: &str| x.trim().parse::<f64>().map_err(|_| bad());
    Ok((num(lo)?, num(hi)?))
}

impl TrainArgs {
    /// The range scores are clipped to: `--reward-clip-range`, or `--score-clip`'s
    /// [−c, c].
    pub fn score_range(&self) -> Option<(f64, f64)> {
        self.reward_clip_range.or(self.score_clip.map(|c| (-c, c)))
    }

    /// Whether `--reward-rule` names `rule`.
    pub fn has_rule(&self, rule: RewardRule) -> bool {
        self.reward_rule.contains(&rule)
    }

    /// The program that runs the responses' tool calls: `(option, command, is an
    /// environment)`.
    pub fn tool_program(&self) -> Option<(&'static str, &str, bool)> {
        match (&self.tool_command, &self.environment_command) {
            (Some(c), _) => Some(("--tool-command", c, false)),
            (None, Some(c)) => Some(("--environment-command", c, true)),
            (None, None) => None,
        }
    }

    /// Whether a rule compares responses with the prompt rows' `answer`.
    pub fn reads_answers(&self) -> bool {
        self.has_rule(RewardRule::ExactAnswer) || self.has_rule(RewardRule::CosineScaled)
    }

    /// Each `--reward-model`'s weight, in their order.
    pub fn reward_model_weights(&self) -> Vec<f64> {
        weights_of(&self.reward_model_weight, self.reward_model.len())
    }

    /// Each `--reward-command`'s weight, in their order.
    pub fn reward_command_weights(&self) -> Vec<f64> {
        weights_of(&self.reward_command_weight, self.reward_command.len())
    }

    /// Each `--reward-rule` with its weight.
    pub fn rule_weights(&self) -> Vec<(RewardRule, f64)> {
        let weights = weights_of(&self.reward_rule_weight, self.reward_rule.len());
        self.reward_rule.iter().copied().zip(weights).collect()
    }

    /// How advantages are estimated: `--advantage-estimator` with its parameters.
    pub fn advantage_estimator(&self) -> AdvantageEstimator {
        let group = self.num_generations as i64;
        match self.advantage_estimator {
            EstimatorName::Gae => AdvantageEstimator::Gae {
                gamma: self.gamma,
                lam: self.lam,
            },
            EstimatorName::Grpo => match self.multi_objective_aggregation {
                MultiObjective::SumThenNormalize => AdvantageEstimator::Grpo {
                    group,
                    scale: self.scale_rewards.unwrap_or_default(),
                },
                MultiObjective::NormalizeThenSum => AdvantageEstimator::Gdpo { group },
            },
            EstimatorName::DrGrpo => AdvantageEstimator::DrGrpo { group },
            EstimatorName::Rloo => AdvantageEstimator::Rloo {
                group,
                normalize: self.normalize_advantages,
            },
            EstimatorName::ReinforcePlusPlus => {
                AdvantageEstimator::ReinforcePlusPlus { gamma: self.gamma }
            }
            EstimatorName::OnlineDpo => AdvantageEstimator::OnlineDpo {
                loss: self.online_dpo_loss,
            },
            EstimatorName::A2po => AdvantageEstimator::A2po,
            EstimatorName::Sdft => AdvantageEstimator::Sdft,
            EstimatorName::Sdpo => AdvantageEstimator::Sdpo {
                group,
                scale: self.scale_rewards.unwrap_or_default(),
            },
        }
    }

    /// The entropy bonus's coefficient at the start of a run.
    pub fn entropy_controller(&self) -> EntropyController {
        EntropyController {
            coef: self.entropy_coef,
            last_entropy: None,
            adaptive: self.use_adaptive_entropy.then_some(AdaptiveEntropy {
                target: self.entropy_target,
                delta: self.entropy_coef_delta,
                min: self.entropy_coef_min,
                max: self.entropy_coef_max,
            }),
        }
    }

    /// The clipped surrogate: the ratio's clip interval, its level, and how the per-token
    /// losses are reduced.
    pub fn surrogate(&self) -> Surrogate {
        Surrogate {
            objective: match self.policy_loss {
                PolicyLossName::Clip => Objective::Clip,
                PolicyLossName::Cispo => Objective::Cispo,
                PolicyLossName::Sapo => Objective::Sapo {
                    pos: self.sapo_temperature_pos,
                    neg: self.sapo_temperature_neg,
                },
                PolicyLossName::Vespo => Objective::Vespo {
                    k_pos: self.vespo_k_pos,
                    lambda_pos: self.vespo_lambda_pos,
                    k_neg: self.vespo_k_neg,
                    lambda_neg: self.vespo_lambda_neg,
                },
                PolicyLossName::Gmpo => Objective::Gmpo,
            },
            clip: Clip {
                low: self.cliprange,
                high: self.cliprange_high.unwrap_or(self.cliprange),
                delta: self.delta,
            },
            level: self.importance_sampling_level,
            aggregation: match self.policy_loss {
                // A loss per response, averaged over responses (with the KL term); online
                // DPO's per pair, averaged over pairs, and A*-PO's per response
                // (micro-batches weighed by their rows).
                PolicyLossName::Gmpo => LossAggregation::SeqMeanTokenMean,
                // SDFT's: each response's mean over its tokens, averaged (TRL's).
                _ if self.advantage_estimator().kl_in_objective()
                    || self.advantage_estimator == EstimatorName::Sdft =>
                {
                    LossAggregation::SeqMeanTokenMean
                }
                _ => self.loss_aggregation,
            },
            norm: self.response_length as f64,
        }
    }

    /// How the frozen reference moves: `--sync-ref-model`'s TR-DPO updates, or SDFT's EMA
    /// teacher (`--teacher-model-kind ema`: the reference is the teacher).
    pub fn reference_sync(&self) -> SyncRefArgs {
        match self.self_distillation().map(|s| s.teacher) {
            Some(crate::sdft::TeacherKind::Ema) => SyncRefArgs {
                sync_ref_model: true,
                ref_model_mixup_alpha: self.sdft.teacher_update_rate,
                ref_model_sync_steps: self.sdft.teacher_sync_steps,
            },
            _ => self.sync.clone(),
        }
    }

    /// Whether the run holds a reference model: for the KL penalty (`--kl-coef` > 0), or as
    /// SDFT's base or EMA teacher.
    pub fn holds_reference(&self) -> bool {
        match self.self_distillation() {
            Some(s) => s.teacher != crate::sdft::TeacherKind::Live,
            None => self.kl_coef > 0.0,
        }
    }

    /// SDFT's or SDPO's self-distillation settings, their defaults filled in; `None` for the
    /// other estimators.
    pub fn self_distillation(&self) -> Option<crate::sdft::Resolved> {
        match self.advantage_estimator {
            EstimatorName::Sdft => Some(self.sdft.resolved(false)),
            EstimatorName::Sdpo => Some(self.sdft.resolved(true)),
            _ => None,
        }
    }

    /// Responses per rollout: prompts × generations.
    pub fn rollout_rows(&self) -> usize {
        self.rollout_batch_size * self.num_generations
    }

    /// Whether the reward model is the critic's base with its adapter off (LoRA without a
    /// separate --value-model): one copy of the reward model's weights serves both.
    pub fn reward_is_critic_base(&self) -> bool {
        (self.adapter.lora_r.is_some() || self.adapter.prompt_tuning_tokens.is_some())
            && self.value_model.is_none()
            && !self.reward_model.is_empty()
            && self.advantage_estimator().needs_critic()
    }

    /// Where the critic starts: --value-model, else the reward model (as InstructGPT).
    pub fn critic_source(&self) -> &Path {
        self.value_model
            .as_ref()
            .or(self.reward_model.first())
            .expect("validated: gae has a value or reward model")
    }

    pub fn validate(&self) -> Result<()> {
        // What shapes a per-token policy loss has nothing to act on in a loss on whole
        // responses.
        let whole_responses = match self.advantage_estimator {
            EstimatorName::Sdft => "--advantage-estimator sdft has no policy gradient: --importance-sampling-level sequence, --delta, --top-entropy-quantile, --off-policy-mask-threshold, --sampling-correction and --mask-truncated-completions shape a per-token policy loss and are refused with it",
            EstimatorName::A2po => "--advantage-estimator a2po takes its regression on whole responses: --importance-sampling-level sequence, --delta, --top-entropy-quantile, --off-policy-mask-threshold, --sampling-correction and --mask-truncated-completions shape a per-token policy loss and are refused with it",
            _ => "--advantage-estimator online-dpo takes DPO's loss on whole responses: --importance-sampling-level sequence, --delta, --top-entropy-quantile, --off-policy-mask-threshold, --sampling-correction and --mask-truncated-completions shape a per-token policy loss and are refused with it",
        };
        self.optim.validate()?;
        self.sync.validate()?;
        self.run.validate()?;
        self.adapter.validate()?;
        self.memory.validate()?;
        require(
            &self
                .sdft
                .problems(self.advantage_estimator == EstimatorName::Sdpo),
        )?;
        require(&common::generate::filter_problems(
            (self.top_p, self.top_k),
            (self.min_p, self.repetition_penalty),
        ))?;
        require(&[
            (
                self.rollout_batch_size > 0,
                "--rollout-batch-size must be at least 1",
            ),
            (
                self.response_length > 0,
                "--response-length must be at least 1",
            ),
            (
                self.temperature > 0.0,
                "--temperature must be > 0 (PPO samples)",
            ),
            (self.kl_coef >= 0.0, "--kl-coef must be ≥ 0"),
            (
                self.score_clip.is_none() || self.reward_clip_range.is_none(),
                "--score-clip and --reward-clip-range both clip the scores: give one",
            ),
            (
                self.reward_clip_range.is_none_or(|(lo, hi)| lo <= hi),
                "--reward-clip-range MIN,MAX needs MIN ≤ MAX",
            ),
            (
                self.kl_target.is_none_or(|t| t > 0.0),
                "--kl-target must be > 0",
            ),
            (
                self.kl_target.is_none() || self.kl_coef > 0.0,
                "--kl-target needs --kl-coef > 0 (β adapts by factors: from 0 it stays 0)",
            ),
            (self.kl_horizon > 0.0, "--kl-horizon must be > 0"),
            (
                (0.0..=1.0).contains(&self.gamma),
                "--gamma must be in [0, 1]",
            ),
            ((0.0..=1.0).contains(&self.lam), "--lam must be in [0, 1]"),
            (self.ppo_epochs > 0, "--ppo-epochs must be at least 1"),
            (
                self.num_minibatches > 0,
                "--num-minibatches must be at least 1",
            ),
            (self.grad_accum > 0, "--grad-accum must be at least 1"),
            (
                self.rollout_rows().is_multiple_of(self.num_minibatches * self.grad_accum),
                "--rollout-batch-size must be a multiple of --num-minibatches × --grad-accum (counting each prompt's --num-generations responses)",
            ),
            (
                self.num_generations > 0,
                "--num-generations must be at least 1",
            ),
            (
                !self.filter_groups || self.num_generations >= 2,
                "--filter-groups drops groups whose rewards are all equal: --num-generations must be at least 2",
            ),
            (
                !self.advantage_estimator().is_group() || self.num_generations >= 2,
                "--advantage-estimator grpo, dr-grpo and rloo compare responses to the same prompt: --num-generations must be at least 2",
            ),
            (
                self.advantage_estimator != EstimatorName::OnlineDpo
                    || (self.num_generations == 2
                        && self.kl_coef > 0.0
                        && !self.kl_in_loss
                        && self.policy_loss == PolicyLossName::Clip
                        && self
                            .rollout_batch_size
                            .is_multiple_of(self.num_minibatches * self.grad_accum)),
                "--advantage-estimator online-dpo compares two responses per prompt under DPO's loss with β = --kl-coef: it needs --num-generations 2, --kl-coef > 0 (not --kl-in-loss), --policy-loss clip and --rollout-batch-size a multiple of --num-minibatches × --grad-accum (pairs stay whole)",
            ),
            (
                !(self.advantage_estimator().kl_in_objective()
                    || self.advantage_estimator == EstimatorName::Sdft)
                    || (self.importance_sampling_level == ImportanceSampling::Token
                        && self.delta.is_none()
                        && self.top_entropy_quantile == 1.0
                        && self.off_policy_mask_threshold.is_none()
                        && self.sampling_correction.is_none()
                        && !self.mask_truncated_completions),
                whole_responses,
            ),
            (
                self.advantage_estimator != EstimatorName::A2po
                    || (self.num_generations == 1
                        && self.kl_coef > 0.0
                        && !self.kl_in_loss
                        && self.policy_loss == PolicyLossName::Clip),
                "--advantage-estimator a2po regresses β·log π/π_ref of one response per prompt onto r − V* with β = --kl-coef: it needs --num-generations 1, --kl-coef > 0 (not --kl-in-loss) and --policy-loss clip",
            ),
            (
                self.self_distillation().is_none()
                    || (!self.kl_in_loss
                        && self.entropy_coef == 0.0
                        && !self.use_adaptive_entropy
                        && !self.filter_groups
                        && self.tool_program().is_none()
                        && !self.sync.sync_ref_model),
                "--advantage-estimator sdft and sdpo distil the policy from a teacher on its sampled tokens: --kl-in-loss, --entropy-coef, --use-adaptive-entropy, --filter-groups, tools and --sync-ref-model (give --teacher-model-kind ema) are refused with them",
            ),
            (
                self.advantage_estimator != EstimatorName::Sdft
                    || self.policy_loss == PolicyLossName::Clip,
                "--advantage-estimator sdft has no policy gradient: --policy-loss other than clip is refused with it",
            ),
            (
                (!self.sdft.generate_from_teacher && self.sdft.num_loss_tokens_to_skip == 0)
                    || self.advantage_estimator == EstimatorName::Sdft,
                "--generate-from-teacher and --num-loss-tokens-to-skip apply with --advantage-estimator sdft",
            ),
            (
                self.advantage_estimator != EstimatorName::Sdpo || self.num_generations >= 2,
                "--advantage-estimator sdpo finds each response's demonstration among the other responses of its group: --num-generations must be at least 2",
            ),
            (
                self.num_value_samples > 0,
                "--num-value-samples must be at least 1",
            ),
            (
                self.beta1 > 0.0 && self.beta1.is_finite(),
                "--beta1 must be > 0",
            ),
            (
                !self.advantage_estimator().needs_critic()
                    || self.value_model.is_some()
                    || !self.reward_model.is_empty(),
                "--advantage-estimator gae trains a value model: give --value-model or --reward-model",
            ),
            (
                self.cliprange_high.is_none_or(|c| c > 0.0),
                "--cliprange-high must be > 0",
            ),
            (
                self.delta.is_none_or(|d| d > 1.0),
                "--delta must be > 1 (it caps the policy ratio from above)",
            ),
            (
                self.delta.is_none() || self.policy_loss == PolicyLossName::Clip,
                "--delta applies to --policy-loss clip",
            ),
            (
                self.policy_loss != PolicyLossName::Cispo || self.cliprange_high.is_some(),
                "--policy-loss cispo caps the importance weight at --cliprange-high: give it (ScaleRL uses 5)",
            ),
            (
                self.sapo_temperature_pos > 0.0 && self.sapo_temperature_neg > 0.0,
                "--sapo-temperature-pos and --sapo-temperature-neg must be > 0",
            ),
            (
                self.policy_loss != PolicyLossName::Vespo
                    || self.importance_sampling_level == ImportanceSampling::Token,
                "--policy-loss vespo forms its own sequence-level weight: leave --importance-sampling-level at token",
            ),
            (
                self.policy_loss != PolicyLossName::Gmpo
                    || (self.importance_sampling_level == ImportanceSampling::Token
                        && self.advantage_estimator().is_group()),
                "--policy-loss gmpo weighs one advantage per response by its own geometric-mean weight: it needs --advantage-estimator grpo, dr-grpo or rloo and --importance-sampling-level token",
            ),
            (
                [self.vespo_k_pos, self.vespo_lambda_pos, self.vespo_k_neg, self.vespo_lambda_neg]
                    .iter()
                    .all(|x| x.is_finite() && *x >= 0.0),
                "--vespo-k-pos, --vespo-lambda-pos, --vespo-k-neg and --vespo-lambda-neg must be ≥ 0",
            ),
            (
                self.entropy_coef >= 0.0 && self.entropy_coef.is_finite(),
                "--entropy-coef must be ≥ 0",
            ),
            (
                !self.use_adaptive_entropy
                    || (0.0 <= self.entropy_coef_min
                        && self.entropy_coef_min <= self.entropy_coef_max
                        && self.entropy_coef_max.is_finite()
                        && self.entropy_coef_delta >= 0.0
                        && self.entropy_target >= 0.0),
                "--use-adaptive-entropy needs 0 ≤ --entropy-coef-min ≤ --entropy-coef-max, --entropy-coef-delta ≥ 0 and --entropy-target ≥ 0",
            ),
            (
                (0.0..=1.0).contains(&self.top_entropy_quantile),
                "--top-entropy-quantile must be in [0, 1]",
            ),
            (
                !self.use_bias_correction_kl || self.kl_in_loss,
                "--use-bias-correction-kl needs --kl-in-loss (it corrects the KL loss term)",
            ),
            (
                self.off_policy_mask_threshold
                    .is_none_or(|d| d >= 0.0 && d.is_finite()),
                "--off-policy-mask-threshold must be ≥ 0",
            ),
            (
                self.scale_rewards.is_none()
                    || self.advantage_estimator == EstimatorName::Grpo,
                "--scale-rewards needs --advantage-estimator grpo (dr-grpo and rloo do not scale; gae and reinforce-plus-plus whiten)",
            ),
            (
                self.multi_objective_aggregation == MultiObjective::SumThenNormalize
                    || (self.advantage_estimator == EstimatorName::Grpo
                        && self.scale_rewards.is_none()
                        && (self.kl_in_loss || self.kl_coef == 0.0)
                        && self.missing_eos_penalty.is_none()
                        && self.score_clip.is_none()
                        && self.reward_clip_range.is_none()),
                "--multi-objective-aggregation normalize-then-sum normalises each reward source's own scores: it needs --advantage-estimator grpo, and neither --scale-rewards, a KL penalty in the rewards (use --kl-in-loss or --kl-coef 0), --missing-eos-penalty nor --score-clip or --reward-clip-range (they act on the summed score)",
            ),
            (
                !self.normalize_advantages || self.advantage_estimator == EstimatorName::Rloo,
                "--normalize-advantages needs --advantage-estimator rloo (grpo scales with --scale-rewards; gae and reinforce-plus-plus whiten)",
            ),
            (self.reward_timeout > 0.0, "--reward-timeout must be > 0"),
            (self.tool_timeout > 0.0, "--tool-timeout must be > 0"),
            (
                self.tool_program().is_some()
                    || (self.tools.is_none() && self.max_tool_calling_iterations.is_none()),
                "--tools and --max-tool-calling-iterations need --tool-command or --environment-command (the program that runs the tools)",
            ),
            (
                self.tool_program().is_none() || self.advantage_estimator != EstimatorName::Gae,
                "--tool-command and --environment-command need a critic-free --advantage-estimator (grpo, dr-grpo, rloo or reinforce-plus-plus): GAE's values would run across the tool results inside a response",
            ),
            (
                self.sampling_correction.is_none()
                    || !matches!(self.policy_loss, PolicyLossName::Vespo | PolicyLossName::Gmpo),
                "--sampling-correction weighs each token's loss: not with --policy-loss vespo or gmpo, which form their own weights",
            ),
            (
                self.sampling_correction_max > 0.0
                    && self
                        .sampling_correction_min
                        .is_none_or(|m| m >= 0.0 && m < self.sampling_correction_max),
                "--sampling-correction-max must be > 0 and --sampling-correction-min in [0, max)",
            ),
            (
                self.num_generations_eval != Some(0),
                "--num-generations-eval must be at least 1",
            ),
            (
                self.eval_prompts.is_some()
                    || (self.eval_every == 0 && self.num_generations_eval.is_none()),
                "--eval-every and --num-generations-eval need --eval-prompts",
            ),
            (
                self.generation_batch_size != Some(0),
                "--generation-batch-size must be at least 1",
            ),
            (
                self.forward_batch_size != Some(0),
                "--forward-batch-size must be at least 1",
            ),
            (
                self.answer_pattern.is_none() || self.reads_answers(),
                "--answer-pattern needs --reward-rule exact-answer or cosine-scaled",
            ),
            (
                self.cosine_max_len != Some(0),
                "--cosine-max-len must be at least 1",
            ),
            (
                weights_fit(&self.reward_rule_weight, self.reward_rule.len()),
                "--reward-rule-weight: give one per --reward-rule, in their order (or none: 1 each)",
            ),
            (
                weights_fit(&self.reward_model_weight, self.reward_model.len()),
                "--reward-model-weight: give one per --reward-model, in their order (or none: 1 each)",
            ),
            (
                self.reward_model.len() <= crate::train::REWARD_MODEL_NAMES.len(),
                "--reward-model: at most 8",
            ),
            (
                weights_fit(&self.reward_command_weight, self.reward_command.len()),
                "--reward-command-weight: give one per --reward-command, in their order (or none: 1 each)",
            ),
            (
                self.reward_command.len() <= crate::train::REWARD_COMMAND_NAMES.len(),
                "--reward-command: at most 8",
            ),
            (
                self.has_rule(RewardRule::Format) == self.format_pattern.is_some(),
                "--reward-rule format needs --format-pattern REGEX (and the option needs the rule)",
            ),
            (
                self.has_rule(RewardRule::SoftOverlong) == self.soft_punish_cache.is_some(),
                "--reward-rule soft-overlong needs --soft-punish-cache N (and the option needs the rule)",
            ),
            (
                self.soft_punish_cache.is_none_or(|c| c <= self.response_length as usize),
                "--soft-punish-cache must be at most --response-length",
            ),
            (
                self.repetition_ngram_size >= 1 && self.repetition_max_penalty <= 0.0,
                "--repetition-ngram-size must be at least 1 and --repetition-max-penalty ≤ 0",
            ),
            (
                self.reward_rule
                    .iter()
                    .enumerate()
                    .all(|(i, r)| !self.reward_rule[..i].contains(r)),
                "--reward-rule: each rule at most once",
            ),
            (self.cliprange > 0.0, "--cliprange must be > 0"),
            (self.cliprange_value > 0.0, "--cliprange-value must be > 0"),
            (self.vf_coef >= 0.0, "--vf-coef must be ≥ 0"),
            (
                self.value_lr.is_none_or(|lr| lr > 0.0),
                "--value-lr must be > 0",
            ),
            (self.ptx_coef >= 0.0, "--ptx-coef must be ≥ 0"),
            (
                self.ptx_coef == 0.0 || self.ptx_data.is_some(),
                "--ptx-coef needs --ptx-data",
            ),
            (
                self.ema_decay.is_none_or(|d| (0.0..1.0).contains(&d)),
                "--ema-decay must be in [0, 1)",
            ),
            (
                self.max_prompt_length > 0,
                "--max-prompt-length must be at least 1",
            ),
        ])?;
        Ok(())
    }
}

/// Whether `weights` fit `items` repeated sources: none (1 each), or one each; or one with
/// no source, as a `config.toml` written before the sources repeated says
/// (`reward_model_weight = 1.0`, with or without a model).
fn weights_fit(weights: &[f64], items: usize) -> bool {
    weights.is_empty() || weights.len() == items || (weights.len() == 1 && items == 0)
}

/// The weights of `items` repeated sources: as given, or 1 each.
fn weights_of(weights: &[f64], items: usize) -> Vec<f64> {
    (0..items)
        .map(|i| weights.get(i).copied().unwrap_or(1.0))
        .collect()
}

/// One reward model or command as a string (as `config.toml` always had it), several as a
/// list.
fn one_or_list<T: Serialize, S: serde::Serializer>(
    items: &[T],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match items {
        [one] => one.serialize(s),
        many => many.serialize(s),
    }
}

/// The reward models' or commands' weights as `config.toml` always had them, a number (1.0
/// when none was given), or a list for several.
fn weights_one_or_list<S: serde::Serializer>(
    weights: &[f64],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match weights {
        [] => s.serialize_f64(1.0),
        [one] => s.serialize_f64(*one),
        many => many.serialize(s),
    }
}
