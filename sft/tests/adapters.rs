//! LoRA and prompt tuning as PEFT does them (f32, CPU), on tiny random `transformers`
//! models of GPT-2 (Conv1D, `fan_in_fan_out`), Llama (GQA, untied, rsLoRA) and Qwen2
//! (q/k/v biases, tied). Prompt tuning: PEFT's adapters load with its log-probs, ours
//! load in PEFT with ours, and generation with the KV cache equals full forwards. LoRA:
//! adapters PEFT made and randomised load here with PEFT's log-probs and scores; adapters
//! `sft train` wrote load in PEFT, and their merged models in plain `transformers`, with
//! ours; step 0 is the base model exactly, only the adapters train and the base stays
//! bit-identical; a killed adapter run resumes to the same adapter; bad adapter inputs
//! end in one line.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::cli::OptimArgs;
use common::models::adapter::without_adapters;
use common::models::lora::{LoraConfig, LoraInit, TargetModules};
use common::ops::logprobs_of;
use common::scoring::last_token_scores;
use common::{Head, Model, ModelOptions, Trainee, World};
use rlhf_tests::{ok, run_bin, run_python, tensor_2d_f32};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

const ARCHS: &[&str] = &["gpt2", "llama", "qwen2"];

struct Fixture {
    root: PathBuf,
    ids_path: PathBuf,
    rows: (Vec<Vec<i64>>, Vec<Vec<i64>>),
    reference: Value,
}

impl Fixture {
    /// The rows' ids and mask, `[B, T]`.
    fn batch(&self) -> (Tensor, Tensor) {
        (
            Tensor::from_slice2(&self.rows.0),
            Tensor::from_slice2(&self.rows.1),
        )
    }

    /// 1 where the next token is real, `[B, T-1]`.
    fn next_mask(&self) -> Tensor {
        let (ids, mask) = self.batch();
        mask.narrow(1, 1, ids.size()[1] - 1)
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lora");
        rlhf_tests::tiny_llama_fixture(&root);
        // Right-padded rows of ids 3..300 (0 is padding).
        let (ids, mask) = rlhf_tests::padded_rows(&[9, 6, 4], 9, (97, 31));
        let ids_path = root.join("ids.json");
        std::fs::write(&ids_path, json!({"ids": ids, "mask": mask}).to_string()).unwrap();
        let reference = run_python(
            "peft_reference.py",
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
            rows: (ids, mask),
            root,
            ids_path,
            reference,
        }
    })
}

/// Next-token log-probs `[B, T-1]`, zeroed where the next token is padding.
fn logprobs(model: &Model) -> Tensor {
    let _guard = tch::no_grad_guard();
    logprobs_with_grad(model)
}

fn logprobs_with_grad(model: &Model) -> Tensor {
    let f = fixture();
    let (ids, mask) = f.batch();
    let t = ids.size()[1];
    let logits = model.forward(&ids, &mask);
    logprobs_of(&logits.narrow(1, 0, t - 1), &ids.narrow(1, 1, t - 1)) * f.next_mask()
}

/// PEFT's log-probs of each (adapter, merged model) directory pair, in one Python
/// process: `{"adapter": …, "merged": …}` each.
fn peft_check(cases: &[(PathBuf, Option<PathBuf>)]) -> Vec<Value> {
    let cases: Vec<Value> = cases
        .iter()
        .map(|(adapter, merged)| json!({"adapter": adapter, "merged": merged}))
        .collect();
    let out = run_python(
        "peft_reference.py",
        &[
            "check",
            "--cases",
            &Value::from(cases).to_string(),
            "--ids",
            fixture().ids_path.to_str().unwrap(),
        ],
    );
    serde_json::from_value(out).unwrap()
}

fn max_diff(ours: &Tensor, theirs: &Value) -> f64 {
    let theirs = tensor_2d_f32(theirs);
    ((ours - theirs) * fixture().next_mask())
        .abs()
        .max()
        .double_value(&[])
}

fn load(dir: &Path, head: Head) -> Model {
    Model::load(dir, &ModelOptions::cpu(head))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .0
}

fn sft(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_bin(env!("CARGO_BIN_EXE_sft"), args, env)
}

/// `sft train` with LoRA on `arch` for `steps` steps into `out`.
fn train_adapter(arch: &str, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let f = fixture();
    let model = f.root.join(arch);
    let data = f.root.join("sft.jsonl");
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--overwrite",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lr",
        "2e-2",
        "--batch-size",
        "4",
        "--schedule",
        "constant",
    ];
    args.extend_from_slice(extra);
    sft(&args, env)
}

#[test]
fn peft_adapters_load_here_with_peft_numbers() {
    let f = fixture();
    for arch in ARCHS {
        let r = &f.reference[arch];
        let base = logprobs(&load(&f.root.join(arch), Head::Lm));
        assert!(max_diff(&base, &r["base"]) < 1e-4, "{arch}: base");
        let adapted = logprobs(&load(&f.root.join(format!("{arch}-peft")), Head::Lm));
        let diff = max_diff(&adapted, &r["peft"]);
        assert!(
            diff < 1e-4,
            "{arch}: PEFT adapter log-probs differ by {diff:e}"
        );
        assert!(
            max_diff(&adapted, &r["base"]) > 1e-3,
            "{arch}: the adapter changed nothing"
        );
        // Prefix tuning: keys and values in every layer (the key/value heads' of GQA);
        // with PEFT's projection, the prefix its MLP gave, as PEFT saves it.
        for case in ["prefix", "prefix_projected"] {
            let dir = f.root.join(format!("{arch}-{}", case.replace('_', "-")));
            let prefix = logprobs(&load(&dir, Head::Lm));
            let diff = max_diff(&prefix, &r[case]);
            assert!(
                diff < 1e-4,
                "{arch}: PEFT {case} log-probs differ by {diff:e}"
            );
            assert!(
                max_diff(&prefix, &r["base"]) > 1e-3,
                "{arch}: {case} changed nothing"
            );
        }
        // DoRA: log-probs, and the gradient of every adapter tensor (the row norm held
        // constant, as PEFT).
        let dora = load(&f.root.join(format!("{arch}-dora")), Head::Lm);
        let lp = logprobs_with_grad(&dora);
        let diff = max_diff(&lp, &r["dora"]);
        assert!(
            diff < 1e-4,
            "{arch}: PEFT DoRA log-probs differ by {diff:e}"
        );
        lp.sum(Kind::Float).backward();
        let tensors = dora.named_tensors();
        let grads = r["dora_grad"].as_object().unwrap();
        assert_eq!(
            grads.len(),
            tensors.keys().filter(|n| n.contains(".lora_")).count(),
            "{arch}"
        );
        for (name, theirs) in grads {
            let ours = tensors[name].grad();
            let theirs = match theirs {
                Value::Array(rows) if rows.first().is_some_and(Value::is_array) => {
                    tensor_2d_f32(theirs)
                }
                _ => {
                    Tensor::from_slice(&serde_json::from_value::<Vec<f32>>(theirs.clone()).unwrap())
                }
            };
            let diff = (&ours - &theirs).abs().max().double_value(&[]);
            let scale = theirs.abs().max().double_value(&[]).max(1.0);
            assert!(
                diff < 1e-4 * scale,
                "{arch}: DoRA gradient of {name} differs by {diff:e}"
            );
        }
        // A reward model's adapter: LoRA on every linear layer and a trained score head.
        let scorer = load(&f.root.join(format!("{arch}-peft-score")), Head::Score);
        let (ids, mask) = f.batch();
        let ours = last_token_scores(&scorer, &ids, &mask);
        let theirs = Tensor::from_slice(
            &serde_json::from_value::<Vec<f32>>(r["peft_score"].clone()).unwrap(),
        );
        let diff = (ours - theirs).abs().max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "{arch}: PEFT reward adapter scores differ by {diff:e}"
        );
    }
}

#[test]
fn trained_adapters_load_in_peft_and_merge_into_plain_models() {
    let f = fixture();
    let all_linear: &[&str] = &["--lora-target-modules", "all-linear"];
    let dora: &[&str] = &["--lora-target-modules", "all-linear", "--use-dora"];
    let saved: &[&str] = &["--lora-modules-to-save", "embed_tokens,lm_head"];
    let tokens: &[&str] = &["--trainable-token-indices", "3,65,158,251"];
    let cases = [
        ("gpt2", "", &[][..]),
        ("llama", "", &[][..]),
        ("qwen2", "", all_linear),
        // DoRA on GPT-2's Conv1D layers and on Qwen2's biased projections.
        ("gpt2", "-dora", dora),
        ("qwen2", "-dora", dora),
        // Trained copies of Qwen2's tied embedding and head (merged: untied), and trained
        // rows of them.
        ("qwen2", "-save", saved),
        ("qwen2", "-tokens", tokens),
    ];
    let mut trained = vec![];
    for (arch, variant, targets) in cases {
        let out = f.root.join(format!("run-{arch}{variant}"));
        let extra = [&["--max-steps", "3", "--save-merged"], targets].concat();
        ok(&train_adapter(arch, &out, &extra, &[]));
        let final_dir = out.join("final");
        assert!(final_dir.join("adapter_config.json").exists());
        assert!(
            !final_dir.join("model.safetensors").exists(),
            "{arch}{variant}: the base was saved"
        );
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(final_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["use_dora"], json!(variant == "-dora"));
        let model = load(&final_dir, Head::Lm);
        if variant == "-save" {
            assert_eq!(
                config["modules_to_save"],
                json!(["embed_tokens", "lm_head"])
            );
            let t = model.named_tensors();
            for copy in ["model.embed_tokens", "lm_head"] {
                let moved = (&t[&format!("{copy}.modules_to_save.weight")]
                    - &t["model.embed_tokens.weight"])
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(moved > 1e-4, "{copy}: the copy did not train ({moved:e})");
            }
        }
        if variant == "-tokens" {
            assert_eq!(config["trainable_token_indices"], json!([3, 65, 158, 251]));
            let t = model.named_tensors();
            let rows = t["model.embed_tokens.weight"]
                .index_select(0, &Tensor::from_slice(&[3i64, 65, 158, 251]));
            let delta = &t["model.embed_tokens.token_adapter.trainable_tokens_delta"];
            let moved = (delta - rows).abs().max().double_value(&[]);
            assert!(moved > 1e-4, "the token rows did not train ({moved:e})");
        }
        let b_max = model
            .named_tensors()
            .iter()
            .filter(|(n, _)| n.contains(".lora_B."))
            .map(|(_, t)| t.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(
            b_max > 1e-4,
            "{arch}{variant}: B is still zero after training"
        );
        // The adapter is usable wherever a model directory is: sft eval.
        let data = f.root.join("sft.jsonl");
        let res = sft(
            &[
                "eval",
                "--model",
                final_dir.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--device",
                "cpu",
            ],
            &[],
        );
        assert!(ok(&res)["loss"].as_f64().unwrap().is_finite());
        trained.push((format!("{arch}{variant}"), logprobs(&model), out));
    }
    let checks = peft_check(
        &trained
            .iter()
            .map(|(_, _, out)| (out.join("final"), Some(out.join("final_merged"))))
            .collect::<Vec<_>>(),
    );
    for ((name, ours, _), check) in trained.iter().zip(&checks) {
        let diff = max_diff(ours, &check["adapter"]);
        assert!(diff < 1e-4, "{name}: PEFT reads our adapter {diff:e} away");
        let diff = max_diff(ours, &check["merged"]);
        assert!(
            diff < 1e-4,
            "{name}: transformers reads our merged model {diff:e} away"
        );
    }
}

/// PEFT's per-layer settings (`rank_pattern`, `alpha_pattern`, `exclude_modules`,
/// `layers_to_transform` with `layers_pattern`, rsLoRA, a regular expression as
/// `target_modules`) and its starts that move part of the base into the adapter (PiSSA,
/// OLoRA: redone on the base as the adapter loads): adapters PEFT made load here with its
/// log-probs, and what we save of them (PiSSA and OLoRA as plain LoRA of rank 2r) loads in
/// PEFT on the unchanged base, and merged in plain `transformers`, with ours.
#[test]
fn peft_layer_patterns_load_and_round_trip() {
    let f = fixture();
    let cases = f.reference["patterns"].as_object().unwrap();
    assert_eq!(cases.len(), 9);
    let mut saved = vec![];
    for (case, theirs) in cases {
        let model = load(&f.root.join(case), Head::Lm);
        let ours = logprobs(&model);
        let diff = max_diff(&ours, theirs);
        assert!(
            diff < 1e-4,
            "{case}: log-probs differ from PEFT's by {diff:e}"
        );
        let base = f.reference[case.split('-').next().unwrap()]["base"].clone();
        assert!(
            max_diff(&ours, &base) > 1e-3,
            "{case}: the adapter changed nothing"
        );
        let out = f.root.join(format!("saved-{case}"));
        model.save(&out.join("adapter"), None).unwrap();
        if case.ends_with("pissa") || case.ends_with("olora") {
            let config: Value = serde_json::from_str(
                &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                (&config["r"], &config["init_lora_weights"]),
                (&json!(8), &json!(true)),
                "{case}"
            );
        }
        model
            .save_merged(&out.join("merged"), Some(&f.root.join("llama")))
            .unwrap();
        saved.push((case, ours, out));
    }
    let checks = peft_check(
        &saved
            .iter()
            .map(|(_, _, out)| (out.join("adapter"), Some(out.join("merged"))))
            .collect::<Vec<_>>(),
    );
    for ((case, ours, _), check) in saved.iter().zip(&checks) {
        let diff = max_diff(ours, &check["adapter"]);
        assert!(diff < 1e-4, "{case}: PEFT reads our adapter {diff:e} away");
        let diff = max_diff(ours, &check["merged"]);
        assert!(diff < 1e-4, "{case}: the merged model is {diff:e} away");
    }
}

/// The virtual-token options of the soft-prompt runs: prompt tuning, text-initialised,
/// and prefix tuning; with the `peft_type` each writes.
const SOFT_PROMPTS: [(&str, &[&str]); 2] = [
    (
        "PROMPT_TUNING",
        &[
            "--prompt-tuning-tokens",
            "4",
            "--prompt-tuning-init",
            "text",
            "--prompt-tuning-init-text",
            "heads and legs",
        ],
    ),
    ("PREFIX_TUNING", &["--prefix-tuning-tokens", "3"]),
];

/// `sft train` with the virtual tokens `soft` for `arch`, into `out`.
fn train_prompt(arch: &str, out: &Path, soft: &[&str]) -> Output {
    let f = fixture();
    let (model, data) = (f.root.join(arch), f.root.join("sft.jsonl"));
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--overwrite",
        "--lr",
        "5e-2",
        "--max-steps",
        "3",
        "--batch-size",
        "4",
    ];
    args.extend(soft);
    sft(&args, &[])
}

/// Prompt tuning (text-initialised) and prefix tuning trained by `sft train` on every
/// architecture: only the virtual tokens change, PEFT reads the adapter with our log-probs
/// (1e-4), and greedy decoding with the cache (the virtual tokens, or the prefix's keys
/// and values, cached once) equals recomputing every step.
#[test]
fn trained_soft_prompts_load_in_peft_and_generate_with_the_cache() {
    let f = fixture();
    let mut prompts = vec![];
    for (arch, (peft_type, soft)) in ARCHS.iter().flat_map(|a| SOFT_PROMPTS.map(|s| (a, s))) {
        let out = f.root.join(format!("run-{peft_type}-{arch}"));
        ok(&train_prompt(arch, &out, soft));
        let final_dir = out.join("final");
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(final_dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], peft_type);
        if peft_type == "PROMPT_TUNING" {
            assert_eq!(config["prompt_tuning_init"], "TEXT");
        }
        let model = load(&final_dir, Head::Lm);
        let names: Vec<String> = model.named_tensors().into_keys().collect();
        assert!(names.contains(&"prompt_embeddings".to_string()));
        // Only the virtual tokens trained: every other tensor is the base's.
        let base = load(&f.root.join(arch), Head::Lm).named_tensors();
        for (name, t) in model
            .named_tensors()
            .iter()
            .filter(|(n, _)| *n != "prompt_embeddings")
        {
            assert!(t.equal(&base[name]), "{arch}: {name} changed");
        }
        let ours = logprobs(&model);
        prompts.push((arch, ours, final_dir.clone()));
        // Greedy decoding with the KV cache (the virtual tokens cached once) equals
        // recomputing every step from scratch.
        let prompt = Tensor::from_slice(&[5i64, 17, 42, 9]).unsqueeze(0);
        let ones = Tensor::ones([1, 4], (Kind::Int64, tch::Device::Cpu));
        let cfg = common::generate::SamplingConfig {
            max_new_tokens: 6,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            eos_ids: vec![],
            pad_id: 0,
            seed: 0,
            cuda_graph: true,
        };
        let cached = common::generate::generate(&model, &prompt, &ones, &cfg);
        let mut ids = prompt.shallow_clone();
        let _guard = tch::no_grad_guard();
        for _ in 0..6 {
            let mask = Tensor::ones_like(&ids);
            let next = model.forward(&ids, &mask).select(1, -1).argmax(-1, false);
            ids = Tensor::cat(&[ids, next.unsqueeze(1)], 1);
        }
        assert!(
            cached.tokens.equal(&ids.narrow(1, 4, 6)),
            "{arch} {peft_type}: cached decoding differs"
        );
    }
    let checks = peft_check(
        &prompts
            .iter()
            .map(|(_, _, dir)| (dir.clone(), None))
            .collect::<Vec<_>>(),
    );
    assert_eq!(checks.len(), 2 * ARCHS.len());
    for ((arch, ours, dir), check) in prompts.iter().zip(&checks) {
        let diff = max_diff(ours, &check["adapter"]);
        assert!(
            diff < 1e-4,
            "{arch} {}: PEFT reads our soft prompt {diff:e} away",
            dir.display()
        );
    }
}

/// For LoRA and DoRA (whose magnitude starts at the base weights' row norms), and the
/// starts that move part of the base into the adapter (PiSSA, OLoRA: step 0 is the base up
/// to rounding). With the adapters off the model is still the base it started from (the
/// reference of PPO and DPO); the saved adapter (PiSSA's as plain LoRA of rank 2r) loads
/// with the trained model's numbers, and restores it exactly in a model started anew (a
/// resumed run).
#[test]
fn step_zero_is_the_base_and_only_the_adapters_train() {
    let f = fixture();
    let dir = f.root.join("llama");
    let base = load(&dir, Head::Lm);
    let base_logprobs = logprobs(&base);
    let cases = [
        (false, LoraInit::Kaiming),
        (true, LoraInit::Kaiming),
        (false, LoraInit::Gaussian),
        (false, LoraInit::Pissa),
        (true, LoraInit::Olora),
    ];
    for (use_dora, init) in cases {
        let case = format!("dora {use_dora}, init {}", init.name());
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::AllLinear,
            use_rslora: false,
            use_dora,
            patterns: Default::default(),
            init,
            modules_to_save: vec![],
            trainable_token_indices: vec![],
            target_parameters: vec![],
        };
        let opts = ModelOptions::cpu(Head::Lm).with_lora(Some(lora));
        let (model, _) = Model::load(&dir, &opts).unwrap();
        let start = logprobs(&model);
        if init.moves_base() {
            let diff = max_diff(&start, &f.reference["llama"]["base"]);
            assert!(diff < 1e-5, "{case}: step 0 is {diff:e} from the base");
        } else {
            assert!(
                start.equal(&base_logprobs),
                "{case}: step 0 differs from the base"
            );
        }
        let frozen: Vec<(String, Tensor)> = model
            .named_tensors()
            .into_iter()
            .filter(|(n, _)| !n.contains(".lora_"))
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        let optim: OptimArgs = rlhf_tests::parse_args(&["--lr", "5e-2"]);
        let mut trainee =
            Trainee::new("", model, &dir, &optim, &World::single(), optim.schedule(3)).unwrap();
        let trained: Vec<String> = trainee.optimizer.parameter_names();
        assert!(
            !trained.is_empty() && trained.iter().all(|n| n.contains(".lora_")),
            "{trained:?}"
        );
        assert_eq!(
            trained.len(),
            (2 + usize::from(use_dora)) * 7 * 2,
            "A and B (and DoRA's magnitude) of 7 linear layers in 2 blocks"
        );
        for _ in 0..3 {
            let loss = -logprobs_with_grad(&trainee.model).mean(Kind::Float);
            loss.backward();
            let outcome = trainee.step(loss.double_value(&[]));
            assert!(!outcome.skipped);
        }
        let after = trainee.model.named_tensors();
        for (name, before) in &frozen {
            assert!(after[name].equal(before), "{case}: {name} changed");
        }
        let trained = logprobs(&trainee.model);
        assert!(max_diff(&trained, &f.reference["llama"]["base"]) > 1e-3);
        let off = without_adapters(|| logprobs(&trainee.model));
        let diff = max_diff(&off, &f.reference["llama"]["base"]);
        assert!(diff < 1e-5, "{case}: adapters off, {diff:e} from the base");
        let saved = f.root.join(format!("step-zero-{use_dora}-{}", init.name()));
        trainee.model.save(&saved, None).unwrap();
        let reloaded = logprobs(&load(&saved, Head::Lm));
        let diff = (reloaded - &trained).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{case}: the saved adapter is {diff:e} away");
        let (resumed, _) = Model::load(&dir, &opts).unwrap();
        resumed.load_weights(&saved).unwrap();
        assert!(
            logprobs(&resumed).equal(&logprobs(&trainee.model)),
            "{case}: restored from its save, the model differs"
        );
        if init.moves_base() {
            // A save whose start is not the one the base gives here (another machine's
            // SVD): the base is re-based to it, and is still the base with adapters off.
            let other = f.root.join(format!("{}-other-start", saved.display()));
            std::fs::create_dir_all(&other).unwrap();
            let config = "adapter_config.json";
            std::fs::copy(saved.join(config), other.join(config)).unwrap();
            let file = "adapter_model.safetensors";
            let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(saved.join(file))
                .unwrap()
                .into_iter()
                .map(|(n, t)| {
                    if n.contains(".lora_A.") {
                        (n, t * 1.01)
                    } else {
                        (n, t)
                    }
                })
                .collect();
            Tensor::write_safetensors(&tensors, other.join(file)).unwrap();
            let (rebased, _) = Model::load(&dir, &opts).unwrap();
            rebased.load_weights(&other).unwrap();
            let off = without_adapters(|| logprobs(&rebased));
            let diff = max_diff(&off, &f.reference["llama"]["base"]);
            assert!(
                diff < 1e-5,
                "{case}: re-based, adapters off, {diff:e} from the base"
            );
            let theirs = logprobs(&load(&other, Head::Lm));
            let diff = (logprobs(&rebased) - theirs).abs().max().double_value(&[]);
            assert!(
                diff < 1e-5,
                "{case}: re-based, {diff:e} from the adapter loaded anew"
            );
        }
    }
}

/// With LoRA dropout, too: the checkpoint keeps the random generator's state
/// (`rng_state_0.safetensors`), so the resumed steps draw the uninterrupted run's masks.
/// DoRA (its dropout path recomputes the base output), LoRA+ and PiSSA (its checkpoint is
/// the plain rank-2r adapter, split again on resume) ride along.
#[test]
fn killed_adapter_run_resumes_to_the_same_adapter() {
    let f = fixture();
    let args = [
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--lora-dropout",
        "0.3",
        "--use-dora",
        "--loraplus-lr-ratio",
        "4",
        "--init-lora-weights",
        "pissa",
    ];
    let straight = f.root.join("run-resume-straight");
    ok(&train_adapter("llama", &straight, &args, &[]));
    let killed = f.root.join("run-resume-killed");
    let res = train_adapter("llama", &killed, &args, &[("RLHF_CRASH_AT", "mid-step@3")]);
    assert!(!res.status.success(), "the run was not killed");
    // A checkpoint of an adapter run is megabytes of adapter, not the base.
    let ckpt = killed.join("checkpoints/step-000002");
    assert!(
        ckpt.join("adapter_model.safetensors").exists() && !ckpt.join("model.safetensors").exists()
    );
    assert!(ckpt.join("rng_state_0.safetensors").exists());
    let resume = [args.as_slice(), &["--resume"]].concat();
    ok(&train_adapter("llama", &killed, &resume, &[]));
    let (a, b) = (
        load(&straight.join("final"), Head::Lm),
        load(&killed.join("final"), Head::Lm),
    );
    let b_tensors = b.named_tensors();
    for (name, t) in a
        .named_tensors()
        .iter()
        .filter(|(n, _)| n.contains(".lora_"))
    {
        let diff = (t - &b_tensors[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{name} differs by {diff:e}");
    }
}

#[test]
fn bad_adapter_inputs_end_in_one_line() {
    let f = fixture();
    let out = f.root.join("run-bad");
    let orphan = f.root.join("orphan-adapter");
    std::fs::create_dir_all(&orphan).unwrap();
    let peft = f.root.join("llama-peft");
    std::fs::copy(
        peft.join("adapter_model.safetensors"),
        orphan.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(peft.join("adapter_config.json")).unwrap())
            .unwrap();
    config["base_model_name_or_path"] = json!("../no-such-base");
    std::fs::write(orphan.join("adapter_config.json"), config.to_string()).unwrap();
    let data = f.root.join("sft.jsonl");
    // `sft train` of the llama fixture without --lora-r.
    let llama = f.root.join("llama");
    let train_plain = |extra: &[&str]| {
        let args = [
            &[
                "train",
                "--model",
                llama.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
                "--device",
                "cpu",
            ][..],
            extra,
        ]
        .concat();
        sft(&args, &[])
    };
    let cases: Vec<(Output, &str)> = vec![
        (train_adapter("llama", &out, &["--lora-r", "0"], &[]), "--lora-r must be at least 1"),
        (
            train_adapter("llama", &out, &["--prompt-tuning-tokens", "3"], &[]),
            "--lora-r and --prompt-tuning-tokens cannot be combined (one adapter per run)",
        ),
        (
            train_adapter("llama", &out, &["--lora-r", "20", "--init-lora-weights", "pissa"], &[]),
            "--init-lora-weights pissa: rank 20 is more than model.layers.0.self_attn.v_proj [16, 32] can hold (its smaller side)",
        ),
        (
            train_plain(&["--init-lora-weights", "olora"]),
            "--lora-alpha, --lora-dropout, --lora-target-modules, --lora-target-parameters, --lora-modules-to-save, --trainable-token-indices, --use-rslora, --use-dora and --init-lora-weights need --lora-r",
        ),
        (
            train_adapter("llama", &out, &["--lora-target-modules", "q_proj,nope"], &[]),
            "LoRA target modules [\"nope\"] match no layer of this llama model",
        ),
        (
            train_plain(&["--prefix-tuning-tokens", "3", "--prompt-tuning-tokens", "3"]),
            "--prefix-tuning-tokens cannot be combined with --lora-r or --prompt-tuning-tokens (one adapter per run)",
        ),
        (
            train_plain(&["--prefix-tuning-tokens", "3", "--gradient-checkpointing"]),
            "--gradient-checkpointing with prefix tuning: the prefix enters every layer's attention as cached keys and values, which the recomputed blocks do not take; leave one out",
        ),
        (
            train_plain(&["--loraplus-lr-ratio", "16"]),
            "--loraplus-lr-ratio needs a LoRA adapter (--lora-r, or a LoRA adapter directory as the model)",
        ),
        (
            train_adapter("llama", &out, &["--lora-modules-to-save", "mlp"], &[]),
            "--lora-modules-to-save takes embed_tokens (wte for GPT-2) and lm_head",
        ),
        (
            train_adapter("llama", &out, &["--trainable-token-indices", "3,4000"], &[]),
            "trainable token 4000 is not below vocab_size 320",
        ),
        (
            sft(
                &["eval", "--model", orphan.to_str().unwrap(), "--data", data.to_str().unwrap(), "--device", "cpu"],
                &[],
            ),
            "the base model '../no-such-base' (base_model_name_or_path) is not a model directory here: pass --base-model DIR",
        ),
    ];
    for (res, expected) in cases {
        rlhf_tests::assert_refused(&res, expected);
    }
    assert!(
        !out.join("checkpoints").exists(),
        "a refused run wrote its output directory"
    );
}

/// PEFT's TEXT and SAMPLE_VOCAB inits start the virtual tokens from the loaded model's
/// embeddings (of the text's tokens, cut or repeated to N; of tokens drawn from the
/// vocabulary), not from the weights the model had before its checkpoint was read.
#[test]
fn text_and_vocab_inits_start_from_the_loaded_embeddings() {
    use common::models::prompt_tuning::{PromptInit, PromptTuningConfig};
    let f = fixture();
    for arch in ARCHS {
        let dir = f.root.join(arch);
        let embeddings = load(&dir, Head::Lm).named_tensors()[match *arch {
            "gpt2" => "transformer.wte.weight",
            _ => "model.embed_tokens.weight",
        }]
        .shallow_clone();
        let with_init = |init| {
            let opts = ModelOptions::cpu(Head::Lm).with_prompt_tuning(Some(PromptTuningConfig {
                num_virtual_tokens: 7,
                init,
                kind: Default::default(),
            }));
            Model::load(&dir, &opts).unwrap().0.named_tensors()["prompt_embeddings"].shallow_clone()
        };
        let text = "heads and legs";
        let prompt = with_init(PromptInit::Text {
            text: text.into(),
            ids: vec![],
        });
        let ids = data::Tokenizer::load(&dir)
            .unwrap()
            .encode(text, true)
            .unwrap();
        assert!(ids.len() < 7, "{arch}: the text must repeat");
        let repeated: Vec<i64> = ids.iter().copied().cycle().take(7).collect();
        let want = embeddings.index_select(0, &Tensor::from_slice(&repeated));
        assert!(
            prompt.equal(&want),
            "{arch}: TEXT init is not the text's embeddings"
        );
        let prompt = with_init(PromptInit::Vocab);
        for row in 0..7 {
            let hits = (embeddings.shallow_clone() - prompt.get(row))
                .abs()
                .sum_dim_intlist([1].as_slice(), false, Kind::Float)
                .eq(0.0)
                .sum(Kind::Int64)
                .int64_value(&[]);
            assert!(
                hits >= 1,
                "{arch}: SAMPLE_VOCAB row {row} is no token's embedding"
            );
        }
    }
}
