//! A task's documents and prompts, as lm-eval 0.4 builds them (`ConfigurableTask`):
//! `doc_to_text` / `doc_to_target` / `doc_to_choice`, the few-shot pool and its samplers,
//! the context (description, shots, the document), the requests, and the gold answers.

use std::collections::HashSet;
use std::path::Path;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use rand::seq::index::sample;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::config::{DocField, FewshotConfig, OutputType, Sampler, TaskConfig};
use super::filters::python_regex;
use super::yaml::field_error;
use crate::error::{DataError, Result};
use crate::rows::type_name;

pub type Doc = Map<String, Value>;

/// What `doc_to_text` gives: the text, or (a multiple-input task, the cloze form) the
/// index of the right context among the choices.
#[derive(Debug, Clone, PartialEq)]
pub enum Text {
    Str(String),
    Index(i64),
}

/// What `doc_to_target` gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Index(i64),
    Str(String),
    /// Several right answers (indices, or strings for generation).
    List(Vec<Value>),
}

impl Target {
    pub fn to_json(&self) -> Value {
        match self {
            Target::Index(i) => Value::from(*i),
            Target::Str(s) => Value::from(s.clone()),
            Target::List(l) => Value::Array(l.clone()),
        }
    }
}

/// One message of a prompt; `delimiter` follows it when the prompt is plain text.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub role: &'static str,
    pub content: String,
    pub delimiter: String,
}

impl Turn {
    fn new(role: &'static str, content: &str, delimiter: &str) -> Self {
        Turn {
            role,
            content: content.to_string(),
            delimiter: delimiter.to_string(),
        }
    }
}

/// Settings of a run that change prompts.
#[derive(Debug, Clone, Default)]
pub struct PromptOptions {
    /// `--num-fewshot`, over the file's.
    pub num_fewshot: Option<usize>,
    pub system_instruction: Option<String>,
    /// `--apply-chat-template`: the continuation of a choice loses its target delimiter.
    pub chat: bool,
}

pub struct Task {
    pub config: TaskConfig,
    pub num_fewshot: usize,
    /// The evaluated documents (the test split, else the validation split), in order.
    pub docs: Vec<Doc>,
    pool: Vec<Doc>,
    /// Remove the evaluated document from the pool before drawing shots.
    remove_eval_doc: bool,
    features: HashSet<String>,
    /// doc_to_text gives an index: each choice is a context, the target its continuation.
    pub multiple_input: bool,
    env: Environment<'static>,
    options: PromptOptions,
}

/// `[a, 'b', "c", 1]`: a Python list literal as `ast.literal_eval` reads it (strings,
/// numbers), for templates whose text is a list.
pub fn python_list(text: &str) -> Option<Vec<Value>> {
    let s = text.trim();
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    let mut out = vec![];
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek().copied() {
            None => return Some(out),
            Some(q @ ('\'' | '"')) => {
                chars.next();
                let mut item = String::new();
                loop {
                    match chars.next()? {
                        '\\' => item.push(match chars.next()? {
                            'n' => '\n',
                            't' => '\t',
                            c => c,
                        }),
                        c if c == q => break,
                        c => item.push(c),
                    }
                }
                out.push(Value::String(item));
            }
            Some(_) => {
                let item: String = std::iter::from_fn(|| chars.next_if(|&c| c != ',')).collect();
                let v: Value = serde_json::from_str(item.trim())
                    .ok()
                    .filter(Value::is_number)?;
                out.push(v);
            }
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

/// Python's `str()` of a document value.
fn python_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit())
}

/// The documents of a split's files, every row given every field of the split (`null`
/// where it had none, as `datasets` builds a table).
fn read_split(paths: &[std::path::PathBuf]) -> Result<Vec<Doc>> {
    let mut docs = vec![];
    for path in paths {
        docs.extend(crate::rows::read(path, |row| Ok(row.object.clone()))?.into_vec());
    }
    let mut fields: Vec<String> = vec![];
    for d in &docs {
        for k in d.keys() {
            if !fields.contains(k) {
                fields.push(k.clone());
            }
        }
    }
    for d in &mut docs {
        for f in &fields {
            d.entry(f.clone()).or_insert(Value::Null);
        }
    }
    Ok(docs)
}

fn jinja_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // lm-eval's one custom filter: `re.sub(pattern, repl, string, count)`.
    env.add_filter(
        "regex_replace",
        |s: String,
         pattern: String,
         repl: String,
         count: Option<usize>|
         -> std::result::Result<String, minijinja::Error> {
            let re = python_regex(&pattern)
                .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e))?;
            // Python's \1 and \g<name> group references.
            let repl = fancy_regex::Regex::new(r"\\g<(\w+)>|\\(\d+)")
                .expect("valid")
                .replace_all(&repl, "$${$1$2}")
                .into_owned();
            Ok(re
                .replacen(&s, count.unwrap_or(0), repl.as_str())
                .into_owned())
        },
    );
    env
}

/// The Jinja environment with every template of `config` compiled (named by its source).
fn templates(config: &TaskConfig) -> Result<Environment<'static>> {
    let mut env = jinja_env();
    let fs = &config.fewshot;
    let description = DocField::Text(config.description.clone());
    let fields = [
        &config.doc_to_text,
        &config.doc_to_target,
        &fs.doc_to_text,
        &fs.doc_to_target,
        &description,
    ]
    .into_iter()
    .chain(config.doc_to_choice.iter())
    .chain(fs.doc_to_choice.iter());
    for field in fields {
        if let DocField::Text(src) = field {
            env.add_template_owned(src.clone(), src.clone())
                .map_err(|e| {
                    DataError::file(
                        &config.file,
                        format!("template {src:?} does not parse: {e}"),
                    )
                })?;
        }
    }
    Ok(env)
}

impl Task {
    pub fn load(path: &Path, options: &PromptOptions) -> Result<Task> {
        let config = TaskConfig::load(path)?;
        let split = |name: &str| -> Result<Vec<Doc>> {
            match config.data.0.iter().find(|(s, _)| s == name) {
                Some((_, files)) => read_split(files),
                None => Err(field_error(
                    path,
                    "dataset_kwargs.data_files",
                    format!(
                        "has no split '{name}' (it has {})",
                        config
                            .data
                            .0
                            .iter()
                            .map(|(s, _)| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        };
        let eval_split = config.eval_split().to_string();
        let docs = split(&eval_split)?;
        let num_fewshot = options.num_fewshot.unwrap_or(config.num_fewshot);
        let fs = &config.fewshot;
        // lm-eval's few-shot pool: the few-shot split, else the inline samples, else the
        // training, validation or test split.
        let (pool, pool_split) = if let Some(s) = &fs.split {
            (split(s)?, Some(s.clone()))
        } else if let Some(samples) = &fs.samples {
            (samples.clone(), None)
        } else {
            let s = [
                &config.training_split,
                &config.validation_split,
                &config.test_split,
            ]
            .into_iter()
            .flatten()
            .next()
            .expect("checked at load")
            .clone();
            (split(&s)?, Some(s))
        };
        let remove_eval_doc = fs.split == config.test_split;
        if num_fewshot > 0 && !remove_eval_doc && pool_split.as_deref() == Some(eval_split.as_str())
        {
            return Err(field_error(
                path,
                "fewshot_split",
                format!("shots would come from the evaluated split '{eval_split}' without removing the evaluated document; set fewshot_split: {eval_split} (it is then removed), or give another split or fewshot_config.samples"),
            ));
        }
        let env = templates(&config)?;
        let features = docs
            .first()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default();
        let mut task = Task {
            config,
            num_fewshot,
            docs,
            pool,
            remove_eval_doc,
            features,
            multiple_input: false,
            env,
            options: options.clone(),
        };
        if task.docs.is_empty() {
            return Err(DataError::file(
                path,
                format!("split '{eval_split}' has no documents"),
            ));
        }
        task.multiple_input = matches!(task.doc_to_text(&task.docs[0], None)?, Text::Index(_))
            && task.config.doc_to_choice.is_some();
        Ok(task)
    }

    fn error(&self, field: &str, message: impl Into<String>) -> DataError {
        field_error(&self.config.file, field, message)
    }

    fn render(&self, template: &str, doc: &Doc, field: &str) -> Result<String> {
        let t = self.env.get_template(template).expect("added at load");
        t.render(minijinja::Value::from_serialize(doc))
            .map_err(|e| self.error(field, format!("{e}")))
    }

    /// A field's value when `setting` names one of the documents' fields.
    fn feature<'d>(&self, doc: &'d Doc, setting: &str) -> Option<&'d Value> {
        self.features
            .contains(setting)
            .then(|| doc.get(setting))
            .flatten()
    }

    fn has_choices(&self) -> bool {
        self.config.doc_to_choice.is_some()
    }

    pub fn doc_to_text(&self, doc: &Doc, field: Option<&DocField>) -> Result<Text> {
        let key = "doc_to_text";
        Ok(match field.unwrap_or(&self.config.doc_to_text) {
            DocField::Index(i) => Text::Index(*i),
            DocField::List(_) => return Err(self.error(key, "a list is not a text")),
            DocField::Text(s) => match self.feature(doc, s) {
                Some(Value::Number(n)) if n.is_i64() => Text::Index(n.as_i64().unwrap_or(0)),
                Some(v) => Text::Str(python_str(v)),
                None => {
                    let text = self.render(s, doc, key)?;
                    if is_digits(&text) && self.has_choices() {
                        Text::Index(
                            text.parse()
                                .map_err(|_| self.error(key, "index too large"))?,
                        )
                    } else {
                        Text::Str(text)
                    }
                }
            },
        })
    }

    pub fn doc_to_target(&self, doc: &Doc, field: Option<&DocField>) -> Result<Target> {
        let key = "doc_to_target";
        Ok(match field.unwrap_or(&self.config.doc_to_target) {
            DocField::Index(i) => Target::Index(*i),
            DocField::List(l) => Target::List(l.clone()),
            DocField::Text(s) => match self.feature(doc, s) {
                Some(Value::Number(n)) if n.is_i64() => Target::Index(n.as_i64().unwrap_or(0)),
                Some(Value::Array(a)) => Target::List(a.clone()),
                Some(v) => Target::Str(python_str(v)),
                None => {
                    let text = self.render(s, doc, key)?;
                    if is_digits(&text) && self.has_choices() {
                        Target::Index(
                            text.parse()
                                .map_err(|_| self.error(key, "index too large"))?,
                        )
                    } else if text.len() >= 2 && text.starts_with('[') && text.ends_with(']') {
                        python_list(&text).map_or(Target::Str(text), Target::List)
                    } else {
                        Target::Str(text)
                    }
                }
            },
        })
    }

    pub fn doc_to_choice(&self, doc: &Doc, field: Option<&DocField>) -> Result<Vec<String>> {
        let key = "doc_to_choice";
        let list = match field.or(self.config.doc_to_choice.as_ref()) {
            None => return Err(self.error(key, "missing")),
            Some(DocField::List(l)) => l.clone(),
            Some(DocField::Index(_)) => return Err(self.error(key, "expected a list")),
            Some(DocField::Text(s)) => match self.feature(doc, s) {
                Some(Value::Array(a)) => a.clone(),
                Some(other) => {
                    return Err(self.error(
                        key,
                        format!("field '{s}' is {}, not a list", type_name(other)),
                    ))
                }
                None => {
                    let text = self.render(s, doc, key)?;
                    python_list(&text).ok_or_else(|| {
                        self.error(key, format!("renders to {text:?}, not a list literal"))
                    })?
                }
            },
        };
        Ok(list.iter().map(python_str).collect())
    }

    /// The shots for document `i`: `first_n` takes the pool's first n; `default` draws n
    /// with `rng` (one generator for the whole run, advanced document by document). The
    /// evaluated document is removed from the pool first when the few-shot split is the
    /// test split.
    pub fn shots(&self, i: usize, rng: &mut rand::rngs::StdRng) -> Result<Vec<&Doc>> {
        let n = self.num_fewshot;
        if n == 0 {
            return Ok(vec![]);
        }
        let eval_doc = self.remove_eval_doc.then(|| &self.docs[i]);
        let pool: Vec<&Doc> = self.pool.iter().filter(|d| Some(*d) != eval_doc).collect();
        if pool.len() < n {
            return Err(self.error(
                "num_fewshot",
                format!(
                    "{n} shots asked for, but the few-shot pool has {} documents",
                    pool.len()
                ),
            ));
        }
        Ok(match self.config.fewshot.sampler {
            Sampler::FirstN => pool[..n].to_vec(),
            Sampler::Default => sample(rng, pool.len(), n)
                .into_iter()
                .map(|j| pool[j])
                .collect(),
        })
    }

    /// The turns of a shot (question, then answer) as `build_qa_turn` makes them.
    fn shot_turns(&self, doc: &Doc, fs: &FewshotConfig) -> Result<Vec<Turn>> {
        let q = self.doc_to_text(doc, Some(&fs.doc_to_text))?;
        let choices = match &fs.doc_to_choice {
            Some(f) => Some(self.doc_to_choice(doc, Some(f))?),
            None => None,
        };
        let a = self.doc_to_target(doc, Some(&fs.doc_to_target))?;
        let (q, choices) = match (q, self.multiple_input) {
            (Text::Index(i), true) => {
                let c = choices.unwrap_or_default();
                let q = c.get(i as usize).cloned().ok_or_else(|| {
                    self.error("doc_to_text", format!("index {i} out of the choices"))
                })?;
                (q, None)
            }
            (Text::Str(q), _) => (q, choices),
            (Text::Index(i), false) => {
                return Err(self.error("doc_to_text", format!("gives {i}, not a text")))
            }
        };
        let answer = match (&a, &choices) {
            (Target::Str(s), _) if s.is_empty() => return Ok(vec![Turn::new("user", &q, "")]),
            (Target::Index(i), Some(c)) => c.get(*i as usize).cloned().ok_or_else(|| {
                self.error("doc_to_target", format!("index {i} out of the choices"))
            })?,
            (Target::List(l), _) => match l.first() {
                Some(Value::String(s)) => s.clone(),
                _ => {
                    return Err(self.error(
                        "doc_to_target",
                        "a shot's answer must be a string (lm-eval asserts so)",
                    ))
                }
            },
            (Target::Str(s), _) => s.clone(),
            (Target::Index(i), None) => {
                return Err(self.error(
                    "doc_to_target",
                    format!("gives {i} for a shot: an index needs doc_to_choice"),
                ))
            }
        };
        Ok(vec![
            Turn::new("user", &q, &fs.target_delimiter),
            Turn::new("assistant", &answer, &fs.fewshot_delimiter),
        ])
    }

    /// The system turn (the instruction and the description) and the shots' turns.
    fn prefix_turns(&self, doc: &Doc, shots: &[&Doc]) -> Result<Vec<Turn>> {
        let description = match self.feature(doc, &self.config.description) {
            Some(v) if !self.config.description.is_empty() => python_str(v),
            _ => self.render(&self.config.description, doc, "description")?,
        };
        let system = maybe_delimit(
            self.options.system_instruction.as_deref().unwrap_or(""),
            &description,
            &self.config.fewshot_delimiter,
        );
        let mut turns = vec![];
        if !system.is_empty() {
            turns.push(Turn::new("system", &system, ""));
        }
        for shot in shots {
            turns.extend(self.shot_turns(shot, &self.config.fewshot)?);
        }
        Ok(turns)
    }

    /// The prompts of a document as turns: one, or one per choice for a multiple-input
    /// task (the cloze form).
    pub fn prompts(&self, doc: &Doc, shots: &[&Doc]) -> Result<Vec<Vec<Turn>>> {
        let prefix = self.prefix_turns(doc, shots)?;
        let with = |q: &str| {
            let mut t = prefix.clone();
            t.push(Turn::new("user", q, ""));
            t
        };
        match self.doc_to_text(doc, None)? {
            Text::Str(q) => Ok(vec![with(&q)]),
            Text::Index(_) if self.multiple_input => Ok(self
                .doc_to_choice(doc, None)?
                .iter()
                .map(|c| with(c))
                .collect()),
            Text::Index(i) => Err(self.error("doc_to_text", format!("gives {i}, not a text"))),
        }
    }

    /// The (context, continuation) pairs scored for a document whose contexts are
    /// `contexts` (as [`Task::prompts`] gave them, rendered).
    pub fn loglikelihood_requests(
        &self,
        doc: &Doc,
        contexts: &[String],
    ) -> Result<Vec<(String, String)>> {
        let delim = if self.options.chat {
            ""
        } else {
            self.config.target_delimiter.as_str()
        };
        match self.config.output_type {
            OutputType::Loglikelihood => match self.doc_to_target(doc, None)? {
                Target::Str(t) => Ok(vec![(contexts[0].clone(), t)]),
                other => Err(self.error(
                    "doc_to_target",
                    format!("loglikelihood scores a text, got {other:?}"),
                )),
            },
            OutputType::MultipleChoice if self.multiple_input => {
                match self.doc_to_target(doc, None)? {
                    Target::Str(t) => Ok(contexts
                        .iter()
                        .map(|c| (c.clone(), format!("{delim}{t}")))
                        .collect()),
                    other => Err(self.error(
                        "doc_to_target",
                        format!(
                        "a multiple-input task's target is the continuation text, got {other:?}"
                    ),
                    )),
                }
            }
            OutputType::MultipleChoice => Ok(self
                .doc_to_choice(doc, None)?
                .into_iter()
                .map(|c| (contexts[0].clone(), format!("{delim}{c}")))
                .collect()),
            OutputType::GenerateUntil => Ok(vec![]),
        }
    }

    /// The indices of the right choices of a multiple-choice document (none when the gold
    /// is not among them; lm-eval then scores 0).
    pub fn gold_choices(&self, doc: &Doc) -> Result<Vec<usize>> {
        let n = self.doc_to_choice(doc, None)?.len() as i64;
        let index = |i: i64| (0..n).contains(&i).then_some(i as usize);
        if self.multiple_input {
            return Ok(match self.doc_to_text(doc, None)? {
                Text::Index(i) => index(i).into_iter().collect(),
                Text::Str(_) => vec![],
            });
        }
        Ok(match self.doc_to_target(doc, None)? {
            Target::Index(i) => index(i).into_iter().collect(),
            Target::Str(s) => {
                let choices = self.doc_to_choice(doc, None)?;
                choices.iter().position(|c| *c == s).into_iter().collect()
            }
            Target::List(l) => l
                .iter()
                .filter_map(Value::as_i64)
                .filter_map(index)
                .collect(),
        })
    }

    /// The strings a generation is compared with (any of them counts).
    pub fn gold_texts(&self, doc: &Doc) -> Result<Vec<String>> {
        let target = self.doc_to_target(doc, None)?;
        if self.has_choices() {
            let choices = self.doc_to_choice(doc, None)?;
            return match target {
                Target::Index(i) => choices
                    .get(i as usize)
                    .cloned()
                    .map(|c| vec![c])
                    .ok_or_else(|| {
                        self.error("doc_to_target", format!("index {i} out of the choices"))
                    }),
                other => Err(self.error(
                    "doc_to_target",
                    format!("with doc_to_choice the target is an index, got {other:?}"),
                )),
            };
        }
        Ok(match target {
            Target::Index(i) => vec![i.to_string()],
            Target::Str(s) => vec![s],
            Target::List(l) => l.iter().map(python_str).collect(),
        })
    }

    /// A generator for the `default` sampler.
    pub fn shot_rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }
}

/// lm-eval's `maybe_delimit`: joined with `delimiter` unless either side already has
/// whitespace at the join.
pub fn maybe_delimit(prefix: &str, suffix: &str, delimiter: &str) -> String {
    if prefix.is_empty() {
        return suffix.to_string();
    }
    if suffix.is_empty() {
        return prefix.to_string();
    }
    let ws = prefix.ends_with(char::is_whitespace) || suffix.starts_with(char::is_whitespace);
    if ws {
        format!("{prefix}{suffix}")
    } else {
        format!("{prefix}{delimiter}{suffix}")
    }
}

/// The plain-text prompt: every turn followed by its delimiter.
pub fn plain_text(turns: &[Turn]) -> String {
    turns
        .iter()
        .map(|t| format!("{}{}", t.content, t.delimiter))
        .collect()
}

/// The messages handed to a chat template: the turns as they are (`--fewshot-as-multiturn`),
/// or (lm-eval's default) the system turn and one user turn holding everything else as
/// plain text.
pub fn chat_messages(turns: &[Turn], multiturn: bool) -> Vec<(&'static str, String)> {
    if multiturn {
        return turns.iter().map(|t| (t.role, t.content.clone())).collect();
    }
    let (system, rest) = match turns.first() {
        Some(t) if t.role == "system" => (Some(t), &turns[1..]),
        _ => (None, turns),
    };
    let mut rest = rest.to_vec();
    if let Some(last) = rest.last_mut() {
        last.delimiter.clear();
    }
    system
        .map(|s| ("system", s.content.clone()))
        .into_iter()
        .chain(std::iter::once(("user", plain_text(&rest))))
        .collect()
}

/// lm-eval's `_encode_pair` split: trailing whitespace of the context moves to the start
/// of the continuation.
pub fn move_trailing_space(context: &str, continuation: &str) -> (String, String) {
    let trimmed = context.trim_end_matches(char::is_whitespace);
    let space = &context[trimmed.len()..];
    (trimmed.to_string(), format!("{space}{continuation}"))
}
