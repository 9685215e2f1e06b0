//! `sft train --teacher-model --use-uld-loss`: distillation from a teacher with another
//! tokenizer, as TRL's GOLD does it. The loss is TRL's own `ULDLoss` on TRL's own teacher
//! inputs (against `transformers`) for each of its alignments and losses, on-policy steps
//! read the student's samples in the teacher's tokens, a student distilled from a teacher
//! (of another architecture and tokenizer) that knows the task learns it, and what cannot
//! work is refused.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rlhf_tests::{ok, read_jsonl, run_bin, run_python};
use serde_json::{json, Value};

struct Fixture {
    root: PathBuf,
    /// The tiny Llama the student starts from (byte-level BPE of 320 tokens).
    model: PathBuf,
    /// A tiny GPT-2 with a byte-level BPE of its own (400 tokens, other merges).
    teacher: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

/// 鸡兔同笼 rows whose completion starts with a space (so TRL's GOLD data path, which
/// splits prompt and completion by bytes, and SFT's, by tokens, agree) and spells
/// characters both tokenizers split into bytes.
fn rows(range: std::ops::Range<i64>) -> String {
    range
        .map(|i| {
            let (rabbits, chickens) = (i % 7 + 1, i % 5 + 2);
            let heads = rabbits + chickens;
            let legs = 4 * rabbits + 2 * chickens;
            json!({"prompt": format!("鸡兔同笼: {heads} heads and {legs} legs."),
                   "completion": format!(" {rabbits} rabbits and {chickens} chickens (兔 {rabbits}).")})
            .to_string()
                + "\n"
        })
        .collect()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sft-gold");
        rlhf_tests::tiny_llama_fixture(&root);
        let teacher = root.join("teacher");
        run_python(
            "gold_reference.py",
            &["make-teacher", "--out", teacher.to_str().unwrap()],
        );
        let (train, eval) = (root.join("train.jsonl"), root.join("eval.jsonl"));
        std::fs::write(&train, rows(0..24)).unwrap();
        std::fs::write(&eval, rows(100..108)).unwrap();
        Fixture {
            model: root.join("model"),
            root,
            teacher,
            train,
            eval,
        }
    })
}

fn sft(args: &[&str]) -> Value {
    ok(&run_bin(env!("CARGO_BIN_EXE_sft"), args, &[]))
}

/// `sft train`'s arguments: `student` from `teacher` with --use-uld-loss on the
/// fixture's rows, to `out` (CPU, seed 5, overwritten).
fn gold_args<'a>(student: &'a Path, teacher: &'a Path, out: &'a Path) -> Vec<&'a str> {
    let f = fixture();
    vec![
        "train",
        "--model",
        student.to_str().unwrap(),
        "--teacher-model",
        teacher.to_str().unwrap(),
        "--use-uld-loss",
        "--data",
        f.train.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--seed",
        "5",
        "--overwrite",
    ]
}

/// [`gold_args`] plus `extra`, run; the metrics.
fn gold(student: &Path, teacher: &Path, out: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = gold_args(student, teacher, out);
    args.extend_from_slice(extra);
    sft(&args);
    read_jsonl(&out.join("metrics.jsonl"))
}

/// Step 1's loss over 24 rows and two conversations (one batch of the data's completions,
/// `--lmbda 0`) is TRL's: its GOLD data path tokenizes the rows as SFT does here, its
/// `build_teacher_inputs_from_texts` gives the teacher's tokens, and its `ULDLoss` the
/// loss, 1e-4 apart, for: the defaults (byte-aligned, observed merging, sorted L1); the
/// Bayesian merge with the hybrid loss at adaptive weights, the cross-entropy added and
/// other temperatures; the positional alignment; and the hybrid loss at fixed weights
/// with both EOS kept. The hybrid loss's parts are logged as TRL's
/// `matched_loss`/`unmatched_loss`, and the same rows as eval data get the same loss as
/// `eval/distillation_loss` (TRL's `eval_loss`).
#[test]
fn the_loss_is_trls_uld_on_the_teachers_own_tokens() {
    let f = fixture();
    // The training rows and two conversations (the ChatML template's end of turn is text the
    // teacher reads).
    let data = f.root.join("parity.jsonl");
    let conversations = [
        json!({"messages": [{"role": "user", "content": "鸡兔同笼: 3 heads and 10 legs."},
                            {"role": "assistant", "content": "2 rabbits and 1 chicken."}]}),
        json!({"messages": [{"role": "system", "content": "Count legs."},
                            {"role": "user", "content": "5 heads, 14 legs?"},
                            {"role": "assistant", "content": "2 rabbits, 3 chickens (兔 2)."}]}),
    ];
    let text = rows(0..24) + &conversations.map(|c| c.to_string() + "\n").concat();
    std::fs::write(&data, text).unwrap();
    let configs: Vec<(Value, Vec<&str>)> = vec![
        (json!({}), vec![]),
        (
            json!({"uld_token_merge_strategy": "bayesian", "uld_use_hybrid_loss": true,
                   "uld_crossentropy_weight": 0.5, "uld_student_temperature": 0.8,
                   "uld_teacher_temperature": 1.3, "beta": 0.3}),
            vec![
                "--uld-token-merge-strategy",
                "bayesian",
                "--uld-use-hybrid-loss",
                "--uld-crossentropy-weight",
                "0.5",
                "--uld-student-temperature",
                "0.8",
                "--uld-teacher-temperature",
                "1.3",
                "--beta",
                "0.3",
            ],
        ),
        (
            json!({"use_extended_uld": false, "uld_distillation_weight": 2.0}),
            vec![
                "--use-extended-uld",
                "false",
                "--uld-distillation-weight",
                "2",
            ],
        ),
        (
            json!({"uld_use_hybrid_loss": true, "uld_hybrid_matched_weight": 0.7,
                   "uld_hybrid_unmatched_weight": 0.2, "uld_skip_student_eos": false,
                   "uld_skip_teacher_eos": false}),
            vec![
                "--uld-use-hybrid-loss",
                "--uld-hybrid-matched-weight",
                "0.7",
                "--uld-hybrid-unmatched-weight",
                "0.2",
                "--uld-skip-student-eos",
                "false",
                "--uld-skip-teacher-eos",
                "false",
            ],
        ),
    ];
    let reference_configs = Value::from(configs.iter().map(|c| c.0.clone()).collect::<Vec<_>>());
    let expected = run_python(
        "gold_reference.py",
        &[
            "loss",
            "--student",
            f.model.to_str().unwrap(),
            "--teacher",
            f.teacher.to_str().unwrap(),
            "--rows",
            data.to_str().unwrap(),
            "--configs",
            &reference_configs.to_string(),
        ],
    );
    // TRL's GOLD data path reads the rows into the tokens SFT reads here.
    let prepared = rlhf_tests::sft_rows(&f.model, &data, 1024);
    for (i, row) in prepared.iter().enumerate() {
        assert_eq!(Value::from(row.ids.clone()), expected["ids"][i], "row {i}");
        assert_eq!(
            Value::from(row.loss_mask.clone()),
            expected["masks"][i],
            "row {i}"
        );
    }
    for (i, (_, options)) in configs.iter().enumerate() {
        // At a negligible learning rate, then the same rows as eval data: their
        // `eval/distillation_loss` is the step's loss.
        let step = [
            "--lmbda",
            "0",
            "--batch-size",
            "26",
            "--max-steps",
            "1",
            "--eval-data",
            data.to_str().unwrap(),
            "--lr",
            "1e-12",
        ];
        let out = f.root.join(format!("parity-{i}"));
        let mut args = gold_args(&f.model, &f.teacher, &out);
        args[7] = data.to_str().unwrap();
        args.extend_from_slice(&[&options[..], &step].concat());
        sft(&args);
        let m = &read_jsonl(&out.join("metrics.jsonl"))[0];
        assert_eq!(m["train/on_policy"].as_f64(), Some(0.0));
        let want = &expected["configs"][i];
        for key in ["loss", "matched_loss", "unmatched_loss"] {
            let Some(w) = want[key].as_f64() else {
                assert!(m.get(key).is_none(), "config {i} logs {key}");
                continue;
            };
            let ours = if key == "loss" { "train/loss" } else { key };
            let got = m[ours].as_f64().unwrap();
            assert!(
                w > 1e-3,
                "config {i}: {key} {w}: the teacher hardly differs"
            );
            assert!((got - w).abs() < 1e-4, "config {i} {key}: {got} vs {w}");
        }
        let (eval, w) = (
            m["eval/distillation_loss"].as_f64().unwrap(),
            want["loss"].as_f64().unwrap(),
        );
        assert!((eval - w).abs() < 1e-4, "config {i} eval: {eval} vs {w}");
    }
}

/// Held-out NLL (eval/loss) of `model` on the fixture's eval rows.
fn eval_nll(model: &Path) -> f64 {
    rlhf_tests::sft_eval_loss(env!("CARGO_BIN_EXE_sft"), model, &fixture().eval)
}

/// The teacher (a GPT-2 with its own tokenizer) fine-tuned on the task, and the student
/// (a Llama) distilled from it with the hybrid ULD loss, half the steps on its own samples
/// read in the teacher's tokens: its held-out NLL falls by more than 2.5 nats from its
/// start, and by more than 2 below the same distillation from the untaught teacher (the
/// knowledge is the teacher's, not the loss's). The plain ULD loss, blind to which token
/// is which, runs on the same samples.
#[test]
fn a_student_learns_from_a_teacher_with_another_tokenizer() {
    let f = fixture();
    let taught = rlhf_tests::sft_teacher(
        env!("CARGO_BIN_EXE_sft"),
        &f.teacher,
        &f.train,
        &f.root.join("taught"),
    );
    let options = [
        "--uld-use-hybrid-loss",
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
        "--epochs",
        "8",
        "--max-new-tokens",
        "24",
    ];
    let distilled = |teacher: &Path, name: &str, extra: &[&str]| {
        let out = f.root.join(name);
        let m = gold(&f.model, teacher, &out, &[&options[..], extra].concat());
        (m, out.join("final"))
    };
    let (m, student) = distilled(&taught, "student", &[]);
    let on_policy = m
        .iter()
        .filter(|r| r["train/on_policy"].as_f64() == Some(1.0))
        .count();
    assert!(
        on_policy > 0 && on_policy < m.len(),
        "{on_policy} of {} steps on-policy",
        m.len()
    );
    assert!(m
        .iter()
        .all(|r| r["matched_loss"].as_f64().is_some_and(f64::is_finite)));
    let (_, control) = distilled(&f.teacher, "control", &[]);
    let (start, student, control) = (eval_nll(&f.model), eval_nll(&student), eval_nll(&control));
    assert!(
        student < start - 2.5 && student < control - 2.0,
        "held-out NLL: start {start:.3}, from the untaught teacher {control:.3}, from the taught one {student:.3}"
    );
    // The plain ULD loss on the student's own samples (every step).
    let out = f.root.join("plain-on-policy");
    let plain = [
        "--lmbda",
        "1",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
    ];
    let m = gold(&f.model, &taught, &out, &plain);
    assert!(m.iter().all(|r| r["train/on_policy"].as_f64() == Some(1.0)
        && r["train/loss"]
            .as_f64()
            .is_some_and(|l| l.is_finite() && l > 0.0)));
    assert!(m[0].get("matched_loss").is_none());
    let moved = rlhf_tests::max_weight_diff(&f.model, &out.join("final"), common::Head::Lm);
    assert!(moved > 1e-5, "on-policy ULD trained nothing");
    // Samples of one token leave nothing to compare once the EOS is skipped: the step's
    // loss is 0, and the step runs.
    let out = f.root.join("one-token");
    let one = [
        "--lmbda",
        "1",
        "--max-new-tokens",
        "1",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
    ];
    let m = gold(&f.model, &taught, &out, &one);
    assert_eq!(m[0]["train/loss"].as_f64(), Some(0.0));
}

/// What GOLD cannot do stops the run with one line, before anything is written.
#[test]
fn what_cannot_work_is_refused_with_one_line() {
    let f = fixture();
    let out = f.root.join("refused");
    let _ = std::fs::remove_dir_all(&out);
    // A tokenizer that is not byte-level (whitespace pre-tokenizer, no decoder).
    let whitespace = f.root.join("whitespace-tokenizer");
    std::fs::create_dir_all(&whitespace).unwrap();
    let mut tokenizer: Value =
        serde_json::from_slice(&std::fs::read(f.teacher.join("tokenizer.json")).unwrap()).unwrap();
    tokenizer["pre_tokenizer"] = json!({"type": "Whitespace"});
    tokenizer["decoder"] = Value::Null;
    std::fs::write(whitespace.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let base = |teacher: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            f.model.to_str().unwrap(),
            "--teacher-model",
            teacher.to_str().unwrap(),
            "--data",
            f.train.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec()
    };
    let refused = |teacher: &Path, extra: &[&str], want: &str| {
        let mut args = base(teacher);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        rlhf_tests::assert_refused(&run_bin(env!("CARGO_BIN_EXE_sft"), &args, &[]), want);
    };
    let uld = "--use-uld-loss";
    for (extra, want) in [
        (&[][..], "its vocabulary has 400 tokens, the student's 320; the teacher must share the student's tokenizer (or give --use-uld-loss"),
        (&[uld, "--seq-kd"][..], "--seq-kd trains on the teacher's samples"),
        (&[uld, "--tool-command", "cat"][..], "--tool-command with --use-uld-loss is not supported"),
        (&[uld, "--distillation-objective", "iw_opd"][..], "--distillation-objective iw_opd reads the teacher's log-prob"),
        (&[uld, "--packing", "--lmbda", "0"][..], "--packing or --eval-packing with --use-uld-loss is not supported"),
        (&[uld, "--eval-packing", "true"][..], "--packing or --eval-packing with --use-uld-loss is not supported"),
        (&[uld, "--uld-use-hybrid-loss", "--uld-hybrid-matched-weight", "1"][..], "--uld-hybrid-matched-weight and --uld-hybrid-unmatched-weight go together"),
        (&[uld, "--uld-hybrid-matched-weight", "1", "--uld-hybrid-unmatched-weight", "1"][..], "apply with --uld-use-hybrid-loss"),
        (&[uld, "--uld-teacher-temperature", "0"][..], "must be > 0"),
        (&[uld, "--distillation-temperature", "0.7"][..], "--distillation-temperature applies to the generalized JSD"),
        (&["--uld-use-hybrid-loss"][..], "the --uld-* and --use-extended-uld options apply with --use-uld-loss"),
        (&[uld, "--teacher-tokenizer-name-or-path", whitespace.to_str().unwrap()][..], "the teacher's tokenizer is not a byte-level BPE tokenizer"),
    ] {
        refused(&f.teacher, extra, want);
    }
    // Positional alignment needs no byte offsets: a tokenizer that is not byte-level works.
    let positional = f.root.join("positional");
    let mut args = base(&f.teacher);
    args[8] = positional.to_str().unwrap().to_string();
    let extra = [
        uld,
        "--teacher-tokenizer-name-or-path",
        whitespace.to_str().unwrap(),
        "--use-extended-uld",
        "false",
        "--lmbda",
        "0",
        "--max-steps",
        "1",
        "--overwrite",
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    sft(&args);
    assert!(!out.exists(), "a refused run created its output directory");
}

/// Data parallel: two torchrun ranks of 4 rows train what one process trains with 8 (the
/// step's loss is the mean over every rank's rows): the same losses, matched and
/// unmatched parts, gradient norms and weights.
#[test]
fn two_ranks_distill_what_one_process_distills() {
    let f = fixture();
    let (one, two) = (f.root.join("dp-one"), f.root.join("dp-two"));
    let options = |batch: &'static str| {
        vec![
            "--uld-use-hybrid-loss",
            "--uld-crossentropy-weight",
            "0.3",
            "--lmbda",
            "1",
            "--max-new-tokens",
            "10",
            "--max-steps",
            "2",
            "--batch-size",
            batch,
            "--dist-timeout",
            "120",
        ]
    };
    gold(&f.model, &f.teacher, &one, &options("8"));
    let mut args = gold_args(&f.model, &f.teacher, &two);
    args.extend(options("4"));
    let out = rlhf_tests::torchrun(env!("CARGO_BIN_EXE_sft"), 2, &args, &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "torchrun failed:\n{log}");
    let keys = [
        "train/loss",
        "train/grad_norm",
        "matched_loss",
        "unmatched_loss",
    ];
    rlhf_tests::assert_trains_like(&one, &two, common::Head::Lm, (&keys, 0.0), 2);
}
