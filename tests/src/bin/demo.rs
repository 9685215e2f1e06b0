//! The bundled example of `make demo`: chickens and rabbits in a cage (鸡兔同笼), the
//! chain-of-thought example of the lecture this project grew from.
//!
//!     demo data  --out DIR [--seed S]      task data, tokenizer and a from-scratch base model
//!     demo tasks-data --out DIR [--seed S] the documents of the bundled lm-eval tasks (tasks/cage/)
//!     demo prompting-data --out DIR [--seed S]  the four SFT sets of `make demo-prompting`
//!     demo judge --prompts F --generations F    accuracy of generated answers (programmatic)
//!     demo report --dir DIR                the summary table of a `make demo` run
//!     demo prompting-report --dir DIR      the table of a `make demo-prompting` run
//!
//! A problem: "Heads 11, legs 30." — a correct chain of thought: " 11*2=22, 30-22=8,
//! 8/2=4 rabbits, 11-4=7 chickens." Hurried labelers sometimes skip the halving step or
//! slip in a subtraction; SFT imitates them, the reward model learns to rank them lower, and
//! PPO should then make fewer of their mistakes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rlhf_tests::demo::{data, judge, prompting_data, task_docs, MAX};
use serde_json::{json, Value};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn judge_file(prompts: &Path, generations: &Path) {
    let read = |p: &Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let prompts = read(prompts);
    let rows = read(generations);
    let (mut correct, mut answered) = (0usize, 0usize);
    for row in &rows {
        let prompt = prompts[row["index"].as_u64().unwrap() as usize]["prompt"]
            .as_str()
            .unwrap();
        if let Some(ok) = judge(prompt, row["completion"].as_str().unwrap_or_default()) {
            answered += 1;
            correct += usize::from(ok);
        }
    }
    let n = rows.len().max(1) as f64;
    println!(
        "{}",
        json!({"rows": rows.len(), "accuracy": correct as f64 / n, "answered": answered as f64 / n})
    );
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The reward model's held-out pairwise accuracy on the (correct, slipped arithmetic)
/// pairs and on all the others, from `reward eval --output` rows; `None` without them.
/// In a ranking the first response is correct; the others are told apart by their text
/// (a slip keeps the halving step, a skipped step has "*2=" without it, a guess neither).
fn slipped_pairs(dir: &Path) -> Option<(f64, f64)> {
    let rows = std::fs::read_to_string(dir.join("reward_eval_rows.jsonl")).ok()?;
    let rankings = std::fs::read_to_string(dir.join("data/rankings_eval.jsonl")).ok()?;
    let (mut slipped, mut rest) = ((0, 0), (0, 0));
    for (row, ranking) in rows.lines().zip(rankings.lines()) {
        let row: Value = serde_json::from_str(row).ok()?;
        let ranking: Value = serde_json::from_str(ranking).ok()?;
        let rewards: Vec<f64> = serde_json::from_value(row["rewards"].clone()).ok()?;
        let responses = ranking["responses"].as_array()?;
        for i in 0..rewards.len() {
            for j in i + 1..rewards.len() {
                let is_slip = i == 0 && responses[j].as_str()?.contains("/2=");
                let counter = if is_slip { &mut slipped } else { &mut rest };
                counter.0 += usize::from(rewards[i] > rewards[j]);
                counter.1 += 1;
            }
        }
    }
    let ratio = |(right, all): (usize, usize)| right as f64 / all.max(1) as f64;
    Some((ratio(slipped), ratio(rest)))
}

/// The summary table of a `make demo` run directory.
fn report(dir: &Path) {
    let seconds: BTreeMap<String, f64> = std::fs::read_to_string(dir.join("times.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            (
                v["stage"].as_str().unwrap().to_string(),
                v["ms"].as_f64().unwrap() / 1000.0,
            )
        })
        .collect();
    let accuracy = |model: &str| -> (f64, f64, f64) {
        let a: Vec<f64> = (1..=3)
            .map(|s| {
                read_json(&dir.join(format!("judge_{model}_{s}.json")))["accuracy"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let min = a.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        (mean, min, max)
    };
    let (sft, ppo) = (accuracy("sft"), accuracy("ppo"));
    let rm = read_json(&dir.join("reward_eval.json"))["accuracy"]
        .as_f64()
        .unwrap();
    let kl = read_json(&dir.join("ppo.json"))["kl"].as_f64().unwrap();
    let slips = slipped_pairs(dir);
    let t = |s: &str| seconds.get(s).copied().unwrap_or(0.0);
    let total: f64 = seconds.values().sum();
    println!("\n| stage | held-out result | time |\n|---|---|---|");
    println!(
        "| SFT | accuracy {:.3} (seeds {:.3}–{:.3}) | {:.0} s |",
        sft.0,
        sft.1,
        sft.2,
        t("data") + t("sft")
    );
    let breakdown = slips.map_or(String::new(), |(slipped, rest)| {
        format!(" (correct vs slipped arithmetic {slipped:.3}, every other pair {rest:.3})")
    });
    println!(
        "| reward model | pairwise accuracy {rm:.3}{breakdown} | {:.0} s |",
        t("reward")
    );
    println!(
        "| PPO | accuracy {:.3} (seeds {:.3}–{:.3}), KL to SFT {kl:.3} | {:.0} s |",
        ppo.0,
        ppo.1,
        ppo.2,
        t("ppo")
    );
    // GRPO with the exact-answer verifier, no reward model (when the run has it).
    let grpo = dir.join("judge_grpo_1.json").exists().then(|| {
        let (a, kl) = (accuracy("grpo"), read_json(&dir.join("grpo.json"))["kl"].as_f64().unwrap());
        println!(
            "| GRPO (verifier, no reward model) | accuracy {:.3} (seeds {:.3}–{:.3}), KL to SFT {kl:.3} | {:.0} s |",
            a.0,
            a.1,
            a.2,
            t("grpo")
        );
        (a.0, kl)
    });
    // Online DPO with the same verifier, on pairs of sampled answers (when the run has it).
    let online_dpo = dir.join("judge_online_dpo_1.json").exists().then(|| {
        let a = accuracy("online_dpo");
        let kl = read_json(&dir.join("online_dpo.json"))["kl"].as_f64().unwrap();
        println!(
            "| online DPO (verifier, pairs of samples) | accuracy {:.3} (seeds {:.3}–{:.3}), KL to SFT {kl:.3} | {:.0} s |",
            a.0,
            a.1,
            a.2,
            t("online_dpo")
        );
        (a.0, kl)
    });
    // DPO on the rankings, no reward model, no sampling, plain and with RPO's NLL term
    // (when the run has them).
    let dpo_row = |name: &str, label: &str| {
        dir.join(format!("judge_{name}_1.json")).exists().then(|| {
            let a = accuracy(name);
            let pairs = read_json(&dir.join(format!("{name}.json")))["eval_accuracy"]
                .as_f64()
                .unwrap();
            println!(
                "| {label} | accuracy {:.3} (seeds {:.3}–{:.3}), held-out pairs ranked by its implicit reward {pairs:.3} | {:.0} s |",
                a.0,
                a.1,
                a.2,
                t(name)
            );
            (a.0, pairs)
        })
    };
    let dpo = dpo_row("dpo", "DPO (rankings, no reward model)");
    let rpo = dpo_row("rpo", "DPO + RPO α 1 (rankings, no reward model)");
    let orpo = dpo_row("orpo", "ORPO (rankings, no reward model, no reference)");
    // KTO on the rankings unpaired (when the run has it): its held-out reward margin.
    let kto = dir.join("judge_kto_1.json").exists().then(|| {
        let a = accuracy("kto");
        let metrics = std::fs::read_to_string(dir.join("kto/metrics.jsonl")).unwrap();
        let margin = metrics
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|r| r["eval/rewards/margins"].as_f64())
            .next_back()
            .unwrap_or(f64::NAN);
        println!(
            "| KTO (rankings unpaired, no reward model) | accuracy {:.3} (seeds {:.3}–{:.3}), held-out reward margin (desirable − undesirable) {margin:.3} | {:.0} s |",
            a.0,
            a.1,
            a.2,
            t("kto")
        );
        (a.0, margin)
    });
    println!(
        "| evaluation | 48 held-out problems × 3 sampling seeds, T = 1 | {:.0} s |",
        t("eval")
    );
    println!("| total | | {total:.0} s |");
    println!(
        "{}",
        json!({"sft_accuracy": sft.0, "ppo_accuracy": ppo.0, "reward_accuracy": rm,
               "reward_accuracy_correct_vs_slipped": slips.map(|s| s.0), "kl": kl,
               "grpo_accuracy": grpo.map(|g| g.0), "grpo_kl": grpo.map(|g| g.1),
               "online_dpo_accuracy": online_dpo.map(|g| g.0),
               "online_dpo_kl": online_dpo.map(|g| g.1),
               "dpo_accuracy": dpo.map(|d| d.0), "dpo_pairwise_accuracy": dpo.map(|d| d.1),
               "rpo_accuracy": rpo.map(|d| d.0), "rpo_pairwise_accuracy": rpo.map(|d| d.1),
               "kto_accuracy": kto.map(|d| d.0), "kto_margin": kto.map(|d| d.1),
               "orpo_accuracy": orpo.map(|d| d.0), "orpo_pairwise_accuracy": orpo.map(|d| d.1),
               "seconds": total})
    );
}

/// `make demo-adapters`' table: full fine-tuning, LoRA (alone, with trained copies of the
/// embedding and the head, and that on a 4-bit base) and prompt tuning from the same
/// pretrained base (`scripts/demo_adapters.sh`).
fn adapters_report(dir: &Path) {
    println!("\n| SFT from the pretrained base | trainable parameters | checkpoint (final/) | peak RSS | time | held-out accuracy (seeds) |");
    println!("|---|---|---|---|---|---|");
    let mut rows = vec![];
    for (method, label) in [
        ("pretrain", "none (the pretrained base)"),
        ("full", "full fine-tuning"),
        ("lora", "LoRA r 16, all-linear"),
        (
            "lora-save",
            "LoRA r 16, all-linear, + embedding and head copies",
        ),
        ("qlora-save", "the same on a 4-bit base (NF4, nested)"),
        ("prompt", "prompt tuning, 16 tokens"),
        ("prefix", "prefix tuning, 16 tokens in every layer"),
    ] {
        let summary = read_json(&dir.join(format!("{method}.json")));
        let time = read_json(&dir.join(format!("{method}.time")));
        let acc: Vec<f64> = (1..=3)
            .map(|s| {
                read_json(&dir.join(format!("judge_{method}_{s}.json")))["accuracy"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        let mean = acc.iter().sum::<f64>() / 3.0;
        let (min, max) = acc
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let trainable = summary["trainable_parameters"].as_i64().unwrap_or(0);
        let total = summary["total_parameters"].as_i64().unwrap_or(0);
        let bytes = common::train::dir_size(&dir.join(method).join("final"));
        let (rss, secs) = (
            time["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0,
            time["seconds"].as_f64().unwrap_or(0.0),
        );
        let (what, time_cell) = match method {
            "pretrain" => (
                "(pretraining)".to_string(),
                format!("{secs:.0} s (pretraining)"),
            ),
            _ => (
                format!(
                    "{trainable} of {total} ({:.2} %)",
                    100.0 * trainable as f64 / total.max(1) as f64
                ),
                format!("{secs:.0} s"),
            ),
        };
        println!(
            "| {label} | {what} | {:.2} MB | {rss:.0} MB | {time_cell} | {mean:.3} ({min:.3}–{max:.3}) |",
            bytes as f64 / 1e6
        );
        rows.push(json!({"method": method, "trainable_parameters": trainable, "total_parameters": total,
                         "checkpoint_bytes": bytes, "peak_rss_mb": rss, "seconds": secs, "accuracy": mean}));
    }
    println!("{}", json!(rows));
}

/// Every JSON line of a file (the summary lines of `sft eval --tasks`).
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `key` of task `task`'s summary line in `path`.
fn task_metric(path: &Path, task: &str, key: &str) -> f64 {
    json_lines(path)
        .iter()
        .find(|l| l["task"] == task)
        .and_then(|l| l[key].as_f64())
        .unwrap_or_else(|| panic!("{}: no {key} for {task}", path.display()))
}

/// The table of a `make demo-prompting` run: the lecture's chain-of-thought ablation at
/// this scale, with the sampling seeds' spread; written to DIR/report.md and printed.
fn prompting_report(dir: &Path) {
    let styles = [
        ("standard", "the answer only (standard)", "cage_standard"),
        ("cot", "chain of thought", "cage_cot"),
        ("equation", "equation only", "cage_equation_only"),
        (
            "answer_first",
            "reasoning after the answer",
            "cage_answer_first",
        ),
    ];
    let spread = |xs: &[f64]| {
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let (lo, hi) = xs
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        format!("{mean:.3} ({lo:.3}–{hi:.3})")
    };
    let mut out = String::new();
    out.push_str("| demonstrations | SFT, greedy | SFT, one sample at T 0.7 (3 seeds) | SFT, majority of 8 (3 seeds) | SFT, MC prefix / cloze acc | base, 4 shots in context, greedy |\n|---|---|---|---|---|---|\n");
    let mut rows = vec![];
    for (style, label, fewshot_task) in styles {
        let eval = dir.join(format!("eval_{style}.json"));
        let greedy = task_metric(&eval, "cage_zero_shot", "exact_match,answer");
        let sc = |filter: &str| -> Vec<f64> {
            (1..=3)
                .map(|s| {
                    task_metric(
                        &dir.join(format!("sc_{style}_{s}.json")),
                        "cage_self_consistency",
                        &format!("exact_match,{filter}"),
                    )
                })
                .collect()
        };
        let (first, maj) = (sc("first"), sc("maj@8"));
        let prefix = task_metric(&eval, "cage_mc_prefix", "acc,none");
        let cloze = task_metric(&eval, "cage_mc_cloze", "acc,none");
        let base = task_metric(
            &dir.join("eval_base.json"),
            fewshot_task,
            "exact_match,answer",
        );
        out.push_str(&format!(
            "| {label} | {greedy:.3} | {} | {} | {prefix:.3} / {cloze:.3} | {base:.3} |\n",
            spread(&first),
            spread(&maj)
        ));
        rows.push(
            json!({"style": style, "greedy": greedy, "first": first, "maj8": maj,
                         "mc_prefix": prefix, "mc_cloze": cloze, "base_fewshot": base}),
        );
    }
    let base = dir.join("eval_base.json");
    out.push_str(&format!(
        "\nThe pretrained base on the multiple-choice pair: prefix acc {:.3}, cloze acc {:.3} (4 choices or fewer: chance ≥ 0.25).\n",
        task_metric(&base, "cage_mc_prefix", "acc,none"),
        task_metric(&base, "cage_mc_cloze", "acc,none")
    ));
    let total: u64 = std::fs::read_to_string(dir.join("times.jsonl"))
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["ms"].as_u64())
                .sum()
        })
        .unwrap_or(0);
    out.push_str(&format!("Total time: {:.0} s.\n", total as f64 / 1000.0));
    std::fs::write(dir.join("report.md"), &out).unwrap();
    println!("{out}{}", json!(rows));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("data") => {
            let out = PathBuf::from(arg(&args, "--out").expect("--out DIR"));
            let seed = arg(&args, "--seed").map_or(1, |s| s.parse().expect("--seed N"));
            println!("{}", data(&out, seed, MAX));
        }
        Some("prompting-data") => {
            let out = PathBuf::from(arg(&args, "--out").expect("--out DIR"));
            let seed = arg(&args, "--seed").map_or(1, |s| s.parse().expect("--seed N"));
            println!("{}", prompting_data(&out, seed, MAX));
        }
        Some("tasks-data") => {
            let out = PathBuf::from(arg(&args, "--out").expect("--out DIR"));
            let seed = arg(&args, "--seed").map_or(1, |s| s.parse().expect("--seed N"));
            let (test, shots) = task_docs(seed, MAX);
            std::fs::create_dir_all(&out).unwrap();
            for (name, docs) in [("test.jsonl", test), ("shots.jsonl", shots)] {
                let text: String = docs.iter().map(|d| format!("{d}\n")).collect();
                std::fs::write(out.join(name), text).unwrap();
            }
        }
        Some("judge") => judge_file(
            Path::new(&arg(&args, "--prompts").expect("--prompts FILE")),
            Path::new(&arg(&args, "--generations").expect("--generations FILE")),
        ),
        Some("report") => report(Path::new(&arg(&args, "--dir").expect("--dir DIR"))),
        Some("prompting-report") => {
            prompting_report(Path::new(&arg(&args, "--dir").expect("--dir DIR")))
        }
        Some("adapters-report") => {
            adapters_report(Path::new(&arg(&args, "--dir").expect("--dir DIR")))
        }
        _ => {
            eprintln!(
                "usage: demo data --out DIR [--seed S] | demo tasks-data --out DIR [--seed S] | demo prompting-data --out DIR [--seed S] | demo judge --prompts F --generations F | demo report --dir DIR | demo adapters-report --dir DIR | demo prompting-report --dir DIR"
            );
            std::process::exit(2);
        }
    }
}
