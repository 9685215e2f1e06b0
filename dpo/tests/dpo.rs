//! `dpo train` / `dpo eval` end to end on a tiny Llama: the loss at the reference is ln 2,
//! `dpo eval` equals an independent `transformers` computation for every loss type, a
//! learnable preference is learned (held-out accuracy, greedy answers), and a killed run
//! resumes to the same weights with and without precomputed reference log-probs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use common::generate::{generate, SamplingConfig};
use common::{Head, Model, ModelOptions};
use data::prompts::collate_left;
use rlhf_tests::{max_weight_diff, ok, read_jsonl, run_bin, run_python};
use serde_json::{json, Value};
use tch::Tensor;

struct Fixture {
    root: PathBuf,
    model: PathBuf,
    /// `model` with noise added: a policy that differs from its reference.
    moved: PathBuf,
    train: PathBuf,
    eval: PathBuf,
    prompts: Vec<String>,
}

const WORDS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// The preference: the same answer in digits is better than in words.
fn rows(seed: u64, n: usize) -> (String, Vec<String>) {
    let mut state = seed;
    let mut next = move |m: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % m
    };
    let (mut out, mut prompts) = (String::new(), vec![]);
    for _ in 0..n {
        let (r, c) = (next(10), next(10));
        let prompt = format!("There are {} heads. ", WORDS[((r + c) % 10) as usize]);
        let chosen = format!("{r} rabbits and {c} chickens.");
        let rejected = format!(
            "{} rabbits and {} chickens.",
            WORDS[r as usize], WORDS[c as usize]
        );
        out.push_str(&format!(
            "{}\n",
            json!({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        ));
        prompts.push(prompt);
    }
    (out, prompts)
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dpo");
        rlhf_tests::tiny_llama_fixture(&root);
        let (model, moved) = (root.join("model"), root.join("moved"));
        run_python(
            "dpo_reference.py",
            &[
                "perturb",
                "--model",
                model.to_str().unwrap(),
                "--out",
                moved.to_str().unwrap(),
                "--seed",
                "3",
                "--scale",
                "0.05",
            ],
        );
        let (train, eval) = (root.join("train.jsonl"), root.join("eval.jsonl"));
        std::fs::write(&train, rows(1, 48).0).unwrap();
        let (eval_rows, prompts) = rows(2, 16);
        std::fs::write(&eval, eval_rows).unwrap();
        Fixture {
            root,
            model,
            moved,
            train,
            eval,
            prompts,
        }
    })
}

fn dpo(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_bin(env!("CARGO_BIN_EXE_dpo"), args, env)
}

fn train(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    train_from(&fixture().model, out, extra, env)
}

fn train_from(model: &Path, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    dpo(&train_args(model, out, extra), env)
}

fn train_args<'a>(model: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let f = fixture();
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        f.train.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--batch-size",
        "8",
        "--seed",
        "7",
    ];
    if !extra.contains(&"--resume") {
        args.push("--overwrite");
    }
    if !extra.contains(&"--lr") {
        args.extend(["--lr", "5e-4"]);
    }
    args.extend_from_slice(extra);
    args
}

/// Data parallel (issue 19): two torchrun ranks of 4 pairs (two micro-batches of 2, the
/// gradient exchange overlapped with the second's backward) train the policy one process
/// trains with 8, with the same losses and gradient norms. The loss is a weighted list
/// with WPO's weights, which are per pair, so they too split over micro-batches and ranks;
/// the reference takes the policy's BEMA after step 1 (`--bema-update-ref-model`: the main
/// rank's average reaches the other rank's reference); then the same for KTO.
#[test]
fn two_ranks_train_what_one_process_trains_with_twice_the_batch() {
    let f = fixture();
    let (one, two) = (f.root.join("dp-one"), f.root.join("dp-two"));
    let loss = [
        "--loss-type",
        "sigmoid,bco_pair",
        "--loss-weights",
        "1,0.5",
        "--use-weighting",
        "--bema",
        "--bema-update-freq",
        "1",
        "--bema-update-ref-model",
        "--bema-ref-model-update-freq",
        "1",
    ];
    ok(&train(
        &one,
        &[&["--max-steps", "2"][..], &loss].concat(),
        &[],
    ));
    let options = [
        &["--max-steps", "2", "--dist-timeout", "120"],
        &rlhf_tests::OVERLAPPED[..],
        &loss,
    ]
    .concat();
    let exe = env!("CARGO_BIN_EXE_dpo");
    let out = rlhf_tests::torchrun(exe, 2, &train_args(&f.model, &two, &options), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = ["train/loss", "train/grad_norm"];
    rlhf_tests::assert_trains_like(&one, &two, Head::Lm, (&keys, 1.0), 2);
    // KTO: its KL estimate is the whole step's, over both ranks. (The mismatched
    // completions rotate within each --batch-size run, 2 on both sides.)
    let (one, two) = (f.root.join("dp-one-kto"), f.root.join("dp-two-kto"));
    let kto = ["--loss-type", "kto", "--max-steps", "2"];
    let single = [&kto[..], &["--batch-size", "2", "--grad-accum", "4"]].concat();
    ok(&train(&one, &single, &[]));
    let options = [
        &kto[..],
        &["--dist-timeout", "120"],
        &rlhf_tests::OVERLAPPED[..],
    ]
    .concat();
    let out = rlhf_tests::torchrun(exe, 2, &train_args(&f.model, &two, &options), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keys = ["train/loss", "train/grad_norm", "kl"];
    rlhf_tests::assert_trains_like(&one, &two, Head::Lm, (&keys, 1.0), 2);
}

/// Mixed data for the parity check: text pairs, a ranking of three and a conversation.
fn parity_data(dir: &Path) -> PathBuf {
    let path = dir.join("parity.jsonl");
    let rows = [
        json!({"prompt": "There are 3 heads and 10 legs. ", "chosen": "2 rabbits and 1 chicken.", "rejected": "3 rabbits."}),
        json!({"prompt": "Question: 2+2=", "responses": [" 4", " four", " 5 legs"]}),
        json!({"prompt": [{"role": "user", "content": "5 heads, 14 legs?"}],
               "chosen": [{"role": "assistant", "content": "2 rabbits, 3 chickens."}],
               "rejected": [{"role": "assistant", "content": "Sure?"}]}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// `dpo eval` of the moved policy against the fixture's model on `data`, rows to `rows`.
fn eval_args<'a>(rows: &'a Path, data: &'a Path, batch_size: &'a str) -> Vec<&'a str> {
    let f = fixture();
    vec![
        "eval",
        "--model",
        f.moved.to_str().unwrap(),
        "--ref-model",
        f.model.to_str().unwrap(),
        "--batch-size",
        batch_size,
        "--output",
        rows.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]
}

/// One configuration of the parity check: the loss options of `dpo eval`.
#[derive(Clone, Copy)]
struct Case {
    loss: &'static str,
    smoothing: &'static str,
    rpo: &'static str,
    divergence: &'static str,
    ld: Option<&'static str>,
    weights: Option<&'static str>,
    wpo: bool,
    free: bool,
    gamma: Option<&'static str>,
}

fn case(loss: &'static str) -> Case {
    Case {
        loss,
        smoothing: "0.0",
        rpo: "0.0",
        divergence: "reverse_kl",
        ld: None,
        weights: None,
        wpo: false,
        free: false,
        gamma: None,
    }
}

impl Case {
    /// The configuration as `dpo_reference.py compute` reads it.
    fn as_json(&self) -> Value {
        let num = |x: &str| x.parse::<f64>().unwrap();
        let weights = self
            .weights
            .map(|w| w.split(',').map(num).collect::<Vec<_>>());
        json!([
            self.loss,
            num(self.smoothing),
            num(self.rpo),
            self.divergence,
            0.5,
            self.ld.map(num),
            weights,
            self.wpo,
            self.free,
            num(self.gamma.unwrap_or("0.5"))
        ])
    }

    /// Its options on the `dpo eval` command line (a reference-free case without
    /// --ref-model).
    fn eval_args<'a>(&'a self, rows: &'a Path, data: &'a Path) -> Vec<&'a str> {
        let mut args = eval_args(rows, data, "2");
        let free = self.free || ["simpo", "orpo"].contains(&self.loss);
        if free {
            let at = args.iter().position(|&a| a == "--ref-model").unwrap();
            args.drain(at..at + 2);
        }
        args.extend([
            "--beta",
            "0.5",
            "--loss-type",
            self.loss,
            "--label-smoothing",
            self.smoothing,
            "--rpo-alpha",
            self.rpo,
            "--f-divergence-type",
            self.divergence,
        ]);
        args.extend(self.ld.iter().flat_map(|a| ["--ld-alpha", *a]));
        args.extend(self.weights.iter().flat_map(|w| ["--loss-weights", *w]));
        args.extend(self.gamma.iter().flat_map(|g| ["--simpo-gamma", *g]));
        args.extend(self.wpo.then_some("--use-weighting"));
        args.extend(self.free.then_some("--reference-free"));
        args
    }
}

/// `dpo eval` of a policy against a different reference: per-pair log-probs, every loss
/// type (and RPO) and every metric equal the `transformers` computation (1e-4); the
/// reference-free losses (CPO, SimPO, ORPO) against TRL's CPOTrainer's and ORPOTrainer's.
#[test]
fn eval_matches_transformers_for_every_loss_type() {
    let f = fixture();
    let data = parity_data(&f.root);
    let mut cases: Vec<Case> = [
        "sigmoid",
        "hinge",
        "ipo",
        "nca_pair",
        "bco_pair",
        "sppo_hard",
        "apo_zero",
        "apo_down",
        "discopop",
        "sigmoid_norm",
        "aot",
        "aot_unpaired",
    ]
    .into_iter()
    .map(case)
    .collect();
    cases.extend([
        Case {
            smoothing: "0.2",
            ..case("robust")
        },
        Case {
            rpo: "0.5",
            ..case("sigmoid")
        },
        Case {
            smoothing: "0.001",
            ..case("exo_pair")
        },
        Case {
            smoothing: "0.1",
            ..case("aot")
        },
        // f-DPO (α-divergence at TRL's default α 0.5).
        Case {
            divergence: "forward_kl",
            ..case("sigmoid")
        },
        Case {
            divergence: "js_divergence",
            ..case("ipo")
        },
        Case {
            divergence: "alpha_divergence",
            ..case("hinge")
        },
        // LD-DPO: the tails past each pair's shorter completion at α 0.3 (with RPO, whose
        // NLL stays unweighted).
        Case {
            rpo: "0.5",
            ld: Some("0.3"),
            ..case("sigmoid")
        },
        Case {
            ld: Some("0.3"),
            ..case("ipo")
        },
        // TRL's lists of losses with weights (MPO's, with the NLL as `sft`), and WPO's
        // weights, alone and with a list, label smoothing and LD-DPO.
        Case {
            weights: Some("0.8,0.2,1.0"),
            ..case("sigmoid,bco_pair,sft")
        },
        Case {
            wpo: true,
            ..case("sigmoid")
        },
        Case {
            smoothing: "0.2",
            ld: Some("0.3"),
            weights: Some("1,0.5"),
            wpo: true,
            ..case("robust,ipo")
        },
        // Reference-free: CPO (sigmoid with its NLL), SimPO, CPO-SimPO with smoothing, ORPO.
        Case {
            free: true,
            rpo: "1.0",
            ..case("sigmoid")
        },
        Case {
            free: true,
            ..case("ipo")
        },
        case("simpo"),
        Case {
            smoothing: "0.1",
            rpo: "0.5",
            gamma: Some("1.5"),
            ..case("simpo")
        },
        case("orpo"),
    ]);
    let as_json: Vec<Value> = cases.iter().map(Case::as_json).collect();
    let (policy, reference) = (f.moved.to_str().unwrap(), f.model.to_str().unwrap());
    let expected = run_python(
        "dpo_reference.py",
        &[
            "compute",
            "--policy",
            policy,
            "--ref",
            reference,
            "--data",
            data.to_str().unwrap(),
            "--beta",
            "0.5",
            "--batch",
            "2",
            "--configs",
            &Value::from(as_json).to_string(),
        ],
    );
    for (n, (c, expected)) in cases
        .iter()
        .zip(expected["configs"].as_array().unwrap())
        .enumerate()
    {
        let loss_type = c.loss;
        let rows_path = f.root.join(format!("parity-{n}-{loss_type}.jsonl"));
        let summary = ok(&dpo(&c.eval_args(&rows_path, &data), &[]));
        let ours = read_jsonl(&rows_path);
        let theirs = expected["pairs"].as_array().unwrap();
        assert_eq!(ours.len(), 5, "2 pairs + 3 from the ranking");
        assert_eq!(ours.len(), theirs.len());
        for (o, t) in ours.iter().zip(theirs) {
            for key in [
                "logps_chosen",
                "logps_rejected",
                "ref_logps_chosen",
                "ref_logps_rejected",
                "loss",
            ] {
                let (a, b) = (o[key].as_f64().unwrap(), t[key].as_f64().unwrap());
                assert!(
                    (a - b).abs() < 1e-4,
                    "{n} {loss_type}: {key} {a} vs {b} ({o} / {t})"
                );
            }
        }
        for (key, value) in expected["metrics"].as_object().unwrap() {
            let a = summary[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{n} {loss_type}: no {key}"));
            let b = value.as_f64().unwrap();
            assert!((a - b).abs() < 1e-4, "{n} {loss_type}: {key} {a} vs {b}");
        }
    }
}

/// KTO's unpaired rows (text and a conversation, desirable or not) beside the parity
/// file's preference rows, which an unpaired loss reads unpaired.
fn unpaired_data(dir: &Path) -> PathBuf {
    let path = dir.join("unpaired.jsonl");
    let rows = [
        json!({"prompt": "There are 2 heads and 6 legs. ", "completion": "1 rabbit, 1 chicken.", "label": true}),
        json!({"prompt": "There are 2 heads and 6 legs. ", "completion": "one rabbit.", "label": false}),
        json!({"prompt": [{"role": "user", "content": "4 heads, 10 legs?"}],
               "completion": [{"role": "assistant", "content": "1 rabbit, 3 chickens."}], "label": true}),
    ];
    let mut text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    text.push_str(&std::fs::read_to_string(parity_data(dir)).unwrap());
    std::fs::write(&path, text).unwrap();
    path
}

/// `dpo eval --loss-type kto` and `apo_zero_unpaired` (TRL's KTOTrainer's losses) equal
/// the `transformers` computation of TRL's rules: preference rows unpaired, each
/// completion tokenized alone, the KL completions rotated within each batch of 4 and the
/// KL estimate per batch; per completion (log-probs, loss) and every metric, 1e-4.
#[test]
fn kto_eval_matches_transformers() {
    let f = fixture();
    let data = unpaired_data(&f.root);
    let (policy, reference) = (f.moved.to_str().unwrap(), f.model.to_str().unwrap());
    for loss_type in ["kto", "apo_zero_unpaired"] {
        let weights = ["--desirable-weight", "1.3", "--undesirable-weight", "0.7"];
        let common = [&["--beta", "0.5", "--loss-type", loss_type][..], &weights].concat();
        let expected = run_python(
            "dpo_reference.py",
            &[
                &[
                    "kto",
                    "--policy",
                    policy,
                    "--ref",
                    reference,
                    "--data",
                    data.to_str().unwrap(),
                    "--batch",
                    "4",
                ][..],
                &common,
            ]
            .concat(),
        );
        let rows_path = f.root.join(format!("kto-{loss_type}.jsonl"));
        let summary = ok(&dpo(
            &[&eval_args(&rows_path, &data, "4")[..], &common].concat(),
            &[],
        ));
        let ours = read_jsonl(&rows_path);
        let theirs = expected["completions"].as_array().unwrap();
        // 3 unpaired rows, then a pair, a ranking of 3 and a conversation pair: 3 + 2 × 5.
        assert_eq!((ours.len(), theirs.len()), (13, 13));
        for (o, t) in ours.iter().zip(theirs) {
            for key in ["index", "response", "label"] {
                assert_eq!(o[key], t[key], "{loss_type}: {o} / {t}");
            }
            for key in ["logps", "ref_logps", "loss"] {
                let (a, b) = (o[key].as_f64().unwrap(), t[key].as_f64().unwrap());
                assert!(
                    (a - b).abs() < 1e-4,
                    "{loss_type}: {key} {a} vs {b} ({o} / {t})"
                );
            }
        }
        assert_eq!(summary["completions"], 13);
        let metrics = expected["metrics"].as_object().unwrap();
        assert!(metrics["kl"].as_f64().unwrap() > 0.0 || loss_type != "kto");
        for (key, value) in metrics {
            let (a, b) = (summary[key].as_f64().unwrap(), value.as_f64().unwrap());
            assert!((a - b).abs() < 1e-4, "{loss_type}: {key} {a} vs {b}");
        }
    }
}

/// Policy = reference: the sigmoid loss is ln 2 and every implicit reward is 0, in
/// `dpo eval` and at the first training step.
#[test]
fn at_the_reference_the_loss_is_ln2() {
    let f = fixture();
    let m = f.model.to_str().unwrap();
    let s = ok(&dpo(
        &[
            "eval",
            "--model",
            m,
            "--ref-model",
            m,
            "--data",
            f.eval.to_str().unwrap(),
        ],
        &[],
    ));
    assert!(
        (s["loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-7,
        "{s}"
    );
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    ] {
        assert_eq!(s[key].as_f64().unwrap(), 0.0, "{key}: {s}");
    }
    let out = f.root.join("step0");
    ok(&train(&out, &["--max-steps", "1", "--log-every", "1"], &[]));
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let loss = metrics[0]["train/loss"].as_f64().unwrap();
    assert!((loss - 2f64.ln()).abs() < 1e-7, "{loss}");
    // A fresh LoRA adapter is its own reference (switched off): ln 2 at step 1, then the
    // adapter moves the policy away from it; the adapter directory evaluates against its
    // base by default. QLoRA: the same on a 4-bit base (the reference is that base with the
    // adapter off), and its adapter evaluates on the base held in 4 bits again.
    let mut evals = vec![];
    for (name, extra) in [
        ("step0-lora", &[][..]),
        ("step0-qlora", &["--load-in-4bit"][..]),
    ] {
        let out = f.root.join(name);
        let args = [
            &[
                "--max-steps",
                "3",
                "--log-every",
                "1",
                "--lora-r",
                "4",
                "--lr",
                "1e-2",
            ][..],
            extra,
        ]
        .concat();
        ok(&train(&out, &args, &[]));
        let metrics = read_jsonl(&out.join("metrics.jsonl"));
        let first = metrics[0]["train/loss"].as_f64().unwrap();
        assert!((first - 2f64.ln()).abs() < 1e-7, "{name}: {first}");
        let final_dir = out.join("final");
        let s = ok(&dpo(
            &[
                "eval",
                "--model",
                final_dir.to_str().unwrap(),
                "--data",
                f.train.to_str().unwrap(),
            ],
            &[],
        ));
        assert!(
            s["loss"].as_f64().unwrap() < 2f64.ln() && s["rewards/margins"].as_f64().unwrap() > 0.0,
            "{name}: {s}"
        );
        evals.push(s["loss"].clone());
    }
    assert_ne!(evals[0], evals[1], "the 4-bit base changed nothing");
}

/// The greedy answers to `prompts`.
/// TRL's `disable_dropout` (true in DPOConfig): LoRA's dropout is off in training unless
/// `--disable-dropout false`, and the adapter's files keep its `lora_dropout`.
#[test]
fn lora_dropout_is_disabled_as_trl_disables_it() {
    let f = fixture();
    let run = |name: &str, extra: &[&str]| {
        let out = f.root.join(name);
        let args = [
            &["--max-steps", "2", "--lora-r", "4", "--lr", "1e-2"][..],
            extra,
        ]
        .concat();
        ok(&train(&out, &args, &[]));
        out.join("final")
    };
    rlhf_tests::check_dropout_default(run, Head::Lm, true);
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(f.root.join("dropout-default/final/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["lora_dropout"], json!(0.5));
}

fn greedy_answers(model_dir: &Path, prompts: &[String]) -> Vec<String> {
    let (model, tok) = Model::load_with_tokenizer(model_dir, &ModelOptions::cpu(Head::Lm)).unwrap();
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| tok.encode(p, true).unwrap())
        .collect();
    let refs: Vec<&[i64]> = ids.iter().map(Vec::as_slice).collect();
    let batch = collate_left(&refs, tok.pad_id, tch::Device::Cpu);
    let cfg = SamplingConfig {
        max_new_tokens: 12,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repetition_penalty: 1.0,
        eos_ids: tok.generation_eos_ids().unwrap(),
        pad_id: tok.pad_id,
        seed: 0,
        cuda_graph: false,
    };
    let g = generate(&model, &batch.input_ids, &batch.attention_mask, &cfg);
    let tokens: Vec<Vec<i64>> = Vec::try_from(g.tokens).unwrap();
    tokens
        .iter()
        .zip(&g.lengths)
        .map(|(t, &n)| tok.decode(&t[..n as usize], true))
        .collect()
}

/// The share of `answers` given in digits: with a digit and without a number word.
fn in_digits(answers: &[String]) -> f64 {
    let digits =
        |a: &String| a.chars().any(|c| c.is_ascii_digit()) && !WORDS.iter().any(|w| a.contains(w));
    answers.iter().filter(|a| digits(a)).count() as f64 / answers.len() as f64
}

/// An SFT model that answers in both styles, mostly in words: SFT on the training
/// prompts with the rejected answer three times out of four. Trained once for the tests
/// that start from it (which run in parallel).
fn sft_model(f: &Fixture) -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| train_sft_model(f)).clone()
}

fn train_sft_model(f: &Fixture) -> PathBuf {
    let rows: String = read_jsonl(&f.train)
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let completion = if i % 4 == 0 {
                &r["chosen"]
            } else {
                &r["rejected"]
            };
            format!(
                "{}\n",
                json!({"prompt": r["prompt"], "completion": completion})
            )
        })
        .collect();
    let data = f.root.join("sft.jsonl");
    std::fs::write(&data, rows).unwrap();
    let out = f.root.join("sft");
    let args: sft::train::TrainArgs = rlhf_tests::parse_args(&[
        "--model",
        f.model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--overwrite",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
        "--epochs",
        "12",
        "--seed",
        "1",
    ]);
    sft::train::run(&args).unwrap();
    out.join("final")
}

/// A learnable preference (digits over words) from an SFT model that mostly answers in
/// words: held-out `rewards/accuracies` rises above 0.9 and the greedy answers to held-out
/// prompts move to digits.
#[test]
fn learns_the_preferred_style() {
    let f = fixture();
    let start = sft_model(f);
    let out = f.root.join("learn");
    let args = [
        "--eval-data",
        f.eval.to_str().unwrap(),
        "--epochs",
        "4",
        "--log-every",
        "1",
    ];
    let summary = ok(&train_from(&start, &out, &args, &[]));
    let accuracy = summary["eval_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}: {summary}");
    let metrics: Vec<Value> = read_jsonl(&out.join("metrics.jsonl"));
    let last = metrics.last().unwrap();
    assert!(
        last["eval/rewards/margins"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    answers_move_to_digits(&start, &out.join("final"));
}

/// The greedy answers to the held-out prompts: at most 25 % in digits from `start`, at
/// least 75 % from `trained`.
fn answers_move_to_digits(start: &Path, trained: &Path) {
    let prompts = &fixture().prompts;
    let before = greedy_answers(start, prompts);
    let after = greedy_answers(trained, prompts);
    let (b, a) = (in_digits(&before), in_digits(&after));
    assert!(
        b <= 0.25 && a >= 0.75,
        "answers in digits: {b:.2} → {a:.2}\nbefore: {before:?}\nafter: {after:?}"
    );
}

/// KTO on the same preference data unpaired (each pair's digits answer desirable, its
/// words answer not): the held-out reward margin turns positive and the greedy answers
/// move to digits.
#[test]
fn kto_learns_the_preferred_style() {
    let f = fixture();
    let start = sft_model(f);
    let out = f.root.join("learn-kto");
    let args = [
        "--loss-type",
        "kto",
        "--eval-data",
        f.eval.to_str().unwrap(),
        "--epochs",
        "3",
        "--log-every",
        "1",
    ];
    let summary = ok(&train_from(&start, &out, &args, &[]));
    assert!(summary["eval_accuracy"].is_null(), "{summary}");
    let metrics: Vec<Value> = read_jsonl(&out.join("metrics.jsonl"));
    let last = metrics.last().unwrap();
    assert!(
        last["eval/rewards/margins"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    assert!(last["kl"].as_f64().unwrap() >= 0.0, "{last}");
    answers_move_to_digits(&start, &out.join("final"));
}

/// The reference-free losses on the same pairs: SimPO (at its paper's β 2, γ 1) and
/// ORPO (TRL's β 0.1, with its NLL term) raise the held-out accuracy of the mean token
/// log-probs above 0.9 and move the greedy answers to digits; `nll_loss` and ORPO's
/// odds-ratio metrics are logged.
#[test]
fn simpo_and_orpo_learn_the_preferred_style_without_a_reference() {
    let f = fixture();
    let start = sft_model(f);
    for (name, loss) in [
        ("simpo", &["--beta", "2", "--simpo-gamma", "1"][..]),
        ("orpo", &[][..]),
    ] {
        let out = f.root.join(format!("learn-{name}"));
        let mut args = vec!["--loss-type", name, "--eval-data", f.eval.to_str().unwrap()];
        args.extend_from_slice(loss);
        args.extend(["--epochs", "4", "--log-every", "1"]);
        let summary = ok(&train_from(&start, &out, &args, &[]));
        let accuracy = summary["eval_accuracy"].as_f64().unwrap();
        assert!(
            accuracy >= 0.9,
            "{name}: held-out accuracy {accuracy}: {summary}"
        );
        let last = read_jsonl(&out.join("metrics.jsonl")).pop().unwrap();
        let has = |key: &str| last.get(key).and_then(Value::as_f64).is_some();
        assert_eq!(has("nll_loss"), name == "orpo", "{name}: {last}");
        assert_eq!(has("eval/log_odds_ratio"), name == "orpo", "{name}: {last}");
        answers_move_to_digits(&start, &out.join("final"));
    }
}

/// A run killed mid-step resumes to the weights of an uninterrupted run (1e-6), with the
/// reference held, with its log-probs precomputed (read back from the run), with the
/// reference moved towards the policy at step 2 (`--sync-ref-model`, read back from the
/// step-2 checkpoint; the moved reference changes the weights), with the reference
/// replaced by the policy's BEMA at step 2 (`--bema-update-ref-model`: the step-2
/// checkpoint's reference is its BEMA; `bema/` resumes too), and with KTO on precomputed
/// log-probs (each completion's and its mismatched completion's).
#[test]
fn killed_run_resumes_to_the_same_weights() {
    let f = fixture();
    for tag in ["held", "pre", "sync", "bema", "kto-pre"] {
        let precompute = tag.ends_with("pre");
        let mut args = vec![
            "--max-steps",
            "4",
            "--save-every",
            "2",
            "--eval-data",
            f.eval.to_str().unwrap(),
            "--eval-every",
            "2",
        ];
        if precompute {
            // TRL's spelling of the option, in one of the runs.
            args.push(match tag {
                "pre" => "--precompute-ref-log-probs",
                _ => "--precompute-ref-logprobs",
            });
        }
        if tag == "pre" {
            // Scored in forwards of 3 rows, not the training batch's.
            args.extend(["--precompute-ref-batch-size", "3"]);
        }
        if tag == "kto-pre" {
            args.extend(["--loss-type", "kto"]);
        }
        if tag == "sync" {
            args.extend([
                "--sync-ref-model",
                "--ref-model-sync-steps",
                "2",
                "--ref-model-mixup-alpha",
                "0.5",
            ]);
        }
        if tag == "bema" {
            args.extend([
                "--bema",
                "--bema-update-freq",
                "1",
                "--bema-update-ref-model",
                "--bema-ref-model-update-freq",
                "2",
            ]);
        }
        let full = f.root.join(format!("full-{tag}"));
        ok(&train(&full, &args, &[]));
        let out = f.root.join(format!("killed-{tag}"));
        let killed = train(&out, &args, &[("RLHF_CRASH_AT", "mid-step@3")]);
        assert!(!killed.status.success(), "the crash point was not hit");
        let mut resumed: Vec<&str> = args.clone();
        resumed.push("--resume");
        if tag == "pre" {
            // The stored log-probs were summed without LD-DPO's weights: a resume that asks
            // for them is refused, and leaves the run resumable.
            let mut other = resumed.clone();
            other.extend(["--ld-alpha", "0.5"]);
            let refused = train(&out, &other, &[]);
            let log = String::from_utf8_lossy(&refused.stderr);
            assert!(
                !refused.status.success() && log.contains("weighted with --ld-alpha None"),
                "{log}"
            );
        }
        ok(&train(&out, &resumed, &[]));
        let diff = max_weight_diff(&full.join("final"), &out.join("final"), Head::Lm);
        assert!(diff < 1e-6, "{tag}: resumed weights differ by {diff:e}");
        // TRL's running token count goes on from the checkpoint.
        let tokens = |dir: &Path| {
            let last = read_jsonl(&dir.join("metrics.jsonl")).pop().unwrap();
            last["num_tokens"].as_f64().unwrap()
        };
        assert_eq!(tokens(&full), tokens(&out), "{tag}: num_tokens");
        assert_eq!(out.join("ref_logps.json").exists(), precompute);
        let moved = out.join("checkpoints/step-000002/ref_model.safetensors");
        assert_eq!(moved.exists(), tag == "sync" || tag == "bema");
        if tag == "bema" {
            let diff = max_weight_diff(&full.join("bema"), &out.join("bema"), Head::Lm);
            assert!(diff < 1e-6, "resumed bema/ differs by {diff:e}");
            let read = |p: &Path| -> BTreeMap<String, Tensor> {
                Tensor::read_safetensors(p).unwrap().into_iter().collect()
            };
            let reference = read(&moved);
            let average = read(&out.join("checkpoints/step-000002/bema.safetensors"));
            for (name, r) in &reference {
                assert!(r.equal(&average[name]), "{name} is not the BEMA");
            }
        }
    }
    let held = f.root.join("full-held/final");
    // Precomputed reference log-probs train what the held reference trains.
    let diff = max_weight_diff(&held, &f.root.join("full-pre/final"), Head::Lm);
    assert!(
        diff < 1e-5,
        "precomputed and held references differ by {diff:e}"
    );
    for tag in ["sync", "bema"] {
        let moved = f.root.join(format!("full-{tag}/final"));
        let diff = max_weight_diff(&held, &moved, Head::Lm);
        assert!(diff > 1e-6, "{tag}: the moved reference changed nothing");
    }
}

/// TPO (`--tpo-alpha`, TRL's experimental `TPOTrainer`): rows with a gold `reference`
/// completion, with and without their own `prompt` (the shared one then cut from the gold
/// too). `dpo eval` of each of TRL's four TPO losses — sigmoid with label smoothing, hinge,
/// ipo (reference-free here) and tpo-l (`simpo` here) — equals TRL's own `compute_loss`
/// on the same rows, tokenized and collated by TRL (`tests/python/tpo_reference.py`);
/// training's first step, in two micro-batches, logs the loss of the whole batch (the gold
/// NLL is the mean over the step's gold tokens), and the gold NLL falls as it trains.
#[test]
fn tpo_is_trls() {
    let f = fixture();
    let dir = f.root.join("tpo");
    std::fs::create_dir_all(&dir).unwrap();
    // 8 rows of the digits preference with a gold answer; the same 4 with the prompt
    // inside each completion.
    let (text, _) = rows(3, 8);
    let (mut explicit, mut implicit) = (String::new(), String::new());
    for (i, line) in text.lines().enumerate() {
        let mut row: Value = serde_json::from_str(line).unwrap();
        let chosen = row["chosen"].as_str().unwrap().to_string();
        row["reference"] = json!(format!("{}, all of them.", chosen.trim_end_matches('.')));
        explicit.push_str(&format!("{row}\n"));
        if i < 4 {
            let prompt = row["prompt"].as_str().unwrap().to_string();
            let whole = |key: &str| json!(format!("{prompt}{}", row[key].as_str().unwrap()));
            let joined = json!({"chosen": whole("chosen"), "rejected": whole("rejected"),
                "reference": whole("reference")});
            implicit.push_str(&format!("{joined}\n"));
        }
    }
    let (explicit_path, implicit_path) = (dir.join("explicit.jsonl"), dir.join("implicit.jsonl"));
    std::fs::write(&explicit_path, explicit).unwrap();
    std::fs::write(&implicit_path, implicit).unwrap();
    let m = f.moved.to_str().unwrap();
    // (TRL's loss_type, β, label smoothing, α, γ), and our options for it.
    let configs: [(&str, f64, f64, f64, &[&str]); 4] = [
        (
            "sigmoid",
            0.01,
            0.1,
            1.0,
            &[
                "--reference-free",
                "--loss-type",
                "sigmoid",
                "--beta",
                "0.01",
                "--label-smoothing",
                "0.1",
                "--tpo-alpha",
                "1",
            ],
        ),
        (
            "hinge",
            0.01,
            0.0,
            1.0,
            &[
                "--reference-free",
                "--loss-type",
                "hinge",
                "--beta",
                "0.01",
                "--tpo-alpha",
                "1",
            ],
        ),
        (
            "ipo",
            0.01,
            0.0,
            1.0,
            &[
                "--reference-free",
                "--loss-type",
                "ipo",
                "--beta",
                "0.01",
                "--tpo-alpha",
                "1",
            ],
        ),
        (
            "tpo-l",
            2.0,
            0.1,
            0.5,
            &[
                "--loss-type",
                "simpo",
                "--beta",
                "2",
                "--label-smoothing",
                "0.1",
                "--simpo-gamma",
                "0.5",
                "--tpo-alpha",
                "0.5",
            ],
        ),
    ];
    let trl_configs: Vec<Value> = configs
        .iter()
        .map(|(name, beta, ls, alpha, _)| json!([name, beta, ls, alpha, 0.5]))
        .collect();
    let files = format!("{},{}", explicit_path.display(), implicit_path.display());
    let trl = run_python(
        "tpo_reference.py",
        &[
            "--model",
            m,
            "--data",
            &files,
            "--configs",
            &Value::from(trl_configs).to_string(),
        ],
    );
    // `dpo eval` of `data` (one micro-batch), and a `dpo train` run on the explicit rows,
    // with `options`.
    let eval = |data: &Path, options: &[&str]| {
        let data = data.to_str().unwrap();
        let mut args = vec!["eval", "--model", m, "--data", data, "--batch-size", "8"];
        args.extend_from_slice(options);
        ok(&dpo(&args, &[]))
    };
    let train = |name: &str, options: &[&str]| {
        let out = dir.join(name);
        let (data, out_dir) = (explicit_path.to_str().unwrap(), out.to_str().unwrap());
        let mut args = vec![
            "train",
            "--model",
            m,
            "--data",
            data,
            "--output-dir",
            out_dir,
        ];
        args.extend([
            "--overwrite",
            "--lr",
            "5e-4",
            "--seed",
            "7",
            "--log-every",
            "1",
        ]);
        args.extend_from_slice(options);
        ok(&dpo(&args, &[]));
        out
    };
    for (file, data) in [&explicit_path, &implicit_path].into_iter().enumerate() {
        for (k, (name, _, _, _, options)) in configs.iter().enumerate() {
            let ours = eval(data, options);
            let want = &trl["files"][file]["configs"][k];
            let close = |key: &str| {
                let (x, y) = (ours[key].as_f64().unwrap(), want[key].as_f64().unwrap());
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                    "{} {name} {key}: ours {x}, TRL's {y}",
                    data.display()
                );
            };
            close("loss");
            // TRL's TPO logs IPO's rewards on mean token log-probs; the reference-free ipo
            // here logs β·log π, as DPO's reference-free losses do.
            if *name != "ipo" {
                close("rewards/chosen");
                close("rewards/margins");
            }
        }
    }
    // Training: step 1 (two micro-batches of 4) logs the whole batch's loss, its gold NLL
    // the mean over all 8 rows' gold tokens.
    let options = configs[0].4;
    let whole = eval(&explicit_path, options);
    let split = ["--batch-size", "4", "--grad-accum", "2"];
    let out = train(
        "run",
        &[&split[..], &["--max-steps", "4"], options].concat(),
    );
    let metrics = read_jsonl(&out.join("metrics.jsonl"));
    let (first, last) = (&metrics[0], &metrics[3]);
    let loss = first["train/loss"].as_f64().unwrap();
    let want = whole["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() < 1e-5 * want.abs().max(1.0),
        "{loss} vs {want}: {first}"
    );
    let gold = |m: &Value| m["nll_loss/gold"].as_f64().unwrap();
    assert!(
        (gold(first) - whole["nll_loss/gold"].as_f64().unwrap()).abs() < 1e-5,
        "{first}"
    );
    assert!(
        gold(last) < gold(first) - 0.1,
        "the gold NLL did not fall: {first} then {last}"
    );
    // One step in two micro-batches trains what one micro-batch of 8 trains: each weighs
    // its gold tokens' share of the step's.
    let one_step = |name: &str, shape: &[&str]| {
        train(name, &[shape, &["--max-steps", "1"], options].concat()).join("final")
    };
    let split = one_step("split", &split);
    let whole = one_step("whole", &["--batch-size", "8", "--grad-accum", "1"]);
    let diff = max_weight_diff(&split, &whole, Head::Lm);
    // (AdamW's first step is about --lr × the gradient's sign: summation-order noise on
    // gradients near 0 moves a weight by up to ~1e-6; weighing each micro-batch's gold
    // tokens on their own, 1e-3.)
    assert!(diff < 1e-5, "split step differs by {diff:e}");
    assert!(max_weight_diff(&split, &f.moved, Head::Lm) > 1e-4);
}

/// Bad options and data: exit ≠ 0, one line naming the option or the file and line, no
/// run directory.
#[test]
fn bad_inputs_are_refused_with_one_line() {
    let f = fixture();
    let bad = f.root.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n{\"prompt\": \"p\", \"chosen\": \"a\"}\n").unwrap();
    let out = f.root.join("refused");
    let _ = std::fs::remove_dir_all(&out);
    let m = f.model.to_str().unwrap();
    // `dpo train` on the good data, with the options `extra`.
    let train_with = |extra: &[&'static str]| -> Vec<&str> {
        let mut args = vec!["train", "--model", m, "--data", f.train.to_str().unwrap()];
        args.extend(["--output-dir", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        args
    };
    let label = f.root.join("bad-label.jsonl");
    std::fs::write(
        &label,
        "{\"prompt\": \"p\", \"completion\": \"a\", \"label\": \"yes\"}\n",
    )
    .unwrap();
    let with_data = |data: &Path, extra: &[&'static str]| -> Vec<String> {
        let mut args: Vec<String> = ["train", "--model", m, "--data"].map(String::from).to_vec();
        args.push(data.display().to_string());
        args.extend(["--output-dir".to_string(), out.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let (label_args, one_row) = (
        with_data(&label, &["--loss-type", "kto"]),
        with_data(&f.train, &["--loss-type", "kto", "--batch-size", "1"]),
    );
    let cases: [(Vec<&str>, String); 16] = [
        (
            train_with(&["--tpo-alpha", "1", "--reference-free"]),
            format!(
                "{}:1: field 'reference': missing: --tpo-alpha trains on each row's gold completion",
                f.train.display()
            ),
        ),
        (
            train_with(&["--tpo-alpha", "1", "--loss-type", "kto"]),
            "--tpo-alpha trains on the gold completions of preference pairs: not with kto".into(),
        ),
        (
            label_args.iter().map(String::as_str).collect(),
            format!("{}:1: field 'label': expected true or false", label.display()),
        ),
        (
            one_row.iter().map(String::as_str).collect(),
            "--loss-type kto needs --batch-size ≥ 2".into(),
        ),
        (
            train_with(&["--loss-type", "kto,sigmoid"]),
            "--loss-type kto and apo_zero_unpaired stand alone".into(),
        ),
        (
            train_with(&[
                "--loss-type",
                "kto",
                "--precompute-ref-logprobs",
                "--precompute-ref-batch-size",
                "4",
            ]),
            "--precompute-ref-batch-size with --loss-type kto".into(),
        ),
        (
            train_with(&["--sync-ref-model", "--precompute-ref-logprobs"]),
            "--sync-ref-model moves the reference, whose log-probs --precompute-ref-logprobs computes once".into(),
        ),
        (
            train_with(&["--sync-ref-model", "--lora-r", "4"]),
            "--sync-ref-model needs a reference copy to move".into(),
        ),
        (
            train_with(&["--bema-update-ref-model"]),
            "--bema-update-ref-model needs --bema".into(),
        ),
        (
            train_with(&["--bema", "--bema-update-ref-model", "--lora-r", "4"]),
            "--bema-update-ref-model needs a reference copy to move".into(),
        ),
        (
            train_with(&["--bema", "--bema-update-ref-model", "--sync-ref-model"]),
            "--sync-ref-model and --bema-update-ref-model both move the reference".into(),
        ),
        (
            train_with(&["--label-smoothing", "0.1"]),
            "--label-smoothing applies to --loss-type robust, exo_pair, aot, aot_unpaired and simpo, and to sigmoid with --reference-free (CPO's) only".into(),
        ),
        (
            train_with(&["--loss-type", "orpo", "--ref-model", m]),
            "the loss is reference-free (--reference-free, simpo or orpo): --ref-model".into(),
        ),
        (
            train_with(&["--loss-type", "orpo", "--cpo-alpha", "1"]),
            "--loss-type orpo has its NLL term built in".into(),
        ),
        (
            vec![
                "train",
                "--model",
                m,
                "--data",
                bad.to_str().unwrap(),
                "--output-dir",
                out.to_str().unwrap(),
            ],
            format!("{}:2: field 'rejected'", bad.display()),
        ),
        (
            vec!["eval", "--model", m, "--data", f.eval.to_str().unwrap()],
            "--ref-model is required".into(),
        ),
    ];
    for (args, expected) in cases {
        let o = dpo(&args, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        let last = stderr.lines().last().unwrap_or("");
        assert!(
            !o.status.success() && last.contains(&expected),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    assert!(!out.exists(), "a refused run wrote its directory");
}
