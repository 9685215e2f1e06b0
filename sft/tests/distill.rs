//! `sft train --teacher-model`: knowledge distillation as TRL's GKDTrainer does it. The
//! loss is TRL's generalized JSD (against `transformers`), on-policy steps train on the
//! student's samples and resume exactly, and a student distilled from a teacher that knows
//! the task learns it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::Head;
use rlhf_tests::{cage_rows, ok, read_jsonl, run_bin, run_python};
use serde_json::{json, Value};

struct Fixture {
    root: PathBuf,
    /// The tiny Llama the student starts from.
    model: PathBuf,
    /// The same model with noise on every weight: a teacher that differs everywhere.
    noisy: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sft-distill");
        rlhf_tests::tiny_llama_fixture(&root);
        let (model, noisy) = (root.join("model"), root.join("noisy"));
        run_python(
            "dpo_reference.py",
            &[
                "perturb",
                "--model",
                model.to_str().unwrap(),
                "--out",
                noisy.to_str().unwrap(),
                "--scale",
                "0.05",
            ],
        );
        let (train, eval) = (root.join("train.jsonl"), root.join("eval.jsonl"));
        std::fs::write(&train, cage_rows(0..24)).unwrap();
        std::fs::write(&eval, cage_rows(100..108)).unwrap();
        Fixture {
            root,
            model,
            noisy,
            train,
            eval,
        }
    })
}

fn sft(args: &[&str]) -> Value {
    ok(&run_bin(env!("CARGO_BIN_EXE_sft"), args, &[]))
}

/// `sft train`'s arguments: `student` distilled from `teacher` on the fixture's rows into
/// `out`, on the CPU, seed 5.
fn distill_args<'a>(student: &'a Path, teacher: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        student.to_str().unwrap(),
        "--teacher-model",
        teacher.to_str().unwrap(),
        "--data",
        fixture().train.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--seed",
        "5",
    ]
}

/// `sft train` of `student` from `teacher` on the fixture's rows, to `out`.
fn distill(student: &Path, teacher: &Path, out: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = distill_args(student, teacher, out);
    args.push("--overwrite");
    args.extend_from_slice(extra);
    sft(&args);
    read_jsonl(&out.join("metrics.jsonl"))
}

/// Step 1's loss over all 24 rows (one batch, the data's completions: `--lmbda 0`) is
/// TRL's `generalized_jsd_loss` of the student and the teacher computed by `transformers`
/// on the same tokens (1e-4), at β = 0 (forward KL), 0.5 and 1 (reverse KL); and with
/// `--distillation-objective iw_opd`, TRL's own `IWOPDTrainer._compute_iw_opd_loss` at
/// γ 0.5 and temperature 1 (its defaults) and at γ 2 and temperature 0.7. The same rows
/// as eval data get the JSD as `eval/distillation_loss`.
#[test]
fn the_loss_is_trls_generalized_jsd() {
    let f = fixture();
    let prepared = rlhf_tests::sft_rows(&f.model, &f.train, 1024);
    let rows: Vec<Value> = prepared
        .iter()
        .map(|r| json!({"ids": r.ids, "mask": r.loss_mask}))
        .collect();
    let rows_path = f.root.join("rows.json");
    std::fs::write(&rows_path, Value::from(rows).to_string()).unwrap();
    // β, and β 0.5 with both distributions at temperature 0.7 (`--distillation-temperature`,
    // TRL's DistillationTrainer's divergence at its `temperature`).
    let betas = ["0", "0.5", "1", "0.5@0.7"];
    let expected = run_python(
        "gkd_reference.py",
        &[
            "--student",
            f.model.to_str().unwrap(),
            "--teacher",
            f.noisy.to_str().unwrap(),
            "--rows",
            rows_path.to_str().unwrap(),
            "--betas",
            &betas.join(","),
            "--iw-opd",
            "0.5:1,2:0.7",
        ],
    );
    // Step 1's metrics on the data's completions, all 24 rows in one batch, with `options`.
    // The step at a negligible learning rate, then the same rows as eval data: their
    // `eval/distillation_loss` is the loss the step had.
    let eval = ["--eval-data", f.train.to_str().unwrap(), "--lr", "1e-12"];
    let first_step = |name: String, options: &[&str]| {
        let step = [
            &["--lmbda", "0", "--batch-size", "24", "--max-steps", "1"][..],
            &eval,
        ]
        .concat();
        let m = distill(
            &f.model,
            &f.noisy,
            &f.root.join(name),
            &[options, &step].concat(),
        );
        assert_eq!(m[0]["train/on_policy"].as_f64(), Some(0.0));
        m[0].clone()
    };
    for (beta, want) in betas.iter().zip(expected["losses"].as_array().unwrap()) {
        let (b, temperature) = beta.split_once('@').unwrap_or((beta, "1"));
        let options = ["--beta", b, "--distillation-temperature", temperature];
        let m = first_step(format!("jsd-{beta}"), &options);
        let (got, want) = (m["train/loss"].as_f64().unwrap(), want.as_f64().unwrap());
        assert!(want > 1e-3, "β {beta}: the teacher hardly differs ({want})");
        assert!((got - want).abs() < 1e-4, "β {beta}: {got} vs {want}");
        let eval = m["eval/distillation_loss"].as_f64().unwrap();
        assert!(
            (eval - want).abs() < 1e-4,
            "β {beta} eval: {eval} vs {want}"
        );
        if temperature == "1" {
            // TRL's DistillationTrainer `entropy`: the student's, over the same tokens.
            let (got, want) = (
                m["entropy"].as_f64().unwrap(),
                expected["sft"]["entropy"].as_f64().unwrap(),
            );
            assert!(
                (got - want).abs() < 1e-4,
                "β {beta} entropy: {got} vs {want}"
            );
        }
    }
    // Plain SFT on the same rows logs TRL's SFTTrainer token metrics of them, and its
    // running token count.
    let out = f.root.join("sft-metrics");
    let (student, data) = (f.model.to_str().unwrap(), f.train.to_str().unwrap());
    sft(&[
        "train",
        "--model",
        student,
        "--data",
        data,
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--overwrite",
        "--batch-size",
        "24",
        "--max-steps",
        "1",
    ]);
    let m = &read_jsonl(&out.join("metrics.jsonl"))[0];
    for key in ["entropy", "mean_token_accuracy"] {
        let (got, want) = (
            m[key].as_f64().unwrap(),
            expected["sft"][key].as_f64().unwrap(),
        );
        assert!((got - want).abs() < 1e-4, "SFT {key}: {got} vs {want}");
    }
    let tokens: usize = prepared.iter().map(|r| r.ids.len()).sum();
    assert_eq!(m["num_tokens"].as_f64(), Some(tokens as f64));
    let iw_opd = expected["iw_opd"].as_array().unwrap();
    for ((gamma, temperature), want) in [("0.5", "1"), ("2", "0.7")].into_iter().zip(iw_opd) {
        let options = [
            "--distillation-objective",
            "iw_opd",
            "--iw-opd-gamma",
            gamma,
            "--temperature",
            temperature,
        ];
        let m = first_step(format!("iw-opd-{gamma}"), &options);
        assert!(
            want["loss"].as_f64().unwrap().abs() > 1e-3,
            "γ {gamma}: the teacher hardly differs ({want})"
        );
        // The loss, and what TRL logs of it.
        for (ours, theirs) in [
            ("train/loss", "loss"),
            ("iw_opd/mean_advantage", "iw_opd/mean_advantage"),
            ("iw_opd/mean_abs_advantage", "iw_opd/mean_abs_advantage"),
            ("iw_opd/mean_weight", "iw_opd/mean_weight"),
            ("iw_opd/min_weight", "iw_opd/min_weight"),
            ("iw_opd/max_weight", "iw_opd/max_weight"),
        ] {
            let (got, want) = (m[ours].as_f64().unwrap(), want[theirs].as_f64().unwrap());
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "IW-OPD γ {gamma}, temperature {temperature}, {ours}: {got} vs {want}"
            );
        }
    }
}

/// On-policy steps (`--lmbda 1`) train on the student's samples: every step says so, the
/// weights move otherwise than on the data's completions, and a run killed mid-step
/// resumes to the uninterrupted weights (the samples come from the run's seed and step);
/// `--seq-kd` trains on the teacher's samples.
#[test]
fn on_policy_steps_sample_the_student_and_resume_exactly() {
    let f = fixture();
    let common = [
        "--lmbda",
        "1",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--save-every",
        "2",
    ];
    let straight = f.root.join("on-policy");
    let m = distill(&f.model, &f.noisy, &straight, &common);
    assert!(m.iter().all(|r| r["train/on_policy"].as_f64() == Some(1.0)));
    let killed = f.root.join("on-policy-killed");
    let mut args = distill_args(&f.model, &f.noisy, &killed);
    args.extend_from_slice(&common);
    let o = run_bin(
        env!("CARGO_BIN_EXE_sft"),
        &args,
        &[("RLHF_CRASH_AT", "mid-step@3")],
    );
    assert!(!o.status.success(), "the crash point was not reached");
    args.push("--resume");
    sft(&args);
    let diff =
        rlhf_tests::max_weight_diff(&straight.join("final"), &killed.join("final"), Head::Lm);
    assert!(diff < 1e-6, "resumed on-policy run differs by {diff:e}");

    // Prompt-only rows (TRL's DistillationTrainer data) train as rows whose completions
    // are never read: the same weights as the rows' prompts with an EOS for completion.
    let prompts_only = f.root.join("prompts-only.jsonl");
    let empty = f.root.join("eos-completions.jsonl");
    let rows = read_jsonl(&f.train);
    let write = |path: &Path, with_completion: bool| {
        let text: String = rows
            .iter()
            .map(|r| {
                let row = match with_completion {
                    true => json!({"prompt": r["prompt"], "completion": "<|endoftext|>"}),
                    false => json!({"prompt": r["prompt"]}),
                };
                row.to_string() + "\n"
            })
            .collect();
        std::fs::write(path, text).unwrap();
    };
    write(&prompts_only, false);
    write(&empty, true);
    let finals: Vec<PathBuf> = [&prompts_only, &empty]
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let out = f.root.join(format!("on-policy-prompts-{i}"));
            let mut args = distill_args(&f.model, &f.noisy, &out);
            args[6] = data.to_str().unwrap();
            args.push("--overwrite");
            args.extend_from_slice(&common[..6]);
            args.extend(["--max-steps", "2"]);
            sft(&args);
            out.join("final")
        })
        .collect();
    let diff = rlhf_tests::max_weight_diff(&finals[0], &finals[1], Head::Lm);
    assert_eq!(diff, 0.0, "prompt-only rows trained otherwise");
    let moved = rlhf_tests::max_weight_diff(&f.model, &finals[0], Head::Lm);
    assert!(moved > 1e-5, "prompt-only rows trained nothing");

    let offline = f.root.join("off-policy");
    let mut data_args = common.to_vec();
    data_args[1] = "0";
    distill(&f.model, &f.noisy, &offline, &data_args);
    let diff =
        rlhf_tests::max_weight_diff(&straight.join("final"), &offline.join("final"), Head::Lm);
    assert!(
        diff > 1e-5,
        "on-policy and data completions trained alike: {diff:e}"
    );
    let seq_kd = f.root.join("seq-kd");
    let mut teacher_args = data_args.clone();
    teacher_args.push("--seq-kd");
    let m = distill(&f.model, &f.noisy, &seq_kd, &teacher_args);
    assert!(m.iter().all(|r| r["train/on_policy"].as_f64() == Some(0.0)));
    let diff = rlhf_tests::max_weight_diff(&offline.join("final"), &seq_kd.join("final"), Head::Lm);
    assert!(
        diff > 1e-5,
        "the teacher's samples trained as the data: {diff:e}"
    );
    // IW-OPD on the student's samples: the same samples at step 1 (the same seed), another
    // objective, other weights.
    let iw_opd = f.root.join("on-policy-iw-opd");
    let objective = ["--distillation-objective", "iw_opd"];
    let m = distill(
        &f.model,
        &f.noisy,
        &iw_opd,
        &[&common[..], &objective].concat(),
    );
    assert!(m.iter().all(|r| r["train/on_policy"].as_f64() == Some(1.0)));
    assert!(m
        .iter()
        .all(|r| r["train/loss"].as_f64().is_some_and(f64::is_finite)));
    let diff =
        rlhf_tests::max_weight_diff(&straight.join("final"), &iw_opd.join("final"), Head::Lm);
    assert!(diff > 1e-5, "IW-OPD trained as GKD's JSD: {diff:e}");
}

/// Data parallel: two torchrun ranks of 4 rows, each sampling its rows with the numbers
/// they have in the step, train what one process trains with 8 on-policy (the same
/// samples, losses, gradient norms and weights, 1e-5).
#[test]
fn two_ranks_distill_what_one_process_distills() {
    let f = fixture();
    let (one, two) = (f.root.join("dp-one"), f.root.join("dp-two"));
    let options = |batch: &'static str| {
        vec![
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
    distill(&f.model, &f.noisy, &one, &options("8"));
    let mut args = distill_args(&f.model, &f.noisy, &two);
    args.push("--overwrite");
    args.extend(options("4"));
    let out = rlhf_tests::torchrun(env!("CARGO_BIN_EXE_sft"), 2, &args, &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "torchrun failed:\n{log}");
    let keys = ["train/loss", "train/grad_norm", "train/on_policy"];
    rlhf_tests::assert_trains_like(&one, &two, Head::Lm, (&keys, 0.0), 2);
}

/// Held-out NLL (eval/loss) of `model` on the fixture's eval rows.
fn eval_nll(model: &Path) -> f64 {
    rlhf_tests::sft_eval_loss(env!("CARGO_BIN_EXE_sft"), model, &fixture().eval)
}

/// A teacher fine-tuned on the task, and a student distilled from it with TRL's defaults
/// (β 0.5, λ 0.5: half the steps on the student's own samples): the student's held-out
/// NLL closes most of the gap from its start to the teacher's.
#[test]
fn a_distilled_student_learns_what_the_teacher_knows() {
    let f = fixture();
    let teacher = rlhf_tests::sft_teacher(
        env!("CARGO_BIN_EXE_sft"),
        &f.model,
        &f.train,
        &f.root.join("teacher"),
    );
    let out = f.root.join("student");
    let m = distill(
        &f.model,
        &teacher,
        &out,
        &[
            "--lr",
            "3e-3",
            "--batch-size",
            "8",
            "--epochs",
            "8",
            "--max-new-tokens",
            "16",
        ],
    );
    let on_policy = m
        .iter()
        .filter(|r| r["train/on_policy"].as_f64() == Some(1.0))
        .count();
    assert!(
        on_policy > 0 && on_policy < m.len(),
        "{on_policy} of {} steps on-policy",
        m.len()
    );
    let (start, taught, student) = (
        eval_nll(&f.model),
        eval_nll(&teacher),
        eval_nll(&out.join("final")),
    );
    assert!(
        student < taught + 0.25 * (start - taught),
        "held-out NLL: start {start:.3}, teacher {taught:.3}, student {student:.3}"
    );
}

/// TRL's DistillationTrainer sampling options reach the student's samples: with `--top-k
/// 1` they are its greedy ones, so two seeds train the same weights (within summation
/// order); plain sampling at two seeds does not.
#[test]
fn sampling_options_reach_the_samples() {
    let f = fixture();
    let run = |tag: &str, seed: &'static str, extra: &[&str]| {
        let out = f.root.join(format!("sampling-{tag}-{seed}"));
        let mut args = distill_args(&f.model, &f.noisy, &out);
        let at = args.iter().position(|a| *a == "--seed").unwrap();
        args[at + 1] = seed;
        let step = [
            "--lmbda",
            "1",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "24",
        ];
        args.extend_from_slice(&step);
        args.extend_from_slice(&["--max-steps", "1", "--overwrite"]);
        args.extend_from_slice(extra);
        sft(&args);
        out.join("final")
    };
    let greedy = ["--top-k", "1"];
    let diff = rlhf_tests::max_weight_diff(
        &run("greedy", "5", &greedy),
        &run("greedy", "6", &greedy),
        Head::Lm,
    );
    assert!(diff < 1e-6, "greedy samples differ across seeds: {diff:e}");
    let diff = rlhf_tests::max_weight_diff(
        &run("sampled", "5", &[]),
        &run("sampled", "6", &[]),
        Head::Lm,
    );
    assert!(diff > 1e-5, "sampled runs agree across seeds: {diff:e}");
}

/// Bad distillation options stop the run with one line before anything is written.
#[test]
fn bad_distillation_options_are_refused_with_one_line() {
    let f = fixture();
    let out = f.root.join("refused");
    let _ = std::fs::remove_dir_all(&out);
    for (extra, want) in [
        (&["--beta", "1.5"][..], "--beta must be in [0, 1]"),
        (&["--lmbda=-0.1"][..], "--lmbda must be in [0, 1]"),
        (
            &["--loss-type", "dft"][..],
            "--loss-type dft with --teacher-model",
        ),
        (&["--packing"][..], "--packing with sampled completions"),
        (
            &["--tool-command", "cat", "--lmbda", "0"][..],
            "--tool-command runs the tool calls of sampled completions",
        ),
        (
            &["--tool-timeout", "0", "--tool-command", "cat"][..],
            "--tool-timeout must be > 0",
        ),
    ] {
        let mut args = distill_args(&f.model, &f.noisy, &out);
        args.extend_from_slice(extra);
        rlhf_tests::assert_refused(&run_bin(env!("CARGO_BIN_EXE_sft"), &args, &[]), want);
    }
    // Prompt-only rows where some step would read the data's completions (--lmbda 0.5).
    let prompts = f.root.join("refused-prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"There are 3 heads\"}\n").unwrap();
    let mut args = distill_args(&f.model, &f.noisy, &out);
    args[6] = prompts.to_str().unwrap();
    rlhf_tests::assert_refused(
        &run_bin(env!("CARGO_BIN_EXE_sft"), &args, &[]),
        "prompt-only rows (\"prompt\" without \"completion\") have nothing to learn from",
    );
    // The teacher's options without a teacher: clap names the missing option.
    let o = run_bin(
        env!("CARGO_BIN_EXE_sft"),
        &[
            "train",
            "--model",
            "m",
            "--data",
            "d",
            "--output-dir",
            "o",
            "--lmbda",
            "1",
        ],
        &[],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--teacher-model"));
    assert!(!out.exists(), "a refused run created its output directory");
}

/// A Hermes-style ChatML template with tool calls (`<tool_call>` JSON blocks, results as
/// `<tool_response>` in a user turn, as Qwen2.5's), prefix-preserving.
const TOOL_TEMPLATE: &str = r#"{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
{{- '<|im_start|>assistant' }}
{%- for tc in message.tool_calls %}
{{- '\n<tool_call>\n{"name": "' + tc.function.name + '", "arguments": ' + (tc.function.arguments | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}"#;

/// Tools in on-policy samples (TRL's `DistillationTrainer(tools=…)`): a student taught (by
/// SFT on one conversation) to call `calc` samples calls, the tool program runs them, the
/// results are spliced in and the student continues; `--log-completions` writes the samples
/// with their tool masks, and step 1's loss is TRL's generalized JSD over the sampled
/// tokens only (the results' tokens read by both models but out of the loss), 1e-4.
#[test]
fn on_policy_samples_call_tools_whose_results_stay_out_of_the_loss() {
    let f = fixture();
    let root = f.root.join("tools");
    std::fs::create_dir_all(&root).unwrap();
    let template = root.join("hermes.jinja");
    std::fs::write(&template, TOOL_TEMPLATE).unwrap();
    let prompt = json!({"prompt": [{"role": "user", "content": "35 heads, 94 legs: rabbits?"}]});
    let prompts: String = (0..4).map(|_| format!("{prompt}\n")).collect();
    std::fs::write(root.join("prompts.jsonl"), prompts).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let taught = root.join("taught");
    let mut teaching = vec!["train".to_string()];
    teaching.extend(rlhf_tests::calc_teaching_args(
        &root, &f.model, &template, &taught,
    ));
    sft(&teaching.iter().map(String::as_str).collect::<Vec<_>>());
    let student = taught.join("final");
    let log = root.join("calls.jsonl");
    let _ = std::fs::remove_file(&log);
    let command = rlhf_tests::python_program(&root, "calc.py", rlhf_tests::CALC_PROGRAM, &[&log]);
    let out = root.join("distilled");
    let prompts = root.join("prompts.jsonl");
    let mut args = distill_args(&student, &f.noisy, &out);
    args[6] = prompts.to_str().unwrap();
    args.extend([
        "--overwrite",
        "--lmbda",
        "1",
        "--tool-command",
        &command,
        "--log-completions",
        "--max-new-tokens",
        "128",
        "--eos-token",
        "<|im_end|>",
        "--batch-size",
        "4",
        "--max-steps",
        "1",
    ]);
    sft(&args);
    let m = &read_jsonl(&out.join("metrics.jsonl"))[0];
    assert!(m["tools/call_frequency"].as_f64().unwrap() >= 0.5, "{m}");
    assert_eq!(m["tools/failure_frequency"].as_f64(), Some(0.0), "{m}");
    let calls = read_jsonl(&log);
    assert_eq!(
        calls[0],
        json!({"name": "calc", "arguments": {"expr": "(94-70)/2"}})
    );
    // The samples as written, each a row whose loss is on its sampled tokens only.
    let samples = read_jsonl(&out.join("samples.jsonl"));
    assert_eq!(samples.len(), 4);
    let mut spliced = 0;
    let rows: Vec<Value> = samples
        .iter()
        .map(|x| {
            let ids = |k: &str| -> Vec<i64> { serde_json::from_value(x[k].clone()).unwrap() };
            let (prompt, completion, mask) =
                (ids("prompt_ids"), ids("completion_ids"), ids("tool_mask"));
            assert_eq!(completion.len(), mask.len());
            spliced += usize::from(mask.windows(2).any(|w| w == [1, 0]));
            let full_mask: Vec<i64> = std::iter::repeat_n(0, prompt.len()).chain(mask).collect();
            let all = [prompt, completion].concat();
            json!({"ids": all, "mask": full_mask})
        })
        .collect();
    assert!(
        spliced > 0,
        "no sample has a tool result inside: {samples:?}"
    );
    let rows_path = root.join("rows.json");
    std::fs::write(&rows_path, Value::from(rows).to_string()).unwrap();
    let expected = run_python(
        "gkd_reference.py",
        &[
            "--student",
            &s(&student),
            "--teacher",
            &s(&f.noisy),
            "--rows",
            &s(&rows_path),
            "--betas",
            "0.5",
        ],
    );
    let (got, want) = (
        m["train/loss"].as_f64().unwrap(),
        expected["losses"][0].as_f64().unwrap(),
    );
    assert!((got - want).abs() < 1e-4, "{got} vs {want}");
}
