//! `sft train` on a tiny Mixture-of-Experts model (Qwen3-MoE's layout, with the tiny Llama
//! fixture's tokenizer): the routers' load-balancing loss is added and logged as TRL's
//! `aux_loss`, a large weight balances the routing that plain training leaves unbalanced,
//! and the option is refused where it cannot apply.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{Head, Model, ModelOptions};
use rlhf_tests::{assert_refused, cage_rows, ok, read_jsonl, run_bin};
use serde_json::json;
use tch::Kind;

struct Fixture {
    root: PathBuf,
    /// The tiny Llama (no experts).
    llama: PathBuf,
    moe: PathBuf,
    /// The same in gpt-oss's layout.
    gpt_oss: PathBuf,
    train: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sft-moe");
        rlhf_tests::tiny_llama_fixture(&root);
        let llama = root.join("model");
        let moe = root.join("moe");
        rlhf_tests::tiny_moe(&llama, &moe);
        let gpt_oss = root.join("gpt-oss");
        rlhf_tests::tiny_gpt_oss(&llama, &gpt_oss);
        let train = root.join("train.jsonl");
        std::fs::write(&train, cage_rows(0..24)).unwrap();
        Fixture {
            root,
            llama,
            moe,
            gpt_oss,
            train,
        }
    })
}

fn sft(model: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let f = fixture();
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        f.train.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--lr",
        "3e-3",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    run_bin(env!("CARGO_BIN_EXE_sft"), &args, &[])
}

/// The first `n` training rows, right-padded with 0: ids and mask.
fn first_rows(n: usize) -> (Vec<Vec<i64>>, Vec<Vec<i64>>) {
    let f = fixture();
    let rows = rlhf_tests::sft_rows(&f.moe, &f.train, 128);
    let t = rows.iter().take(n).map(|r| r.ids.len()).max().unwrap();
    rows.iter()
        .take(n)
        .map(|r| {
            let pad = t - r.ids.len();
            let ids = r.ids.iter().copied().chain(std::iter::repeat_n(0, pad));
            let mask = std::iter::repeat_n(1i64, r.ids.len()).chain(std::iter::repeat_n(0, pad));
            (ids.collect(), mask.collect())
        })
        .unzip()
}

/// The load-balancing loss of `dir`'s routers on the first training rows.
fn balance(dir: &Path) -> f64 {
    let model = Model::load(dir, &ModelOptions::cpu(Head::Lm)).unwrap().0;
    let (ids, mask) = first_rows(8);
    model.record_router_logits(true);
    let _ = model.hidden(
        &rlhf_tests::tensor_2d_i64(&json!(ids)),
        &rlhf_tests::tensor_2d_i64(&json!(mask)),
        None,
    );
    let aux = model.take_router_aux_loss().unwrap();
    aux.to_kind(Kind::Double).double_value(&[])
}

#[test]
fn load_balancing_loss_is_logged_and_balances_the_routers() {
    let f = fixture();
    let steps = "12";
    let (plain, balanced, default) = (
        f.root.join("run-plain"),
        f.root.join("run-balanced"),
        f.root.join("run-default"),
    );
    ok(&sft(
        &f.moe,
        &plain,
        &["--max-steps", steps, "--router-aux-loss-coef", "0"],
    ));
    ok(&sft(
        &f.moe,
        &balanced,
        &["--max-steps", steps, "--router-aux-loss-coef", "1"],
    ));
    ok(&sft(&f.moe, &default, &["--max-steps", "2"]));
    let plain_metrics = read_jsonl(&plain.join("metrics.jsonl"));
    assert!(plain_metrics.iter().all(|m| m.get("aux_loss").is_none()));
    // TRL's aux_loss every step: E·Σ f·P, about k = 2 when balanced, at most E = 4.
    for run in [&balanced, &default] {
        for m in read_jsonl(&run.join("metrics.jsonl")) {
            let aux = m["aux_loss"].as_f64().expect("aux_loss logged");
            assert!((1.0..=4.0).contains(&aux), "aux_loss {aux}");
        }
    }
    let (start, after_plain, after_balanced) = (
        balance(&f.moe),
        balance(&plain.join("final")),
        balance(&balanced.join("final")),
    );
    eprintln!("balance: start {start:.4}, plain {after_plain:.4}, balanced {after_balanced:.4}");
    assert!(
        after_balanced < start - 0.1 && after_balanced < after_plain - 0.1,
        "load-balancing loss: start {start}, after plain SFT {after_plain}, with weight 1 {after_balanced}"
    );
    // The task still learns with it.
    let loss = |run: &Path| {
        let m = read_jsonl(&run.join("metrics.jsonl"));
        (
            m[0]["train/loss"].as_f64().unwrap(),
            m[m.len() - 1]["train/loss"].as_f64().unwrap(),
        )
    };
    let (first, last) = loss(&balanced);
    assert!(
        last < first / 2.0,
        "train loss {first} → {last} with the balancing loss"
    );
}

#[test]
fn router_aux_loss_coef_is_refused_where_it_cannot_apply() {
    let f = fixture();
    assert_refused(
        &sft(
            &f.llama,
            &f.root.join("run-dense"),
            &["--router-aux-loss-coef", "0.01"],
        ),
        "--router-aux-loss-coef: ",
    );
    assert_refused(
        &sft(
            &f.moe,
            &f.root.join("run-negative"),
            &["--router-aux-loss-coef=-1"],
        ),
        "--router-aux-loss-coef must be ≥ 0",
    );
}

/// Mixtral's `router_jitter_noise` scales each training forward's router input by fresh
/// noise, which recomputed blocks would draw again, differently: with
/// `--gradient-checkpointing` it is refused with one line naming config.json; without,
/// it trains. The same field on Qwen3-MoE, whose routers have no jitter in transformers, is
/// ignored (checkpointing allowed, weights as without it).
#[test]
fn router_jitter_is_mixtrals_and_refused_with_checkpointing() {
    let f = fixture();
    let mixtral = f.root.join("mixtral-jitter");
    rlhf_tests::tiny_mixtral(&f.llama, &mixtral, 0.1);
    let steps = ["--max-steps", "1"];
    assert_refused(
        &sft(
            &mixtral,
            &f.root.join("run-jitter-gc"),
            &[&steps[..], &["--gradient-checkpointing"]].concat(),
        ),
        "router_jitter_noise 0.1 with --gradient-checkpointing is not supported",
    );
    ok(&sft(&mixtral, &f.root.join("run-jitter"), &steps));
    let qwen = f.root.join("moe-jitter-field");
    rlhf_tests::tiny_moe(&f.llama, &qwen);
    let config_path = qwen.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["router_jitter_noise"] = json!(0.1);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (with_field, without) = (f.root.join("run-field-gc"), f.root.join("run-nofield-gc"));
    let extra = [&steps[..], &["--gradient-checkpointing"]].concat();
    ok(&sft(&qwen, &with_field, &extra));
    ok(&sft(&f.moe, &without, &extra));
    let diff =
        rlhf_tests::max_weight_diff(&with_field.join("final"), &without.join("final"), Head::Lm);
    assert_eq!(diff, 0.0, "the field changed training");
}

/// Activation recomputation backpropagates each MoE block's share of the loss in its
/// recomputed backward: the weights and the logged losses are those of the run that keeps
/// its activations.
#[test]
fn gradient_checkpointing_keeps_the_load_balancing_gradient() {
    let f = fixture();
    let (kept, recomputed) = (f.root.join("run-kept"), f.root.join("run-recomputed"));
    let extra = ["--max-steps", "3", "--router-aux-loss-coef", "0.5"];
    ok(&sft(&f.moe, &kept, &extra));
    ok(&sft(
        &f.moe,
        &recomputed,
        &[&extra[..], &["--gradient-checkpointing"]].concat(),
    ));
    let diff =
        rlhf_tests::max_weight_diff(&kept.join("final"), &recomputed.join("final"), Head::Lm);
    assert!(
        diff < 1e-5,
        "recomputed vs kept activations: weights differ by {diff:e}"
    );
    let (a, b) = (
        read_jsonl(&kept.join("metrics.jsonl")),
        read_jsonl(&recomputed.join("metrics.jsonl")),
    );
    for (a, b) in a.iter().zip(&b) {
        let (x, y) = (
            a["aux_loss"].as_f64().unwrap(),
            b["aux_loss"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-5, "aux_loss {x} vs {y}");
    }
    // Without the loss the runs differ: it acts.
    let plain = f.root.join("run-kept-plain");
    ok(&sft(
        &f.moe,
        &plain,
        &["--max-steps", "3", "--router-aux-loss-coef", "0"],
    ));
    let acts = rlhf_tests::max_weight_diff(&kept.join("final"), &plain.join("final"), Head::Lm);
    assert!(
        acts > 1e-4,
        "the load-balancing loss changed the weights by {acts:e} only"
    );
}

/// LoRA on a MoE model adapts the attention (the experts and routers stay as they are):
/// PEFT loads the adapter on transformers' Qwen3-MoE, and transformers the merged model,
/// with our log-probs.
#[test]
fn lora_on_a_moe_model_loads_in_peft() {
    let f = fixture();
    let out = f.root.join("run-lora");
    let targets = "q_proj,k_proj,v_proj,o_proj";
    let extra = [
        "--max-steps",
        "3",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-target-modules",
        targets,
        "--save-merged",
    ];
    ok(&sft(&f.moe, &out, &extra));
    check_in_peft(&f.moe, &out);
    let stored =
        tch::Tensor::read_safetensors(out.join("final/adapter_model.safetensors")).unwrap();
    let names: Vec<&String> = stored.iter().map(|(name, _)| name).collect();
    assert!(names.iter().all(|k| k.contains(".self_attn.")), "{names:?}");
}

/// gpt-oss (attention sinks, a sliding and a full layer, a biased router, fused experts
/// with biases and the clamped SwiGLU) trains with LoRA on every linear layer and on the
/// fused experts' parameters (PEFT's `target_parameters`, as the gpt-oss recipes set it:
/// `gate_up_proj` in both layers, `down_proj` in layer 1 only, so layer 1 nests two
/// `ParamWrapper`s), the routers' load-balancing loss and activation recomputation: the
/// adapter of the run that keeps its activations, `aux_loss` logged, and PEFT loads it on
/// transformers' GptOss with our log-probs (transformers the merged model too); target
/// parameters that match nothing, or with LoRA dropout, are refused as PEFT refuses them.
#[test]
fn gpt_oss_trains_with_lora_and_loads_in_peft() {
    let f = fixture();
    let (kept, recomputed) = (f.root.join("run-oss"), f.root.join("run-oss-recomputed"));
    let extra = [
        "--max-steps",
        "3",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--lora-target-modules",
        "all-linear",
        "--lora-target-parameters",
        "mlp.experts.gate_up_proj,1.mlp.experts.down_proj",
        "--router-aux-loss-coef",
        "0.5",
        "--save-merged",
    ];
    ok(&sft(&f.gpt_oss, &kept, &extra));
    ok(&sft(
        &f.gpt_oss,
        &recomputed,
        &[&extra[..], &["--gradient-checkpointing"]].concat(),
    ));
    let diff =
        rlhf_tests::max_weight_diff(&kept.join("final"), &recomputed.join("final"), Head::Lm);
    assert!(diff < 1e-5, "recomputed vs kept activations: {diff:e}");
    for m in read_jsonl(&kept.join("metrics.jsonl")) {
        let aux = m["aux_loss"].as_f64().expect("aux_loss logged");
        assert!((1.0..=4.0).contains(&aux), "aux_loss {aux}");
    }
    check_in_peft(&f.gpt_oss, &kept);
    let stored =
        tch::Tensor::read_safetensors(kept.join("final/adapter_model.safetensors")).unwrap();
    let names: Vec<&String> = stored.iter().map(|(name, _)| name).collect();
    for module in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        assert!(
            names.iter().any(|k| k.contains(module)),
            "{module}: {names:?}"
        );
    }
    let key =
        |path: &str, ab: &str| format!("base_model.model.model.layers.{path}.lora_{ab}.weight");
    let mut expected: Vec<String> = ["0.mlp.experts", "1.mlp.experts.base_layer", "1.mlp.experts"]
        .iter()
        .flat_map(|p| [key(p, "A"), key(p, "B")])
        .collect();
    expected.sort();
    let mut found: Vec<String> = names
        .iter()
        .filter(|k| !k.contains(".self_attn."))
        .map(|k| k.to_string())
        .collect();
    found.sort();
    assert_eq!(found, expected);
    // The experts' adapters trained.
    let (_, b) = stored
        .iter()
        .find(|(k, _)| *k == key("1.mlp.experts", "B"))
        .unwrap();
    assert!(b.abs().max().double_value(&[]) > 0.0);
    assert_refused(
        &sft(
            &f.moe,
            &f.root.join("run-moe-params"),
            &["--lora-r", "4", "--lora-target-parameters", "mlp.experts.gate_up_proj"],
        ),
        "LoRA target parameters [\"mlp.experts.gate_up_proj\"] match no parameter of this qwen3_moe model",
    );
    assert_refused(
        &sft(
            &f.gpt_oss,
            &f.root.join("run-oss-dropout"),
            &[&extra[..10], &["--lora-dropout", "0.1"]].concat(),
        ),
        "LoRA dropout 0.1 with target parameters is not supported",
    );
}

/// The adapter in `out/final` on `base`, and `out/final_merged`: PEFT and transformers give
/// our log-probs (1e-4) on the first training rows, which the adapter changed.
fn check_in_peft(base: &Path, out: &Path) {
    let (ids, mask) = first_rows(3);
    let t = ids[0].len();
    let ids_path = out.join("lora-ids.json");
    std::fs::write(&ids_path, json!({"ids": ids, "mask": mask}).to_string()).unwrap();
    let (adapter, merged) = (out.join("final"), out.join("final_merged"));
    let theirs = rlhf_tests::run_python(
        "peft_reference.py",
        &[
            "check",
            "--adapter",
            adapter.to_str().unwrap(),
            "--merged",
            merged.to_str().unwrap(),
            "--ids",
            ids_path.to_str().unwrap(),
        ],
    );
    let ids = rlhf_tests::tensor_2d_i64(&json!(ids));
    let mask = rlhf_tests::tensor_2d_i64(&json!(mask));
    let model = Model::load(&adapter, &ModelOptions::cpu(Head::Lm))
        .unwrap()
        .0;
    let logits = tch::no_grad(|| model.forward(&ids, &mask));
    let n = t as i64 - 1;
    let ours = common::ops::logprobs_of(&logits.narrow(1, 0, n), &ids.narrow(1, 1, n));
    let valid = mask.narrow(1, 0, n) * mask.narrow(1, 1, n);
    let base = Model::load(base, &ModelOptions::cpu(Head::Lm)).unwrap().0;
    let base_logits = tch::no_grad(|| base.forward(&ids, &mask));
    let before = common::ops::logprobs_of(&base_logits.narrow(1, 0, n), &ids.narrow(1, 1, n));
    assert!(
        rlhf_tests::max_masked_diff(&ours, &before, &valid) > 1e-3,
        "the adapter changed nothing"
    );
    for key in ["adapter", "merged"] {
        let diff =
            rlhf_tests::max_masked_diff(&ours, &rlhf_tests::tensor_2d_f32(&theirs[key]), &valid);
        assert!(diff < 1e-4, "{key}: PEFT/transformers differ by {diff:e}");
    }
}
