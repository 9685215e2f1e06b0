//! `sft eval --tasks` against lm-evaluation-harness 0.4.13 itself (`simple_evaluate` with
//! its `hf` model, `tests/python/lmeval_reference.py`) on a tiny Llama: for the same task
//! files, every prompt is the same string, every log-likelihood the same to 1e-4 (and the
//! same greedy flag), every generation and filtered answer the same text, and every metric
//! and standard error the same number. Covered: multiple choice (description, first_n
//! shots from the test split, acc and acc_norm), a cloze task (multiple inputs), a
//! loglikelihood task, generation with stop strings, inline chain-of-thought shots,
//! repeats, regex / majority-vote / lowercase / whitespace filters and exact_match's
//! options; then a tokenizer that adds a BOS, with and without the chat template (shots
//! as one message and as turns).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rlhf_tests::{read_jsonl, run_bin, run_python};
use serde_json::{json, Value};

struct Fixture {
    root: PathBuf,
    model: PathBuf,
    /// `model` whose tokenizer adds `<|im_start|>` as BOS.
    bos_model: PathBuf,
    tasks: Vec<PathBuf>,
}

const QUESTIONS: [(u32, u32); 6] = [(3, 10), (35, 94), (5, 14), (4, 12), (10, 32), (7, 20)];

/// Chickens-and-rabbits documents: heads and legs give rabbits = (legs − 2·heads) / 2.
fn documents() -> String {
    let mut out = String::new();
    for (i, &(heads, legs)) in QUESTIONS.iter().enumerate() {
        let rabbits = (legs - 2 * heads) / 2;
        let chickens = heads - rabbits;
        let choices = [rabbits, rabbits + 1, chickens + 2];
        let label = i % 3;
        let mut shuffled = choices;
        shuffled.swap(0, label);
        let doc = json!({
            "question": format!("There are {heads} heads and {legs} legs. How many rabbits?"),
            "answer": format!("{rabbits}"),
            "reasoning": format!("{} legs, {} over.", 2 * heads, legs - 2 * heads),
            "choices": shuffled.iter().map(|c| format!("{c} rabbits")).collect::<Vec<_>>(),
            "label": label,
            "cloze": shuffled.iter().map(|c| format!("{heads} heads and {legs} legs: {c}")).collect::<Vec<_>>(),
        });
        out.push_str(&format!("{doc}\n"));
    }
    out
}

/// The task files, reading `data` (written by absolute path, as lm-eval needs).
fn task_files(dir: &Path, data: &Path) -> Vec<PathBuf> {
    let head = |name: &str| {
        format!(
            "task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n",
            data.display()
        )
    };
    let files = [
        (
            "mc_prefix",
            r#"output_type: multiple_choice
description: "Cage puzzles.\n\n"
doc_to_text: "Question: {{question}}\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
num_fewshot: 2
fewshot_split: test
fewshot_config:
  sampler: first_n
metric_list:
  - metric: acc
  - metric: acc_norm
"#,
        ),
        (
            "mc_cloze",
            r#"output_type: multiple_choice
doc_to_text: label
doc_to_choice: cloze
doc_to_target: " rabbits are in the cage."
target_delimiter: ""
num_fewshot: 1
fewshot_split: test
fewshot_config:
  sampler: first_n
"#,
        ),
        (
            "ll_answer",
            r#"output_type: loglikelihood
doc_to_text: "Q: {{question}}\nA:"
doc_to_target: " {{answer}} rabbits"
metric_list:
  - metric: acc
"#,
        ),
        (
            "gen_cot",
            r#"output_type: generate_until
doc_to_text: "Q: {{question}}\nA:"
doc_to_target: "{{answer}}"
num_fewshot: 2
fewshot_config:
  sampler: first_n
  doc_to_target: "{{reasoning}} The answer is {{answer}}."
  samples:
    - {question: "There are 2 heads and 6 legs. How many rabbits?", answer: "1", reasoning: "4 legs, 2 over."}
    - {question: "There are 6 heads and 20 legs. How many rabbits?", answer: "4", reasoning: "12 legs, 8 over."}
generation_kwargs:
  until: ["\n\n", "Q:"]
  max_gen_toks: 32
  do_sample: false
repeats: 2
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "The answer is (\\-?[0-9]+)"
      - function: take_first
  - name: flexible
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]{2,})|([a-z]+)"
        group_select: -1
      - function: majority_vote
      - function: take_first
  - name: raw
    filter:
      - function: lowercase
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
    regexes_to_ignore: [" rabbits?"]
"#,
        ),
    ];
    files
        .iter()
        .map(|(name, body)| {
            let path = dir.join(format!("{name}.yaml"));
            std::fs::write(&path, format!("{}{body}", head(name))).unwrap();
            path
        })
        .collect()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lmeval");
        rlhf_tests::tiny_llama_fixture(&root);
        let (model, bos_model) = (root.join("model"), root.join("bos-model"));
        run_python(
            "lmeval_reference.py",
            &["bos", "--model", s(&model), "--out", s(&bos_model)],
        );
        let data = root.join("cage.jsonl");
        std::fs::write(&data, documents()).unwrap();
        let tasks = task_files(&root, &data);
        Fixture {
            root,
            model,
            bos_model,
            tasks,
        }
    })
}

/// The fixture's model after SFT that memorises each document's chain-of-thought answer
/// ("… The answer is N.") to its zero-shot question.
fn trained_model() -> &'static PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let f = fixture();
        let rows: String = read_jsonl(&f.root.join("cage.jsonl"))
            .iter()
            .map(|d| {
                let completion = format!(" {} The answer is {}.\n\n", d["reasoning"].as_str().unwrap(), d["answer"].as_str().unwrap());
                format!("{}\n", json!({"prompt": format!("Q: {}\nA:", d["question"].as_str().unwrap()), "completion": completion}))
            })
            .collect();
        let data = f.root.join("cot-sft.jsonl");
        std::fs::write(&data, rows).unwrap();
        let out = f.root.join("cot-sft");
        let args: sft::train::TrainArgs = rlhf_tests::parse_args(&[
            "--model", s(&f.model), "--data", s(&data), "--output-dir", s(&out), "--overwrite",
            "--lr", "1e-2", "--batch-size", "6", "--epochs", "150", "--seed", "1", "--device", "cpu",
        ]);
        sft::train::run(&args).unwrap();
        out.join("final")
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn joined(tasks: &[PathBuf]) -> String {
    tasks.iter().map(|p| s(p)).collect::<Vec<_>>().join(",")
}

/// Our summary lines (one per task) and sample lines.
fn ours(model: &Path, tasks: &[PathBuf], extra: &[&str], tag: &str) -> (Vec<Value>, Vec<Value>) {
    let out = fixture().root.join(format!("samples-{tag}.jsonl"));
    let tasks = joined(tasks);
    let mut args = vec![
        "eval",
        "--model",
        s(model),
        "--tasks",
        &tasks,
        "--output",
        s(&out),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let output = run_bin(env!("CARGO_BIN_EXE_sft"), &args, &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summaries = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (summaries, read_jsonl(&out))
}

/// The bundled tasks run greedily (all but self-consistency, which samples).
fn bundled_greedy() -> Vec<PathBuf> {
    let dir = rlhf_tests::repo_root().join("tasks/cage");
    let mut tasks: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("cage_") && !name.contains("self_consistency")
        })
        .collect();
    tasks.sort();
    tasks
}

/// lm-eval's output for every run the tests compare with, from one Python process (its
/// imports take longer than all these runs of a tiny model): name → {results, samples}.
fn theirs(name: &str) -> &'static Value {
    static RUNS: OnceLock<Value> = OnceLock::new();
    let runs = RUNS.get_or_init(|| {
        let f = fixture();
        let run = |model: &Path, tasks: &[PathBuf], extra: Value| {
            let mut spec = json!({"model": s(model), "tasks": joined(tasks)});
            spec.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            spec
        };
        let chat = |multiturn: bool| {
            run(
                &f.bos_model,
                &[f.tasks[0].clone(), f.tasks[3].clone()],
                json!({"apply_chat_template": true, "fewshot_as_multiturn": multiturn, "limit": 3}),
            )
        };
        let specs = json!({
            "plain": run(&f.model, &f.tasks, json!({})),
            "bos": run(&f.bos_model, &f.tasks[..1], json!({"num_fewshot": 3, "limit": 4})),
            "chat-true": chat(true),
            "chat-false": chat(false),
            "trained": run(trained_model(), &f.tasks[3..4], json!({"num_fewshot": 0})),
            "bundled": run(&f.model, &bundled_greedy(), json!({"limit": 2})),
        });
        let path = f.root.join("lmeval-runs.json");
        std::fs::write(&path, specs.to_string()).unwrap();
        run_python("lmeval_reference.py", &["runs", "--spec", s(&path)])
    });
    &runs[name]
}

/// Every sample and every summary number of ours equals lm-eval's.
fn assert_same(ours: &(Vec<Value>, Vec<Value>), theirs: &Value) {
    let (summaries, samples) = ours;
    for summary in summaries {
        let task = summary["task"].as_str().unwrap();
        let reference = &theirs["results"][task];
        let mut compared = 0;
        for (key, want) in reference.as_object().unwrap() {
            if !key.contains(',') {
                continue;
            }
            let got = &summary[key];
            match (got.as_f64(), want.as_f64()) {
                (Some(g), Some(w)) => {
                    assert!((g - w).abs() < 1e-9, "{task} {key}: ours {g}, lm-eval {w}")
                }
                _ => assert_eq!(got, want, "{task} {key}"),
            }
            compared += 1;
        }
        assert!(compared >= 2, "{task}: no metrics compared in {reference}");
        let theirs_samples = theirs["samples"][task].as_array().unwrap();
        let ours_samples: Vec<&Value> = samples.iter().filter(|x| x["task"] == task).collect();
        assert_eq!(
            ours_samples.len(),
            theirs_samples.len(),
            "{task}: sample count"
        );
        for want in theirs_samples {
            let got = ours_samples
                .iter()
                .find(|x| x["doc_id"] == want["doc_id"] && x["filter"] == want["filter"])
                .unwrap_or_else(|| {
                    panic!(
                        "{task}: no sample for doc {} filter {}",
                        want["doc_id"], want["filter"]
                    )
                });
            assert_sample(task, got, want);
        }
    }
}

fn assert_sample(task: &str, got: &Value, want: &Value) {
    let at = format!("{task} doc {} filter {}", want["doc_id"], want["filter"]);
    let (g_args, w_args) = (
        got["arguments"].as_array().unwrap(),
        want["arguments"].as_array().unwrap(),
    );
    assert_eq!(g_args.len(), w_args.len(), "{at}: requests");
    for (g, w) in g_args.iter().zip(w_args) {
        assert_eq!(g[0], w[0], "{at}: context");
        if w[1].is_string() {
            assert_eq!(g[1], w[1], "{at}: continuation");
        }
    }
    assert_eq!(got["prompt"], w_args[0][0], "{at}: prompt");
    assert_eq!(got["target"], want["target"], "{at}: target");
    let (g_resps, w_resps) = (
        got["resps"].as_array().unwrap(),
        want["resps"].as_array().unwrap(),
    );
    assert_eq!(g_resps.len(), w_resps.len(), "{at}: responses");
    for (g, w) in g_resps.iter().zip(w_resps) {
        let (g, w) = (&g[0], &w[0]);
        if let Some(w_ll) = w[0].as_f64() {
            let g_ll = g[0].as_f64().unwrap();
            assert!(
                (g_ll - w_ll).abs() < 1e-4,
                "{at}: log-likelihood {g_ll} vs {w_ll}"
            );
            assert_eq!(g[1], w[1], "{at}: greedy");
        }
    }
    if want["resps"][0][0].is_string() {
        assert_eq!(got["resps"], want["resps"], "{at}: generations");
        assert_eq!(
            got["filtered_resps"], want["filtered_resps"],
            "{at}: filtered answer"
        );
    }
    for metric in want["metrics"].as_array().unwrap() {
        let m = metric.as_str().unwrap();
        assert_eq!(got[m].as_f64(), want[m].as_f64(), "{at}: {m}");
    }
}

#[test]
fn every_number_equals_lm_eval() {
    let f = fixture();
    let ours = ours(&f.model, &f.tasks, &[], "plain");
    assert_eq!(ours.0.len(), 4, "one summary line per task");
    assert_same(&ours, theirs("plain"));
    // The generation task is not trivially right or wrong: the filters disagree somewhere.
    let gen: Vec<&Value> = ours.1.iter().filter(|x| x["task"] == "gen_cot").collect();
    let answers: std::collections::HashSet<String> = gen
        .iter()
        .map(|x| x["filtered_resps"][0].to_string())
        .collect();
    assert!(answers.len() > 2, "{answers:?}");
    // The CoT shots are in the prompt, after their own questions.
    let prompt = gen[0]["prompt"].as_str().unwrap();
    assert!(prompt.starts_with("Q: There are 2 heads and 6 legs. How many rabbits?\nA: 4 legs, 2 over. The answer is 1.\n\nQ: There are 6 heads"), "{prompt}");
}

#[test]
fn num_fewshot_limit_bos_and_chat_template_equal_lm_eval() {
    let f = fixture();
    let mc = &f.tasks[..1];
    // BOS added by the tokenizer; --num-fewshot over the file, --limit on the documents.
    let o = ours(
        &f.bos_model,
        mc,
        &["--num-fewshot", "3", "--limit", "4"],
        "bos",
    );
    assert_eq!(o.1.len(), 4);
    assert_same(&o, theirs("bos"));
    // ChatML starts with <|im_start|>, the BOS: no second one is added.
    let tasks = [f.tasks[0].clone(), f.tasks[3].clone()];
    for multiturn in ["true", "false"] {
        let flags = [
            "--apply-chat-template",
            "--fewshot-as-multiturn",
            multiturn,
            "--limit",
            "3",
        ];
        let o = ours(&f.bos_model, &tasks, &flags, &format!("chat-{multiturn}"));
        let prompt = o.1[0]["prompt"].as_str().unwrap();
        assert!(
            prompt.starts_with("<|im_start|>system\nCage puzzles."),
            "{prompt}"
        );
        assert_eq!(
            prompt.matches("<|im_start|>user").count(),
            if multiturn == "true" { 3 } else { 1 },
            "{prompt}"
        );
        assert_same(&o, theirs(&format!("chat-{multiturn}")));
    }
}

/// On a model that has learned the answers, the filters extract them: the strict regex
/// finds every "The answer is N" (exact match 1), the flexible one takes the last number
/// of two digits or else the last word (right only for the one two-digit answer, 12) —
/// and every generation, answer and metric is lm-eval's.
#[test]
fn filters_extract_a_trained_models_answers_as_lm_eval() {
    let f = fixture();
    let model = trained_model();
    let tasks = [f.tasks[3].clone()];
    let flags = ["--num-fewshot", "0"];
    let o = ours(model, &tasks, &flags, "trained");
    assert_same(&o, theirs("trained"));
    let summary = &o.0[0];
    assert_eq!(summary["exact_match,strict"], 1.0, "{summary}");
    assert!(
        (summary["exact_match,flexible"].as_f64().unwrap() - 1.0 / 6.0).abs() < 1e-12,
        "{summary}"
    );
    let twelve =
        o.1.iter()
            .find(|x| x["doc_id"] == 1 && x["filter"] == "flexible")
            .unwrap();
    assert_eq!(twelve["filtered_resps"], json!(["12"]));
    let two =
        o.1.iter()
            .find(|x| x["doc_id"] == 0 && x["filter"] == "flexible")
            .unwrap();
    assert_eq!(two["filtered_resps"], json!(["is"]));
}

/// The bundled chickens-and-rabbits tasks (`tasks/cage/`, relative data files and an
/// `include`) read as lm-eval reads them: every greedy and multiple-choice task gives
/// lm-eval's prompts and numbers; self-consistency samples 8 answers per problem and
/// votes.
#[test]
fn the_bundled_tasks_equal_lm_eval() {
    let f = fixture();
    let greedy = bundled_greedy();
    assert_eq!(greedy.len(), 7);
    let sampled = [rlhf_tests::repo_root().join("tasks/cage/cage_self_consistency.yaml")];
    let flags = ["--limit", "2"];
    let o = ours(&f.model, &greedy, &flags, "bundled");
    assert_eq!(o.0.len(), 7);
    assert_same(&o, theirs("bundled"));
    let cot = o.1.iter().find(|x| x["task"] == "cage_cot").unwrap();
    assert!(
        cot["prompt"]
            .as_str()
            .unwrap()
            .ends_with("chickens.\n\nHeads 33, legs 102."),
        "{}",
        cot["prompt"]
    );
    let (summary, samples) = ours(&f.model, &sampled, &flags, "self-consistency");
    assert!(
        summary[0]["exact_match,maj@8"].is_number(),
        "{:?}",
        summary[0]
    );
    for x in &samples {
        let resps = x["resps"][0].as_array().unwrap();
        assert_eq!(resps.len(), 8);
        assert!(
            resps.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "8 samples differ"
        );
    }
}

/// A task file outside the subset, a missing one and a bad option each end the command
/// with one line naming the file and key (or the option), and exit 1.
#[test]
fn bad_task_files_are_refused_with_one_line() {
    let f = fixture();
    // Not beside the good files: lm-eval indexes every task file of their directory.
    std::fs::create_dir_all(f.root.join("refused")).unwrap();
    let bad = f.root.join("refused/bad.yaml");
    let text = std::fs::read_to_string(&f.tasks[0]).unwrap()
        + "process_results: !function utils.process\n";
    std::fs::write(&bad, text).unwrap();
    let missing = f.root.join("refused/missing.yaml");
    for (args, want) in [
        (
            vec!["--tasks", s(&bad)],
            "field 'process_results': the YAML tag !function",
        ),
        (vec!["--tasks", s(&missing)], "cannot read"),
        (
            vec!["--tasks", s(&f.tasks[0]), "--limit", "0"],
            "--limit must be at least 1",
        ),
    ] {
        let mut argv = vec!["eval", "--model", s(&f.model), "--device", "cpu"];
        argv.extend(args);
        let out = run_bin(env!("CARGO_BIN_EXE_sft"), &argv, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(last.starts_with("error: ") && last.contains(want), "{err}");
    }
}

/// Sampled task generations use the model's generation_config top-k and top-p, with
/// transformers' defaults (50, 1.0) where it sets none.
#[test]
fn sampling_settings_come_from_the_generation_config() {
    let f = fixture();
    let tok = data::Tokenizer::load(&f.model).unwrap();
    assert_eq!(tok.generation_sampling().unwrap(), (50, 1.0));
    let dir = f.root.join("sampling-model");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(f.model.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"top_k": 7, "top_p": 0.9}"#,
    )
    .unwrap();
    let tok = data::Tokenizer::load(&dir).unwrap();
    assert_eq!(tok.generation_sampling().unwrap(), (7, 0.9));
}
