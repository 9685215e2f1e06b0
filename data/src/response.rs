//! A model's answer read back into a chat message, as `transformers`' response templates
//! read it (`tokenizer.parse_response`, `utils/chat_parsing/`): the text the model wrote after
//! its turn began — the prompt's part after the template's start anchor, then the answer,
//! special tokens kept — is cut into regions (reasoning, each tool call, the content…), each
//! opened and closed by its delimiters, and each region's text is read by its parser (text,
//! JSON or a JSON dialect, key/value tags, lines) into its field, reshaped by its
//! `transform`. A template comes from a tokenizer's own `response_template`
//! (`tokenizer_config.json`) or is one TRL's `add_response_schema` gives a chat template it
//! knows ([`builtin_json`]). [`ResponseTemplate::message`] then does what TRL's
//! `parse_response` adds: the EOS token off the content, a call without a name makes the
//! whole answer plain text, as does anything that cannot be read.
//!
//! The parser reads the prompt's part first and then the answer, as transformers streams
//! them, because a `$` in a delimiter matches at the end of what it has read so far.
//! Patterns are Python's: compiled with `.` matching newlines, and `$` matching at the end or
//! before a final newline.

use fancy_regex::Regex;
use serde_json::{json, Map, Value};

/// A delimiter: a pattern, or literal texts (which, fully read, cannot grow into a longer
/// match unless one of them begins another).
struct Delim {
    re: Regex,
    literal: bool,
    can_extend: bool,
    /// The texts a match begins with (the literals; a pattern's literal start, if any), and
    /// whether a match goes on after them (a pattern's): what may be the start of a match
    /// that more text would complete.
    starts: Vec<String>,
    more: bool,
    /// For a pattern that looks ahead: the literal texts in it, whose coming would let it
    /// match where it does not yet (Python's partial match reaches the end looking).
    probes: Vec<String>,
    /// A pattern that is only `(?=[\s\S]*?TEXT)` (Nemotron's and DeepSeek-R1's reasoning
    /// opens): TEXT, found at once rather than by a backtracking search from every place.
    ahead: Option<String>,
}

/// A match: where it starts and ends, and what its named groups captured.
type Found = (usize, usize, Map<String, Value>);

impl Delim {
    /// The first match in `buffer` from `pos`.
    fn find(&self, buffer: &str, pos: usize) -> Option<Found> {
        if let Some(text) = &self.ahead {
            return buffer[pos..]
                .contains(text.as_str())
                .then(|| (pos, pos, Map::new()));
        }
        let caps = self.re.captures_from_pos(buffer, pos).ok().flatten()?;
        let m = caps.get(0).expect("the whole match");
        let named = self
            .re
            .capture_names()
            .flatten()
            .filter_map(|n| Some((n.to_string(), caps.name(n)?.as_str().into())))
            .collect();
        Some((m.start(), m.end(), named))
    }

    /// Where, from `pos`, the end of `buffer` may be a match cut short: a proper beginning of
    /// one of its starts (or a whole one, where a match goes on after it). `found`: where
    /// the first whole match from `pos` starts, if one does.
    fn partial(&self, buffer: &str, pos: usize, found: Option<usize>) -> Option<usize> {
        self.starts
            .iter()
            .flat_map(|start| {
                let whole = usize::from(self.more);
                (1..start.len() + whole)
                    .filter(|&k| start.is_char_boundary(k))
                    .filter(|&k| buffer.ends_with(&start[..k]))
                    .map(|k| buffer.len() - k)
            })
            .chain(self.probes.iter().filter_map(|probe| {
                let later = self.find(&format!("{buffer}{probe}"), pos)?.0;
                let new = found.is_none_or(|start| start > later);
                (new && later <= buffer.len()).then_some(later)
            }))
            .filter(|&p| p >= pos)
            .min()
    }
}

/// What one piece of a Python pattern is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PieceKind {
    /// A character that matches itself: a plain one, an escaped punctuation mark, `\n` or
    /// `\t`.
    Literal(char),
    /// Any other escape (`\d`, `\s`, `\b`, `\Z`, a back-reference): its letter.
    Escape(char),
    /// A character class, `[…]`.
    Class,
    /// `.`, `^`, `$`, `*`, `+`, `?`, `{`, `}`, `|`, `(` or `)`.
    Meta(char),
}

/// A Python pattern cut into its pieces, each with its text as written. The one reading
/// of the pattern's syntax that [`python_regex`], [`literal_start`] and [`literal_runs`]
/// share.
fn pieces(pattern: &str) -> Vec<(PieceKind, &str)> {
    let mut out = vec![];
    let mut chars = pattern.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let kind = match c {
            '\\' => match chars.next() {
                Some((_, 'n')) => PieceKind::Literal('\n'),
                Some((_, 't')) => PieceKind::Literal('\t'),
                Some((_, e)) if !e.is_alphanumeric() => PieceKind::Literal(e),
                Some((_, e)) => PieceKind::Escape(e),
                None => PieceKind::Literal('\\'),
            },
            '[' => {
                // A `^` first negates; a `]` first (after it) is a character of the class.
                chars.next_if(|&(_, c)| c == '^');
                chars.next_if(|&(_, c)| c == ']');
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        ']' => break,
                        _ => {}
                    }
                }
                PieceKind::Class
            }
            '.' | '^' | '$' | '*' | '+' | '?' | '{' | '}' | '|' | '(' | ')' => PieceKind::Meta(c),
            other => PieceKind::Literal(other),
        };
        let end = chars.peek().map_or(pattern.len(), |&(i, _)| i);
        out.push((kind, &pattern[at..end]));
    }
    out
}

/// Whether a piece makes the one before it optional or repeated (`*`, `?`, `{m,n}`; `+`
/// keeps at least one).
fn may_drop(next: Option<&(PieceKind, &str)>) -> bool {
    matches!(next, Some((PieceKind::Meta('*' | '?' | '{'), _)))
}

/// The runs of two or more literal characters every match of a Python pattern's branch
/// contains (a character a quantifier may drop left out).
fn literal_runs(pattern: &str) -> Vec<String> {
    let pieces = pieces(pattern);
    let (mut runs, mut run) = (vec![], String::new());
    let mut end = |run: &mut String| {
        if run.chars().count() >= 2 {
            runs.push(run.clone());
        }
        run.clear();
    };
    for (i, (kind, _)) in pieces.iter().enumerate() {
        match kind {
            PieceKind::Literal(c) if !may_drop(pieces.get(i + 1)) => run.push(*c),
            _ => end(&mut run),
        }
    }
    end(&mut run);
    runs
}

/// The literal text a Python pattern's matches all begin with (up to its first piece that
/// is not a literal character; a character a quantifier may drop left out); nothing where
/// the pattern is an alternation at its top.
fn literal_start(pattern: &str) -> String {
    let pieces = pieces(pattern);
    let mut depth = 0;
    for (kind, _) in &pieces {
        match kind {
            PieceKind::Meta('(') => depth += 1,
            PieceKind::Meta(')') => depth -= 1,
            PieceKind::Meta('|') if depth == 0 => return String::new(),
            _ => {}
        }
    }
    pieces
        .iter()
        .enumerate()
        .map_while(|(i, (kind, _))| match kind {
            PieceKind::Literal(c) if !may_drop(pieces.get(i + 1)) => Some(*c),
            _ => None,
        })
        .collect()
}

/// A pattern as Python's `re.compile(pattern, re.DOTALL)` reads it: `\Z` is the end of the
/// text, `$` the end or before a final newline, and a `]` first in a class one of its
/// characters.
fn python_regex(pattern: &str) -> Result<Regex, String> {
    let mut out = String::from("(?s)");
    for (kind, raw) in pieces(pattern) {
        match kind {
            PieceKind::Escape('Z') => out.push_str("\\z"),
            PieceKind::Meta('$') => out.push_str("(?=\\n?\\z)"),
            PieceKind::Class => {
                let negated = raw.starts_with("[^");
                let body = &raw[1 + usize::from(negated)..];
                out.push_str(if negated { "[^" } else { "[" });
                match body.strip_prefix(']') {
                    Some(rest) => {
                        out.push_str("\\]");
                        out.push_str(rest);
                    }
                    None => out.push_str(body),
                }
            }
            _ => out.push_str(raw),
        }
    }
    Regex::new(&out).map_err(|e| format!("invalid pattern {pattern:?}: {e}"))
}

/// How a region's text becomes its value (transformers' content parsers).
enum Parser {
    /// The text, stripped unless `strip` is false.
    Text {
        strip: bool,
    },
    Int {
        strip: bool,
    },
    Float {
        strip: bool,
    },
    Bool {
        strip: bool,
    },
    /// JSON, with the dialect's knobs: strings between custom marks, bare keys, the text
    /// itself where it is not JSON.
    Json {
        /// Each pair of marks as the pattern that finds a string between them.
        string_delims: Vec<Regex>,
        unquoted_keys: bool,
        allow_non_json: bool,
        strip: bool,
    },
    /// Tags with a `key` and a `value` each: an object of them.
    Tags {
        tag: Regex,
        value: Option<Box<Parser>>,
        merge_duplicates: bool,
    },
    /// `key<sep>value` lines: an object of them.
    KvLines {
        line_sep: String,
        kv_sep: String,
        value: Option<Box<Parser>>,
        strip: bool,
    },
}

/// One field of the message.
struct Field {
    name: String,
    /// Where it opens; none: the implicit region, where text outside every other goes.
    open: Option<Delim>,
    close: Option<Delim>,
    parser: Parser,
    /// Each occurrence appended to a list (or joined with `join`), else the last one kept.
    repeats: bool,
    join: Option<String>,
    optional: bool,
    /// The value's shape, `{placeholder}`s filled from the opening's named captures and
    /// `content`.
    transform: Option<Value>,
    transform_each: bool,
}

/// A response template.
pub struct ResponseTemplate {
    defaults: Map<String, Value>,
    anchor: Regex,
    fields: Vec<Field>,
    implicit: Option<usize>,
}

impl std::fmt::Debug for ResponseTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
        write!(f, "ResponseTemplate {names:?}")
    }
}

/// A delimiter from a spec's `KEY` (a literal or a list of them) or `KEY_pattern`.
fn delim(spec: &Map<String, Value>, key: &str, what: &str) -> Result<Option<Delim>, String> {
    let pattern_key = format!("{key}_pattern");
    match (spec.get(key), spec.get(&pattern_key)) {
        (Some(_), Some(_)) => Err(format!("{what}: both '{key}' and '{pattern_key}'")),
        (Some(literals), None) => {
            let list: Vec<String> = match literals {
                Value::String(s) => vec![s.clone()],
                Value::Array(items) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or(format!("{what}: '{key}' must be strings"))?,
                _ => {
                    return Err(format!(
                        "{what}: '{key}' must be a string or a list of them"
                    ))
                }
            };
            if list.is_empty() || list.iter().any(String::is_empty) {
                return Err(format!("{what}: '{key}' needs non-empty literals"));
            }
            let mut unique: Vec<String> = vec![];
            for l in list {
                if !unique.contains(&l) {
                    unique.push(l);
                }
            }
            let mut list = unique;
            let can_extend = list
                .iter()
                .any(|a| list.iter().any(|b| a != b && a.starts_with(b.as_str())));
            list.sort_by_key(|s| std::cmp::Reverse(s.len()));
            let alternatives: Vec<String> =
                list.iter().map(|s| fancy_regex::escape(s).into()).collect();
            let re = Regex::new(&format!("(?s){}", alternatives.join("|")))
                .map_err(|e| format!("{what}: {e}"))?;
            Ok(Some(Delim {
                re,
                literal: true,
                can_extend,
                starts: list,
                more: false,
                probes: vec![],
                ahead: None,
            }))
        }
        (None, Some(Value::String(p))) => {
            let start = literal_start(p);
            Ok(Some(Delim {
                re: python_regex(p).map_err(|e| format!("{what}: {e}"))?,
                literal: false,
                can_extend: false,
                starts: (!start.is_empty()).then_some(start).into_iter().collect(),
                more: true,
                probes: match p.contains("(?=") {
                    true => literal_runs(p),
                    false => vec![],
                },
                ahead: p
                    .strip_prefix(r"(?=[\s\S]*?")
                    .and_then(|rest| rest.strip_suffix(')'))
                    .filter(|text| literal_runs(text).concat() == **text && !text.contains('\\'))
                    .map(str::to_string),
            }))
        }
        (None, Some(_)) => Err(format!("{what}: '{pattern_key}' must be a string")),
        (None, None) => Ok(None),
    }
}

impl Parser {
    fn of(name: &str, args: &Map<String, Value>, what: &str) -> Result<Parser, String> {
        let strip = args.get("strip").and_then(Value::as_bool).unwrap_or(true);
        let sub = |key: &str| -> Result<Option<Box<Parser>>, String> {
            match args.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(p)) => {
                    let name = p.get("name").and_then(Value::as_str).unwrap_or("text");
                    let args = p
                        .get("args")
                        .and_then(Value::as_object)
                        .cloned()
                        .unwrap_or_default();
                    Ok(Some(Box::new(Parser::of(name, &args, what)?)))
                }
                Some(_) => Err(format!("{what}: '{key}' must be an object")),
            }
        };
        Ok(match name {
            "text" => Parser::Text { strip },
            "int" => Parser::Int { strip },
            "float" => Parser::Float { strip },
            "bool" => Parser::Bool { strip },
            "json" => Parser::Json {
                string_delims: args
                    .get("string_delims")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|pair| match pair.as_array().map(Vec::as_slice) {
                        Some([Value::String(open), Value::String(close)]) => Regex::new(&format!(
                            "(?s){}(.*?){}",
                            fancy_regex::escape(open),
                            fancy_regex::escape(close)
                        ))
                        .map_err(|e| format!("{what}: {e}")),
                        _ => Err(format!("{what}: string_delims are [open, close] pairs")),
                    })
                    .collect::<Result<_, _>>()?,
                unquoted_keys: args.get("unquoted_keys").and_then(Value::as_bool) == Some(true),
                allow_non_json: args.get("allow_non_json").and_then(Value::as_bool) == Some(true),
                strip,
            },
            "xml-inline" => Parser::Tags {
                tag: python_regex(
                    args.get("tag_pattern")
                        .and_then(Value::as_str)
                        .ok_or(format!("{what}: xml-inline needs a 'tag_pattern'"))?,
                )?,
                value: sub("value_parser")?,
                merge_duplicates: args.get("merge_duplicates").and_then(Value::as_bool)
                    == Some(true),
            },
            "kv-lines" => Parser::KvLines {
                line_sep: args
                    .get("line_sep")
                    .and_then(Value::as_str)
                    .unwrap_or("\n")
                    .into(),
                kv_sep: args
                    .get("kv_sep")
                    .and_then(Value::as_str)
                    .unwrap_or(":")
                    .into(),
                value: sub("value_parser")?,
                strip,
            },
            other => return Err(format!("{what}: unknown content parser '{other}'")),
        })
    }

    /// The value of `text`; `None` where it cannot be read (Python's `ValueError`).
    fn read(&self, text: &str) -> Option<Value> {
        let stripped = |strip: bool| if strip { text.trim() } else { text };
        match self {
            Parser::Text { strip } => Some(stripped(*strip).into()),
            Parser::Int { strip } => python_int(stripped(*strip)).map(Value::from),
            Parser::Float { strip } => python_float(stripped(*strip)).map(Value::from),
            Parser::Bool { strip } => {
                let t = stripped(*strip).to_lowercase();
                Some(Value::Bool(t == "true" || t == "1"))
            }
            Parser::Json {
                string_delims,
                unquoted_keys,
                allow_non_json,
                strip,
            } => match dialect_json(text, string_delims, *unquoted_keys) {
                Some(v) => Some(v),
                None if *allow_non_json => Some(stripped(*strip).into()),
                None => None,
            },
            Parser::Tags {
                tag,
                value,
                merge_duplicates,
            } => {
                let mut out = Map::new();
                for caps in tag.captures_iter(text) {
                    let caps = caps.ok()?;
                    let key = caps.name("key")?.as_str().to_string();
                    let raw = caps.name("value").map_or("", |m| m.as_str());
                    let v = match value {
                        Some(p) => p.read(raw)?,
                        None => raw.into(),
                    };
                    match out.get_mut(&key) {
                        Some(Value::Array(list)) if *merge_duplicates => list.push(v),
                        Some(old) if *merge_duplicates => *old = json!([old.take(), v]),
                        _ => {
                            out.insert(key, v);
                        }
                    }
                }
                Some(Value::Object(out))
            }
            Parser::KvLines {
                line_sep,
                kv_sep,
                value,
                strip,
            } => {
                let s = |t: &str| {
                    if *strip {
                        t.trim().to_string()
                    } else {
                        t.to_string()
                    }
                };
                let mut out = Map::new();
                for line in text.split(line_sep.as_str()) {
                    let line = s(line);
                    let Some((k, v)) = line.split_once(kv_sep.as_str()) else {
                        continue;
                    };
                    let v = match value {
                        Some(p) => p.read(&s(v))?,
                        None => s(v).into(),
                    };
                    out.insert(s(k), v);
                }
                Some(Value::Object(out))
            }
        }
    }
}

/// transformers' JSON parser: strings between custom marks set aside, bare keys quoted (after
/// `{` or `,`), the strings put back as JSON strings, then read.
fn dialect_json(text: &str, delims: &[Regex], unquoted_keys: bool) -> Option<Value> {
    if !delims.is_empty() && text.contains(['\x01', '\x02']) {
        return None;
    }
    let mut working = text.to_string();
    let mut strings: Vec<String> = vec![];
    for re in delims {
        working = replace_all(re, &working, |caps| {
            strings.push(caps.get(1).map_or("", |m| m.as_str()).to_string());
            format!("\x01{}\x02", strings.len() - 1)
        })?;
    }
    if unquoted_keys {
        static KEY: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
        let key = KEY.get_or_init(|| Regex::new(r"(?<=[{,])(\w+):").expect("valid"));
        working = replace_all(key, &working, |caps| format!("\"{}\":", &caps[1]))?;
    }
    for (i, s) in strings.iter().enumerate() {
        working = working.replace(
            &format!("\x01{i}\x02"),
            &Value::from(s.as_str()).to_string(),
        );
    }
    serde_json::from_str(&working).ok()
}

/// Every match of `re` in `text` replaced by `with` of its captures.
fn replace_all(
    re: &Regex,
    text: &str,
    mut with: impl FnMut(&fancy_regex::Captures) -> String,
) -> Option<String> {
    let (mut out, mut last) = (String::new(), 0);
    for caps in re.captures_iter(text) {
        let caps = caps.ok()?;
        let m = caps.get(0).expect("the whole match");
        out.push_str(&text[last..m.start()]);
        out.push_str(&with(&caps));
        last = m.end();
    }
    out.push_str(&text[last..]);
    Some(out)
}

/// A transform template filled: a `"{path}"` string is the value at that dotted path of
/// `scope`; `None` where a path is missing.
fn transformed(template: &Value, scope: &Map<String, Value>) -> Option<Value> {
    Some(match template {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| Some((k.clone(), transformed(v, scope)?)))
                .collect::<Option<_>>()?,
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| transformed(v, scope))
                .collect::<Option<_>>()?,
        ),
        Value::String(s) => {
            let path = s.strip_prefix('{').and_then(|p| p.strip_suffix('}'));
            let path = path.filter(|p| {
                !p.is_empty()
                    && p.split('.').all(|part| {
                        !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_')
                    })
            });
            match path {
                None => template.clone(),
                Some(path) => {
                    let mut parts = path.split('.');
                    let mut value = scope.get(parts.next()?)?;
                    for part in parts {
                        value = value.as_object()?.get(part)?;
                    }
                    value.clone()
                }
            }
        }
        other => other.clone(),
    })
}

/// A delimiter found: its order (start, longest first, opening first, field name), its
/// field, where it ends and what an opening's named groups captured.
type Candidate<'k> = (
    (usize, std::cmp::Reverse<usize>, bool, &'k str),
    usize,
    (usize, Map<String, Value>),
);

/// The template's parser over one text: transformers' `ResponseParser`.
struct Reading<'t> {
    template: &'t ResponseTemplate,
    parameters: &'t Parameters,
    buffer: String,
    pos: usize,
    out: Map<String, Value>,
    current: Option<usize>,
    captures: Map<String, Value>,
    body: String,
    opened: bool,
}

impl Reading<'_> {
    /// Reads what the buffer holds (`eos`: all of it; else what more text could not
    /// change). `None` where a region's text cannot be read.
    fn process(&mut self, eos: bool) -> Option<()> {
        let t = self.template;
        loop {
            let watched: Vec<(usize, bool)> = match self.current {
                Some(c) if self.current != t.implicit => match t.fields[c].close {
                    Some(_) => vec![(c, false)],
                    None => vec![],
                },
                _ => (0..t.fields.len())
                    .filter(|&i| t.fields[i].open.is_some())
                    .map(|i| (i, true))
                    .chain(
                        t.implicit
                            .filter(|&i| t.fields[i].close.is_some())
                            .map(|i| (i, false)),
                    )
                    .collect(),
            };
            // The earliest committable delimiter (then the longest, then an opening); one
            // more text could change is pending and holds back those from its start on.
            let mut best: Option<Candidate> = None;
            let mut hold = self.buffer.len();
            for (i, opening) in watched {
                let field = &t.fields[i];
                let d = if opening {
                    field.open.as_ref()
                } else {
                    field.close.as_ref()
                }
                .expect("watched");
                let found = d.find(&self.buffer, self.pos);
                // A match cut short at the end, if none is found before it, holds the text
                // from its start until more comes.
                let first = found.as_ref().map(|(start, ..)| *start);
                let partial = (!eos)
                    .then(|| d.partial(&self.buffer, self.pos, first))
                    .flatten();
                if let Some(p) = partial.filter(|&p| first.is_none_or(|f| p <= f)) {
                    hold = hold.min(p);
                    continue;
                }
                let Some((start, end, named)) = found else {
                    continue;
                };
                let at_edge = end == self.buffer.len();
                let grows = at_edge && (start == end || !d.literal || d.can_extend);
                if !eos && grows {
                    hold = hold.min(start);
                    continue;
                }
                let key = (
                    start,
                    std::cmp::Reverse(end - start),
                    !opening,
                    field.name.as_str(),
                );
                if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                    best = Some((key, i, (end, named)));
                }
            }
            let best = best.filter(|((start, ..), _, _)| *start < hold);
            let Some(((start, _, closing, _), i, (end, named))) = best else {
                // The text up to what is held (all of it at the end) goes to the region.
                let upto = if eos {
                    self.buffer.len()
                } else {
                    hold.max(self.pos)
                };
                let text = self.buffer[self.pos..upto].to_string();
                self.take(&text);
                self.pos = upto;
                if eos {
                    self.close()?;
                }
                return Some(());
            };
            let zero = start == end;
            let before = self.buffer[self.pos..start].to_string();
            self.take(&before);
            self.pos = end;
            if closing {
                let had_text = self.opened;
                self.close()?;
                if !had_text && zero {
                    return Some(());
                }
            } else {
                self.close()?;
                self.current = Some(i);
                self.captures = named;
                self.body.clear();
                self.opened = true;
            }
        }
    }

    /// Text into the current region (none: dropped).
    fn take(&mut self, text: &str) {
        if !text.is_empty() && self.current.is_some() {
            self.body.push_str(text);
            self.opened = true;
        }
    }

    /// Closes the current region, its value into its field if any text opened it.
    fn close(&mut self) -> Option<()> {
        let t = self.template;
        let current = self.current.filter(|_| self.opened);
        let (body, captures) = (
            std::mem::take(&mut self.body),
            std::mem::take(&mut self.captures),
        );
        (self.current, self.opened) = (t.implicit, false);
        let Some(i) = current else {
            return Some(());
        };
        let field = &t.fields[i];
        let content = field.parser.read(&body)?;
        let mut value = match (&field.transform, field.transform_each) {
            (None, _) => content,
            (Some(tr), false) => {
                let mut scope = captures;
                scope.insert("content".into(), content);
                transformed(tr, &scope)?
            }
            (Some(tr), true) => Value::Array(
                content
                    .as_array()?
                    .iter()
                    .map(|item| {
                        let mut scope = captures.clone();
                        scope.extend(item.as_object()?.clone());
                        transformed(tr, &scope)
                    })
                    .collect::<Option<_>>()?,
            ),
        };
        if !self.parameters.is_empty() {
            typed(&mut value, self.parameters);
        }
        let name = field.name.clone();
        if let Some(join) = &field.join {
            let value = value.as_str()?;
            let joined = match self.out.get(&name).and_then(Value::as_str) {
                Some(previous) => format!("{previous}{join}{value}"),
                None => value.to_string(),
            };
            self.out.insert(name, joined.into());
        } else if field.repeats {
            let list = self.out.entry(name).or_insert_with(|| json!([]));
            list.as_array_mut()?.push(value);
        } else {
            self.out.insert(name, value);
        }
        Some(())
    }
}

impl ResponseTemplate {
    /// A template from its JSON (a tokenizer's `response_template`), checked as
    /// transformers' `load_response_template` checks it.
    pub fn from_json(spec: &Value) -> Result<Self, String> {
        let spec = spec
            .as_object()
            .ok_or("a response_template is a JSON object")?;
        if spec.get("version").is_some_and(|v| v != &json!(1)) {
            return Err(format!(
                "unsupported response_template version {}",
                spec["version"]
            ));
        }
        let known = [
            "version",
            "defaults",
            "fields",
            "start_anchor",
            "start_anchor_pattern",
        ];
        if let Some(k) = spec.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!("unknown key '{k}' in response_template"));
        }
        let defaults = match spec.get("defaults") {
            None => Map::new(),
            Some(Value::Object(d)) => d.clone(),
            Some(_) => return Err("response_template.defaults must be an object".into()),
        };
        let raw_fields = spec
            .get("fields")
            .and_then(Value::as_object)
            .filter(|f| !f.is_empty())
            .ok_or("response_template.fields must be a non-empty object")?;
        let mut fields = vec![];
        for (name, raw) in raw_fields {
            let what = format!("response_template field '{name}'");
            let raw = raw.as_object().ok_or(format!("{what} must be an object"))?;
            let allowed = [
                "open",
                "open_pattern",
                "close",
                "close_pattern",
                "content",
                "content_args",
                "repeats",
                "join",
                "optional",
                "transform",
                "transform_each",
            ];
            if let Some(k) = raw.keys().find(|k| !allowed.contains(&k.as_str())) {
                return Err(format!("{what}: unknown key '{k}'"));
            }
            let args = raw
                .get("content_args")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let parser = Parser::of(
                raw.get("content").and_then(Value::as_str).unwrap_or("text"),
                &args,
                &what,
            )?;
            let flag =
                |k: &str, default: bool| raw.get(k).and_then(Value::as_bool).unwrap_or(default);
            let join = raw.get("join").and_then(Value::as_str).map(str::to_string);
            if join.is_some() && !flag("repeats", false) {
                return Err(format!("{what}: 'join' requires 'repeats': true"));
            }
            let transform = raw.get("transform").cloned();
            if flag("transform_each", false) && transform.is_none() {
                return Err(format!("{what}: transform_each without a transform"));
            }
            fields.push(Field {
                name: name.clone(),
                open: delim(raw, "open", &what)?,
                close: delim(raw, "close", &what)?,
                parser,
                repeats: flag("repeats", false),
                join,
                optional: flag("optional", true),
                transform,
                transform_each: flag("transform_each", false),
            });
        }
        let implicit: Vec<usize> = (0..fields.len())
            .filter(|&i| fields[i].open.is_none())
            .collect();
        if implicit.len() > 1 {
            return Err("at most one response_template field may have no opening".into());
        }
        let anchor = delim(spec, "start_anchor", "response_template")?
            .ok_or("response_template needs a start_anchor or start_anchor_pattern")?;
        Ok(ResponseTemplate {
            defaults,
            anchor: anchor.re,
            fields,
            implicit: implicit.first().copied(),
        })
    }

    /// transformers' `parse_response(text, template, prefix=…)`: the message, `None` where
    /// a region cannot be read or a field that is not optional is missing.
    fn parse(
        &self,
        prefix: &str,
        answer: &str,
        parameters: &Parameters,
    ) -> Option<Map<String, Value>> {
        // The prompt's part after its last start anchor (all of it without one).
        let start = self
            .anchor
            .find_iter(prefix)
            .filter_map(Result::ok)
            .last()
            .map_or(0, |m| m.end());
        let mut r = Reading {
            template: self,
            parameters,
            buffer: prefix[start..].to_string(),
            pos: 0,
            out: self.defaults.clone(),
            current: self.implicit,
            captures: Map::new(),
            body: String::new(),
            opened: false,
        };
        if !r.buffer.is_empty() {
            r.process(false)?;
        }
        r.buffer.push_str(answer);
        r.process(false)?;
        r.process(true)?;
        let mut out = r.out;
        if self
            .fields
            .iter()
            .any(|f| !f.optional && !out.contains_key(&f.name))
        {
            return None;
        }
        out.retain(|k, v| {
            self.defaults.contains_key(k)
                || !(v.is_null()
                    || v.as_str() == Some("")
                    || v.as_array().is_some_and(Vec::is_empty)
                    || v.as_object().is_some_and(Map::is_empty))
        });
        Some(out)
    }

    /// TRL's `parse_response`: the message of `answer` (decoded with its special tokens)
    /// after `prefix` (the text before it, decoded likewise) — its content without the EOS
    /// token `eos` at its end, its calls' text arguments typed by `tools` (the schemas the
    /// prompt was rendered with) — or, where it cannot be read or a call has no name,
    /// `{"role": "assistant", "content": plain}` (the answer without special tokens).
    pub fn message(
        &self,
        (prefix, answer): (&str, &str),
        plain: &str,
        eos: Option<&str>,
        tools: Option<&Value>,
    ) -> Value {
        let parameters = tools.map(parameters_of).unwrap_or_default();
        let parsed = self.parse(prefix, answer, &parameters).and_then(|mut m| {
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

    /// [`Self::message`] of an answer's tokens `ids` (with the EOS that ended it) after
    /// `prefix` (the prompt, or everything before the answer), decoded by `tok` as TRL
    /// decodes them.
    pub fn message_of_ids(
        &self,
        tok: &crate::Tokenizer,
        (prefix, ids): (&[i64], &[i64]),
        tools: Option<&Value>,
    ) -> Value {
        self.message(
            (&tok.decode(prefix, false), &tok.decode(ids, false)),
            &tok.decode(ids, true),
            tok.eos_token.as_deref(),
            tools,
        )
    }
}

/// The response templates TRL's `add_response_schema` (1.16) gives the chat templates it
/// knows, by the name of TRL's: `qwen3` (Qwen2.5, Qwen3), `qwen3_5` (Qwen3.5, 3.6, 3.8),
/// `nemotron_3` (Nemotron 3), `llama3` (Llama 3.1, 3.2), `glm4moe`, `gemma4`, `gptoss`,
/// `lfm2_2_5`, `deepseek_r1_distill` (reasoning and content only). The same data as TRL's
/// (the tool test checks they are equal).
pub fn builtin_json(name: &str) -> Option<Value> {
    let think = json!({"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"});
    let call =
        json!({"type": "function", "function": {"name": "{name}", "arguments": "{content}"}});
    let tagged = |open: &str, tag: &str| {
        json!({"open_pattern": open, "close_pattern": r"</tool_call>\s*", "repeats": true,
            "content": "xml-inline",
            "content_args": {"tag_pattern": tag, "value_parser": {"name": "text"}},
            "transform": call})
    };
    let im_end = json!({"close_pattern": r"<\|im_end\|>\s*", "content": "text"});
    Some(match name {
        "qwen3" => {
            json!({"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n",
            "fields": {"reasoning_content": think, "tool_calls": {"open": "<tool_call>",
                "close_pattern": r"</tool_call>\s*", "repeats": true, "content": "json",
                "transform": {"type": "function", "function": "{content}"}},
                "content": im_end}})
        }
        "qwen3_5" => {
            json!({"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n",
            "fields": {"reasoning_content": think,
                "tool_calls": tagged(r"<tool_call>\s*<function=(?P<name>[^\n>]+)>",
                    r"<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>"),
                "content": im_end}})
        }
        "nemotron_3" => {
            json!({"defaults": {"role": "assistant"},
            "start_anchor_pattern": r"<\|im_start\|>assistant\n<think>(?:\n|</think>)?",
            "fields": {"reasoning_content": {"open_pattern": r"(?=[\s\S]*?</think>)",
                    "close_pattern": r"</think>\s*", "content": "text"},
                "tool_calls": tagged(r"<tool_call>\s*<function=(?P<name>[^\n>]+)>",
                    r"<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>"),
                "content": im_end}})
        }
        "deepseek_r1_distill" => json!({"defaults": {"role": "assistant"},
            "start_anchor": "<｜Assistant｜><think>\n",
            "fields": {"reasoning_content": {"open_pattern": r"(?=[\s\S]*?</think>)",
                    "close_pattern": r"</think>\s*", "content": "text"},
                "content": {"close_pattern": r"<｜end▁of▁sentence｜>\s*|$", "content": "text"}}}),
        "llama3" => json!({"defaults": {"role": "assistant"},
            "start_anchor": "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "fields": {"tool_calls": {"open_pattern": r#"\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*"#,
                "close_pattern": r"\}<\|eot_id\|>\s*", "repeats": true, "content": "json", "transform": call},
                "content": {"close_pattern": r"<\|eot_id\|>\s*", "content": "text"}}}),
        "glm4moe" => json!({"defaults": {"role": "assistant"}, "start_anchor": "<|assistant|>",
            "fields": {"reasoning_content": think,
                "tool_calls": tagged(r"<tool_call>(?P<name>\S+)\n?",
                    r"<arg_key>(?P<key>[^<]+)</arg_key>\s*\n<arg_value>(?P<value>.*?)</arg_value>"),
                "content": {"close_pattern": r"<\|user\|>\s*|$", "content": "text"}}}),
        "gemma4" => json!({"defaults": {"role": "assistant"},
            "start_anchor_pattern": r"(?:<\|turn>model\n|<tool_response\|>)",
            "fields": {"reasoning_content": {"open": "<|channel>thought\n", "close_pattern": r"<channel\|>\s*",
                    "content": "text"},
                "tool_calls": {"open_pattern": r"<\|tool_call>call:(?P<name>\w+)",
                    "close_pattern": r"<tool_call\|>\s*", "repeats": true, "content": "json",
                    "content_args": {"string_delims": [["<|\"|>", "<|\"|>"]], "unquoted_keys": true},
                    "transform": call},
                "content": {"close_pattern": r"(?:<turn\|>|<\|tool_response>|<eos>)\s*|$", "content": "text"}}}),
        "gptoss" => json!({"defaults": {"role": "assistant"}, "start_anchor": "<|start|>assistant",
            "fields": {"thinking": {"open": "<|channel|>analysis<|message|>", "close_pattern": r"<\|end\|>\s*",
                    "content": "text"},
                "content": {"open": "<|channel|>final<|message|>", "close_pattern": r"<\|return\|>\s*",
                    "content": "text"},
                "tool_calls": {"open_pattern": r"to=functions\.(?P<name>\S+?)<\|channel\|>commentary\s+json<\|message\|>",
                    "close_pattern": r"<\|call\|>\s*", "repeats": true, "content": "json", "transform": call}}}),
        "lfm2_2_5" => {
            // An argument's value: a quoted string, brackets balanced three levels deep, or
            // a bare literal up to the next `,` or `)` (TRL's `_LFM2_2_5_ARG_VALUE`).
            let atom = r#"[^\[\]{}'\"]|'[^']*'|\"[^\"]*\""#;
            let mut nested = atom.to_string();
            for _ in 0..3 {
                nested = format!(r"{atom}|[\[{{](?:{nested})*[\]}}]");
            }
            let value = format!(r"'[^']*'|[\[{{](?:{nested})*[\]}}]|[^,)]*");
            json!({"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n",
                "fields": {"thinking": think,
                    "tool_calls": {"open_pattern": r"(?:<\|tool_call_start\|>\[|,\s*)(?P<name>\w+)\(",
                        "close_pattern": r"\)(?:\]<\|tool_call_end\|>)?\s*", "repeats": true,
                        "content": "xml-inline",
                        "content_args": {"tag_pattern": format!(r"(?P<key>\w+)=(?P<value>{value})"),
                            "value_parser": {"name": "json",
                                "args": {"string_delims": [["'", "'"]], "allow_non_json": true}}},
                        "transform": call},
                    "content": im_end}})
        }
        _ => return None,
    })
}

/// TRL's `_validate_tool_calls`: each call's `function` an object with a string `name`,
/// missing or null `arguments` made `{}`; arguments that are not an object stay as they are
/// (TRL calls the tool with them, and a Python tool answers `fn(**arguments)`'s
/// `TypeError`).
fn valid_calls(message: &mut Map<String, Value>) -> bool {
    let Some(calls) = message.get_mut("tool_calls") else {
        return true;
    };
    let Some(calls) = calls.as_array_mut() else {
        return false;
    };
    calls.iter_mut().all(|call| {
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
        true
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(name: &str) -> ResponseTemplate {
        ResponseTemplate::from_json(&builtin_json(name).unwrap()).unwrap()
    }

    fn call(name: &str, arguments: Value) -> Value {
        json!({"type": "function", "function": {"name": name, "arguments": arguments}})
    }

    /// The edges of TRL's Qwen3 and Llama 3 templates, each checked against transformers.
    #[test]
    fn regions_as_transformers_reads_them() {
        let q = builtin("qwen3");
        let m = |prefix: &str, answer: &str| {
            q.message((prefix, answer), "PLAIN", Some("<|im_end|>"), None)
        };
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
        // Arguments that are not an object stay as they are: the tool gets them.
        assert_eq!(
            m(
                "",
                "<tool_call>{\"name\": \"a\", \"arguments\": [1]}</tool_call><|im_end|>"
            ),
            json!({"role": "assistant", "content": "", "tool_calls": [call("a", json!([1]))]})
        );
        // Not JSON, cut before its end, no name: plain.
        for answer in [
            "<tool_call>{bad}</tool_call><|im_end|>",
            "<tool_call>{\"name\": \"a\"}<|im_end|>",
            "<tool_call>{\"arguments\": {}}</tool_call><|im_end|>",
        ] {
            assert_eq!(
                m("", answer),
                json!({"role": "assistant", "content": "PLAIN"}),
                "{answer}"
            );
        }
        // Llama 3.1: a call may follow text; without its end of turn it is not read.
        let l = builtin("llama3");
        let answer = "Sure. {\"name\": \"calc\", \"parameters\": {\"e\": \"1\"}}<|eot_id|>";
        assert_eq!(
            l.message(("", answer), "P", None, None),
            json!({"role": "assistant", "content": "Sure.", "tool_calls": [call("calc", json!({"e": "1"}))]})
        );
        let cut = "{\"name\": \"calc\", \"parameters\": {\"e\": \"1\"}}";
        assert_eq!(
            l.message(("", cut), "P", None, None),
            json!({"role": "assistant", "content": "P"})
        );
    }

    /// Python's patterns: `$` before a final newline; a prefix read before the answer, so
    /// that a `$` closes a region at the prefix's own end (transformers streams them).
    #[test]
    fn python_patterns_and_the_prefix_read_first() {
        let re = python_regex("a$").unwrap();
        assert!(re.is_match("a\n").unwrap() && re.is_match("a").unwrap());
        assert!(!re.is_match("a\nb").unwrap());
        assert_eq!(literal_start(r"<\|im_end\|>\s*"), "<|im_end|>");
        assert_eq!(literal_start(r"</think>\s*"), "</think>");
        assert_eq!(literal_start(r"<\|user\|>\s*|$"), "");
        assert_eq!(literal_start(r"ab*c"), "a");
        assert_eq!(literal_runs(r"(?=[\s\S]*?</think>)"), ["</think>"]);
        assert_eq!(literal_runs(r"<\|im_end\|>\s*x"), ["<|im_end|>"]);
        assert_eq!(literal_runs(r"ab*cd\n[xy]zz"), ["cd\n", "zz"]);
        assert_eq!(literal_start(r"\n\.a+\d"), "\n.a");
        let class = python_regex(r"[]a][^]b]\Z").unwrap();
        assert!(class.is_match("]c").unwrap() && !class.is_match("]]").unwrap());
        // Gemma 4: the prefix's stretch of content ends at its final newline, and the
        // answer's replaces it.
        let g = builtin("gemma4");
        assert_eq!(
            g.message(
                ("<|turn>model\n<think>\n", "counting</think>x<turn|>"),
                "P",
                None,
                None
            ),
            json!({"role": "assistant", "content": "counting</think>x"})
        );
    }

    /// The parts no template TRL ships uses (joined repeats, `kv-lines` with a value parser,
    /// numbers and booleans, a transform per item, named captures, unstripped text, a
    /// required field, literal lists as anchors), as transformers 5.23 reads them
    /// (`parse_response(text, spec, prefix=…)`, outputs copied).
    #[test]
    fn every_part_of_a_template_as_transformers_reads_it() {
        let spec = json!({
            "defaults": {"role": "assistant", "kind": ""},
            "start_anchor": ["<A>", "<AA>"],
            "fields": {
                "notes": {"open": "<n>", "close": "</n>", "repeats": true, "join": " | "},
                "meta": {"open": "<m>", "close": "</m>", "content": "kv-lines",
                    "content_args": {"value_parser": {"name": "int"}}},
                "score": {"open": "<s>", "close_pattern": r"</s>\s*", "content": "float"},
                "flag": {"open": "<f>", "close": "</f>", "content": "bool"},
                "items": {"open": "<i>", "close": "</i>", "content": "json", "transform": {"v": "{content}"}},
                "calls": {"open_pattern": r"<c (?P<who>\w+)>", "close": "</c>", "content": "json",
                    "transform": {"by": "{who}", "x": "{x}"}, "transform_each": true},
                "content": {"close_pattern": "<end>|$", "content": "text", "content_args": {"strip": false}}
            }
        });
        let t = ResponseTemplate::from_json(&spec).unwrap();
        let none = Map::new();
        let answer = "hello <n>a</n> mid <n>b</n><m>k: 1\nj : 22\nnone\n</m><s> 2.5 </s>\n<f>TRUE</f><i>[1, 2]</i><c bob>[{\"x\": 1}, {\"x\": 2}]</c> tail <end>";
        assert_eq!(
            Value::Object(t.parse("x<AA>", answer, &none).unwrap()),
            json!({"role": "assistant", "kind": "", "content": " tail ", "notes": "a | b",
                "meta": {"k": 1, "j": 22}, "score": 2.5, "flag": true, "items": {"v": [1, 2]},
                "calls": [{"by": "bob", "x": 1}, {"by": "bob", "x": 2}]})
        );
        assert_eq!(
            Value::Object(t.parse("<A>", "plain  \n", &none).unwrap()),
            json!({"role": "assistant", "kind": "", "content": "plain  "})
        );
        assert_eq!(t.parse("", "<m>k: x</m>", &none), None, "not an int");
        let required = json!({"start_anchor": "<A>", "fields": {
            "must": {"open": "<x>", "close": "</x>", "optional": false}, "content": {}}});
        let r = ResponseTemplate::from_json(&required).unwrap();
        assert_eq!(
            Value::Object(r.parse("<A>", "<x>1</x>", &none).unwrap()),
            json!({"must": "1"})
        );
        assert_eq!(
            r.parse("<A>", "no", &none),
            None,
            "the required field is missing"
        );
    }

    /// A template from JSON is checked as transformers checks it.
    #[test]
    fn bad_templates_are_refused() {
        for (spec, want) in [
            (json!({"fields": {"content": {}}}), "start_anchor"),
            (json!({"start_anchor": "a", "fields": {}}), "non-empty"),
            (
                json!({"start_anchor": "a", "fields": {"x": {}, "y": {}}}),
                "at most one",
            ),
            (
                json!({"start_anchor": "a", "fields": {"x": {"content": "yaml"}}}),
                "unknown content parser",
            ),
            (
                json!({"start_anchor": "a", "fields": {"x": {"colour": 1}}}),
                "unknown key",
            ),
            (
                json!({"start_anchor": "a", "fields": {"x": {"open_pattern": "("}}}),
                "invalid pattern",
            ),
        ] {
            let e = ResponseTemplate::from_json(&spec).unwrap_err();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }
}
