//! Real chat templates (issue 23): the originals of Llama 3.1, Llama 3.2, Qwen2.5, Phi-3,
//! Gemma (and Gemma 2), DeepSeek-V3, Qwen3 (rows with `chat_template_kwargs`
//! `{"enable_thinking": false}` too), Qwen3.5 (no-think), Qwen3.6, GLM-4-MoE, Gemma 3,
//! Gemma 4, gpt-oss, LFM2.5, DeepSeek-R1-Distill, Nemotron 3 Nano, Phi-3.5 and Cohere 2 as
//! TRL ships them, Mistral v0.2/v0.3's as axolotl
//! ships it, and ChatML, rendered and tokenized by our loader exactly as `transformers`'
//! `apply_chat_template` does (same token ids), with the assistant-token loss mask by the
//! documented rule; rows a template refuses fail with the data file, the line and the
//! template's own message, and rows whose mask the rule cannot derive (Mistral with a
//! system message) with the data file, the line and why. References from
//! `tests/python/template_reference.py`.

use data::sft::{prepare, tokenize, Truncation};

#[test]
fn real_templates_render_and_mask_as_documented() {
    let root = tempfile::tempdir().unwrap();
    let reference = rlhf_tests::run_python(
        "template_reference.py",
        &["make", "--root", root.path().to_str().unwrap()],
    );
    let mut checked = 0;
    for (name, rows) in reference.as_object().unwrap() {
        if name == "preferences" || name == "parquet" {
            continue;
        }
        let dir = root.path().join(name);
        let tok = data::Tokenizer::load(&dir).unwrap();
        let examples = data::read_sft(&dir.join("rows.jsonl")).unwrap();
        checked += check(name, &examples, rows.as_array().unwrap(), &tok);
    }
    assert!(checked >= 20, "{checked} rows checked");
    // The same rows as `datasets` writes them to Parquet, plain Arrow structs (a message
    // lacking a key another message has gets it as null, as `load_dataset` returns it to
    // TRL) and with `datasets`' Json feature: the ids and masks of `transformers` on what
    // `load_dataset("parquet")` gives back.
    let mut parquet = 0;
    for (name, files) in reference["parquet"].as_object().unwrap() {
        let dir = root.path().join(name);
        let tok = data::Tokenizer::load(&dir).unwrap();
        for f in files.as_array().unwrap() {
            let file = dir.join(f["file"].as_str().unwrap());
            let examples = data::read_sft(&file).unwrap();
            let what = format!("{name} {}", file.display());
            parquet += check(&what, &examples, f["rows"].as_array().unwrap(), &tok);
        }
    }
    assert!(parquet >= 40, "{parquet} Parquet rows checked");
    // Preference rows carry `tools` and `chat_template_kwargs` to the template as TRL's
    // DPO, reward and KTO trainers pass them: the pair as TRL's DPO splits it, and the
    // reward model's sequences.
    let preferences = reference["preferences"].as_object().unwrap();
    assert_eq!(preferences.len(), 2);
    for (name, want) in preferences {
        let dir = root.path().join(name);
        let tok = data::Tokenizer::load(&dir).unwrap();
        let rows = data::read_preferences(&dir.join("preferences.jsonl")).unwrap();
        let ids = |key: &str| serde_json::from_value::<Vec<i64>>(want[key].clone()).unwrap();
        let pairs = data::pairs::tokenize(&rows[0], &tok).unwrap();
        assert_eq!(pairs.len(), 1);
        let pair = &pairs[0];
        assert_eq!(
            (&pair.prompt, &pair.chosen, &pair.rejected),
            (&ids("prompt"), &ids("chosen"), &ids("rejected")),
            "{name}: the DPO pair differs from TRL's"
        );
        let ranking = data::preference::tokenize(&rows[0], &tok).unwrap();
        assert_eq!(
            ranking.sequences,
            [ids("full_chosen"), ids("full_rejected")],
            "{name}: the reward model's sequences differ"
        );
    }
}

/// Checks each row of `examples` against `transformers`' ids and mask (or its refusal);
/// returns how many rows were checked.
fn check(
    name: &str,
    examples: &data::rows::Rows<data::SftExample>,
    rows: &[serde_json::Value],
    tok: &data::Tokenizer,
) -> usize {
    assert_eq!(examples.len(), rows.len(), "{name}");
    for (i, (example, want)) in examples.iter().zip(rows).enumerate() {
        if let Some(message) = want.get("error").and_then(|m| m.as_str()) {
            // Refused rows come last: preparing the file stops at the first of them.
            let e = prepare(
                examples,
                tok,
                (4096, Truncation::Truncate),
                false,
                Default::default(),
            )
            .unwrap_err()
            .to_string();
            let at = format!(
                "{}: ",
                examples
                    .error(i, None, "")
                    .to_string()
                    .trim_end_matches(": ")
            );
            assert!(e.starts_with(&at) && e.contains(message), "{name}: {e}");
            continue;
        }
        let got = tokenize(example, tok, false, Default::default())
            .unwrap_or_else(|e| panic!("{name} row {i}: {e}"));
        let ids: Vec<i64> = serde_json::from_value(want["ids"].clone()).unwrap();
        let mask: Vec<i64> = serde_json::from_value(want["mask"].clone()).unwrap();
        assert_eq!(
            got.ids, ids,
            "{name} row {i}: token ids differ; transformers rendered:\n{}",
            want["text"]
        );
        assert_eq!(got.loss_mask, mask, "{name} row {i}: loss mask differs");
        assert!(mask.contains(&1), "{name} row {i}: no target");
    }
    rows.len()
}
