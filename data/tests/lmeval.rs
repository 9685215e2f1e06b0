//! Task files as lm-eval reads them: prompts for 0, 1 and k shots with a description and
//! custom delimiters, `first_n` and the seeded sampler (which never shows a document its
//! own answer), inline samples, `include`, and one clear line for what is outside the
//! supported subset.

use std::path::{Path, PathBuf};

use data::lmeval::task::{chat_messages, plain_text};
use data::lmeval::{PromptOptions, Task};

fn dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let mut rows = String::new();
    for (i, (h, l)) in [(3, 10), (35, 94), (5, 14), (4, 12), (10, 32)]
        .iter()
        .enumerate()
    {
        rows.push_str(&format!(
            "{{\"q\": \"{h} heads, {l} legs\", \"a\": \"{}\", \"id\": {i}}}\n",
            (l - 2 * h) / 2
        ));
    }
    std::fs::write(d.path().join("cage.jsonl"), rows).unwrap();
    d
}

fn task_file(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: cage.jsonl\n    train: cage.jsonl\ntest_split: test\n";
    std::fs::write(&path, format!("task: {name}\n{head}{body}")).unwrap();
    path
}

fn prompt(task: &Task, i: usize, rng: &mut rand::rngs::StdRng) -> String {
    let shots = task.shots(i, rng).unwrap();
    plain_text(&task.prompts(&task.docs[i], &shots).unwrap()[0])
}

fn load(path: &Path, shots: Option<usize>) -> Task {
    let opts = PromptOptions {
        num_fewshot: shots,
        ..PromptOptions::default()
    };
    Task::load(path, &opts).unwrap()
}

#[test]
fn prompts_for_zero_one_and_k_shots() {
    let d = dir();
    // The data file is found beside the task file from any working directory.
    let path = task_file(
        d.path(),
        "cage",
        "description: \"Solve.\\n\"\ndoc_to_text: \"Q: {{q}}\"\ndoc_to_target: a\ntarget_delimiter: \" => \"\nfewshot_delimiter: \"\\n---\\n\"\nfewshot_split: test\nfewshot_config:\n  sampler: first_n\n",
    );
    let mut rng = Task::shot_rng(0);
    assert_eq!(
        prompt(&load(&path, Some(0)), 0, &mut rng),
        "Solve.\nQ: 3 heads, 10 legs"
    );
    // Document 0 is the pool's first: first_n skips it and takes document 1.
    assert_eq!(
        prompt(&load(&path, Some(1)), 0, &mut rng),
        "Solve.\nQ: 35 heads, 94 legs => 12\n---\nQ: 3 heads, 10 legs"
    );
    let t = load(&path, Some(3));
    assert_eq!(
        prompt(&t, 2, &mut rng),
        "Solve.\nQ: 3 heads, 10 legs => 2\n---\nQ: 35 heads, 94 legs => 12\n---\nQ: 4 heads, 12 legs => 2\n---\nQ: 5 heads, 14 legs"
    );
    // The chat form: shots as turns, or folded into one user message.
    let turns = &t
        .prompts(&t.docs[2], &t.shots(2, &mut rng).unwrap())
        .unwrap()[0];
    let multi = chat_messages(turns, true);
    assert_eq!(multi.len(), 1 + 3 * 2 + 1);
    assert_eq!(multi[0], ("system", "Solve.\n".to_string()));
    assert_eq!(multi[2], ("assistant", "2".to_string()));
    let folded = chat_messages(turns, false);
    assert_eq!(folded.len(), 2);
    assert_eq!(
        folded[1].1,
        prompt(&t, 2, &mut rng).trim_start_matches("Solve.\n")
    );
}

#[test]
fn the_seeded_sampler_never_shows_a_document_its_answer() {
    let d = dir();
    let path = task_file(
        d.path(),
        "seeded",
        "doc_to_text: \"{{q}}?\"\ndoc_to_target: a\nfewshot_split: test\n",
    );
    let t = load(&path, Some(3));
    let draw = |seed| {
        let mut rng = Task::shot_rng(seed);
        (0..t.docs.len())
            .map(|i| prompt(&t, i, &mut rng))
            .collect::<Vec<_>>()
    };
    let (a, b, c) = (draw(7), draw(7), draw(8));
    assert_eq!(a, b, "a seed gives the same shots");
    assert_ne!(a, c, "another seed gives others");
    for (i, p) in a.iter().enumerate() {
        let own = format!("{}?", t.docs[i]["q"].as_str().unwrap());
        assert_eq!(
            p.matches(&own).count(),
            1,
            "document {i} sees itself as a shot: {p}"
        );
        assert_eq!(p.matches('?').count(), 4);
    }
    // From another split (here the same rows under `train`) nothing is removed, and with
    // 5 documents 5 shots are possible; from the test split only 4.
    let other = task_file(
        d.path(),
        "train_shots",
        "doc_to_text: \"{{q}}?\"\ndoc_to_target: a\nfewshot_split: train\n",
    );
    let mut rng = Task::shot_rng(1);
    assert_eq!(
        prompt(&load(&other, Some(5)), 0, &mut rng)
            .matches('?')
            .count(),
        6
    );
    let e = load(&path, Some(5))
        .shots(0, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("5 shots asked for, but the few-shot pool has 4"),
        "{e}"
    );
}

#[test]
fn inline_samples_and_include() {
    let d = dir();
    task_file(
        d.path(),
        "base",
        "doc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_target: a\nnum_fewshot: 1\nfewshot_config:\n  sampler: first_n\n  doc_to_target: \"{{why}} So {{a}}.\"\n  samples:\n    - {q: \"2 heads, 6 legs\", a: \"1\", why: \"6 - 4 = 2 legs over.\"}\n",
    );
    let child = d.path().join("child.yaml");
    std::fs::write(
        &child,
        "include: base.yaml\ntask: child\ndescription: \"Think.\\n\\n\"\n",
    )
    .unwrap();
    let t = load(&child, None);
    assert_eq!(t.config.task, "child");
    let mut rng = Task::shot_rng(0);
    assert_eq!(
        prompt(&t, 0, &mut rng),
        "Think.\n\nQ: 2 heads, 6 legs\nA: 6 - 4 = 2 legs over. So 1.\n\nQ: 3 heads, 10 legs\nA:"
    );
}

/// Each refusal is one line naming the file and the key.
#[test]
fn what_is_outside_the_subset_is_refused_by_name() {
    let d = dir();
    let cases = [
        ("doc_to_text: q\ndoc_to_target: a\nprocess_docs: !function utils.process\n", "field 'process_docs': the YAML tag !function"),
        ("doc_to_text: q\ndoc_to_target: a\nuse_prompt: x\n", "field 'use_prompt': not supported"),
        ("doc_to_text: q\ndoc_to_target: a\ngeneration_kwargs:\n  top_p: 0.9\n", "field 'generation_kwargs.top_p': not supported"),
        ("doc_to_text: q\ndoc_to_target: a\nmetric_list:\n  - metric: bleu\n", "field 'metric_list[0].metric': 'bleu' is not supported"),
        ("doc_to_text: q\ndoc_to_target: a\nrepeats: 4\nfilter_list:\n  - name: f\n    filter:\n      - function: lowercase\n", "field 'filter_list[0].filter': with repeats: 4"),
        ("doc_to_text: q\ndoc_to_target: a\nfilter_list:\n  - name: f\n    filter:\n      - function: regex\n        regex_pattern: \"(\"\n", "field 'filter_list[0].filter[0].regex_pattern': invalid regular expression"),
        ("doc_to_text: q\ndoc_to_target: a\noutput_type: multiple_choice\n", "field 'doc_to_choice': missing"),
        ("doc_to_text: q\ndoc_to_target: a\noutput_type: loglikelihood_rolling\n", "field 'output_type': 'loglikelihood_rolling' is not supported"),
    ];
    for (i, (body, want)) in cases.iter().enumerate() {
        let path = task_file(d.path(), &format!("bad{i}"), body);
        let e = Task::load(&path, &PromptOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with(&path.display().to_string()) && e.contains(want),
            "{e}\nwanted: {want}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // Shots from the evaluated split without removing the document: refused.
    let path = d.path().join("leak.yaml");
    std::fs::write(&path, "task: leak\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: cage.jsonl\ntest_split: test\ndoc_to_text: q\ndoc_to_target: a\nnum_fewshot: 2\n").unwrap();
    let e = Task::load(&path, &PromptOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("without removing the evaluated document"), "{e}");
    assert!(Task::load(
        &path,
        &PromptOptions {
            num_fewshot: Some(0),
            ..PromptOptions::default()
        }
    )
    .is_ok());
}
