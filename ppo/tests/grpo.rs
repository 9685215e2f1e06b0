//! Critic-free RL end to end on a tiny Llama (issue 16): GRPO raises the reward of a reward
//! program (`--reward-command`, a Python script) with KL bounded and never loads, trains or
//! writes a value model; a reward program that crashes, hangs or answers garbage stops the
//! run with one clear error and a checkpoint it resumes from; a killed GRPO run resumes to
//! the uninterrupted weights (with DAPO's dynamic sampling too); `exact-answer` scores every sample as its rule says, from the
//! prompt rows' `answer` field, with no reward model at all; bad options get one line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::Head;
use ppo::reward_fn::{ExactAnswer, RewardFunction, RewardInput, TextRule};
use ppo::train::{run, run_with_reward, TrainArgs};
use rlhf_tests::{digit_share, read_jsonl};
use serde_json::Value;

struct Fixture {
    root: PathBuf,
    policy: PathBuf,
    prompts: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpo");
        let (policy, prompts) = (root.join("model"), root.join("prompts-answers.jsonl"));
        if std::env::var_os("GRPO_CHILD_OUT").is_none() {
            rlhf_tests::tiny_llama_fixture(&root);
            // 鸡兔同笼 rows with their answers, as a verifier reads them.
            let lines: String = (0..16)
                .map(|i| {
                    let (heads, rabbits) = (i + 3, i / 2 + 1);
                    let row = serde_json::json!({"prompt": format!("There are {heads} heads"),
                        "answer": format!("{rabbits}"), "id": i});
                    format!("{row}\n")
                })
                .collect();
            std::fs::write(&prompts, lines).unwrap();
            // The same prompts with a privileged context (SDFT's teacher reads it).
            let lines: String = (0..16)
                .map(|i| {
                    let row = serde_json::json!({"prompt": format!("There are {} heads", i + 3),
                        "privileged_context": format!("{} rabbits", i / 2 + 1)});
                    format!("{row}\n")
                })
                .collect();
            std::fs::write(root.join("prompts-context.jsonl"), lines).unwrap();
        }
        Fixture {
            root,
            policy,
            prompts,
        }
    })
}

/// GRPO options: 8 prompts × 4 responses an iteration, no reward model.
fn args(out: &Path, extra: &[&str]) -> TrainArgs {
    rlhf_tests::parse_args(&argv(out, extra))
}

/// The command line of [`args`] (after `ppo train`).
fn argv(out: &Path, extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut argv: Vec<String> = [
        "--policy",
        f.policy.to_str().unwrap(),
        "--prompts",
        f.prompts.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--advantage-estimator",
        "grpo",
        "--num-generations",
        "4",
        "--rollout-batch-size",
        "8",
        "--response-length",
        "12",
        "--ppo-epochs",
        "1",
        "--num-minibatches",
        "2",
        "--lr",
        "1e-3",
        "--schedule",
        "constant",
        "--seed",
        "11",
    ]
    .map(str::to_string)
    .to_vec();
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

fn metrics(out: &Path) -> Vec<Value> {
    read_jsonl(&out.join("metrics.jsonl"))
}

/// `--reward-command` running `tests/python/digit_reward.py`.
fn digit_command() -> String {
    python_program("digit_reward.py")
}

/// A command running `tests/python/SCRIPT`.
fn python_program(script: &str) -> String {
    let script = rlhf_tests::repo_root().join("tests/python").join(script);
    format!(
        "'{}' '{}'",
        rlhf_tests::python().display(),
        script.display()
    )
}

#[test]
fn grpo_raises_the_reward_without_a_value_model() {
    let out = fixture().root.join("run-grpo");
    let command = digit_command();
    let extra = [
        "--reward-command",
        &command,
        "--max-steps",
        "24",
        "--kl-coef",
        "0.3",
        "--kl-in-loss",
        "--loss-aggregation",
        "seq-mean-token-mean",
    ];
    run(&args(&out, &extra)).unwrap();
    let m = metrics(&out);
    assert_eq!(m.len(), 24);
    let reward = |r: &Value| r["reward"].as_f64().unwrap();
    let first: f64 = m[..3].iter().map(reward).sum::<f64>() / 3.0;
    let last: f64 = m[21..].iter().map(reward).sum::<f64>() / 3.0;
    assert!(
        last > first + 0.25,
        "mean reward {first:.3} → {last:.3}: expected a rise of 0.25"
    );
    for r in &m {
        assert!(
            r["objective/kl"].as_f64().unwrap() < 10.0,
            "KL not bounded: {r}"
        );
        assert!(r["policy/first_ratio_max_dev"].as_f64().unwrap() < 1e-5);
        assert!(r.get("loss/value_avg").is_none(), "a value loss was logged");
        assert!(r["loss/kl_avg"].as_f64().unwrap() >= 0.0);
        let zero_std = r["frac_reward_zero_std"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&zero_std));
        assert!(r["rewards/reward_command/mean"].as_f64().is_some());
        // TRL's length metrics (in sampled tokens), entropy and running token count.
        let x = |key: &str| r[key].as_f64().unwrap_or_else(|| panic!("{key}: {r}"));
        let (lo, mean, hi) = (
            x("completions/min_length"),
            x("completions/mean_length"),
            x("completions/max_length"),
        );
        assert!(1.0 <= lo && lo <= mean && mean <= hi && hi <= 12.0, "{r}");
        let terminated = [
            x("completions/min_terminated_length"),
            x("completions/mean_terminated_length"),
            x("completions/max_terminated_length"),
        ];
        let none_ended = terminated == [0.0; 3] && x("completions/clipped_ratio") == 1.0;
        let ordered = lo <= terminated[0] && terminated[0] <= terminated[1];
        assert!(none_ended || (ordered && terminated[1] <= terminated[2] && terminated[2] <= hi));
        assert!(x("entropy") > 0.0);
        // TRL's `kl` (k3, per token) is ≥ 0, and the k1 sum over a response is ≥ 0 only on
        // average: both are bounded here.
        assert!(x("kl") >= 0.0 && x("kl") < 1.0, "{r}");
        assert!(x("clip_ratio/low_min") <= x("clip_ratio/low_mean"));
        assert!(x("clip_ratio/high_max") >= x("clip_ratio/high_mean"));
    }
    // Every iteration adds its 32 prompts' and responses' tokens.
    for (a, b) in m.iter().zip(&m[1..]) {
        let added = b["num_tokens"].as_f64().unwrap() - a["num_tokens"].as_f64().unwrap();
        let responses = 32.0 * b["completions/mean_length"].as_f64().unwrap();
        assert!(
            added > responses + 32.0,
            "{added} tokens for {responses} in responses"
        );
    }
    // No value model anywhere: not exported, not in the checkpoints.
    assert!(out.join("final").join("model.safetensors").exists());
    assert!(!out.join("final_value").exists());
    for entry in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        assert!(!entry.unwrap().path().join("value").exists());
    }
}

/// TRL's `None` rewards (multi-task data): `tests/python/multitask_reward.py` answers null
/// for the rows that are not its task (odd ids) and for responses of odd length. Those
/// responses are logged with no score, and `reward`, `reward_std` and the source's mean and
/// std are over the scored ones alone; a whole group unscored teaches nothing. REINFORCE++
/// (no groups) refuses an unscored response in one line, naming it.
#[test]
fn responses_no_source_scores_are_left_out() {
    let f = fixture();
    let out = f.root.join("run-null-rewards");
    let command = python_program("multitask_reward.py");
    let extra = [
        "--reward-command",
        &command,
        "--max-steps",
        "2",
        "--sample-every",
        "1",
        "--num-samples",
        "32",
    ];
    run(&args(&out, &extra)).unwrap();
    let samples = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 64);
    let m = metrics(&out);
    for (step, r) in m.iter().enumerate() {
        let mut scored = vec![];
        for row in samples.iter().filter(|x| x["step"] == (step as u64 + 1)) {
            let prompt = row["prompt"].as_str().unwrap();
            let heads: u64 = prompt.split_whitespace().nth(2).unwrap().parse().unwrap();
            let response = row["response"].as_str().unwrap();
            let even = response.chars().count().is_multiple_of(2);
            match row["score"].as_f64() {
                Some(score) => {
                    assert!((heads - 3).is_multiple_of(2) && even, "{row}");
                    scored.push(score);
                }
                None => assert!(!(heads - 3).is_multiple_of(2) || !even, "{row}"),
            }
        }
        assert!(
            scored.len() >= 2 && scored.len() < 32,
            "step {step}: {scored:?}"
        );
        let n = scored.len() as f64;
        let mean = scored.iter().sum::<f64>() / n;
        let std = (scored.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let close = |key: &str, want: f64| {
            let got = r[key].as_f64().unwrap_or(f64::NAN);
            assert!((got - want).abs() < 1e-5, "{key}: {got} vs {want} ({r})");
        };
        close("reward", mean);
        close("objective/scores", mean);
        close("rewards/reward_command/mean", mean);
        close("reward_std", std);
        close("rewards/reward_command/std", std);
        assert!(r["loss/policy_avg"].as_f64().unwrap().is_finite(), "{r}");
        assert!(r["val/mean_reward"].as_f64().unwrap().is_finite(), "{r}");
    }
    let moved = rlhf_tests::max_weight_diff(&f.policy, &out.join("final"), Head::Lm);
    assert!(moved > 1e-6, "the policy did not move");
    // REINFORCE++ has no group to leave a response out of.
    let mut a = args(&f.root.join("run-null-rpp"), &extra);
    a.advantage_estimator = "reinforce-plus-plus".parse().unwrap();
    let e = format!("{:#}", run(&a).unwrap_err());
    assert!(e.contains("of the batch ("), "{e}");
    assert!(
        e.contains("no reward source scored it (each answered null)"),
        "{e}"
    );
}

/// Online DPO (TRL's `OnlineDPOTrainer`): each prompt's two responses, the better scored
/// chosen. At the first minibatch the policy is the reference, so the loss is DPO's at a
/// zero margin (ln 2; IPO's 1/(4β²)) and the implicit rewards are 0; a second pass over
/// the same pairs, after one step, has widened their margins. The logged score margin is
/// the chosen responses' scores less the others' (from `samples.jsonl`); no value model is
/// trained; settings that break the pairs are refused in one line.
#[test]
fn online_dpo_trains_on_the_rollouts_pairs() {
    let f = fixture();
    let digits = digit_command();
    let online = |name: &str, extra: &[&str]| {
        let out = f.root.join(name);
        let _ = std::fs::remove_dir_all(&out);
        let base = ["--reward-command", &digits, "--max-steps", "1"];
        let mut a = args(&out, &[&base[..], extra].concat());
        a.advantage_estimator = "online-dpo".parse().unwrap();
        a.num_generations = 2;
        a.num_minibatches = 1;
        a.kl_coef = 0.1;
        (out, a)
    };
    let (out, a) = online(
        "run-online-dpo",
        &["--sample-every", "1", "--num-samples", "16"],
    );
    run(&a).unwrap();
    let m = &metrics(&out)[0];
    let close = |key: &str, want: f64, tol: f64| {
        let got = m[key].as_f64().unwrap_or(f64::NAN);
        assert!((got - want).abs() < tol, "{key}: {got} vs {want}: {m}");
    };
    close("loss/policy_avg", std::f64::consts::LN_2, 1e-5);
    close("rewards/chosen", 0.0, 1e-5);
    close("rewards/margins", 0.0, 1e-5);
    close("beta", 0.1, 1e-12);
    let samples = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 16);
    let score = |i: usize| samples[i]["score"].as_f64().unwrap();
    let margins: Vec<f64> = (0..8)
        .map(|p| (score(2 * p) - score(2 * p + 1)).abs())
        .collect();
    assert!(
        margins.iter().any(|&x| x > 0.0),
        "every pair tied: {margins:?}"
    );
    close(
        "objective/scores_margin",
        margins.iter().sum::<f64>() / 8.0,
        1e-5,
    );
    assert!(!out.join("final_value").exists());
    // IPO at a zero margin: (0 − 1/(2β))².
    let (out, a) = online("run-online-ipo", &["--online-dpo-loss", "ipo"]);
    run(&a).unwrap();
    let ipo = metrics(&out)[0]["loss/policy_avg"].as_f64().unwrap();
    assert!((ipo - 25.0).abs() < 1e-3, "{ipo}");
    // A second pass over the same pairs, after one step: the chosen responses gained on
    // the rejected ones.
    let (out, mut a) = online("run-online-dpo-twice", &[]);
    a.ppo_epochs = 2;
    a.run.max_steps = Some(2);
    run(&a).unwrap();
    let m = metrics(&out);
    let loss = m[0]["loss/policy_avg"].as_f64().unwrap();
    assert!(loss < std::f64::consts::LN_2 - 1e-4, "{}", m[0]);
    assert!(m[0]["rewards/margins"].as_f64().unwrap() > 0.0, "{}", m[0]);
    assert!(
        m[0]["rewards/accuracies"].as_f64().unwrap() > 0.0,
        "{}",
        m[0]
    );
    // The second iteration samples from the trained policy: TRL's non-score reward is
    // −β·KL, though the KL acts through the loss.
    let kl = m[1]["objective/kl"].as_f64().unwrap();
    assert!(kl.abs() > 1e-4, "{}", m[1]);
    let non_score = m[1]["objective/non_score_reward"].as_f64().unwrap();
    assert!((non_score + 0.1 * kl).abs() < 1e-6, "{}", m[1]);
    // Pairs are two responses, held to the reference by β > 0, and kept whole.
    for what in ["--num-generations 4", "--kl-coef 0", "--num-minibatches 16"] {
        let (out, mut a) = online("run-online-dpo-refused", &[]);
        match what {
            "--num-generations 4" => a.num_generations = 4,
            "--kl-coef 0" => a.kl_coef = 0.0,
            _ => a.num_minibatches = 16,
        }
        let e = format!("{:#}", run(&a).unwrap_err());
        assert!(
            e.contains("--advantage-estimator online-dpo compares two responses per prompt"),
            "{what}: {e}"
        );
        assert!(!out.exists(), "{what}");
    }
    let (out, mut a) = online("run-online-dpo-refused", &[]);
    a.top_entropy_quantile = 0.2;
    let e = format!("{:#}", run(&a).unwrap_err());
    assert!(e.contains("takes DPO's loss on whole responses"), "{e}");
    assert!(!out.exists());
}

/// A*-PO (`--advantage-estimator a2po`, TRL's experimental `A2POTrainer`): before the first
/// step every prompt's optimal value is estimated from 4 responses of the starting policy and
/// kept in `optimal_values.json` (`V* = β₁·log mean exp(r/β₁)`, written out here); the
/// prompts whose responses all scored 0 are never sampled; each response's advantage is its
/// score less its prompt's `V*`, and the first pass's loss (policy = reference) is the mean
/// squared advantage; a second pass over the same responses, after one step, has lowered
/// it. A resumed run with other A*-PO options, and settings that break the regression, are
/// refused in one line.
#[test]
fn a2po_regresses_on_the_optimal_advantage() {
    let f = fixture();
    let digits = digit_command();
    let a2po = |name: &str, extra: &[&str]| {
        let out = f.root.join(name);
        let _ = std::fs::remove_dir_all(&out);
        let base = [
            "--reward-command",
            &digits,
            "--max-steps",
            "1",
            "--num-value-samples",
            "4",
        ];
        let mut a = args(&out, &[&base[..], extra].concat());
        a.advantage_estimator = "a2po".parse().unwrap();
        a.num_generations = 1;
        a.num_minibatches = 1;
        a.kl_coef = 0.1;
        (out, a)
    };
    let (out, a) = a2po("run-a2po", &["--sample-every", "1", "--num-samples", "8"]);
    run(&a).unwrap();
    let stored: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("optimal_values.json")).unwrap())
            .unwrap();
    let floats = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let rewards: Vec<Vec<f64>> = stored["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let v_star = floats(&stored["v_star"]);
    assert_eq!((rewards.len(), v_star.len()), (16, 16));
    let mut dropped = vec![];
    for (p, r) in rewards.iter().enumerate() {
        assert_eq!(r.len(), 4);
        let want = 0.5 * (r.iter().map(|x| (x / 0.5).exp()).sum::<f64>() / 4.0).ln();
        assert!(
            (v_star[p] - want).abs() < 1e-9,
            "prompt {p}: {} vs {want}",
            v_star[p]
        );
        if r.iter().sum::<f64>() == 0.0 {
            dropped.push(p as u64);
        }
    }
    let all_incorrect: Vec<u64> = stored["all_incorrect"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(all_incorrect, dropped);
    assert!(
        !dropped.is_empty() && dropped.len() < 16,
        "this seed's responses should leave some prompts all 0 and some not: {rewards:?}"
    );
    let samples = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 8);
    let prompt_of = |s: &Value| {
        let text = s["prompt"].as_str().unwrap().trim_end().to_string();
        (0..16)
            .find(|p| text.ends_with(&format!("There are {} heads", p + 3)))
            .unwrap_or_else(|| panic!("{text}"))
    };
    let (mut squares, mut advantages, mut values) = (0.0, 0.0, 0.0);
    for s in &samples {
        let p = prompt_of(s);
        assert!(
            !dropped.contains(&(p as u64)),
            "prompt {p} was left out, yet sampled"
        );
        let (score, advantage) = (
            s["score"].as_f64().unwrap(),
            s["advantage"].as_f64().unwrap(),
        );
        assert!((advantage - (score - v_star[p])).abs() < 1e-5, "{s}");
        squares += advantage * advantage / 8.0;
        advantages += advantage / 8.0;
        values += v_star[p] / 8.0;
    }
    let m = &metrics(&out)[0];
    let close = |key: &str, want: f64, tol: f64| {
        let got = m[key].as_f64().unwrap_or(f64::NAN);
        assert!((got - want).abs() < tol, "{key}: {got} vs {want}: {m}");
    };
    close("loss/policy_avg", squares, 1e-5);
    close("implicit_reward", 0.0, 1e-6);
    close("advantage", advantages, 1e-5);
    close("v_star", values, 1e-5);
    close("beta", 0.1, 1e-12);
    assert!(!out.join("final_value").exists());
    // A second pass over the same responses, after one small step: the regression came
    // closer (at --lr 1e-3 AdamW's first step overshoots on this tiny model).
    let (twice, mut a) = a2po("run-a2po-twice", &[]);
    a.optim.lr = 1e-5;
    a.ppo_epochs = 2;
    run(&a.clone()).unwrap();
    let m = &metrics(&twice)[0];
    let avg = m["loss/policy_avg"].as_f64().unwrap();
    assert!(
        avg < squares - 1e-6,
        "{avg} vs the first pass's {squares}: {m}"
    );
    // The run's stored first stage is read back on --resume, with the options it was
    // estimated with only.
    a.run.resume = true;
    a.run.max_steps = Some(2);
    a.beta1 = 0.25;
    let e = format!("{:#}", run(&a).unwrap_err());
    assert!(
        e.contains("optimal_values.json: estimated with --beta1 0.5"),
        "{e}"
    );
    // One response per prompt, held to the reference by β > 0.
    for what in [
        "--num-generations 2",
        "--kl-coef 0",
        "--num-value-samples 0",
    ] {
        let (out, mut a) = a2po("run-a2po-refused", &[]);
        match what {
            "--num-generations 2" => a.num_generations = 2,
            "--kl-coef 0" => a.kl_coef = 0.0,
            _ => a.num_value_samples = 0,
        }
        let e = format!("{:#}", run(&a).unwrap_err());
        let want = match what {
            "--num-value-samples 0" => "--num-value-samples must be at least 1",
            _ => "--advantage-estimator a2po regresses",
        };
        assert!(e.contains(want), "{what}: {e}");
        assert!(!out.exists(), "{what}");
    }
}

/// A reward program's answers may carry metrics (TRL's `log_metric`) and extra columns (TRL's
/// `log_extra`): each metric is the mean of its values in an iteration (`eval/NAME` from an
/// evaluation's), the columns go with the response into `samples.jsonl`. Every request line
/// says its place in its batch. A metric named as one of the run's own, or not a number,
/// stops the run with a line naming it, the first after a checkpoint.
#[test]
fn reward_programs_log_metrics_and_columns() {
    let f = fixture();
    let out = f.root.join("run-logged-metrics");
    let _ = std::fs::remove_dir_all(&out);
    // Answers 1 and logs "calls" 1 and "pair" 2 and 4 on each line.
    let program = |metrics: &str| format!("{} '{metrics}'", python_program("logging_reward.py"));
    let good = program(r#"{"calls": 1, "pair": [2, 4]}"#);
    let prompts = f.prompts.to_str().unwrap();
    let extra = [
        "--reward-command",
        &good,
        "--max-steps",
        "2",
        "--sample-every",
        "1",
        "--num-samples",
        "32",
        "--eval-prompts",
        prompts,
        "--eval-every",
        "1",
    ];
    run(&args(&out, &extra)).unwrap();
    for step in metrics(&out) {
        assert_eq!(step["calls"], 1.0, "{step}");
        assert_eq!(step["pair"], 3.0, "{step}");
        assert_eq!(step["eval/calls"], 1.0, "{step}");
        assert_eq!(step["eval/pair"], 3.0, "{step}");
    }
    let samples = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 64);
    for (i, s) in samples.iter().enumerate() {
        assert_eq!(s["extra"]["place"], format!("{} of 32", i % 32), "{s}");
    }
    // One of the run's names, and a value that is no number.
    for (metrics, named) in [
        (r#"{"entropy": 1}"#, "the metric 'entropy'"),
        (r#"{"reward": [1]}"#, "the metric 'reward'"),
        (r#"{"x": "a"}"#, "metric 'x' must be"),
    ] {
        let out = f.root.join("run-logged-refused");
        let _ = std::fs::remove_dir_all(&out);
        let refused = run(&args(&out, &["--reward-command", &program(metrics)]));
        let e = format!("{:#}", refused.unwrap_err());
        assert!(e.contains(named), "{e}");
        // A name clash shows after the first update, which is kept.
        let kept = out.join("checkpoints/step-000001").exists();
        assert_eq!(kept, !named.starts_with("metric"), "{e}");
    }
}

/// Reward functions written for TRL run unchanged through `scripts/trl_reward.py`, three
/// `--reward-command`s at once (TRL's list of reward functions): TRL's own
/// `think_format_reward` (which reads conversational completions), a function of the test's
/// that reads `prompts`, `completion_ids`, two columns and `trainer_state` and returns None
/// off its task, and an async one. The arguments each call got are TRL's (`tests/python/
/// trl_reward_reference.py` checks them against the prompt rows and the tokenizer), and
/// every logged score is the weighted `nansum` of the functions called once on each
/// iteration's batch, as `GRPOTrainer` calls them (1e-4); each command is logged under its
/// own name.
#[test]
fn trl_reward_functions_run_unchanged() {
    let f = fixture();
    let out = f.root.join("run-trl-rewards");
    let _ = std::fs::remove_dir_all(&out);
    let prompts = f.root.join("prompts-conversations.jsonl");
    let rows: String = (0..8)
        .map(|i| {
            let row = serde_json::json!({"prompt": [{"role": "user",
                "content": format!("There are {} heads", i + 3)}],
                "answer": format!("{}", i / 2 + 1), "id": i});
            format!("{row}\n")
        })
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    let log = f.root.join("trl-style-calls.jsonl");
    let _ = std::fs::remove_file(&log);
    let adapter = rlhf_tests::repo_root().join("scripts/trl_reward.py");
    let functions = rlhf_tests::repo_root().join("tests/python/trl_style_rewards.py");
    let python = rlhf_tests::python();
    let command = |spec: &str| {
        format!(
            "TRL_STYLE_LOG='{}' '{}' '{}' '{spec}'",
            log.display(),
            python.display(),
            adapter.display()
        )
    };
    let think = command("trl.rewards:think_format_reward");
    let digits = command(&format!("{}:digits_and_length", functions.display()));
    let length = command(&format!("{}:async_length", functions.display()));
    let mut a = args(
        &out,
        &[
            "--reward-command",
            &think,
            "--reward-command",
            &digits,
            "--reward-command",
            &length,
            "--reward-command-weight",
            "1",
            "--reward-command-weight",
            "0.5",
            "--reward-command-weight",
            "2",
            "--max-steps",
            "2",
            "--sample-every",
            "1",
            "--num-samples",
            "32",
        ],
    );
    a.prompts = prompts.clone();
    // TRL's GRPO default β = 0: the advantages are the rewards' alone.
    a.kl_coef = 0.0;
    run(&a).unwrap();
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains("reward_command_weight = [1.0, 0.5, 2.0]"),
        "{config}"
    );
    let reference = rlhf_tests::run_python(
        "trl_reward_reference.py",
        &[
            "--log",
            log.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--tokenizer",
            f.policy.to_str().unwrap(),
            "--weights",
            "1,0.5,2",
            "--steps",
            "2",
            "--group",
            "4",
        ],
    );
    assert_eq!(reference["problems"], serde_json::json!([]), "{reference}");
    let samples = read_jsonl(&out.join("samples.jsonl"));
    let expected = reference["expected"].as_array().unwrap();
    assert_eq!(samples.len(), 64);
    assert_eq!(expected.len(), 64);
    for (i, (s, want)) in samples.iter().zip(expected).enumerate() {
        assert_eq!(s["response"], reference["texts"][i], "{i}");
        let (ours, trl) = (s["score"].as_f64().unwrap(), want.as_f64().unwrap());
        assert!((ours - trl).abs() < 1e-4, "{i}: ours {ours}, TRL {trl}");
        // TRL's completions table: each function's reward (null off its task) and the
        // completion's advantage.
        for (k, name) in ["reward_command", "reward_command_2", "reward_command_3"]
            .iter()
            .enumerate()
        {
            let (ours, trl) = (&s["rewards"][name], &reference["per_function"][k][i]);
            match (ours.as_f64(), trl.as_f64()) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-4, "{i} {name}: {a} vs {b}"),
                _ => assert!(
                    ours.is_null() && trl.is_null(),
                    "{i} {name}: {ours} vs {trl}"
                ),
            }
        }
        let (ours, trl) = (
            s["advantage"].as_f64().unwrap(),
            reference["advantages"][i].as_f64().unwrap(),
        );
        assert!(
            (ours - trl).abs() < 1e-3 * trl.abs().max(1.0),
            "{i}: advantage {ours} vs TRL {trl}"
        );
    }
    let m = metrics(&out);
    for name in ["reward_command", "reward_command_2", "reward_command_3"] {
        let key = format!("rewards/{name}/mean");
        assert!(m[0][&key].as_f64().is_some(), "{key}: {}", m[0]);
    }
    // The second function answers None on odd ids: its mean is over the even ones alone.
    assert!(m[0]["rewards/reward_command_2/mean"].as_f64().unwrap() >= 0.01);
    // What it logged: TRL's `log_metric` once per batch (32 completions: one call), its
    // mean over the scored rows equal to the source's mean, and `log_extra`'s columns.
    for (step, want) in m.iter().zip(reference["metrics"].as_array().unwrap()) {
        assert_eq!(step["digits/batch_size"], 32.0, "{step}");
        let (ours, trl) = (
            step["digits/mean"].as_f64().unwrap(),
            want["digits/mean"].as_f64(),
        );
        assert!(
            (ours - trl.unwrap()).abs() < 1e-4,
            "ours {ours}, TRL {want}"
        );
        let source = step["rewards/reward_command_2/mean"].as_f64().unwrap();
        assert!(
            (ours - source).abs() < 1e-4,
            "{ours} vs the source's {source}"
        );
    }
    for (i, (s, want)) in samples
        .iter()
        .zip(reference["extra"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(s["extra"], *want, "{i}");
        let digits = s["response"]
            .as_str()
            .unwrap()
            .chars()
            .filter(char::is_ascii_digit);
        assert_eq!(s["extra"]["digits"], digits.count(), "{i}");
    }
}

/// Several reward programs work at once: each gets its requests before any answer is
/// awaited. Here each answers only once the other has its first request (waiting up to
/// 10 s), so one after the other the first would wait past `--reward-timeout 5`.
#[test]
fn reward_programs_work_at_once() {
    let f = fixture();
    let out = f.root.join("run-programs-at-once");
    let _ = std::fs::remove_dir_all(&out);
    let markers = f.root.join("at-once");
    let _ = std::fs::remove_dir_all(&markers);
    std::fs::create_dir_all(&markers).unwrap();
    let program = |mine: &str, other: &str| {
        let (mine, other) = (markers.join(mine), markers.join(other));
        format!(
            "i=0; while read line; do i=$((i+1)); if [ $i = 1 ]; then touch '{}'; n=0; \
             while [ ! -e '{}' ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done; fi; \
             echo '{{\"reward\": 1}}'; done",
            mine.display(),
            other.display()
        )
    };
    let (a, b) = (program("a", "b"), program("b", "a"));
    let extra = [
        "--reward-command",
        &a,
        "--reward-command",
        &b,
        "--reward-timeout",
        "5",
        "--max-steps",
        "1",
    ];
    run(&args(&out, &extra)).unwrap();
    let m = metrics(&out);
    assert_eq!(m[0]["reward"].as_f64(), Some(2.0), "{}", m[0]);
    assert!(markers.join("a").exists() && markers.join("b").exists());
}

/// A reward program that exits, answers garbage or hangs: one error naming the command and
/// the response, after a checkpoint the run resumes from with a working program.
#[test]
fn a_failing_reward_program_stops_the_run_resumably() {
    let f = fixture();
    // Each answers the first iteration's 32 responses, then fails on the second.
    let first = "i=0; while read line; do i=$((i+1)); if [ $i -gt 32 ]; then";
    let ok = "fi; echo '{\"reward\": 1}'; done";
    let cases = [
        (
            format!("{first} exit 3; {ok}"),
            "its output ended before this answer (it exited: exit status: 3)",
        ),
        (
            format!("{first} echo nope; {ok}"),
            "expected a line {\"reward\": <finite number or null>}, got 'nope'",
        ),
        (
            format!("{first} sleep 30; {ok}"),
            "no answer within --reward-timeout 2 s",
        ),
    ];
    for (i, (command, want)) in cases.iter().enumerate() {
        let out = f.root.join(format!("run-command-{i}"));
        let a = args(
            &out,
            &[
                "--max-steps",
                "3",
                "--reward-command",
                command,
                "--reward-timeout",
                "2",
            ],
        );
        let e = format!("{:#}", run(&a).unwrap_err());
        assert!(
            e.contains(&format!(
                "--reward-command '{command}': response 0 of the batch"
            )),
            "{e}"
        );
        assert!(e.contains(want), "{e}");
        assert!(e.contains("continue with --resume"), "{e}");
        assert!(
            out.join("checkpoints").join("step-000001").exists(),
            "{command}: no checkpoint"
        );
        let good = digit_command();
        let resumed = args(
            &out,
            &["--max-steps", "3", "--reward-command", &good, "--resume"],
        );
        assert_eq!(run(&resumed).unwrap().steps, 3, "{command}");
        let steps: Vec<u64> = metrics(&out)
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3], "{command}");
    }
}

/// Data parallel: a reward program that fails on rank 1 only (in the second iteration)
/// stops both ranks together, soon and non-zero, after rank 0 checkpointed step 1 (the
/// last completed one); two ranks then resume with a working program to the end.
#[test]
fn a_reward_program_failing_on_one_rank_stops_every_rank_resumably() {
    let f = fixture();
    let out = f.root.join("run-dp-command");
    let exe = env!("CARGO_BIN_EXE_ppo");
    // Each rank scores 4 prompts × 4 responses an iteration.
    let failing = "i=0; while read line; do i=$((i+1)); if [ \"$RANK\" = 1 ] && [ $i -gt 16 ]; then exit 3; fi; echo '{\"reward\": 1}'; done";
    let torchrun = |command: &str, extra: &[&str]| {
        let options = [
            &[
                "--max-steps",
                "3",
                "--dist-timeout",
                "120",
                "--reward-command",
                command,
            ][..],
            extra,
        ]
        .concat();
        let line = [vec!["train".to_string()], argv(&out, &options)].concat();
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        rlhf_tests::torchrun(exe, 2, &line, &[])
    };
    let started = std::time::Instant::now();
    let failed = torchrun(failing, &[]);
    let log = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "{log}");
    assert!(
        started.elapsed().as_secs() < 90,
        "the ranks waited for the timeout"
    );
    assert!(log.contains("the rollout failed on another rank"), "{log}");
    assert!(log.contains("exit status: 3"), "{log}");
    assert!(out.join("checkpoints/step-000001").exists(), "{log}");
    assert!(!out.join("checkpoints/step-000002").exists());
    let resumed = torchrun(&digit_command(), &["--resume"]);
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{log}");
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
}

#[test]
fn killed_grpo_run_resumes_to_the_same_weights() {
    let f = fixture();
    // Plain, with the reference moved towards the policy at step 2 (`--sync-ref-model`):
    // the resumed run reads the moved reference from the step-2 checkpoint; and with
    // adaptive entropy control, whose coefficient and last entropy it reads back too.
    let sync = "--sync-ref-model --ref-model-sync-steps 2 --ref-model-mixup-alpha 0.5";
    let entropy =
        "--use-adaptive-entropy --entropy-coef 0.01 --entropy-coef-delta 0.01 --entropy-target 10";
    // And with DAPO's dynamic sampling, whose extra batches of prompts move the sampler;
    // online DPO, whose minibatches are shuffled a pair at a time; A*-PO, whose optimal
    // values the resumed run reads back; and SDFT with an EMA teacher, moved at step 2 and
    // read back from the checkpoint, and SDPO (its EMA teacher moved every step).
    let filter = "--filter-groups --max-num-gen-batches 0";
    for (tag, options) in [
        ("plain", ""),
        ("sync", sync),
        ("entropy", entropy),
        ("filter", filter),
        ("online-dpo", "online-dpo"),
        ("a2po", "a2po"),
        ("sdft", "sdft"),
        ("sdpo", "sdpo"),
        ("sdpo-lora", "sdpo --lora-r 4"),
    ] {
        let straight = f.root.join(format!("run-grpo-straight-{tag}"));
        let reward = TextRule(digit_share);
        run_with_reward(&resumable_args(&straight, options, false), &reward).unwrap();
        let killed = f.root.join(format!("run-grpo-killed-{tag}"));
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_killed_grpo_run",
                "--nocapture",
                "--include-ignored",
            ])
            .env("GRPO_CHILD_OUT", &killed)
            .env("GRPO_CHILD_OPTIONS", options)
            .env("RLHF_CRASH_AT", "mid-step@5")
            .status()
            .unwrap();
        assert!(!status.success(), "{tag}: the child was not killed");
        assert!(!killed.join("final").exists());
        let moved = killed.join("checkpoints/step-000002/ref_model.safetensors");
        let moves = ["sync", "sdft", "sdpo"].contains(&tag);
        assert_eq!(moved.exists(), moves, "{tag}");
        // A LoRA policy's EMA teacher is an average of its adapter, kept beside it.
        let adapter = killed.join("checkpoints/step-000002/teacher_adapter.safetensors");
        assert_eq!(adapter.exists(), tag == "sdpo-lora", "{tag}");
        run_with_reward(&resumable_args(&killed, options, true), &reward).unwrap();
        let diff =
            rlhf_tests::max_weight_diff(&straight.join("final"), &killed.join("final"), Head::Lm);
        assert!(diff < 1e-6, "{tag}: resumed weights differ by {diff:e}");
        // TRL's running token count is in the checkpoint too.
        let tokens = |dir: &Path| metrics(dir).last().unwrap()["num_tokens"].as_f64();
        assert_eq!(tokens(&straight), tokens(&killed), "{tag}: num_tokens");
    }
    let (plain, synced) = (
        f.root.join("run-grpo-straight-plain/final"),
        f.root.join("run-grpo-straight-sync/final"),
    );
    let diff = rlhf_tests::max_weight_diff(&plain, &synced, Head::Lm);
    assert!(diff > 1e-6, "the moved reference changed nothing");
    // The entropy (≈ 5.4 nats) stays under the target: the coefficient grows by 0.01 at
    // each of the 2 optimiser steps of an iteration.
    let coefs: Vec<f64> = metrics(&f.root.join("run-grpo-straight-entropy"))
        .iter()
        .map(|r| r["entropy_coef"].as_f64().unwrap())
        .collect();
    let want = [0.03, 0.05, 0.07, 0.09];
    assert!(
        coefs.iter().zip(want).all(|(c, w)| (c - w).abs() < 1e-9),
        "{coefs:?}"
    );
    let filtered = metrics(&f.root.join("run-grpo-straight-filter"));
    let batches: Vec<f64> = filtered
        .iter()
        .map(|r| r["num_gen_batches"].as_f64().unwrap())
        .collect();
    // Some iterations needed a second batch (this seed: 2, 2, 1, 2), and none trains on
    // a group whose rewards are all equal.
    assert!(batches.iter().any(|&b| b > 1.0), "{batches:?}");
    assert!(filtered
        .iter()
        .all(|r| r["frac_reward_zero_std"].as_f64() == Some(0.0)));
}

/// The process `killed_grpo_run_resumes…` starts and kills (ignored on its own).
#[test]
#[ignore]
fn child_killed_grpo_run() {
    let Some(out) = std::env::var_os("GRPO_CHILD_OUT") else {
        return;
    };
    let options = std::env::var("GRPO_CHILD_OPTIONS").unwrap_or_default();
    let a = resumable_args(Path::new(&out), &options, false);
    run_with_reward(&a, &TextRule(digit_share)).unwrap();
}

/// A run of `killed_grpo_run_resumes…` (and of its child): 4 iterations, a checkpoint every
/// 2, with `options`, or online DPO's or A*-PO's estimator where they say `online-dpo` or
/// `a2po` (whose settings the base options hold otherwise).
fn resumable_args(out: &Path, options: &str, resume: bool) -> TrainArgs {
    let online = options == "online-dpo";
    let a2po = options == "a2po";
    let sdft = options == "sdft";
    let sdpo = options.starts_with("sdpo");
    let mut extra = vec!["--max-steps", "4", "--save-every", "2"];
    if sdpo {
        extra.extend([
            "--success-reward-threshold",
            "0.2",
            "--distillation-weight",
            "0.5",
        ]);
        extra.extend(options.split_whitespace().skip(1));
    }
    if sdft {
        extra.extend([
            "--teacher-model-kind",
            "ema",
            "--teacher-sync-steps",
            "2",
            "--teacher-update-rate",
            "0.5",
            "--distillation-topk",
            "10",
        ]);
    }
    if !online && !a2po && !sdft && !sdpo {
        extra.extend(options.split_whitespace());
    }
    if resume {
        extra.push("--resume");
    }
    let mut a = args(out, &extra);
    if online {
        a.advantage_estimator = "online-dpo".parse().unwrap();
        a.num_generations = 2;
        a.kl_coef = 0.1;
    }
    if a2po {
        // Its first stage's values are read back on --resume.
        a.advantage_estimator = "a2po".parse().unwrap();
        a.num_generations = 1;
        a.num_value_samples = 2;
        a.kl_coef = 0.1;
    }
    if sdft || sdpo {
        // SDFT's reward is only logged.
        a.advantage_estimator = options.split_whitespace().next().unwrap().parse().unwrap();
        a.prompts = fixture().root.join("prompts-context.jsonl");
    }
    a
}

/// GDPO (`--multi-objective-aggregation normalize-then-sum`) with two sources, the
/// exact-answer rule and a reward program: both are logged, the policy moves; with a KL
/// penalty in the rewards it is refused. The run also corrects for the sampler
/// (`--sampling-correction`), whose ratios are logged.
#[test]
fn gdpo_runs_with_two_reward_sources() {
    let f = fixture();
    let out = f.root.join("run-gdpo");
    let command = digit_command();
    let mut extra = vec![
        "--max-steps",
        "2",
        "--reward-rule",
        "exact-answer",
        "--answer-pattern",
        "([0-9])",
        "--reward-command",
        &command,
        "--reward-command-weight",
        "0.5",
        "--multi-objective-aggregation",
        "normalize-then-sum",
    ];
    let refused = run(&args(&out, &extra)).unwrap_err().to_string();
    assert!(
        refused.contains("a KL penalty in the rewards (use --kl-in-loss or --kl-coef 0)"),
        "{refused}"
    );
    // With the sampler correction too: on the CPU in f32 the decoding and training
    // forwards agree, so its ratios are 1 (1e-4).
    extra.extend([
        "--kl-coef",
        "0",
        "--sampling-correction",
        "token-truncate",
        "--sampling-correction-min",
        "0.5",
    ]);
    run(&args(&out, &extra)).unwrap();
    for r in metrics(&out) {
        for key in ["rewards/exact_answer/mean", "rewards/reward_command/mean"] {
            assert!(r[key].as_f64().is_some(), "{key}: {r}");
        }
        for stat in ["min", "mean", "max"] {
            let key = format!("sampling/importance_sampling_ratio/{stat}");
            let ratio = r[&key].as_f64().unwrap_or(f64::NAN);
            assert!((ratio - 1.0).abs() < 1e-4, "{key}: {r}");
        }
        let gap = |stat: &str| {
            let key = format!("sampling/sampling_logp_difference/{stat}");
            r[&key].as_f64().unwrap_or(f64::NAN)
        };
        assert!(gap("mean") <= gap("max") && gap("max") < 1e-4, "{r}");
    }
    let moved = rlhf_tests::max_weight_diff(&f.policy, &out.join("final"), Head::Lm);
    assert!(moved > 1e-5, "the policy did not move");
}

/// Two iterations rewarded by `--reward-rule exact-answer`, the first digit of a response
/// its answer (a pattern the tiny model's responses meet), −0.5 without one.
const EXACT_ANSWER_RUN: [&str; 8] = [
    "--max-steps",
    "2",
    "--reward-rule",
    "exact-answer",
    "--answer-pattern",
    "([0-9])",
    "--format-penalty",
    "0.5",
];

/// `--eval-prompts`: scored after the last iteration only (`--eval-every 0`), with
/// `--num-generations-eval` responses per prompt; the training run is the same to the bit
/// as without it (evaluation draws from its own seeds).
#[test]
fn eval_prompts_are_scored_and_leave_training_alone() {
    let f = fixture();
    let base = EXACT_ANSWER_RUN;
    let plain = f.root.join("run-no-eval");
    run(&args(&plain, &base)).unwrap();
    let evaluated = f.root.join("run-eval");
    let prompts = f.prompts.to_str().unwrap();
    let extra = ["--eval-prompts", prompts, "--num-generations-eval", "2"];
    run(&args(&evaluated, &[&base[..], &extra].concat())).unwrap();
    let (a, b) = (metrics(&plain), metrics(&evaluated));
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        for key in ["reward", "loss/policy_avg", "train/grad_norm"] {
            assert_eq!(x[key], y[key], "{key}: evaluation changed training");
        }
    }
    assert!(
        b[0].get("eval/reward").is_none(),
        "evaluated before the end"
    );
    let last = &b[1];
    let reward = last["eval/reward"].as_f64().unwrap();
    // Rule verdicts are 1, 0 or −0.5 (the format penalty); one source, no EOS penalty.
    assert!((-0.5..=1.0).contains(&reward), "{last}");
    assert_eq!(
        last["eval/rewards/exact_answer/mean"].as_f64(),
        Some(reward)
    );
    let length = last["eval/completions/mean_length"].as_f64().unwrap();
    assert!(length > 0.0 && length <= 12.0, "{last}");
    assert!(last["eval/reward_std"].as_f64().unwrap() >= 0.0);
    let diff =
        rlhf_tests::max_weight_diff(&plain.join("final"), &evaluated.join("final"), Head::Lm);
    assert_eq!(diff, 0.0, "evaluation changed the trained weights");
}

/// A Mixture-of-Experts policy (a tiny Qwen3-MoE, and a tiny gpt-oss: sinks, a sliding
/// layer, fused experts): GRPO adds the routers' load-balancing loss
/// (`--router-aux-loss-coef`) and logs TRL's `aux_loss` each iteration; with
/// `--gradient-checkpointing` (each recomputed MoE block adds its share) the weights and
/// the logged losses are the same, and without the loss the weights differ.
#[test]
fn moe_policy_trains_with_the_load_balancing_loss() {
    let f = fixture();
    type Make = fn(&Path, &Path);
    let tiny: [(&str, Make); 2] = [
        ("moe", rlhf_tests::tiny_moe),
        ("gpt-oss", rlhf_tests::tiny_gpt_oss),
    ];
    for (name, make) in tiny {
        let moe = f.root.join(name);
        make(&f.policy, &moe);
        let moe_args = |out: &Path, extra: &[&str]| {
            let mut argv = argv(out, &[&EXACT_ANSWER_RUN[..], extra].concat());
            argv[1] = moe.to_str().unwrap().to_string();
            rlhf_tests::parse_args::<TrainArgs, _>(&argv)
        };
        let (kept, recomputed, plain) = (
            f.root.join(format!("run-{name}")),
            f.root.join(format!("run-{name}-recomputed")),
            f.root.join(format!("run-{name}-plain")),
        );
        run(&moe_args(&kept, &["--router-aux-loss-coef", "0.5"])).unwrap();
        let extra = ["--router-aux-loss-coef", "0.5", "--gradient-checkpointing"];
        run(&moe_args(&recomputed, &extra)).unwrap();
        run(&moe_args(&plain, &["--router-aux-loss-coef", "0"])).unwrap();
        let (a, b) = (metrics(&kept), metrics(&recomputed));
        assert_eq!(a.len(), 2);
        for (x, y) in a.iter().zip(&b) {
            let (u, v) = (
                x["aux_loss"].as_f64().unwrap(),
                y["aux_loss"].as_f64().unwrap(),
            );
            // E·Σ f·P: about k = 2 when balanced, at most E = 4.
            assert!(
                (1.0..=4.0).contains(&u) && (u - v).abs() < 1e-5,
                "{name}: aux_loss {u} vs {v}"
            );
        }
        assert!(metrics(&plain).iter().all(|m| m.get("aux_loss").is_none()));
        let diff = |a: &Path, b: &Path| {
            rlhf_tests::max_weight_diff(&a.join("final"), &b.join("final"), Head::Lm)
        };
        // The kept run backpropagates the loss in a second pass over the kept graph, the
        // recomputed one adds each block's share inside its backward: the gradients agree
        // to rounding, which Adam's normalised steps (lr 1e-3) carry to at most 1.4e-5 on
        // gpt-oss's rarely seen embedding rows. Dropping the shares moves the logged
        // aux_loss by 0.25.
        let (same, other) = (diff(&kept, &recomputed), diff(&kept, &plain));
        assert!(same < 5e-5, "{name}: {same}");
        assert!(other > 1e-4, "{name}: {other}");
    }
}

/// TRL's `disable_dropout` is false in GRPOConfig and RLOOConfig: LoRA's dropout trains by
/// default (other weights than dropout 0), and `--disable-dropout true` turns it off (the
/// weights of dropout 0).
#[test]
fn lora_dropout_stays_on_as_in_trls_grpo() {
    let f = fixture();
    let train = |name: &str, extra: &[&str]| {
        let out = f.root.join(name);
        let lora = ["--lora-r", "4"];
        let args = argv(&out, &[&EXACT_ANSWER_RUN[..], &lora, extra].concat());
        run(&rlhf_tests::parse_args::<TrainArgs, _>(&args)).unwrap();
        out.join("final")
    };
    rlhf_tests::check_dropout_default(train, Head::Lm, false);
}

/// `--cast-lm-head-to-fp32` (TRL's `cast_lm_head_to_fp32`, the ScaleRL recipe) in bf16: the
/// logits are the bf16 hidden states cast up times the head's f32 weights as stored (a bf16
/// head's differ from those by rounding); a GRPO run trains and saves the head in f32 and
/// the rest in bf16; a head tied to the input embedding is refused with one line, as TRL
/// documents, and so is one an adapter carries (`lm_head` in `modules_to_save`).
#[test]
fn cast_lm_head_to_fp32_keeps_the_head_in_f32() {
    use common::{Model, ModelOptions};
    use tch::{Device, Kind, Tensor};
    let f = fixture();
    let row = rlhf_tests::sft_rows(&f.policy, &f.root.join("sft.jsonl"), 64)[0]
        .ids
        .clone();
    let ids = Tensor::from_slice(&row).unsqueeze(0);
    let load = |cast: bool| {
        let opts = ModelOptions {
            cast_lm_head_to_fp32: cast,
            ..ModelOptions::new(Head::Lm, Device::Cpu, Kind::BFloat16)
        };
        Model::load(&f.policy, &opts).unwrap().0
    };
    let (cast, plain) = (load(true), load(false));
    let stored = Model::load(&f.policy, &ModelOptions::cpu(Head::Lm))
        .unwrap()
        .0;
    let head = stored.named_tensors()["lm_head.weight"].shallow_clone();
    assert_eq!(cast.named_tensors()["lm_head.weight"].kind(), Kind::Float);
    assert!(
        cast.named_tensors()["lm_head.weight"].equal(&head),
        "the f32 head lost precision"
    );
    let hidden = tch::no_grad(|| cast.hidden(&ids, &ids.ones_like(), None));
    assert_eq!(hidden.kind(), Kind::BFloat16);
    let want = hidden.to_kind(Kind::Float).linear::<Tensor>(&head, None);
    let logits = tch::no_grad(|| cast.head_output(&hidden));
    assert_eq!(logits.kind(), Kind::Float);
    let diff = |x: &Tensor| {
        (x.to_kind(Kind::Float) - &want)
            .abs()
            .max()
            .double_value(&[])
    };
    assert!(diff(&logits) < 1e-5, "f32 head: {:e}", diff(&logits));
    let rounded = tch::no_grad(|| plain.head_output(&hidden));
    assert!(diff(&rounded) > 1e-3, "bf16 head: {:e}", diff(&rounded));

    let out = f.root.join("run-cast-head");
    let extra = ["--dtype", "bf16", "--cast-lm-head-to-fp32"];
    run(&args(&out, &[&EXACT_ANSWER_RUN[..], &extra].concat())).unwrap();
    let saved: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(out.join("final").join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    assert_eq!(saved["lm_head.weight"].kind(), Kind::Float);
    assert_eq!(
        saved["model.layers.0.self_attn.q_proj.weight"].kind(),
        Kind::BFloat16
    );
    let moved = rlhf_tests::max_weight_diff(&f.policy, &out.join("final"), Head::Lm);
    assert!(moved > 1e-5, "the policy did not move");

    // A tied head is refused.
    let tied = f.root.join("tied");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(f.policy.join("config.json")).unwrap())
            .unwrap();
    config["tie_word_embeddings"] = Value::from(true);
    let config = common::models::ModelConfig::from_json(config, Path::new("config.json")).unwrap();
    Model::new(config, &ModelOptions::cpu(Head::Lm))
        .save(&tied, Some(&f.policy))
        .unwrap();
    let opts = ModelOptions {
        cast_lm_head_to_fp32: true,
        ..ModelOptions::cpu(Head::Lm)
    };
    let e = Model::load(&tied, &opts).unwrap_err().to_string();
    assert!(
        e.contains("--cast-lm-head-to-fp32: the LM head is tied"),
        "{e}"
    );
    // So is a head an adapter carries (its trained copy would stay in the base's dtype).
    let lora = common::models::lora::LoraConfig {
        r: 2,
        alpha: 2.0,
        dropout: 0.0,
        target_modules: common::models::lora::TargetModules::Default,
        use_rslora: false,
        use_dora: false,
        patterns: Default::default(),
        init: Default::default(),
        modules_to_save: vec!["lm_head".into()],
        trainable_token_indices: vec![],
        target_parameters: vec![],
    };
    let e = Model::load(&f.policy, &opts.with_lora(Some(lora)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--cast-lm-head-to-fp32: the adapter carries the LM head"),
        "{e}"
    );
}

/// `--shuffle-dataset false` (TRL's `shuffle_dataset`): the prompts come in the file's
/// order, 8 per iteration (each with its 4 responses in a row); shuffled, they do not.
#[test]
fn prompts_follow_the_file_order_without_shuffling() {
    let f = fixture();
    let file: Vec<String> = read_jsonl(&f.prompts)
        .iter()
        .map(|r| r["prompt"].as_str().unwrap().to_string())
        .collect();
    let order = |name: &str, shuffle: &str| {
        let out = f.root.join(name);
        let options = [
            "--num-samples",
            "32",
            "--sample-every",
            "1",
            "--shuffle-dataset",
            shuffle,
        ];
        run(&args(&out, &[&EXACT_ANSWER_RUN[..], &options].concat())).unwrap();
        let samples = read_jsonl(&out.join("samples.jsonl"));
        let mut prompts: Vec<String> = vec![];
        for s in &samples {
            let p = s["prompt"].as_str().unwrap();
            let row = file.iter().find(|r| p.ends_with(r.as_str())).unwrap();
            if prompts.last() != Some(row) {
                prompts.push(row.clone());
            }
        }
        prompts
    };
    assert_eq!(order("run-in-order", "false"), file);
    assert_ne!(order("run-shuffled", "true"), file);
}

/// `--reward-rule exact-answer` from the command line's options, no reward model: every
/// logged sample's score is the rule's verdict on its response against its row's answer.
#[test]
fn exact_answer_scores_from_the_rows_answers() {
    let f = fixture();
    let out = f.root.join("run-exact");
    let samples = ["--num-samples", "32", "--sample-every", "1"];
    let extra = [&EXACT_ANSWER_RUN[..], &samples].concat();
    let summary = run(&args(&out, &extra)).unwrap();
    assert_eq!(summary.steps, 2);
    let rule = ExactAnswer::new(Some("([0-9])"), 0.5).unwrap();
    let answers: Vec<Value> = read_jsonl(&f.prompts);
    let samples = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 64);
    let mut seen = std::collections::BTreeSet::new();
    for s in &samples {
        let prompt = s["prompt"].as_str().unwrap();
        let row = answers
            .iter()
            .find(|r| prompt.ends_with(r["prompt"].as_str().unwrap()))
            .unwrap();
        let fields = row.as_object().unwrap().clone();
        let text = s["response"].as_str().unwrap().to_string();
        let input = RewardInput {
            prompts: &[vec![]],
            responses: &[vec![]],
            completion_ids: &[vec![]],
            texts: std::slice::from_ref(&text),
            fields: &[fields],
            ended_with_eos: &[true],
            examples: None,
            step: None,
            messages: None,
        };
        let want = rule.scores(&input).unwrap()[0];
        assert!((s["score"].as_f64().unwrap() - want).abs() < 1e-6, "{s}");
        seen.insert((want * 2.0) as i64);
    }
    assert!(seen.len() >= 2, "every sample scored the same: {seen:?}");
    let m = metrics(&out);
    assert!(m[0]["rewards/exact_answer/mean"].as_f64().is_some());
    // TRL's RLOO `reward_clip_range`: the summed score clipped, each source's own left be.
    let clipped = f.root.join("run-exact-clipped");
    let range = ["--reward-clip-range", "0.2,0.6"];
    run(&args(&clipped, &[&extra[..], &range].concat())).unwrap();
    for s in read_jsonl(&clipped.join("samples.jsonl")) {
        let own = s["rewards"]["exact_answer"].as_f64().unwrap();
        let score = s["score"].as_f64().unwrap();
        assert!((score - own.clamp(0.2, 0.6)).abs() < 1e-6, "{s}");
    }
}

/// TRL's GRPO options beyond the estimator, end to end. GSPO (`--importance-sampling-level
/// sequence`) at its paper's clip range (3e-4, 4e-4) with Lite PPO's batch std
/// (`--scale-rewards batch`) and two-sided clipping (`--delta`): the first of the two minibatches
/// is on-policy (ratio 1), the second clips whole responses, and TRL's clip metrics say so.
/// DAPO's overlong filtering (`--mask-truncated-completions`): when every response was
/// cut at --response-length (the tiny model never samples EOS in 12 tokens), the policy
/// loss has no token and the update leaves every weight as it was; without it the same run
/// moves them.
#[test]
fn gspo_batch_scaling_delta_and_overlong_filtering() {
    let f = fixture();
    let out = f.root.join("run-gspo");
    let extra = [
        "--importance-sampling-level",
        "sequence",
        "--cliprange",
        "3e-4",
        "--cliprange-high",
        "4e-4",
        "--scale-rewards",
        "batch",
        "--delta",
        "4",
        "--max-steps",
        "2",
    ];
    run_with_reward(&args(&out, &extra), &TextRule(digit_share)).unwrap();
    let m = metrics(&out);
    assert_eq!(m.len(), 2);
    let mut region = 0.0;
    for r in &m {
        assert!(
            r["policy/first_ratio_max_dev"].as_f64().unwrap() < 1e-5,
            "{r}"
        );
        let (low, high) = (
            r["clip_ratio/low_mean"].as_f64().unwrap(),
            r["clip_ratio/high_mean"].as_f64().unwrap(),
        );
        let both = r["clip_ratio/region_mean"].as_f64().unwrap();
        assert!((both - low - high).abs() < 1e-9, "{r}");
        region += both;
    }
    assert!(
        region > 0.0,
        "no response clipped at ε 3e-4 after an update: {m:?}"
    );

    let steps = ["--max-steps", "1", "--weight-decay", "0"];
    let masked = f.root.join("run-overlong-masked");
    let mut with_flag = steps.to_vec();
    with_flag.push("--mask-truncated-completions");
    run_with_reward(&args(&masked, &with_flag), &TextRule(digit_share)).unwrap();
    let m = metrics(&masked);
    assert_eq!(
        m[0]["completions/clipped_ratio"].as_f64(),
        Some(1.0),
        "{m:?}"
    );
    let diff = rlhf_tests::max_weight_diff(&f.policy, &masked.join("final"), Head::Lm);
    assert_eq!(
        diff, 0.0,
        "every response was masked out, yet the policy moved"
    );
    let unmasked = f.root.join("run-overlong-unmasked");
    run_with_reward(&args(&unmasked, &steps), &TextRule(digit_share)).unwrap();
    let diff = rlhf_tests::max_weight_diff(&f.policy, &unmasked.join("final"), Head::Lm);
    assert!(
        diff > 1e-5,
        "without the flag the policy did not move: {diff:e}"
    );
}

/// `--policy-loss cispo` (weight capped at 5, ScaleRL's), `sapo` (sampled with
/// `--repetition-penalty`), `vespo` (summed over each response's tokens, TRL's
/// `luspo` aggregation) and `gmpo` (GMPO's log-space clip of 0.4) run end to end: the first minibatch is on-policy, CISPO's cap binds on no token at ratios this close to 1 (GMPO's clip on a few),
/// and the policy moves.
#[test]
fn cispo_and_sapo_train() {
    let f = fixture();
    for (name, extra) in [
        ("cispo", ["--policy-loss", "cispo", "--cliprange-high", "5"]),
        (
            "sapo",
            ["--policy-loss", "sapo", "--sapo-temperature-neg", "1.05"],
        ),
        (
            "vespo",
            [
                "--policy-loss",
                "vespo",
                "--loss-aggregation",
                "seq-mean-token-sum",
            ],
        ),
        ("gmpo", ["--policy-loss", "gmpo", "--cliprange", "0.4"]),
    ] {
        let out = f.root.join(format!("run-{name}"));
        let mut a = extra.to_vec();
        if name == "sapo" {
            // Sampled with a repetition penalty: the rollout's log-probs are still the
            // unpenalised policy's, so the first minibatch stays on-policy.
            a.extend(["--repetition-penalty", "1.3"]);
        }
        a.extend(["--max-steps", "2"]);
        run_with_reward(&args(&out, &a), &TextRule(digit_share)).unwrap();
        for r in metrics(&out) {
            assert!(
                r["policy/first_ratio_max_dev"].as_f64().unwrap() < 1e-5,
                "{name}: {r}"
            );
            // GMPO clips (in log space) on the second, off-policy minibatch; the others
            // clip nothing.
            let region = r["clip_ratio/region_mean"].as_f64().unwrap();
            assert!(
                (name == "gmpo" && region < 0.2) || region == 0.0,
                "{name}: {r}"
            );
            assert!(
                r["loss/policy_avg"].as_f64().unwrap().is_finite(),
                "{name}: {r}"
            );
            // VESPO's Gamma weight: 1 on the first minibatch, below its peak (1.24 at
            // these k and λ) and above 0 on the second, off-policy one.
            let phi = r.get("vespo/phi_seq_mean").and_then(Value::as_f64);
            assert_eq!(phi.is_some(), name == "vespo", "{name}: {r}");
            assert!(phi.is_none_or(|p| p > 0.0 && p < 1.25), "{name}: {r}");
            // TRL's `cispo_clip_ratio`: CISPO's capped share, here none.
            let capped = r.get("cispo_clip_ratio").and_then(Value::as_f64);
            assert_eq!(capped, (name == "cispo").then_some(0.0), "{name}: {r}");
        }
        let moved = rlhf_tests::max_weight_diff(&f.policy, &out.join("final"), Head::Lm);
        assert!(moved > 1e-5, "{name}: the policy did not move");
    }
}

/// `--top-entropy-quantile 0.2`: the threshold comes from the whole minibatch (the
/// current policy's entropies, so the second minibatch's are after the first's update),
/// so two micro-batches per minibatch train the weights one does (1e-6); and the loss on
/// a fifth of the tokens trains other weights than the loss on all of them. (One
/// iteration: a second one's sampling would amplify the 1e-7 of the split.)
#[test]
fn top_entropy_quantile_is_the_minibatchs_and_changes_the_update() {
    let f = fixture();
    let run = |name: &str, extra: &[&str]| {
        let out = f.root.join(format!("run-entropy-{name}"));
        let mut a = vec!["--max-steps", "1", "--weight-decay", "0"];
        a.extend_from_slice(extra);
        run_with_reward(&args(&out, &a), &TextRule(digit_share)).unwrap();
        out.join("final")
    };
    let quantile = ["--top-entropy-quantile", "0.2"];
    let one = run("one", &quantile);
    let two = run("two", &[&quantile[..], &["--grad-accum", "2"]].concat());
    let all = run("all", &[]);
    let diff = rlhf_tests::max_weight_diff(&one, &two, Head::Lm);
    assert!(diff < 1e-6, "one vs two micro-batches: {diff:e}");
    let diff = rlhf_tests::max_weight_diff(&one, &all, Head::Lm);
    assert!(diff > 1e-5, "the quantile changed nothing: {diff:e}");
}

/// DeepSeek-V3.2's corrections (TRL's `off_policy_mask_threshold` and
/// `use_bias_correction_kl`). Off-policy masking at δ = 0 drops, on the second minibatch
/// (after the first one's update), negative-advantage responses that drifted, logs the
/// share, and changes the update; at a δ no response reaches it trains exactly the weights
/// of a run without it. The bias-corrected KL loss term trains other weights than the plain
/// one.
#[test]
fn off_policy_masking_and_bias_corrected_kl() {
    let f = fixture();
    let run = |name: &str, extra: &[&str]| {
        let out = f.root.join(format!("run-opsm-{name}"));
        let mut a = vec!["--max-steps", "1", "--weight-decay", "0"];
        a.extend_from_slice(extra);
        run_with_reward(&args(&out, &a), &TextRule(digit_share)).unwrap();
        out
    };
    let plain = run("plain", &[]);
    let zero = run("zero", &["--off-policy-mask-threshold", "0"]);
    let far = run("far", &["--off-policy-mask-threshold", "1e9"]);
    let masked = metrics(&zero)[0]["off_policy_mask/masked_ratio"]
        .as_f64()
        .unwrap();
    assert!(masked > 0.0 && masked < 0.5, "masked share {masked}");
    assert_eq!(
        metrics(&far)[0]["off_policy_mask/masked_ratio"].as_f64(),
        Some(0.0)
    );
    assert!(metrics(&plain)[0]
        .get("off_policy_mask/masked_ratio")
        .is_none());
    let final_of = |out: &Path| out.join("final");
    let diff = rlhf_tests::max_weight_diff(&final_of(&plain), &final_of(&far), Head::Lm);
    assert_eq!(diff, 0.0, "a mask that drops nothing changed the update");
    let diff = rlhf_tests::max_weight_diff(&final_of(&plain), &final_of(&zero), Head::Lm);
    assert!(diff > 1e-6, "masking changed nothing: {diff:e}");

    let kl = ["--kl-in-loss", "--kl-coef", "0.5"];
    let kl_plain = run("kl", &kl);
    let corrected = run(
        "kl-corrected",
        &[&kl[..], &["--use-bias-correction-kl"]].concat(),
    );
    let diff = rlhf_tests::max_weight_diff(&final_of(&kl_plain), &final_of(&corrected), Head::Lm);
    assert!(diff > 1e-6, "the correction changed nothing: {diff:e}");
}

/// `--kl-coef 0` (TRL's GRPO default β = 0): no reference is loaded or run and no KL is
/// logged, and the policy trains as with a β too small to matter (1e-30, where the
/// reference is held and every KL term computed).
#[test]
fn kl_coef_zero_holds_no_reference_and_trains_the_same() {
    let f = fixture();
    let (free, tiny) = (f.root.join("run-beta-0"), f.root.join("run-beta-tiny"));
    let steps = ["--max-steps", "2"];
    let with = |beta: &'static str| -> Vec<&'static str> {
        let mut a = steps.to_vec();
        a.extend(["--kl-coef", beta]);
        a
    };
    let summary = run_with_reward(&args(&free, &with("0")), &TextRule(digit_share)).unwrap();
    run_with_reward(&args(&tiny, &with("1e-30")), &TextRule(digit_share)).unwrap();
    assert_eq!(summary.kl, None);
    for r in metrics(&free) {
        assert!(
            r.get("objective/kl").is_none() && r.get("kl").is_none(),
            "{r}"
        );
    }
    assert!(metrics(&tiny)[0]["objective/kl"].as_f64().is_some());
    assert!(metrics(&tiny)[0]["kl"].as_f64().is_some());
    let diff = rlhf_tests::max_weight_diff(&free.join("final"), &tiny.join("final"), Head::Lm);
    assert!(diff < 1e-7, "β = 0 and β = 1e-30 trained apart: {diff:e}");
}

#[test]
fn bad_group_options_are_refused_with_one_line() {
    let f = fixture();
    let out = f.root.join("run-bad-grpo");
    let one = |a: &mut TrainArgs| a.num_generations = 1;
    let gae = |a: &mut TrainArgs| a.advantage_estimator = "gae".parse().unwrap();
    let high = |a: &mut TrainArgs| a.cliprange_high = Some(0.0);
    let delta = |a: &mut TrainArgs| a.delta = Some(1.0);
    let cispo = |a: &mut TrainArgs| a.policy_loss = ppo::args::PolicyLossName::Cispo;
    let sync = |a: &mut TrainArgs| {
        a.sync.sync_ref_model = true;
        a.kl_coef = 0.0;
        a.reward_rule = vec![ppo::args::RewardRule::ExactAnswer];
    };
    let target = |a: &mut TrainArgs| {
        a.kl_coef = 0.0;
        a.kl_target = Some(1.0);
    };
    let scale = |a: &mut TrainArgs| {
        a.advantage_estimator = "rloo".parse().unwrap();
        a.scale_rewards = Some("batch".parse().unwrap());
    };
    let quantile = |a: &mut TrainArgs| a.top_entropy_quantile = 1.5;
    let correction = |a: &mut TrainArgs| a.use_bias_correction_kl = true;
    let opsm = |a: &mut TrainArgs| a.off_policy_mask_threshold = Some(-0.1);
    let vespo = |a: &mut TrainArgs| {
        a.policy_loss = ppo::args::PolicyLossName::Vespo;
        a.importance_sampling_level = "sequence".parse().unwrap();
    };
    type Change<'a> = &'a dyn Fn(&mut TrainArgs);
    let cases: [(Change, &str); 12] = [
        (&correction, "--use-bias-correction-kl needs --kl-in-loss"),
        (&opsm, "--off-policy-mask-threshold must be ≥ 0"),
        (
            &sync,
            "--sync-ref-model needs a reference copy to move: not with --kl-coef 0",
        ),
        (
            &cispo,
            "--policy-loss cispo caps the importance weight at --cliprange-high",
        ),
        (&target, "--kl-target needs --kl-coef > 0"),
        (&one, "--num-generations must be at least 2"),
        (&gae, "--advantage-estimator gae trains a value model"),
        (&high, "--cliprange-high must be > 0"),
        (&delta, "--delta must be > 1"),
        (&scale, "--scale-rewards needs --advantage-estimator grpo"),
        (&quantile, "--top-entropy-quantile must be in [0, 1]"),
        (
            &vespo,
            "--policy-loss vespo forms its own sequence-level weight",
        ),
    ];
    for (change, want) in cases {
        let mut a = args(&out, &[]);
        change(&mut a);
        let e = run(&a).unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    let e = run(&args(&out, &[])).unwrap_err().to_string();
    assert!(e.contains("no reward: give --reward-model"), "{e}");
    // Reward programs: at most 8, and one weight each (or none).
    let mut a = args(&out, &[]);
    a.reward_command = vec!["true".into(); 9];
    let e = run(&a).unwrap_err().to_string();
    assert!(e.contains("--reward-command: at most 8"), "{e}");
    a.reward_command.truncate(2);
    a.reward_command_weight = vec![1.0, 2.0, 3.0];
    let e = run(&a).unwrap_err().to_string();
    assert!(
        e.contains("--reward-command-weight: give one per --reward-command"),
        "{e}"
    );
    // exact-answer needs every row's answer.
    let no_answer = f.root.join("prompts-no-answer.jsonl");
    std::fs::write(
        &no_answer,
        "{\"prompt\": \"a\", \"answer\": 3}\n{\"prompt\": \"b\"}\n",
    )
    .unwrap();
    let mut a = args(&out, &["--reward-rule", "exact-answer"]);
    a.prompts = no_answer.clone();
    let e = format!("{:#}", run(&a).unwrap_err());
    assert!(
        e.contains(&format!("{}:2: field 'answer'", no_answer.display())),
        "{e}"
    );
    assert!(!out.exists(), "a refused run created its output directory");
}
