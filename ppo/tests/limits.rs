//! A model with a position table (GPT-2's `n_positions`) and rows longer than it: every
//! command caps its lengths to the table instead of indexing past it (which panicked), and a
//! generation length that leaves no room for a prompt is refused with one line.

use std::path::{Path, PathBuf};

use common::{Head, Model, ModelConfig, ModelOptions};
use rlhf_tests::parse_args;
use serde_json::json;

const POSITIONS: usize = 16;

/// A GPT-2 with 16 positions and the shared fixture's tokenizer, a reward model of the same
/// shape, and data whose rows are all longer than 16 tokens.
fn fixture() -> (PathBuf, PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("limits");
    rlhf_tests::tiny_llama_fixture(&root);
    let tokenizer_dir = root.join("model");
    let config = json!({"model_type": "gpt2", "vocab_size": 320, "n_positions": POSITIONS,
                        "n_embd": 16, "n_layer": 1, "n_head": 2});
    let config = ModelConfig::from_json(config, Path::new("config.json")).unwrap();
    tch::manual_seed(0);
    let (lm, rm) = (root.join("gpt2"), root.join("gpt2-rm"));
    Model::new(config.clone(), &ModelOptions::cpu(Head::Lm))
        .save(&lm, Some(&tokenizer_dir))
        .unwrap();
    Model::new(config, &ModelOptions::cpu(Head::Score))
        .save(&rm, Some(&tokenizer_dir))
        .unwrap();
    let long = "There are thirty five heads and ninety four legs in the cage. ";
    let mut sft = String::new();
    let mut prefs = String::new();
    let mut prompts = String::new();
    for i in 0..4 {
        // Short prompts and long answers: cut at 16 tokens, each row keeps targets.
        let line = json!({"prompt": format!("{i}."), "completion": long});
        sft.push_str(&format!("{line}\n"));
        let line = json!({"prompt": format!("{i}."), "chosen": long, "rejected": "no"});
        prefs.push_str(&format!("{line}\n"));
        prompts.push_str(&format!("{}\n", json!({"prompt": format!("{i}. {long}")})));
    }
    for (name, text) in [("sft", sft), ("prefs", prefs), ("prompts", prompts)] {
        std::fs::write(root.join(format!("{name}.jsonl")), text).unwrap();
    }
    (root, lm, rm)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn every_command_caps_lengths_at_the_position_table() {
    let (root, lm, rm) = fixture();
    let tok = data::Tokenizer::load(&lm).unwrap();
    let row = data::read_sft(&root.join("sft.jsonl")).unwrap();
    let n = data::sft::tokenize(&row[0], &tok, true).unwrap().ids.len();
    assert!(n > 2 * POSITIONS, "the rows must overflow the table ({n})");
    let (sft_data, prefs, prompts) = (
        s(&root.join("sft.jsonl")),
        s(&root.join("prefs.jsonl")),
        s(&root.join("prompts.jsonl")),
    );
    let cpu = ["--device", "cpu"];

    let eval: sft::eval::EvalArgs = parse_args(
        &[
            [
                "--model",
                &s(&lm),
                "--data",
                &sft_data,
                "--max-length",
                "64",
            ]
            .as_slice(),
            &cpu,
        ]
        .concat(),
    );
    let summary = sft::eval::run(&eval).unwrap();
    assert_eq!((summary.rows, summary.dropped), (4, 0));
    assert!(summary.loss.is_finite());

    let out = root.join("sft-run");
    let train: sft::train::TrainArgs = parse_args(
        &[
            [
                "--model",
                &s(&lm),
                "--data",
                &sft_data,
                "--output-dir",
                &s(&out),
            ]
            .as_slice(),
            &[
                "--max-length",
                "64",
                "--max-steps",
                "2",
                "--eval-data",
                &sft_data,
            ],
            &cpu,
        ]
        .concat(),
    );
    assert!(sft::train::run(&train)
        .unwrap()
        .eval_loss
        .unwrap()
        .is_finite());

    let generated = root.join("generated.jsonl");
    let gen_argv = |new: &str| -> Vec<String> {
        [
            [
                "--model",
                &s(&lm),
                "--prompts",
                &prompts,
                "--output",
                &s(&generated),
            ]
            .as_slice(),
            &["--max-new-tokens", new, "--temperature", "0"],
            &cpu,
        ]
        .concat()
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let summary = sft::generate::run(&parse_args(&gen_argv("6"))).unwrap();
    assert_eq!(summary.rows, 4);
    let e = sft::generate::run(&parse_args(&gen_argv("16")))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--max-new-tokens 16 leaves no room for a prompt: the model reads at most 16 positions (n_positions in config.json)"
    );

    let out = root.join("reward-run");
    let train: reward::train::TrainArgs = parse_args(
        &[
            [
                "--model",
                &s(&rm),
                "--data",
                &prefs,
                "--output-dir",
                &s(&out),
            ]
            .as_slice(),
            &[
                "--max-length",
                "64",
                "--max-steps",
                "2",
                "--normalize-data",
                &sft_data,
            ],
            &cpu,
        ]
        .concat(),
    );
    reward::train::run(&train).unwrap();
    let eval: reward::eval::EvalArgs = parse_args(
        &[
            ["--model", &s(&rm), "--data", &prefs, "--max-length", "64"].as_slice(),
            &cpu,
        ]
        .concat(),
    );
    assert_eq!(reward::eval::run(&eval).unwrap().pairs, 4);

    let out = root.join("ppo-run");
    let ppo_args: ppo::train::TrainArgs = parse_args(
        &[
            [
                "--policy",
                &s(&lm),
                "--reward-model",
                &s(&rm),
                "--prompts",
                &prompts,
            ]
            .as_slice(),
            &[
                "--output-dir",
                &s(&out),
                "--rollout-batch-size",
                "4",
                "--max-steps",
                "1",
            ],
            &["--response-length", "6", "--max-prompt-length", "64"],
            &[
                "--ptx-data",
                &sft_data,
                "--ptx-coef",
                "0.1",
                "--ptx-max-length",
                "64",
            ],
            &cpu,
        ]
        .concat(),
    );
    assert_eq!(ppo::train::run(&ppo_args).unwrap().steps, 1);
}
