//! PPO end to end on a tiny Llama: a rule reward rises with KL bounded, the first-minibatch
//! ratio is 1, a killed run resumes to the same policy and KL coefficient, PPO-ptx moves
//! the policy, and the CLI runs against a reward model (and refuses a foreign tokenizer).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{Head, Model};
use ppo::reward_fn::TextRule;
use ppo::train::{run_with_reward, TrainArgs};
use rlhf_tests::{digit_share, read_jsonl};
use serde_json::Value;

struct Fixture {
    root: PathBuf,
    policy: PathBuf,
    reward: PathBuf,
    prompts: PathBuf,
    ptx: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ppo");
        let policy = root.join("model");
        let (reward, prompts, ptx) = (root.join("reward"), root.join("prompts-ppo.jsonl"), root.join("ptx.jsonl"));
        if std::env::var_os("PPO_CHILD_OUT").is_some() {
            // The child process of the kill test uses its parent's fixture as it is.
            return Fixture { root, policy, reward, prompts, ptx };
        }
        rlhf_tests::tiny_llama_fixture(&root);
        // A reward model: the policy's backbone with a fresh score head and a stored bias.
        tch::manual_seed(5);
        let (mut rm, _) = Model::load(&policy, &common::ModelOptions::cpu(Head::Score)).unwrap();
        common::scoring::Normalization { bias: 0.5, std: Some(1.0) }.store(&mut rm);
        rm.save(&reward, Some(&policy)).unwrap();
        let lines: String = (0..32)
            .map(|i| format!("{}\n", serde_json::json!({"prompt": format!("There are {} heads", i + 3)})))
            .collect();
        std::fs::write(&prompts, lines).unwrap();
        std::fs::write(&ptx, "{\"prompt\": \"There are 3 heads and 10 legs. \", \"completion\": \"2 rabbits.\"}\n{\"text\": \"Rabbits have four legs.\"}\n").unwrap();
        Fixture { root, policy, reward, prompts, ptx }
    })
}

fn args(out: &Path, extra: &[&str]) -> TrainArgs {
    let f = fixture();
    let mut argv = vec![
        "--policy".to_string(),
        f.policy.display().to_string(),
        "--reward-model".into(),
        f.reward.display().to_string(),
        "--prompts".into(),
        f.prompts.display().to_string(),
        "--output-dir".into(),
        out.display().to_string(),
        "--device".into(),
        "cpu".into(),
        "--rollout-batch-size".into(),
        "16".into(),
        "--response-length".into(),
        "12".into(),
        "--ppo-epochs".into(),
        "2".into(),
        "--num-minibatches".into(),
        "2".into(),
        "--lr".into(),
        "1e-3".into(),
        "--schedule".into(),
        "constant".into(),
        "--seed".into(),
        "11".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    rlhf_tests::parse_args(&argv)
}

fn metrics(out: &Path) -> Vec<Value> {
    read_jsonl(&out.join("metrics.jsonl"))
}

fn weights_diff(a: &Path, b: &Path) -> f64 {
    rlhf_tests::max_weight_diff(a, b, Head::Lm)
}

#[test]
fn the_score_rises_with_kl_bounded_and_the_first_ratio_is_one() {
    let f = fixture();
    let out = f.root.join("run-learn");
    let rule = TextRule(|t: &str| 4.0 * digit_share(t));
    let summary = run_with_reward(
        &args(&out, &["--max-steps", "30", "--kl-coef", "0.1"]),
        &rule,
    )
    .unwrap();
    let m = metrics(&out);
    assert_eq!(m.len(), 30);
    let score = |r: &Value| r["objective/scores"].as_f64().unwrap();
    let first: f64 = m[..3].iter().map(score).sum::<f64>() / 3.0;
    let last: f64 = m[27..].iter().map(score).sum::<f64>() / 3.0;
    assert!(
        last > first + 0.25,
        "mean score {first:.3} → {last:.3}: expected a rise of 0.25"
    );
    for r in &m {
        let kl = r["objective/kl"].as_f64().unwrap();
        assert!(kl < 10.0, "step {}: KL {kl} not bounded", r["step"]);
        let dev = r["policy/first_ratio_max_dev"].as_f64().unwrap();
        assert!(
            dev < 1e-5,
            "step {}: first-minibatch ratio deviates by {dev:e}",
            r["step"]
        );
        assert!(r["policy/rollout_logprob_diff"].as_f64().unwrap() < 1e-4);
    }
    assert!(summary.last_score > summary.first_score);
    for dir in ["final", "final_value"] {
        assert!(out.join(dir).join("model.safetensors").exists(), "{dir}");
    }
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    assert!(samples.lines().count() >= 4);
}

/// The run `killed_run_resumes…` kills and resumes: an adaptive KL coefficient, an EMA
/// and a BEMA of the policy (updated at its optimiser steps 3, 6, …, 15).
const RESUMED: [&str; 13] = [
    "--max-steps",
    "4",
    "--save-every",
    "2",
    "--kl-target",
    "0.5",
    "--kl-horizon",
    "100",
    "--ema-decay",
    "0.9",
    "--bema",
    "--bema-update-freq",
    "3",
];

#[test]
fn killed_run_resumes_to_the_same_policy_and_kl_coefficient() {
    let f = fixture();
    let extra = RESUMED;
    let straight = f.root.join("run-straight");
    let a = run_with_reward(&args(&straight, &extra), &TextRule(digit_share)).unwrap();
    // Killed by SIGKILL while writing the second checkpoint, in the middle of the second
    // iteration's first minibatch (mid-step is hit at each training unit's step: the
    // policy's and the critic's, so 8 per iteration of 4 minibatches here), and right after
    // the first checkpoint became complete. The rule reward needs the library, so the
    // killed run is this test binary's `child_killed_ppo_run` in a child process.
    let mut killed = f.root.join("run-killed");
    for point in [
        "checkpoint-mid-write@2",
        "mid-step@9",
        "checkpoint-after-rename@1",
    ] {
        killed = f
            .root
            .join(format!("run-killed-{}", point.replace('@', "-")));
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_killed_ppo_run",
                "--nocapture",
                "--include-ignored",
            ])
            .env("PPO_CHILD_OUT", &killed)
            .env("RLHF_CRASH_AT", point)
            .status()
            .unwrap();
        assert!(!status.success(), "{point}: the child was not killed");
        assert!(!killed.join("final").exists());
        let mut resumed_extra = extra.to_vec();
        resumed_extra.push("--resume");
        let b = run_with_reward(&args(&killed, &resumed_extra), &TextRule(digit_share)).unwrap();
        assert_eq!(a.kl_coef, b.kl_coef, "{point}");
        for dir in ["final", "final_ema", "bema"] {
            let diff = weights_diff(&straight.join(dir), &killed.join(dir));
            assert!(
                diff < 1e-6,
                "{point}: {dir}: resumed weights differ by {diff:e}"
            );
        }
    }
    assert!(a.kl_coef != 0.05, "the adaptive controller never moved");
    let steps: Vec<u64> = metrics(&killed)
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

/// The process that `killed_run_resumes…` starts and kills (ignored on its own).
#[test]
#[ignore]
fn child_killed_ppo_run() {
    let Some(out) = std::env::var_os("PPO_CHILD_OUT") else {
        return;
    };
    run_with_reward(&args(Path::new(&out), &RESUMED), &TextRule(digit_share)).unwrap();
}

#[test]
fn ptx_loss_is_logged_and_moves_the_policy() {
    let f = fixture();
    let (plain, ptx) = (f.root.join("run-noptx"), f.root.join("run-ptx"));
    run_with_reward(&args(&plain, &["--max-steps", "2"]), &TextRule(digit_share)).unwrap();
    let ptx_args = [
        "--max-steps",
        "2",
        "--ptx-data",
        f.ptx.to_str().unwrap(),
        "--ptx-coef",
        "1.0",
    ];
    run_with_reward(&args(&ptx, &ptx_args), &TextRule(digit_share)).unwrap();
    let m = metrics(&ptx);
    assert!(
        m.iter().all(|r| r["loss/ptx_avg"].as_f64().unwrap() > 0.1),
        "ptx loss not logged"
    );
    assert!(metrics(&plain)
        .iter()
        .all(|r| r["loss/ptx_avg"].as_f64().unwrap() == 0.0));
    let diff = weights_diff(&plain.join("final"), &ptx.join("final"));
    assert!(
        diff > 1e-4,
        "the ptx gradient did not reach the policy (Δ {diff:e})"
    );
}

#[test]
fn cli_trains_against_a_reward_model_and_refuses_a_foreign_tokenizer() {
    let f = fixture();
    let ppo = |out: &Path, reward: &Path| {
        Command::new(env!("CARGO_BIN_EXE_ppo"))
            .args([
                "train",
                "--policy",
                f.policy.to_str().unwrap(),
                "--reward-model",
                reward.to_str().unwrap(),
                "--prompts",
                f.prompts.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
                "--device",
                "cpu",
                "--max-steps",
                "1",
                "--rollout-batch-size",
                "4",
                "--response-length",
                "6",
            ])
            .output()
            .unwrap()
    };
    let out = f.root.join("run-cli");
    let res = ppo(&out, &f.reward);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let summary: Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(summary["steps"], 1);
    assert!(out.join("tb").exists() && out.join("config.toml").exists());

    // A reward model whose tokenizer maps tokens differently cannot start GAE's value model
    // (critic-free estimators score with it: ppo/tests/reward_tokenizer.rs).
    let foreign = f.root.join("reward-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    for entry in std::fs::read_dir(&f.reward).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, foreign.join(p.file_name().unwrap())).unwrap();
    }
    let mut tok: Value =
        serde_json::from_str(&std::fs::read_to_string(foreign.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab["a"].clone(), vocab["b"].clone());
    vocab.insert("a".into(), b);
    vocab.insert("b".into(), a);
    std::fs::write(foreign.join("tokenizer.json"), tok.to_string()).unwrap();
    let out = f.root.join("run-foreign");
    let res = ppo(&out, &foreign);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("a tokenizer other than the policy's"),
        "{err}"
    );
    assert!(!out.exists(), "a refused run created its output directory");
}

/// Nonsensical PPO hyperparameters and missing inputs: one line, no panic, nothing written.
#[test]
fn bad_ppo_options_are_refused_with_one_line() {
    let f = fixture();
    let out = f.root.join("run-bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--cliprange", "0"], "--cliprange must be > 0"),
        (&["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (&["--lam=-0.1"], "--lam must be in [0, 1]"),
        (
            &["--rollout-batch-size", "0"],
            "--rollout-batch-size must be at least 1",
        ),
        (&["--temperature", "0"], "--temperature must be > 0"),
        (
            &["--num-minibatches", "3"],
            "--rollout-batch-size must be a multiple of --num-minibatches",
        ),
        (&["--ptx-coef", "0.5"], "--ptx-coef needs --ptx-data"),
        (
            &["--prompts", "/nonexistent/prompts.jsonl"],
            "/nonexistent/prompts.jsonl: cannot open",
        ),
    ];
    for (extra, expected) in cases {
        let mut argv = vec![
            "train",
            "--policy",
            f.policy.to_str().unwrap(),
            "--reward-model",
            f.reward.to_str().unwrap(),
            "--prompts",
            f.prompts.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--rollout-batch-size",
            "4",
        ];
        argv.extend_from_slice(extra);
        let res = Command::new(env!("CARGO_BIN_EXE_ppo"))
            .args(&argv)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&res.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            !res.status.success() && last.contains(expected),
            "expected '{expected}': {err}"
        );
        assert!(!err.contains("panicked"));
        assert!(!out.exists());
    }
}

/// Data parallel (issue 19): two torchrun ranks of 8 prompts each sample (each row with the
/// random numbers it has in the whole batch), score, whiten and train on their rows of the
/// same global minibatches, so they end with the policy and critic one process trains on
/// 16 prompts, with the same logged statistics — also with the optimizer state sharded
/// (`--zero-stage 1`) and the gradient exchange overlapped with the backward.
#[test]
fn two_ranks_train_what_one_process_trains() {
    let f = fixture();
    let s = |p: &Path| p.display().to_string();
    let argv = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--policy",
            &s(&f.policy),
            "--reward-model",
            &s(&f.reward),
            "--prompts",
            &s(&f.prompts),
            "--output-dir",
            &s(out),
            "--device",
            "cpu",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        v.extend(
            [
                "--response-length",
                "12",
                "--ppo-epochs",
                "2",
                "--num-minibatches",
                "2",
                "--lr",
                "3e-4",
                "--schedule",
                "constant",
                "--seed",
                "11",
                "--max-steps",
                "2",
                "--dist-timeout",
                "120",
            ]
            .iter()
            .chain(extra)
            .map(|x| x.to_string()),
        );
        v
    };
    let exe = env!("CARGO_BIN_EXE_ppo");
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    // GAE with the critic over 16 prompts, with the optimizer state whole on each rank
    // and sharded (ZeRO-1); GRPO over 8 prompts × 2 responses (each group on one rank).
    let gae: &[&str] = &["--rollout-batch-size", "16"];
    let grpo: &[&str] = &[
        "--rollout-batch-size",
        "8",
        "--advantage-estimator",
        "grpo",
        "--num-generations",
        "2",
    ];
    // The exchange overlapped with the last backward (buckets of 10 kB): GAE over two
    // micro-batches per minibatch (the policy's and the critic's last backward), GRPO with
    // PPO-ptx (whose backward is the policy's last), and GRPO in minibatches of 2 of the
    // 16 rows, so that a rank often has none of a minibatch's rows (it exchanges where the
    // other rank's last backward does).
    let overlap = ["--overlap-grad-reduce", "--bucket-cap-mb", "0.01"];
    let ptx = f.ptx.display().to_string();
    let grpo_ptx = [grpo, &["--ptx-data", &ptx, "--ptx-coef", "0.5"]].concat();
    // (With --top-entropy-quantile, whose threshold gathers every rank's entropies, also
    // from a rank without rows; and a reward program logging metrics whose names differ
    // from rank to rank, which the ranks agree on before pooling their values.)
    let logging = format!(
        "'{}' '{}' by-prompt",
        rlhf_tests::python().display(),
        rlhf_tests::repo_root()
            .join("tests/python/logging_reward.py")
            .display()
    );
    let grpo_small = [
        grpo,
        &["--num-minibatches", "8", "--ppo-epochs", "1"],
        &["--top-entropy-quantile", "0.5"],
        &["--reward-command", &logging],
    ]
    .concat();
    // Online DPO's pairs, shuffled a pair at a time, each on the rank that sampled it.
    let online_dpo: &[&str] = &[
        "--rollout-batch-size",
        "8",
        "--advantage-estimator",
        "online-dpo",
        "--num-generations",
        "2",
    ];
    // A*-PO, whose first stage samples every prompt's responses a share per rank.
    let a2po: &[&str] = &[
        "--rollout-batch-size",
        "8",
        "--advantage-estimator",
        "a2po",
        "--num-value-samples",
        "2",
    ];
    // SDPO, whose groups find their demonstrations on the rank that sampled them, with
    // its EMA teacher moved on each rank alike.
    let sdpo: &[&str] = &[
        "--rollout-batch-size",
        "8",
        "--advantage-estimator",
        "sdpo",
        "--num-generations",
        "2",
        "--success-reward-threshold",
        "0",
        "--distillation-weight",
        "0.5",
    ];
    let cases: [(&str, &[&str], Vec<&str>); 7] = [
        ("gae", gae, vec!["--zero-stage", "0"]),
        ("online-dpo", online_dpo, vec!["--zero-stage", "0"]),
        ("a2po", a2po, vec!["--zero-stage", "0"]),
        ("sdpo", sdpo, vec!["--zero-stage", "0"]),
        (
            "gae",
            gae,
            [&["--zero-stage", "1", "--grad-accum", "2"], &overlap[..]].concat(),
        ),
        (
            "grpo",
            &grpo_ptx,
            [&["--zero-stage", "1"], &overlap[..]].concat(),
        ),
        ("grpo-small", &grpo_small, overlap.to_vec()),
    ];
    let mut single_runs = std::collections::HashSet::new();
    for (case, (label, extra, flags)) in cases.into_iter().enumerate() {
        let name = format!("{label} {}", flags.join(" "));
        let one = f.root.join(format!("dp-one-{label}"));
        let two = f.root.join(format!("dp-two-{label}-{case}"));
        if single_runs.insert(label) {
            rlhf_tests::ok(&rlhf_tests::run_bin(exe, &refs(&argv(&one, extra)), &[]));
        }
        let two_ranks = [extra, &flags[..]].concat();
        let out = rlhf_tests::torchrun(exe, 2, &refs(&argv(&two, &two_ranks)), &[]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (dir, head) in [("final", Head::Lm), ("final_value", Head::Score)] {
            if !one.join(dir).exists() {
                assert!(!two.join(dir).exists(), "{name}: {dir} on two ranks only");
                continue;
            }
            let diff = rlhf_tests::max_weight_diff(&one.join(dir), &two.join(dir), head);
            assert!(diff < 1e-5, "{name} {dir}: two ranks differ by {diff:e}");
        }
        if label == "a2po" {
            let v_star = |dir: &Path| -> Vec<f64> {
                let text = std::fs::read_to_string(dir.join("optimal_values.json")).unwrap();
                let v: Value = serde_json::from_str(&text).unwrap();
                v["v_star"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            let (x, y) = (v_star(&one), v_star(&two));
            assert!(
                !x.is_empty() && x.len() == y.len(),
                "{name}: {x:?} vs {y:?}"
            );
            assert!(
                x.iter().zip(&y).all(|(x, y)| (x - y).abs() < 1e-4),
                "{name}: optimal values {x:?} vs {y:?}"
            );
        }
        let (a, b) = (metrics(&one), metrics(&two));
        assert_eq!(b.len(), 2, "{name}: each iteration once");
        for (x, y) in a.iter().zip(&b) {
            let keys = x.as_object().unwrap().keys();
            if label == "grpo-small" {
                // Each rank's prompts are its own: so are the names.
                let by_prompt = keys.clone().filter(|k| k.starts_with("prompt/"));
                assert_eq!(by_prompt.count(), 8, "{x}");
                assert!(x.get("chars").is_some(), "{x}");
                assert_eq!(
                    keys.len(),
                    y.as_object().unwrap().len(),
                    "{name}: {x} vs {y}"
                );
            }
            for key in keys.filter(|k| !k.starts_with("time/") && !k.contains("per_second")) {
                // Rank-local by nature: the largest deviations seen on each rank.
                if key.starts_with("policy/first_ratio") || key.ends_with("logprob_diff") {
                    continue;
                }
                // Held-out rewards come from greedy decoding, which a weight difference of
                // 1e-6 can flip where two tokens nearly tie; after 8 updates an iteration
                // with GRPO (one held-out response, 0.1175 vs 0.1150, with and without the
                // overlap alike). The other cases check them.
                if label == "grpo-small" && key.starts_with("val/") {
                    continue;
                }
                let (x, y) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
                // A clip fraction counts tokens past a threshold: a value within the
                // summation-order noise (1e-7) of it may fall either side, so one token may
                // differ: 1/96 of one of GAE's 4 minibatches, 1/24 of one of GRPO's 16,
                // both 1/384 of the average.
                let tolerance = match key.contains("clipfrac") || key.starts_with("clip_ratio/") {
                    true => 1.0 / 384.0 + 1e-9,
                    false => 1e-4 * x.abs().max(1.0),
                };
                assert!(
                    (x - y).abs() <= tolerance || (x.is_nan() && y.is_nan()),
                    "{name} {key}: {x} vs {y}"
                );
            }
        }
    }
}
