//! LoRA in the reward and PPO stages: a reward adapter (every linear layer and the score
//! head) carries its normalisation and loads in PEFT with our scores; `ppo train --lora-r`
//! (policy adapter, reference = the policy with it off, critic adapter on the reward
//! model whose base with the adapter off is the reward) writes adapter directories and
//! resumes to the same adapters after a kill. Also: `--gradient-checkpointing` leaves every
//! stage's weights as they were.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::scoring::{last_token_scores, Normalization};
use common::{Head, Model, ModelOptions};
use rlhf_tests::{parse_args, run_python};
use serde_json::{json, Value};
use tch::Tensor;

struct Fixture {
    root: PathBuf,
    policy: PathBuf,
    reward: PathBuf,
    prompts: PathBuf,
    prefs: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ppo-lora");
        rlhf_tests::tiny_llama_fixture(&root);
        let policy = root.join("model");
        // A full reward model: the policy's backbone, a fresh head and a stored bias.
        tch::manual_seed(5);
        let (mut rm, _) = Model::load(&policy, &ModelOptions::cpu(Head::Score)).unwrap();
        Normalization {
            bias: 0.5,
            std: Some(1.0),
        }
        .store(&mut rm);
        let reward = root.join("reward");
        rm.save(&reward, Some(&policy)).unwrap();
        let (prompts, prefs) = (root.join("prompts-ppo.jsonl"), root.join("prefs.jsonl"));
        let mut p = String::new();
        let mut r = String::new();
        for i in 0..16 {
            p.push_str(&format!(
                "{}\n",
                json!({"prompt": format!("There are {} heads", i + 3)})
            ));
            r.push_str(&format!(
                "{}\n",
                json!({"prompt": format!("{} heads and {} legs: ", i + 3, 2 * i + 8),
                       "chosen": format!("{} rabbits.", i + 1), "rejected": "many cows."})
            ));
        }
        std::fs::write(&prompts, p).unwrap();
        std::fs::write(&prefs, r).unwrap();
        Fixture {
            root,
            policy,
            reward,
            prompts,
            prefs,
        }
    })
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn a_reward_adapter_keeps_its_normalisation_and_loads_in_peft() {
    let f = fixture();
    let out = f.root.join("reward-lora");
    let args: reward::train::TrainArgs = parse_args(&[
        "--model",
        &s(&f.policy),
        "--data",
        &s(&f.prefs),
        "--output-dir",
        &s(&out),
        "--device",
        "cpu",
        "--overwrite",
        "--lora-r",
        "4",
        "--lora-target-modules",
        "all-linear",
        "--lr",
        "1e-2",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
    ]);
    let summary = reward::train::run(&args).unwrap();
    let final_dir = out.join("final");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(final_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], json!(["classifier", "score"]));
    assert_eq!(
        config["rlhf_reward_bias"].as_f64(),
        Some(summary.normalization.bias)
    );
    let (model, _) = Model::load(&final_dir, &ModelOptions::cpu(Head::Score)).unwrap();
    assert_eq!(Normalization::of(&model).bias, summary.normalization.bias);

    let ids = vec![vec![5i64, 9, 12, 40, 7, 3], vec![8, 22, 31, 0, 0, 0]];
    let mask = vec![vec![1i64, 1, 1, 1, 1, 1], vec![1, 1, 1, 0, 0, 0]];
    let ids_path = f.root.join("reward-ids.json");
    std::fs::write(&ids_path, json!({"ids": ids, "mask": mask}).to_string()).unwrap();
    let ours = last_token_scores(
        &model,
        &Tensor::from_slice2(&ids),
        &Tensor::from_slice2(&mask),
    );
    let theirs = run_python(
        "peft_reference.py",
        &[
            "check",
            "--adapter",
            &s(&final_dir),
            "--score",
            "--ids",
            &s(&ids_path),
        ],
    );
    let theirs: Vec<f32> = serde_json::from_value(theirs["adapter"].clone()).unwrap();
    let diff = (ours - Tensor::from_slice(&theirs))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-4, "PEFT reads our reward adapter {diff:e} away");

    let eval: reward::eval::EvalArgs = parse_args(&[
        "--model",
        &s(&final_dir),
        "--data",
        &s(&f.prefs),
        "--device",
        "cpu",
    ]);
    let summary = reward::eval::run(&eval).unwrap();
    assert_eq!(summary.pairs, 16);
}

fn ppo_argv(out: &Path, extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let mut argv: Vec<String> = [
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
        "--lora-r",
        "4",
        "--lora-target-modules",
        "all-linear",
        "--rollout-batch-size",
        "8",
        "--response-length",
        "8",
        "--ppo-epochs",
        "2",
        "--num-minibatches",
        "2",
        "--lr",
        "1e-2",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--ema-decay",
        "0.9",
        "--seed",
        "3",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    argv.extend(extra.iter().map(|a| a.to_string()));
    argv
}

fn ppo(argv: &[String], crash_at: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ppo"));
    cmd.args(argv).env_remove("RLHF_CRASH_AT");
    if let Some(point) = crash_at {
        cmd.env("RLHF_CRASH_AT", point);
    }
    cmd.output().unwrap()
}

fn adapter_diff(a: &Path, b: &Path, head: Head) -> f64 {
    let load = |d: &Path| {
        Model::load(d, &ModelOptions::cpu(head))
            .unwrap()
            .0
            .named_tensors()
    };
    let (a, b) = (load(a), load(b));
    a.iter()
        .filter(|(n, _)| n.contains(".lora_") || n.as_str() == "score.weight")
        .map(|(n, t)| (t - &b[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn ppo_with_adapters_writes_adapters_and_resumes_to_them() {
    let f = fixture();
    let straight = f.root.join("ppo-lora-straight");
    let res = ppo(&ppo_argv(&straight, &["--overwrite"]), None);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for dir in ["final", "final_value", "final_ema"] {
        let d = straight.join(dir);
        assert!(
            d.join("adapter_config.json").exists() && !d.join("model.safetensors").exists(),
            "{dir}"
        );
    }
    let value: Value = serde_json::from_str(
        &std::fs::read_to_string(straight.join("final_value/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        value["rlhf_reward_bias"],
        json!(0.5),
        "the critic keeps the reward's normalisation"
    );
    // Trained: the policy adapter is no longer the base.
    let (policy, _) = Model::load(&straight.join("final"), &ModelOptions::cpu(Head::Lm)).unwrap();
    let b_max = policy
        .named_tensors()
        .iter()
        .filter(|(n, _)| n.contains(".lora_B."))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(b_max > 1e-4, "the policy adapter did not move");

    // Killed mid-step in the third iteration (2 minibatches × 2 epochs × policy and critic
    // = 8 step points per iteration), then resumed from the checkpoint of step 2.
    let killed = f.root.join("ppo-lora-killed");
    let _ = std::fs::remove_dir_all(&killed);
    let res = ppo(&ppo_argv(&killed, &[]), Some("mid-step@19"));
    assert!(!res.status.success(), "the run was not killed");
    let res = ppo(&ppo_argv(&killed, &["--resume"]), None);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for (dir, head) in [
        ("final", Head::Lm),
        ("final_ema", Head::Lm),
        ("final_value", Head::Score),
    ] {
        let diff = adapter_diff(&straight.join(dir), &killed.join(dir), head);
        assert!(diff < 1e-6, "{dir}: resumed adapters differ by {diff:e}");
    }
}

/// QLoRA in PPO: policy and critic adapters on 4-bit bases; the first rollout's KL to the
/// reference (the 4-bit policy base with its adapter off) is exactly 0, and the run writes
/// adapters that say their bases were 4-bit.
#[test]
fn ppo_trains_adapters_on_4bit_bases() {
    let f = fixture();
    let out = f.root.join("ppo-qlora");
    let res = ppo(
        &ppo_argv(
            &out,
            &["--overwrite", "--load-in-4bit", "--use-bnb-nested-quant"],
        ),
        None,
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let metrics = rlhf_tests::read_jsonl(&out.join("metrics.jsonl"));
    let kl = metrics[0]["objective/kl"].as_f64().unwrap();
    assert_eq!(kl, 0.0, "{}", metrics[0]);
    for dir in ["final", "final_value"] {
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(dir).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["rlhf_base_quantization_config"]["bnb_4bit_use_double_quant"], true,
            "{dir}"
        );
    }
    let (policy, _) = Model::load(&out.join("final"), &ModelOptions::cpu(Head::Lm)).unwrap();
    assert!(!policy.quantized_modules().is_empty());
}

/// Prompt tuning in the reward and PPO stages: a soft-prompted reward model trains, keeps
/// its normalisation and head, and scores the same after reloading; PPO with soft prompts
/// on the policy and the critic (the reward the critic with its prompt off) trains and
/// writes prompt-tuning adapters.
#[test]
fn soft_prompts_train_in_the_reward_and_ppo_stages() {
    let f = fixture();
    let out = f.root.join("reward-prompt");
    let args: reward::train::TrainArgs = parse_args(&[
        "--model",
        &s(&f.policy),
        "--data",
        &s(&f.prefs),
        "--output-dir",
        &s(&out),
        "--device",
        "cpu",
        "--overwrite",
        "--prompt-tuning-tokens",
        "3",
        "--prompt-tuning-init",
        "vocab",
        "--lr",
        "5e-2",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
    ]);
    let summary = reward::train::run(&args).unwrap();
    let final_dir = out.join("final");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(final_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (config["peft_type"].as_str(), config["task_type"].as_str()),
        (Some("PROMPT_TUNING"), Some("SEQ_CLS"))
    );
    assert_eq!(
        config["rlhf_reward_bias"].as_f64(),
        Some(summary.normalization.bias)
    );
    let eval: reward::eval::EvalArgs = parse_args(&[
        "--model",
        &s(&final_dir),
        "--data",
        &s(&f.prefs),
        "--device",
        "cpu",
    ]);
    let first = reward::eval::run(&eval).unwrap();
    // Normalised on the chosen responses: their mean reward is 0 after reloading.
    let out_rows = f.root.join("reward-prompt-rows.jsonl");
    let eval: reward::eval::EvalArgs = parse_args(&[
        "--model",
        &s(&final_dir),
        "--data",
        &s(&f.prefs),
        "--device",
        "cpu",
        "--output",
        &s(&out_rows),
    ]);
    let again = reward::eval::run(&eval).unwrap();
    assert_eq!(first.mean_reward, again.mean_reward);
    let chosen: f64 = rlhf_tests::read_jsonl(&out_rows)
        .iter()
        .map(|r| r["rewards"][0].as_f64().unwrap())
        .sum::<f64>()
        / 16.0;
    assert!(
        chosen.abs() < 1e-4,
        "chosen responses average {chosen}, not 0"
    );

    let ppo_out = f.root.join("ppo-prompt");
    let mut argv = ppo_argv(&ppo_out, &["--overwrite", "--prompt-tuning-tokens", "3"]);
    // The soft prompt replaces LoRA in this run.
    let r = argv.iter().position(|a| a == "--lora-r").unwrap();
    argv.drain(r..r + 4);
    let res = ppo(&argv, None);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for dir in ["final", "final_value", "final_ema"] {
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(ppo_out.join(dir).join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "PROMPT_TUNING", "{dir}");
    }
}

/// `--gradient-checkpointing` in every training stage (SFT, reward, DPO, and PPO's policy
/// and value model): after a few steps the weights equal the run that keeps every
/// activation (f32 CPU, 1e-5). The model-level check (GPT-2 and Llama, both heads, LoRA,
/// prompt tuning) is `common::models::recompute`'s unit test.
#[test]
fn gradient_checkpointing_leaves_every_stage_unchanged() {
    let f = fixture();
    let common = |out: &Path| -> Vec<String> {
        [
            "--output-dir",
            &s(out),
            "--overwrite",
            "--max-steps",
            "2",
            "--seed",
            "4",
            "--lr",
            "1e-3",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    for stage in ["sft", "reward", "dpo", "ppo"] {
        let mut finals = vec![];
        for checkpointing in [false, true] {
            let out = f.root.join(format!("recompute-{stage}-{checkpointing}"));
            let mut argv = common(&out);
            if checkpointing {
                argv.push("--gradient-checkpointing".into());
            }
            let data = |model: &str, data: &Path| {
                vec![
                    "--model".to_string(),
                    model.to_string(),
                    "--data".into(),
                    s(data),
                    "--batch-size".into(),
                    "4".into(),
                ]
            };
            match stage {
                "sft" => {
                    argv.extend(data(&s(&f.policy), &f.root.join("sft.jsonl")));
                    sft::train::run(&parse_args(&argv)).unwrap();
                }
                "reward" => {
                    // From the reward model: its head is kept, not drawn from the global
                    // RNG (which tests running beside this one share).
                    argv.extend(data(&s(&f.reward), &f.prefs));
                    reward::train::run(&parse_args(&argv)).unwrap();
                }
                "dpo" => {
                    argv.extend(data(&s(&f.policy), &f.prefs));
                    dpo::train::run(&parse_args(&argv)).unwrap();
                }
                _ => {
                    argv.extend(
                        [
                            "--policy",
                            &s(&f.policy),
                            "--reward-model",
                            &s(&f.reward),
                            "--prompts",
                            &s(&f.prompts),
                            "--rollout-batch-size",
                            "8",
                            "--response-length",
                            "8",
                            "--ppo-epochs",
                            "1",
                            "--num-minibatches",
                            "2",
                        ]
                        .iter()
                        .map(|a| a.to_string()),
                    );
                    ppo::train::run(&parse_args(&argv)).unwrap();
                }
            }
            finals.push(out);
        }
        let head = if stage == "reward" {
            Head::Score
        } else {
            Head::Lm
        };
        let diff =
            rlhf_tests::max_weight_diff(&finals[0].join("final"), &finals[1].join("final"), head);
        assert!(
            diff < 1e-5,
            "{stage}: weights differ by {diff:e} with --gradient-checkpointing"
        );
        if stage == "ppo" {
            let v = rlhf_tests::max_weight_diff(
                &finals[0].join("final_value"),
                &finals[1].join("final_value"),
                Head::Score,
            );
            assert!(v < 1e-5, "ppo value model: {v:e}");
        }
    }
}

/// `--entropy-coef` is a bonus with a gradient: with it the policy's weights move
/// differently than without (it once entered the loss detached, changing nothing).
#[test]
fn an_entropy_bonus_reaches_the_gradients() {
    let f = fixture();
    let mut finals = vec![];
    for coef in ["0", "1"] {
        let out = f.root.join(format!("entropy-{coef}"));
        let argv: Vec<String> = [
            "--policy",
            &s(&f.policy),
            "--reward-model",
            &s(&f.reward),
            "--prompts",
            &s(&f.prompts),
            "--output-dir",
            &s(&out),
            "--overwrite",
            "--max-steps",
            "1",
            "--seed",
            "4",
            "--lr",
            "1e-3",
            "--rollout-batch-size",
            "8",
            "--response-length",
            "8",
            "--ppo-epochs",
            "1",
            "--num-minibatches",
            "1",
            "--entropy-coef",
            coef,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        ppo::train::run(&parse_args(&argv)).unwrap();
        finals.push(out.join("final"));
    }
    let diff = rlhf_tests::max_weight_diff(&finals[0], &finals[1], Head::Lm);
    assert!(
        diff > 1e-6,
        "the entropy bonus changed no weight ({diff:e})"
    );
}
