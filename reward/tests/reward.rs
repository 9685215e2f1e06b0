//! `reward train` / `reward eval` end to end on a tiny Llama: a learnable preference rule
//! reaches high held-out accuracy, the rewards are centred on the normalisation set, the
//! saved model scores as `AutoModelForSequenceClassification` does, and a killed run
//! resumes to the same weights.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::{Head, Model};
use rlhf_tests::{ok, read_jsonl, run_bin};
use serde_json::{json, Value};

struct Fixture {
    root: PathBuf,
    model: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

/// The rule: the more times "legs" appears, the better. Rankings of 3 and pairs mixed.
fn preference_rows(seed: u64, n: usize) -> String {
    let words = ["rabbits", "chickens", "heads", "cage"];
    let mut state = seed;
    let mut next = move |m: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % m
    };
    let mut out = String::new();
    for i in 0..n {
        let k = if i % 2 == 0 { 3 } else { 2 };
        let mut responses = vec![];
        for legs in (0..k).rev() {
            let mut r: Vec<&str> = (0..5).map(|_| words[next(words.len())]).collect();
            for _ in 0..legs {
                let at = next(r.len() + 1);
                r.insert(at, "legs");
            }
            responses.push(format!("{}.", r.join(" ")));
        }
        let row = if k == 2 {
            json!({"prompt": "Count: ", "chosen": responses[0], "rejected": responses[1]})
        } else {
            json!({"prompt": "Count: ", "responses": responses})
        };
        out.push_str(&format!("{row}\n"));
    }
    out
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("reward");
        rlhf_tests::tiny_llama_fixture(&root);
        let (train, eval) = (root.join("train.jsonl"), root.join("eval.jsonl"));
        std::fs::write(&train, preference_rows(1, 64)).unwrap();
        std::fs::write(&eval, preference_rows(2, 24)).unwrap();
        Fixture {
            model: root.join("model"),
            root,
            train,
            eval,
        }
    })
}

fn reward(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_bin(env!("CARGO_BIN_EXE_reward"), args, env)
}

fn train(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    reward(&train_args(out, extra), env)
}

fn train_args<'a>(out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let f = fixture();
    let mut args = vec![
        "train",
        "--model",
        f.model.to_str().unwrap(),
        "--data",
        f.train.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--lr",
        "2e-3",
        "--batch-size",
        "8",
        "--seed",
        "3",
        "--schedule",
        "constant",
    ];
    args.extend_from_slice(extra);
    args
}

/// Data parallel (issue 19): two torchrun ranks of 4 rankings train the weights (score
/// head included) and log the losses one process gets with 8, with the optimizer state
/// whole on each rank or sharded (`--zero-stage 1`, with the exchange overlapped with the
/// backward); rank 0 alone writes.
#[test]
fn two_ranks_train_what_one_process_trains_with_twice_the_batch() {
    let f = fixture();
    let (one, two) = (f.root.join("dp-one"), f.root.join("dp-two"));
    ok(&train(
        &one,
        &["--max-steps", "2", "--batch-size", "8"],
        &[],
    ));
    let options = [
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--dist-timeout",
        "120",
    ];
    let exe = env!("CARGO_BIN_EXE_reward");
    // ZeRO-1 with the exchange overlapped with the last of two micro-batches' backward.
    let zero1 = [&["--zero-stage", "1"], &rlhf_tests::OVERLAPPED[..]].concat();
    for (case, flags) in [&["--zero-stage", "0"][..], &zero1].into_iter().enumerate() {
        let two = two.with_extension(format!("case{case}"));
        let options = [&options[..], flags].concat();
        let out = rlhf_tests::torchrun(exe, 2, &train_args(&two, &options), &[]);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        if case == 1 {
            assert!(log.contains("--zero-stage 1: this rank holds"), "{log}");
            assert!(
                log.contains("--overlap-grad-reduce: the gradients go in"),
                "{log}"
            );
        }
        let keys = ["train/loss", "train/grad_norm", "train/accuracy"];
        rlhf_tests::assert_trains_like(&one, &two, Head::Score, (&keys, 1.0), 2);
    }
}

#[test]
fn learns_the_rule_normalises_and_matches_transformers() {
    let f = fixture();
    let out = f.root.join("run-learn");
    let summary = ok(&train(
        &out,
        &[
            "--max-steps",
            "150",
            "--eval-data",
            f.eval.to_str().unwrap(),
            "--eval-every",
            "50",
            "--bema",
            "--bema-update-freq",
            "25",
        ],
        &[],
    ));
    let final_dir = out.join("final");
    // `reward eval` of a model directory on a data file.
    let evaluate = |model: &Path, data: &Path| {
        let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
        ok(&reward(
            &["eval", "--model", model, "--data", data, "--device", "cpu"],
            &[],
        ))
    };
    // Held-out pairwise accuracy through `reward eval`.
    let eval = evaluate(&final_dir, &f.eval);
    let accuracy = eval["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.95, "held-out pairwise accuracy {accuracy}");
    assert_eq!(eval["pairs"], 12 * 3 + 12);
    let during = summary["eval_accuracy"].as_f64().unwrap();
    assert!(
        (during - accuracy).abs() < 1e-9,
        "train's eval {during} vs reward eval {accuracy}"
    );

    // Normalisation: the default set is the best response of each training ranking.
    let best: String = std::fs::read_to_string(&f.train)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let best = v.get("chosen").unwrap_or_else(|| &v["responses"][0]);
            format!("{}\n", json!({"prompt": v["prompt"], "completion": best}))
        })
        .collect();
    let best_path = f.root.join("best.jsonl");
    std::fs::write(&best_path, best).unwrap();
    let scored = evaluate(&final_dir, &best_path);
    let mean = scored["mean_reward"].as_f64().unwrap();
    assert!(
        mean.abs() < 1e-4,
        "normalised mean over the normalisation set is {mean}"
    );
    assert!(
        summary["reward_bias"].as_f64().unwrap().abs() > 1e-3,
        "no bias stored"
    );
    // `--bema`: the averaged reward model is centred on the same set by itself.
    let bema_dir = out.join("bema");
    let scored = evaluate(&bema_dir, &best_path);
    let mean = scored["mean_reward"].as_f64().unwrap();
    assert!(mean.abs() < 1e-4, "bema/'s mean over the set is {mean}");
    let bias = |d: &Path| -> Value {
        let text = std::fs::read_to_string(d.join("config.json")).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["rlhf_reward_bias"].clone()
    };
    assert_ne!(
        bias(&final_dir),
        bias(&bema_dir),
        "bema/ took final/'s bias"
    );

    // Raw scores against AutoModelForSequenceClassification on the saved model, right padding.
    let (model, _) = Model::load(&final_dir, &common::ModelOptions::cpu(Head::Score)).unwrap();
    let tok = data::Tokenizer::load(&final_dir).unwrap();
    let rows: Vec<Vec<i64>> = [
        "Count: rabbits legs cage.",
        "Count: heads",
        "Count: legs legs legs rabbits chickens.",
    ]
    .iter()
    .map(|t| tok.encode(t, true).unwrap())
    .collect();
    let theirs = rlhf_tests::check_run(&f.root, &final_dir, &rows, &["--score"]);
    assert_eq!(theirs["pad_token_id"], json!(tok.pad_id));
    let ours = reward::score_sequences(&model, &rows, 8, tok.pad_id);
    let theirs: Vec<f64> = serde_json::from_value(theirs["scores"].clone()).unwrap();
    for (a, b) in ours.iter().zip(&theirs) {
        assert!(
            (a - b).abs() < 1e-4,
            "ours {ours:?} vs transformers {theirs:?}"
        );
    }
}

#[test]
fn killed_run_resumes_to_the_same_weights() {
    let f = fixture();
    let straight = f.root.join("run-straight");
    let args = ["--max-steps", "4", "--save-every", "2"];
    ok(&train(&straight, &args, &[]));
    let load = |d: &Path| {
        Model::load(&d.join("final"), &common::ModelOptions::cpu(Head::Score))
            .unwrap()
            .0
            .named_tensors()
    };
    let a = load(&straight);
    for point in [
        "checkpoint-mid-write@2",
        "mid-step@3",
        "checkpoint-after-rename@1",
    ] {
        let out = f
            .root
            .join(format!("run-killed-{}", point.replace('@', "-")));
        let killed = train(&out, &args, &[("RLHF_CRASH_AT", point)]);
        assert!(!killed.status.success(), "{point} not reached");
        let mut resumed = args.to_vec();
        resumed.push("--resume");
        ok(&train(&out, &resumed, &[]));
        let b = load(&out);
        for (name, t) in &a {
            let diff = (t - &b[name]).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{point}: {name} differs by {diff:e}");
        }
        // TRL's running token count goes on from the checkpoint.
        let last = |d: &Path| read_jsonl(&d.join("metrics.jsonl")).pop().unwrap();
        assert_eq!(
            last(&straight)["num_tokens"],
            last(&out)["num_tokens"],
            "{point}"
        );
    }
    // TRL's min_reward and max_reward (here train/reward_min and /reward_max) hold the
    // step's mean between them.
    for r in read_jsonl(&straight.join("metrics.jsonl")) {
        let get = |k: &str| r[k].as_f64().unwrap();
        assert!(get("train/reward_min") < get("train/reward_mean"), "{r}");
        assert!(get("train/reward_mean") < get("train/reward_max"), "{r}");
    }
    let out = f.root.join("run-killed-mid-step-3");
    let cfg = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("final/config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        cfg(&straight)["rlhf_reward_bias"],
        cfg(&out)["rlhf_reward_bias"]
    );
    assert_eq!(
        cfg(&out)["architectures"],
        json!(["LlamaForSequenceClassification"])
    );
}

/// Bad data and options: exit ≠ 0, one line naming the file/line/field or option, no
/// panic, nothing written.
/// `--center-rewards-coefficient` (TRL's): the ranking loss leaves the rewards' mean free,
/// and on this data it drifts to about −1.5; with the centring term it stays near 0, and
/// the rankings are learned as well.
#[test]
fn centring_keeps_the_rewards_near_zero() {
    let f = fixture();
    let last_steps = |out: &Path| -> (f64, f64) {
        let m = read_jsonl(&out.join("metrics.jsonl"));
        let tail = &m[m.len() - 10..];
        let mean_abs = tail
            .iter()
            .map(|r| r["train/reward_mean"].as_f64().unwrap().abs())
            .sum::<f64>()
            / 10.0;
        (mean_abs, tail[9]["train/accuracy"].as_f64().unwrap())
    };
    let (free, centred) = (f.root.join("uncentred"), f.root.join("centred"));
    ok(&train(&free, &["--max-steps", "30"], &[]));
    ok(&train(
        &centred,
        &["--max-steps", "30", "--center-rewards-coefficient", "0.1"],
        &[],
    ));
    let ((free_mean, _), (centred_mean, accuracy)) = (last_steps(&free), last_steps(&centred));
    assert!(
        centred_mean < 0.5 * free_mean,
        "|mean reward| over the last 10 steps: {centred_mean:.3} centred vs {free_mean:.3}"
    );
    assert!(accuracy >= 0.9, "centred accuracy {accuracy}");
}

#[test]
fn bad_inputs_are_refused_with_one_line() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let one = write(
        "one.jsonl",
        "{\"prompt\": \"p\", \"responses\": [\"only\"]}\n",
    );
    let json = write(
        "json.jsonl",
        "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{oops\n",
    );
    let empty_resp = write(
        "empty.jsonl",
        "{\"prompt\": \"p\", \"chosen\": \"\", \"rejected\": \"b\"}\n",
    );
    let missing = dir.path().join("missing.jsonl");
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--data".into(), one.display().to_string()],
            format!(
                "{}:1: field 'responses': a ranking needs at least 2 responses, got 1",
                one.display()
            ),
        ),
        (
            vec!["--data".into(), json.display().to_string()],
            format!("{}:2: invalid JSON", json.display()),
        ),
        (
            vec!["--data".into(), empty_resp.display().to_string()],
            format!("{}:1: field 'chosen': is empty", empty_resp.display()),
        ),
        (
            vec!["--data".into(), missing.display().to_string()],
            format!("{}: cannot open", missing.display()),
        ),
        (
            vec![
                "--data".into(),
                f.train.display().to_string(),
                "--lr=-1".into(),
            ],
            "--lr must be > 0".into(),
        ),
        (
            vec![
                "--data".into(),
                f.train.display().to_string(),
                "--grad-accum".into(),
                "0".into(),
            ],
            "--grad-accum must be at least 1".into(),
        ),
        (
            vec![
                "--data".into(),
                f.train.display().to_string(),
                "--center-rewards-coefficient=-0.1".into(),
            ],
            "--center-rewards-coefficient must be ≥ 0".into(),
        ),
    ];
    for (args, expected) in cases {
        let out = dir.path().join("out");
        let mut argv = vec![
            "train".to_string(),
            "--model".into(),
            f.model.display().to_string(),
            "--output-dir".into(),
            out.display().to_string(),
            "--device".into(),
            "cpu".into(),
        ];
        argv.extend(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let res = reward(&argv, &[]);
        let err = String::from_utf8_lossy(&res.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            !res.status.success() && last.contains(&expected),
            "expected '{expected}': {err}"
        );
        assert!(!err.contains("panicked"));
        assert!(!out.exists());
    }
}

/// TRL's `disable_dropout` (true in RewardConfig): LoRA's dropout is off in training unless
/// `--disable-dropout false`.
#[test]
fn lora_dropout_is_disabled_as_trl_disables_it() {
    let f = fixture();
    let run = |name: &str, extra: &[&str]| {
        let out = f.root.join(name);
        let args = [
            &["--max-steps", "2", "--lora-r", "4", "--lr", "1e-2"][..],
            extra,
        ]
        .concat();
        ok(&train(&out, &args, &[]));
        out.join("final")
    };
    rlhf_tests::check_dropout_default(run, Head::Score, true);
}
