//! `ppo train`: InstructGPT step 3. One iteration (one step) = one rollout batch of
//! prompts, its rewards and advantages, then `--ppo-epochs` passes of clipped policy and
//! value updates over shuffled minibatches, optionally with the pretraining loss mixed in
//! (PPO-ptx). [`train`] reads top to bottom: rollout → rewards → advantages → update →
//! log → checkpoint.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use common::averaging::Average;
use common::cli::OptimArgs;
use common::generate::SamplingConfig;
use common::models::adapter::AdapterDir;
use common::schedule::Schedule;
use common::scoring::Normalization;
use common::train::Session;
use common::{Head, Model, ModelOptions, Trainee, World};
use data::prompts::collate_left;
use data::sampler::{Sampler, SamplerPosition};
use data::sft::{prepare, TokenizedSft, Truncation};
use data::Tokenizer;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::a2po::OptimalValues;
pub use crate::args::TrainArgs;
use crate::log::{iteration_scalars, logged_metrics, twice_named, write_samples, Timings};
use crate::math::{
    advantages, kl_per_token, nan_mean_over, rewards, sampling_correction, AdvantageEstimator,
    Advantages, EntropyController, KlController,
};
use crate::reward_fn::{row_answer, RewardCommand, RewardFunction, RewardModel, RewardSource};
use crate::rollout::{
    rollout, sample_and_reward, score_sampled, RefModel, Reprompt, Rollout, RolloutModels,
    RolloutOptions, Sampled,
};
use crate::sdft::{AdapterEma, Teacher, TeacherInputs, TeacherKind};
use crate::sources::load_reward_models;
pub use crate::sources::{rule_functions, Rule, REWARD_COMMAND_NAMES, REWARD_MODEL_NAMES};
use crate::tools::{read_schemas, EnvironmentCommand, ToolCommand, ToolFormat, ToolRunner, Tools};
use crate::update::{derived_seed, update, Learners, Ptx, UpdateStats};
use data::formats::{PromptExample, PromptFields};

/// PPO's own part of `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct PpoState {
    kl_coef: f64,
    ptx_sampler: SamplerPosition,
    /// The entropy bonus's coefficient and last entropy (absent in earlier checkpoints).
    #[serde(default)]
    entropy: Option<EntropyController>,
    /// Prompt and response tokens of every rollout so far, all ranks (TRL's `num_tokens`;
    /// 0 in earlier checkpoints).
    #[serde(default)]
    num_tokens: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    pub first_score: f64,
    pub last_score: f64,
    /// The last iteration's KL to the reference (`None` with `--kl-coef 0`: none held).
    pub kl: Option<f64>,
    pub kl_coef: f64,
    /// A signal stopped the run (checkpointed; no `final/` yet).
    pub stopped: bool,
}

/// One source of a rollout's scores.
#[derive(Clone, Copy)]
enum Scorer<'a> {
    Function(RewardSource<'a>),
    /// The reward model of `--reward-model` is the critic with its adapter switched off
    /// (with its weight).
    CriticBase(f64),
}

/// `--tool-command`'s or `--environment-command`'s program, started; the environment also
/// as itself, for its reward.
type ToolPrograms = (Option<Arc<dyn ToolRunner>>, Option<Arc<EnvironmentCommand>>);

fn start_tool_program(args: &TrainArgs) -> Result<ToolPrograms> {
    let timeout = std::time::Duration::from_secs_f64(args.tool_timeout);
    Ok(match args.tool_program() {
        None => (None, None),
        Some((_, command, false)) => (Some(Arc::new(ToolCommand::start(command, timeout)?)), None),
        Some((_, command, true)) => {
            let environment = Arc::new(EnvironmentCommand::start(command, timeout)?);
            (Some(environment.clone()), Some(environment))
        }
    })
}

/// `ppo train` with the rewards of the command line: `--reward-rule` and `--reward-model`,
/// summed with their weights.
pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.validate()?;
    ensure!(
        !args.reward_model.is_empty()
            || !args.reward_rule.is_empty()
            || !args.reward_command.is_empty()
            || args.environment_reward
            || args.advantage_estimator() == AdvantageEstimator::Sdft,
        "no reward: give --reward-model DIR, --reward-rule RULE, --reward-command CMD and/or --environment-reward"
    );
    let world = args.run.world()?;
    let (device, kind) = args.device.resolve_for(&world);
    let rules = rule_functions(args)?;
    let (tools, environment) = start_tool_program(args)?;
    // The programs decode the prompts with the policy's tokenizer, read once for all.
    let mut commands = vec![];
    if !args.reward_command.is_empty() {
        let tokenizer = Arc::new(Tokenizer::load(&args.policy)?);
        let timeout = std::time::Duration::from_secs_f64(args.reward_timeout);
        for cmd in &args.reward_command {
            commands.push(RewardCommand::start(cmd, tokenizer.clone(), timeout)?);
        }
    }
    let mut sources: Vec<Scorer> = rules
        .iter()
        .map(|(name, weight, function)| {
            Scorer::Function(RewardSource {
                name,
                weight: *weight,
                function: function.as_ref(),
            })
        })
        .collect();
    for ((c, name), weight) in commands
        .iter()
        .zip(REWARD_COMMAND_NAMES)
        .zip(args.reward_command_weights())
    {
        sources.push(Scorer::Function(RewardSource {
            name,
            weight,
            function: c,
        }));
    }
    if let (Some(e), true) = (&environment, args.environment_reward) {
        sources.push(Scorer::Function(RewardSource {
            name: "environment",
            weight: args.environment_reward_weight,
            function: &**e,
        }));
    }
    let models = load_reward_models(args, device, kind)?;
    let batch_size = args.forward_batch_size.unwrap_or(args.rollout_rows());
    let rewards: Vec<RewardModel> = models
        .iter()
        .map(|m| RewardModel {
            normalization: Normalization::of(&m.model),
            model: &m.model,
            pad_id: m.pad_id,
            batch_size,
            without_adapters: false,
            own_tokenizer: m.own_tokenizer.as_ref(),
        })
        .collect();
    let weights = args.reward_model_weights();
    if models.critic_base {
        sources.push(Scorer::CriticBase(weights[0]));
    }
    let first = usize::from(models.critic_base);
    for (k, reward) in rewards.iter().enumerate() {
        sources.push(Scorer::Function(RewardSource {
            name: REWARD_MODEL_NAMES[first + k],
            weight: weights[first + k],
            function: reward,
        }));
    }
    train(args, &sources, tools, (device, kind), world)
}

/// `ppo train` against any reward function (the command line's reward options unused).
pub fn run_with_reward(args: &TrainArgs, reward: &dyn RewardFunction) -> Result<TrainSummary> {
    args.validate()?;
    let world = args.run.world()?;
    let (device, kind) = args.device.resolve_for(&world);
    let source = Scorer::Function(RewardSource {
        name: "reward",
        weight: 1.0,
        function: reward,
    });
    let (tools, _) = start_tool_program(args)?;
    train(args, &[source], tools, (device, kind), world)
}

/// Prompt token ids, one row each, each row's other fields, and each row's prompt as given
/// (which an environment's observations extend, and a reward model with a tokenizer of its
/// own reads).
/// Prompt rows: their tokens, their other fields, the prompts as given, and with SDFT each
/// one's teacher prompt, tokenized.
type Prompts = (
    Vec<Vec<i64>>,
    Vec<PromptFields>,
    Vec<PromptExample>,
    Option<Vec<Vec<i64>>>,
);

/// Prompts (cut to `--max-prompt-length`, keeping their end) and PPO-ptx rows, both also
/// cut to what the policy's position table holds.
fn read_data(
    args: &TrainArgs,
    tok: &Tokenizer,
    policy: &Model,
) -> Result<(Prompts, Option<Vec<TokenizedSft>>)> {
    let prompts = read_prompts(&args.prompts, args, tok, policy)?;
    let ptx = match &args.ptx_data {
        Some(path) => {
            let rows = data::read_sft(path)?;
            let max_length = policy.cap_length(args.ptx_max_length, "--ptx-max-length");
            let prepared = prepare(
                &rows,
                tok,
                (max_length, Truncation::Truncate),
                true,
                Default::default(),
            )?;
            ensure!(
                !prepared.rows.is_empty(),
                "{}: no PPO-ptx row left",
                path.display()
            );
            Some(prepared.rows)
        }
        None => None,
    };
    Ok((prompts, ptx))
}

/// `--max-prompt-length`, as the policy's positions allow beside `--response-length`.
fn max_prompt_length(args: &TrainArgs, policy: &Model) -> Result<usize> {
    let room = policy.prompt_room(args.response_length as usize, "--response-length")?;
    Ok(args.max_prompt_length.min(room))
}

/// The prompts of `path` (`--prompts`, `--eval-prompts`), cut to `--max-prompt-length`
/// (keeping their end) and to what the policy's position table holds.
fn read_prompts(path: &Path, args: &TrainArgs, tok: &Tokenizer, policy: &Model) -> Result<Prompts> {
    let max_prompt_length = max_prompt_length(args, policy)?;
    let mut rows = data::read_prompts_with_fields(path)?;
    if let Some(file) = &args.tools {
        let tools = read_schemas(file)?;
        for (prompt, _) in rows.iter_mut() {
            prompt.template.tools.get_or_insert_with(|| tools.clone());
        }
    }
    if args.reads_answers() {
        if let Some(i) = rows.iter().position(|(_, f)| row_answer(f).is_none()) {
            return Err(rows
                .error(i, Some("answer"), "missing (or not a string or number): --reward-rule exact-answer and cosine-scaled compare responses with it")
                .into());
        }
    }
    if matches!(args.advantage_estimator(), AdvantageEstimator::Sdpo { .. }) {
        // SDPO's teacher prompts are made mid-run: a row they cannot be made of stops the
        // run now, named.
        if let Some(i) = rows.iter().position(|(p, _)| !crate::sdft::rewritable(p)) {
            return Err(rows
                .error(i, Some("messages"), "SDPO's teacher prompt replaces the conversation's last user turn: it must end with one")
                .into());
        }
    }
    let fields = rows.iter().map(|(_, f)| f.clone()).collect();
    let examples = rows.iter().map(|(p, _)| p.clone()).collect();
    let prompts: Vec<Vec<i64>> = rows
        .iter()
        .enumerate()
        .map(|(i, (p, _))| tok.encode_prompt(p).map_err(|e| rows.locate(i, e)))
        .collect::<data::Result<_>>()?;
    let long = prompts
        .iter()
        .filter(|p| p.len() > max_prompt_length)
        .count();
    if long > 0 {
        tracing::warn!(
            "{}: {long} prompts cut to their last {max_prompt_length} tokens",
            path.display(),
        );
    }
    let prompts = prompts
        .into_iter()
        .map(|p| p[p.len().saturating_sub(max_prompt_length)..].to_vec())
        .collect();
    let teacher = (args.advantage_estimator() == AdvantageEstimator::Sdft)
        .then(|| {
            let template = &args.sdft.teacher_prompt_template;
            crate::sdft::teacher_prompts(&rows, template, tok, max_prompt_length)
        })
        .transpose()?;
    Ok((prompts, fields, examples, teacher))
}

/// The context of an error raised while sampling or scoring a rollout (a reward program
/// that crashed, hung or answered garbage): a checkpoint of the last completed step is
/// written before the run stops (when a step has completed).
#[derive(Debug)]
struct RolloutFailed;

impl std::fmt::Display for RolloutFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the rollout failed (the steps completed so far are checkpointed: fix the cause and continue with --resume)")
    }
}

/// Everything one PPO run holds between iterations.
struct Ppo<'a> {
    args: &'a TrainArgs,
    iterations: u64,
    tok: Tokenizer,
    policy: Trainee,
    /// The value model, when the advantage estimator needs one.
    critic: Option<Trainee>,
    /// The reference: a frozen copy, the policy with its adapter off, or none at all.
    reference: Reference,
    rewards: &'a [Scorer<'a>],
    prompts: Vec<Vec<i64>>,
    fields: Vec<PromptFields>,
    /// The prompts as their rows gave them.
    examples: Vec<PromptExample>,
    /// `--max-prompt-length`, as the policy's positions allow.
    max_prompt_length: usize,
    /// `--eval-prompts`, when given.
    eval_prompts: Option<Prompts>,
    sampler: Sampler,
    ptx: Option<Ptx>,
    kl_ctl: KlController,
    entropy: EntropyController,
    eos_ids: Vec<i64>,
    /// `--tool-command`'s or `--environment-command`'s tools.
    tools: Option<Tools>,
    /// Prompt and response tokens of every rollout so far, all ranks (`num_tokens`).
    num_tokens: f64,
    /// A*-PO: each prompt's optimal value (of `prompts`).
    v_star: Option<Vec<f64>>,
    /// The prompts (of `prompts`) of the last rollout's rows, in order.
    batch_rows: Vec<usize>,
    /// SDFT: each prompt's teacher prompt (of `prompts`).
    teacher_prompts: Option<Vec<Vec<i64>>>,
    /// SDFT's and SDPO's EMA teacher of a fresh LoRA adapter.
    teacher_ema: Option<AdapterEma>,
}

/// The reference the KL penalty measures against, as the run holds it.
enum Reference {
    /// A frozen copy of the starting policy.
    Frozen(Box<Model>),
    /// A fresh adapter on the policy: the policy with it switched off.
    AdapterOff,
    /// `--kl-coef 0` (TRL's GRPO default β = 0): the penalty weighs nothing, so no
    /// reference is loaded or run, and no KL is measured.
    NotHeld,
}

/// A rollout whose responses every reward source left unscored (each answered null, TRL's
/// unscorable completions): the group estimators leave them out of their baselines and give
/// them no advantage, as TRL's do, and a warning names the first; the other estimators need
/// a reward for every response, so the rollout fails naming it.
fn unscored_responses(ro: Rollout, estimator: AdvantageEstimator) -> Result<Rollout> {
    let scores = Vec::<f64>::try_from(ro.scores.to_device(tch::Device::Cpu).to_kind(Kind::Double))?;
    let unscored: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].is_nan()).collect();
    let Some(&first) = unscored.first() else {
        return Ok(ro);
    };
    if estimator == AdvantageEstimator::Sdft {
        // SDFT learns from its teacher: a reward is only logged.
        return Ok(ro);
    }
    let shown: String = ro.texts[first].chars().take(60).collect();
    let what = format!("response {first} of the batch ('{shown}')");
    anyhow::ensure!(
        estimator.is_group(),
        "{what}: no reward source scored it (each answered null); only the group estimators \
         (grpo, dr-grpo, rloo) leave such responses out, the others need a reward for every \
         response"
    );
    eprintln!(
        "warning: {} of {} responses had no reward (every source answered null), first {what}: \
         they are left out of their groups' baselines and get no advantage",
        unscored.len(),
        scores.len()
    );
    Ok(ro)
}

/// What one iteration measured, for the log and the summary.
pub(crate) struct Iteration {
    pub ro: Rollout,
    pub adv: Advantages,
    pub rewards: tch::Tensor,
    pub non_score: tch::Tensor,
    /// The KL estimate's per-sequence sum averaged over the batch (all ranks; `None`
    /// when no reference is held), and the coefficient β it was weighted with.
    pub mean_kl: Option<f64>,
    pub beta: f64,
    /// The entropy bonus's coefficient after the iteration (when the loss has a bonus).
    pub entropy_coef: Option<f64>,
    /// Mean score over the batch (all ranks).
    pub mean_score: f64,
    /// A*-PO: the mean optimal value of the batch's prompts (all ranks; TRL's `v_star`).
    pub v_star: Option<f64>,
    /// Prompt and response tokens of every rollout so far (all ranks).
    pub num_tokens: f64,
    pub stats: UpdateStats,
    pub timings: Timings,
}

fn train(
    args: &TrainArgs,
    rewards: &[Scorer],
    tool_program: Option<Arc<dyn ToolRunner>>,
    (device, kind): (Device, Kind),
    world: World,
) -> Result<TrainSummary> {
    if !args.rollout_batch_size.is_multiple_of(world.size()) {
        anyhow::bail!(
            "--rollout-batch-size {} is not a multiple of the {} ranks (each rank samples an equal share of the prompts)",
            args.rollout_batch_size,
            world.size()
        );
    }
    args.run.seed_torch();
    let mut ppo = Ppo::load(args, rewards, tool_program, (device, kind), &world)?;
    // A*-PO's first stage: sampled now, from the starting policy, or read back on --resume.
    let optimal = match args.advantage_estimator() {
        AdvantageEstimator::A2po => Some(ppo.optimal_values(&world)?),
        _ => None,
    };
    let mut session = Session::start(
        "ppo",
        args,
        &args.run,
        ppo.iterations,
        world,
        &mut ppo.trainees(),
    )
    .context("starting the run")?;
    if let Some((values, false)) = &optimal {
        if session.world.is_main() {
            values.write(args)?;
        }
    }
    ppo.resume(&session)?;
    let (mut first_score, mut last_score, mut last_kl) = (None, f64::NAN, None);
    while !session.done() && session.stop_requested().is_none() {
        let it = match ppo.iteration(&mut session) {
            Ok(it) => it,
            Err(e) if e.downcast_ref::<RolloutFailed>().is_some() => {
                // Nothing of this iteration was applied: the run stays resumable from here.
                if session.state.step > 0 {
                    ppo.save(&mut session)?;
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let mut scalars = iteration_scalars(&it, &session, args.advantage_estimator().group());
        let step = session.state.step;
        if ppo.eval_prompts.is_some()
            && ((args.eval_every > 0 && step % args.eval_every == 0) || session.at_end())
        {
            match ppo.evaluate(&session.world, step) {
                Ok(eval) => scalars.extend(eval),
                Err(e) => {
                    // The step's update is applied: keep it before stopping.
                    ppo.save(&mut session)?;
                    return Err(e.context("evaluating --eval-prompts"));
                }
            }
        }
        scalars.extend(logged_metrics(&session.world, &it.ro.logged.metrics, ""));
        if let Some(name) = twice_named(&scalars) {
            ppo.save(&mut session)?;
            anyhow::bail!(
                "a reward program logged the metric '{name}' (\"metrics\" in its answers: TRL's log_metric), a name this run logs itself; give it another name"
            );
        }
        let scalars: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        session.log(session.state.step, &scalars)?;
        ppo.warn_on_first_ratio(&it.stats, session.state.step);
        if args.sample_every > 0
            && (session.state.step % args.sample_every == 0 || session.state.step == 1)
        {
            // One advantage per response where the estimator gives each response one.
            let estimator = args.advantage_estimator();
            let per_sequence = estimator.is_group() || estimator == AdvantageEstimator::A2po;
            let advantages = per_sequence.then_some(&it.adv.advantages);
            write_samples(
                &mut session,
                (&it.ro, advantages),
                &ppo.tok,
                args.num_samples,
            )?;
        }
        first_score.get_or_insert(it.mean_score);
        (last_score, last_kl) = (it.mean_score, it.mean_kl);
        if session.checkpoint_due() {
            ppo.save(&mut session)?;
        }
    }
    let stopped = session.stop_requested().is_some();
    if stopped {
        session.report_stop();
    } else {
        ppo.write_finals(&session)?;
    }
    session.finish();
    Ok(TrainSummary {
        steps: session.state.step,
        first_score: first_score.unwrap_or(f64::NAN),
        last_score,
        kl: last_kl,
        kl_coef: ppo.kl_ctl.value,
        stopped,
    })
}

impl<'a> Ppo<'a> {
    /// Reads the policy (trained), the reference (the same weights, frozen; with a fresh
    /// LoRA adapter the policy itself with the adapter off), the critic (from `--value-model`, else the
    /// reward model) when the estimator has one, the prompts and the PPO-ptx rows.
    fn load(
        args: &'a TrainArgs,
        rewards: &'a [Scorer<'a>],
        tool_program: Option<Arc<dyn ToolRunner>>,
        (device, kind): (Device, Kind),
        world: &World,
    ) -> Result<Self> {
        let lm = ModelOptions {
            disable_dropout: args.disable_dropout,
            cast_lm_head_to_fp32: args.cast_lm_head_to_fp32,
            ..args.memory.apply(
                args.adapter
                    .apply(ModelOptions::new(Head::Lm, device, kind)),
            )
        };
        let (mut policy, tok) = Model::load_with_tokenizer(&args.policy, &lm)?;
        let tok = args.tokenizer.apply(&mut policy, tok)?;
        // A fresh adapter on a full model switched off is the SFT policy; an adapter
        // directory's base without its adapter is not, so it gets a frozen copy.
        let fresh_adapter =
            policy.options.has_adapter() && AdapterDir::read(&args.policy)?.is_none();
        anyhow::ensure!(
            !args.sync.sync_ref_model || (args.kl_coef > 0.0 && !fresh_adapter),
            "--sync-ref-model needs a reference copy to move: not with --kl-coef 0 (none is held) nor with a fresh LoRA or prompt-tuning adapter (the reference is the policy with its adapter off)"
        );
        // SDFT's and SDPO's EMA teacher of a fresh LoRA adapter: a second set of the
        // adapter's weights (TRL's PEFTAdapterEMACallback).
        let teacher_ema = match args.reference_sync().sync_ref_model && fresh_adapter {
            true => Some(AdapterEma::new(&policy).map_err(|name| {
                anyhow::anyhow!("--teacher-model-kind ema with an adapter keeps an average of the LoRA weights alone, and {name} trains too (prompt tuning, --lora-modules-to-save, --trainable-token-indices): use base or live")
            })?),
            false => None,
        };
        let reference = if !args.holds_reference() {
            tracing::info!(
                "no reference model is held or run (--kl-coef 0: the KL penalty weighs nothing; or SDFT's live teacher); objective/kl is not logged"
            );
            Reference::NotHeld
        } else if fresh_adapter {
            Reference::AdapterOff
        } else {
            Reference::Frozen(Box::new(Model::load(&args.policy, &lm.clone().frozen())?.0))
        };
        let critic = if args.advantage_estimator().needs_critic() {
            let dir = args.critic_source();
            let (critic, _) = Model::load(dir, &lm.with_head(Head::Score))
                .with_context(|| format!("loading the value model from {}", dir.display()))?;
            Some(critic)
        } else {
            None
        };
        let ((prompts, fields, examples, teacher_prompts), ptx_rows) =
            read_data(args, &tok, &policy)?;
        // A response template of the tokenizer's own reads the answers (rollout's
        // completion_messages): one that cannot be read stops the run now.
        tok.response_template()?;
        let max_prompt_length = max_prompt_length(args, &policy)?;
        let tools = tool_program
            .map(|runner| -> Result<Tools> {
                Ok(Tools {
                    format: ToolFormat::of(&tok).map_err(|e| {
                        let (option, _, _) = args.tool_program().expect("a tool program");
                        anyhow::anyhow!("{option}: {e}")
                    })?,
                    runner,
                    max_iterations: args.max_tool_calling_iterations.unwrap_or(usize::MAX),
                })
            })
            .transpose()?;
        let eval_prompts = args
            .eval_prompts
            .as_deref()
            .map(|path| read_prompts(path, args, &tok, &policy))
            .transpose()?;
        // Both learners' schedules run over every optimiser update of the run; the
        // critic's at --value-lr.
        let (iterations, updates) = run_length(args, prompts.len());
        let schedule = args.optim.schedule(updates);
        let mut policy =
            Trainee::new("policy", policy, &args.policy, &args.optim, world, schedule)?;
        if let Some(decay) = args.ema_decay {
            policy.keep_average(Average::Ema { decay }, world);
        }
        let critic = critic
            .map(|c| {
                let schedule = Schedule {
                    base_lr: args.value_lr.unwrap_or(args.optim.lr),
                    ..schedule
                };
                // LoRA+ acts where there is LoRA: a full critic beside a LoRA policy
                // trains at --value-lr throughout.
                let optim = OptimArgs {
                    loraplus_lr_ratio: args
                        .optim
                        .loraplus_lr_ratio
                        .filter(|_| c.options.lora.is_some()),
                    // The policy's weights are the ones averaged.
                    bema: Default::default(),
                    ..args.optim.clone()
                };
                Trainee::new("value", c, args.critic_source(), &optim, world, schedule)
            })
            .transpose()?;
        let ptx = ptx_rows.filter(|_| args.ptx_coef > 0.0).map(|rows| Ptx {
            sampler: Sampler::new(rows.len(), args.run.seed.wrapping_add(1), true),
            rows,
            coef: args.ptx_coef,
            pad_id: tok.pad_id,
        });
        Ok(Ppo {
            args,
            iterations,
            eos_ids: tok.generation_eos_ids()?,
            sampler: Sampler::new(prompts.len(), args.run.seed, args.shuffle_dataset),
            tok,
            policy,
            critic,
            reference,
            rewards,
            eval_prompts,
            prompts,
            fields,
            examples,
            max_prompt_length,
            ptx,
            kl_ctl: KlController {
                value: args.kl_coef,
                target: args.kl_target,
                horizon: args.kl_horizon,
            },
            entropy: args.entropy_controller(),
            tools,
            num_tokens: 0.0,
            v_star: None,
            batch_rows: vec![],
            teacher_prompts,
            teacher_ema,
        })
    }

    /// A*-PO's first stage: every training prompt's optimal value, read back from the run
    /// on `--resume`, or estimated now from `--num-value-samples` responses of the starting
    /// policy to each (every rank samples a share of each block of --rollout-batch-size
    /// prompts, as an evaluation does, and the ranks sum their shares). The prompts whose
    /// responses all scored 0 are then left out (`--filter-all-incorrect`), and the run's
    /// length is that of the prompts kept. Returns the values and whether they were read
    /// back (else the run writes them once its directory is prepared).
    fn optimal_values(&mut self, world: &World) -> Result<(OptimalValues, bool)> {
        let args = self.args;
        let n = args.num_value_samples;
        let started = Instant::now();
        let (values, read) = match OptimalValues::stored(args, self.prompts.len())? {
            Some(values) => (values, true),
            None => {
                let rewards = self.value_sample_rewards(world);
                // Every rank learns whether any rank's sampling failed (it has no collective
                // of its own), so that they all stop here.
                let failed_anywhere = world.sum(f64::from(u8::from(rewards.is_err()))) > 0.0;
                let rewards = match rewards {
                    Err(e) => return Err(e),
                    Ok(_) if failed_anywhere => bail!(
                        "A*-PO: sampling the optimal values failed on another rank (see its message)"
                    ),
                    Ok(rewards) => rewards,
                };
                // Each prompt's rewards come from one rank, zeros from the others: exact.
                let rewards = world.sum_vec(&rewards);
                let rewards = rewards.chunks(n).map(<[f64]>::to_vec).collect();
                (OptimalValues::from_rewards(rewards, args.beta1), false)
            }
        };
        let kept = values.kept(args.filter_all_incorrect);
        ensure!(
            !kept.is_empty(),
            "A*-PO: every prompt's --num-value-samples responses from the starting policy scored 0, so none has anything to teach (--filter-all-incorrect); check the rewards, or keep them with --filter-all-incorrect false"
        );
        tracing::info!(
            "A*-PO: optimal values of {} prompts from {n} responses each ({:.1}s); {} prompts whose responses all scored 0 {}",
            values.v_star.len(),
            started.elapsed().as_secs_f64(),
            values.all_incorrect.len(),
            if args.filter_all_incorrect { "left out" } else { "kept" }
        );
        self.prompts = kept
            .iter()
            .map(|&i| std::mem::take(&mut self.prompts[i]))
            .collect();
        self.fields = kept.iter().map(|&i| self.fields[i].clone()).collect();
        self.examples = kept.iter().map(|&i| self.examples[i].clone()).collect();
        self.v_star = Some(kept.iter().map(|&i| values.v_star[i]).collect());
        self.sampler = Sampler::new(self.prompts.len(), args.run.seed, args.shuffle_dataset);
        let (iterations, updates) = run_length(args, self.prompts.len());
        self.iterations = iterations;
        self.policy.schedule.total_steps = updates;
        Ok((values, read))
    }

    /// The training units, in checkpoint order.
    fn trainees(&mut self) -> Vec<&mut Trainee> {
        std::iter::once(&mut self.policy)
            .chain(self.critic.as_mut())
            .collect()
    }

    /// After `Session::start`: the sampler, KL coefficient, PPO-ptx order and EMA of the
    /// checkpoint the session resumed from (the EMA starts at the policy otherwise).
    fn resume(&mut self, session: &Session) -> Result<()> {
        let state: Option<PpoState> = serde_json::from_value(session.state.extra.clone()).ok();
        self.sampler.restore(session.state.sampler);
        if let Some(state) = &state {
            self.kl_ctl.value = state.kl_coef;
            self.num_tokens = state.num_tokens;
            if let Some(saved) = state.entropy {
                self.entropy.coef = saved.coef;
                self.entropy.last_entropy = saved.last_entropy;
            }
        }
        if let (Some(ptx), Some(state)) = (&mut self.ptx, &state) {
            ptx.sampler.restore(state.ptx_sampler);
        }
        if let (Reference::Frozen(m), Some(dir)) = (&self.reference, &session.resumed_from) {
            common::sync_ref::restore(m, dir)?;
        }
        if let (Some(ema), Some(dir)) = (&self.teacher_ema, &session.resumed_from) {
            ema.restore(dir)?;
        }
        Ok(())
    }

    /// One PPO iteration on the next rollout batch; the session counts it.
    fn iteration(&mut self, session: &mut Session) -> Result<Iteration> {
        let (args, world) = (self.args, &session.world);
        let step = session.state.step;
        let started = Instant::now();
        let ro = self
            .rollout(step, world)
            .and_then(|ro| unscored_responses(ro, args.advantage_estimator()));
        // Every rank learns whether any rank's rollout failed (the rollout itself has no
        // collective), so that they all stop here and checkpoint together.
        let failed_anywhere = world.sum(f64::from(u8::from(ro.is_err()))) > 0.0;
        let mut ro = match ro {
            Err(e) => return Err(e.context(RolloutFailed)),
            Ok(_) if failed_anywhere => {
                return Err(
                    anyhow::anyhow!("the rollout failed on another rank (see its message)")
                        .context(RolloutFailed),
                )
            }
            Ok(ro) => ro,
        };
        // SDFT and SDPO: the teacher reads the same responses after its own prompts.
        ro.teacher = match args.advantage_estimator() {
            AdvantageEstimator::Sdft => self.teacher_prompts.as_ref().map(|teacher| {
                let prompts: Vec<&[i64]> = self
                    .batch_rows
                    .iter()
                    .map(|&i| teacher[i].as_slice())
                    .collect();
                let mask = ro.response_mask();
                TeacherInputs::new(&prompts, self.tok.pad_id, (&ro.response, &mask))
            }),
            AdvantageEstimator::Sdpo { group, .. } => Some(self.sdpo_teacher(&ro, group as usize)?),
            _ => None,
        };
        ro.correction = args.sampling_correction.map(|mode| {
            sampling_correction(
                &ro.logprobs,
                &ro.sampler_logprobs,
                &ro.mask,
                mode,
                (
                    args.sampling_correction_min,
                    Some(args.sampling_correction_max),
                ),
            )
        });
        let rollout_time = started.elapsed().as_secs_f64();

        let beta = self.kl_ctl.value;
        let kl = kl_per_token(&ro.logprobs, &ro.ref_logprobs, &ro.mask, args.kl_estimator);
        // With --kl-in-loss the penalty is a loss term instead of a reward; online DPO's
        // and A*-PO's losses hold the policy to the reference themselves (β is theirs), and
        // judge the responses on their scores alone, as TRL's.
        let in_objective = args.advantage_estimator().kl_in_objective();
        let reward_beta = if args.kl_in_loss || in_objective || args.self_distillation().is_some() {
            0.0
        } else {
            beta
        };
        let (rewards, non_score) = rewards(
            &kl,
            &ro.scores,
            &ro.mask,
            reward_beta,
            args.whiten_rewards,
            world,
        );
        // What TRL's OnlineDPOTrainer logs as the non-score reward all the same: −β·KL.
        let non_score = if in_objective { &kl * -beta } else { non_score };
        // A*-PO's baseline: the optimal value of each row's prompt.
        let v_star = self.v_star.as_ref().map(|v| {
            let rows: Vec<f64> = self.batch_rows.iter().map(|&i| v[i]).collect();
            tch::Tensor::from_slice(&rows).to_device(ro.scores.device())
        });
        let adv = advantages(
            args.advantage_estimator(),
            &rewards,
            ro.values.as_ref().or(v_star.as_ref()),
            (&ro.mask, (&ro.source_scores, &ro.source_weights)),
            world,
        );

        let train_started = Instant::now();
        let teacher = teacher_of((&self.reference, self.teacher_ema.as_ref()), args);
        let learners = Learners {
            policy: &mut self.policy,
            critic: self.critic.as_mut(),
            ptx: self.ptx.as_mut(),
            entropy: &mut self.entropy,
            teacher: ro.teacher.as_ref().map(|_| teacher),
        };
        let stats = update(args, (&ro, &adv), learners, world, (step, beta))?;
        let train_time = train_started.elapsed().as_secs_f64();

        let mean_v_star = v_star
            .as_ref()
            .map(|v| world.mean(v.mean(Kind::Double).double_value(&[])));
        // No KL is measured without a reference (and β = 0 never adapts).
        let mean_kl = (!matches!(self.reference, Reference::NotHeld))
            .then(|| world.mean(per_sequence_mean(&kl)));
        let mean_score = nan_mean_over(world, &ro.scores);
        // TRL's `num_tokens`: the prompts' and the sampled responses' tokens (tool results
        // not counted), every rank's.
        let prompt_tokens = ro.full_mask.narrow(1, 0, ro.prompt_len).sum(Kind::Float);
        let tokens = (prompt_tokens + ro.mask.sum(Kind::Float)).double_value(&[]);
        self.num_tokens += world.sum(tokens);
        // The controller's horizon counts samples of the whole (global) rollout batch.
        if let Some(mean_kl) = mean_kl {
            self.kl_ctl.update(mean_kl, args.rollout_rows() as f64);
        }
        let state = PpoState {
            kl_coef: self.kl_ctl.value,
            ptx_sampler: self
                .ptx
                .as_ref()
                .map(|p| p.sampler.position())
                .unwrap_or_default(),
            entropy: Some(self.entropy),
            num_tokens: self.num_tokens,
        };
        session.state.extra = serde_json::to_value(&state)?;
        let loss = stats.policy_loss + args.vf_coef * stats.value_loss;
        session.finish_step(&stats.outcome, loss, self.sampler.position())?;
        let sync = args.reference_sync();
        if let (Reference::Frozen(m), true) = (&self.reference, sync.due(step + 1)) {
            common::sync_ref::mix(m, &self.policy.model, sync.ref_model_mixup_alpha);
        }
        if let (Some(ema), true) = (&self.teacher_ema, sync.due(step + 1)) {
            ema.update(&self.policy.model, sync.ref_model_mixup_alpha);
        }
        Ok(Iteration {
            ro,
            adv,
            rewards,
            non_score,
            mean_kl,
            beta,
            entropy_coef: self.entropy.on().then_some(self.entropy.coef),
            mean_score,
            v_star: mean_v_star,
            num_tokens: self.num_tokens,
            stats,
            timings: Timings {
                rollout: rollout_time,
                train: train_time,
                total: started.elapsed().as_secs_f64(),
            },
        })
    }

    /// SDPO's teacher inputs for rollout `ro` (`group` responses per prompt): each response
    /// after the prompt [`crate::sdft::sdpo_teacher_prompts`] builds from its group's
    /// successes and its row's feedback, cut to its last --max-reprompt-len tokens.
    fn sdpo_teacher(&self, ro: &Rollout, group: usize) -> Result<TeacherInputs> {
        let rows = &self.batch_rows;
        let examples: Vec<&PromptExample> = rows.iter().map(|&i| &self.examples[i]).collect();
        let fields: Vec<&PromptFields> = rows.iter().map(|&i| &self.fields[i]).collect();
        let scores = Vec::<f64>::try_from(ro.scores.to_kind(Kind::Double).to_device(Device::Cpu))?;
        let responses = (&ro.response, &ro.response_mask());
        self.sdpo_teacher_of((&examples, &fields), &scores, responses, group)
    }

    /// SDPO's teacher inputs for responses `ids` (`mask`: their tokens) to the prompt rows
    /// `examples` with `fields`, scored `scores`, `group` consecutive ones a prompt's.
    fn sdpo_teacher_of(
        &self,
        rows: (&[&PromptExample], &[&PromptFields]),
        scores: &[f64],
        (ids, mask): (&tch::Tensor, &tch::Tensor),
        group: usize,
    ) -> Result<TeacherInputs> {
        // Each response as TRL decodes a demonstration: its sampled tokens, special ones
        // left out.
        let lengths = Vec::<i64>::try_from(
            mask.sum_dim_intlist([1].as_slice(), false, Kind::Int64)
                .to_device(Device::Cpu),
        )?;
        let demos: Vec<String> = (0..lengths.len())
            .map(|r| -> Result<String> {
                let row = ids
                    .get(r as i64)
                    .narrow(0, 0, lengths[r])
                    .to_device(Device::Cpu);
                Ok(self.tok.decode(&Vec::<i64>::try_from(row)?, true))
            })
            .collect::<Result<_>>()?;
        let (prompts, active, counts) =
            crate::sdft::sdpo_teacher_prompts(rows, (scores, &demos), group, &self.args.sdft)?;
        // --max-reprompt-len, and no more than the policy's positions hold beside the
        // responses (the prompt's start goes first, as --max-prompt-length cuts).
        let room = self
            .policy
            .model
            .prompt_room(self.args.response_length as usize, "--response-length")?;
        let keep = self.args.sdft.max_reprompt_len.min(room);
        let tokenized: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| {
                let ids = self.tok.encode_prompt(p)?;
                Ok(ids[ids.len().saturating_sub(keep)..].to_vec())
            })
            .collect::<data::Result<_>>()?;
        let refs: Vec<&[i64]> = tokenized.iter().map(Vec::as_slice).collect();
        let active: Vec<f32> = active.iter().map(|&a| f32::from(u8::from(a))).collect();
        Ok(TeacherInputs {
            active: Some(tch::Tensor::from_slice(&active).to_device(ids.device())),
            counts: Some(counts),
            ..TeacherInputs::new(&refs, self.tok.pad_id, (ids, mask))
        })
    }

    /// SDFT's or SDPO's distillation loss on a block of evaluation responses (`sampled`,
    /// to the eval prompts `mine`), without gradient: Σ over the distilled tokens and
    /// their number.
    fn eval_distillation(&self, mine: &[usize], sampled: &Sampled) -> Result<[f64; 2]> {
        let (args, policy) = (self.args, &self.policy.model);
        let settings = args.self_distillation().expect("SDFT or SDPO");
        let (prompts, fields, examples, teacher) =
            self.eval_prompts.as_ref().expect("eval prompts");
        let _guard = tch::no_grad_guard();
        let g = &sampled.generated;
        // The student reads the responses after its own prompts (with
        // --generate-from-teacher they were sampled after the teacher's).
        let refs: Vec<&[i64]> = mine.iter().map(|&i| prompts[i].as_slice()).collect();
        let batch = collate_left(&refs, self.tok.pad_id, policy.device());
        let full_ids = tch::Tensor::cat(&[&batch.input_ids, &g.tokens], 1);
        let full_mask = tch::Tensor::cat(
            &[
                &batch.attention_mask,
                &g.mask.to_kind(batch.attention_mask.kind()),
            ],
            1,
        );
        let inputs = match args.advantage_estimator() {
            AdvantageEstimator::Sdpo { .. } => {
                // An evaluation's groups: --num-generations-eval responses to a prompt.
                let group = args.num_generations_eval.unwrap_or(args.num_generations);
                let rows: Vec<&PromptExample> = mine.iter().map(|&i| &examples[i]).collect();
                let row_fields: Vec<&PromptFields> = mine.iter().map(|&i| &fields[i]).collect();
                let responses = (&g.tokens, &g.mask);
                self.sdpo_teacher_of((&rows, &row_fields), &sampled.scores, responses, group)?
            }
            _ => {
                let teacher = teacher.as_ref().expect("read with the eval prompts");
                let rows: Vec<&[i64]> = mine.iter().map(|&i| teacher[i].as_slice()).collect();
                TeacherInputs::new(&rows, self.tok.pad_id, (&g.tokens, &g.mask))
            }
        };
        let teacher = teacher_of((&self.reference, self.teacher_ema.as_ref()), args);
        let mask = inputs.loss_mask(&g.mask.to_kind(Kind::Float));
        let n = mask.size()[0];
        let block = args.forward_batch_size.map_or(n, |b| b as i64).max(1);
        let mut sums = [0.0; 2];
        for start in (0..n).step_by(block as usize) {
            let len = block.min(n - start);
            let idx =
                tch::Tensor::arange_start(start, start + len, (Kind::Int64, full_ids.device()));
            let pick = |t: &tch::Tensor| t.index_select(0, &idx);
            let m = pick(&mask);
            let losses = crate::sdft::token_losses(
                (policy, teacher),
                (
                    &pick(&full_ids),
                    &pick(&full_mask),
                    batch.input_ids.size()[1],
                ),
                &inputs.pick(&idx),
                (&m, None),
                (&args.sdft, settings, args.temperature),
            );
            sums[0] += losses.loss.sum(Kind::Double).double_value(&[]);
            sums[1] += m.sum(Kind::Double).double_value(&[]);
        }
        Ok(sums)
    }

    /// A*-PO's first stage on this rank: the rewards of `--num-value-samples` responses of
    /// the policy to each of this rank's share of the prompts, `[prompt × sample]` (0 for
    /// the other ranks' prompts).
    fn value_sample_rewards(&self, world: &World) -> Result<Vec<f64>> {
        let n = self.args.num_value_samples;
        let mut rewards = vec![0.0; self.prompts.len() * n];
        let data = (&self.prompts[..], &self.fields[..], &self.examples[..]);
        self.sample_prompts(data, n, (u64::MAX - 1, 0), world, |mine, sampled| {
            for (row, (&prompt, &score)) in mine.iter().zip(&sampled.scores).enumerate() {
                ensure!(
                    !score.is_nan(),
                    "A*-PO: no reward source scored response {} of prompt {prompt} ('{}'): the optimal value needs a reward for each of its --num-value-samples responses",
                    row % n,
                    sampled.texts[row].chars().take(60).collect::<String>()
                );
                rewards[prompt * n + row % n] = score;
            }
            Ok(())
        })
        .context("A*-PO: sampling the starting policy's responses for the optimal values")?;
        Ok(rewards)
    }

    /// `g` responses sampled to every prompt of `prompts` (their tokens, their rows' other
    /// fields, the rows as given) as a rollout's are, in blocks of --rollout-batch-size
    /// prompts of which every rank samples a share, and rewarded; `each` gets a block's
    /// rows (each prompt's index `g` times) and what they sampled. The seeds come from the
    /// run's seed and `stream` alone, the same at every call; `step` is what the rewards
    /// read as the iterations done.
    fn sample_prompts(
        &self,
        (prompts, fields, examples): (&[Vec<i64>], &[PromptFields], &[PromptExample]),
        g: usize,
        (stream, step): (u64, u64),
        world: &World,
        mut each: impl FnMut(&[usize], Sampled) -> Result<()>,
    ) -> Result<()> {
        let args = self.args;
        let indices: Vec<usize> = (0..prompts.len()).collect();
        for (block, chunk) in indices.chunks(args.rollout_batch_size).enumerate() {
            let mine: Vec<usize> = world
                .shard(chunk)
                .iter()
                .flat_map(|&i| std::iter::repeat_n(i, g))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let rows: Vec<&[i64]> = mine.iter().map(|&i| prompts[i].as_slice()).collect();
            let row_fields: Vec<PromptFields> = mine.iter().map(|&i| fields[i].clone()).collect();
            let batch = collate_left(&rows, self.tok.pad_id, self.policy.model.device());
            let (start, _) = common::world::shard_range(chunk.len(), world.rank(), world.size());
            let seed = derived_seed(args.run.seed, stream, block as u64);
            let opts = RolloutOptions {
                reprompt: Some(self.reprompt(examples, &mine)),
                ..self.rollout_options(seed, ((start * g) as i64, (chunk.len() * g) as i64), step)
            };
            let sampled = self.with_models(|models| {
                sample_and_reward(
                    models,
                    &batch.input_ids,
                    &batch.attention_mask,
                    &row_fields,
                    &opts,
                )
            })?;
            each(&mine, sampled)?;
        }
        Ok(())
    }

    /// Samples `--num-generations` responses to each of the next prompts (consecutive rows:
    /// the groups) and scores them.
    fn rollout(&mut self, step: u64, world: &World) -> Result<Rollout> {
        let args = self.args;
        if args.filter_groups {
            return self.filtered_rollout(step, world);
        }
        let (batch, fields, reprompt) = self.next_prompts(world);
        let opts = RolloutOptions {
            reprompt,
            ..self.rollout_options(
                derived_seed(args.run.seed, step, 1),
                rollout_rows_of(args, world),
                step,
            )
        };
        if let (Some(teacher), true) = (&self.teacher_prompts, args.sdft.generate_from_teacher) {
            // SDFT's `generate_from_teacher`: the policy samples after the teacher's prompt;
            // the student learns on the responses after its own.
            let rows: Vec<&[i64]> = self
                .batch_rows
                .iter()
                .map(|&i| teacher[i].as_slice())
                .collect();
            let shown = collate_left(&rows, self.tok.pad_id, self.policy.model.device());
            return self.with_models(|models| {
                let mut sampled = sample_and_reward(
                    models,
                    &shown.input_ids,
                    &shown.attention_mask,
                    &fields,
                    &opts,
                )?;
                sampled.prompts = self
                    .batch_rows
                    .iter()
                    .map(|&i| self.prompts[i].clone())
                    .collect();
                Ok(score_sampled(
                    models,
                    &batch.input_ids,
                    &batch.attention_mask,
                    sampled,
                    &opts,
                ))
            });
        }
        self.with_models(|models| {
            rollout(
                models,
                &batch.input_ids,
                &batch.attention_mask,
                &fields,
                &opts,
            )
        })
    }

    /// The next --rollout-batch-size prompts (this rank's share, each --num-generations
    /// times), collated, with their rows' other fields.
    fn next_prompts(
        &mut self,
        world: &World,
    ) -> (
        data::prompts::PromptBatch,
        Vec<PromptFields>,
        Option<Reprompt>,
    ) {
        let args = self.args;
        let indices = self.sampler.next_batch(args.rollout_batch_size);
        let mine: Vec<usize> = world
            .shard(&indices)
            .iter()
            .flat_map(|&i| std::iter::repeat_n(i, args.num_generations))
            .collect();
        let rows: Vec<&[i64]> = mine.iter().map(|&i| self.prompts[i].as_slice()).collect();
        let fields: Vec<PromptFields> = mine.iter().map(|&i| self.fields[i].clone()).collect();
        let batch = collate_left(&rows, self.tok.pad_id, self.policy.model.device());
        let reprompt = self.reprompt(&self.examples, &mine);
        self.batch_rows = mine;
        (batch, fields, Some(reprompt))
    }

    /// The prompts of rows `mine` of `examples` as their rows gave them, where an
    /// environment's observations may extend them.
    fn reprompt(&self, examples: &[PromptExample], mine: &[usize]) -> Reprompt {
        Reprompt {
            examples: mine.iter().map(|&i| examples[i].clone()).collect(),
            max_prompt_length: self.max_prompt_length,
        }
    }

    /// `--filter-groups` (DAPO's dynamic sampling): batches of prompts are sampled and
    /// rewarded until every rank holds its share of --rollout-batch-size groups whose
    /// rewards differ (the ranks decide together after each batch, so their samplers stay
    /// in step); the first groups are kept and only they are scored. Batch b > 0 samples
    /// with its own seed.
    fn filtered_rollout(&mut self, step: u64, world: &World) -> Result<Rollout> {
        let args = self.args;
        let k = args.num_generations;
        let quota = world.shard(&vec![(); args.rollout_batch_size]).len();
        let rows = rollout_rows_of(args, world);
        let mut kept: Vec<Sampled> = vec![];
        let mut groups = 0;
        let mut batches = 0;
        loop {
            let (batch, fields, reprompt) = self.next_prompts(world);
            let opts = RolloutOptions {
                reprompt,
                ..self.rollout_options(
                    derived_seed(args.run.seed, step, 1 + ((batches as u64) << 32)),
                    rows,
                    step,
                )
            };
            let sampled = self.with_models(|models| {
                sample_and_reward(
                    models,
                    &batch.input_ids,
                    &batch.attention_mask,
                    &fields,
                    &opts,
                )
            });
            batches += 1;
            // Every rank learns the fewest groups any rank holds (−1: a rank failed).
            let varied = match &sampled {
                Ok(s) => s.varied_groups(k),
                Err(_) => vec![],
            };
            let held = match &sampled {
                Ok(_) => (groups + varied.len()) as f64,
                Err(_) => -1.0,
            };
            let (fewest, _) = world.min_max((held, held));
            let sampled = sampled?;
            anyhow::ensure!(
                fewest >= 0.0,
                "the rollout failed on another rank (see its message)"
            );
            // The first groups that differ, up to this rank's share.
            let varied = &varied[..varied.len().min(quota - groups)];
            groups += varied.len();
            let rows: Vec<usize> = varied.iter().flat_map(|g| g * k..(g + 1) * k).collect();
            kept.push(sampled.select(&rows));
            if fewest >= quota as f64 {
                break;
            }
            anyhow::ensure!(
                args.max_num_gen_batches == 0 || batches < args.max_num_gen_batches,
                "--filter-groups: {batches} batches of prompts (--max-num-gen-batches) left {} of the {quota} groups whose rewards differ that a rank needs: every response of the others got the same reward (check the rewards, or raise --max-num-gen-batches)",
                fewest as usize
            );
        }
        let sampled = Sampled::concat(kept, self.tok.pad_id);
        let prompts: Vec<&[i64]> = sampled.prompts.iter().map(Vec::as_slice).collect();
        let batch = collate_left(&prompts, self.tok.pad_id, self.policy.model.device());
        let opts = self.rollout_options(derived_seed(args.run.seed, step, 1), rows, step);
        let mut ro = self.with_models(|models| {
            score_sampled(
                models,
                &batch.input_ids,
                &batch.attention_mask,
                sampled,
                &opts,
            )
        });
        ro.gen_batches = Some(batches);
        Ok(ro)
    }

    /// How responses are sampled and rewarded, with the sampling `seed` and the rows'
    /// place `rows` (offset, all ranks' rows) that seed each row.
    /// `step`: the iterations done (what a reward program reads as TRL's
    /// `trainer_state.global_step`).
    fn rollout_options(&self, seed: u64, rows: (i64, i64), step: u64) -> RolloutOptions {
        let args = self.args;
        RolloutOptions {
            sampling: SamplingConfig {
                max_new_tokens: args.response_length,
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                min_p: args.min_p,
                repetition_penalty: args.repetition_penalty,
                eos_ids: self.eos_ids.clone(),
                pad_id: self.tok.pad_id,
                seed,
                cuda_graph: args.decode.use_cuda_graph(),
            },
            generation_batch: args.generation_batch_size,
            forward_batch: args.forward_batch_size,
            missing_eos_penalty: args.missing_eos_penalty,
            score_clip: args.score_range(),
            rows,
            reprompt: None,
            step: Some((step, self.iterations)),
        }
    }

    /// `--eval-prompts`' metrics now: `--num-generations-eval` responses to every prompt,
    /// sampled as a rollout's (every rank a share of each block of --rollout-batch-size
    /// prompts), and their rewards averaged over all ranks. The sampling seeds come from
    /// the run's seed alone, the same at every evaluation, so that the curve follows the
    /// policy rather than the draw.
    fn evaluate(&self, world: &World, step: u64) -> Result<Vec<(String, f64)>> {
        let args = self.args;
        let Some((prompts, fields, examples, teacher)) = &self.eval_prompts else {
            return Ok(vec![]);
        };
        let g = args.num_generations_eval.unwrap_or(args.num_generations);
        let sources = self.rewards.len();
        // (responses scored, Σ score, Σ score², Σ length, truncated, responses, then each
        // source's responses scored and Σ score); NaN (not scored) left out.
        let mut sums = vec![0.0; 6 + 2 * sources];
        // SDFT and SDPO: Σ of the distillation loss over the distilled tokens, and theirs.
        let mut distilled = [0.0; 2];
        let mut logged = crate::reward_fn::Logged::default();
        // SDFT's --generate-from-teacher samples after the teacher's prompts, as TRL's
        // evaluation does too.
        let shown = match (teacher, args.sdft.generate_from_teacher) {
            (Some(teacher), true) => teacher,
            _ => prompts,
        };
        let data = (&shown[..], &fields[..], &examples[..]);
        self.sample_prompts(data, g, (u64::MAX, step), world, |mine, sampled| {
            if args.self_distillation().is_some() {
                let [loss, tokens] = self.eval_distillation(mine, &sampled)?;
                distilled = [distilled[0] + loss, distilled[1] + tokens];
            }
            let lengths = &sampled.generated.lengths;
            let scored = |s: &[f64]| {
                s.iter()
                    .copied()
                    .filter(|x| !x.is_nan())
                    .collect::<Vec<_>>()
            };
            let scores = scored(&sampled.scores);
            sums[0] += scores.len() as f64;
            sums[1] += scores.iter().sum::<f64>();
            sums[2] += scores.iter().map(|x| x * x).sum::<f64>();
            sums[3] += lengths.iter().sum::<i64>() as f64;
            sums[4] += sampled.ended_with_eos.iter().filter(|e| !**e).count() as f64;
            sums[5] += sampled.scores.len() as f64;
            for (k, scores) in sampled.by_source.iter().enumerate() {
                let scores = scored(scores);
                sums[6 + 2 * k] += scores.len() as f64;
                sums[7 + 2 * k] += scores.iter().sum::<f64>();
            }
            logged.add_metrics(sampled.logged.metrics);
            Ok(())
        })?;
        let sums = world.sum_vec(&sums);
        // Means over no response are NaN, as TRL's `nanmean` of nothing.
        let mean = sums[1] / sums[0];
        let n = sums[5].max(1.0);
        let var = crate::math::unbiased_var((sums[0], sums[1], sums[2]));
        let mut out = vec![
            ("eval/reward".to_string(), mean),
            ("eval/reward_std".to_string(), var.sqrt()),
            ("eval/completions/mean_length".to_string(), sums[3] / n),
            ("eval/completions/clipped_ratio".to_string(), sums[4] / n),
        ];
        let names: Vec<&str> = self.with_models(|m| m.rewards.iter().map(|s| s.name).collect());
        for (k, name) in names.iter().enumerate() {
            let mean = sums[7 + 2 * k] / sums[6 + 2 * k];
            out.push((format!("eval/rewards/{name}/mean"), mean));
        }
        if args.self_distillation().is_some() {
            let [loss, tokens] = world.sums(distilled);
            let loss = loss / tokens.max(1.0);
            let own = match args.advantage_estimator() {
                AdvantageEstimator::Sdpo { .. } => "eval/sdpo/distillation_loss",
                _ => "eval/sdft/distillation_loss",
            };
            out.push(("eval/self_distillation/distillation_loss".into(), loss));
            out.push((own.into(), loss));
        }
        if sources == 0 {
            // SDFT without a reward source: no response has a score to average.
            out.retain(|(k, v)| !v.is_nan() && k != "eval/reward_std");
        }
        out.extend(logged_metrics(world, &logged.metrics, "eval/"));
        Ok(out)
    }

    /// `f` with the rollout's models: the policy, the reference, the critic and the reward
    /// sources (the critic's base among them when the reward model is it).
    fn with_models<T>(&self, f: impl FnOnce(&RolloutModels) -> T) -> T {
        let args = self.args;
        let critic = self.critic.as_ref().map(|c| &c.model);
        let critic_base = critic.map(|model| RewardModel {
            normalization: Normalization::of(model),
            model,
            pad_id: self.tok.pad_id,
            batch_size: args.forward_batch_size.unwrap_or(args.rollout_rows()),
            without_adapters: true,
            own_tokenizer: None,
        });
        let sources: Vec<RewardSource> = self
            .rewards
            .iter()
            .map(|s| match s {
                Scorer::Function(f) => *f,
                Scorer::CriticBase(weight) => RewardSource {
                    name: "reward_model",
                    weight: *weight,
                    function: critic_base
                        .as_ref()
                        .expect("a critic when the reward is its base"),
                },
            })
            .collect();
        let models = RolloutModels {
            policy: &self.policy.model,
            reference: match &self.reference {
                Reference::Frozen(model) => RefModel::Frozen(model),
                Reference::AdapterOff => RefModel::AdapterOff,
                Reference::NotHeld => RefModel::NotHeld,
            },
            critic,
            rewards: &sources,
            tokenizer: &self.tok,
            tools: self.tools.as_ref(),
        };
        f(&models)
    }

    fn warn_on_first_ratio(&self, stats: &UpdateStats, step: u64) {
        if stats.first_ratio_max_dev > 1e-3 {
            tracing::warn!(
                "step {step}: the policy ratio on the first minibatch deviates from 1 by {:.2e} (dropout on, or rollout and training forward disagree)",
                stats.first_ratio_max_dev
            );
        }
    }

    /// A checkpoint: the policy (with its averages) and the critic.
    fn save(&self, session: &mut Session) -> Result<()> {
        let trainees: Vec<&Trainee> = std::iter::once(&self.policy)
            .chain(self.critic.as_ref())
            .collect();
        // A reference that has moved (--sync-ref-model) is part of the run's state.
        let moved = match &self.reference {
            Reference::Frozen(m) if self.args.reference_sync().has_moved(session.state.step) => {
                Some(m)
            }
            _ => None,
        };
        let ema = self
            .teacher_ema
            .as_ref()
            .filter(|_| self.args.reference_sync().has_moved(session.state.step));
        session.save(&trainees, |dir| {
            if let Some(m) = moved {
                common::sync_ref::save(m, dir)?;
            }
            if let Some(ema) = ema {
                ema.save(dir)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// `final/` (policy), `final_value/` (the critic) and the policy's averages
    /// (`final_ema/` with an EMA, `bema/`).
    fn write_finals(&self, session: &Session) -> Result<()> {
        session.write_model("final", &self.policy.model, &self.args.policy)?;
        if let Some(critic) = &self.critic {
            session.write_model("final_value", &critic.model, &critic.source)?;
        }
        session.write_averages(&self.policy)?;
        Ok(())
    }
}

/// SDFT's and SDPO's teacher as the run holds it: `reference`, or `ema` of its adapter.
fn teacher_of<'a>(
    (reference, ema): (&'a Reference, Option<&'a AdapterEma>),
    args: &TrainArgs,
) -> Teacher<'a> {
    match (reference, ema, args.self_distillation().map(|s| s.teacher)) {
        (_, _, Some(TeacherKind::Live)) => Teacher::Live,
        (_, Some(ema), _) => Teacher::AdapterEma(ema),
        (Reference::Frozen(model), _, _) => Teacher::Copy(model),
        _ => Teacher::AdapterOff,
    }
}

/// Mean over the batch of each row's sum (`[B, N]` → scalar).
/// The iterations of a run over `prompts` prompts (--max-steps, else --epochs over them),
/// and the optimiser updates they take.
fn run_length(args: &TrainArgs, prompts: usize) -> (u64, u64) {
    let iterations = args
        .run
        .max_steps
        .unwrap_or(args.run.epochs * prompts.div_ceil(args.rollout_batch_size) as u64);
    (
        iterations,
        iterations * (args.ppo_epochs * args.num_minibatches) as u64,
    )
}

pub(crate) fn per_sequence_mean(x: &tch::Tensor) -> f64 {
    x.sum_dim_intlist([1].as_slice(), false, Kind::Float)
        .mean(Kind::Float)
        .double_value(&[])
}

/// This rank's rows of the rollout batch (each prompt's `--num-generations` responses
/// together): where they start among all ranks' rows, and how many rows all ranks hold.
pub fn rollout_rows_of(args: &TrainArgs, world: &World) -> (i64, i64) {
    let (start, _) =
        common::world::shard_range(args.rollout_batch_size, world.rank(), world.size());
    let per_prompt = args.num_generations as i64;
    (start as i64 * per_prompt, args.rollout_rows() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::RewardRule;
    use crate::rollout::response_logprobs;
    use tch::Tensor;

    /// The shared fixture's policy under `root`, a full reward model made from it, and
    /// `ppo train` options with a fresh LoRA adapter.
    fn lora_run(root: &Path) -> (TrainArgs, Model) {
        rlhf_tests::tiny_llama_fixture(root);
        let policy_dir = root.join("model");
        tch::manual_seed(5);
        let (mut rm, _) = Model::load(&policy_dir, &ModelOptions::cpu(Head::Score)).unwrap();
        Normalization {
            bias: 0.5,
            std: None,
        }
        .store(&mut rm);
        let reward_dir = root.join("reward");
        rm.save(&reward_dir, Some(&policy_dir)).unwrap();
        let s = |p: &Path| p.display().to_string();
        let argv = [
            "--policy",
            &s(&policy_dir),
            "--reward-model",
            &s(&reward_dir),
            "--prompts",
            &s(&root.join("prompts.jsonl")),
            "--output-dir",
            &s(&root.join("out")),
            "--device",
            "cpu",
            "--lora-r",
            "4",
            "--rollout-batch-size",
            "4",
            "--response-length",
            "6",
        ]
        .map(str::to_string);
        (rlhf_tests::parse_args(&argv), rm)
    }

    /// `--forward-batch-size 3 --generation-batch-size 5` over 16 prompts: the rollout of
    /// one pass (f32 CPU, same seed), with the critic's values and a rule reward.
    #[test]
    fn micro_batched_rollout_equals_the_one_shot_rollout() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut args, _) = lora_run(&tmp.path().join("fixture"));
        args.adapter.lora_r = None;
        args.rollout_batch_size = 16;
        args.response_length = 8;
        let rule = crate::reward_fn::TextRule(|t: &str| t.len() as f64 / 10.0);
        let sources = [Scorer::Function(RewardSource {
            name: "rule",
            weight: 1.0,
            function: &rule,
        })];
        let rollout_with = |forward, generation| {
            let mut a = args.clone();
            (a.forward_batch_size, a.generation_batch_size) = (forward, generation);
            let mut ppo = Ppo::load(
                &a,
                &sources,
                None,
                (Device::Cpu, Kind::Float),
                &World::single(),
            )
            .unwrap();
            ppo.rollout(0, &World::single()).unwrap()
        };
        let (one, blocks) = (rollout_with(None, None), rollout_with(Some(3), Some(5)));
        assert!(
            one.response.equal(&blocks.response),
            "sampled tokens differ"
        );
        assert!(one.mask.equal(&blocks.mask));
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-5;
        assert!(close(&one.logprobs, &blocks.logprobs));
        assert!(close(&one.ref_logprobs, &blocks.ref_logprobs));
        assert!(close(
            one.values.as_ref().unwrap(),
            blocks.values.as_ref().unwrap()
        ));
        assert!(close(&one.scores, &blocks.scores));
        assert_eq!(one.mask.size()[0], 16);
    }

    /// `--filter-groups`: every group of the rollout has rewards that differ; the groups
    /// kept from the first batch of prompts are those of the unfiltered rollout (same
    /// tokens, scores and log-probs); a reward that never differs stops the run after
    /// --max-num-gen-batches batches.
    #[test]
    fn filtered_groups_all_differ_and_keep_the_plain_rollouts_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut args, _) = lora_run(&tmp.path().join("fixture"));
        args.adapter.lora_r = None;
        args.reward_model = vec![];
        args.advantage_estimator = "grpo".parse().unwrap();
        (
            args.num_generations,
            args.rollout_batch_size,
            args.response_length,
        ) = (2, 4, 6);
        let parity = crate::reward_fn::TextRule(|t: &str| (t.len() % 2) as f64);
        let constant = crate::reward_fn::TextRule(|_: &str| 1.0);
        let run = |filter: bool, rule: &dyn RewardFunction| {
            let mut a = args.clone();
            (a.filter_groups, a.max_num_gen_batches) = (filter, 3);
            a.validate().unwrap();
            let sources = [Scorer::Function(RewardSource {
                name: "rule",
                weight: 1.0,
                function: rule,
            })];
            let mut ppo = Ppo::load(
                &a,
                &sources,
                None,
                (Device::Cpu, Kind::Float),
                &World::single(),
            )
            .unwrap();
            ppo.rollout(0, &World::single())
        };
        let plain = run(false, &parity).unwrap();
        let filtered = run(true, &parity).unwrap();
        assert_eq!(filtered.mask.size()[0], 8);
        let scores = Vec::<f32>::try_from(&filtered.scores).unwrap();
        assert!(scores.chunks(2).all(|g| g[0] != g[1]), "{scores:?}");
        assert!(filtered.gen_batches.unwrap() >= 1 && plain.gen_batches.is_none());
        let plain_scores = Vec::<f32>::try_from(&plain.scores).unwrap();
        let varied: Vec<i64> = (0..4)
            .filter(|&g| plain_scores[2 * g] != plain_scores[2 * g + 1])
            .map(|g| g as i64)
            .collect();
        assert!(
            !varied.is_empty(),
            "no group of the first batch varies: {plain_scores:?}"
        );
        let n = plain.response.size()[1];
        for (i, &g) in varied.iter().enumerate() {
            let (ours, theirs) = (
                filtered.response.narrow(0, 2 * i as i64, 2),
                plain.response.narrow(0, 2 * g, 2),
            );
            assert!(
                ours.narrow(1, 0, n).equal(&theirs),
                "group {g}: tokens differ"
            );
            let (a, b) = (
                filtered.logprobs.narrow(0, 2 * i as i64, 2).narrow(1, 0, n),
                plain.logprobs.narrow(0, 2 * g, 2),
            );
            assert!(
                (a - b).abs().max().double_value(&[]) < 1e-5,
                "group {g}: log-probs differ"
            );
            assert_eq!(scores[2 * i], plain_scores[2 * g as usize]);
        }
        let e = run(true, &constant).err().unwrap().to_string();
        assert!(
            e.starts_with("--filter-groups: 3 batches of prompts (--max-num-gen-batches) left 0 of the 4 groups"),
            "{e}"
        );
    }

    /// With a fresh adapter the policy is its own reference and the critic's base is the
    /// reward model: two bases in memory, not four — and they compute what the separate
    /// models would.
    #[test]
    fn with_lora_one_copy_serves_policy_and_reference_and_one_critic_and_reward() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("fixture");
        let (args, rm) = lora_run(&root);
        let policy_dir = root.join("model");
        assert!(args.reward_is_critic_base());
        let sources = [Scorer::CriticBase(1.0)];
        let mut ppo = Ppo::load(
            &args,
            &sources,
            None,
            (Device::Cpu, Kind::Float),
            &World::single(),
        )
        .unwrap();
        assert!(matches!(ppo.reference, Reference::AdapterOff));
        let critic = &ppo.critic.as_ref().unwrap().model;
        // Every embedding the process holds: the policy's and the critic's, once each.
        let embedding = |m: &Model| m.named_tensors()["model.embed_tokens.weight"].data_ptr();
        let storages = [embedding(&ppo.policy.model), embedding(critic)];
        assert_ne!(storages[0], storages[1]);
        // Move the policy's adapters away from zero, as training would.
        tch::manual_seed(9);
        for (name, mut t) in ppo.policy.model.vs.variables() {
            if name.contains(".lora_B.") {
                let _guard = tch::no_grad_guard();
                t.copy_(&(Tensor::randn_like(&t) * 0.5));
            }
        }
        let ro = ppo.rollout(0, &World::single()).unwrap();
        let base = Model::load(&policy_dir, &ModelOptions::cpu(Head::Lm))
            .unwrap()
            .0;
        let (base_lp, _) = tch::no_grad(|| {
            response_logprobs(
                &base,
                &ro.full_ids,
                &ro.full_mask,
                ro.prompt_len,
                (1.0, false),
            )
        });
        let diff = ((&ro.ref_logprobs - base_lp) * &ro.mask)
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff < 1e-6,
            "reference log-probs are {diff:e} from the base model's"
        );
        let moved = ((&ro.logprobs - &ro.ref_logprobs) * &ro.mask)
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 1e-3, "the policy's adapter changed nothing");
        // The critic trains its adapter and its own copy of the head; with the adapter
        // off it must still score exactly as the full reward model.
        let critic = &ppo.critic.as_ref().unwrap().model;
        for (name, mut t) in critic.vs.variables() {
            if name.contains(".lora_B.") || name == "score.weight" {
                let _guard = tch::no_grad_guard();
                t.copy_(&(Tensor::randn_like(&t) * 0.5));
            }
        }
        let scorer = |model, without_adapters| RewardModel {
            normalization: Normalization::of(model),
            model,
            pad_id: ppo.tok.pad_id,
            batch_size: 4,
            without_adapters,
            own_tokenizer: None,
        };
        let input = crate::reward_fn::RewardInput {
            prompts: &[vec![5, 9, 12], vec![8]],
            responses: &[vec![40, 7, 3], vec![22, 31]],
            completion_ids: &[vec![40, 7, 3], vec![22, 31]],
            texts: &[String::new(), String::new()],
            fields: &[PromptFields::new(), PromptFields::new()],
            ended_with_eos: &[true, false],
            examples: None,
            step: None,
            messages: None,
        };
        let full = scorer(&rm, false).scores(&input).unwrap();
        let shared = scorer(critic, true).scores(&input).unwrap();
        let trained = scorer(critic, false).scores(&input).unwrap();
        for i in 0..2 {
            assert!((full[i] - shared[i]).abs() < 1e-6, "{full:?} vs {shared:?}");
            assert!(
                (full[i] - trained[i]).abs() > 1e-4,
                "the critic's changes did nothing"
            );
        }
        let scores = Vec::<f32>::try_from(&ro.scores).unwrap();
        assert_eq!(scores.len(), 4);
    }

    /// `--reward-rule` repeats, each rule with its weight (one per rule, in order; none: 1
    /// each) under TRL's name; what is inconsistent is refused in one line.
    #[test]
    fn reward_rules_repeat_with_their_weights() {
        let base = [
            "--policy",
            "p",
            "--prompts",
            "x",
            "--output-dir",
            "o",
            "--response-length",
            "8",
            "--advantage-estimator",
            "grpo",
            "--num-generations",
            "2",
        ];
        let parse =
            |extra: &[&str]| -> TrainArgs { rlhf_tests::parse_args(&[&base[..], extra].concat()) };
        let args = parse(&[
            "--reward-rule",
            "exact-answer",
            "--reward-rule",
            "soft-overlong",
            "--reward-rule",
            "repetition",
            "--reward-rule",
            "think-format",
            "--soft-punish-cache",
            "4",
            "--reward-rule-weight",
            "1",
            "--reward-rule-weight",
            "0.5",
            "--reward-rule-weight",
            "0.25",
            "--reward-rule-weight",
            "2",
        ]);
        args.validate().unwrap();
        let rules = rule_functions(&args).unwrap();
        let got: Vec<(&str, f64)> = rules.iter().map(|(n, w, _)| (*n, *w)).collect();
        assert_eq!(
            got,
            [
                ("exact_answer", 1.0),
                ("soft_overlong_punishment_reward", 0.5),
                ("repetition_penalty_reward", 0.25),
                ("think_format_reward", 2.0),
            ]
        );
        // soft-overlong at --response-length 8 with a cache of 4: 7 tokens and their EOS.
        let input = crate::reward_fn::RewardInput {
            prompts: &[vec![]],
            responses: &[vec![3; 7]],
            completion_ids: &[vec![3; 7]],
            texts: &["<think></think>".to_string()],
            fields: &[PromptFields::new()],
            ended_with_eos: &[true],
            examples: None,
            step: None,
            messages: None,
        };
        let scores: Vec<f64> = rules[1..]
            .iter()
            .map(|(_, _, f)| f.scores(&input).unwrap()[0])
            .collect();
        assert_eq!(scores, [-1.0, -(1.0 - 2.0 / 6.0), 1.0]);
        assert_eq!(
            parse(&["--reward-rule", "think-format"]).rule_weights(),
            [(RewardRule::ThinkFormat, 1.0)]
        );
        for (extra, want) in [
            (
                &["--reward-rule", "think-format", "--reward-rule", "repetition", "--reward-rule-weight", "2"][..],
                "--reward-rule-weight: give one per --reward-rule, in their order (or none: 1 each)",
            ),
            (&["--reward-rule", "soft-overlong"][..], "--reward-rule soft-overlong needs --soft-punish-cache N"),
            (&["--soft-punish-cache", "2"][..], "--reward-rule soft-overlong needs --soft-punish-cache N"),
            (&["--reward-rule", "format"][..], "--reward-rule format needs --format-pattern REGEX"),
            (
                &["--reward-rule", "soft-overlong", "--soft-punish-cache", "9"][..],
                "--soft-punish-cache must be at most --response-length",
            ),
            (&["--reward-rule", "repetition", "--reward-rule", "repetition"][..], "--reward-rule: each rule at most once"),
            (
                &["--reward-rule", "repetition", "--repetition-max-penalty", "0.5"][..],
                "--repetition-max-penalty ≤ 0",
            ),
        ] {
            let e = parse(extra).validate().unwrap_err().to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
    }
}
