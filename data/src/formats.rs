//! The rows each stage reads (DESIGN.md's table; field names follow TRL). One type per use;
//! extra fields are ignored.

use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::jsonl::{type_name, Row};

pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
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
    /// Loss on the assistant turns; rendered with the tokenizer's chat template.
    Messages(Vec<Message>),
    /// Loss on every token.
    Text(String),
}

/// A prompt for PPO or for generation.
pub type PromptExample = Content;

/// Responses to one prompt ordered best first: a chosen/rejected pair is a ranking of two.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceExample {
    pub prompt: Content,
    pub responses: Vec<Content>,
    /// Subtracted inside the pairwise loss, `−log σ(r_c − r_r − margin)`.
    pub margin: Option<f64>,
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
            let content = match (m.get("content"), role.as_str()) {
                // An empty system message is rendered as transformers renders it (public
                // SFT sets contain them); empty text elsewhere is a mistake.
                (Some(Value::String(text)), "system") => text.clone(),
                (Some(v), _) => row.text_value(&format!("{at}.content"), v)?,
                (None, _) => return Err(row.error(Some(&format!("{at}.content")), "missing")),
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// A field holding either a string or a list of messages.
fn content(row: &Row, field: &str) -> Result<Content> {
    match row.object.get(field) {
        None => Err(row.error(Some(field), "missing")),
        Some(Value::Array(_)) => Ok(Content::Messages(messages(row, field, &row.object[field])?)),
        Some(v) => Ok(Content::Text(row.text_value(field, v)?)),
    }
}

impl SftExample {
    pub fn decode(row: &Row) -> Result<Self> {
        if row.has("messages") {
            let msgs = messages(row, "messages", &row.object["messages"])?;
            if !msgs.iter().any(|m| m.role == "assistant") {
                return Err(row.error(Some("messages"), "has no assistant turn to learn from"));
            }
            Ok(SftExample::Messages(msgs))
        } else if row.has("prompt") {
            Ok(SftExample::PromptCompletion {
                prompt: row.text("prompt")?,
                completion: row.text("completion")?,
            })
        } else if row.has("text") {
            Ok(SftExample::Text(row.text("text")?))
        } else {
            Err(row.error(
                None,
                "expected fields 'prompt' and 'completion', or 'messages', or 'text'",
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
        if !row.has("prompt") && row.has("chosen") && row.has("rejected") {
            let (prompt, responses) = implicit_prompt(row)?;
            return Ok(PreferenceExample {
                prompt,
                responses,
                margin: row.number("margin")?,
            });
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
        })
    }
}

/// Decodes a prompt row: `{"prompt"}` or `{"messages"}`.
pub fn decode_prompt(row: &Row) -> Result<PromptExample> {
    if row.has("messages") {
        Ok(Content::Messages(messages(
            row,
            "messages",
            &row.object["messages"],
        )?))
    } else {
        content(row, "prompt")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonl;
    use std::io::Write;

    fn read_one<T>(line: &str, decode: impl FnMut(&Row) -> Result<T>) -> Result<Vec<T>> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "\n{line}").unwrap();
        jsonl::read(f.path(), decode).map(jsonl::Rows::into_vec)
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
        assert!(matches!(&rows[0], SftExample::Messages(m) if m.len() == 2));
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
        let turn = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
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

    #[test]
    fn an_empty_system_message_is_kept() {
        let rows = read_one(
            r#"{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
            SftExample::decode,
        )
        .unwrap();
        assert!(
            matches!(&rows[0], SftExample::Messages(m) if m[0].role == "system" && m[0].content.is_empty())
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
        let e = err(read_one("[1, 2]", decode_prompt));
        assert!(e.contains("expected a JSON object, got an array"), "{e}");
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
        let e = err(jsonl::read(f.path(), decode_prompt));
        assert!(e.contains(":2: invalid UTF-8"), "{e}");
        let empty = tempfile::NamedTempFile::new().unwrap();
        assert!(err(jsonl::read(empty.path(), decode_prompt)).contains("no rows"));
        let e = err(jsonl::read(
            std::path::Path::new("/nonexistent/x.jsonl"),
            decode_prompt,
        ));
        assert!(e.starts_with("/nonexistent/x.jsonl: cannot open"), "{e}");
    }
}
