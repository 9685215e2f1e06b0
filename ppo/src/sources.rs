//! The command line's reward sources, built: `--reward-rule`s as functions, and the
//! `--reward-model`s loaded (each with its tokenizer where that is not the policy's, the
//! first perhaps as the critic's base). [`crate::train::run`] sums them with their weights.

use std::path::Path;

use anyhow::{bail, Result};
use common::models::adapter::AdapterDir;
use common::{Head, Model, ModelOptions};
use data::Tokenizer;
use tch::{Device, Kind};

use crate::args::{RewardRule, TrainArgs};
use crate::reward_fn::{
    CosineScaled, ExactAnswer, FormatRule, Repetition, RewardFunction, SoftOverlong, TextRule,
    ThinkFormat,
};

/// The value model starts from the first reward model (without --value-model, as
/// InstructGPT), and reads the policy's tokens: that reward model must share the policy's
/// vocabulary.
fn check_critic_tokenizer(
    policy: &Tokenizer,
    reward: &Tokenizer,
    args: &TrainArgs,
    dir: &Path,
) -> Result<()> {
    if !policy.same_vocabulary(reward) {
        bail!(
            "{} has a tokenizer other than the policy's ({}), so it cannot start the value model: give --value-model DIR (a model with the policy's tokenizer) or a critic-free --advantage-estimator",
            dir.display(),
            args.policy.display()
        );
    }
    Ok(())
}

fn warn_without_normalization(config: &serde_json::Map<String, serde_json::Value>, dir: &Path) {
    if !config.contains_key(common::scoring::BIAS_KEY) {
        tracing::warn!(
            "{}: no {} in config.json — not a model from `reward train`? Its raw scores are used",
            dir.display(),
            common::scoring::BIAS_KEY
        );
    }
}

/// A `--reward-rule`: its name in the metrics, its weight and its function.
pub type Rule = (&'static str, f64, Box<dyn RewardFunction>);

/// The `--reward-rule`s, each with its name in the metrics (`rewards/NAME/mean`: TRL's
/// function names for TRL's functions) and its weight.
pub fn rule_functions(args: &TrainArgs) -> Result<Vec<Rule>> {
    args.rule_weights()
        .into_iter()
        .map(|(rule, weight)| {
            let (name, function): (&'static str, Box<dyn RewardFunction>) = match rule {
                RewardRule::ExactAnswer => (
                    "exact_answer",
                    Box::new(ExactAnswer::new(
                        args.answer_pattern.as_deref(),
                        args.format_penalty,
                    )?),
                ),
                RewardRule::SoftOverlong => (
                    "soft_overlong_punishment_reward",
                    Box::new(SoftOverlong {
                        max_len: args.response_length as usize,
                        cache: args.soft_punish_cache.unwrap_or(0),
                    }),
                ),
                RewardRule::Repetition => (
                    "repetition_penalty_reward",
                    Box::new(Repetition {
                        n: args.repetition_ngram_size,
                        max_penalty: args.repetition_max_penalty,
                    }),
                ),
                RewardRule::ThinkFormat => (
                    "think_format_reward",
                    Box::new(TextRule(|t: &str| {
                        f64::from(u8::from(ThinkFormat::matches(t)))
                    })),
                ),
                RewardRule::CosineScaled => (
                    "cosine_scaled_reward",
                    Box::new(CosineScaled {
                        answer: ExactAnswer::new(args.answer_pattern.as_deref(), 0.0)?,
                        max_len: args.cosine_max_len.unwrap_or(args.response_length as usize),
                        values: (
                            args.cosine_min_value_wrong,
                            args.cosine_max_value_wrong,
                            args.cosine_min_value_correct,
                            args.cosine_max_value_correct,
                        ),
                    }),
                ),
                RewardRule::Format => {
                    let format =
                        FormatRule::new(args.format_pattern.as_deref().unwrap_or_default())?;
                    (
                        "format_reward",
                        Box::new(TextRule(move |t: &str| {
                            f64::from(u8::from(format.matches(t)))
                        })),
                    )
                }
            };
            Ok((name, weight, function))
        })
        .collect()
}

/// A reward model with a tokenizer of its own renders conversations with its own chat
/// template: without one, conversational prompts are refused before anything is written,
/// naming the first such row.
fn refuse_conversations_without_template(args: &TrainArgs, reward_dir: &Path) -> Result<()> {
    for path in std::iter::once(&args.prompts).chain(&args.eval_prompts) {
        let rows = data::read_prompts(path)?;
        if let Some(i) = rows
            .iter()
            .position(|p| matches!(p.prompt, data::Content::Messages(_)))
        {
            return Err(rows
                .error(i, None, format!(
                    "a conversation, but the reward model {} has a tokenizer of its own and no chat template to render it with (give it one, or prompts as text)",
                    reward_dir.display()
                ))
                .into());
        }
    }
    Ok(())
}

/// Each `--reward-model`'s name in the metrics (`rewards/NAME/mean`), in their order.
pub const REWARD_MODEL_NAMES: [&str; 8] = [
    "reward_model",
    "reward_model_2",
    "reward_model_3",
    "reward_model_4",
    "reward_model_5",
    "reward_model_6",
    "reward_model_7",
    "reward_model_8",
];

/// Each `--reward-command`'s name in the metrics (`rewards/NAME/mean`), in their order.
pub const REWARD_COMMAND_NAMES: [&str; 8] = [
    "reward_command",
    "reward_command_2",
    "reward_command_3",
    "reward_command_4",
    "reward_command_5",
    "reward_command_6",
    "reward_command_7",
    "reward_command_8",
];

/// A `--reward-model` held for scoring: its weights, the id that pads its batches, and
/// its tokenizer where that is not the policy's.
pub(crate) struct LoadedReward {
    pub model: Model,
    pub pad_id: i64,
    pub own_tokenizer: Option<Tokenizer>,
}

/// The `--reward-model`s loaded, and whether the first is the critic's base instead (LoRA
/// with a full reward model: the critic is that model with an adapter, and the reward the
/// same weights with the adapter off — one copy in memory).
pub(crate) struct RewardModels {
    loaded: Vec<LoadedReward>,
    pub critic_base: bool,
}

impl std::ops::Deref for RewardModels {
    type Target = [LoadedReward];
    fn deref(&self) -> &[LoadedReward] {
        &self.loaded
    }
}

pub(crate) fn load_reward_models(
    args: &TrainArgs,
    device: Device,
    kind: Kind,
) -> Result<RewardModels> {
    let mut out = RewardModels {
        loaded: vec![],
        critic_base: false,
    };
    if args.reward_model.is_empty() {
        return Ok(out);
    }
    let policy_tok = Tokenizer::load(&args.policy)?;
    let starts_critic = args.value_model.is_none() && args.advantage_estimator().needs_critic();
    for (i, reward_dir) in args.reward_model.iter().enumerate() {
        if i == 0 && args.reward_is_critic_base() && AdapterDir::read(reward_dir)?.is_none() {
            let tok = Tokenizer::load(reward_dir)?;
            check_critic_tokenizer(&policy_tok, &tok, args, reward_dir)?;
            let config = common::ModelConfig::load(reward_dir)?;
            warn_without_normalization(&config.raw, reward_dir);
            out.critic_base = true;
            continue;
        }
        let frozen = ModelOptions {
            base_model: args.adapter.base_model.clone(),
            ..ModelOptions::new(Head::Score, device, kind).frozen()
        };
        let (model, tok) = Model::load_with_tokenizer(reward_dir, &frozen)?;
        warn_without_normalization(&model.config.raw, reward_dir);
        if i == 0 && starts_critic {
            check_critic_tokenizer(&policy_tok, &tok, args, reward_dir)?;
        }
        // A reward model of another family reads the responses as text in its own tokens
        // and chat template, as TRL's GRPOTrainer gives them to it.
        let own = !policy_tok.same_vocabulary(&tok);
        if own {
            if !tok.has_chat_template() {
                refuse_conversations_without_template(args, reward_dir)?;
            }
            tracing::info!(
                "{}: a tokenizer of its own; responses are scored as text in its tokens and chat template",
                reward_dir.display()
            );
        }
        let pad_id = tok.pad_id;
        let own_tokenizer = match (own, &args.tokenizer.chat_template_kwargs) {
            (false, _) => None,
            (true, Some(kwargs)) => Some(tok.with_template_kwargs(kwargs.clone())),
            (true, None) => Some(tok),
        };
        out.loaded.push(LoadedReward {
            model,
            pad_id,
            own_tokenizer,
        });
    }
    Ok(out)
}
