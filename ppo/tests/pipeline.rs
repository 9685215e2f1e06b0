//! A reduced `make demo`: the three stages in sequence on a small version of the bundled
//! chickens-and-rabbits task, asserting that each stage produced its outputs and that PPO
//! raised the mean reward-model score.

use std::path::Path;

use rlhf_tests::read_jsonl;

#[test]
fn sft_then_reward_then_ppo_raises_the_reward() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pipeline");
    let _ = std::fs::remove_dir_all(&root);
    let data = root.join("data");
    // 0..=6 chickens and rabbits: 48 problems, 12 held out.
    let info = rlhf_tests::demo::data(&data, 1, 6);
    assert_eq!(info["eval_problems"], 12);
    let mixed = data.join("sft_and_facts.jsonl");
    let text = std::fs::read_to_string(data.join("sft.jsonl")).unwrap()
        + &std::fs::read_to_string(data.join("pretrain.jsonl")).unwrap();
    std::fs::write(&mixed, text).unwrap();
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let (sft_out, rm_out, ppo_out) = (root.join("sft"), root.join("reward"), root.join("ppo"));

    sft::train::run(&rlhf_tests::parse_args(&[
        "--model",
        &p(&data.join("base")),
        "--data",
        &p(&mixed),
        "--output-dir",
        &p(&sft_out),
        "--device",
        "cpu",
        "--lr",
        "2e-3",
        "--batch-size",
        "32",
        "--max-steps",
        "60",
        "--max-length",
        "128",
        "--schedule",
        "cosine",
    ]))
    .unwrap();
    let rm = reward::train::run(&rlhf_tests::parse_args(&[
        "--model",
        &p(&sft_out.join("final")),
        "--data",
        &p(&data.join("rankings.jsonl")),
        "--output-dir",
        &p(&rm_out),
        "--device",
        "cpu",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--max-steps",
        "20",
        "--max-length",
        "128",
    ]))
    .unwrap();
    let ppo = ppo::train::run(&rlhf_tests::parse_args(&[
        "--policy",
        &p(&sft_out.join("final")),
        "--reward-model",
        &p(&rm_out.join("final")),
        "--prompts",
        &p(&data.join("prompts.jsonl")),
        "--output-dir",
        &p(&ppo_out),
        "--device",
        "cpu",
        "--rollout-batch-size",
        "16",
        "--response-length",
        "48",
        "--ppo-epochs",
        "2",
        "--num-minibatches",
        "2",
        "--lr",
        "1e-4",
        "--max-steps",
        "8",
    ]))
    .unwrap();

    for out in [&sft_out, &rm_out, &ppo_out] {
        assert!(
            out.join("final/model.safetensors").exists(),
            "{}",
            out.display()
        );
        assert!(out.join("config.toml").exists() && out.join("tb").is_dir());
    }
    assert!(ppo_out.join("final_value/model.safetensors").exists());
    assert!(rm.normalization.bias != 0.0);
    let scores: Vec<f64> = read_jsonl(&ppo_out.join("metrics.jsonl"))
        .iter()
        .map(|r| r["objective/scores"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), 8);
    let first = scores[..3].iter().sum::<f64>() / 3.0;
    let last = scores[5..].iter().sum::<f64>() / 3.0;
    assert!(
        last > first,
        "PPO did not raise the mean reward: {first:.3} → {last:.3} ({scores:?})"
    );
    assert!(ppo.kl.is_some_and(f64::is_finite));
}
