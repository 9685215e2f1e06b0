//! `make bench`: throughput of each stage on a fixed workload, through the real training
//! code (`sft::train`, `reward::train`, `dpo::train`, `ppo::train`), plus KV-cache
//! generation alone.
//!
//! Workload (issue 10): a GPT-2-shaped model (4 layers, width 256, 4 heads) and a
//! Llama-shaped one (4 layers, hidden 256, 4 heads, 2 KV heads, intermediate 688), vocab
//! 2048, batch 8 × 128 tokens; PPO with 16 rollout sequences of 32 response tokens, 1
//! epoch, 2 minibatches. Every number is the median over the measured steps, after 2
//! warm-up steps. Output: one JSON line per stage and model, then a table.
//!
//! `BENCH_DEVICE=cuda BENCH_DTYPE=bf16` runs the same on a GPU. Other knobs (environment):
//! `BENCH_SHAPES` (comma list of `gpt2`, `llama`, `gpt2-medium`, `qwen2-0.5b`, `llama3.2-1b`,
//! `llama3.2-3b`, `llama3-8b`; default the
//! first two), `BENCH_BATCH` (8), `BENCH_SEQ` (128), `BENCH_ROLLOUT` (16 PPO rollout and
//! generation rows), `BENCH_RESPONSE` (32 new tokens). With `BENCH_PEAK_TFLOPS` (the card's
//! dense bf16 peak) training rows get a model-FLOPs utilisation, and with
//! `BENCH_PEAK_GBPS` (its memory bandwidth) generation rows get the bandwidth bound.
//! `BENCH_KEEP=DIR` keeps the generated models, data and runs in DIR. `BENCH_STAGES` (comma
//! list of `sft`, `sft-varied`, `sft-packed`, `sft-distill`, `reward`, `dpo`, `ppo`, `grpo`,
//! `rloo`, `sdpo`, `generate`; `sdpo` and `sft-distill` are not in the default list: SDPO
//! with every response distilled, the memory of its two LM heads at once, and `sft train
//! --teacher-model` (GKD's generalized JSD on the SFT rows' completions, `--lmbda 0`, the
//! teacher a copy of the model: the student's forward and backward, the teacher's forward,
//! both heads chunked);
//! default all; `sft-varied` and `sft-packed` train on rows of 16 to SEQ tokens, padded to
//! the longest of each batch or packed (`--packing`, about as many real tokens a step);
//! `grpo` and `rloo` sample the PPO rollout's rows as half as many prompts × 2 responses)
//! picks the rows, and
//! `BENCH_GEN_BATCHES` (comma list; default `BENCH_ROLLOUT`) the generation batch sizes.
//! On CUDA, PPO and generation run twice: decoding eagerly and with CUDA graphs (issue 20;
//! `BENCH_DECODE=eager` or `graphs` runs one). `BENCH_PPO_ARGS` adds `ppo train` options
//! (e.g. LoRA), `BENCH_TRAIN_ARGS` options of every training stage (e.g.
//! `--gradient-checkpointing`), `BENCH_RM_FROM_LM=1` uses the policy's directory as the
//! reward model, and
//! `BENCH_MEASURED` sets the measured steps (8).

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::generate::{generate, SamplingConfig};
use common::{Head, Model, ModelConfig};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

const WARMUP: usize = 2;
/// Measured steps (after WARMUP), `BENCH_MEASURED` to change.
fn measured_steps() -> usize {
    env_or("BENCH_MEASURED", 8)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Hugging Face `config.json` of a named benchmark shape.
fn shape(name: &str, positions: usize) -> Value {
    match name {
        "gpt2" => json!({"model_type": "gpt2", "vocab_size": 2048, "n_positions": positions,
                         "n_embd": 256, "n_layer": 4, "n_head": 4, "eos_token_id": 0}),
        "llama" => json!({"model_type": "llama", "vocab_size": 2048, "hidden_size": 256,
                          "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "max_position_embeddings": positions,
                          "tie_word_embeddings": false, "eos_token_id": 0}),
        // GPT-2 medium (355M).
        "gpt2-medium" => {
            json!({"model_type": "gpt2", "vocab_size": 50257, "n_positions": positions,
                                "n_embd": 1024, "n_layer": 24, "n_head": 16, "eos_token_id": 0})
        }
        // Llama 3.2 1B and 3B, Llama 3 8B (GQA, untied above 3B); for memory checks.
        "llama3.2-1b" | "llama3.2-3b" | "llama3-8b" => {
            let (h, i, l, heads, tied) = match name {
                "llama3.2-1b" => (2048, 8192, 16, 32, true),
                "llama3.2-3b" => (3072, 8192, 28, 24, true),
                _ => (4096, 14336, 32, 32, false),
            };
            json!({"model_type": "llama", "vocab_size": 128256, "hidden_size": h,
                   "intermediate_size": i, "num_hidden_layers": l, "num_attention_heads": heads,
                   "num_key_value_heads": 8, "max_position_embeddings": positions,
                   "rope_theta": 500000.0, "tie_word_embeddings": tied, "eos_token_id": 0})
        }
        // Qwen2.5-0.5B's shape (494M): GQA 14/2, q/k/v bias, tied embeddings.
        "qwen2-0.5b" => json!({"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
                               "intermediate_size": 4864, "num_hidden_layers": 24,
                               "num_attention_heads": 14, "num_key_value_heads": 2,
                               "max_position_embeddings": positions, "rope_theta": 1000000.0,
                               "tie_word_embeddings": true, "eos_token_id": 0}),
        other => panic!("unknown BENCH_SHAPES entry {other:?}"),
    }
}

/// Parameters that take part in matrix products per token (everything but the embedding
/// tables; the LM head counted even when tied), and the model's layers, width and KV width.
struct Dims {
    matmul_params: f64,
    layers: f64,
    width: f64,
    kv_width: f64,
}

fn dims(model: &Model, config: &Value) -> Dims {
    let tensors = model.named_tensors();
    let numel = |t: &Tensor| t.size().iter().product::<i64>() as f64;
    let total: f64 = tensors.values().map(numel).sum();
    let embeddings: f64 = tensors
        .iter()
        .filter(|(k, _)| {
            k.ends_with("wte.weight")
                || k.ends_with("wpe.weight")
                || k.ends_with("embed_tokens.weight")
        })
        .map(|(_, t)| numel(t))
        .sum();
    let get = |a: &str, b: &str| {
        config
            .get(a)
            .or(config.get(b))
            .and_then(Value::as_f64)
            .unwrap()
    };
    let (layers, width, heads) = (
        get("num_hidden_layers", "n_layer"),
        get("hidden_size", "n_embd"),
        get("num_attention_heads", "n_head"),
    );
    let kv_heads = config["num_key_value_heads"].as_f64().unwrap_or(heads);
    let vocab = config["vocab_size"].as_f64().unwrap();
    let head = if tensors.contains_key("lm_head.weight") {
        0.0
    } else {
        vocab * width
    };
    Dims {
        matmul_params: total - embeddings + head,
        layers,
        width,
        kv_width: width / heads * kv_heads,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Under torchrun, whether this is rank 0, which writes the runs' metrics and the table
/// (the other ranks train alongside and report nothing).
fn main_rank() -> bool {
    std::env::var("RANK").map_or(true, |r| r == "0")
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
fn model_dir(root: &Path, name: &str, config: Value, opts: &common::ModelOptions) -> PathBuf {
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
    let model = Model::new(config, opts);
    model.save(&dir, None).unwrap();
    drop(model);
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
    if !main_rank() {
        return vec![];
    }
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn measured(m: &[Value], key: &str) -> Vec<f64> {
    m.iter()
        .skip(WARMUP)
        .map(|r| r[key].as_f64().unwrap())
        .collect()
}

/// The workload, from the environment (see the module doc).
struct Bench {
    device: String,
    dtype: String,
    batch: usize,
    seq: usize,
    rollout: i64,
    response: i64,
    peak_tflops: Option<f64>,
    peak_gbps: Option<f64>,
    stages: Vec<String>,
    gen_batches: Vec<i64>,
    /// `eager`, and on CUDA `graphs` too.
    decode_modes: Vec<&'static str>,
    root: PathBuf,
    sft_data: PathBuf,
    /// SFT rows of 16 to `seq` tokens, and their mean length.
    varied_data: PathBuf,
    varied_mean: f64,
    pairs: PathBuf,
    prompts: PathBuf,
}

/// Prompt length of the PPO and generation workloads.
const PROMPT: usize = 64;

/// Training FLOPs per token for sequences of `t` tokens.
type Flops = dyn Fn(usize) -> f64;

impl Bench {
    /// Reads the knobs and writes the data: SFT rows of exactly SEQ tokens (127 characters +
    /// EOS), preference pairs of the same length, and prompts of 64 tokens.
    fn new(root: &Path) -> Self {
        let peak = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
        let list = |k: &str, default: String| -> Vec<String> {
            env_or(k, default).split(',').map(str::to_string).collect()
        };
        let device = std::env::var("BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
        let rollout: i64 = env_or("BENCH_ROLLOUT", 16);
        let mut bench = Bench {
            decode_modes: match std::env::var("BENCH_DECODE").ok().as_deref() {
                Some("eager") => vec!["eager"],
                Some("graphs") => vec!["graphs"],
                _ if device.starts_with("cuda") => vec!["eager", "graphs"],
                _ => vec!["eager"],
            },
            device,
            dtype: std::env::var("BENCH_DTYPE").unwrap_or_else(|_| "f32".into()),
            batch: env_or("BENCH_BATCH", 8),
            seq: env_or("BENCH_SEQ", 128),
            rollout,
            response: env_or("BENCH_RESPONSE", 32),
            peak_tflops: peak("BENCH_PEAK_TFLOPS"),
            peak_gbps: peak("BENCH_PEAK_GBPS"),
            stages: list(
                "BENCH_STAGES",
                "sft,sft-varied,sft-packed,reward,dpo,ppo,grpo,rloo,generate".into(),
            ),
            gen_batches: list("BENCH_GEN_BATCHES", rollout.to_string())
                .iter()
                .map(|b| b.parse().expect("BENCH_GEN_BATCHES: integers"))
                .collect(),
            root: root.to_path_buf(),
            sft_data: root.join("sft.jsonl"),
            varied_data: root.join("sft-varied.jsonl"),
            varied_mean: 0.0,
            pairs: root.join("pairs.jsonl"),
            prompts: root.join("prompts.jsonl"),
        };
        let mut rng = 7u64;
        let seq = bench.seq;
        write_jsonl(
            &bench.sft_data,
            (0..64).map(|_| json!({"text": text(&mut rng, seq - 1)})),
        );
        // Lengths uniform in 16..=seq (EOS included).
        let lengths: Vec<usize> = (0..256)
            .map(|i| 16 + (i * 7919 + 13) % (seq - 15))
            .collect();
        bench.varied_mean = lengths.iter().sum::<usize>() as f64 / lengths.len() as f64;
        write_jsonl(
            &bench.varied_data,
            lengths
                .iter()
                .map(|&n| json!({"text": text(&mut rng, n - 1)})),
        );
        write_jsonl(
            &bench.pairs,
            (0..64).map(|_| {
                json!({"prompt": text(&mut rng, seq / 2), "chosen": text(&mut rng, seq / 2), "rejected": text(&mut rng, seq / 2)})
            }),
        );
        let n_prompts = (bench.rollout as usize).max(64);
        write_jsonl(
            &bench.prompts,
            (0..n_prompts).map(|_| json!({"prompt": text(&mut rng, PROMPT)})),
        );
        bench
    }

    /// The options every stage's run shares.
    fn common_args(&self, out: &Path, steps: usize) -> Vec<String> {
        [
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            &self.device,
            "--dtype",
            &self.dtype,
            "--max-steps",
            &(WARMUP + steps).to_string(),
            "--log-every",
            "1000",
            "--lr",
            "1e-5",
        ]
        .iter()
        .map(|s| s.to_string())
        // BENCH_TRAIN_ARGS: options every training stage takes, e.g.
        // "--gradient-checkpointing", PPO included.
        .chain(
            std::env::var("BENCH_TRAIN_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string),
        )
        .collect()
    }

    /// A training stage's row: tokens/s, steps/s, peak RSS, TFLOP/s and MFU.
    fn training_row(&self, stage: &str, arch: &str, tps: f64, flops: &Flops) -> Value {
        let step_tokens = self.batch * self.seq;
        let train_flops = tps * flops(self.seq) / 1e12;
        let mut row = json!({"stage": stage, "model": arch, "tokens_per_second": tps,
                             "steps_per_second": tps / step_tokens as f64, "peak_rss_mb": peak_rss_mb(),
                             "train_tflops": train_flops});
        if let Some(peak) = self.peak_tflops {
            row["mfu"] = json!(train_flops / peak);
        }
        row
    }

    /// `sft train` on the SFT rows, or `reward train` or `dpo train` on the pairs (batch / 2
    /// pairs, so every stage sees `batch` sequences a step; DPO's frozen reference scores
    /// them too).
    fn supervised(&self, stage: &str, arch: &str, lm: &Path, flops: &Flops) -> Value {
        reset_peak_rss();
        let out = self.root.join(format!("{arch}-{stage}"));
        let (data, batch) = match stage {
            "sft" | "sft-distill" => (&self.sft_data, self.batch),
            _ => (&self.pairs, self.batch / 2),
        };
        let mut argv = vec![
            "--model".into(),
            lm.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--batch-size".into(),
            batch.to_string(),
        ];
        if stage.starts_with("sft") {
            argv.extend(["--max-length".into(), self.seq.to_string()]);
        }
        if stage == "sft-distill" {
            let teacher = ["--teacher-model", &lm.display().to_string(), "--lmbda", "0"];
            argv.extend(teacher.map(str::to_string));
        }
        argv.extend(self.common_args(&out, measured_steps()));
        match stage {
            "sft" | "sft-distill" => sft::train::run(&rlhf_tests::parse_args(&argv)).map(drop),
            "reward" => reward::train::run(&rlhf_tests::parse_args(&argv)).map(drop),
            _ => dpo::train::run(&rlhf_tests::parse_args(&argv)).map(drop),
        }
        .unwrap();
        let tps = median(measured(&metrics(&out), "train/tokens_per_second"));
        self.training_row(stage, arch, tps, flops)
    }

    /// `sft train` on rows of varied length: padded to each batch's longest
    /// (`sft-varied`, `batch` rows a step) or packed (`sft-packed`, `--packing` with
    /// about as many real tokens a step). Tokens/s counts real tokens; MFU counts the
    /// FLOPs of rows of the mean length.
    fn sft_varied(&self, stage: &str, arch: &str, lm: &Path, flops: &Flops) -> Value {
        reset_peak_rss();
        let out = self.root.join(format!("{arch}-{stage}"));
        let packed = stage == "sft-packed";
        let batch = if packed {
            ((self.batch as f64 * self.varied_mean / self.seq as f64).round() as usize).max(1)
        } else {
            self.batch
        };
        let mut argv = vec![
            "--model".into(),
            lm.display().to_string(),
            "--data".into(),
            self.varied_data.display().to_string(),
            "--batch-size".into(),
            batch.to_string(),
            "--max-length".into(),
            self.seq.to_string(),
        ];
        if packed {
            argv.push("--packing".into());
        }
        argv.extend(self.common_args(&out, measured_steps()));
        sft::train::run(&rlhf_tests::parse_args(&argv)).unwrap();
        let tps = median(measured(&metrics(&out), "train/tokens_per_second"));
        let train_flops = tps * flops(self.varied_mean as usize) / 1e12;
        let mut row = json!({"stage": stage, "model": arch, "tokens_per_second": tps,
                             "peak_rss_mb": peak_rss_mb(), "train_tflops": train_flops,
                             "batch": batch});
        if let Some(peak) = self.peak_tflops {
            row["mfu"] = json!(train_flops / peak);
        }
        row
    }

    /// `ppo train` with GAE (`stage` "ppo"), or critic-free (`stage` "grpo" or "rloo": the
    /// same rollout rows as `rollout / 2` prompts × 2 responses, TRL's RLOO/GRPO setting).
    fn ppo(&self, stage: &str, arch: &str, lm: &Path, rm: &Path, decode: &str) -> Value {
        reset_peak_rss();
        let out = self.root.join(format!("{arch}-{stage}-{decode}"));
        let prompts = if stage == "ppo" {
            self.rollout
        } else {
            self.rollout / 2
        };
        let mut argv: Vec<String> = [
            "--policy",
            &lm.display().to_string(),
            "--reward-model",
            &rm.display().to_string(),
            "--prompts",
            &self.prompts.display().to_string(),
            "--rollout-batch-size",
            &prompts.to_string(),
            "--response-length",
            &self.response.to_string(),
            "--ppo-epochs",
            "1",
            "--num-minibatches",
            "2",
            "--sample-every",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(self.common_args(&out, measured_steps()));
        if stage != "ppo" {
            argv.extend(
                ["--advantage-estimator", stage, "--num-generations", "2"].map(str::to_string),
            );
        }
        if stage == "sdpo" {
            // Every response has a demonstration in its group: all are distilled.
            argv.extend(["--success-reward-threshold", "-1e30"].map(str::to_string));
        }
        // BENCH_PPO_ARGS: more `ppo train` options, e.g. "--lora-r 16".
        argv.extend(
            std::env::var("BENCH_PPO_ARGS")
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string),
        );
        if decode == "eager" {
            argv.push("--no-cuda-graph".into());
        }
        ppo::train::run(&rlhf_tests::parse_args::<ppo::train::TrainArgs, _>(&argv)).unwrap();
        let m = metrics(&out);
        let (t_rollout, t_train) = (
            median(measured(&m, "time/rollout")),
            median(measured(&m, "time/train")),
        );
        let tokens = median(measured(&m, "response_length")) * self.rollout as f64;
        json!({"stage": stage, "model": arch, "decode": decode, "batch": self.rollout,
               "iterations_per_second": 1.0 / (t_rollout + t_train),
               "seconds_rollout": t_rollout, "seconds_train": t_train,
               "tokens_per_second": tokens / (t_rollout + t_train), "peak_rss_mb": peak_rss_mb()})
    }

    /// Generation alone: `rollout` prompts of 64 tokens, `response` new tokens each, no EOS.
    fn generate(&self, arch: &str, lm: &Path, config: &Value, rollout: i64, decode: &str) -> Value {
        let (dev, kind) = common::cli::DeviceArgs {
            device: self.device.parse().unwrap(),
            dtype: self.dtype.parse().unwrap(),
        }
        .resolve();
        let (model, _) = Model::load(lm, &common::ModelOptions::new(Head::Lm, dev, kind)).unwrap();
        let response = self.response;
        let ids = Tensor::randint_low(1, 95, [rollout, PROMPT as i64], (Kind::Int64, dev));
        let mask = Tensor::ones([rollout, PROMPT as i64], (Kind::Int64, dev));
        let cfg = SamplingConfig {
            max_new_tokens: response,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            eos_ids: vec![],
            pad_id: 0,
            seed: 0,
            cuda_graph: decode == "graphs",
        };
        let mut times = vec![];
        for i in 0..WARMUP + measured_steps() {
            let started = Instant::now();
            let out = generate(&model, &ids, &mask, &cfg);
            let _ = out.tokens.int64_value(&[0, 0]); // wait for the device
            if i >= WARMUP {
                times.push(started.elapsed().as_secs_f64());
            }
        }
        let seconds = median(times);
        let tps = (rollout * response) as f64 / seconds;
        let mut row = json!({"stage": "generate", "model": arch, "decode": decode,
            "batch": rollout, "tokens_per_second": tps,
            "ms_per_step": 1e3 * seconds / response as f64});
        if let Some(gbps) = self.peak_gbps {
            // Each step reads every matrix once and the KV cache (average length).
            let d = dims(&model, config);
            let bytes = model.kind().elt_size_in_bytes() as f64;
            let kv = 2.0
                * d.layers
                * d.kv_width
                * (PROMPT as f64 + response as f64 / 2.0)
                * rollout as f64;
            let bound = rollout as f64 * gbps * 1e9 / ((d.matmul_params + kv) * bytes);
            row["bandwidth_bound_tokens_per_second"] = json!(bound);
            row["fraction_of_bound"] = json!(tps / bound);
        }
        row
    }

    /// Every stage on the `arch` shape.
    fn rows(&self, arch: &str) -> Vec<Value> {
        let config = shape(arch, (self.seq + self.response as usize).max(512));
        // Random weights made on the benchmark's device (an 8B model in seconds on a GPU).
        let (dev, kind) = common::cli::DeviceArgs {
            device: self.device.parse().unwrap(),
            dtype: self.dtype.parse().unwrap(),
        }
        .resolve();
        let opts = |head| common::ModelOptions::new(head, dev, kind);
        let lm = model_dir(
            &self.root,
            &format!("{arch}-lm"),
            config.clone(),
            &opts(Head::Lm),
        );
        // BENCH_RM_FROM_LM=1: the policy's directory is the reward model too (its score head
        // initialised at load), which saves writing a second copy of a large model.
        let rm = if std::env::var_os("BENCH_RM_FROM_LM").is_some() {
            lm.clone()
        } else {
            model_dir(
                &self.root,
                &format!("{arch}-rm"),
                config.clone(),
                &opts(Head::Score),
            )
        };
        let wanted = |stage: &str| self.stages.iter().any(|s| s == stage);
        let mut rows = vec![];
        let supervised = [
            "sft",
            "sft-varied",
            "sft-packed",
            "sft-distill",
            "reward",
            "dpo",
        ];
        if supervised.iter().any(|s| wanted(s)) {
            // Training FLOPs per token: 6 per matrix parameter plus attention (PaLM's
            // 12·L·d·T); the reward model has a one-output score head instead of the
            // vocabulary head.
            let (model, _) = Model::load(&lm, &common::ModelOptions::cpu(Head::Lm)).unwrap();
            let d = dims(&model, &config);
            drop(model);
            let vocab_head = config["vocab_size"].as_f64().unwrap() * d.width;
            let attention = 12.0 * d.layers * d.width;
            let lm_flops = move |t: usize| 6.0 * d.matmul_params + attention * t as f64;
            let rm_flops =
                move |t: usize| 6.0 * (d.matmul_params - vocab_head) + attention * t as f64;
            if wanted("sft") {
                rows.push(self.supervised("sft", arch, &lm, &lm_flops));
            }
            for stage in ["sft-varied", "sft-packed"] {
                if wanted(stage) {
                    rows.push(self.sft_varied(stage, arch, &lm, &lm_flops));
                }
            }
            // Distillation: the student's forward and backward and the teacher's forward.
            let distill_flops =
                move |t: usize| lm_flops(t) + (2.0 * d.matmul_params + attention / 3.0 * t as f64);
            if wanted("sft-distill") {
                rows.push(self.supervised("sft-distill", arch, &lm, &distill_flops));
            }
            if wanted("reward") {
                rows.push(self.supervised("reward", arch, &lm, &rm_flops));
            }
            // DPO: the policy's forward and backward (6 per parameter) and the reference's
            // forward (2 more).
            let dpo_flops =
                move |t: usize| lm_flops(t) + (2.0 * d.matmul_params + attention / 3.0 * t as f64);
            if wanted("dpo") {
                rows.push(self.supervised("dpo", arch, &lm, &dpo_flops));
            }
        }
        for &decode in &self.decode_modes {
            for stage in ["ppo", "grpo", "rloo", "sdpo"] {
                if wanted(stage) {
                    rows.push(self.ppo(stage, arch, &lm, &rm, decode));
                }
            }
            if wanted("generate") {
                for &batch in &self.gen_batches {
                    rows.push(self.generate(arch, &lm, &config, batch, decode));
                }
            }
        }
        rows
    }
}

/// The rows as JSON lines, then as a table.
fn print_table(rows: &[Value]) {
    for r in rows {
        println!("{r}");
    }
    println!("\n| stage | model | tokens/s | steps/s | peak RSS (MB) | MFU or fraction of bandwidth bound |\n|---|---|---|---|---|---|");
    for r in rows {
        let f = |k: &str| {
            r.get(k)
                .and_then(Value::as_f64)
                .map_or("–".into(), |v| format!("{v:.1}"))
        };
        let steps = r.get("steps_per_second").or(r.get("iterations_per_second"));
        let utilisation = r
            .get("mfu")
            .or(r.get("fraction_of_bound"))
            .and_then(Value::as_f64)
            .map_or("–".into(), |v| format!("{:.1} %", 100.0 * v));
        let stage = match (r.get("decode"), r.get("batch")) {
            (Some(d), Some(b)) => format!(
                "{} ({}, batch {b})",
                r["stage"].as_str().unwrap(),
                d.as_str().unwrap()
            ),
            (None, Some(b)) => format!("{} (batch {b})", r["stage"].as_str().unwrap()),
            _ => r["stage"].as_str().unwrap().to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            stage,
            r["model"].as_str().unwrap(),
            f("tokens_per_second"),
            steps
                .and_then(Value::as_f64)
                .map_or("–".into(), |v| format!("{v:.2}")),
            f("peak_rss_mb"),
            utilisation
        );
    }
}

fn main() {
    common::logging::init();
    // BENCH_KEEP=DIR writes the models and data there and keeps them (to reuse them).
    let temp = tempfile::tempdir().unwrap();
    let kept = std::env::var_os("BENCH_KEEP").map(PathBuf::from);
    let root = kept.as_deref().unwrap_or(temp.path());
    std::fs::create_dir_all(root).unwrap();
    let bench = Bench::new(root);
    let shapes: String = env_or("BENCH_SHAPES", "gpt2,llama".to_string());
    let rows: Vec<Value> = shapes
        .split(',')
        .flat_map(|arch| bench.rows(arch))
        .collect();
    if main_rank() {
        print_table(&rows);
    }
}
