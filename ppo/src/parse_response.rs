//! An answer as a chat message, as TRL 1.16's `parse_response` reads it with the response
//! template `add_response_schema` gives a tool-calling chat template (transformers' region
//! parser, `utils/chat_parsing/response_parser.py`): the text the policy wrote after the
//! assistant turn began (the prompt's part after the template's start anchor, then the
//! answer, special tokens kept) is cut into regions — reasoning (`<think>…</think>`), each
//! tool call, and the content (the text outside them: each stretch replaces the last; or a
//! region of its own, gpt-oss's `final` channel) — and each region's text is read (stripped
//! text, JSON or a JSON dialect, key/value tags). What cannot be read (a call that is not
//! JSON, cut before its end, or without a name) makes the whole answer its plain text, TRL's
//! fallback. The templates: Qwen3's, Qwen3.5's, Llama 3's, GLM-4-MoE's, Gemma 4's and
//! gpt-oss's.
//!
//! With tools, this is what an answer is: the tool loop runs the calls of its message, and
//! reward programs get the messages as TRL's `completions` (`ToolResponse::messages`).

use regex::Regex;
use serde_json::{json, Map, Value};

/// How a region's text becomes its value.
enum Read {
    /// The text, stripped.
    Text,
    /// JSON, the value itself the call's `function` (`{"type": "function", "function": …}`:
    /// Qwen's `<tool_call>` blocks).
    WholeCall,
    /// JSON, the arguments of a call whose name the opening captured (Llama 3.1's
    /// `{"name": …, "parameters": …}`, gpt-oss's `to=functions.NAME … json<|message|>`).
    ArgumentsCall,
    /// Gemma 4's JSON dialect (keys unquoted, strings between `<|"|>` marks), the arguments
    /// of a call whose name the opening captured.
    GemmaCall,
    /// Tags with a `key` and a text `value` each (this pattern), the arguments of a call
    /// whose name the opening captured (Qwen3.5's `<parameter=KEY>`, GLM-4's `<arg_key>`).
    TagsCall(Regex),
}

/// One field of the message: where its text opens (none: the implicit region, where text
/// outside every other region goes) and closes, and how it is read.
struct Region {
    field: &'static str,
    open: Option<Regex>,
    close: Regex,
    /// The close is also the end of the text (a pattern's `|$`: as Python's `$`, before a
    /// final newline too).
    or_end: bool,
    read: Read,
    /// Each occurrence appended to a list (tool calls), else the last one kept.
    repeats: bool,
}

/// A chat template's response template: its answers' regions, and the text that starts an
/// assistant turn (what comes before it in the prompt is not the answer's).
pub struct ResponseTemplate {
    anchor: Regex,
    regions: Vec<Region>,
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a valid pattern")
}

impl ResponseTemplate {
    /// TRL's `qwen3_template` (Qwen2.5, Qwen3, Hermes: `<tool_call>{…}</tool_call>`).
    pub fn qwen3() -> Self {
        ResponseTemplate {
            anchor: re(r"<\|im_start\|>assistant\n"),
            regions: vec![
                Region {
                    field: "reasoning_content",
                    open: Some(re("<think>")),
                    close: re(r"</think>\s*"),
                    read: Read::Text,
                    repeats: false,
                    or_end: false,
                },
                Region {
                    field: "tool_calls",
                    open: Some(re("<tool_call>")),
                    close: re(r"</tool_call>\s*"),
                    read: Read::WholeCall,
                    repeats: true,
                    or_end: false,
                },
                Region {
                    field: "content",
                    open: None,
                    close: re(r"<\|im_end\|>\s*"),
                    read: Read::Text,
                    repeats: false,
                    or_end: false,
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
            read: Read::TagsCall(re(
                r"(?s)<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>",
            )),
            repeats: true,
            or_end: false,
        };
        t
    }

    /// TRL's `llama3_template` (Llama 3.1 and 3.2: `{"name": …, "parameters": {…}}` before
    /// the end of the turn).
    pub fn llama3() -> Self {
        ResponseTemplate {
            anchor: re(r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n"),
            regions: vec![
                Region {
                    field: "tool_calls",
                    open: Some(re(r#"\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*"#)),
                    close: re(r"\}<\|eot_id\|>\s*"),
                    read: Read::ArgumentsCall,
                    repeats: true,
                    or_end: false,
                },
                Region {
                    field: "content",
                    open: None,
                    close: re(r"<\|eot_id\|>\s*"),
                    read: Read::Text,
                    repeats: false,
                    or_end: false,
                },
            ],
        }
    }

    /// TRL's `glm4moe_template` (GLM-4.5, 4.6: `<tool_call>NAME` then an
    /// `<arg_key>`/`<arg_value>` pair per argument; the turn ends at the next `<|user|>`).
    pub fn glm4moe() -> Self {
        let mut t = Self::qwen3();
        t.anchor = re(r"<\|assistant\|>");
        t.regions[1] = Region {
            field: "tool_calls",
            open: Some(re(r"<tool_call>(?P<name>\S+)\n?")),
            close: re(r"</tool_call>\s*"),
            read: Read::TagsCall(re(
                r"(?s)<arg_key>(?P<key>[^<]+)</arg_key>\s*\n<arg_value>(?P<value>.*?)</arg_value>",
            )),
            repeats: true,
            or_end: false,
        };
        t.regions[2].close = re(r"<\|user\|>\s*");
        t.regions[2].or_end = true;
        t
    }

    /// TRL's `gemma4_template` (Gemma 4: `<|channel>thought` reasoning,
    /// `<|tool_call>call:NAME{…}<tool_call|>` calls in its JSON dialect).
    pub fn gemma4() -> Self {
        ResponseTemplate {
            anchor: re(r"(?:<\|turn>model\n|<tool_response\|>)"),
            regions: vec![
                Region {
                    field: "reasoning_content",
                    open: Some(re(r"<\|channel>thought\n")),
                    close: re(r"<channel\|>\s*"),
                    read: Read::Text,
                    repeats: false,
                    or_end: false,
                },
                Region {
                    field: "tool_calls",
                    open: Some(re(r"<\|tool_call>call:(?P<name>\w+)")),
                    close: re(r"<tool_call\|>\s*"),
                    read: Read::GemmaCall,
                    repeats: true,
                    or_end: false,
                },
                Region {
                    field: "content",
                    open: None,
                    close: re(r"(?:<turn\|>|<\|tool_response>|<eos>)\s*"),
                    read: Read::Text,
                    repeats: false,
                    or_end: true,
                },
            ],
        }
    }

    /// TRL's `gptoss_template` (gpt-oss's channels: `analysis` is `thinking`, `final` the
    /// content, `to=functions.NAME … json` a call; text outside them is dropped).
    pub fn gptoss() -> Self {
        ResponseTemplate {
            anchor: re(r"<\|start\|>assistant"),
            regions: vec![
                Region {
                    field: "thinking",
                    open: Some(re(r"<\|channel\|>analysis<\|message\|>")),
                    close: re(r"<\|end\|>\s*"),
                    read: Read::Text,
                    repeats: false,
                    or_end: false,
                },
                Region {
                    field: "content",
                    open: Some(re(r"<\|channel\|>final<\|message\|>")),
                    close: re(r"<\|return\|>\s*"),
                    read: Read::Text,
                    repeats: false,
                    or_end: false,
                },
                Region {
                    field: "tool_calls",
                    open: Some(re(
                        r"to=functions\.(?P<name>\S+?)<\|channel\|>commentary\s+json<\|message\|>",
                    )),
                    close: re(r"<\|call\|>\s*"),
                    read: Read::ArgumentsCall,
                    repeats: true,
                    or_end: false,
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
        let start = self
            .anchor
            .find_iter(prefix)
            .last()
            .map_or(prefix.len(), |m| m.end());
        let parameters = tools.map(parameters_of).unwrap_or_default();
        let parsed = self
            .regions((&prefix[start..], answer), &parameters)
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

    /// transformers' `ResponseParser` over the prompt's `tail` (the prefix it is given) and
    /// then the `answer` (`feed`, then `finalize`), read at once: `None` where a region's
    /// text cannot be read.
    fn regions(
        &self,
        (tail, answer): (&str, &str),
        parameters: &Parameters,
    ) -> Option<Map<String, Value>> {
        let text = &format!("{tail}{answer}");
        // Text outside every region goes to the implicit one, or nowhere (gpt-oss).
        let implicit = self.regions.iter().position(|r| r.open.is_none());
        let mut out = Map::new();
        out.insert("role".into(), "assistant".into());
        let (mut current, mut opened, mut body, mut name) = (implicit, false, String::new(), None);
        // Closes the region being read: its value into `out`, if any text opened it.
        let close = |out: &mut Map<String, Value>,
                     current: Option<usize>,
                     opened: bool,
                     body: &str,
                     name: &Option<String>| {
            let Some(current) = current.filter(|_| opened) else {
                return Some(());
            };
            let region = &self.regions[current];
            let mut value = read(&region.read, body, name.as_deref())?;
            typed(&mut value, parameters);
            if region.repeats {
                let list = out.entry(region.field).or_insert_with(|| json!([]));
                list.as_array_mut().expect("a list").push(value);
            } else {
                out.insert(region.field.into(), value);
            }
            Some(())
        };
        // Whether the prefix is still being read alone (before the answer is fed).
        let (mut pos, mut prefix_alone) = (0, !tail.is_empty());
        loop {
            // The delimiters that count now: the current region's close, or in the content
            // every opening and the content's close. The earliest wins, then the longest,
            // then an opening.
            let watched: Vec<(usize, bool)> = match current {
                Some(c) if current != implicit => vec![(c, false)],
                _ => (0..self.regions.len())
                    .filter(|&i| self.regions[i].open.is_some())
                    .map(|i| (i, true))
                    .chain(implicit.map(|i| (i, false)))
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
                    let caps = pattern.captures_at(text, pos);
                    let m = caps.as_ref().map(|c| c.get(0).expect("the whole match"));
                    // `|$`: the end, where the pattern does not match first.
                    let tail = if prefix_alone { tail } else { "" };
                    let end = (!opening && region.or_end).then(|| python_end(text, tail, pos));
                    let (start, stop) = match (m, end) {
                        (Some(m), Some(e)) if e < m.start() => (e, e),
                        (Some(m), _) => (m.start(), m.end()),
                        (None, Some(e)) => (e, e),
                        (None, None) => return None,
                    };
                    // An opening may name the call it opens.
                    let captured = caps
                        .filter(|_| opening)
                        .and_then(|c| c.name("name").map(|n| n.as_str().to_string()));
                    Some((
                        (start, usize::MAX - (stop - start), !opening),
                        i,
                        stop,
                        captured,
                    ))
                })
                .min_by_key(|(key, i, _, _)| (*key, self.regions[*i].field));
            // Text goes to the current region (none: dropped).
            let take = |body: &mut String, text: &str, opened: &mut bool| {
                if current.is_some() && !text.is_empty() {
                    body.push_str(text);
                    *opened = true;
                }
            };
            let Some(((start, _, closing), i, end, captured)) = found else {
                take(&mut body, &text[pos..], &mut opened);
                close(&mut out, current, opened, &body, &name)?;
                break;
            };
            take(&mut body, &text[pos..start], &mut opened);
            pos = end;
            let had_text = opened;
            close(&mut out, current, opened, &body, &name)?;
            (current, opened, name) = match closing {
                true => (implicit, false, None),
                false => (Some(i), true, captured),
            };
            body.clear();
            // An empty region closed by the end: the parser waits for more text (the
            // answer), or it is done.
            if closing && !had_text && start == end {
                match prefix_alone {
                    true => prefix_alone = false,
                    false => break,
                }
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

/// Where Python's `$` first matches in `text` from `pos`: before a final newline, or at the
/// end. The prefix `tail` is read before the answer is fed: a `$` before its own final
/// newline comes first.
fn python_end(text: &str, tail: &str, pos: usize) -> usize {
    let before_newline = |t: &str| t.strip_suffix('\n').map(str::len).filter(|&e| e >= pos);
    before_newline(tail)
        .or_else(|| before_newline(text))
        .unwrap_or(text.len())
}

/// A region's value: its text stripped, or a tool call.
fn read(how: &Read, body: &str, name: Option<&str>) -> Option<Value> {
    let named = |arguments: Value| {
        Some(json!({"type": "function", "function": {"name": name?, "arguments": arguments}}))
    };
    match how {
        Read::Text => Some(body.trim().into()),
        Read::WholeCall => {
            let function: Value = serde_json::from_str(body).ok()?;
            Some(json!({"type": "function", "function": function}))
        }
        Read::ArgumentsCall => named(serde_json::from_str(body).ok()?),
        Read::GemmaCall => named(gemma_json(body)?),
        Read::TagsCall(tag) => named(Value::Object(
            tag.captures_iter(body)
                .map(|c| (c["key"].to_string(), c["value"].trim().into()))
                .collect(),
        )),
    }
}

/// transformers' JSON parser with Gemma 4's dialect (`string_delims` `<|"|>`,
/// `unquoted_keys`): each delimited string set aside, bare keys quoted, the strings put back
/// as JSON strings, then read.
fn gemma_json(body: &str) -> Option<Value> {
    const MARK: &str = "<|\"|>";
    if body.contains(['\x01', '\x02']) {
        return None;
    }
    static STRING: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    static KEY: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let string = STRING.get_or_init(|| re(&format!("(?s){0}(.*?){0}", regex::escape(MARK))));
    let key = KEY.get_or_init(|| re(r"([{,])(\w+):"));
    let mut strings = vec![];
    let working = string.replace_all(body, |c: &regex::Captures| {
        strings.push(c[1].to_string());
        format!("\x01{}\x02", strings.len() - 1)
    });
    let mut working = key.replace_all(&working, r#"$1"$2":"#).into_owned();
    for (i, s) in strings.iter().enumerate() {
        working = working.replace(
            &format!("\x01{i}\x02"),
            &Value::from(s.as_str()).to_string(),
        );
    }
    serde_json::from_str(&working).ok()
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
