//! `sft eval` and `sft generate` through the real binary, and the data pipeline's token ids
//! and loss masks, against `transformers` on a tiny Llama with a BPE tokenizer trained in
//! the fixture (ChatML template in `chat_template.jinja`, pad == eos).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use data::sft::tokenize;
use data::Tokenizer;
use rlhf_tests::{ok as stdout_json, read_jsonl, run_bin};
use serde_json::{json, Value};

struct Fixture {
    root: PathBuf,
    reference: Value,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sft-commands");
        let reference = rlhf_tests::tiny_llama_fixture(&root);
        Fixture { root, reference }
    })
}

fn sft(args: &[&str]) -> Output {
    run_bin(env!("CARGO_BIN_EXE_sft"), args, &[])
}

#[test]
fn token_ids_and_loss_masks_match_transformers() {
    let f = fixture();
    let tok = Tokenizer::load(&f.root.join("model")).unwrap();
    let rows = data::read_sft(&f.root.join("sft.jsonl")).unwrap();
    for (i, row) in rows.iter().enumerate() {
        let ours = tokenize(row, &tok, true, Default::default()).unwrap();
        let theirs = &f.reference["sft"][i];
        let ids: Vec<i64> = serde_json::from_value(theirs["ids"].clone()).unwrap();
        let mask: Vec<i64> = serde_json::from_value(theirs["mask"].clone()).unwrap();
        assert_eq!(ours.ids, ids, "row {i} ids");
        assert_eq!(ours.loss_mask, mask, "row {i} loss mask");
    }
}

/// TRL's `completion_only_loss` and `assistant_only_loss` switched off widen the loss mask
/// of the reference's rows: prompt–completion rows to every token, conversations to every
/// token (TRL's default); a conversational prompt–completion row keeps its prompt out
/// (up to the generation prompt, as TRL's completion mask) unless completion-only is off.
/// The token ids never change.
#[test]
fn loss_scope_options_widen_the_mask_as_trl() {
    let f = fixture();
    let tok = Tokenizer::load(&f.root.join("model")).unwrap();
    let rows = data::read_sft(&f.root.join("sft.jsonl")).unwrap();
    let scope = |completion_only, assistant_only| data::sft::LossScope {
        completion_only,
        assistant_only,
    };
    for (i, row) in rows.iter().enumerate() {
        let theirs = &f.reference["sft"][i];
        let ids: Vec<i64> = serde_json::from_value(theirs["ids"].clone()).unwrap();
        let mask: Vec<i64> = serde_json::from_value(theirs["mask"].clone()).unwrap();
        let chat = matches!(row, data::SftExample::Messages { .. });
        let prompt = matches!(row, data::SftExample::PromptCompletion { .. });
        for (c, a) in [(false, false), (true, false), (false, true)] {
            let ours = tokenize(row, &tok, true, scope(c, a)).unwrap();
            assert_eq!(ours.ids, ids, "row {i}");
            let widened = (chat && !a) || (prompt && !c);
            let want = if widened {
                vec![1; ids.len()]
            } else {
                mask.clone()
            };
            assert_eq!(
                ours.loss_mask, want,
                "row {i} completion_only {c} assistant_only {a}"
            );
        }
    }
    let file = f.root.join("chat-prompt-completion.jsonl");
    std::fs::write(
        &file,
        r#"{"prompt": [{"role": "user", "content": "5 heads, 14 legs?"}], "completion": [{"role": "assistant", "content": "2 rabbits, 3 chickens."}]}"#,
    )
    .unwrap();
    let row = &data::read_sft(&file).unwrap()[0];
    let assistant = tokenize(row, &tok, true, scope(true, true)).unwrap();
    let from_completion = tokenize(row, &tok, true, scope(true, false)).unwrap();
    let everything = tokenize(row, &tok, true, scope(false, false)).unwrap();
    assert!(everything.loss_mask.iter().all(|&m| m == 1));
    let k = from_completion
        .loss_mask
        .iter()
        .position(|&m| m == 1)
        .unwrap();
    assert!(from_completion.loss_mask[k..].iter().all(|&m| m == 1));
    assert_eq!(
        tok.decode(&from_completion.ids[..k], false),
        "<|im_start|>user\n5 heads, 14 legs?<|im_end|>\n<|im_start|>assistant\n"
    );
    // The assistant-only mask lies inside it.
    assert!(assistant
        .loss_mask
        .iter()
        .zip(&from_completion.loss_mask)
        .all(|(a, b)| a <= b));
}

/// `--chat-template-path FILE`: conversations render with the file's template, and the
/// trained model's tokenizer files carry it (`chat_template.jinja`, and no
/// `chat_template` left in `tokenizer_config.json`); a directory is refused in one line.
/// `--eos-token` in the same run: the saved files make it the EOS as TRL does.
/// `--chat-template-kwargs`: more template variables for every conversation (a row's own
/// override them); not an object, or a name the caller sets, is refused.
#[test]
fn chat_template_path_replaces_the_template_and_travels_with_the_model() {
    let f = fixture();
    let template = f.root.join("plain.jinja");
    let text = "{% for m in messages %}<|im_start|>{{ m.role }}: {% if m.role == 'assistant' and prefix is defined %}{{ prefix }}{% endif %}{{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}";
    std::fs::write(&template, text).unwrap();
    let (tok, _) = Tokenizer::load(&f.root.join("model"))
        .unwrap()
        .with_chat_template_file(&template)
        .unwrap();
    let messages = [
        data::Message::new("user", "5 heads?"),
        data::Message::new("assistant", "2 rabbits."),
    ];
    let rendered = tok
        .render_chat(&messages, &Default::default(), false)
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user: 5 heads?<|im_end|><|im_start|>assistant: 2 rabbits.<|im_end|>"
    );
    let kwargs = |prefix: &str| json!({ "prefix": prefix }).as_object().unwrap().clone();
    let (with_prefix, _) = Tokenizer::load(&f.root.join("model"))
        .unwrap()
        .with_chat_template_file(&template)
        .unwrap();
    let with_prefix = with_prefix.with_template_kwargs(kwargs("So: "));
    let row = data::TemplateArgs {
        kwargs: kwargs("Hence: "),
        ..Default::default()
    };
    for (args, want) in [(Default::default(), "So: "), (row, "Hence: ")] {
        let text = with_prefix.render_chat(&messages, &args, false).unwrap();
        assert!(
            text.contains(&format!("assistant: {want}2 rabbits.")),
            "{text}"
        );
    }
    let out = f.root.join("run-template");
    let data = f.root.join("sft.jsonl");
    let res = sft(&[
        "train",
        "--model",
        f.root.join("model").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--overwrite",
        "--max-steps",
        "1",
        "--chat-template-path",
        template.to_str().unwrap(),
        "--eos-token",
        "<|im_end|>",
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let final_dir = out.join("final");
    let saved = std::fs::read_to_string(final_dir.join("chat_template.jinja")).unwrap();
    assert_eq!(saved, text);
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(final_dir.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(config.get("chat_template").is_none());
    let reloaded = Tokenizer::load(&final_dir).unwrap();
    assert_eq!(
        reloaded
            .render_chat(&messages, &Default::default(), false)
            .unwrap(),
        rendered
    );
    // --eos-token, as TRL sets it: the tokenizer's EOS, the first EOS id of generation,
    // config.json's eos_token_id; text rows end with it.
    let im_end = tok.encode("<|im_end|>", false).unwrap()[0];
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(reloaded.eos_id, Some(im_end));
    let stops = reloaded.generation_eos_ids().unwrap();
    assert_eq!(stops[0], im_end);
    let old_eos = Tokenizer::load(&f.root.join("model"))
        .unwrap()
        .eos_id
        .unwrap();
    assert!(stops.contains(&old_eos) && old_eos != im_end);
    let model_config: Value =
        serde_json::from_str(&std::fs::read_to_string(final_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(model_config["eos_token_id"], im_end);
    let text = data::SftExample::Text("Chickens have two legs.".into());
    let row = tokenize(&text, &reloaded, true, Default::default()).unwrap();
    assert_eq!(row.ids.last(), Some(&im_end));
    let model_dir = f.root.join("model");
    // `sft eval` of the data file with the template (the options after it win).
    let eval = |extra: &[&str]| {
        let args = [
            &[
                "eval",
                "--model",
                model_dir.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--device",
                "cpu",
                "--chat-template-path",
                template.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        sft(&args)
    };
    for (option, value, want) in [
        (
            "--eos-token",
            "<|no such token|>",
            "--eos-token '<|no such token|>' is not a token of this vocabulary",
        ),
        (
            "--chat-template-path",
            model_dir.to_str().unwrap(),
            "--chat-template-path takes a .jinja or .j2 template file",
        ),
    ] {
        rlhf_tests::assert_refused(&eval(&[option, value]), want);
    }
    // The conversations of the data file gain the prefix's tokens as targets.
    let tokens = |out: &std::process::Output| stdout_json(out)["tokens"].as_i64().unwrap();
    let plain = tokens(&eval(&[]));
    let prefixed = tokens(&eval(&["--chat-template-kwargs", r#"{"prefix": "So: "}"#]));
    assert!(
        prefixed > plain,
        "{prefixed} tokens with the prefix, {plain} without"
    );
    for (value, want) in [
        ("[1]", "expected an object of template variables"),
        (
            r#"{"messages": []}"#,
            "'messages' is set by the chat template's caller and cannot be a template variable",
        ),
    ] {
        let res = eval(&["--chat-template-kwargs", value]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && err.contains(want), "{err}");
    }
}

#[test]
fn eval_nll_matches_transformers() {
    let f = fixture();
    let out_path = f.root.join("eval.jsonl");
    let out = sft(&[
        "eval",
        "--model",
        f.root.join("model").to_str().unwrap(),
        "--data",
        f.root.join("sft.jsonl").to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]);
    let summary = stdout_json(&out);
    let rows = read_jsonl(&out_path);
    let reference = f.reference["sft"].as_array().unwrap();
    assert_eq!(rows.len(), reference.len());
    let (mut nll_sum, mut tokens, mut entropy, mut top1) = (0.0, 0, 0.0, 0.0);
    for (ours, theirs) in rows.iter().zip(reference) {
        entropy += theirs["entropy"].as_f64().unwrap();
        top1 += theirs["top1"].as_f64().unwrap();
        let (a, b) = (
            ours["nll"].as_f64().unwrap(),
            theirs["nll"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-4,
            "row {}: nll {a} vs transformers {b}",
            ours["index"]
        );
        assert_eq!(ours["tokens"], theirs["tokens"]);
        nll_sum += b * theirs["tokens"].as_f64().unwrap();
        tokens += theirs["tokens"].as_i64().unwrap();
    }
    assert_eq!(summary["rows"], reference.len());
    assert_eq!(summary["tokens"], tokens);
    let loss = summary["loss"].as_f64().unwrap();
    assert!((loss - nll_sum / tokens as f64).abs() < 1e-4);
    assert!((summary["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-3);
    // TRL's SFTTrainer token metrics over the same targets.
    let n = tokens as f64;
    let (e, a) = (
        summary["entropy"].as_f64().unwrap(),
        summary["mean_token_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (e - entropy / n).abs() < 1e-4,
        "entropy {e} vs {}",
        entropy / n
    );
    assert!(
        (a - top1 / n).abs() < 1e-9,
        "mean_token_accuracy {a} vs {}",
        top1 / n
    );
}

/// `sft generate` of the fixture's prompts into `name` with the options `extra`: its summary
/// and its rows.
fn generate(name: &str, extra: &[&str]) -> (Value, Vec<Value>) {
    let f = fixture();
    let (model, prompts, path) = (
        f.root.join("model"),
        f.root.join("prompts.jsonl"),
        f.root.join(name),
    );
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        path.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    (stdout_json(&sft(&args)), read_jsonl(&path))
}

#[test]
fn greedy_generate_matches_transformers() {
    let f = fixture();
    let options = [
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "2",
    ];
    let (summary, rows) = generate("generated.jsonl", &options);
    assert_eq!(summary["rows"], 3);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["index"], i);
        assert_eq!(row["completion"], f.reference["generate"][i], "prompt {i}");
        assert!(["eos", "length"].contains(&row["finish_reason"].as_str().unwrap()));
    }
    assert_eq!(rows[1]["prompt"][0]["role"], "user");
}

/// `--min-p 1` keeps only the most likely token: sampling at temperature 1 then gives
/// `transformers`' greedy completions, whatever the seed.
#[test]
fn min_p_one_samples_the_greedy_tokens() {
    let f = fixture();
    let options = [
        "--temperature",
        "1",
        "--min-p",
        "1",
        "--seed",
        "9",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "2",
    ];
    let (_, rows) = generate("generated-min-p.jsonl", &options);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["completion"], f.reference["generate"][i], "prompt {i}");
    }
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let run =
        |seed: &str, name: &str| generate(name, &["--seed", seed, "--max-new-tokens", "12"]).1;
    let (a, b, c) = (
        run("5", "s5a.jsonl"),
        run("5", "s5b.jsonl"),
        run("6", "s6.jsonl"),
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
}

/// `--num-return-sequences 3`: three rows per prompt, in order, numbered; sampled at
/// temperature 1 they differ, greedy (temperature 0) they are the greedy completion.
#[test]
fn several_completions_per_prompt() {
    let f = fixture();
    let (summary, rows) = generate(
        "generated-n3.jsonl",
        &[
            "--num-return-sequences",
            "3",
            "--max-new-tokens",
            "12",
            "--batch-size",
            "4",
        ],
    );
    assert_eq!(summary["rows"], 9);
    for (k, row) in rows.iter().enumerate() {
        assert_eq!(
            (row["index"].as_u64(), row["sample"].as_u64()),
            (Some(k as u64 / 3), Some(k as u64 % 3))
        );
    }
    let distinct = |p: usize| {
        let c: std::collections::HashSet<_> = rows[3 * p..3 * p + 3]
            .iter()
            .map(|r| r["completion"].to_string())
            .collect();
        c.len()
    };
    assert!(
        (0..3).any(|p| distinct(p) > 1),
        "no prompt got two different samples: {rows:?}"
    );
    let greedy = [
        "--num-return-sequences",
        "2",
        "--temperature",
        "0",
        "--max-new-tokens",
        "16",
    ];
    let (_, rows) = generate("generated-n2-greedy.jsonl", &greedy);
    assert_eq!(rows.len(), 6);
    for (k, row) in rows.iter().enumerate() {
        assert_eq!(row["completion"], f.reference["generate"][k / 2], "row {k}");
    }
    // Zero completions, or a penalty of 0, are refused with one line.
    let (model, prompts) = (f.root.join("model"), f.root.join("prompts.jsonl"));
    let output = f.root.join("refused.jsonl");
    for (option, want) in [
        (
            "--num-return-sequences",
            "--num-return-sequences must be at least 1",
        ),
        ("--repetition-penalty", "--repetition-penalty must be > 0"),
    ] {
        let out = sft(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            option,
            "0",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("");
        assert!(
            !out.status.success() && last.contains(want),
            "{option}: {stderr}"
        );
    }
}

/// Each bad input: exit code ≠ 0, one line naming the file (and line), no panic.
/// `--dataset-text-field` (TRL's `dataset_text_field`): language-modelling rows whose text
/// sits in another column read as `text` rows do, in `sft eval` and `sft train`; a row
/// without it is refused naming the option.
#[test]
fn the_text_column_is_named_by_dataset_text_field() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let texts = [
        "鸡兔同笼: 35 heads, 94 legs.",
        "12 rabbits and 23 chickens.",
    ];
    let write = |name: &str, field: &str| {
        let path = dir.path().join(name);
        let rows: String = texts
            .iter()
            .map(|t| format!("{}\n", json!({ field: t })))
            .collect();
        std::fs::write(&path, rows).unwrap();
        path
    };
    let (text, content) = (
        write("text.jsonl", "text"),
        write("content.jsonl", "content"),
    );
    let model = f.root.join("model");
    let eval = |data: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "--model", model.to_str().unwrap()];
        args.extend(["--data", data.to_str().unwrap(), "--device", "cpu"]);
        args.extend_from_slice(extra);
        sft(&args)
    };
    let want = stdout_json(&eval(&text, &[]));
    let got = stdout_json(&eval(&content, &["--dataset-text-field", "content"]));
    assert_eq!(got, want);
    let out = dir.path().join("run");
    let train = sft(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        content.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-steps",
        "1",
        "--dataset-text-field",
        "content",
    ]);
    assert!(
        train.status.success(),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    let refused = eval(&content, &[]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        err.contains(":1: expected fields 'prompt' and 'completion', or 'messages', or 'text'"),
        "{err}"
    );
    let refused = eval(&text, &["--dataset-text-field", "content"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("or 'content' (--dataset-text-field)"), "{err}");
}

#[test]
fn bad_data_files_fail_with_one_clear_line() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[u8], &str)] = &[
        (
            "json.jsonl",
            b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \n",
            ":2: invalid JSON",
        ),
        (
            "missing.jsonl",
            b"{\"prompt\": \"a\"}\n",
            ":1: field 'completion': missing",
        ),
        (
            "type.jsonl",
            b"{\"text\": 5}\n",
            ":1: field 'text': expected a string, got a number",
        ),
        (
            "empty-text.jsonl",
            b"{\"prompt\": \"a\", \"completion\": \"\"}\n",
            ":1: field 'completion': is empty",
        ),
        (
            "role.jsonl",
            b"{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
            ":1: field 'messages[0].role': unknown role 'bot'",
        ),
        (
            "utf8.jsonl",
            b"{\"text\": \"\xc3\x28\"}\n",
            ":1: invalid UTF-8",
        ),
        ("empty.jsonl", b"\n\n", "no rows"),
        (
            "bad.parquet",
            b"PAR1 not really",
            "not a readable Parquet file",
        ),
        (
            "array.json",
            b"[{\"prompt\": \"a\", \"completion\": \"b\"},\n {\"prompt\": \"c\"}]",
            ":2: field 'completion': missing",
        ),
        (
            "shape.jsonl",
            b"{\"foo\": 1}\n",
            ":1: expected fields 'prompt' and 'completion'",
        ),
    ];
    let model = f.root.join("model");
    for (name, content, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let out = sft(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            path.to_str().unwrap(),
            "--device",
            "cpu",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(!out.status.success(), "{name} was accepted");
        assert!(!stderr.contains("panicked"), "{name} panicked: {stderr}");
        assert!(
            last.contains(path.to_str().unwrap()) && last.contains(expected),
            "{name}: {last}"
        );
    }
    let missing = dir.path().join("nope.jsonl");
    let out = sft(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        missing.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.jsonl: cannot open"));
    // A conversation needs a chat template: a copy of the model without one refuses it.
    let bare = dir.path().join("no-template");
    std::fs::create_dir(&bare).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(model.join(file), bare.join(file)).unwrap();
    }
    let out = sft(&[
        "eval",
        "--model",
        bare.to_str().unwrap(),
        "--data",
        f.root.join("sft.jsonl").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no chat_template"));
    // A stored weight the model has no place for (here a bias Llama's output projection
    // only has with attention_bias) is named in a warning, as transformers warns of it.
    let extra = dir.path().join("extra-weight");
    std::fs::create_dir(&extra).unwrap();
    for file in std::fs::read_dir(&model).unwrap() {
        let file = file.unwrap().path();
        if file.is_file() {
            std::fs::copy(&file, extra.join(file.file_name().unwrap())).unwrap();
        }
    }
    let weights = extra.join("model.safetensors");
    let mut tensors = tch::Tensor::read_safetensors(&weights).unwrap();
    tensors.push((
        "model.layers.0.self_attn.o_proj.bias".into(),
        tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu)),
    ));
    tch::Tensor::write_safetensors(&tensors, &weights).unwrap();
    let out = sft(&[
        "eval",
        "--model",
        extra.to_str().unwrap(),
        "--data",
        f.root.join("sft.jsonl").to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "1 stored tensors this llama model has no place for, ignored: model.layers.0.self_attn.o_proj.bias"
        ),
        "{stderr}"
    );
}

/// Parquet as `datasets` writes it: the SFT rows as a Hub dataset's shards, read through
/// one pattern (`sft-*.parquet`), score as `transformers` scores the JSON Lines rows (1e-4);
/// a prompt table with other columns and an ultrafeedback-shaped preference table read as
/// their JSON Lines; a bad row is named by its index.
#[test]
fn parquet_tables_and_shards_read_as_their_json_lines() {
    let f = fixture();
    let dir = f.root.join("parquet");
    let out_path = f.root.join("eval-parquet.jsonl");
    let pattern = dir.join("sft-*-of-00005.parquet");
    let out = sft(&[
        "eval",
        "--model",
        f.root.join("model").to_str().unwrap(),
        "--data",
        pattern.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let summary = stdout_json(&out);
    let rows = read_jsonl(&out_path);
    let reference = f.reference["sft"].as_array().unwrap();
    assert_eq!(summary["rows"], reference.len());
    for (ours, theirs) in rows.iter().zip(reference) {
        let (a, b) = (
            ours["nll"].as_f64().unwrap(),
            theirs["nll"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() < 1e-4,
            "row {}: nll {a} vs transformers {b}",
            ours["index"]
        );
        assert_eq!(ours["tokens"], theirs["tokens"]);
    }
    let table = data::read_prompts_with_fields(&dir.join("prompt_fields.parquet")).unwrap();
    let lines = data::read_prompts_with_fields(&dir.join("prompt_fields.jsonl")).unwrap();
    assert_eq!(&table[..], &lines[..]);
    assert_eq!(table[0].1["id"], json!(7));
    assert_eq!(table[1].1["level"], Value::Null);
    let table = data::read_preferences(&dir.join("preferences.parquet")).unwrap();
    let lines = data::read_preferences(&dir.join("preferences.jsonl")).unwrap();
    assert_eq!(&table[..], &lines[..]);
    assert_eq!(table.len(), 2);
    let bad = dir.join("bad.parquet");
    let out = sft(&[
        "eval",
        "--model",
        f.root.join("model").to_str().unwrap(),
        "--data",
        bad.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}[2]: field 'completion': is empty",
            bad.display()
        )),
        "{stderr}"
    );
}

/// A row the chat template refuses (here a system turn, as Mistral's template refuses it)
/// stops the command with the data file, the row's line and the template's own message —
/// in `sft eval` and in `sft generate`.
#[test]
fn a_row_the_template_refuses_is_named_by_file_and_line() {
    use serde_json::json;
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(f.root.join("model")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        model.join("chat_template.jinja"),
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}\
         {% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}\
         {% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}",
    )
    .unwrap();
    let turns = |system: bool| {
        let mut m = vec![json!({"role": "user", "content": "5 heads, 14 legs?"})];
        if system {
            m.insert(0, json!({"role": "system", "content": "Be brief."}));
        }
        m
    };
    let data = dir.path().join("rows.jsonl");
    let mut assistant = turns(false);
    assistant.push(json!({"role": "assistant", "content": "2 rabbits."}));
    let mut refused = turns(true);
    refused.push(json!({"role": "assistant", "content": "2 rabbits."}));
    std::fs::write(
        &data,
        format!(
            "{}\n\n{}\n",
            json!({"messages": assistant}),
            json!({"messages": refused})
        ),
    )
    .unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        format!(
            "{}\n{}\n",
            json!({"messages": turns(false)}),
            json!({"messages": turns(true)})
        ),
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let cases = [
        (
            sft(&[
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--device",
                "cpu",
            ]),
            format!("{}:3: ", data.display()),
        ),
        (
            sft(&[
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompts",
                prompts.to_str().unwrap(),
                "--output",
                output.to_str().unwrap(),
                "--device",
                "cpu",
            ]),
            format!("{}:2: ", prompts.display()),
        ),
    ];
    for (res, location) in cases {
        let err = String::from_utf8_lossy(&res.stderr);
        let last = err.lines().last().unwrap_or_default();
        assert!(!res.status.success(), "{err}");
        assert!(
            last.contains(&location) && last.contains("System role not supported"),
            "expected {location}… System role not supported: {last}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}
