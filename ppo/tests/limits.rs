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

const CPU: [&str; 2] = ["--device", "cpu"];

/// `sft eval`, `sft train` and `sft generate` (which refuses a length with no room left).
fn sft_commands(root: &Path, lm: &Path) {
    let (data, prompts) = (s(&root.join("sft.jsonl")), s(&root.join("prompts.jsonl")));
    let eval: sft::eval::EvalArgs = parse_args(
        &[
            ["--model", &s(lm), "--data", &data, "--max-length", "64"].as_slice(),
            &CPU,
        ]
        .concat(),
    );
    let sft::eval::EvalOutcome::Nll(summary) = sft::eval::run(&eval).unwrap() else {
        panic!("--data gives the NLL summary")
    };
    assert_eq!((summary.rows, summary.dropped), (4, 0));
    assert!(summary.loss.is_finite());

    let out = s(&root.join("sft-run"));
    let train: sft::train::TrainArgs = parse_args(
        &[
            ["--model", &s(lm), "--data", &data, "--output-dir", &out].as_slice(),
            &[
                "--max-length",
                "64",
                "--max-steps",
                "2",
                "--eval-data",
                &data,
            ],
            &CPU,
        ]
        .concat(),
    );
    assert!(sft::train::run(&train)
        .unwrap()
        .eval_loss
        .unwrap()
        .is_finite());

    let generated = s(&root.join("generated.jsonl"));
    let gen_args = |new: &str| -> sft::generate::GenerateArgs {
        parse_args(
            &[
                [
                    "--model",
                    &s(lm),
                    "--prompts",
                    &prompts,
                    "--output",
                    &generated,
                ]
                .as_slice(),
                &["--max-new-tokens", new, "--temperature", "0"],
                &CPU,
            ]
            .concat(),
        )
    };
    assert_eq!(sft::generate::run(&gen_args("6")).unwrap().rows, 4);
    let e = sft::generate::run(&gen_args("16")).unwrap_err().to_string();
    assert_eq!(
        e,
        "--max-new-tokens 16 leaves no room for a prompt: the model reads at most 16 positions (n_positions in config.json)"
    );
}

/// `reward train` (with a normalisation set longer than the table) and `reward eval`.
fn reward_commands(root: &Path, rm: &Path) {
    let (data, prefs) = (s(&root.join("sft.jsonl")), s(&root.join("prefs.jsonl")));
    let out = s(&root.join("reward-run"));
    let train: reward::train::TrainArgs = parse_args(
        &[
            ["--model", &s(rm), "--data", &prefs, "--output-dir", &out].as_slice(),
            &[
                "--max-length",
                "64",
                "--max-steps",
                "2",
                "--normalize-data",
                &data,
            ],
            &CPU,
        ]
        .concat(),
    );
    reward::train::run(&train).unwrap();
    let eval: reward::eval::EvalArgs = parse_args(
        &[
            ["--model", &s(rm), "--data", &prefs, "--max-length", "64"].as_slice(),
            &CPU,
        ]
        .concat(),
    );
    assert_eq!(reward::eval::run(&eval).unwrap().pairs, 4);
}

#[test]
fn every_command_caps_lengths_at_the_position_table() {
    let (root, lm, rm) = fixture();
    let tok = data::Tokenizer::load(&lm).unwrap();
    let row = data::read_sft(&root.join("sft.jsonl")).unwrap();
    let n = data::sft::tokenize(&row[0], &tok, true, Default::default())
        .unwrap()
        .ids
        .len();
    assert!(n > 2 * POSITIONS, "the rows must overflow the table ({n})");
    sft_commands(&root, &lm);
    reward_commands(&root, &rm);
    let (data, prompts, out) = (
        s(&root.join("sft.jsonl")),
        s(&root.join("prompts.jsonl")),
        s(&root.join("ppo-run")),
    );
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
                &out,
                "--rollout-batch-size",
                "4",
                "--max-steps",
                "1",
            ],
            &["--response-length", "6", "--max-prompt-length", "64"],
            &[
                "--ptx-data",
                &data,
                "--ptx-coef",
                "0.1",
                "--ptx-max-length",
                "64",
            ],
            &CPU,
        ]
        .concat(),
    );
    assert_eq!(ppo::train::run(&ppo_args).unwrap().steps, 1);
}
