//! SDFT (`ppo train --advantage-estimator sdft`, TRL's experimental SDFTTrainer) on a tiny
//! Llama: the step's loss and TRL's `distillation_loss` equal TRL's own loss functions run
//! by `transformers` on the same samples (every objective, with and without the tail bucket,
//! skipped tokens and a temperature); the teacher prompts are TRL's; no reward is needed; the
//! policy moves towards its teacher; bad options and rows are refused in one line. (A killed
//! run with an EMA teacher resuming exactly is a case of `grpo.rs`'s resume test.)

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::Head;
use ppo::train::{run, TrainArgs};
use rlhf_tests::{read_jsonl, run_python};
use serde_json::Value;

struct Fixture {
    root: PathBuf,
    policy: PathBuf,
    prompts: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdft");
        rlhf_tests::tiny_llama_fixture(&root);
        let prompts = root.join("prompts.jsonl");
        // 鸡兔同笼 rows whose privileged context is the worked answer.
        let lines: String = (0..8)
            .map(|i| {
                let (heads, legs) = (i + 10, 2 * (i + 10) + 2 * (i + 1));
                // (`answer` and `id` for the reward program of the SDPO test.)
                let row = serde_json::json!({
                    "prompt": format!("There are {heads} heads and {legs} legs"),
                    "privileged_context": format!("So {} rabbits", i + 1),
                    "answer": format!("{}", i + 1),
                    "id": i,
                });
                format!("{row}\n")
            })
            .collect();
        std::fs::write(&prompts, lines).unwrap();
        // The same as conversations: a system turn, then the user's.
        let chat: String = read_jsonl(&prompts)
            .iter()
            .map(|r| {
                let messages = serde_json::json!([
                    {"role": "system", "content": "Count the animals."},
                    {"role": "user", "content": r["prompt"]},
                ]);
                let row = serde_json::json!({"prompt": messages,
                    "privileged_context": r["privileged_context"]});
                format!("{row}\n")
            })
            .collect();
        std::fs::write(root.join("chat.jsonl"), chat).unwrap();
        Fixture {
            policy: root.join("model"),
            root,
            prompts,
        }
    })
}

/// SDFT over 4 prompts × 2 responses an iteration, one optimiser step each, no reward.
fn args(out: &Path, extra: &[&str]) -> TrainArgs {
    let f = fixture();
    let mut argv: Vec<String> = [
        "--policy",
        f.policy.to_str().unwrap(),
        "--prompts",
        f.prompts.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--overwrite",
        "--device",
        "cpu",
        "--advantage-estimator",
        "sdft",
        "--num-generations",
        "2",
        "--rollout-batch-size",
        "4",
        "--response-length",
        "10",
        "--ppo-epochs",
        "1",
        "--num-minibatches",
        "1",
        "--lr",
        "1e-3",
        "--schedule",
        "constant",
        "--seed",
        "7",
    ]
    .map(str::to_string)
    .to_vec();
    argv.extend(extra.iter().map(|s| s.to_string()));
    rlhf_tests::parse_args(&argv)
}

/// Step 1 of each objective: `loss/policy_avg` (each response's mean over its loss tokens,
/// averaged) and `self_distillation/distillation_loss` (the mean over every loss token)
/// equal TRL's `loss_utils` on the logged samples, run by `transformers` (1e-4), also with
/// the responses sampled after the teacher's prompt (`--generate-from-teacher`); the
/// teacher prompts in `samples.jsonl` are TRL's `_compose_teacher_prompt`'s. No reward
/// source is given, and none is logged.
#[test]
fn the_loss_is_trls() {
    let f = fixture();
    let chat = f.root.join("chat.jsonl");
    let cases: [(&str, &[&str], &[&str]); 6] = [
        (
            "chat",
            &["--distillation-topk", "5"],
            &["--mode", "topk_logits", "--topk", "5", "--alpha", "0.5"],
        ),
        (
            "topk",
            &["--distillation-topk", "5"],
            &["--mode", "topk_logits", "--topk", "5", "--alpha", "0.5"],
        ),
        (
            "from-teacher",
            &[
                "--distillation-topk",
                "5",
                "--generate-from-teacher",
                "--eval-prompts",
                f.prompts.to_str().unwrap(),
            ],
            &["--mode", "topk_logits", "--topk", "5", "--alpha", "0.5"],
        ),
        (
            "tail",
            &[
                "--distillation-topk",
                "7",
                "--distillation-add-tail",
                "--distillation-alpha",
                "0.3",
                "--num-loss-tokens-to-skip",
                "2",
                "--temperature",
                "0.8",
            ],
            &[
                "--mode",
                "topk_logits",
                "--topk",
                "7",
                "--add-tail",
                "--alpha",
                "0.3",
                "--skip",
                "2",
                "--temperature",
                "0.8",
            ],
        ),
        (
            "full",
            &[
                "--distillation-mode",
                "full_logits",
                "--distillation-alpha",
                "0",
            ],
            &["--mode", "full_logits", "--alpha", "0"],
        ),
        (
            "sampled",
            &[
                "--distillation-mode",
                "sampled_token",
                "--distillation-alpha",
                "1",
                "--teacher-prompt-template",
                "Hint: {privileged_context}. {prompt}",
            ],
            &[
                "--mode",
                "sampled_token",
                "--alpha",
                "1",
                "--template",
                "Hint: {privileged_context}. {prompt}",
            ],
        ),
    ];
    for (tag, ours, theirs) in cases {
        let out = f.root.join(format!("loss-{tag}"));
        let step = [
            "--max-steps",
            "1",
            "--sample-every",
            "1",
            "--num-samples",
            "8",
        ];
        let mut a = args(&out, &[ours, &step[..]].concat());
        // Conversations: the teacher's user turn replaces the last one, in the template.
        let prompts = if tag == "chat" { &chat } else { &f.prompts };
        a.prompts = prompts.clone();
        run(&a).unwrap();
        let m = &read_jsonl(&out.join("metrics.jsonl"))[0];
        let samples = out.join("samples.jsonl");
        let mut reference = vec![
            "--model",
            f.policy.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--samples",
            samples.to_str().unwrap(),
        ];
        if !theirs.contains(&"--temperature") {
            // Our default sampling temperature, which the logits are divided by.
            reference.extend(["--temperature", "1.0"]);
        }
        reference.extend_from_slice(theirs);
        let want = run_python("sdft_reference.py", &reference);
        let loss = want["loss"].as_f64().unwrap();
        assert!(
            loss.abs() > 1e-3,
            "{tag}: the teacher hardly differs ({loss})"
        );
        let keys = [
            ("loss/policy_avg", "loss"),
            ("self_distillation/distillation_loss", "distillation_loss"),
            ("sdft/distillation_loss", "distillation_loss"),
        ];
        assert_trls(tag, (m, &want), &keys, (&samples, 8));
        assert!(m.get("reward").is_none() && m.get("objective/scores").is_none());
        if tag == "from-teacher" {
            // Evaluated on responses sampled after the teacher's prompts, as TRL's.
            let held_out = m["eval/sdft/distillation_loss"].as_f64().unwrap();
            assert!(held_out.is_finite() && held_out > 0.0, "{held_out}");
        }
    }
    // Sampled after the teacher's prompt, the same seed samples other responses.
    let responses = |tag: &str| -> Vec<Value> {
        read_jsonl(&f.root.join(format!("loss-{tag}/samples.jsonl")))
            .iter()
            .map(|l| l["completion_ids"].clone())
            .collect()
    };
    assert_ne!(responses("topk"), responses("from-teacher"));
}

/// Trained against its base teacher, the policy comes closer to it: on the first step's
/// samples, TRL's distillation loss of the trained policy (by `transformers`) is well
/// below the starting policy's, and the loss on the evaluation's samples falls. The live teacher (the policy itself) and the EMA teacher
/// train otherwise than the base one.
#[test]
fn the_policy_moves_towards_its_teacher() {
    let f = fixture();
    let train = |tag: &str, extra: &[&str]| {
        let out = f.root.join(format!("train-{tag}"));
        let common = ["--max-steps", "12", "--distillation-topk", "20"];
        let mut a = args(&out, &[&common[..], extra].concat());
        a.optim.lr = 3e-4;
        run(&a).unwrap();
        out
    };
    let prompts = f.prompts.to_str().unwrap();
    let held_out = ["--eval-prompts", prompts, "--eval-every", "1"];
    let logged = ["--sample-every", "100", "--num-samples", "8"];
    let base = train("base", &[&held_out[..], &logged].concat());
    let samples = base.join("samples.jsonl");
    let distance = |student: &Path| {
        let out = run_python(
            "sdft_reference.py",
            &[
                "--model",
                f.policy.to_str().unwrap(),
                "--student",
                student.to_str().unwrap(),
                "--prompts",
                f.prompts.to_str().unwrap(),
                "--samples",
                samples.to_str().unwrap(),
                "--topk",
                "20",
            ],
        );
        out["distillation_loss"].as_f64().unwrap()
    };
    // The held-out loss (here on the training prompts) falls too, after the first step
    // and after the last.
    let held_out: Vec<f64> = read_jsonl(&base.join("metrics.jsonl"))
        .iter()
        .map(|r| {
            r["eval/self_distillation/distillation_loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(held_out.len(), 12);
    assert!(held_out[11] < held_out[0], "{held_out:?}");
    let (before, after) = (distance(&f.policy), distance(&base.join("final")));
    // (this seed: 0.026 → 0.013)
    assert!(after < 0.7 * before, "distillation loss {before} → {after}");
    for kind in ["live", "ema"] {
        let out = train(
            kind,
            &["--teacher-model-kind", kind, "--teacher-update-rate", "0.5"],
        );
        let diff = rlhf_tests::max_weight_diff(&base.join("final"), &out.join("final"), Head::Lm);
        assert!(diff > 1e-6, "the {kind} teacher trained as the base one");
    }
}

/// SDPO (`--advantage-estimator sdpo`, TRL's SDPOTrainer), step 1 of 4 prompts × 4
/// responses scored by a reward program: the teacher prompts are the ones TRL's own
/// `SuccessfulRolloutTeacherContextBuilder` builds from the same scores, and the loss, its
/// GRPO and distillation parts and TRL's `self_distillation/*_fraction` metrics are TRL's
/// (1e-4): with TRL's defaults (sampled_token, α 1, the distillation alone), with the
/// teacher prompts cut to their last 12 tokens (`--max-reprompt-len`), and blended half
/// and half over the full vocabulary with the rows' feedback shown too.
#[test]
fn sdpo_is_trls() {
    let f = fixture();
    let program = digit_reward();
    let cases: [(&str, &[&str], &[&str]); 3] = [
        ("sdpo", &[], &[]),
        // Teacher prompts cut to their last 12 tokens (TRL's `max_reprompt_len`).
        (
            "sdpo-capped",
            &["--max-reprompt-len", "12"],
            &["--max-reprompt-len", "12"],
        ),
        (
            "sdpo-blend",
            &[
                "--distillation-weight",
                "0.5",
                "--include-environment-feedback",
                "--distillation-mode",
                "full_logits",
                "--distillation-alpha",
                "0.5",
                "--eval-prompts",
                f.prompts.to_str().unwrap(),
            ],
            &[
                "--weight",
                "0.5",
                "--include-feedback",
                "--mode",
                "full_logits",
                "--alpha",
                "0.5",
            ],
        ),
    ];
    for (tag, ours, theirs) in cases {
        let out = f.root.join(format!("loss-{tag}"));
        let step = [
            "--max-steps",
            "1",
            "--sample-every",
            "1",
            "--num-samples",
            "16",
        ];
        let threshold = ["--success-reward-threshold", "0.3"];
        let mut a = args(&out, &[ours, &step[..], &threshold[..]].concat());
        a.advantage_estimator = "sdpo".parse().unwrap();
        a.num_generations = 4;
        a.reward_command = vec![program.clone()];
        run(&a).unwrap();
        let m = &read_jsonl(&out.join("metrics.jsonl"))[0];
        if tag == "sdpo-blend" {
            // Evaluated too: the distillation on the evaluation's own groups.
            let held_out = m["eval/sdpo/distillation_loss"].as_f64().unwrap();
            assert!(held_out.is_finite() && held_out > 0.0, "{held_out}");
            assert!(m["eval/reward"].as_f64().is_some());
        }
        let samples = out.join("samples.jsonl");
        let mut reference = vec![
            "--sdpo",
            "--num-generations",
            "4",
            "--threshold",
            "0.3",
            "--temperature",
            "1.0",
            "--model",
            f.policy.to_str().unwrap(),
            "--prompts",
            f.prompts.to_str().unwrap(),
            "--samples",
            samples.to_str().unwrap(),
        ];
        reference.extend_from_slice(theirs);
        let want = run_python("sdft_reference.py", &reference);
        let share = want["self_distillation/success_sample_fraction"]
            .as_f64()
            .unwrap();
        assert!(0.0 < share && share < 1.0, "{tag}: successes {share}");
        let keys = [
            ("loss/policy_avg", "loss"),
            ("self_distillation/distillation_loss", "distillation_loss"),
            ("sdpo/distillation_loss", "distillation_loss"),
            ("self_distillation/policy_loss", "policy_loss"),
            (
                "self_distillation/success_group_fraction",
                "self_distillation/success_group_fraction",
            ),
            (
                "self_distillation/success_sample_fraction",
                "self_distillation/success_sample_fraction",
            ),
            (
                "self_distillation/feedback_used_fraction",
                "self_distillation/feedback_used_fraction",
            ),
            (
                "self_distillation/reprompt_sample_fraction",
                "self_distillation/reprompt_sample_fraction",
            ),
        ];
        assert_trls(tag, (m, &want), &keys, (&samples, 16));
    }
}

/// At `--distillation-weight 0` SDPO is GRPO: no teacher runs, and the logged GRPO part
/// is the whole loss (over two minibatches, whose rows' advantages do not cancel).
#[test]
fn sdpo_at_weight_zero_is_its_policy_loss() {
    let f = fixture();
    let out = f.root.join("sdpo-weight-0");
    let mut a = args(&out, &["--distillation-weight", "0", "--max-steps", "1"]);
    a.advantage_estimator = "sdpo".parse().unwrap();
    a.num_minibatches = 2;
    a.num_generations = 4;
    a.reward_command = vec![digit_reward()];
    run(&a).unwrap();
    let m = &read_jsonl(&out.join("metrics.jsonl"))[0];
    let (part, total) = (
        m["self_distillation/policy_loss"].as_f64().unwrap(),
        m["loss/policy_avg"].as_f64().unwrap(),
    );
    assert!(total.abs() > 1e-6, "{total}");
    assert!(
        (part - total).abs() < 1e-9 * total.abs(),
        "{part} vs {total}"
    );
}

/// `--reward-command` running `tests/python/digit_reward.py`.
fn digit_reward() -> String {
    format!(
        "'{}' '{}'",
        rlhf_tests::python().display(),
        rlhf_tests::repo_root()
            .join("tests/python/digit_reward.py")
            .display()
    )
}

/// Our step's metrics `m` equal the reference's `want` (`keys`: ours and its names, 1e-4
/// relative), and the `rows` lines of `samples` carry the reference's teacher prompts.
fn assert_trls(
    tag: &str,
    (m, want): (&Value, &Value),
    keys: &[(&str, &str)],
    (samples, rows): (&Path, usize),
) {
    for (ours, key) in keys {
        let (got, want) = (m[*ours].as_f64().unwrap(), want[*key].as_f64().unwrap());
        assert!(
            (got - want).abs() < 1e-4 * want.abs().max(0.01),
            "{tag} {ours}: {got} vs TRL's {want}"
        );
    }
    let lines = read_jsonl(samples);
    assert_eq!(lines.len(), rows, "{tag}");
    for (line, teacher) in lines
        .iter()
        .zip(want["teacher_prompts"].as_array().unwrap())
    {
        assert_eq!(line["teacher_prompt"], *teacher, "{tag}");
    }
}

/// The EMA teacher of a LoRA policy (TRL's `PEFTAdapterEMACallback`): an average of the
/// adapter's weights from zeros, so at step 1 it is the base model (the `base` teacher's
/// loss, 1e-6) and later another teacher; the checkpoint keeps it.
#[test]
fn the_ema_teacher_of_a_lora_policy_averages_its_adapter() {
    let f = fixture();
    let run = |kind: &str| {
        let out = f.root.join(format!("lora-{kind}"));
        let extra = [
            "--lora-r",
            "4",
            "--teacher-model-kind",
            kind,
            "--teacher-update-rate",
            "0.5",
            "--max-steps",
            "3",
            "--save-every",
            "2",
            "--distillation-topk",
            "10",
        ];
        let mut a = args(&out, &extra);
        a.optim.lr = 1e-2;
        run(&a).unwrap();
        let losses: Vec<f64> = read_jsonl(&out.join("metrics.jsonl"))
            .iter()
            .map(|r| r["loss/policy_avg"].as_f64().unwrap())
            .collect();
        (out, losses)
    };
    let (base_out, base) = run("base");
    let (ema_out, ema) = run("ema");
    assert!(
        (base[0] - ema[0]).abs() < 1e-6,
        "step 1: {base:?} vs {ema:?}"
    );
    assert!(
        (base[2] - ema[2]).abs() > 1e-4,
        "step 3: {base:?} vs {ema:?}"
    );
    let saved = |out: &Path| out.join("checkpoints/step-000002/teacher_adapter.safetensors");
    assert!(saved(&ema_out).exists() && !saved(&base_out).exists());
}

#[test]
fn bad_options_and_rows_are_refused_with_one_line() {
    let f = fixture();
    let out = f.root.join("bad");
    let refused_with = |estimator: &str, extra: &[&str], want: &str| {
        let mut a = args(&out, extra);
        a.advantage_estimator = estimator.parse().unwrap();
        let e = run(&a).unwrap_err().to_string();
        assert!(e.contains(want), "{estimator} {extra:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    };
    let refused = |extra: &[&str], want: &str| refused_with("sdft", extra, want);
    refused(
        &["--kl-in-loss"],
        "--advantage-estimator sdft and sdpo distil the policy",
    );
    refused(
        &["--distillation-mode", "sampled_token"],
        "--distillation-mode sampled_token is the reverse KL on the sampled token: it needs --distillation-alpha 1",
    );
    refused(
        &["--teacher-prompt-template", "{prompt} {answer}"],
        "--teacher-prompt-template: only {prompt} and {privileged_context}",
    );
    refused(
        &["--teacher-model-kind", "ema", "--prompt-tuning-tokens", "4"],
        "--teacher-model-kind ema with an adapter keeps an average of the LoRA weights alone",
    );
    refused(
        &["--reprompt-template", "{prompt}{answer}"],
        "--reprompt-template fills in {prompt}, {solution} and {feedback}",
    );
    refused(
        &["--distillation-weight", "1.5"],
        "--distillation-weight must be in [0, 1]",
    );
    refused_with(
        "sdpo",
        &["--num-loss-tokens-to-skip", "2"],
        "--num-loss-tokens-to-skip apply with --advantage-estimator sdft",
    );
    refused_with(
        "sdpo",
        &["--entropy-coef", "0.01"],
        "--advantage-estimator sdft and sdpo distil the policy",
    );
    // SDPO: a conversation whose last turn is not the user's.
    let chat = f.root.join("ends-with-assistant.jsonl");
    let row =
        r#"{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    std::fs::write(&chat, format!("{row}\n")).unwrap();
    let mut a = args(&out, &[]);
    (a.advantage_estimator, a.prompts) = ("sdpo".parse().unwrap(), chat);
    a.reward_command = vec![digit_reward()];
    let e = format!("{:#}", run(&a).unwrap_err());
    assert!(
        e.contains("ends-with-assistant.jsonl:1: field 'messages'") && !e.contains('\n'),
        "{e}"
    );
    // A row without its privileged context: its file, line and field.
    let rows = f.root.join("no-context.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"a\", \"privileged_context\": \"b\"}\n{\"prompt\": \"c\"}\n",
    )
    .unwrap();
    let mut a = args(&out, &[]);
    a.prompts = rows.clone();
    let e = format!("{:#}", run(&a).unwrap_err());
    assert!(
        e.contains("no-context.jsonl:2: field 'privileged_context'"),
        "{e}"
    );
}
