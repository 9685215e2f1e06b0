//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json` rendered with
//! `minijinja`, configured the way `transformers` renders it (trim/lstrip blocks,
//! `raise_exception`, `strftime_now`, a `tojson` with Python's separators and no HTML
//! escaping), so the text matches `apply_chat_template` byte for byte.

use minijinja::{context, Environment, ErrorKind, Value};

use crate::formats::Message;

pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

/// `json.dumps(value, ensure_ascii=False)`: `", "` and `": "` separators.
fn python_json(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_json(item, out);
            }
            out.push(']');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
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
        env.add_filter("tojson", |v: Value| -> Result<String, minijinja::Error> {
            let json = serde_json::to_value(&v)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            let mut out = String::new();
            python_json(&json, &mut out);
            Ok(out)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| format!("chat_template does not parse: {e}"))?;
        Ok(ChatTemplate { env })
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String, String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            })
            .map_err(|e| format!("chat_template failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let text = t.render(&[msg("user", "hi")], true, "", "").unwrap();
        assert_eq!(
            text,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_and_pycompat_methods() {
        let t = ChatTemplate::new("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0]['content'].strip() | tojson }}").unwrap();
        assert_eq!(
            t.render(&[msg("user", " a\"é ")], false, "", "").unwrap(),
            "\"a\\\"é\""
        );
        let e = t
            .render(&[msg("assistant", "x")], false, "", "")
            .unwrap_err();
        assert!(e.contains("first must be user"), "{e}");
    }

    /// `strftime_now` formats as C's strftime does (here through `date`), so the date a
    /// Llama 3.2 system header shows is today's, not the template's fallback.
    #[test]
    fn strftime_now_is_today() {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}").unwrap();
        let ours = t.render(&[msg("user", "x")], false, "", "").unwrap();
        let out = std::process::Command::new("date")
            .arg("+%d %b %Y")
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        let theirs = String::from_utf8(out.stdout).unwrap();
        assert_eq!(ours, theirs.trim_end());
    }

    #[test]
    fn tojson_uses_python_separators() {
        let mut out = String::new();
        python_json(
            &serde_json::json!({"a": [1, "x"], "b": {"c": null}}),
            &mut out,
        );
        assert_eq!(out, r#"{"a": [1, "x"], "b": {"c": null}}"#);
    }
}
