//! A model directory's tokenizer: `tokenizer.json` through the `tokenizers` crate, special
//! tokens from `tokenizer_config.json` / `special_tokens_map.json` / `config.json`, and the
//! chat template (`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::error::{DataError, Result};
use crate::formats::{Content, Message, PromptExample, TemplateArgs};
use crate::response::ResponseTemplate;

/// `[start, end)` in bytes of the encoded text.
pub type ByteSpan = (usize, usize);

#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_id: Option<i64>,
    pub eos_id: Option<i64>,
    /// Used only to fill padding; masks come from lengths, never from this id, so it may
    /// equal the EOS id.
    pub pad_id: i64,
    chat_template: Option<ChatTemplate>,
    /// The EOS was set by the run (`--eos-token`): it comes first among the generation
    /// EOS ids.
    eos_override: bool,
    /// More chat-template variables for every conversation (`--chat-template-kwargs`); a
    /// row's own `chat_template_kwargs` override them.
    template_kwargs: serde_json::Map<String, Value>,
    /// `tokenizer_config.json`'s `response_template` (transformers' `parse_response`), read
    /// when first asked for.
    response_template: Option<Value>,
    response_compiled: std::sync::OnceLock<std::result::Result<ResponseTemplate, String>>,
    dir: PathBuf,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        fs::read_to_string(path).map_err(|e| DataError::file(path, "cannot read").because(e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DataError::file(path, "invalid JSON").because(e))
}

/// A special token given as a string or as an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(DataError::file(
                &path,
                "missing (the model directory needs a tokenizer.json)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| DataError::file(&path, "cannot load tokenizer").because(e))?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?.unwrap_or(Value::Null);
        let map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let model_config = read_json(&dir.join("config.json"))?.unwrap_or(Value::Null);
        let special =
            |name: &str| token_text(config.get(name)).or_else(|| token_text(map.get(name)));
        let id_of = |text: &Option<String>, field: &str| {
            text.as_deref()
                .and_then(|t| inner.token_to_id(t))
                .map(i64::from)
                .or_else(|| model_config.get(field).and_then(Value::as_i64))
        };
        let bos_token = special("bos_token");
        let eos_token = special("eos_token");
        let pad_token = special("pad_token");
        let bos_id = id_of(&bos_token, "bos_token_id");
        let eos_id = id_of(&eos_token, "eos_token_id");
        let pad_id = id_of(&pad_token, "pad_token_id").or(eos_id).unwrap_or(0);

        let template_source = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => {
                let file = dir.join("chat_template.jinja");
                file.exists()
                    .then(|| fs::read_to_string(&file))
                    .transpose()
                    .map_err(|e| DataError::file(&file, "cannot read").because(e))?
            }
        };
        let chat_template = template_source
            .map(|s| ChatTemplate::new(&s).map_err(|m| DataError::file(&config_path, m)))
            .transpose()?;
        Ok(Tokenizer {
            inner,
            bos_token,
            eos_token,
            bos_id,
            eos_id,
            pad_id,
            chat_template,
            eos_override: false,
            template_kwargs: Default::default(),
            response_template: config
                .get("response_template")
                .filter(|v| !v.is_null())
                .cloned(),
            response_compiled: Default::default(),
            dir: dir.to_path_buf(),
        })
    }

    /// The tokenizer's own response template (`tokenizer_config.json`'s
    /// `response_template`, as transformers 5 saves it), if it has one: how its answers are
    /// read back into messages ([`ResponseTemplate::message`]).
    pub fn response_template(&self) -> Result<Option<&ResponseTemplate>> {
        let Some(spec) = &self.response_template else {
            return Ok(None);
        };
        match self
            .response_compiled
            .get_or_init(|| ResponseTemplate::from_json(spec))
        {
            Ok(t) => Ok(Some(t)),
            Err(e) => Err(DataError::file(
                self.dir.join("tokenizer_config.json"),
                format!("response_template: {e}"),
            )),
        }
    }

    /// The same tokenizer rendering every conversation with `kwargs` as more template
    /// variables (TRL's `chat_template_kwargs`, e.g. `{"enable_thinking": false}`).
    pub fn with_template_kwargs(mut self, kwargs: serde_json::Map<String, Value>) -> Self {
        self.template_kwargs = kwargs;
        self
    }

    /// The same tokenizer with the chat template of `path`, a `.jinja` or `.j2` file
    /// (TRL's `chat_template_path` given a template file), and the template's text.
    pub fn with_chat_template_file(mut self, path: &Path) -> Result<(Self, String)> {
        let is_template =
            path.is_file() && path.extension().is_some_and(|e| e == "jinja" || e == "j2");
        if !is_template {
            return Err(DataError::file(
                path,
                "--chat-template-path takes a .jinja or .j2 template file (a tokenizer directory would add its special tokens to the model, which is not supported)",
            ));
        }
        let text = fs::read_to_string(path)
            .map_err(|e| DataError::file(path, "cannot read").because(e))?;
        let template = ChatTemplate::new(&text).map_err(|m| DataError::file(path, m))?;
        self.chat_template = Some(template);
        Ok((self, text))
    }

    /// The same tokenizer with `token` as its EOS (TRL's `eos_token`): appended to text
    /// rows, `eos_token` in chat templates, and the first of the generation EOS ids.
    pub fn with_eos_token(mut self, token: &str) -> Result<Self> {
        let id = self.inner.token_to_id(token).ok_or_else(|| {
            DataError::file(
                self.dir.join("tokenizer.json"),
                format!("--eos-token '{token}' is not a token of this vocabulary"),
            )
        })?;
        self.eos_token = Some(token.to_string());
        self.eos_id = Some(i64::from(id));
        self.eos_override = true;
        Ok(self)
    }

    /// Whether both map every token to the same id (added tokens included).
    pub fn same_vocabulary(&self, other: &Tokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The chat template's text, if there is one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_ref().map(ChatTemplate::source)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        Ok(self.encode_with_offsets(text, add_special_tokens)?.0)
    }

    /// The encoding of `text`; a failure names the tokenizer's file.
    fn encoding(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        self.inner.encode(text, add_special_tokens).map_err(|e| {
            DataError::file(
                self.dir.join("tokenizer.json"),
                format!("encoding failed: {e}"),
            )
        })
    }

    /// Ids and the byte span of `text` each token came from.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<i64>, Vec<ByteSpan>)> {
        let enc = self.encoding(text, add_special_tokens)?;
        let ids = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        Ok((ids, enc.get_offsets().to_vec()))
    }

    /// Ids and each token's own bytes of `text` (TRL's `encode_with_byte_offsets`, for a
    /// byte-level tokenizer: the tokens of one multi-byte character split its span).
    pub fn encode_with_byte_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<i64>, Vec<ByteSpan>)> {
        let enc = self.encoding(text, add_special_tokens)?;
        let ids = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        let spans =
            crate::byte_level::normalize_byte_offsets(enc.get_offsets(), enc.get_tokens(), text.as_bytes())
                .ok_or_else(|| {
                    DataError::file(
                        self.dir.join("tokenizer.json"),
                        "the tokenizer's byte offsets overlap where its pieces cannot explain it (cross-tokenizer alignment needs monotonic offsets)",
                    )
                })?;
        Ok((ids, spans))
    }

    /// Whether this is a byte-level BPE tokenizer (its pre-tokenizer or decoder is
    /// `ByteLevel`, as TRL's `is_byte_level_tokenizer` asks): its pieces spell the text's
    /// bytes, one character each.
    pub fn is_byte_level(&self) -> bool {
        let names = |v: Option<String>| v.is_some_and(|s| s.contains("\"ByteLevel\""));
        names(
            self.inner
                .get_pre_tokenizer()
                .and_then(|p| serde_json::to_string(p).ok()),
        ) || names(
            self.inner
                .get_decoder()
                .and_then(|d| serde_json::to_string(d).ok()),
        )
    }

    /// The bytes of text token `id` stands for: an added token's content, a byte-level
    /// piece's characters (TRL's `piece_byte_len`).
    pub fn piece_bytes(&self, id: i64) -> usize {
        let id = id as u32;
        // The added tokens looked up where they are kept (the tokenizer's own accessor
        // copies them all).
        match self.inner.get_added_vocabulary().simple_id_to_token(id) {
            Some(content) => content.len(),
            None => self
                .inner
                .id_to_token(id)
                .map_or(0, |p| crate::byte_level::piece_len(&p)),
        }
    }

    /// Every token's text and id, added tokens included.
    pub fn vocabulary(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, skip_special_tokens)
            .unwrap_or_default()
    }

    /// Renders a conversation with the chat template.
    pub fn render_chat(
        &self,
        messages: &[Message],
        template_args: &TemplateArgs,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            DataError::file(
                self.dir.join("tokenizer_config.json"),
                "the tokenizer has no chat_template, so rows with 'messages' cannot be used",
            )
        })?;
        template
            .render(
                messages,
                template_args,
                add_generation_prompt,
                (
                    self.bos_token.as_deref().unwrap_or(""),
                    self.eos_token.as_deref().unwrap_or(""),
                ),
                &self.template_kwargs,
            )
            .map_err(|m| DataError::file(self.dir.join("tokenizer_config.json"), m))
    }

    /// Token ids of a prompt, ready for generation: plain text with the tokenizer's special
    /// tokens, a conversation through the template (with the row's `tools` and `documents`)
    /// with the generation prompt added.
    pub fn encode_prompt(&self, prompt: &PromptExample) -> Result<Vec<i64>> {
        match &prompt.prompt {
            Content::Text(t) => self.encode(t, true),
            Content::Messages(m) => {
                self.encode(&self.render_chat(m, &prompt.template, true)?, false)
            }
        }
    }

    /// `generation_config.json`'s `top_k` and `top_p`, with `transformers`' defaults (50
    /// and 1.0): how `generate` samples this model when asked only to sample.
    pub fn generation_sampling(&self) -> Result<(i64, f64)> {
        let config = read_json(&self.dir.join("generation_config.json"))?.unwrap_or(Value::Null);
        let top_k = config.get("top_k").and_then(Value::as_i64).unwrap_or(50);
        let top_p = config.get("top_p").and_then(Value::as_f64).unwrap_or(1.0);
        Ok((top_k, top_p))
    }

    /// The ids that end generation: `generation_config.json`'s `eos_token_id` (an int or a
    /// list), else `config.json`'s, else the tokenizer's EOS.
    pub fn generation_eos_ids(&self) -> Result<Vec<i64>> {
        let ids = self.stated_eos_ids()?;
        Ok(match (self.eos_override, self.eos_id) {
            (true, Some(eos)) => eos_first(ids, eos),
            _ => ids,
        })
    }

    /// The EOS ids the model directory states (`generation_config.json`, else
    /// `config.json`), else the tokenizer's EOS.
    fn stated_eos_ids(&self) -> Result<Vec<i64>> {
        for file in ["generation_config.json", "config.json"] {
            if let Some(v) = read_json(&self.dir.join(file))? {
                let ids = eos_token_ids(v.get("eos_token_id"));
                if !ids.is_empty() {
                    return Ok(ids);
                }
            }
        }
        Ok(self.eos_id.into_iter().collect())
    }
}

/// The ids of an `eos_token_id` field (`config.json`, `generation_config.json`): an int or
/// a list of them.
pub fn eos_token_ids(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => vec![],
    }
}

/// `ids` with `eos` first and nowhere else: how TRL's `eos_token` joins a model's own EOS
/// ids.
pub fn eos_first(mut ids: Vec<i64>, eos: i64) -> Vec<i64> {
    ids.retain(|&i| i != eos);
    ids.insert(0, eos);
    ids
}
