//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json` rendered with
//! `minijinja`, configured the way `transformers` renders it (trim/lstrip blocks, loop
//! controls, `raise_exception`, `strftime_now`, a `tojson` with Python's separators and no
//! HTML escaping, Jinja's `iterable` test), so the text matches `apply_chat_template` byte
//! for byte.

use minijinja::{context, Environment, ErrorKind, Value};

use crate::formats::{Message, TemplateArgs};

pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's text.
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

/// How `json.dumps` writes: transformers' `tojson(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
#[derive(Debug, Clone, Default)]
struct JsonStyle {
    /// Each level's indent (Python's `indent`: a number of spaces or a string); none: one line.
    indent: Option<String>,
    /// The item and key separators; by default `", "` and `": "`, `","` with an indent.
    separators: Option<(String, String)>,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// `json.dumps(value, …)` as Python writes it in `style`.
fn python_json(v: &serde_json::Value, style: &JsonStyle, depth: usize, out: &mut String) {
    let (open, close, mut items): (char, char, Vec<(Option<&String>, &serde_json::Value)>) = match v
    {
        serde_json::Value::Array(a) => ('[', ']', a.iter().map(|x| (None, x)).collect()),
        serde_json::Value::Object(m) => ('{', '}', m.iter().map(|(k, x)| (Some(k), x)).collect()),
        serde_json::Value::String(text) => return python_string(text, style.ensure_ascii, out),
        other => return out.push_str(&other.to_string()),
    };
    if style.sort_keys {
        items.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return;
    }
    let (item_sep, key_sep) = match (&style.separators, &style.indent) {
        (Some((i, k)), _) => (i.as_str(), k.as_str()),
        (None, Some(_)) => (",", ": "),
        (None, None) => (", ", ": "),
    };
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
    };
    for (i, (key, item)) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(item_sep);
        }
        newline(out, depth + 1);
        if let Some(k) = key {
            python_string(k, style.ensure_ascii, out);
            out.push_str(key_sep);
        }
        python_json(item, style, depth + 1, out);
    }
    newline(out, depth);
    out.push(close);
}

/// A JSON string as Python writes it: with `ensure_ascii`, every character outside
/// printable ASCII as `\uXXXX` (a surrogate pair above U+FFFF).
fn python_string(text: &str, ensure_ascii: bool, out: &mut String) {
    let quoted = serde_json::Value::String(text.into()).to_string();
    if !ensure_ascii {
        return out.push_str(&quoted);
    }
    for c in quoted.chars() {
        match c {
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
}

/// transformers' `tojson` keywords: `indent` (spaces, or a string), `separators` (two
/// strings), `ensure_ascii` and `sort_keys`.
fn json_style(kwargs: &minijinja::value::Kwargs) -> Result<JsonStyle, minijinja::Error> {
    let bad = |what: &str| minijinja::Error::new(ErrorKind::InvalidOperation, what.to_string());
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_str(), v.as_usize()) {
            (Some(s), _) => Some(s.to_string()),
            (None, Some(n)) => Some(" ".repeat(n)),
            _ => return Err(bad("tojson: indent must be a number or a string")),
        },
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        None => None,
        Some(pair) => match <[String; 2]>::try_from(pair) {
            Ok([item, key]) => Some((item, key)),
            Err(_) => return Err(bad("tojson: separators must be two strings")),
        },
    };
    let style = JsonStyle {
        indent,
        separators,
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    Ok(style)
}

impl ChatTemplate {
    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn new(source: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Jinja's `iterable` test: none and undefined are not (minijinja iterates them as
        // empty), so `tools is iterable and tools | length > 0` holds only with tools.
        env.add_test("iterable", |v: Value| {
            !(v.is_undefined() || v.is_none()) && v.try_iter().is_ok()
        });
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        // transformers gives templates `strftime_now(format)`: the local time now, as
        // Python's `datetime.now().strftime(format)` (Llama 3.2 dates its system header).
        env.add_function("strftime_now", |format: String| -> String {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_filter(
            "tojson",
            |v: Value, kwargs: minijinja::value::Kwargs| -> Result<String, minijinja::Error> {
                let style = json_style(&kwargs)?;
                let json = serde_json::to_value(&v).map_err(|e| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                })?;
                let mut out = String::new();
                python_json(&json, &style, 0, &mut out);
                Ok(out)
            },
        );
        // transformers' `{% generation %}…{% endgeneration %}` (the assistant-token markers of
        // training templates, TRL's `*_training.jinja`) renders its body as it is.
        let markers = regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("valid");
        let marked = markers.replace_all(source, |c: &regex::Captures| match c.get(2) {
            None => format!("{{%{} if true {}%}}", &c[1], &c[3]),
            Some(_) => format!("{{%{} endif {}%}}", &c[1], &c[3]),
        });
        env.add_template_owned("chat", marked.into_owned())
            .map_err(|e| format!("chat_template does not parse: {e}"))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
        })
    }

    /// The conversation as `apply_chat_template` renders it: the row's `args.kwargs` and
    /// the run's `run_kwargs` (`--chat-template-kwargs`; the row's win) beside the
    /// messages, overriding the special tokens (`{**special_tokens_map, **kwargs}`).
    pub fn render(
        &self,
        messages: &[Message],
        args: &TemplateArgs,
        add_generation_prompt: bool,
        (bos_token, eos_token): (&str, &str),
        run_kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(context! {
                ..context! {
                    messages => messages,
                    tools => args.tools,
                    documents => args.documents,
                    add_generation_prompt => add_generation_prompt,
                },
                ..Value::from_serialize(&args.kwargs),
                ..Value::from_serialize(run_kwargs),
                ..context! {
                    bos_token => bos_token,
                    eos_token => eos_token,
                }
            })
            .map_err(|e| format!("chat_template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message::new(role, content)
    }

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let text = t
            .render(
                &[msg("user", "hi")],
                &TemplateArgs::default(),
                true,
                ("", ""),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_pycompat_methods() {
        let t = ChatTemplate::new("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() | tojson }}").unwrap();
        assert_eq!(
            t.render(
                &[msg("user", " a\"é ")],
                &TemplateArgs::default(),
                false,
                ("", ""),
                &Default::default(),
            )
            .unwrap(),
            "\"a\\\"é\""
        );
        let e = t
            .render(
                &[msg("assistant", "x")],
                &TemplateArgs::default(),
                false,
                ("", ""),
                &Default::default(),
            )
            .unwrap_err();
        assert!(e.contains("first must be user"), "{e}");
    }

    /// `strftime_now` formats as C's strftime does (here through `date`), so the date a
    /// Llama 3.2 system header shows is today's, not the template's fallback.
    #[test]
    fn strftime_now_is_today() {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}").unwrap();
        let ours = t
            .render(
                &[msg("user", "x")],
                &TemplateArgs::default(),
                false,
                ("", ""),
                &Default::default(),
            )
            .unwrap();
        let out = std::process::Command::new("date")
            .arg("+%d %b %Y")
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        let theirs = String::from_utf8(out.stdout).unwrap();
        assert_eq!(ours, theirs.trim_end());
    }

    /// transformers' `{% generation %}` markers (TRL's training templates) render their body.
    #[test]
    fn generation_markers_render_their_body() {
        let t = ChatTemplate::new("{% for m in messages %}{%- if m.role == 'assistant' -%}{% generation %}[{{ m.content }}]{% endgeneration %}{%- else -%}{{ m.content }}{%- endif -%}{% endfor %}").unwrap();
        let text = t
            .render(
                &[msg("user", "q"), msg("assistant", "a")],
                &TemplateArgs::default(),
                false,
                ("", ""),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(text, "q[a]");
    }

    /// Templates see `tools` and every message field (Qwen2.5-style tool calls).
    #[test]
    fn tools_and_message_fields_reach_the_template() {
        let t = ChatTemplate::new("{% for tool in tools %}{{ tool.function.name }};{% endfor %}{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.arguments | tojson }}</call>{% endfor %}{% if m.content is not defined %}(none){% endif %}{% else %}{{ m.role }}:{{ m.content }}{% if m.name %}@{{ m.name }}{% endif %}|{% endif %}{% endfor %}").unwrap();
        let mut call = msg("assistant", "");
        call.extra.insert(
            "tool_calls".into(),
            serde_json::json!([{"function": {"name": "solve", "arguments": {"heads": 35}}}]),
        );
        call.extra.insert("content".into(), serde_json::Value::Null);
        let mut result = msg("tool", "23");
        result.extra.insert("name".into(), "solve".into());
        let args = TemplateArgs {
            tools: Some(serde_json::json!([{"function": {"name": "solve"}}])),
            documents: None,
            kwargs: Default::default(),
        };
        let text = t
            .render(
                &[msg("user", "q"), call, result],
                &args,
                false,
                ("", ""),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(
            text,
            r#"solve;user:q|<call>{"heads": 35}</call>(none)tool:23@solve|"#
        );
    }

    #[test]
    fn tojson_uses_python_separators() {
        let v = serde_json::json!({"a": [1, "x"], "b": {"c": null}, "d": []});
        let mut out = String::new();
        python_json(&v, &JsonStyle::default(), 0, &mut out);
        assert_eq!(out, r#"{"a": [1, "x"], "b": {"c": null}, "d": []}"#);
        // json.dumps(v, indent=2)
        let mut out = String::new();
        let indented = JsonStyle {
            indent: Some("  ".into()),
            ..JsonStyle::default()
        };
        python_json(&v, &indented, 0, &mut out);
        assert_eq!(
            out,
            "{\n  \"a\": [\n    1,\n    \"x\"\n  ],\n  \"b\": {\n    \"c\": null\n  },\n  \"d\": []\n}"
        );
    }

    /// transformers' `tojson` keywords (GLM-4's templates write `tojson(ensure_ascii=False)`),
    /// each as Python's `json.dumps` writes it.
    #[test]
    fn tojson_takes_transformers_keywords() {
        let render = |template: &str| {
            let t = ChatTemplate::new(template).unwrap();
            let m = [msg("user", "鸡🐔\u{7f}")];
            t.render(
                &m,
                &TemplateArgs::default(),
                false,
                ("", ""),
                &Default::default(),
            )
        };
        assert_eq!(
            render(r#"{{ messages | tojson(ensure_ascii=True, sort_keys=True, separators=(",", ":")) }}"#).unwrap(),
            r#"[{"content":"\u9e21\ud83d\udc14\u007f","role":"user"}]"#
        );
        assert_eq!(
            render(r#"{{ messages | tojson(indent="\t", ensure_ascii=False) }}"#).unwrap(),
            "[\n\t{\n\t\t\"role\": \"user\",\n\t\t\"content\": \"鸡🐔\u{7f}\"\n\t}\n]"
        );
        let e = render("{{ messages | tojson(indnet=2) }}").unwrap_err();
        assert!(e.contains("indnet"), "{e}");
    }

    /// Jinja's loop controls (Cohere's templates `break`) and its `iterable` test, false for
    /// no tools (Nemotron 3's `tools is iterable and tools | length > 0`).
    #[test]
    fn loop_controls_and_iterable_as_jinja() {
        let t = ChatTemplate::new("{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|{{ tools is iterable }} {{ 'ab' is iterable }} {{ 3 is iterable }} {{ nothing is iterable }}{% if tools is iterable and tools | length > 0 %}{{ tools | length }}{% endif %}").unwrap();
        let m = [msg("user", "a"), msg("assistant", "b")];
        let render = |args: &TemplateArgs| {
            t.render(&m, args, false, ("", ""), &Default::default())
                .unwrap()
        };
        assert_eq!(render(&TemplateArgs::default()), "a|False True False False");
        let tools = TemplateArgs {
            tools: Some(serde_json::json!([{"type": "function"}])),
            ..TemplateArgs::default()
        };
        assert_eq!(render(&tools), "a|True True False False1");
    }

    /// `chat_template_kwargs` reach the template as variables (Qwen3's `enable_thinking`)
    /// and override the special tokens, as `apply_chat_template(**kwargs)` does.
    #[test]
    fn template_kwargs_are_variables() {
        let t = ChatTemplate::new("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{% if enable_thinking is defined and enable_thinking is false %}<think></think>{% endif %}").unwrap();
        let mut args = TemplateArgs::default();
        let plain = t
            .render(
                &[msg("user", "q")],
                &args,
                true,
                ("<s>", ""),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(plain, "<s>q");
        args.kwargs = serde_json::json!({"enable_thinking": false, "bos_token": "[B]"})
            .as_object()
            .unwrap()
            .clone();
        let off = t
            .render(
                &[msg("user", "q")],
                &args,
                true,
                ("<s>", ""),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(off, "[B]q<think></think>");
        // The run's variables are there too, under the row's.
        let run = |v: serde_json::Value| v.as_object().unwrap().clone();
        let plain_row = TemplateArgs::default();
        let by_run = t
            .render(
                &[msg("user", "q")],
                &plain_row,
                true,
                ("<s>", ""),
                &run(serde_json::json!({"enable_thinking": false})),
            )
            .unwrap();
        assert_eq!(by_run, "<s>q<think></think>");
        let row_wins = t
            .render(
                &[msg("user", "q")],
                &args,
                true,
                ("<s>", ""),
                &run(serde_json::json!({"enable_thinking": true, "bos_token": "[R]"})),
            )
            .unwrap();
        assert_eq!(row_wins, "[B]q<think></think>");
    }
}
