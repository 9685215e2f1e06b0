//! An answer as a chat message, as TRL 1.16's `parse_response` reads it with the response
//! template `add_response_schema` gives a tool-calling chat template (transformers' region
//! parser, `utils/chat_parsing/response_parser.py`): the text the policy wrote after the
//! assistant turn began (the prompt's part after the template's start anchor, then the
//! answer, special tokens kept) is cut into regions — reasoning in `<think>…</think>`, each
//! tool call, and the content (the text outside them: each stretch replaces the last) — and
//! each region's text is read (stripped text, or JSON). What cannot be read (a call that is
//! not JSON, cut before its end, or without a name) makes the whole answer its plain text,
//! TRL's fallback.
//!
//! With tools, this is what an answer is: the tool loop runs the calls of its message, and
//! reward programs get the messages as TRL's `completions` (`ToolResponse::messages`).

use regex::Regex;
use serde_json::{json, Map, Value};

/// How a region's text becomes its value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The text, stripped.
    Text,
    /// JSON, the value itself the call's `function` (`{"type": "function", "function": …}`:
    /// Qwen's `<tool_call>` blocks).
    WholeCall,
    /// JSON, the arguments of a call whose name the opening captured (Llama 3.1's
    /// `{"name": …, "parameters": …}`).
    ArgumentsCall,
    /// `<parameter=KEY>value</parameter>` tags, each value text, the arguments of a call
    /// whose name the opening captured (Qwen3.5's `<function=…>`).
    XmlCall,
}

/// One field of the message: where its text opens (none: the implicit region, the content,
/// where text outside every other region goes) and closes, and how it is read.
struct Region {
    field: &'static str,
    open: Option<Regex>,
    close: Regex,
    read: Read,
    /// Each occurrence appended to a list (tool calls), else the last one kept.
    repeats: bool,
}

/// A chat template's response template: its answers' regions, and the text that starts an
/// assistant turn (what comes before it in the prompt is not the answer's).
pub struct ResponseTemplate {
    anchor: &'static str,
    regions: Vec<Region>,
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a valid pattern")
}

impl ResponseTemplate {
    /// TRL's `qwen3_template` (Qwen2.5, Qwen3, Hermes: `<tool_call>{…}</tool_call>`).
    pub fn qwen3() -> Self {
        ResponseTemplate {
            anchor: "<|im_start|>assistant\n",
            regions: vec![
                Region {
                    field: "reasoning_content",
                    open: Some(re("<think>")),
                    close: re(r"</think>\s*"),
                    read: Read::Text,
                    repeats: false,
                },
                Region {
                    field: "tool_calls",
                    open: Some(re("<tool_call>")),
                    close: re(r"</tool_call>\s*"),
                    read: Read::WholeCall,
                    repeats: true,
                },
                Region {
                    field: "content",
                    open: None,
                    close: re(r"<\|im_end\|>\s*"),
                    read: Read::Text,
                    repeats: false,
                },
            ],
        }
    }

    /// TRL's `qwen3_5_template` (Qwen3.5, Qwen3.6, Qwen3.8: `<tool_call><function=NAME>`
    /// with a `<parameter=KEY>` tag per argument).
    pub fn qwen3_5() -> Self {
        let mut t = Self::qwen3();
        t.regions[1] = Region {
            field: "tool_calls",
            open: Some(re(r"<tool_call>\s*<function=(?P<name>[^\n>]+)>")),
            close: re(r"</tool_call>\s*"),
            read: Read::XmlCall,
            repeats: true,
        };
        t
    }

    /// TRL's `llama3_template` (Llama 3.1 and 3.2: `{"name": …, "parameters": {…}}` before
    /// the end of the turn).
    pub fn llama3() -> Self {
        ResponseTemplate {
            anchor: "<|start_header_id|>assistant<|end_header_id|>\n\n",
            regions: vec![
                Region {
                    field: "tool_calls",
                    open: Some(re(r#"\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*"#)),
                    close: re(r"\}<\|eot_id\|>\s*"),
                    read: Read::ArgumentsCall,
                    repeats: true,
                },
                Region {
                    field: "content",
                    open: None,
                    close: re(r"<\|eot_id\|>\s*"),
                    read: Read::Text,
                    repeats: false,
                },
            ],
        }
    }

    /// The message of `answer` (decoded with its special tokens) after `prefix` (the text
    /// before it, decoded likewise); `plain` is the answer decoded without special tokens,
    /// the message's content where it cannot be read, and `eos` the tokenizer's EOS token,
    /// which TRL strips from the end of the content. With `tools` (the schemas the prompt
    /// was rendered with), the calls' text arguments are typed by their tool's parameters,
    /// as transformers' parser does when TRL passes it the tools.
    pub fn message(
        &self,
        (prefix, answer): (&str, &str),
        plain: &str,
        eos: Option<&str>,
        tools: Option<&Value>,
    ) -> Value {
        let start = prefix
            .rfind(self.anchor)
            .map_or(prefix.len(), |i| i + self.anchor.len());
        let parameters = tools.map(parameters_of).unwrap_or_default();
        let parsed = self
            .regions(&format!("{}{answer}", &prefix[start..]), &parameters)
            .and_then(|mut m| {
                let content = m.get("content").and_then(Value::as_str).unwrap_or("");
                let content = eos.map_or(content, |e| content.strip_suffix(e).unwrap_or(content));
                m.insert("content".into(), content.into());
                valid_calls(&mut m).then_some(m)
            });
        match parsed {
            Some(m) => Value::Object(m),
            None => json!({"role": "assistant", "content": plain}),
        }
    }

    /// transformers' `ResponseParser` over the whole of `text` at once (`feed`, then
    /// `finalize`): `None` where a region's text cannot be read.
    fn regions(&self, text: &str, parameters: &Parameters) -> Option<Map<String, Value>> {
        let implicit = self.regions.iter().position(|r| r.open.is_none());
        let implicit = implicit.expect("a template has a content region");
        let mut out = Map::new();
        out.insert("role".into(), "assistant".into());
        let (mut current, mut opened, mut body, mut name) = (implicit, false, String::new(), None);
        // Closes the region being read: its value into `out`, if any text opened it.
        let close = |out: &mut Map<String, Value>,
                     current: usize,
                     opened: bool,
                     body: &str,
                     name: &Option<String>| {
            if !opened {
                return Some(());
            }
            let region = &self.regions[current];
            let mut value = read(region.read, body, name.as_deref())?;
            typed(&mut value, parameters);
            if region.repeats {
                let list = out.entry(region.field).or_insert_with(|| json!([]));
                list.as_array_mut().expect("a list").push(value);
            } else {
                out.insert(region.field.into(), value);
            }
            Some(())
        };
        let mut pos = 0;
        loop {
            // The delimiters that count now: the current region's close, or in the content
            // every opening and the content's close. The earliest wins, then the longest,
            // then an opening.
            let watched: Vec<(usize, bool)> = match current == implicit {
                false => vec![(current, false)],
                true => (0..self.regions.len())
                    .filter(|&i| self.regions[i].open.is_some())
                    .map(|i| (i, true))
                    .chain([(implicit, false)])
                    .collect(),
            };
            let found = watched
                .into_iter()
                .filter_map(|(i, opening)| {
                    let region = &self.regions[i];
                    let pattern = if opening {
                        region.open.as_ref()?
                    } else {
                        &region.close
                    };
                    let caps = pattern.captures_at(text, pos)?;
                    let m = caps.get(0).expect("the whole match");
                    let captured = caps.name("name").map(|n| n.as_str().to_string());
                    Some((
                        (m.start(), usize::MAX - m.len(), !opening),
                        i,
                        m.end(),
                        captured,
                    ))
                })
                .min_by_key(|(key, i, _, _)| (*key, self.regions[*i].field));
            let Some(((start, _, closing), i, end, captured)) = found else {
                if pos < text.len() {
                    body.push_str(&text[pos..]);
                    opened = true;
                }
                close(&mut out, current, opened, &body, &name)?;
                break;
            };
            if start > pos {
                body.push_str(&text[pos..start]);
                opened = true;
            }
            pos = end;
            let had_text = opened;
            close(&mut out, current, opened, &body, &name)?;
            (current, opened, name) = match closing {
                true => (implicit, false, None),
                false => (i, true, captured),
            };
            body.clear();
            if closing && !had_text && start == end {
                break;
            }
        }
        // Empty fields are dropped (the role stays).
        out.retain(|k, v| {
            k == "role"
                || !(v.is_null()
                    || v.as_str() == Some("")
                    || v.as_array().is_some_and(Vec::is_empty)
                    || v.as_object().is_some_and(Map::is_empty))
        });
        Some(out)
    }
}

/// A region's value: its text stripped, or a tool call.
fn read(how: Read, body: &str, name: Option<&str>) -> Option<Value> {
    match how {
        Read::Text => Some(body.trim().into()),
        Read::WholeCall => {
            let function: Value = serde_json::from_str(body).ok()?;
            Some(json!({"type": "function", "function": function}))
        }
        Read::ArgumentsCall => {
            let arguments: Value = serde_json::from_str(body).ok()?;
            Some(json!({"type": "function", "function": {"name": name?, "arguments": arguments}}))
        }
        Read::XmlCall => {
            static TAG: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
            let tag = TAG.get_or_init(|| {
                re(r"(?s)<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>")
            });
            let arguments: Map<String, Value> = tag
                .captures_iter(body)
                .map(|c| (c["key"].to_string(), c["value"].trim().into()))
                .collect();
            Some(json!({"type": "function", "function": {"name": name?, "arguments": arguments}}))
        }
    }
}

/// Each tool's parameters (its schema's `properties`) by its name.
type Parameters = Map<String, Value>;

/// The parameters of the tool schemas `tools` (`[{"type": "function", "function": {"name",
/// "parameters": {"properties": …}}}]`, or the functions themselves).
fn parameters_of(tools: &Value) -> Parameters {
    let mut out = Map::new();
    for tool in tools.as_array().into_iter().flatten() {
        let function = tool.get("function").unwrap_or(tool);
        if let Some(name) = function.get("name").and_then(Value::as_str) {
            let properties = function["parameters"]["properties"].as_object();
            out.insert(
                name.into(),
                Value::Object(properties.cloned().unwrap_or_default()),
            );
        }
    }
    out
}

/// transformers' `_coerce_tool_calls`: a call's text arguments cast to the types its tool's
/// parameter declares (a list's text items too, unless the parameter is an array).
fn typed(value: &mut Value, parameters: &Parameters) {
    if let Value::Array(items) = value {
        return items.iter_mut().for_each(|v| typed(v, parameters));
    }
    let Some(function) = value.get_mut("function").and_then(Value::as_object_mut) else {
        return;
    };
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(properties) = parameters.get(name).and_then(Value::as_object) else {
        return;
    };
    let Some(arguments) = function.get_mut("arguments").and_then(Value::as_object_mut) else {
        return;
    };
    for (key, argument) in arguments.iter_mut() {
        let types = properties.get(key).map(schema_types).unwrap_or_default();
        if types.is_empty() {
            continue;
        }
        match argument {
            Value::String(raw) => *argument = coerce(raw, &types),
            Value::Array(items) if !types.contains(&"array") => {
                for item in items.iter_mut() {
                    if let Value::String(raw) = item {
                        *item = coerce(raw, &types);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The JSON types a parameter's schema allows, in order (`type`, its `anyOf`/`oneOf`
/// choices, `null` where `nullable`).
fn schema_types(schema: &Value) -> Vec<&'static str> {
    const NAMES: [&str; 7] = [
        "string", "integer", "number", "boolean", "null", "object", "array",
    ];
    let known = |t: &str| NAMES.iter().find(|&&n| n == t).copied().unwrap_or("other");
    let mut types = vec![];
    match schema.get("type") {
        Some(Value::String(t)) => types.push(known(t)),
        Some(Value::Array(list)) => types.extend(list.iter().filter_map(Value::as_str).map(known)),
        _ => {}
    }
    for union in ["anyOf", "oneOf"] {
        for choice in schema
            .get(union)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            types.extend(schema_types(choice));
        }
    }
    if schema.get("nullable").and_then(Value::as_bool) == Some(true) && !types.contains(&"null") {
        types.push("null");
    }
    types
}

/// transformers' `_coerce`: `raw` as the first of `types` it reads as (Python's `int`,
/// `float`, `json.loads`), else the text itself.
fn coerce(raw: &str, types: &[&str]) -> Value {
    let whole = |x: f64| x.fract() == 0.0 && x.abs() < 9.2e18;
    for &t in types {
        let value = match t {
            "integer" => python_int(raw).map(Value::from).or_else(|| {
                let x = python_float(raw)?;
                whole(x).then(|| Value::from(x as i64))
            }),
            "number" => python_float(raw).filter(|x| x.is_finite()).map(|x| {
                match whole(x) && !raw.contains('.') {
                    true => Value::from(x as i64),
                    false => Value::from(x),
                }
            }),
            "boolean" => match raw.trim().to_lowercase().as_str() {
                "true" | "1" => Some(Value::Bool(true)),
                "false" | "0" => Some(Value::Bool(false)),
                _ => None,
            },
            "null" => matches!(raw.trim(), "null" | "None").then_some(Value::Null),
            "object" => serde_json::from_str(raw).ok().filter(Value::is_object),
            "array" => serde_json::from_str(raw).ok().filter(Value::is_array),
            _ => None,
        };
        if let Some(v) = value {
            return v;
        }
    }
    raw.into()
}

/// `raw` as Python reads a number's text: surrounding whitespace dropped, a `_` allowed
/// between two digits.
fn python_digits(raw: &str) -> Option<String> {
    let s = raw.trim();
    let b = s.as_bytes();
    let ok = (0..b.len()).all(|i| {
        b[i] != b'_'
            || (i > 0 && i + 1 < b.len() && b[i - 1].is_ascii_digit() && b[i + 1].is_ascii_digit())
    });
    ok.then(|| s.replace('_', ""))
}

/// Python's `int(raw)`, where it fits 64 bits.
fn python_int(raw: &str) -> Option<i64> {
    let s = python_digits(raw)?;
    let digits = s.strip_prefix(['+', '-']).unwrap_or(&s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Python's `float(raw)`.
fn python_float(raw: &str) -> Option<f64> {
    let s = python_digits(raw)?;
    let word = s.trim_start_matches(['+', '-']).to_lowercase();
    let named = ["inf", "infinity", "nan"].contains(&word.as_str());
    let numeric = s
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    if !(named || numeric) {
        return None;
    }
    s.parse().ok()
}

/// TRL's `_validate_tool_calls`: each call's `function` an object with a string `name`,
/// missing or null `arguments` made `{}`. This version runs calls whose arguments are an
/// object only; other arguments count as a call that cannot be read (where TRL would call the
/// tool and report Python's `TypeError`).
fn valid_calls(message: &mut Map<String, Value>) -> bool {
    let Some(calls) = message.get_mut("tool_calls") else {
        return true;
    };
    calls
        .as_array_mut()
        .expect("a list")
        .iter_mut()
        .all(|call| {
            let Some(function) = call.get_mut("function").and_then(Value::as_object_mut) else {
                return false;
            };
            if !function.get("name").is_some_and(Value::is_string) {
                return false;
            }
            let arguments = function.entry("arguments").or_insert(Value::Null);
            if arguments.is_null() {
                *arguments = json!({});
            }
            arguments.is_object()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_as_transformers_reads_them() {
        let q = ResponseTemplate::qwen3();
        let m = |prefix: &str, answer: &str| {
            q.message((prefix, answer), "PLAIN", Some("<|im_end|>"), None)
        };
        let call = |name: &str, arguments: Value| json!({"type": "function", "function": {"name": name, "arguments": arguments}});
        // Reasoning, content before the calls, the calls in order.
        assert_eq!(
            m(
                "<|im_start|>assistant\n",
                "<think>\nhm\n</think>\n\nLet me see.\n<tool_call>\n{\"name\": \"a\"}\n</tool_call>\n<tool_call>{\"name\": \"b\", \"arguments\": {\"x\": 1}}</tool_call><|im_end|>"
            ),
            json!({"role": "assistant", "reasoning_content": "hm", "content": "Let me see.",
                "tool_calls": [call("a", json!({})), call("b", json!({"x": 1}))]})
        );
        // Each stretch of content replaces the last; a think block opened in the prompt
        // holds the answer's start.
        assert_eq!(
            m(
                "x<|im_start|>assistant\n<think>\n",
                "why</think>A<tool_call>{\"name\": \"a\"}</tool_call>B<|im_end|>"
            ),
            json!({"role": "assistant", "reasoning_content": "why", "content": "B",
                "tool_calls": [call("a", json!({}))]})
        );
        // Not JSON, cut before its end, no name, arguments that are not an object: plain.
        for answer in [
            "<tool_call>{bad}</tool_call><|im_end|>",
            "<tool_call>{\"name\": \"a\"}<|im_end|>",
            "<tool_call>{\"arguments\": {}}</tool_call><|im_end|>",
            "<tool_call>{\"name\": \"a\", \"arguments\": [1]}</tool_call><|im_end|>",
        ] {
            assert_eq!(
                m("", answer),
                json!({"role": "assistant", "content": "PLAIN"}),
                "{answer}"
            );
        }
        // Llama 3.1: a call may follow text; without its end of turn it is not read.
        let l = ResponseTemplate::llama3();
        assert_eq!(
            l.message(
                (
                    "",
                    "Sure. {\"name\": \"calc\", \"parameters\": {\"e\": \"1\"}}<|eot_id|>"
                ),
                "P",
                None,
                None
            ),
            json!({"role": "assistant", "content": "Sure.", "tool_calls": [call("calc", json!({"e": "1"}))]})
        );
        assert_eq!(
            l.message(
                ("", "{\"name\": \"calc\", \"parameters\": {\"e\": \"1\"}}"),
                "P",
                None,
                None
            ),
            json!({"role": "assistant", "content": "P"})
        );
    }
}
