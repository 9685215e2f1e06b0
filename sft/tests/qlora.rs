//! QLoRA: 4-bit base weights as bitsandbytes stores them, checked against `transformers`
//! with bitsandbytes (f32 compute, CPU) on tiny random Llama (NF4, nested) and GPT-2 (FP4,
//! Conv1D) models: quantized as they load, they give the log-probs of `transformers`' 4-bit
//! models and the very bytes bitsandbytes stores; its saved 4-bit directories load with
//! the same numbers; `sft train --load-in-4bit` trains a LoRA adapter that PEFT loads on
//! its 4-bit base with our log-probs, and whose merged model is the dequantized base plus
//! the update; a 4-bit base without an adapter is refused.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::models::quant::{Bnb4bit, QuantType};
use common::ops::logprobs_of;
use common::{Head, Model, ModelOptions};
use rlhf_tests::{assert_refused, ok, run_bin, run_python, tensor_2d_f32};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

/// (case, quant type, nested): as `bnb_reference.py`'s CASES.
const CASES: &[(&str, QuantType, bool)] = &[
    ("llama", QuantType::Nf4, true),
    ("gpt2", QuantType::Fp4, false),
];

struct Fixture {
    root: PathBuf,
    ids_path: PathBuf,
    rows: (Vec<Vec<i64>>, Vec<Vec<i64>>),
    reference: Value,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qlora");
        rlhf_tests::tiny_llama_fixture(&root);
        let (ids, mask) = rlhf_tests::padded_rows(&[9, 7, 4], 9, (89, 37));
        let ids_path = root.join("ids.json");
        std::fs::write(&ids_path, json!({"ids": ids, "mask": mask}).to_string()).unwrap();
        let reference = run_python(
            "bnb_reference.py",
            &[
                "make",
                "--root",
                root.to_str().unwrap(),
                "--tokenizer",
                root.join("model").to_str().unwrap(),
                "--ids",
                ids_path.to_str().unwrap(),
            ],
        );
        Fixture {
            root,
            ids_path,
            rows: (ids, mask),
            reference,
        }
    })
}

fn opts(quant_type: QuantType, nested: bool) -> ModelOptions {
    ModelOptions {
        quantization: Some(Bnb4bit::new(quant_type, nested)),
        ..ModelOptions::cpu(Head::Lm).frozen()
    }
}

/// Next-token log-probs `[B, T-1]`, zero where the next token is padding.
fn logprobs(model: &Model) -> Tensor {
    let f = fixture();
    let (ids, mask) = (
        Tensor::from_slice2(&f.rows.0),
        Tensor::from_slice2(&f.rows.1),
    );
    let t = ids.size()[1];
    let _guard = tch::no_grad_guard();
    let logits = model.forward(&ids, &mask);
    logprobs_of(&logits.narrow(1, 0, t - 1), &ids.narrow(1, 1, t - 1)) * mask.narrow(1, 1, t - 1)
}

fn max_diff(ours: &Tensor, theirs: &Value) -> f64 {
    let mask = Tensor::from_slice2(&fixture().rows.1);
    let t = mask.size()[1];
    ((ours - tensor_2d_f32(theirs)) * mask.narrow(1, 1, t - 1))
        .abs()
        .max()
        .double_value(&[])
}

fn load(dir: &Path, opts: &ModelOptions) -> Model {
    Model::load(dir, opts)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .0
}

#[test]
fn quantized_models_match_bitsandbytes_bytes_and_log_probs() {
    let f = fixture();
    for &(case, quant_type, nested) in CASES {
        let quantized = load(&f.root.join(case), &opts(quant_type, nested));
        let ours = logprobs(&quantized);
        let diff = max_diff(&ours, &f.reference[case]);
        assert!(
            diff < 1e-4,
            "{case}: log-probs differ from transformers' by {diff}"
        );
        // Not the full-precision model's numbers: the 4 bits are in the forward pass.
        let full = load(&f.root.join(case), &ModelOptions::cpu(Head::Lm).frozen());
        let moved = (logprobs(&full) - &ours).abs().max().double_value(&[]);
        assert!(
            moved > 1e-3,
            "{case}: 4-bit log-probs equal the f32 ones ({moved})"
        );

        // bitsandbytes' own directory: its quantization_config alone makes it 4-bit.
        let stored = load(
            &f.root.join(format!("{case}-4bit")),
            &ModelOptions::cpu(Head::Lm).frozen(),
        );
        let diff = max_diff(&logprobs(&stored), &f.reference[case]);
        assert!(diff < 1e-4, "{case}-4bit: log-probs differ by {diff}");
        let (ours, theirs) = (quantized.named_tensors(), stored.named_tensors());
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
        let layers = quantized.quantized_modules();
        assert_eq!(layers.len(), if case == "gpt2" { 8 } else { 14 }, "{case}");
        let (mut codes, mut moved_codes) = (0, 0);
        for (name, t) in &ours {
            if nested && name.ends_with(".absmax") {
                // Nested absmax codes: bitsandbytes' CPU kernel rounds a value close to
                // the midpoint of two codes of its dynamic map its own way; at most one
                // code apart, and rarely.
                let d = (t.to_kind(Kind::Int64) - theirs[name].to_kind(Kind::Int64)).abs();
                assert!(d.max().int64_value(&[]) <= 1, "{case}: {name}");
                codes += t.numel();
                moved_codes += d.sum(Kind::Int64).int64_value(&[]) as usize;
            } else if t.kind() == Kind::Uint8 || name.ends_with(".absmax") {
                // The packed weights and the absmax values are bitsandbytes' bytes:
                // quantized here as it quantizes.
                assert!(t.equal(&theirs[name]), "{case}: {name} differs");
            } else {
                let d = (t - &theirs[name]).abs().max().double_value(&[]);
                assert!(d < 1e-7, "{case}: {name} differs by {d}");
            }
        }
        assert!(
            moved_codes * 100 <= codes,
            "{case}: {moved_codes} of {codes} codes differ"
        );
    }
}

fn sft(args: &[&str]) -> std::process::Output {
    run_bin(env!("CARGO_BIN_EXE_sft"), args, &[])
}

#[test]
fn qlora_trains_an_adapter_peft_loads_on_its_4bit_base() {
    let f = fixture();
    let (case, quant_type, nested) = CASES[0];
    let base = f.root.join(case);
    let out = f.root.join("run");
    let data = f.root.join("sft.jsonl");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--overwrite",
            "--lr",
            "2e-2",
            "--batch-size",
            "4",
            "--max-steps",
            "6",
            "--schedule",
            "constant",
        ];
        args.extend_from_slice(extra);
        sft(&args)
    };
    let result = ok(&train(&[
        "--load-in-4bit",
        "--use-bnb-nested-quant",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-target-modules",
        "all-linear",
        "--save-merged",
    ]));
    let losses: Vec<f64> = rlhf_tests::read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter_map(|m| m["train/loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 2 && losses.last() < losses.first(),
        "the loss did not fall: {losses:?} ({result})"
    );

    // Counted as PEFT counts a 4-bit model: every weight of the base, two per packed byte.
    let full = load(&base, &ModelOptions::cpu(Head::Lm).frozen());
    let weights: i64 = full
        .named_tensors()
        .values()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(
        result["total_parameters"].as_i64().unwrap(),
        weights + result["trainable_parameters"].as_i64().unwrap(),
        "{result}"
    );

    // Ours on the 4-bit base, as the run left it (the adapter says how its base was held,
    // so plain options load it so), against PEFT on transformers' 4-bit base.
    let adapter = out.join("final");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["rlhf_base_quantization_config"]["bnb_4bit_quant_type"], "nf4",
        "{config}"
    );
    let ours = logprobs(&load(&adapter, &ModelOptions::cpu(Head::Lm).frozen()));
    let theirs = run_python(
        "bnb_reference.py",
        &[
            "check",
            "--adapter",
            adapter.to_str().unwrap(),
            "--case",
            case,
            "--ids",
            f.ids_path.to_str().unwrap(),
        ],
    );
    let diff = max_diff(&ours, &theirs);
    assert!(diff < 1e-4, "PEFT's log-probs differ by {diff}");
    let base_only = logprobs(&load(&base, &opts(quant_type, nested)));
    let moved = (&ours - base_only).abs().max().double_value(&[]);
    assert!(moved > 1e-3, "the adapter changed nothing ({moved})");

    // The merged model: a plain f32 directory, the dequantized base plus the update.
    let merged = out.join("final_merged");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert!(config.get("quantization_config").is_none(), "{config}");
    let plain = logprobs(&load(&merged, &ModelOptions::cpu(Head::Lm).frozen()));
    let d = (&plain - &ours).abs().max().double_value(&[]);
    assert!(d < 1e-4, "the merged model differs by {d}");

    // A 4-bit base cannot train by itself, asked for or stored so.
    assert_refused(
        &train(&["--load-in-4bit"]),
        "4-bit base weights cannot train; add --lora-r (QLoRA) or --prompt-tuning-tokens",
    );
    let stored = f.root.join(format!("{case}-4bit"));
    let out = sft(&[
        "train",
        "--model",
        stored.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        f.root.join("refused").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_refused(
        &out,
        "is stored in 4 bits (quantization_config): 4-bit base weights cannot train",
    );
    assert_refused(
        &train(&["--use-bnb-nested-quant", "--lora-r", "4"]),
        "--bnb-4bit-quant-type and --use-bnb-nested-quant need --load-in-4bit",
    );

    // `sft eval --load-in-4bit` on the f32 base scores as the directory bitsandbytes saved
    // in 4 bits does (the same weights but for a rare nested code), not as the f32 base.
    let eval = |model: &Path, extra: &[&str]| {
        let args = [
            &[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--device",
                "cpu",
            ][..],
            extra,
        ]
        .concat();
        ok(&sft(&args))["loss"].as_f64().unwrap()
    };
    let asked = eval(&base, &["--load-in-4bit", "--use-bnb-nested-quant"]);
    let saved = eval(&f.root.join(format!("{case}-4bit")), &[]);
    let full = eval(&base, &[]);
    assert!(
        (asked - saved).abs() < 1e-4 * saved.abs() && (asked - full).abs() > 1e-3,
        "4-bit {asked}, bitsandbytes' {saved}, f32 {full}"
    );
}

/// `--optim adamw_8bit` against bitsandbytes' AdamW8bit on the CPU over six steps of fixed
/// gradients: a 64 × 128 weight and a 4500-element one (18 blocks, the last short) with
/// 8-bit moments, a 100-element bias (under bitsandbytes' 4096-element minimum) with f32
/// ones and no weight decay.
#[test]
fn eight_bit_adamw_follows_bitsandbytes() {
    use common::optim::{AdamW, AdamWConfig};
    use tch::{nn, Device};
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("adam8");
    std::fs::create_dir_all(&root).unwrap();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let shapes: [(&str, &[i64]); 3] = [
        ("layer.weight", &[64, 128]),
        ("layer.bias", &[100]),
        ("other.weight", &[4500]),
    ];
    let mut given: Vec<(String, Tensor)> = vec![];
    for (name, shape) in shapes {
        let (module, leaf) = name.split_once('.').unwrap();
        let init = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.1;
        let _ = (vs.root() / module).var_copy(leaf, &init);
        given.push((format!("param.{name}"), init));
    }
    let steps = 6;
    for step in 0..steps {
        for (name, shape) in shapes {
            // Gradients of changing scale, so that the blocks' absmax values move.
            let g = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * (0.5 + step as f64);
            given.push((format!("grad.{name}.{step}"), g));
        }
    }
    let steps_path = root.join("steps.safetensors");
    Tensor::write_safetensors(&given, &steps_path).unwrap();
    let (lr, wd) = (1e-2, 0.1);
    let config = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: wd,
        loraplus_lr_ratio: None,
        eight_bit: true,
    };
    let vars = vs.variables();
    let mut opt = AdamW::new(vs.variables(), config);
    let grads: std::collections::HashMap<String, Tensor> = given.into_iter().collect();
    for step in 0..steps {
        let _guard = tch::no_grad_guard();
        for (name, _) in shapes {
            vars[name]
                .grad()
                .copy_(&grads[&format!("grad.{name}.{step}")]);
        }
        opt.step(lr);
    }
    let out = root.join("bnb.safetensors");
    run_python(
        "bnb_reference.py",
        &[
            "adam8",
            "--steps",
            steps_path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--lr",
            &lr.to_string(),
            "--wd",
            &wd.to_string(),
        ],
    );
    let theirs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let state = opt.state().unwrap();
    let state = state.tensors();
    for (name, _) in shapes {
        let (ours, bnb) = (&vars[name], &theirs[&format!("param.{name}")]);
        let off = (ours - bnb).abs();
        let moved = (ours - &grads[&format!("param.{name}")])
            .abs()
            .max()
            .double_value(&[]);
        let close = off
            .le(1e-6)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        let worst = off.max().double_value(&[]);
        println!("{name}: moved {moved:e}, {close} within 1e-6, worst {worst:e}");
        if bnb.numel() < 4096 {
            // f32 moments in both (bitsandbytes' own formula, the same update).
            assert!(worst < 1e-7, "{name}: {worst:e}");
            continue;
        }
        // bitsandbytes' CPU kernel picks the farther of two codes for a value close to
        // their midpoint (its approximate binary search; ours takes the nearest, as its
        // pure-torch fallback does): a few codes differ after the first step, and those
        // elements' updates then differ by a step's share of the moment.
        for (key, theirs_key) in [("exp_avg", "state1"), ("exp_avg_sq", "state2")] {
            let a = state[&format!("{key}.{name}")]
                .flatten(0, -1)
                .to_kind(Kind::Int64);
            let b = theirs[&format!("{theirs_key}.{name}")]
                .flatten(0, -1)
                .to_kind(Kind::Int64);
            let differ = (&a - &b).ne(0).sum(Kind::Int64).int64_value(&[]);
            println!("  {key}: {differ} of {} codes differ", a.numel());
            assert!(
                differ * 100 <= a.numel() as i64,
                "{name} {key}: {differ} codes differ"
            );
            for (absmax, theirs_absmax) in [
                ("exp_avg_absmax", "absmax1"),
                ("exp_avg_sq_absmax", "absmax2"),
            ] {
                let (x, y) = (
                    &state[&format!("{absmax}.{name}")],
                    &theirs[&format!("{theirs_absmax}.{name}")],
                );
                let rel = ((x - y).abs() / y.abs().clamp_min(1e-30))
                    .max()
                    .double_value(&[]);
                assert!(rel < 0.05, "{name} {absmax}: {rel}");
            }
        }
        assert!(
            close > 0.9 && worst < 0.05 * moved,
            "{name}: {close} within 1e-6, worst {worst:e} of {moved:e}"
        );
    }
}
