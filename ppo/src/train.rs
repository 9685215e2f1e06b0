//! `ppo train`: InstructGPT step 3. One iteration (one step) = one rollout batch of
//! prompts, its rewards and advantages, then `--ppo-epochs` passes of clipped policy and
//! value updates over shuffled minibatches, optionally with the pretraining loss mixed in
//! (PPO-ptx).

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use common::generate::SamplingConfig;
use common::ops::{masked_mean, masked_whiten};
use common::optim::AdamW;
use common::sampler::{Sampler, SamplerPosition};
use common::schedule::Schedule;
use common::scoring::Normalization;
use common::train::{Session, Trainable};
use common::{Head, Model};
use data::prompts::collate_left;
use data::sft::{prepare, TokenizedSft, Truncation};
use data::Tokenizer;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

pub use crate::args::TrainArgs;
use crate::math::{explained_variance, gae, kl_per_token, shaped_rewards, KlController};
use crate::reward_fn::{RewardFunction, RewardModel};
use crate::rollout::{rollout, Rollout, RolloutModels, RolloutOptions};
use crate::update::{derived_seed, update, Ema};

/// PPO's own part of `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct PpoState {
    kl_coef: f64,
    ptx_sampler: SamplerPosition,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    pub first_score: f64,
    pub last_score: f64,
    pub kl: f64,
    pub kl_coef: f64,
    /// A signal stopped the run (checkpointed; no `final/` yet).
    pub stopped: bool,
}

fn check_same_tokenizer(a: &Tokenizer, b: &Tokenizer, args: &TrainArgs) -> Result<()> {
    if !a.same_vocabulary(b) {
        bail!(
            "{} and {} have different tokenizers (vocabularies differ): the policy and the reward model must share one",
            args.policy.join("tokenizer.json").display(),
            args.reward_model.join("tokenizer.json").display()
        );
    }
    Ok(())
}

/// `ppo train` with the reward model of `--reward-model`.
pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    args.validate()?;
    let (device, kind) = args.device.resolve();
    let (mut model, tok) =
        data::io::load_with_tokenizer(&args.reward_model, Head::Score, device, kind)?;
    if !model.config.raw.contains_key(common::scoring::BIAS_KEY) {
        tracing::warn!(
            "{}: no {} in config.json — not a model from `reward train`? Its raw scores are used",
            args.reward_model.display(),
            common::scoring::BIAS_KEY
        );
    }
    let policy_tok = Tokenizer::load(&args.policy)?;
    check_same_tokenizer(&policy_tok, &tok, args)?;
    model.vs.freeze();
    let reward = RewardModel {
        normalization: Normalization::of(&model),
        model,
        pad_id: tok.pad_id,
        batch_size: args.rollout_batch_size,
    };
    train(args, &reward, device, kind)
}

/// `ppo train` against any reward function.
pub fn run_with_reward(args: &TrainArgs, reward: &dyn RewardFunction) -> Result<TrainSummary> {
    args.validate()?;
    let (device, kind) = args.device.resolve();
    train(args, reward, device, kind)
}

fn train(
    args: &TrainArgs,
    reward: &dyn RewardFunction,
    device: tch::Device,
    kind: Kind,
) -> Result<TrainSummary> {
    args.run.seed_torch();
    let (policy, tok) = data::io::load_with_tokenizer(&args.policy, Head::Lm, device, kind)?;
    let (mut reference, _) = Model::load(&args.policy, Head::Lm, device, kind)?;
    reference.vs.freeze();
    let value_dir = args.value_model.as_ref().unwrap_or(&args.reward_model);
    let (value, _) = Model::load(value_dir, Head::Score, device, kind)
        .with_context(|| format!("loading the value model from {}", value_dir.display()))?;

    let prompts: Vec<Vec<i64>> = data::read_prompts(&args.prompts)?
        .iter()
        .map(|p| tok.encode_prompt(p))
        .collect::<data::Result<_>>()?;
    let long = prompts
        .iter()
        .filter(|p| p.len() > args.max_prompt_length)
        .count();
    if long > 0 {
        tracing::warn!(
            "{}: {long} prompts cut to their last {} tokens",
            args.prompts.display(),
            args.max_prompt_length
        );
    }
    let prompts: Vec<Vec<i64>> = prompts
        .into_iter()
        .map(|p| p[p.len().saturating_sub(args.max_prompt_length)..].to_vec())
        .collect();
    let ptx: Option<Vec<TokenizedSft>> = match &args.ptx_data {
        Some(path) => {
            let prepared = prepare(
                &data::read_sft(path)?,
                &tok,
                args.ptx_max_length,
                Truncation::Truncate,
                true,
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

    let iterations = args
        .run
        .max_steps
        .unwrap_or(args.run.epochs * prompts.len().div_ceil(args.rollout_batch_size) as u64);
    let opt_steps_per_iteration = (args.ppo_epochs * args.num_minibatches) as u64;
    let mut policy_opt = AdamW::new(policy.vs.variables(), args.optim.adamw());
    let mut value_opt = AdamW::new(value.vs.variables(), args.optim.adamw());
    let mut session = Session::start(
        "ppo",
        args,
        &args.run,
        &args.optim,
        iterations,
        &mut [
            ("policy", &policy, &mut policy_opt),
            ("value", &value, &mut value_opt),
        ],
    )
    .context("starting the run")?;
    let schedule = |lr: f64| Schedule {
        base_lr: lr,
        total_steps: iterations * opt_steps_per_iteration,
        ..session.schedule
    };
    let (policy_schedule, value_schedule) = (
        schedule(args.optim.lr),
        schedule(args.value_lr.unwrap_or(args.optim.lr)),
    );
    let mut ppo_state: PpoState =
        serde_json::from_value(session.state.extra.clone()).unwrap_or(PpoState {
            kl_coef: args.kl_coef,
            ptx_sampler: SamplerPosition::default(),
        });
    let mut kl_ctl = KlController {
        value: ppo_state.kl_coef,
        target: args.kl_target,
        horizon: args.kl_horizon,
    };
    let mut sampler = Sampler::new(prompts.len(), args.run.seed, true);
    sampler.restore(session.state.sampler);
    let mut ptx_sampler = ptx.as_ref().map(|rows| {
        let mut s = Sampler::new(rows.len(), args.run.seed.wrapping_add(1), true);
        s.restore(ppo_state.ptx_sampler);
        s
    });
    let mut ema = args.ema_decay.map(|d| Ema::new(&policy, d));
    if let (Some(ema), Some(dir)) = (&ema, &session.resumed_from) {
        common::checkpoint::load_file(&ema.vars(), &dir.join("ema.safetensors"))?;
    }
    let eos_ids = tok.generation_eos_ids()?;
    let models = RolloutModels {
        policy: &policy,
        reference: &reference,
        value: &value,
        reward,
        tokenizer: &tok,
    };
    tracing::info!(
        "ppo: {} prompts, {iterations} iterations of {} prompts × {} epochs × {} minibatches",
        prompts.len(),
        args.rollout_batch_size,
        args.ppo_epochs,
        args.num_minibatches
    );
    let mut first_score = None;
    let (mut last_score, mut last_kl) = (f64::NAN, f64::NAN);

    while !session.done() && session.stop_requested().is_none() {
        let step = session.state.step;
        let started = Instant::now();
        let indices = sampler.next_batch(args.rollout_batch_size);
        let rows: Vec<&[i64]> = indices.iter().map(|&i| prompts[i].as_slice()).collect();
        let batch = collate_left(&rows, tok.pad_id, device);
        let opts = RolloutOptions {
            sampling: SamplingConfig {
                max_new_tokens: args.response_length,
                temperature: args.temperature,
                top_k: args.top_k,
                top_p: args.top_p,
                eos_ids: eos_ids.clone(),
                pad_id: tok.pad_id,
                seed: derived_seed(args.run.seed, step, 1),
            },
            missing_eos_penalty: args.missing_eos_penalty,
            score_clip: args.score_clip,
        };
        let ro = rollout(&models, &batch.input_ids, &batch.attention_mask, &opts)?;
        let rollout_time = started.elapsed().as_secs_f64();

        // Rewards and advantages (no gradient).
        let beta = kl_ctl.value;
        let (kl, advantages, returns, rewards, non_score) = {
            let _guard = tch::no_grad_guard();
            let kl = kl_per_token(&ro.logprobs, &ro.ref_logprobs, &ro.mask, args.kl_estimator);
            let (mut rewards, non_score) = shaped_rewards(&kl, &ro.scores, &ro.mask, beta);
            if args.whiten_rewards {
                rewards = masked_whiten(&rewards, &ro.mask, false);
            }
            let (advantages, returns) = gae(&rewards, &ro.values, &ro.mask, args.gamma, args.lam);
            let advantages = masked_whiten(&advantages, &ro.mask, true);
            (kl, advantages, returns, rewards, non_score)
        };
        let per_seq = |x: &Tensor| {
            x.sum_dim_intlist([1].as_slice(), false, Kind::Float)
                .mean(Kind::Float)
                .double_value(&[])
        };
        let mean_kl = per_seq(&kl);
        let mean_score = ro.scores.mean(Kind::Float).double_value(&[]);

        let train_started = Instant::now();
        let stats = update(
            args,
            &ro,
            &advantages,
            &returns,
            &policy,
            &value,
            &mut policy_opt,
            &mut value_opt,
            (&policy_schedule, &value_schedule),
            ptx.as_deref().zip(ptx_sampler.as_mut()),
            ema.as_mut(),
            tok.pad_id,
            step,
        )?;
        let train_time = train_started.elapsed().as_secs_f64();
        kl_ctl.update(mean_kl, args.rollout_batch_size as f64);
        ppo_state.kl_coef = kl_ctl.value;
        if let Some(s) = &ptx_sampler {
            ppo_state.ptx_sampler = s.position();
        }
        session.state.extra = serde_json::to_value(&ppo_state)?;
        let loss = stats.policy_loss + args.vf_coef * stats.value_loss;
        session.finish_step(&stats.outcome, loss, sampler.position())?;

        let response_tokens = ro.mask.sum(Kind::Float).double_value(&[]);
        let eos_rate = ro.ended_with_eos.iter().filter(|&&e| e).count() as f64
            / ro.ended_with_eos.len() as f64;
        let scalars = [
            ("objective/kl", mean_kl),
            ("objective/entropy", per_seq(&(&ro.entropy * &ro.mask))),
            ("objective/non_score_reward", per_seq(&non_score)),
            ("objective/rlhf_reward", mean_score + per_seq(&non_score)),
            ("objective/scores", mean_score),
            ("policy/approxkl_avg", stats.approxkl),
            ("policy/clipfrac_avg", stats.clipfrac),
            ("policy/first_ratio_max_dev", stats.first_ratio_max_dev),
            ("policy/rollout_logprob_diff", ro.logprob_check),
            ("loss/policy_avg", stats.policy_loss),
            ("loss/value_avg", stats.value_loss),
            ("loss/ptx_avg", stats.ptx_loss),
            ("val/clipfrac_avg", stats.value_clipfrac),
            (
                "val/explained_variance",
                explained_variance(&ro.values, &returns, &ro.mask),
            ),
            ("val/ratio", stats.ratio),
            (
                "val/mean_reward",
                masked_mean(&rewards, &ro.mask).double_value(&[]),
            ),
            ("kl_coef", beta),
            (
                "response_length",
                response_tokens / ro.mask.size()[0] as f64,
            ),
            ("eos_rate", eos_rate),
            ("time/rollout", rollout_time),
            ("time/train", train_time),
            (
                "train/tokens_per_second",
                response_tokens / started.elapsed().as_secs_f64().max(1e-9),
            ),
            ("train/lr", stats.outcome.lr),
            ("train/grad_norm", stats.outcome.grad_norm),
            ("train/skipped_steps", session.state.skipped_steps as f64),
        ];
        session.metrics.log(session.state.step, &scalars)?;
        if stats.first_ratio_max_dev > 1e-3 {
            tracing::warn!(
                "step {}: the policy ratio on the first minibatch deviates from 1 by {:.2e} (dropout on, or rollout and training forward disagree)",
                session.state.step,
                stats.first_ratio_max_dev
            );
        }
        if args.sample_every > 0
            && (session.state.step % args.sample_every == 0 || session.state.step == 1)
        {
            write_samples(&mut session, &ro, &tok, args.num_samples)?;
        }
        first_score.get_or_insert(mean_score);
        (last_score, last_kl) = (mean_score, mean_kl);
        if session.checkpoint_due() {
            let trainables = [
                Trainable {
                    subdir: "policy",
                    model: &policy,
                    optimizer: &policy_opt,
                    sidecar_from: &args.policy,
                },
                Trainable {
                    subdir: "value",
                    model: &value,
                    optimizer: &value_opt,
                    sidecar_from: value_dir,
                },
            ];
            let ema_ref = &ema;
            session.save(&trainables, |dir| match ema_ref {
                Some(e) => common::checkpoint::save_file(&e.weights, &dir.join("ema.safetensors")),
                None => Ok(()),
            })?;
        }
    }
    let stopped = session.stop_requested().is_some();
    if stopped {
        session.report_stop();
    } else {
        write_finals(
            &session,
            &policy,
            &value,
            ema.as_ref(),
            args,
            value_dir,
            device,
            kind,
        )?;
    }
    session.metrics.finish();
    Ok(TrainSummary {
        steps: session.state.step,
        first_score: first_score.unwrap_or(f64::NAN),
        last_score,
        kl: last_kl,
        kl_coef: kl_ctl.value,
        stopped,
    })
}

/// `final/` (policy), `final_value/` and, with an EMA, `final_ema/`.
fn write_finals(
    session: &Session,
    policy: &Model,
    value: &Model,
    ema: Option<&Ema>,
    args: &TrainArgs,
    value_dir: &std::path::Path,
    device: tch::Device,
    kind: Kind,
) -> Result<()> {
    session.write_model("final", policy, &args.policy)?;
    session.write_model("final_value", value, value_dir)?;
    if let Some(e) = ema {
        let (averaged, _) = Model::load(&session.run.final_dir(), Head::Lm, device, kind)?;
        let _guard = tch::no_grad_guard();
        for (name, mut var) in averaged.vs.variables() {
            var.copy_(&e.weights[&name]);
        }
        session.write_model("final_ema", &averaged, &args.policy)?;
    }
    Ok(())
}
fn write_samples(session: &mut Session, ro: &Rollout, tok: &Tokenizer, n: usize) -> Result<()> {
    let step = session.state.step;
    let scores = Vec::<f32>::try_from(ro.scores.to_device(tch::Device::Cpu))?;
    let mut markdown = String::from("| prompt | response | score |\n|---|---|---|\n");
    let mut lines = String::new();
    for ((prompt_ids, text), score) in ro.prompts.iter().zip(&ro.texts).zip(&scores).take(n) {
        let prompt = tok.decode(prompt_ids, true);
        lines.push_str(&format!(
            "{}\n",
            serde_json::json!({"step": step, "prompt": prompt, "response": text, "score": score})
        ));
        let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
        markdown.push_str(&format!(
            "| {} | {} | {:.3} |\n",
            cell(&prompt),
            cell(text),
            score
        ));
    }
    let path = session.run.root.join("samples.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    std::io::Write::write_all(&mut f, lines.as_bytes())?;
    session.metrics.text(step, "samples", &markdown);
    Ok(())
}
