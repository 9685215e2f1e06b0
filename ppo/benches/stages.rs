//! `make bench`: throughput of each stage on a fixed workload, through the real training
//! code (`sft::train`, `reward::train`, `ppo::train`), plus KV-cache generation alone.
//!
//! Workload (issue 10): a GPT-2-shaped model (4 layers, width 256, 4 heads) and a
//! Llama-shaped one (4 layers, hidden 256, 4 heads, 2 KV heads, intermediate 688), vocab
//! 2048, batch 8 × 128 tokens; PPO with 16 rollout sequences of 32 response tokens, 1
//! epoch, 2 minibatches. Every number is the median over the measured steps, after 2
//! warm-up steps. Output: one JSON line per stage and model, then a table.
//!
//! `BENCH_DEVICE=cuda BENCH_DTYPE=bf16` runs the same on a GPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::generate::{generate, SamplingConfig};
use common::{Head, Model, ModelConfig};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const WARMUP: usize = 2;
const MEASURED: usize = 8;
const SEQ: usize = 128;
const BATCH: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Resets the kernel's peak-RSS counter of this process (Linux `clear_refs` 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Random printable text of `n` characters (one token each with the bench tokenizer).
fn text(rng: &mut u64, n: usize) -> String {
    (0..n)
        .map(|_| {
            *rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (b'a' + ((*rng >> 33) % 26) as u8) as char
        })
        .collect()
}

/// A model directory: random weights of `config`, a character-level tokenizer.
fn model_dir(root: &Path, name: &str, config: Value, head: Head) -> PathBuf {
    let dir = root.join(name);
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    for (i, c) in (33u8..=126).enumerate() {
        vocab.insert((c as char).to_string(), json!(i + 1));
    }
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    tch::manual_seed(0);
    let config = ModelConfig::from_json(config, Path::new("config.json")).unwrap();
    let model = Model::new(config, head, Device::Cpu, Kind::Float);
    model.save(&dir, None).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}).to_string(),
    )
    .unwrap();
    dir
}

fn write_jsonl(path: &Path, rows: impl IntoIterator<Item = Value>) {
    let text: String = rows.into_iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn measured(m: &[Value], key: &str) -> Vec<f64> {
    m[WARMUP..]
        .iter()
        .map(|r| r[key].as_f64().unwrap())
        .collect()
}

fn main() {
    let device = std::env::var("BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dtype = std::env::var("BENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    common::logging::init();
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let mut rng = 7u64;
    // Data: SFT rows of exactly SEQ tokens (127 characters + EOS), preference pairs of the
    // same length, and prompts of 64 tokens.
    let sft_data = root.join("sft.jsonl");
    write_jsonl(
        &sft_data,
        (0..64).map(|_| json!({"text": text(&mut rng, SEQ - 1)})),
    );
    let pairs = root.join("pairs.jsonl");
    write_jsonl(
        &pairs,
        (0..64).map(|_| {
            json!({"prompt": text(&mut rng, 64), "chosen": text(&mut rng, 64), "rejected": text(&mut rng, 64)})
        }),
    );
    let prompts = root.join("prompts.jsonl");
    write_jsonl(
        &prompts,
        (0..64).map(|_| json!({"prompt": text(&mut rng, 64)})),
    );

    let shapes = [
        (
            "gpt2",
            json!({"model_type": "gpt2", "vocab_size": 2048, "n_positions": 512, "n_embd": 256,
                        "n_layer": 4, "n_head": 4, "eos_token_id": 0}),
        ),
        (
            "llama",
            json!({"model_type": "llama", "vocab_size": 2048, "hidden_size": 256,
                         "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "max_position_embeddings": 512,
                         "tie_word_embeddings": false, "eos_token_id": 0}),
        ),
    ];
    let common_args = |out: &Path, steps: usize| -> Vec<String> {
        [
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            &device,
            "--dtype",
            &dtype,
            "--max-steps",
            &(WARMUP + steps).to_string(),
            "--log-every",
            "1000",
            "--lr",
            "1e-5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut rows = vec![];
    for (arch, config) in shapes {
        let lm = model_dir(root, &format!("{arch}-lm"), config.clone(), Head::Lm);
        let rm = model_dir(root, &format!("{arch}-rm"), config.clone(), Head::Score);

        reset_peak_rss();
        let out = root.join(format!("{arch}-sft"));
        let mut argv = vec![
            "--model".into(),
            lm.display().to_string(),
            "--data".into(),
            sft_data.display().to_string(),
            "--batch-size".into(),
            BATCH.to_string(),
            "--max-length".into(),
            SEQ.to_string(),
        ];
        argv.extend(common_args(&out, MEASURED));
        sft::train::run(&rlhf_tests::parse_args::<sft::train::TrainArgs, _>(&argv)).unwrap();
        let tps = median(measured(&metrics(&out), "train/tokens_per_second"));
        rows.push(json!({"stage": "sft", "model": arch, "tokens_per_second": tps,
                         "steps_per_second": tps / (BATCH * SEQ) as f64, "peak_rss_mb": peak_rss_mb()}));

        reset_peak_rss();
        let out = root.join(format!("{arch}-reward"));
        let mut argv = vec![
            "--model".into(),
            lm.display().to_string(),
            "--data".into(),
            pairs.display().to_string(),
            "--batch-size".into(),
            (BATCH / 2).to_string(),
        ];
        argv.extend(common_args(&out, MEASURED));
        reward::train::run(&rlhf_tests::parse_args::<reward::train::TrainArgs, _>(
            &argv,
        ))
        .unwrap();
        let tps = median(measured(&metrics(&out), "train/tokens_per_second"));
        rows.push(json!({"stage": "reward", "model": arch, "tokens_per_second": tps,
                         "steps_per_second": tps / (BATCH * SEQ) as f64, "peak_rss_mb": peak_rss_mb()}));

        reset_peak_rss();
        let out = root.join(format!("{arch}-ppo"));
        let mut argv = vec![
            "--policy".into(),
            lm.display().to_string(),
            "--reward-model".into(),
            rm.display().to_string(),
            "--prompts".into(),
            prompts.display().to_string(),
            "--rollout-batch-size".into(),
            "16".into(),
            "--response-length".into(),
            "32".into(),
            "--ppo-epochs".into(),
            "1".into(),
            "--num-minibatches".into(),
            "2".into(),
            "--sample-every".into(),
            "0".into(),
        ];
        argv.extend(common_args(&out, MEASURED));
        ppo::train::run(&rlhf_tests::parse_args::<ppo::train::TrainArgs, _>(&argv)).unwrap();
        let m = metrics(&out);
        let (rollout, train) = (
            median(measured(&m, "time/rollout")),
            median(measured(&m, "time/train")),
        );
        let tokens = median(measured(&m, "response_length")) * 16.0;
        rows.push(json!({"stage": "ppo", "model": arch, "iterations_per_second": 1.0 / (rollout + train),
                         "seconds_rollout": rollout, "seconds_train": train,
                         "tokens_per_second": tokens / (rollout + train), "peak_rss_mb": peak_rss_mb()}));

        // Generation alone: 16 prompts of 64 tokens, 32 new tokens each, no EOS.
        let (dev, kind) = common::cli::DeviceArgs {
            device: device.parse().unwrap(),
            dtype: dtype.parse().unwrap(),
        }
        .resolve();
        let (model, _) = Model::load(&lm, Head::Lm, dev, kind).unwrap();
        let ids = Tensor::randint_low(1, 95, [16, 64], (Kind::Int64, dev));
        let mask = Tensor::ones([16, 64], (Kind::Int64, dev));
        let cfg = SamplingConfig {
            max_new_tokens: 32,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            eos_ids: vec![],
            pad_id: 0,
            seed: 0,
        };
        let mut times = vec![];
        for i in 0..WARMUP + MEASURED {
            let started = Instant::now();
            let out = generate(&model, &ids, &mask, &cfg);
            let _ = out.tokens.int64_value(&[0, 0]); // wait for the device
            if i >= WARMUP {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        rows.push(json!({"stage": "generate", "model": arch, "tokens_per_second": 16.0 * 32.0 / median(times)}));
    }
    for r in &rows {
        println!("{r}");
    }
    println!("\n| stage | model | tokens/s | steps/s | peak RSS (MB) |\n|---|---|---|---|---|");
    for r in &rows {
        let f = |k: &str| {
            r.get(k)
                .and_then(Value::as_f64)
                .map_or("–".into(), |v| format!("{v:.1}"))
        };
        let steps = r.get("steps_per_second").or(r.get("iterations_per_second"));
        println!(
            "| {} | {} | {} | {} | {} |",
            r["stage"].as_str().unwrap(),
            r["model"].as_str().unwrap(),
            f("tokens_per_second"),
            steps
                .and_then(Value::as_f64)
                .map_or("–".into(), |v| format!("{v:.2}")),
            f("peak_rss_mb")
        );
    }
}
