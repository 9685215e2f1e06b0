//! `sft train` end to end on a tiny Llama: the loss falls, accumulation equals a big batch,
//! a killed run resumes to the same weights, the outputs load in `transformers` and
//! TensorBoard, and bad configurations are refused before anything is written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{Head, Model};
use rlhf_tests::{cage_rows, ok, read_jsonl, run_bin};
use serde_json::{json, Value};
use tch::Tensor;

struct Fixture {
    root: PathBuf,
    model: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sft-train");
        rlhf_tests::tiny_llama_fixture(&root);
        let train = root.join("train.jsonl");
        let eval = root.join("eval.jsonl");
        std::fs::write(&train, cage_rows(0..24)).unwrap();
        std::fs::write(&eval, cage_rows(100..108)).unwrap();
        Fixture {
            model: root.join("model"),
            root,
            train,
            eval,
        }
    })
}

/// `sft train` on the fixture, writing to `out`, with `extra` options.
fn sft(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_bin(env!("CARGO_BIN_EXE_sft"), args, env)
}

fn metrics(out: &Path) -> Vec<Value> {
    read_jsonl(&out.join("metrics.jsonl"))
}

fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    rlhf_tests::max_weight_diff(a, b, Head::Lm)
}

fn train(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    sft(&train_args(out, extra), env)
}

/// `sft train`'s arguments on the fixture, writing to `out`, with `extra` options.
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
        "3e-3",
        "--batch-size",
        "8",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn loss_falls_and_outputs_load_in_transformers_and_tensorboard() {
    let f = fixture();
    let out = f.root.join("run-learn");
    let before = ok(&sft(
        &[
            "eval",
            "--model",
            f.model.to_str().unwrap(),
            "--data",
            f.eval.to_str().unwrap(),
            "--device",
            "cpu",
        ],
        &[],
    ));
    let summary = ok(&train(
        &out,
        &[
            "--max-steps",
            "40",
            "--eval-data",
            f.eval.to_str().unwrap(),
            "--eval-every",
            "20",
            "--warmup-steps",
            "4",
        ],
        &[],
    ));
    let m = metrics(&out);
    assert_eq!(m.len(), 40);
    let first = m[0]["train/loss"].as_f64().unwrap();
    let last = m[39]["train/loss"].as_f64().unwrap();
    assert!(
        last < first / 4.0,
        "train loss {first} → {last}: expected a 4× drop"
    );
    let eval_before = before["loss"].as_f64().unwrap();
    let eval_after = summary["eval_loss"].as_f64().unwrap();
    assert!(
        eval_after < eval_before / 2.0,
        "eval loss {eval_before} → {eval_after}: expected a 2× drop"
    );
    assert!(m[19]["eval/loss"].as_f64().is_some());
    assert!(m[0]["train/lr"].as_f64().unwrap() == 0.0 && m[4]["train/lr"].as_f64().unwrap() > 0.0);

    // The final directory: our logits vs transformers', and TensorBoard's view of the run.
    let final_dir = out.join("final");
    let model = Model::load(&final_dir, &common::ModelOptions::cpu(Head::Lm))
        .unwrap()
        .0;
    let tok = data::Tokenizer::load(&final_dir).unwrap();
    let rows: Vec<Vec<i64>> = [
        "There are 9 heads and 28 legs. 5 rabbits",
        "Chickens have two legs",
    ]
    .iter()
    .map(|t| tok.encode(t, true).unwrap())
    .collect();
    let tb_dir = out.join("tb");
    let theirs = rlhf_tests::check_run(
        &f.root,
        &final_dir,
        &rows,
        &["--tb", tb_dir.to_str().unwrap()],
    );
    for (i, row) in rows.iter().enumerate() {
        let ids = Tensor::from_slice(row).unsqueeze(0);
        let logits = model.forward(&ids, &Tensor::ones_like(&ids));
        let t = row.len() as i64;
        let ours = common::ops::logprobs_of(&logits.narrow(1, 0, t - 1), &ids.narrow(1, 1, t - 1))
            .squeeze_dim(0);
        let reference: Vec<f32> = serde_json::from_value(theirs["logprobs"][i].clone()).unwrap();
        let diff = (ours - Tensor::from_slice(&reference))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            diff < 1e-4,
            "row {i}: final/ in transformers differs by {diff:e}"
        );
    }
    let tb = &theirs["tb"];
    let steps: Vec<u64> = (1..=40).collect();
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_second",
    ] {
        assert_eq!(tb[tag], json!(steps), "{tag}");
    }
    assert_eq!(tb["eval/loss"], json!([20, 40]));
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains("lr = 0.003") && config.contains("max_steps = 40"),
        "{config}"
    );
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let f = fixture();
    let (big, split) = (f.root.join("run-big"), f.root.join("run-split"));
    ok(&train(
        &big,
        &["--max-steps", "3", "--batch-size", "8"],
        &[],
    ));
    ok(&train(
        &split,
        &["--max-steps", "3", "--batch-size", "2", "--grad-accum", "4"],
        &[],
    ));
    let diff = max_weight_diff(&big.join("final"), &split.join("final"));
    assert!(
        diff < 1e-5,
        "4 × 2 accumulated vs batch 8: weights differ by {diff:e}"
    );
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_result() {
    let f = fixture();
    let straight = f.root.join("run-straight");
    let common_args = [
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--weight-decay",
        "0.1",
    ];
    ok(&train(&straight, &common_args, &[]));
    // Killed (SIGKILL) while writing the second checkpoint, after writing it but before the
    // rename that makes it complete, in the middle of step 3 (after its backward pass),
    // and right after the first checkpoint became complete.
    for point in [
        "checkpoint-mid-write@2",
        "checkpoint-before-rename@2",
        "mid-step@3",
        "checkpoint-after-rename@1",
    ] {
        let out = f
            .root
            .join(format!("run-killed-{}", point.replace('@', "-")));
        let killed = train(&out, &common_args, &[("RLHF_CRASH_AT", point)]);
        assert!(
            !killed.status.success(),
            "{point}: the crash point was not reached"
        );
        assert!(out
            .join("checkpoints/step-000002/trainer_state.json")
            .exists());
        assert!(
            !out.join("checkpoints/step-000004").exists(),
            "{point}: a half checkpoint was left complete"
        );
        assert!(!out.join("final").exists());
        let mut args = common_args.to_vec();
        args.push("--resume");
        ok(&train(&out, &args, &[]));
        let diff = max_weight_diff(&straight.join("final"), &out.join("final"));
        assert!(diff < 1e-6, "{point}: resumed weights differ by {diff:e}");
        let (a, b) = (metrics(&straight), metrics(&out));
        let steps: Vec<u64> = b.iter().map(|r| r["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "{point}: metrics steps");
        for (x, y) in a.iter().zip(&b) {
            // TRL's running token count too.
            for key in ["train/loss", "num_tokens"] {
                assert_eq!(x[key], y[key], "{point}: step {} {key}", x["step"]);
            }
        }
        assert!(
            !out.join("checkpoints/.step-000004.tmp").exists(),
            "leftover not cleaned"
        );
    }
}

#[test]
fn bad_configurations_are_refused_before_writing() {
    let f = fixture();
    let out = f.root.join("run-refused");
    let toml = f.root.join("bad.toml");
    std::fs::write(&toml, "lr = 1e-4\nlearning_rate = 3\n").unwrap();
    let res = train(&out, &["--config", toml.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("unknown key 'learning_rate'"),
        "{err}"
    );
    std::fs::write(&toml, "batch_size = 'eight'\n").unwrap();
    let res = train(&out, &["--config", toml.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("key 'batch_size': invalid value 'eight'"),
        "{err}"
    );
    for (flag, value, message) in [
        ("--lr", "0", "--lr must be > 0"),
        ("--batch-size", "0", "--batch-size must be at least 1"),
    ] {
        let res = train(&out, &[flag, value], &[]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && err.contains(message), "{err}");
    }
    assert!(!out.exists(), "a refused run created its output directory");

    // A finished run is not overwritten without --overwrite.
    let done = f.root.join("run-done");
    ok(&train(&done, &["--max-steps", "1"], &[]));
    let before = std::fs::read(done.join("final/model.safetensors")).unwrap();
    let res = train(&done, &["--max-steps", "1"], &[]);
    assert!(String::from_utf8_lossy(&res.stderr).contains("holds a finished run; pass --overwrite"));
    assert_eq!(
        std::fs::read(done.join("final/model.safetensors")).unwrap(),
        before
    );
    ok(&train(&done, &["--max-steps", "2", "--overwrite"], &[]));
    assert_eq!(metrics(&done).len(), 2);
}

#[test]
fn sigterm_checkpoints_and_exits_cleanly_then_resume_finishes_the_run() {
    let f = fixture();
    let args = [
        "--max-steps",
        "150",
        "--batch-size",
        "2",
        "--schedule",
        "constant",
    ];
    let straight = f.root.join("run-signal-straight");
    ok(&train(&straight, &args, &[]));
    let out = f.root.join("run-signal");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sft"));
    let fx = fixture();
    cmd.args([
        "train",
        "--model",
        fx.model.to_str().unwrap(),
        "--data",
        fx.train.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--lr",
        "3e-3",
        "--seed",
        "7",
    ])
    .args(args)
    .env_remove("RLHF_CRASH_AT")
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Wait for a few steps to be logged (however slow the machine: a signal before the
    // handler is installed would kill it), then ask it to stop.
    let metrics_path = out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics_path).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 120, "no 3 steps logged");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success(),
        "SIGTERM should end the run cleanly: {err}"
    );
    assert!(err.contains("--resume"), "no resume hint: {err}");
    let summary: Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(summary["stopped"], true);
    let stopped_at = summary["steps"].as_u64().unwrap();
    assert!(
        stopped_at < 150,
        "the run finished before the signal arrived"
    );
    assert!(out
        .join(format!(
            "checkpoints/step-{stopped_at:06}/trainer_state.json"
        ))
        .exists());
    assert!(!out.join("final").exists());
    let mut resumed = args.to_vec();
    resumed.push("--resume");
    ok(&train(&out, &resumed, &[]));
    let diff = max_weight_diff(&straight.join("final"), &out.join("final"));
    assert!(
        diff < 1e-6,
        "resumed after SIGTERM: weights differ by {diff:e}"
    );
    assert_eq!(metrics(&out).len(), 150);
}

#[test]
fn consecutive_non_finite_steps_stop_the_run_and_keep_the_last_checkpoint() {
    let f = fixture();
    let out = f.root.join("run-nan");
    let res = train(
        &out,
        &[
            "--max-steps",
            "10",
            "--save-every",
            "2",
            "--max-bad-steps",
            "2",
        ],
        &[("RLHF_NAN_FROM_STEP", "2")],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(
        err.contains("2 consecutive steps had a non-finite loss or gradient"),
        "{err}"
    );
    assert!(
        err.contains("step-000002"),
        "the message should name the last good checkpoint: {err}"
    );
    assert!(!err.contains("panicked"));
    let m = metrics(&out);
    assert_eq!(
        m.len(),
        3,
        "steps 1-2 trained, step 3 skipped and logged, step 4 stopped the run"
    );
    assert_eq!(m[2]["train/skipped_steps"], 1.0);
    // The checkpoint of step 2 is intact and loads.
    Model::load(
        &out.join("checkpoints/step-000002"),
        &common::ModelOptions::cpu(Head::Lm),
    )
    .unwrap();
    assert!(!out.join("checkpoints/step-000004").exists());
}

/// Broken model directories and unusable outputs: one clear line, exit ≠ 0, no panic, and
/// nothing written.
/// Broken copies of the fixture's model under `dir`: an unknown `model_type`, a config
/// that disagrees with the stored shapes, a vocabulary smaller than the tokenizer's, and a
/// missing tensor.
fn broken_models(dir: &Path) -> [PathBuf; 4] {
    let f = fixture();
    let copy_model = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&f.model).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
        }
        d
    };
    let edit_config = |d: &Path, key: &str, value: Value| {
        let path = d.join("config.json");
        let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        c[key] = value;
        std::fs::write(path, c.to_string()).unwrap();
    };
    let unknown = copy_model("unknown-type");
    edit_config(&unknown, "model_type", json!("bert"));
    let shape = copy_model("wrong-shape");
    edit_config(&shape, "intermediate_size", json!(100));
    // A model of 50 tokens with the fixture's 320-token tokenizer.
    let small_vocab = dir.join("small-vocab");
    {
        let mut c: Value =
            serde_json::from_str(&std::fs::read_to_string(f.model.join("config.json")).unwrap())
                .unwrap();
        c["vocab_size"] = json!(50);
        let config = common::ModelConfig::from_json(c, Path::new("config.json")).unwrap();
        Model::new(config, &common::ModelOptions::cpu(Head::Lm))
            .save(&small_vocab, Some(&f.model))
            .unwrap();
    }
    let missing = copy_model("missing-tensor");
    {
        let (m, _) = Model::load(&missing, &common::ModelOptions::cpu(Head::Lm)).unwrap();
        let mut t = m.named_tensors();
        t.remove("model.norm.weight");
        common::checkpoint::save_tensors(&t, &missing, usize::MAX).unwrap();
    }
    [unknown, shape, small_vocab, missing]
}

#[test]
fn bad_models_and_outputs_are_refused_with_one_line() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let [unknown, shape, small_vocab, missing] = broken_models(dir.path());
    let cases: Vec<(&Path, &str)> = vec![
        (&unknown, "model_type 'bert' is not supported"),
        (&shape, "has shape [64, 128], the model expects [64, 100]"),
        (
            &small_vocab,
            "the tokenizer has 320 tokens but the model embeds only 50",
        ),
        (&missing, "missing tensor 'model.norm.weight'"),
    ];
    for (model, expected) in cases {
        let out = dir.path().join("out");
        let res = sft(
            &[
                "train",
                "--model",
                model.to_str().unwrap(),
                "--data",
                f.train.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
                "--device",
                "cpu",
            ],
            &[],
        );
        let err = String::from_utf8_lossy(&res.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(
            !res.status.success() && last.contains(expected),
            "{}: {err}",
            model.display()
        );
        assert!(!err.contains("panicked"));
        assert!(
            !out.exists(),
            "{}: the output directory was created",
            model.display()
        );
    }
    // An output directory that cannot be created (its parent is a file).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let res = train(&file.join("out"), &["--max-steps", "1"], &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("a-file/out"), "{err}");
    assert!(!err.contains("panicked"));
    // Rows over --max-length are reported, and a run left with nothing to learn refuses.
    let res = train(
        &dir.path().join("short"),
        &[
            "--max-steps",
            "1",
            "--max-length",
            "4",
            "--truncation",
            "drop",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        !res.status.success() && err.contains("no row is left to train on after --max-length 4"),
        "{err}"
    );
    let res = train(
        &dir.path().join("cut"),
        &["--max-steps", "1", "--max-length", "20"],
        &[],
    );
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        res.status.success() && err.contains("rows truncated and"),
        "{err}"
    );
}

/// Unmounts the test's tmpfs even when an assertion fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Disk full while writing a checkpoint: the run fails with the error, the earlier
/// checkpoint stays intact and loadable, and no partial checkpoint is left behind.
#[test]
fn a_full_disk_fails_the_run_and_keeps_the_earlier_checkpoint() {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    if !root_user {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let f = fixture();
    let disk = f.root.join("tiny-disk");
    std::fs::create_dir_all(&disk).unwrap();
    // One checkpoint of the fixture model takes 1.4 MB: the second does not fit.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2200k", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "could not mount a tmpfs at {}",
        disk.display()
    );
    let _unmount = Unmount(disk.clone());
    let out = disk.join("run");
    let res = train(&out, &["--max-steps", "6", "--save-every", "2"], &[]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "the run should fail on a full disk");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let good = out.join("checkpoints/step-000002");
    assert!(good.join("trainer_state.json").exists());
    Model::load(&good, &common::ModelOptions::cpu(Head::Lm)).unwrap();
    assert!(!out.join("checkpoints/step-000004").exists());
    assert!(
        !out.join("checkpoints/.step-000004.tmp").exists(),
        "partial checkpoint left"
    );
}

/// A FLAN-style mixture of three files capped at 8 rows each per epoch (T5's rule: 8, 8
/// and all 4 of the smallest), with each dataset's loss logged; a run killed mid-step
/// resumes to the same weights and the same per-dataset losses; explicit weights split
/// the rows by their shares; what cannot be mixed is refused.
#[test]
fn a_mixture_follows_its_rule_logs_each_dataset_and_resumes() {
    let f = fixture();
    let files: Vec<PathBuf> = [("big", 0..24), ("mid", 200..212), ("small", 300..304)]
        .into_iter()
        .map(|(name, rows)| {
            let p = f.root.join(format!("{name}.jsonl"));
            std::fs::write(&p, cage_rows(rows)).unwrap();
            p
        })
        .collect();
    let mixed = |out: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["train", "--model", f.model.to_str().unwrap()];
        for p in &files {
            args.extend(["--data", p.to_str().unwrap()]);
        }
        args.extend([
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--lr",
            "3e-3",
            "--batch-size",
            "5",
            "--seed",
            "7",
            "--max-examples-per-dataset",
            "8",
            "--epochs",
            "2",
            "--save-every",
            "3",
        ]);
        args.extend_from_slice(extra);
        sft(&args, env)
    };
    let straight = f.root.join("mix-straight");
    let out = mixed(&straight, &[], &[]);
    let summary = ok(&out);
    assert_eq!(summary["steps"], 8, "2 epochs of 20 rows in steps of 5");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("rows per epoch: big 8, mid 8, small 4"),
        "{log}"
    );
    let rows = metrics(&straight);
    for name in ["big", "mid", "small"] {
        let key = format!("train/loss/{name}");
        assert!(rows.iter().any(|r| r[&key].is_number()), "no {key}");
    }
    let killed = f.root.join("mix-killed");
    assert!(!mixed(&killed, &[], &[("RLHF_CRASH_AT", "mid-step@5")])
        .status
        .success());
    ok(&mixed(&killed, &["--resume"], &[]));
    let diff = max_weight_diff(&straight.join("final"), &killed.join("final"));
    assert!(diff < 1e-6, "resumed mixture weights differ by {diff:e}");
    let timeless = |rows: Vec<Value>| -> Vec<Value> {
        rows.into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("train/tokens_per_second");
                r
            })
            .collect()
    };
    assert_eq!(
        timeless(metrics(&killed)),
        timeless(rows),
        "the same losses per dataset and step after the resume"
    );

    let weighted = f.root.join("mix-weighted");
    let out = sft(
        &[
            "train",
            "--model",
            f.model.to_str().unwrap(),
            "--data",
            &format!("{}:1", files[0].display()),
            "--data",
            &format!("{}:3", files[1].display()),
            "--output-dir",
            weighted.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-steps",
            "1",
        ],
        &[],
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("rows per epoch: big 9, mid 27"));

    let (a, b) = (files[0].to_str().unwrap(), files[1].to_str().unwrap());
    let refused = |args: &[&str], want: &str| {
        let out = sft(args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    let base = [
        "train",
        "--model",
        f.model.to_str().unwrap(),
        "--output-dir",
        "/nonexistent/x",
        "--device",
        "cpu",
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    refused(
        &with(&base, &["--data", &format!("{a}:2"), "--data", b]),
        "give a weight (FILE:WEIGHT) for every file",
    );
    refused(
        &with(
            &base,
            &[
                "--data",
                &format!("{a}:2"),
                "--data",
                &format!("{b}:1"),
                "--max-examples-per-dataset",
                "4",
            ],
        ),
        "with weights (FILE:WEIGHT) leave it out",
    );
    refused(
        &with(&base, &["--data", a, "--data", b, "--group-by-length"]),
        "a mixture of several --data files cannot use it",
    );
    refused(
        &with(&base, &["--data", &format!("{a}:0")]),
        "must be a positive number",
    );
}

/// `--packing-strategy` (TRL's `packing_strategy`) on rows up to 4× --max-length: `bfd`
/// cuts the long rows and `bfd_split` and `wrapped` lose no token (TRL's `num_tokens`);
/// `wrapped`'s sequences (attention across rows, positions running on) give the step the
/// loss `transformers` gives them run alone (1e-4); eval rows are packed as the training
/// rows unless `--eval-packing false`, and `bfd`'s packing leaves the eval loss as it is.
#[test]
fn packing_strategies_are_trls() {
    let f = fixture();
    let data = f.root.join("long-rows.jsonl");
    let text: String = (0..12i64)
        .map(|i| {
            let answer = format!("{} rabbits and {} chickens. ", i % 7 + 1, i % 5 + 2);
            json!({"text": format!("There are {} heads. {}", i + 3, answer.repeat((i % 6 + 1) as usize))})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, text).unwrap();
    let whole = rlhf_tests::sft_rows(&f.model, &data, usize::MAX);
    let tokens: usize = whole.iter().map(|r| r.ids.len()).sum();
    let longest = whole.iter().map(|r| r.ids.len()).max().unwrap();
    assert!(longest > 3 * 16, "rows too short to cut: {longest}");
    let wrapped = data::packing::wrap(&whole, 16);
    let run = |tag: &str, extra: &[&str]| {
        let out = f.root.join(format!("strategy-{tag}"));
        let mut args = vec![
            "train",
            "--model",
            f.model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--eval-data",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-length",
            "16",
            "--max-steps",
            "1",
            "--overwrite",
        ];
        args.extend_from_slice(extra);
        let o = sft(&args, &[]);
        ok(&o);
        (
            metrics(&out)[0].clone(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let all = wrapped.len().to_string();
    let (m, log) = run(
        "wrapped",
        &[
            "--packing",
            "--packing-strategy",
            "wrapped",
            "--batch-size",
            &all,
        ],
    );
    assert!(
        log.contains(&format!("12 rows packed into {all} sequences")),
        "{log}"
    );
    assert_eq!(m["num_tokens"].as_f64(), Some(tokens as f64));
    let rows: Vec<Value> = wrapped
        .iter()
        .map(|r| json!({"ids": r.ids, "mask": r.loss_mask}))
        .collect();
    let rows_path = f.root.join("wrapped-rows.json");
    std::fs::write(&rows_path, Value::from(rows).to_string()).unwrap();
    let model = f.model.to_str().unwrap();
    let want = rlhf_tests::run_python(
        "gkd_reference.py",
        &[
            "--student",
            model,
            "--teacher",
            model,
            "--rows",
            rows_path.to_str().unwrap(),
        ],
    )["sft"]["nll"]
        .as_f64()
        .unwrap();
    let got = m["train/loss"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-4,
        "wrapped: {got} vs transformers' {want}"
    );
    // Every piece in the step.
    let pieces = data::packing::pack_with(&whole, 16, data::packing::Strategy::BfdSplit);
    let pieces = pieces.len().to_string();
    let (m, _) = run(
        "split",
        &[
            "--packing",
            "--packing-strategy",
            "bfd_split",
            "--batch-size",
            &pieces,
        ],
    );
    assert_eq!(m["num_tokens"].as_f64(), Some(tokens as f64));
    let cut = rlhf_tests::sft_rows(&f.model, &data, 16);
    let packs = data::packing::pack(&cut, 16).len().to_string();
    let (bfd, _) = run("bfd", &["--packing", "--batch-size", &packs]);
    assert!(bfd["num_tokens"].as_f64().unwrap() < tokens as f64);
    // The eval rows are packed (fewer, fuller sequences) with the same loss.
    let (unpacked, _) = run(
        "bfd-eval-unpacked",
        &["--packing", "--batch-size", "64", "--eval-packing", "false"],
    );
    let (a, b) = (
        bfd["eval/loss"].as_f64().unwrap(),
        unpacked["eval/loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-5, "bfd-packed eval {a} vs unpacked {b}");
    for (extra, want) in [
        (
            &["--packing-strategy", "wrapped"][..],
            "--packing-strategy applies with --packing or --eval-packing true",
        ),
        (
            &[
                "--packing",
                "--packing-strategy",
                "bfd_split",
                "--truncation",
                "drop",
            ][..],
            "--truncation drop keeps rows whole or not at all",
        ),
    ] {
        let out = f.root.join("strategy-refused");
        let mut args = train_args(&out, extra);
        args.push("--overwrite");
        let o = sft(&args, &[]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{extra:?}: {e}");
    }
}

/// `--packing`: with every row in each step, packed and unpacked training see the same
/// rows, so each step's loss and gradient norm and the final weights agree; the packed
/// run takes fewer, fuller sequences. Bad combinations are refused.
#[test]
fn packed_training_equals_unpacked_training() {
    let f = fixture();
    // Rows of very different lengths: the completion repeated 1 to 8 times.
    let data = f.root.join("varied.jsonl");
    let text: String = (0..16i64)
        .map(|i| {
            let (rabbits, chickens) = (i % 7 + 1, i % 5 + 2);
            let answer = format!("{rabbits} rabbits and {chickens} chickens. ");
            json!({"prompt": format!("There are {} heads. ", rabbits + chickens),
                   "completion": answer.repeat((i % 8 + 1) as usize)})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&data, text).unwrap();
    // Every pack in each step too: the packed run's batch is the number of packs.
    let prepared = rlhf_tests::sft_rows(&f.model, &data, 160);
    let packs = data::packing::pack(&prepared, 160).len().to_string();
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            f.model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--lr",
            "3e-3",
            "--batch-size",
            "16",
            "--max-steps",
            "2",
            "--max-length",
            "160",
        ];
        args.extend_from_slice(extra);
        sft(&args, &[])
    };
    let (plain, packed) = (f.root.join("unpacked"), f.root.join("packed"));
    ok(&run(&plain, &[]));
    let out = run(&packed, &["--packing", "--batch-size", &packs]);
    ok(&out);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains(&format!("16 rows packed into {packs} sequences")),
        "{log}"
    );
    assert!(packs.parse::<usize>().unwrap() < 12, "{packs} packs");
    let (a, b) = (metrics(&plain), metrics(&packed));
    assert_eq!(a.len(), 2);
    let keys = ["train/loss", "train/grad_norm"];
    rlhf_tests::assert_same_metrics(&a, &b, &keys, (1e-5, 0.0));
    // Adam's normalised step amplifies the summation-order noise of near-zero gradients:
    // 1.3e-5 seen on an AMD EPYC, under 1e-5 on an Intel Xeon. A packing error (attention
    // across rows, positions not restarting) changes the losses, compared above to 1e-5.
    let diff = max_weight_diff(&plain.join("final"), &packed.join("final"));
    assert!(diff < 5e-5, "packed training's weights differ by {diff:e}");

    for (extra, want) in [
        (
            &["--packing", "--group-by-length"][..],
            "--group-by-length has nothing to group with --packing",
        ),
        (
            &["--packing", "--prompt-tuning-tokens", "4"][..],
            "--packing with --prompt-tuning-tokens or --prefix-tuning-tokens is not supported",
        ),
        (
            &["--packing", "--prefix-tuning-tokens", "4"][..],
            "--packing with --prompt-tuning-tokens or --prefix-tuning-tokens is not supported",
        ),
    ] {
        let out = run(&f.root.join("packing-refused"), extra);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
        assert!(!f.root.join("packing-refused").exists());
    }
}

/// Data parallel (issue 19): `torchrun --nproc-per-node 2` (torch's own launcher, its agent
/// hosting the c10d store) runs `sft train` as two ranks of batch 4; they train the weights
/// one process gets with batch 8 (1e-5), and rank 0 alone writes the metrics (each step
/// once), the TensorBoard file and the model; also with the optimizer state sharded
/// (`--zero-stage 1`). A rank killed mid-run ends the run; two ranks resume it to the
/// uninterrupted weights.
#[test]
fn two_ranks_train_what_one_process_trains_with_twice_the_batch() {
    let f = fixture();
    let (one, two) = (f.root.join("dp-one"), f.root.join("dp-two"));
    ok(&train(
        &one,
        &["--max-steps", "3", "--batch-size", "8"],
        &[],
    ));
    let torchrun = |out: &Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut options = vec![
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--save-every",
            "1",
            "--dist-timeout",
            "120",
        ];
        options.extend_from_slice(extra);
        rlhf_tests::torchrun(
            env!("CARGO_BIN_EXE_sft"),
            2,
            &train_args(out, &options),
            env,
        )
    };
    // A world of one under torchrun connects (on a GPU its tensors would go through
    // NCCL) and trains what the plain process trains.
    let alone = f.root.join("dp-alone");
    let args = [
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--dist-timeout",
        "120",
    ];
    let out = rlhf_tests::torchrun(
        env!("CARGO_BIN_EXE_sft"),
        1,
        &train_args(&alone, &args),
        &[],
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("rank 0 of 1"), "{log}");
    let diff = max_weight_diff(&one.join("final"), &alone.join("final"));
    assert!(
        diff < 1e-7,
        "torchrun with one rank: weights differ by {diff:e}"
    );

    let out = torchrun(&two, &[], &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "torchrun failed:\n{log}");
    assert!(log.contains("data parallel: rank 1 of 2"), "{log}");
    let keys = ["train/loss", "train/grad_norm"];
    rlhf_tests::assert_trains_like(&one, &two, Head::Lm, (&keys, 0.0), 3);
    let events = std::fs::read_dir(two.join("tb")).unwrap().count();
    assert_eq!(events, 1, "one TensorBoard file");
    let last = two.join("checkpoints/step-000003");
    for rank in 0..2 {
        let rng = last.join(format!("rng_state_{rank}.safetensors"));
        assert!(rng.exists(), "{} is missing", rng.display());
    }

    // An error on rank 0 alone (the output directory exists): every rank ends, well
    // before --dist-timeout (120 s), rather than waiting for rank 0 at a barrier.
    let started = std::time::Instant::now();
    let out = torchrun(&two, &[], &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && log.contains("--overwrite"),
        "{log}"
    );
    assert!(log.contains("rank 1: rank 0 left the run"), "{log}");
    assert!(
        started.elapsed().as_secs() < 90,
        "the ranks waited for the timeout"
    );

    // Two machines, as torchrun runs them (one agent each, c10d rendezvous; here both on
    // this one): the same weights (up to the order of the sums: the rendezvous decides
    // which machine's process is rank 0).
    let nodes = f.root.join("dp-nodes");
    let args = [
        "--max-steps",
        "3",
        "--batch-size",
        "4",
        "--dist-timeout",
        "120",
    ];
    let agents =
        rlhf_tests::torchrun_nodes(env!("CARGO_BIN_EXE_sft"), 2, &train_args(&nodes, &args));
    // Each rank finished (its summary line); an agent's own exit status is not checked:
    // the agent hosting the rendezvous may leave first, and the other agent can then fail
    // to reach it while closing (torchrun's, after our ranks are done).
    for agent in &agents {
        let (out, log) = (
            String::from_utf8_lossy(&agent.stdout),
            String::from_utf8_lossy(&agent.stderr),
        );
        assert!(out.contains("\"steps\":3"), "{out}\n{log}");
    }
    let diff = max_weight_diff(&two.join("final"), &nodes.join("final"));
    assert!(
        diff < 1e-6,
        "two nodes vs two local ranks: weights differ by {diff:e}"
    );

    // The optimizer state sharded (ZeRO-1): the same weights, and a checkpoint holding the
    // same whole state (gathered on rank 0).
    let sharded = f.root.join("dp-zero1");
    let zero1 = ["--zero-stage", "1"];
    let out = torchrun(&sharded, &zero1, &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "torchrun failed:\n{log}");
    assert!(log.contains("--zero-stage 1: this rank holds"), "{log}");
    rlhf_tests::assert_trains_like(&one, &sharded, Head::Lm, (&keys, 0.0), 3);
    let state = |dir: &Path| {
        let file = dir.join("checkpoints/step-000003/optimizer.safetensors");
        let tensors = tch::Tensor::read_safetensors(&file).unwrap();
        tensors
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (whole, gathered) = (state(&two), state(&sharded));
    assert_eq!(
        whole.keys().collect::<Vec<_>>(),
        gathered.keys().collect::<Vec<_>>()
    );
    for (key, t) in &whole {
        let diff = (t - &gathered[key]).abs().max().double_value(&[]);
        assert!(
            diff < 1e-6,
            "{key}: ZeRO-1's checkpoint differs by {diff:e}"
        );
    }

    // The exchange overlapped with the last of two micro-batches' backward, in buckets of
    // 10 kB: the same weights.
    let overlapped = f.root.join("dp-overlap");
    let out = torchrun(&overlapped, &rlhf_tests::OVERLAPPED, &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "torchrun failed:\n{log}");
    assert!(
        log.contains("--overlap-grad-reduce: the gradients go in"),
        "{log}"
    );
    rlhf_tests::assert_trains_like(&one, &overlapped, Head::Lm, (&keys, 0.0), 3);

    // Rank 1 killed in the middle of step 2 (ZeRO-1): torchrun ends the run non-zero; two
    // ranks resume from the step-1 checkpoint (each taking its shard of the whole state)
    // to the uninterrupted weights.
    let killed = f.root.join("dp-killed");
    let crash = [("RLHF_CRASH_AT", "mid-step@2"), ("RLHF_CRASH_RANK", "1")];
    let out = torchrun(&killed, &zero1, &crash);
    assert!(!out.status.success(), "the run went on without rank 1");
    assert!(!killed.join("final").exists());
    let out = torchrun(&killed, &["--zero-stage", "1", "--resume"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let diff = max_weight_diff(&sharded.join("final"), &killed.join("final"));
    assert!(diff < 1e-6, "resumed two-rank weights differ by {diff:e}");
}

/// `--loss-type dft` (TRL's): each token's NLL weighted by its probability. At step 1 (the
/// same weights and rows) its loss is below the NLL's, since every p < 1, and the two runs
/// train different weights.
/// `--train-sampling-strategy sequential` (transformers'): step 1 trains the file's first
/// batch of rows, the weights a run on just those rows trains (1e-5: the same rows, summed
/// in another order); the default random
/// order trains other rows.
#[test]
fn sequential_sampling_trains_the_rows_in_the_files_order() {
    let f = fixture();
    let first = f.root.join("first-batch.jsonl");
    let text = std::fs::read_to_string(&f.train).unwrap();
    let lines: String = text.lines().take(8).map(|l| format!("{l}\n")).collect();
    std::fs::write(&first, lines).unwrap();
    let run = |name: &str, data: &Path, extra: &[&str]| {
        let out = f.root.join(name);
        let mut args = train_args(&out, extra);
        args[4] = data.to_str().unwrap();
        args.extend(["--max-steps", "1", "--overwrite"]);
        ok(&sft(&args, &[]));
        out.join("final")
    };
    let sequential = ["--train-sampling-strategy", "sequential"];
    let in_order = run("order-sequential", &f.train, &sequential);
    let alone = run("order-first-batch", &first, &[]);
    let diff = max_weight_diff(&in_order, &alone);
    assert!(
        diff < 1e-5,
        "sequential step 1 trained other rows ({diff:e})"
    );
    let shuffled = run("order-random", &f.train, &[]);
    let diff = max_weight_diff(&in_order, &shuffled);
    assert!(
        diff > 1e-4,
        "the random order trained the first rows ({diff:e})"
    );
}

#[test]
fn dft_loss_trains_differently_from_nll() {
    let f = fixture();
    let (nll, dft) = (f.root.join("loss-nll"), f.root.join("loss-dft"));
    ok(&train(&nll, &["--max-steps", "3"], &[]));
    ok(&train(
        &dft,
        &["--max-steps", "3", "--loss-type", "dft"],
        &[],
    ));
    let first = |out: &Path| {
        read_jsonl(&out.join("metrics.jsonl"))[0]["train/loss"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (first(&nll), first(&dft));
    assert!(
        b.is_finite() && b > 0.0 && b < a,
        "step 1: dft {b} vs nll {a}"
    );
    let diff = max_weight_diff(&nll.join("final"), &dft.join("final"));
    assert!(diff > 1e-5, "dft trained the nll weights ({diff:e})");
}

/// `--neftune-noise-alpha` (transformers'): the noise changes the training forward (step
/// 1's loss moves) and comes from the run's generator (a killed run resumes to the
/// uninterrupted weights, 1e-6). That evaluation sees none is the unit test
/// `neftune_noise_only_in_training_forwards` (common).
#[test]
fn neftune_noise_trains_and_resumes_exactly() {
    let f = fixture();
    let noisy = [
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--neftune-noise-alpha",
        "5",
    ];
    let (plain, full, killed) = (
        f.root.join("neftune-plain"),
        f.root.join("neftune-full"),
        f.root.join("neftune-killed"),
    );
    ok(&train(&plain, &noisy[..4], &[]));
    ok(&train(&full, &noisy, &[]));
    let first = |out: &Path| {
        read_jsonl(&out.join("metrics.jsonl"))[0]["train/loss"]
            .as_f64()
            .unwrap()
    };
    let (a, b) = (first(&plain), first(&full));
    assert!(
        (a - b).abs() > 1e-6,
        "step 1 without and with noise: {a} vs {b}"
    );
    let out = train(&killed, &noisy, &[("RLHF_CRASH_AT", "mid-step@3")]);
    assert!(!out.status.success(), "the crash point was not hit");
    let mut resumed = noisy.to_vec();
    resumed.push("--resume");
    ok(&train(&killed, &resumed, &[]));
    let diff = max_weight_diff(&full.join("final"), &killed.join("final"));
    assert!(diff < 1e-6, "resumed noisy run differs by {diff:e}");
}

/// A rank that hangs (stopped with SIGSTOP: alive, holding its connections, doing
/// nothing) ends the run: the other rank leaves non-zero after --dist-timeout with one line
/// naming it, and the last checkpoint stays whole. Two processes launched as Slurm or a
/// hand-written script would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; rank 0 hosts the
/// store), so nothing but the timeout ends the wait.
#[test]
fn a_hung_rank_ends_the_run_after_the_timeout() {
    let f = fixture();
    let out = f.root.join("dp-hung");
    let port = common::dist::free_port().to_string();
    let args = train_args(
        &out,
        &[
            "--max-steps",
            "100000",
            "--batch-size",
            "4",
            "--save-every",
            "2",
            // Long enough that a rank slowed by a busy machine is not taken for a hung one.
            "--dist-timeout",
            "10",
        ],
    );
    let ranks: Vec<std::process::Child> = (0..2)
        .map(|rank| {
            Command::new(env!("CARGO_BIN_EXE_sft"))
                .args(&args)
                .env_remove("RLHF_CRASH_AT")
                .envs([
                    ("RANK", rank.to_string()),
                    ("LOCAL_RANK", rank.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("MASTER_ADDR", "127.0.0.1".into()),
                    ("MASTER_PORT", port.clone()),
                ])
                .stdout(std::process::Stdio::null())
                // Rank 0's line is the one read (after it exits: only a few lines come
                // before); rank 1's is not.
                .stderr(if rank == 0 {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .spawn()
                .unwrap()
        })
        .collect();
    let [mut rank0, mut rank1]: [std::process::Child; 2] = ranks.try_into().unwrap();
    // Once a checkpoint is complete, rank 1 stops where it is.
    let started = std::time::Instant::now();
    while !out.join("checkpoints/step-000002").exists() {
        assert!(
            started.elapsed().as_secs() < 120 && rank0.try_wait().unwrap().is_none(),
            "no checkpoint of step 2"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on a child this test spawned.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(rank1.id() as i32, libc::SIGSTOP);
    }
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(status) = rank0.try_wait().unwrap() {
            break status;
        }
        if stopped.elapsed().as_secs() > 60 {
            rank0.kill().unwrap();
            rank1.kill().unwrap();
            panic!("rank 0 still waits 60 s after rank 1 stopped (--dist-timeout 10)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let waited = stopped.elapsed();
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(rank0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains(
            "error: data parallel: rank 0: rank 1 did not arrive within --dist-timeout (10 s)"
        ),
        "{log}"
    );
    assert!(waited.as_secs_f64() >= 9.0, "left after {waited:?}: {log}");
    assert!(!out.join("final").exists());
    // The last checkpoint is whole: it loads.
    let last = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("step-"))
        .max()
        .unwrap();
    let checkpoint = out.join("checkpoints").join(last);
    Model::load(&checkpoint, &common::ModelOptions::cpu(Head::Lm)).unwrap();
}

/// Sequence packing (`sft train --packing`) at the model: rows of very different lengths
/// packed give each row the log-probs it has alone (no attention crosses rows, positions
/// restart), and the packed batch's token-weighted loss and gradients are the unpacked
/// batch's, for GPT-2 and the Llama family (Mistral's sliding window shorter than a row,
/// Qwen3, Gemma 2's soft-capped sliding and global layers), with and without gradient
/// checkpointing.
mod packing {
    use common::{Head, Model, ModelConfig, ModelOptions};
    use data::packing::pack;
    use data::sft::{collate, TokenizedSft};
    use serde_json::{json, Value};
    use sft::eval::token_nll;
    use tch::{Device, Kind, Tensor};

    fn configs() -> Vec<(&'static str, Value)> {
        let llama = |t: &str| {
            json!({"model_type": t, "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 4, "tie_word_embeddings": false})
        };
        let mut mistral = llama("mistral");
        mistral["sliding_window"] = json!(5);
        vec![
            (
                "gpt2",
                json!({"model_type": "gpt2", "vocab_size": 40, "n_embd": 16, "n_layer": 2,
                       "n_head": 2, "n_positions": 64}),
            ),
            ("llama", llama("llama")),
            ("mistral (window 5)", mistral),
            ("qwen3", llama("qwen3")),
            (
                "gemma2 (window 5 on even layers)",
                json!({"model_type": "gemma2", "vocab_size": 40, "hidden_size": 16,
                       "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 4, "sliding_window": 5,
                       "attn_logit_softcapping": 2.0, "final_logit_softcapping": 5.0}),
            ),
        ]
    }

    /// Rows of 2 to 29 tokens; `all_targets` puts the loss on every token, else on a
    /// completion after a prompt of a third of the row.
    fn rows(all_targets: bool) -> Vec<TokenizedSft> {
        [29usize, 3, 12, 2, 21, 7, 16]
            .iter()
            .enumerate()
            .map(|(r, &n)| {
                let ids = (0..n).map(|i| ((i * 7 + r * 5) % 39 + 1) as i64).collect();
                let mask = (0..n)
                    .map(|i| i64::from(all_targets || i >= n / 3))
                    .collect();
                TokenizedSft::new(ids, mask)
            })
            .collect()
    }

    /// libtorch's random generator is one per process: the tests take turns with it, so each
    /// test's models are the same whatever runs beside it.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn model(config: &Value, checkpointing: bool) -> Model {
        let config = ModelConfig::from_json(config.clone(), std::path::Path::new("x")).unwrap();
        let opts = ModelOptions {
            gradient_checkpointing: checkpointing,
            ..ModelOptions::cpu(Head::Lm)
        };
        Model::new(config, &opts)
    }

    /// Summed NLL of the batch's targets, its per-token NLL `[B, T-1]`, and every gradient.
    fn nll_and_grads(model: &Model, rows: &[TokenizedSft]) -> (f64, Tensor, Vec<Tensor>) {
        let refs: Vec<_> = rows.iter().collect();
        let batch = collate(&refs, 0, Device::Cpu);
        let (nll, _) = token_nll(model, &batch);
        let loss = nll.sum(Kind::Float);
        model.backward(&loss);
        let mut vars: Vec<_> = model.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let grads = vars
            .iter_mut()
            .map(|(_, v)| {
                let g = v.grad().copy();
                v.zero_grad();
                g
            })
            .collect();
        (loss.double_value(&[]), nll.detach(), grads)
    }

    #[test]
    fn a_packed_row_has_its_own_log_probs() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(12);
        let rows = rows(true);
        let packs = pack(&rows, 32);
        assert!(packs.len() < rows.len() && packs.iter().all(|p| p.ids.len() <= 32));
        for (name, config) in configs() {
            let model = model(&config, false);
            let _guard = tch::no_grad_guard();
            let packed = token_nll(
                &model,
                &collate(&packs.iter().collect::<Vec<_>>(), 0, Device::Cpu),
            )
            .0;
            // Where each row went: its pack and offset, in the order pack() put it there.
            let mut placed = vec![];
            let lengths: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
            for (p, bin) in data::packing::bfd_bins(&lengths, 32).iter().enumerate() {
                let mut offset = 0;
                for &r in bin {
                    placed.push((r, p as i64, offset));
                    offset += lengths[r] as i64;
                }
            }
            for (r, p, offset) in placed {
                let n = lengths[r] as i64;
                let alone = token_nll(&model, &collate(&[&rows[r]], 0, Device::Cpu)).0;
                // Token t of the row is predicted at t - 1: n - 1 targets from the row's start.
                // 1e-4 as the log-prob parity tests: libtorch's CPU attention kernels (causal
                // alone, masked packed) have been seen 6e-5 apart on rare weights.
                let got = packed.get(p).narrow(0, offset, n - 1);
                let diff = (&got - alone.get(0)).abs().max().double_value(&[]);
                assert!(
                    diff < 1e-4,
                    "{name}: row {r} (length {n}) differs by {diff:e} packed"
                );
            }
        }
    }

    #[test]
    fn packed_loss_and_gradients_equal_the_unpacked_ones() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(12);
        let rows = rows(false);
        let packs = pack(&rows, 32);
        for (name, config) in configs() {
            for checkpointing in [false, true] {
                let model = model(&config, checkpointing);
                let (loss, _, grads) = nll_and_grads(&model, &rows);
                let (packed_loss, _, packed_grads) = nll_and_grads(&model, &packs);
                let what = format!("{name}, checkpointing {checkpointing}");
                assert!(
                    ((loss - packed_loss) / loss).abs() < 1e-5,
                    "{what}: loss {loss} unpacked, {packed_loss} packed"
                );
                for (a, b) in grads.iter().zip(&packed_grads) {
                    let diff = (a - b).abs().max().double_value(&[]);
                    let size = a.abs().max().double_value(&[]);
                    assert!(
                        diff < 1e-5 * size.max(1.0),
                        "{what}: a gradient differs by {diff:e}"
                    );
                }
            }
        }
    }
}

/// `--bema` (TRL's `BEMACallback`): `bema/` equals TRL's callback replayed over the run's
/// checkpoint of every step (θ_0 and the EMA taken at step 1, updates at steps 3 and 5, none
/// at the last), 1e-6; `final/` is what the run trains without `--bema`; a run killed in
/// step 4 resumes to the same `bema/` (TRL would start its average again); with LoRA,
/// `bema/` is an adapter directory; bad settings are refused in one line.
#[test]
fn bema_is_trls_and_resumes_exactly() {
    let f = fixture();
    let steps = ["--max-steps", "6", "--save-every", "1"];
    let bema = [
        "--bema",
        "--bema-update-freq",
        "2",
        "--bema-update-after",
        "1",
        "--bema-lag",
        "3",
        "--bema-multiplier",
        "1.5",
    ];
    let with = [&steps[..], &bema[..]].concat();
    let (plain, full, killed, trl) = (
        f.root.join("bema-plain"),
        f.root.join("bema-full"),
        f.root.join("bema-killed"),
        f.root.join("bema-trl"),
    );
    ok(&train(&plain, &steps, &[]));
    ok(&train(&full, &with, &[]));
    assert!(max_weight_diff(&plain.join("final"), &full.join("final")) < 1e-7);
    let checkpoints: Vec<String> = (1..=6)
        .map(|s| {
            full.join(format!("checkpoints/step-{s:06}"))
                .display()
                .to_string()
        })
        .collect();
    rlhf_tests::run_python(
        "bema_reference.py",
        &[
            "--model",
            f.model.to_str().unwrap(),
            "--checkpoints",
            &checkpoints.join(","),
            "--out",
            trl.to_str().unwrap(),
            "--kwargs",
            r#"{"update_freq": 2, "update_after": 1, "lag": 3, "multiplier": 1.5}"#,
        ],
    );
    let diff = max_weight_diff(&full.join("bema"), &trl.join("bema"));
    assert!(diff < 1e-6, "bema/ differs from TRL's by {diff:e}");
    let apart = max_weight_diff(&full.join("bema"), &full.join("final"));
    assert!(apart > 1e-4, "bema/ is final/ ({apart:e})");

    let out = train(&killed, &with, &[("RLHF_CRASH_AT", "mid-step@4")]);
    assert!(!out.status.success(), "the crash point was not hit");
    assert!(killed
        .join("checkpoints/step-000003/bema.safetensors")
        .exists());
    let resumed = [&with[..], &["--resume"]].concat();
    ok(&train(&killed, &resumed, &[]));
    for dir in ["final", "bema"] {
        let diff = max_weight_diff(&full.join(dir), &killed.join(dir));
        assert!(diff < 1e-6, "resumed {dir}/ differs by {diff:e}");
    }

    let lora = f.root.join("bema-lora");
    ok(&train(
        &lora,
        &[
            "--max-steps",
            "2",
            "--lora-r",
            "4",
            "--bema",
            "--bema-update-freq",
            "1",
        ],
        &[],
    ));
    let adapter = lora.join("bema/adapter_model.safetensors");
    assert!(adapter.exists() && lora.join("bema/adapter_config.json").exists());
    let read = |p: &Path| -> std::collections::BTreeMap<String, Tensor> {
        Tensor::read_safetensors(p).unwrap().into_iter().collect()
    };
    let (averaged, trained) = (
        read(&adapter),
        read(&lora.join("final/adapter_model.safetensors")),
    );
    assert_eq!(
        averaged.keys().collect::<Vec<_>>(),
        trained.keys().collect::<Vec<_>>()
    );
    let apart = averaged
        .iter()
        .map(|(k, a)| (a - &trained[k]).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(apart > 0.0, "the LoRA bema/ is final/");

    let refused = train(&f.root.join("bema-bad"), &["--bema-update-freq", "0"], &[]);
    rlhf_tests::assert_refused(&refused, "--bema-update-freq must be at least 1");
}
