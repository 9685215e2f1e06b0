//! The rows each stage reads (DESIGN.md's table; field names follow TRL). One type per use;
//! extra fields are ignored.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::Result;
use crate::rows::{type_name, Row};

pub const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "ipython",
];

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: String,
    /// Its text: a string as given, a list of typed text parts joined (no separator), or
    /// empty for `null` beside `tool_calls`.
    pub content: String,
    /// Every other field as the row gave it (`tool_calls`, `tool_call_id`, `name`,
    /// `reasoning_content`, …), and `content: null` where the row had it: the chat template
    /// sees them as `apply_chat_template` passes messages (see the `Serialize`).
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            extra: Map::new(),
        }
    }
}

/// The names a message's reasoning goes under, the one templates read first
/// (`transformers`' `_REASONING_FIELDS`).
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// What the template gets, as `transformers`' `apply_chat_template` hands a message over:
/// `role`, `content`, then the other fields, without the ones whose value is `null` (a
/// `content: null` beside tool calls, the nulls a Parquet table gives a message for the keys
/// other messages have); a reasoning given under any of its names is then also
/// `reasoning_content` (and `thinking`, unless the message has its own), as
/// `_alias_reasoning_fields` does.
impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut fields = Map::new();
        fields.insert("role".into(), Value::String(self.role.clone()));
        fields.insert("content".into(), Value::String(self.content.clone()));
        fields.extend(self.extra.clone());
        fields.retain(|_, v| !v.is_null());
        if let Some(reasoning) = REASONING_FIELDS
            .iter()
            .find_map(|k| fields.get(*k).cloned())
        {
            // {"thinking": reasoning, **message, "reasoning_content": reasoning}
            let mut aliased = Map::new();
            aliased.insert("thinking".into(), reasoning.clone());
            aliased.extend(fields);
            aliased.insert("reasoning_content".into(), reasoning);
            fields = aliased;
        }
        fields.serialize(serializer)
    }
}

/// Row-level values a chat template reads besides the messages, as `apply_chat_template`
/// passes them: `tools` (function schemas), `documents` (retrieval templates) and
/// `chat_template_kwargs` (TRL's column: more variables, such as Qwen3's
/// `enable_thinking`).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct TemplateArgs {
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    pub kwargs: Map<String, Value>,
}

/// The variables `apply_chat_template` sets itself: a keyword argument of the same name is
/// an error there (Python's "got multiple values for keyword argument").
pub const TEMPLATE_RESERVED: &[&str] = &["messages", "tools", "documents", "add_generation_prompt"];

/// Extra chat-template variables (`chat_template_kwargs`): a JSON object without the
/// [`TEMPLATE_RESERVED`] names; `Err` says what is wrong.
pub fn template_kwargs(v: &Value) -> std::result::Result<Map<String, Value>, String> {
    let Value::Object(map) = v else {
        return Err(format!(
            "expected an object of template variables (e.g. {{\"enable_thinking\": false}}), got {}",
            type_name(v)
        ));
    };
    if let Some(k) = map.keys().find(|k| TEMPLATE_RESERVED.contains(&k.as_str())) {
        return Err(format!(
            "'{k}' is set by the chat template's caller and cannot be a template variable"
        ));
    }
    Ok(map.clone())
}

impl TemplateArgs {
    fn decode(row: &Row) -> Result<Self> {
        // A list, or a list written as a JSON string (as datasets store function schemas;
        // TRL's `json.loads(tools)`).
        let list = |field: &str| match row.object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v @ Value::Array(_)) => Ok(Some(v.clone())),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(v @ Value::Array(_)) => Ok(Some(v)),
                _ => Err(row.error(Some(field), "a string that is not a JSON list")),
            },
            Some(other) => Err(row.error(
                Some(field),
                format!("expected a list, got {}", type_name(other)),
            )),
        };
        let kwargs = match row.object.get("chat_template_kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(v) => {
                template_kwargs(v).map_err(|m| row.error(Some("chat_template_kwargs"), m))?
            }
        };
        Ok(TemplateArgs {
            tools: list("tools")?,
            documents: list("documents")?,
            kwargs,
        })
    }
}

/// Text given either plainly or as a conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Messages(Vec<Message>),
}

impl Content {
    /// As JSON, the way the row gave it (for outputs that echo the prompt).
    pub fn to_json(&self) -> Value {
        match self {
            Content::Text(t) => Value::String(t.clone()),
            Content::Messages(m) => serde_json::to_value(m).unwrap(),
        }
    }
}

/// A demonstration for SFT.
#[derive(Debug, Clone, PartialEq)]
pub enum SftExample {
    /// Loss on the completion only.
    PromptCompletion { prompt: String, completion: String },
    /// Loss on the assistant turns from `first_target` on (earlier turns are a
    /// conversational prompt); rendered with the tokenizer's chat template.
    Messages {
        messages: Vec<Message>,
        template: TemplateArgs,
        first_target: usize,
    },
    /// Loss on every token.
    Text(String),
}

/// A prompt for PPO or for generation, with the template arguments of its row (`tools`,
/// `documents`), which a conversation is rendered with.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptExample {
    pub prompt: Content,
    pub template: TemplateArgs,
}

impl PromptExample {
    /// As JSON, the way the row gave it (for outputs that echo the prompt).
    pub fn to_json(&self) -> Value {
        self.prompt.to_json()
    }
}

/// Responses to one prompt ordered best first: a chosen/rejected pair is a ranking of two.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    pub prompt: Content,
    pub responses: Vec<Content>,
    /// Subtracted inside the pairwise loss, `−log σ(r_c − r_r − margin)`.
    pub margin: Option<f64>,
    /// The row's `tools`, `documents` and `chat_template_kwargs`, for conversations.
    pub template: TemplateArgs,
    /// The row's `reference` column: a gold completion (TRL's TPO triple-preference rows),
    /// the NLL term of `dpo --tpo-alpha` trains on. Without a `prompt`, the prompt that
    /// `chosen` and `rejected` share is cut from its start, as TRL's
    /// `_extract_triple_prompt` does.
    pub gold: Option<Content>,
}

fn messages(row: &Row, field: &str, value: &Value) -> Result<Vec<Message>> {
    let Value::Array(items) = value else {
        return Err(row.error(
            Some(field),
            format!("expected an array of messages, got {}", type_name(value)),
        ));
    };
    if items.is_empty() {
        return Err(row.error(Some(field), "is an empty list of messages"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("{field}[{i}]");
            let Value::Object(m) = item else {
                return Err(row.error(
                    Some(&at),
                    format!("expected an object, got {}", type_name(item)),
                ));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
                Some(Value::String(r)) => {
                    return Err(row.error(
                        Some(&format!("{at}.role")),
                        format!("unknown role '{r}' (expected one of: {})", ROLES.join(", ")),
                    ))
                }
                Some(other) => {
                    return Err(row.error(
                        Some(&format!("{at}.role")),
                        format!("expected a string, got {}", type_name(other)),
                    ))
                }
                None => return Err(row.error(Some(&format!("{at}.role")), "missing")),
            };
            let field = format!("{at}.content");
            let tool_calls = m.get("tool_calls").is_some_and(|t| !t.is_null());
            let text = match m.get("content") {
                None => return Err(row.error(Some(&field), "missing")),
                Some(Value::Null) if tool_calls => String::new(),
                Some(Value::Null) => {
                    return Err(row.error(
                        Some(&field),
                        "is null; text is required (null only beside 'tool_calls')",
                    ))
                }
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => text_parts(row, &field, parts)?,
                Some(other) => {
                    return Err(row.error(
                        Some(&field),
                        format!(
                            "expected a string or a list of text parts, got {}",
                            type_name(other)
                        ),
                    ))
                }
            };
            // An empty system message is rendered as transformers renders it (public SFT
            // sets contain them), and a turn that calls tools may say nothing; empty text
            // elsewhere is a mistake.
            if text.trim().is_empty() && role != "system" && !tool_calls {
                return Err(row.error(Some(&field), "is empty; text is required"));
            }
            let mut extra: Map<String, Value> = m
                .iter()
                .filter(|(k, _)| *k != "role" && *k != "content")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if m["content"].is_null() {
                extra.insert("content".into(), Value::Null);
            }
            Ok(Message {
                role,
                content: text,
                extra,
            })
        })
        .collect()
}

/// `[{"type": "text", "text": …}, …]` joined into one string; parts of other types (images,
/// audio) are refused: the models here read text only.
fn text_parts(row: &Row, field: &str, parts: &[Value]) -> Result<String> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("{field}[{j}]");
        match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("text"), Some(Value::String(t))) => text.push_str(t),
            (Some("text"), _) => {
                return Err(row.error(Some(&format!("{at}.text")), "missing or not a string"))
            }
            (Some(other), _) => {
                return Err(row.error(
                    Some(&format!("{at}.type")),
                    format!("'{other}' parts are not supported (text-only models): only {{\"type\": \"text\"}}"),
                ))
            }
            (None, _) => return Err(row.error(Some(&format!("{at}.type")), "missing")),
        }
    }
    Ok(text)
}

/// A field holding either a string or a list of messages.
fn content(row: &Row, field: &str) -> Result<Content> {
    match row.object.get(field) {
        None => Err(row.error(Some(field), "missing")),
        Some(Value::Array(_)) => Ok(Content::Messages(messages(row, field, &row.object[field])?)),
        Some(v) => Ok(Content::Text(row.text_value(field, v)?)),
    }
}

/// Shapes no stage here trains on, refused with what they are (TRL's dataset formats).
fn refuse_unused_shapes(row: &Row, stage: &str) -> Result<()> {
    if row.has("label") && row.has("completion") {
        return Err(row.error(
            Some("label"),
            format!("an unpaired preference row ('prompt', 'completion', 'label'; KTO's format) cannot be used by {stage}: it needs {} (`dpo --loss-type kto` reads unpaired rows)", accepted(stage)),
        ));
    }
    if row.has("completions") && row.has("labels") {
        return Err(row.error(
            Some("labels"),
            format!("a stepwise-supervision row ('completions', 'labels') cannot be used by {stage}: it needs {}", accepted(stage)),
        ));
    }
    Ok(())
}

fn accepted(stage: &str) -> &'static str {
    match stage {
        "SFT" => "'text', 'prompt' and 'completion' (text or conversations), or 'messages'",
        _ => "'chosen' and 'rejected' (with or without 'prompt'), or a ranking 'responses'",
    }
}

impl SftExample {
    pub fn decode(row: &Row) -> Result<Self> {
        Self::decode_with(row, "text")
    }

    /// A row whose language-modelling text is in the column `text_field` (TRL's
    /// `dataset_text_field`; `text` by default).
    pub fn decode_with(row: &Row, text_field: &str) -> Result<Self> {
        refuse_unused_shapes(row, "SFT")?;
        let template = TemplateArgs::decode(row)?;
        if row.has("messages") {
            let messages = messages(row, "messages", &row.object["messages"])?;
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err(row.error(Some("messages"), "has no assistant turn to learn from"));
            }
            Ok(SftExample::Messages {
                messages,
                template,
                first_target: 0,
            })
        } else if row.has("prompt") {
            match (content(row, "prompt")?, content(row, "completion")?) {
                (Content::Text(prompt), Content::Text(completion)) => {
                    Ok(SftExample::PromptCompletion { prompt, completion })
                }
                // Conversational prompt–completion: the completion's turns are the targets.
                (Content::Messages(prompt), Content::Messages(completion)) => {
                    if !completion.iter().any(|m| m.role == "assistant") {
                        return Err(
                            row.error(Some("completion"), "has no assistant turn to learn from")
                        );
                    }
                    let first_target = prompt.len();
                    Ok(SftExample::Messages {
                        messages: [prompt, completion].concat(),
                        template,
                        first_target,
                    })
                }
                _ => Err(row.error(
                    Some("completion"),
                    "'prompt' and 'completion' must both be text or both be conversations",
                )),
            }
        } else if row.has(text_field) {
            Ok(SftExample::Text(row.text(text_field)?))
        } else {
            let text = match text_field {
                "text" => "'text'".to_string(),
                other => format!("'{other}' (--dataset-text-field)"),
            };
            Err(row.error(
                None,
                format!("expected fields 'prompt' and 'completion', or 'messages', or {text}"),
            ))
        }
    }
}

/// The prompt shared by a chosen and a rejected completion that both contain it, as TRL's
/// `extract_prompt` finds it: the elements (characters, or whole messages) before the
/// first difference — one fewer when the element before it is a space, which stays with
/// the completions; when one never differs from the other, all but the last shared
/// element. Returns `(prompt, chosen, rejected)`.
fn split_shared_prefix<T: PartialEq + Clone>(
    chosen: &[T],
    rejected: &[T],
    is_space: impl Fn(&T) -> bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let shortest = chosen.len().min(rejected.len());
    let idx = match (0..shortest).find(|&i| chosen[i] != rejected[i]) {
        Some(i) if i > 0 && is_space(&chosen[i - 1]) => i - 1,
        Some(i) => i,
        None => shortest.saturating_sub(1),
    };
    (
        chosen[..idx].to_vec(),
        chosen[idx..].to_vec(),
        rejected[idx..].to_vec(),
    )
}

/// A row's gold completion (`reference`), the implicit `prompt` cut from its start when
/// the row has none of its own (TRL's `_extract_triple_prompt`).
fn gold(row: &Row, implicit: Option<&Content>) -> Result<Option<Content>> {
    if !row.has("reference") {
        return Ok(None);
    }
    let gold = content(row, "reference")?;
    let Some(prompt) = implicit else {
        return Ok(Some(gold));
    };
    let cut = match (prompt, &gold) {
        (Content::Text(p), Content::Text(g)) => g
            .strip_prefix(p.as_str())
            .map(|g| Content::Text(g.to_string())),
        (Content::Messages(p), Content::Messages(g)) if g.starts_with(p) => {
            Some(Content::Messages(g[p.len()..].to_vec()))
        }
        _ => None,
    };
    match cut {
        Some(gold) => Ok(Some(gold)),
        None => Err(row.error(
            Some("reference"),
            "does not start with the prompt that 'chosen' and 'rejected' share: give the row a 'prompt', or start the gold completion with the same prompt",
        )),
    }
}

/// `{"chosen", "rejected"}` with the prompt inside both (Anthropic HH-RLHF's strings, or
/// whole conversations): the shared prefix becomes the prompt.
fn implicit_prompt(row: &Row) -> Result<(Content, Vec<Content>)> {
    let (chosen, rejected) = (content(row, "chosen")?, content(row, "rejected")?);
    let (prompt, chosen, rejected) = match (&chosen, &rejected) {
        (Content::Text(c), Content::Text(r)) => {
            let (c, r): (Vec<char>, Vec<char>) = (c.chars().collect(), r.chars().collect());
            let (p, c, r) = split_shared_prefix(&c, &r, |ch| *ch == ' ');
            let text = |v: Vec<char>| Content::Text(v.into_iter().collect());
            (text(p), text(c), text(r))
        }
        (Content::Messages(c), Content::Messages(r)) => {
            let (p, c, r) = split_shared_prefix(c, r, |_| false);
            (
                Content::Messages(p),
                Content::Messages(c),
                Content::Messages(r),
            )
        }
        _ => {
            return Err(row.error(
                Some("rejected"),
                "without a 'prompt', 'chosen' and 'rejected' must both be text or both be conversations",
            ))
        }
    };
    let empty = |c: &Content| match c {
        Content::Text(t) => t.trim().is_empty(),
        Content::Messages(m) => m.is_empty(),
    };
    if empty(&prompt) || empty(&chosen) || empty(&rejected) {
        return Err(row.error(
            None,
            "without a 'prompt', 'chosen' and 'rejected' must share a prompt and then differ",
        ));
    }
    Ok((prompt, vec![chosen, rejected]))
}

impl PreferenceExample {
    pub fn decode(row: &Row) -> Result<Self> {
        refuse_unused_shapes(row, "reward training or a paired loss")?;
        let template = TemplateArgs::decode(row)?;
        // TRL's maybe_extract_prompt: without a prompt, or with a prompt of the other kind
        // (ultrafeedback_binarized: a string prompt, then whole conversations that start
        // with it), the prompt is the shared start of chosen and rejected.
        let conversational = |field: &str| matches!(row.object.get(field), Some(Value::Array(_)));
        // A string prompt before assistant-only conversations shares nothing with them: it
        // stays the prompt (a user turn), as before.
        if row.has("chosen") && row.has("rejected") {
            let mixed = row.has("prompt") && conversational("prompt") != conversational("chosen");
            match implicit_prompt(row) {
                Ok((prompt, responses)) if !row.has("prompt") || mixed => {
                    return Ok(PreferenceExample {
                        gold: gold(row, Some(&prompt))?,
                        prompt,
                        responses,
                        margin: row.number("margin")?,
                        template,
                    });
                }
                Err(e) if !row.has("prompt") => return Err(e),
                _ => {}
            }
        }
        let prompt = content(row, "prompt")?;
        let responses = if row.has("responses") {
            let items = row.array("responses")?;
            if items.len() < 2 {
                return Err(row.error(
                    Some("responses"),
                    format!("a ranking needs at least 2 responses, got {}", items.len()),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let field = format!("responses[{i}]");
                    match v {
                        Value::Array(_) => Ok(Content::Messages(messages(row, &field, v)?)),
                        _ => Ok(Content::Text(row.text_value(&field, v)?)),
                    }
                })
                .collect::<Result<Vec<_>>>()?
        } else if row.has("chosen") || row.has("rejected") {
            vec![content(row, "chosen")?, content(row, "rejected")?]
        } else {
            return Err(row.error(
                None,
                "expected fields 'chosen' and 'rejected', or a ranking 'responses'",
            ));
        };
        Ok(PreferenceExample {
            prompt,
            responses,
            margin: row.number("margin")?,
            template,
            gold: gold(row, None)?,
        })
    }
}

/// An unpaired preference row (TRL's KTO format): a prompt, one completion, and whether
/// the completion is desirable.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedExample {
    pub prompt: Content,
    pub completion: Content,
    pub label: bool,
    /// As [`PreferenceExample::template`].
    pub template: TemplateArgs,
}

/// A row an unpaired loss (KTO) reads: an unpaired row as it is, or a preference row
/// whose pairs are unpaired (TRL's `unpair_preference_dataset`: the chosen response
/// desirable, the rejected one not).
#[derive(Debug, Clone, PartialEq)]
pub enum FeedbackExample {
    Unpaired(UnpairedExample),
    Preference(PreferenceExample),
}

impl FeedbackExample {
    pub fn decode(row: &Row) -> Result<Self> {
        if !(row.has("label") && row.has("completion")) {
            return Ok(FeedbackExample::Preference(PreferenceExample::decode(row)?));
        }
        let label = match &row.object["label"] {
            Value::Bool(b) => *b,
            other => {
                return Err(row.error(
                    Some("label"),
                    format!("expected true or false, got {}", type_name(other)),
                ))
            }
        };
        Ok(FeedbackExample::Unpaired(UnpairedExample {
            prompt: content(row, "prompt")?,
            completion: content(row, "completion")?,
            label,
            template: TemplateArgs::decode(row)?,
        }))
    }
}

/// Decodes a prompt row: `{"prompt"}` or `{"messages"}`, with `tools` and `documents` for
/// the chat template (any other fields of a dataset row, such as a completion or a label,
/// are ignored: PPO needs the prompt only).
pub fn decode_prompt(row: &Row) -> Result<PromptExample> {
    let prompt = if row.has("messages") {
        Content::Messages(messages(row, "messages", &row.object["messages"])?)
    } else {
        content(row, "prompt")?
    };
    Ok(PromptExample {
        prompt,
        template: TemplateArgs::decode(row)?,
    })
}

/// The other fields of a prompt row (an `answer`, an `id`, …): they travel with the prompt to
/// the reward, as TRL passes dataset columns to its reward functions.
pub type PromptFields = Map<String, Value>;

/// A prompt row with its other fields.
pub fn decode_prompt_with_fields(row: &Row) -> Result<(PromptExample, PromptFields)> {
    let prompt = decode_prompt(row)?;
    let fields = row
        .object
        .iter()
        .filter(|(k, _)| {
            ![
                "prompt",
                "messages",
                "tools",
                "documents",
                "chat_template_kwargs",
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((prompt, fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rows;
    use std::io::Write;

    fn read_one<T>(line: &str, decode: impl FnMut(&Row) -> Result<T>) -> Result<Vec<T>> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "\n{line}").unwrap();
        rows::read(f.path(), decode).map(rows::Rows::into_vec)
    }

    fn err<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn decodes_every_sft_shape() {
        let rows = read_one(
            r#"{"prompt": "2+2=", "completion": "4", "extra": 1}"#,
            SftExample::decode,
        )
        .unwrap();
        assert_eq!(
            rows[0],
            SftExample::PromptCompletion {
                prompt: "2+2=".into(),
                completion: "4".into()
            }
        );
        let rows = read_one(r#"{"text": "hello"}"#, SftExample::decode).unwrap();
        assert_eq!(rows[0], SftExample::Text("hello".into()));
        let rows = read_one(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
            SftExample::decode,
        )
        .unwrap();
        assert!(matches!(&rows[0], SftExample::Messages { messages, .. } if messages.len() == 2));
    }

    /// A `reference` column is the row's gold completion (TPO's); without a `prompt` the
    /// shared one is cut from it too (TRL's `_extract_triple_prompt`), and a gold that
    /// does not start with it is refused naming the field.
    #[test]
    fn a_gold_completion_loses_the_implicit_prompt() {
        let rows = read_one(
            r#"{"prompt": "q ", "chosen": "a", "rejected": "b", "reference": "g"}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(rows[0].gold, Some(Content::Text("g".into())));
        let rows = read_one(
            r#"{"chosen": "Q: x A: yes", "rejected": "Q: x A: no", "reference": "Q: x A: yes indeed"}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(rows[0].prompt, Content::Text("Q: x A:".into()));
        assert_eq!(rows[0].gold, Some(Content::Text(" yes indeed".into())));
        let rows = read_one(
            r#"{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "reference": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "g"}]}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        let gold = Content::Messages(vec![Message::new("assistant", "g")]);
        assert_eq!(rows[0].gold, Some(gold));
        let e = err(read_one(
            r#"{"chosen": "Q: x A: yes", "rejected": "Q: x A: no", "reference": "yes"}"#,
            PreferenceExample::decode,
        ));
        assert!(
            e.contains(":2: field 'reference': does not start with the prompt"),
            "{e}"
        );
        let rows = read_one(
            r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#,
            PreferenceExample::decode,
        );
        assert_eq!(rows.unwrap()[0].gold, None);
    }

    /// TRL's `extract_prompt` on its own examples: HH-RLHF strings (the space before the
    /// first difference stays with the completions) and conversations (whole turns).
    #[test]
    fn an_implicit_prompt_is_the_shared_prefix() {
        let rows = read_one(
            r#"{"chosen": "\n\nHuman: 鸡兔同笼?\n\nAssistant: Hello there", "rejected": "\n\nHuman: 鸡兔同笼?\n\nAssistant: Go away"}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(
            rows[0].prompt,
            Content::Text("\n\nHuman: 鸡兔同笼?\n\nAssistant:".into())
        );
        assert_eq!(
            rows[0].responses,
            [
                Content::Text(" Hello there".into()),
                Content::Text(" Go away".into())
            ]
        );
        let rows = read_one(
            r#"{"chosen": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is blue."}], "rejected": [{"role": "user", "content": "What color is the sky?"}, {"role": "assistant", "content": "It is green."}]}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        let turn = Message::new;
        assert_eq!(
            rows[0].prompt,
            Content::Messages(vec![turn("user", "What color is the sky?")])
        );
        assert_eq!(
            rows[0].responses,
            [
                Content::Messages(vec![turn("assistant", "It is blue.")]),
                Content::Messages(vec![turn("assistant", "It is green.")])
            ]
        );
        let e = err(read_one(
            r#"{"chosen": "Yes", "rejected": "No"}"#,
            PreferenceExample::decode,
        ));
        assert!(e.contains("must share a prompt and then differ"), "{e}");
        let e = err(read_one(
            r#"{"chosen": "a b", "rejected": [{"role": "user", "content": "a"}]}"#,
            PreferenceExample::decode,
        ));
        assert!(
            e.contains("must both be text or both be conversations"),
            "{e}"
        );
    }

    /// Shapes from TRL's dataset-formats page and public sets beyond the basic ones.
    #[test]
    fn real_dataset_shapes() {
        // Typed text parts, and a tool call with null content: every field is kept.
        let rows = read_one(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "鸡兔"}, {"type": "text", "text": "同笼?"}]}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "solve", "arguments": {"heads": 35}}}]}, {"role": "tool", "name": "solve", "content": "23, 12"}, {"role": "assistant", "content": "23 chickens, 12 rabbits."}], "tools": [{"type": "function", "function": {"name": "solve"}}]}"#,
            SftExample::decode,
        )
        .unwrap();
        let SftExample::Messages {
            messages,
            template,
            first_target,
        } = &rows[0]
        else {
            panic!("{:?}", rows[0])
        };
        assert_eq!(messages[0].content, "鸡兔同笼?");
        assert_eq!(messages[1].content, "");
        assert!(messages[1].extra["tool_calls"].is_array());
        let rendered = serde_json::to_value(&messages[1]).unwrap();
        assert!(rendered["content"].is_null(), "{rendered}");
        assert_eq!(messages[2].extra["name"], "solve");
        assert!(template.tools.is_some());
        assert_eq!(*first_target, 0);
        let e = err(read_one(
            r#"{"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}, {"role": "assistant", "content": "a"}]}"#,
            SftExample::decode,
        ));
        assert!(
            e.contains("field 'messages[0].content[0].type': 'image' parts are not supported"),
            "{e}"
        );
        let e = err(read_one(
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null}]}"#,
            SftExample::decode,
        ));
        assert!(e.contains("field 'messages[1].content': is null"), "{e}");

        // Conversational prompt–completion: only the completion's turns are targets.
        let rows = read_one(
            r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}], "completion": [{"role": "assistant", "content": "a2"}]}"#,
            SftExample::decode,
        )
        .unwrap();
        assert!(
            matches!(&rows[0], SftExample::Messages { messages, first_target: 3, .. } if messages.len() == 4)
        );

        // ultrafeedback_binarized: a string prompt, whole conversations after it.
        let rows = read_one(
            r#"{"prompt": "q", "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}], "score_chosen": 8.0}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(
            rows[0].prompt,
            Content::Messages(vec![Message::new("user", "q")])
        );
        assert_eq!(
            rows[0].responses[0],
            Content::Messages(vec![Message::new("assistant", "good")])
        );
        // A string prompt before assistant-only turns stays the prompt.
        let rows = read_one(
            r#"{"prompt": "q", "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(rows[0].prompt, Content::Text("q".into()));

        // Unpaired preference and stepwise supervision: refused with what they are.
        let unpaired = r#"{"prompt": "q", "completion": "a", "label": false}"#;
        let e = err(read_one(unpaired, SftExample::decode));
        assert!(
            e.contains("field 'label': an unpaired preference row"),
            "{e}"
        );
        let e = err(read_one(unpaired, PreferenceExample::decode));
        assert!(
            e.contains("cannot be used by reward training or a paired loss: it needs 'chosen'"),
            "{e}"
        );
        // An unpaired loss reads it; a label must be a boolean.
        let row = read_one(unpaired, FeedbackExample::decode).unwrap();
        assert_eq!(
            row[0],
            FeedbackExample::Unpaired(UnpairedExample {
                prompt: Content::Text("q".into()),
                completion: Content::Text("a".into()),
                label: false,
                template: TemplateArgs::default(),
            })
        );
        let e = err(read_one(
            r#"{"prompt": "q", "completion": "a", "label": 1}"#,
            FeedbackExample::decode,
        ));
        assert!(
            e.contains("field 'label': expected true or false, got a number"),
            "{e}"
        );
        assert_eq!(
            read_one(unpaired, decode_prompt).unwrap()[0].prompt,
            Content::Text("q".into())
        );
        let e = err(read_one(
            r#"{"prompt": "q", "completions": ["a", "b"], "labels": [true, false]}"#,
            SftExample::decode,
        ));
        assert!(e.contains("a stepwise-supervision row"), "{e}");
        let rows = read_one(
            r#"{"prompt": [{"role": "user", "content": "q"}], "tools": [{"type": "function"}]}"#,
            decode_prompt,
        )
        .unwrap();
        assert!(rows[0].template.tools.is_some());
        // Preference and unpaired rows carry them too (TRL's DPO, reward and KTO trainers
        // pass `tools` and `chat_template_kwargs`); `tools` may be a JSON string, as
        // datasets store it.
        let rows = read_one(
            r#"{"prompt": "q", "chosen": "a", "rejected": "b", "tools": "[{\"type\": \"function\"}]", "chat_template_kwargs": {"x": 1}}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(
            rows[0].template.tools,
            Some(serde_json::json!([{"type": "function"}]))
        );
        assert_eq!(rows[0].template.kwargs["x"], 1);
        let rows = read_one(
            r#"{"prompt": "q", "completion": "a", "label": true, "chat_template_kwargs": {"x": 2}}"#,
            FeedbackExample::decode,
        )
        .unwrap();
        let FeedbackExample::Unpaired(u) = &rows[0] else {
            panic!("{:?}", rows[0])
        };
        assert_eq!(u.template.kwargs["x"], 2);
        let e = err(read_one(
            r#"{"prompt": "q", "chosen": "a", "rejected": "b", "tools": "{}"}"#,
            PreferenceExample::decode,
        ));
        assert!(
            e.contains("field 'tools': a string that is not a JSON list"),
            "{e}"
        );
        // TRL's chat_template_kwargs column: template variables, an object without the
        // names the caller sets.
        let rows = read_one(
            r#"{"prompt": [{"role": "user", "content": "q"}], "chat_template_kwargs": {"enable_thinking": false}, "id": 3}"#,
            decode_prompt_with_fields,
        )
        .unwrap();
        assert_eq!(
            rows[0].0.template.kwargs["enable_thinking"],
            Value::Bool(false)
        );
        assert_eq!(rows[0].1.keys().collect::<Vec<_>>(), ["id"]);
        for (kwargs, want) in [
            ("3", "field 'chat_template_kwargs': expected an object of template variables"),
            (
                r#"{"add_generation_prompt": true}"#,
                "field 'chat_template_kwargs': 'add_generation_prompt' is set by the chat template's caller",
            ),
        ] {
            let row = format!(r#"{{"prompt": "q", "completion": "a", "chat_template_kwargs": {kwargs}}}"#);
            let e = err(read_one(&row, SftExample::decode));
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn an_empty_system_message_is_kept() {
        let rows = read_one(
            r#"{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
            SftExample::decode,
        )
        .unwrap();
        assert!(
            matches!(&rows[0], SftExample::Messages { messages: m, .. } if m[0].role == "system" && m[0].content.is_empty())
        );
        let e = err(read_one(
            r#"{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "yo"}]}"#,
            SftExample::decode,
        ));
        assert!(e.contains("field 'messages[0].content': is empty"), "{e}");
    }

    #[test]
    fn errors_name_line_and_field() {
        // The blank first line is skipped but counted: the row is on line 2.
        let e = err(read_one(r#"{"prompt": "a"}"#, SftExample::decode));
        assert!(e.ends_with(":2: field 'completion': missing"), "{e}");
        let e = err(read_one(
            r#"{"prompt": "a", "completion": 3}"#,
            SftExample::decode,
        ));
        assert!(
            e.contains(":2: field 'completion': expected a string, got a number"),
            "{e}"
        );
        let e = err(read_one(
            r#"{"prompt": "a", "completion": "  "}"#,
            SftExample::decode,
        ));
        assert!(e.contains("field 'completion': is empty"), "{e}");
        let e = err(read_one(
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            SftExample::decode,
        ));
        assert!(
            e.contains("field 'messages[0].role': unknown role 'robot'"),
            "{e}"
        );
        let e = err(read_one(
            r#"{"prompt": "p", "responses": ["a"]}"#,
            PreferenceExample::decode,
        ));
        assert!(
            e.contains("field 'responses': a ranking needs at least 2 responses, got 1"),
            "{e}"
        );
        let e = err(read_one(
            r#"{"prompt": "p", "chosen": "a"#,
            PreferenceExample::decode,
        ));
        assert!(e.contains(":2: invalid JSON"), "{e}");
        let e = err(read_one("\"a string\"", decode_prompt));
        assert!(
            e.contains(":2: expected a JSON object, got a string"),
            "{e}"
        );
    }

    #[test]
    fn preference_pairs_and_rankings() {
        let rows = read_one(
            r#"{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(rows[0].responses.len(), 2);
        assert_eq!(rows[0].margin, Some(0.5));
        let rows = read_one(
            r#"{"prompt": [{"role": "user", "content": "q"}], "responses": [[{"role": "assistant", "content": "a"}], "b", "c"]}"#,
            PreferenceExample::decode,
        )
        .unwrap();
        assert_eq!(rows[0].responses.len(), 3);
        assert!(matches!(rows[0].prompt, Content::Messages(_)));
    }

    #[test]
    fn invalid_utf8_empty_and_missing_files() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"{\"prompt\": \"ok\"}\n{\"prompt\": \"\xff\"}\n")
            .unwrap();
        let e = err(rows::read(f.path(), decode_prompt));
        assert!(e.contains(":2: invalid UTF-8"), "{e}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(err(rows::read(empty.path(), decode_prompt)).contains("no rows"));
        let e = err(rows::read(
            std::path::Path::new("/nonexistent/x.jsonl"),
            decode_prompt,
        ));
        assert!(e.starts_with("/nonexistent/x.jsonl: cannot open"), "{e}");
    }
}
