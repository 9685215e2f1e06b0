//! Where PPO's scores come from: any [`RewardFunction`] — the learned reward model, a rule
//! over the text and the prompt row (`exact-answer`) or over the response alone (TRL's
//! `trl.rewards`: [`SoftOverlong`], [`Repetition`], [`ThinkFormat`], [`CosineScaled`]; a
//! [`FormatRule`]), a program, or your own — several of them summed with weights
//! ([`RewardSource`]).
//!
//! A reward of your own is a type implementing [`RewardFunction`], passed to
//! [`crate::train::run_with_reward`]:
//!
//! ```
//! use ppo::reward_fn::{RewardFunction, RewardInput};
//!
//! /// 1 for a response that mentions the row's "answer" field.
//! struct Mentions;
//!
//! impl RewardFunction for Mentions {
//!     fn scores(&self, input: &RewardInput) -> anyhow::Result<Vec<f64>> {
//!         Ok(input
//!             .texts
//!             .iter()
//!             .zip(input.fields)
//!             .map(|(text, row)| match row.get("answer").and_then(|a| a.as_str()) {
//!                 Some(answer) if text.contains(answer) => 1.0,
//!                 _ => 0.0,
//!             })
//!             .collect())
//!     }
//! }
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use common::scoring::{score_sequences, Normalization};
use common::Model;
use data::formats::{Content, Message, PromptExample, PromptFields, TemplateArgs};
use data::Tokenizer;
use regex::Regex;

use common::program::LineProgram;

/// One rollout batch as the reward sees it.
pub struct RewardInput<'a> {
    /// Prompt token ids, unpadded.
    pub prompts: &'a [Vec<i64>],
    /// Response token ids, unpadded, without the EOS that ended them.
    pub responses: &'a [Vec<i64>],
    /// The same with the EOS that ended them (TRL's `completion_ids`).
    pub completion_ids: &'a [Vec<i64>],
    /// The responses decoded (special tokens skipped).
    pub texts: &'a [String],
    /// The other fields of each response's prompt row (`answer`, `id`, …).
    pub fields: &'a [PromptFields],
    /// Whether each response ended with EOS (else it was cut at `--response-length`).
    pub ended_with_eos: &'a [bool],
    /// Each response's prompt as its row gave it (an environment's observation appended),
    /// where the run keeps them: what a reward model with a tokenizer of its own reads.
    pub examples: Option<&'a [PromptExample]>,
    /// The iterations done and those of the run (TRL's `trainer_state.global_step` and
    /// `max_steps`), where the run gives them.
    pub step: Option<(u64, u64)>,
    /// Each response as TRL's reward functions get it where it is parsed: with tools, its
    /// messages (the assistant's, each parsed into content, reasoning and tool calls, and
    /// the tool results between them; `ToolResponse::messages`); without, where the policy's
    /// tokenizer has a response template of its own, the one message it parses into
    /// (`rollout::completion_messages`).
    pub messages: Option<&'a [Vec<serde_json::Value>]>,
}

/// What a reward function logged beside its scores (TRL's `log_metric` and `log_extra`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Logged {
    /// Each metric's values so far: their sum and how many. A run logs each metric's mean
    /// over an iteration's values on every rank under its own name (`eval/NAME` in an
    /// evaluation).
    pub metrics: BTreeMap<String, (f64, f64)>,
    /// Extra columns of each response for `samples.jsonl` (TRL's completions table):
    /// empty, or one map per response.
    pub extra: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl Logged {
    /// `other` added to this: the metrics' values pooled, each response's extra columns
    /// joined (`other`'s of the same name replace these).
    pub fn merge(&mut self, other: Logged) {
        self.add_metrics(other.metrics);
        if self.extra.is_empty() {
            self.extra = other.extra;
        } else if !other.extra.is_empty() {
            for (mine, theirs) in self.extra.iter_mut().zip(other.extra) {
                mine.extend(theirs);
            }
        }
    }

    /// `metrics`' values pooled with these.
    pub fn add_metrics(&mut self, metrics: BTreeMap<String, (f64, f64)>) {
        for (name, (sum, n)) in metrics {
            let entry = self.metrics.entry(name).or_insert((0.0, 0.0));
            *entry = (entry.0 + sum, entry.1 + n);
        }
    }

    /// The extra columns of `rows`, in that order; the metrics kept.
    pub fn select(&self, rows: &[usize]) -> Logged {
        Logged {
            metrics: self.metrics.clone(),
            extra: match self.extra.is_empty() {
                true => vec![],
                false => rows.iter().map(|&r| self.extra[r].clone()).collect(),
            },
        }
    }

    /// `parts` one after another (`rows[i]` responses in part `i`): the metrics pooled,
    /// the extra columns in order (none for a part without any).
    pub fn concat(parts: Vec<(Logged, usize)>) -> Logged {
        let any_extra = parts.iter().any(|(p, _)| !p.extra.is_empty());
        let mut out = Logged::default();
        for (part, rows) in parts {
            let extra = match (any_extra, part.extra.is_empty()) {
                (true, true) => vec![serde_json::Map::new(); rows],
                _ => part.extra.clone(),
            };
            out.add_metrics(part.metrics);
            out.extra.extend(extra);
        }
        out
    }
}

/// One reward source of a run: its name in the metrics (`rewards/NAME/mean`), its weight
/// in the summed reward, and the function.
#[derive(Clone, Copy)]
pub struct RewardSource<'a> {
    pub name: &'static str,
    pub weight: f64,
    pub function: &'a dyn RewardFunction,
}

pub trait RewardFunction {
    /// Begins scoring `input` where the work runs elsewhere (a program), without waiting
    /// for it, so that every source of a run works at once; [`Self::scores`], called next
    /// with the same input, collects the scores. By default nothing begins early.
    fn begin(&self, _input: &RewardInput) -> Result<()> {
        Ok(())
    }

    /// One score per response; `f64::NAN` where the source does not apply to a response
    /// (TRL's `None`): it is left out of that response's sum and of the source's metrics,
    /// and a response no source scored is left out of its group's baseline with no
    /// advantage (the group estimators; the others refuse it).
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>>;

    /// What the last [`Self::scores`] logged beside the scores (TRL's `log_metric` and
    /// `log_extra`), taken: a second call gives nothing. By default nothing is logged.
    fn logged(&self) -> Logged {
        Logged::default()
    }
}

/// A reward model from `reward train` (or any sequence classifier), with its normalisation
/// applied. Each sequence is scored at its last token. With the policy's tokenizer, it is
/// the policy's own tokens, prompt + response without EOS, as `reward train` trained it;
/// with a tokenizer of its own (`own_tokenizer`), it is the text as TRL's `GRPOTrainer`
/// gives a reward model (see [`own_tokens`]).
pub struct RewardModel<'a> {
    pub model: &'a Model,
    pub normalization: Normalization,
    pub pad_id: i64,
    pub batch_size: usize,
    /// Score with the model's adapters switched off: with LoRA, the critic's base (and
    /// its original head) is the reward model, so one copy of it serves both.
    pub without_adapters: bool,
    /// The reward model's tokenizer where its vocabulary is not the policy's.
    pub own_tokenizer: Option<&'a Tokenizer>,
}

/// A response as TRL's `GRPOTrainer` hands it to a reward model, in that model's tokens:
/// a conversation is the prompt's messages and the response as the assistant's turn (with
/// tools, its `messages`: the assistant's turns and the results), rendered by the reward
/// model's chat template (its `--chat-template-kwargs` too, no tools), a plain-text prompt
/// the prompt and the response joined; tokenized without special tokens, the longest kept
/// to their last `max_len` tokens.
pub fn own_tokens(
    tok: &Tokenizer,
    example: &PromptExample,
    (response, messages): (&str, Option<&[serde_json::Value]>),
    max_len: Option<usize>,
) -> Result<Vec<i64>> {
    let text = match &example.prompt {
        Content::Text(prompt) => format!("{prompt}{response}"),
        Content::Messages(prompt) => {
            let mut all = prompt.clone();
            match messages {
                Some(m) => all.extend(m.iter().map(message_of)),
                None => all.push(Message::new("assistant", response)),
            }
            tok.render_chat(&all, &TemplateArgs::default(), false)?
        }
    };
    let ids = tok.encode(&text, false)?;
    let keep = max_len.unwrap_or(ids.len()).min(ids.len());
    Ok(ids[ids.len() - keep..].to_vec())
}

/// A message of a response's (`{"role", "content", …}`, content a string) for a chat
/// template.
fn message_of(m: &serde_json::Value) -> Message {
    let mut extra = m.as_object().cloned().unwrap_or_default();
    let role = extra.remove("role");
    let content = extra.remove("content");
    Message {
        role: role
            .as_ref()
            .and_then(|r| r.as_str())
            .unwrap_or_default()
            .into(),
        content: content
            .as_ref()
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .into(),
        extra,
    }
}

impl RewardFunction for RewardModel<'_> {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        let sequences: Vec<Vec<i64>> = match self.own_tokenizer {
            None => input
                .prompts
                .iter()
                .zip(input.responses)
                .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
                .collect(),
            Some(tok) => {
                let examples = input
                    .examples
                    .context("a reward model with its own tokenizer reads the prompt rows, which this rollout did not keep")?;
                (0..examples.len())
                    .map(|i| {
                        let response = (
                            input.texts[i].as_str(),
                            input.messages.map(|m| m[i].as_slice()),
                        );
                        own_tokens(tok, &examples[i], response, self.model.max_positions())
                    })
                    .collect::<Result<_>>()?
            }
        };
        let score = || score_sequences(self.model, &sequences, self.batch_size, self.pad_id);
        let raw = if self.without_adapters {
            common::models::adapter::without_adapters(score)
        } else {
            score()
        };
        Ok(raw
            .into_iter()
            .map(|r| self.normalization.apply(r))
            .collect())
    }
}

/// A reward computed from the decoded text alone.
pub struct TextRule<F: Fn(&str) -> f64>(pub F);

impl<F: Fn(&str) -> f64> RewardFunction for TextRule<F> {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        Ok(input.texts.iter().map(|t| (self.0)(t)).collect())
    }
}

/// A response's completion ids as TRL's reward functions see them: its tokens and the EOS
/// that ended it, if one did.
fn completion_len(input: &RewardInput, i: usize) -> usize {
    input.responses[i].len() + usize::from(input.ended_with_eos[i])
}

/// `soft-overlong`: DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13; TRL's
/// `get_soft_overlong_punishment`): a completion of `len` tokens (its EOS counted) gets 0 up
/// to `max_len − cache`, `(max_len − cache − len) / cache` up to `max_len`, −1 beyond.
pub struct SoftOverlong {
    pub max_len: usize,
    pub cache: usize,
}

impl SoftOverlong {
    pub fn penalty(&self, len: usize) -> f64 {
        let free = self.max_len - self.cache;
        if len <= free {
            0.0
        } else if len <= self.max_len {
            (free as f64 - len as f64) / self.cache as f64
        } else {
            -1.0
        }
    }
}

impl RewardFunction for SoftOverlong {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        Ok((0..input.responses.len())
            .map(|i| self.penalty(completion_len(input, i)))
            .collect())
    }
}

/// `repetition`: the share of repeated token n-grams times `max_penalty` (≤ 0), over the
/// completion ids (its EOS included) — TRL's `get_repetition_penalty_reward` (Yeo et al.
/// 2025, Appendix C.2); a completion shorter than `n` gets 0.
pub struct Repetition {
    pub n: usize,
    pub max_penalty: f64,
}

impl Repetition {
    pub fn penalty(&self, ids: &[i64]) -> f64 {
        if ids.len() < self.n {
            return 0.0;
        }
        let grams: Vec<&[i64]> = ids.windows(self.n).collect();
        let unique: std::collections::HashSet<&[i64]> = grams.iter().copied().collect();
        let repeated = 1.0 - unique.len() as f64 / grams.len() as f64;
        if repeated == 0.0 {
            0.0
        } else {
            repeated * self.max_penalty
        }
    }
}

/// Stands for the EOS that ended a response: TRL's completion ids end with it, and the
/// response holds no EOS before it (it ended there), so an id no response holds counts
/// the same n-grams.
const EOS_MARK: i64 = -1;

impl RewardFunction for Repetition {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        Ok(input
            .responses
            .iter()
            .zip(input.ended_with_eos)
            .map(|(r, &eos)| {
                let mut ids = r.clone();
                if eos {
                    ids.push(EOS_MARK);
                }
                self.penalty(&ids)
            })
            .collect())
    }
}

/// `think-format`: a response that opens with `<think>`, closes it with `</think>` and has
/// no second `<think>` (scored 1, else 0, as a [`TextRule`]) — TRL's `think_format_reward`
/// (`^<think>(?!.*<think>)(.*?)</think>.*$`, dot matching newlines).
pub struct ThinkFormat;

impl ThinkFormat {
    pub fn matches(text: &str) -> bool {
        text.strip_prefix("<think>")
            .is_some_and(|rest| !rest.contains("<think>") && rest.contains("</think>"))
    }
}

/// `format`: a response that the pattern matches from its start (scored 1, else 0, as a
/// [`TextRule`]; Python's `re.match`, as TRL's documented format reward and Open-R1's use
/// it).
pub struct FormatRule {
    pattern: Regex,
}

impl FormatRule {
    pub fn new(pattern: &str) -> Result<Self> {
        match Regex::new(&format!(r"\A(?:{pattern})")) {
            Ok(pattern) => Ok(FormatRule { pattern }),
            Err(e) => bail!("--format-pattern '{pattern}': {e}"),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        self.pattern.is_match(text)
    }
}

/// `exact-answer`: the answer extracted from the response (the first capture group of
/// `pattern`; by default the text after the last "The answer is", up to the end of its
/// line), normalised (whitespace collapsed, thousands separators and a trailing period
/// dropped), against the prompt row's normalised `answer`: 1 or 0, and `−format_penalty`
/// when nothing could be extracted.
pub struct ExactAnswer {
    pub pattern: Regex,
    pub format_penalty: f64,
}

pub const DEFAULT_ANSWER_PATTERN: &str = r"(?s).*The answer is[:\s]*([^\n]*)";

impl ExactAnswer {
    pub fn new(pattern: Option<&str>, format_penalty: f64) -> Result<Self> {
        let source = pattern.unwrap_or(DEFAULT_ANSWER_PATTERN);
        let pattern = match Regex::new(source) {
            Ok(p) => p,
            Err(e) => bail!("--answer-pattern '{source}': {e}"),
        };
        if pattern.captures_len() < 2 {
            bail!("--answer-pattern '{source}' has no capture group: the first one is the answer");
        }
        Ok(ExactAnswer {
            pattern,
            format_penalty,
        })
    }

    /// The answer in `text`, if the pattern finds one.
    pub fn extract<'t>(&self, text: &'t str) -> Option<&'t str> {
        self.pattern
            .captures(text)
            .and_then(|c| c.get(1))
            .map(|m| m.as_str())
            .filter(|a| !normalize(a).is_empty())
    }

    /// Whether the answer extracted from `text` is the row's `answer` (both normalised).
    pub fn correct(&self, text: &str, row: &PromptFields) -> bool {
        match (self.extract(text), row_answer(row)) {
            (Some(got), Some(want)) => normalize(got) == normalize(&want),
            _ => false,
        }
    }
}

/// `cosine-scaled`: correctness scaled by length on a cosine schedule (Yeo et al. 2025,
/// Appendix C.1; TRL's `get_cosine_scaled_reward`), with [`ExactAnswer`]'s verdict where
/// TRL's uses math verification: `v_min + ½(v_max − v_min)(1 + cos(π·min(|y|/L, 1)))`, |y|
/// the completion's tokens (its EOS counted); a correct response goes from
/// `max_value_correct` (short) to `min_value_correct` (at L), a wrong one from
/// `min_value_wrong` (short) to `max_value_wrong`.
pub struct CosineScaled {
    pub answer: ExactAnswer,
    pub max_len: usize,
    /// `(min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)`.
    pub values: (f64, f64, f64, f64),
}

impl CosineScaled {
    pub fn value(&self, correct: bool, len: usize) -> f64 {
        let (min_wrong, max_wrong, min_correct, max_correct) = self.values;
        let progress = (len as f64 / self.max_len as f64).min(1.0);
        let cosine = (progress * std::f64::consts::PI).cos();
        let (lo, hi) = if correct {
            (min_correct, max_correct)
        } else {
            (max_wrong, min_wrong)
        };
        lo + 0.5 * (hi - lo) * (1.0 + cosine)
    }
}

impl RewardFunction for CosineScaled {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        Ok((0..input.texts.len())
            .map(|i| {
                let correct = self.answer.correct(&input.texts[i], &input.fields[i]);
                self.value(correct, completion_len(input, i))
            })
            .collect())
    }
}

/// Whitespace collapsed, trailing periods dropped, commas between digits removed.
pub fn normalize(answer: &str) -> String {
    let words: Vec<&str> = answer.split_whitespace().collect();
    let joined = words.join(" ");
    let trimmed = joined.trim_end_matches('.').trim_end();
    let chars: Vec<char> = trimmed.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| {
            !(c == ','
                && i > 0
                && chars[i - 1].is_ascii_digit()
                && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        })
        .map(|(_, &c)| c)
        .collect()
}

/// A row's `answer` as text (a number is written as JSON writes it).
pub fn row_answer(fields: &PromptFields) -> Option<String> {
    match fields.get("answer")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl RewardFunction for ExactAnswer {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        Ok(input
            .texts
            .iter()
            .zip(input.fields)
            .map(|(text, row)| match self.extract(text) {
                None => -self.format_penalty,
                Some(_) => f64::from(u8::from(self.correct(text, row))),
            })
            .collect())
    }
}

/// `--reward-command`: a long-lived child process (`sh -c CMD`, started once) that reads one
/// JSON line per response on its stdin — `{…the prompt row's other fields, "prompt",
/// "response", "raw_prompt", "completion", "completion_ids", "trainer_state", "batch"}`:
/// the prompt as the policy read it (decoded, special tokens skipped) and the response's
/// text, then what TRL's `GRPOTrainer` hands a reward function: the row's prompt as given
/// (text or messages), the completion (its text, or `[{"role": "assistant", "content":
/// text}]` after a conversation, or with tools [`RewardInput::messages`]), its token ids with the EOS that ended it, `{"global_step",
/// "max_steps"}` (where the run gives them), and `{"index", "size"}`, the response's place
/// in the batch its lines are sent in (every line of a batch is sent before any answer is
/// awaited, so a program may score a batch at once, as TRL calls a reward function) — and
/// answers each with one `{"reward": x}` line (x null where it does not apply), in order.
/// An answer may also carry `"metrics": {"NAME": x or [x, …]}` (TRL's `log_metric`: each
/// value counts once in the iteration's mean of NAME) and `"extra": {"COLUMN": value}`
/// (TRL's `log_extra`: the response's columns in `samples.jsonl`). Its stderr is the run's.
/// A crash, a malformed or missing line, or no answer within the timeout is an error
/// naming the command and the row.
pub struct RewardCommand {
    program: LineProgram,
    /// The policy's tokenizer (shared by every command), which decodes the prompts.
    tokenizer: std::sync::Arc<Tokenizer>,
    /// What the last answers logged, until [`RewardFunction::logged`] takes it.
    logged: Mutex<Logged>,
}

impl RewardCommand {
    pub fn start(
        command: &str,
        tokenizer: std::sync::Arc<Tokenizer>,
        timeout: Duration,
    ) -> Result<Self> {
        Ok(RewardCommand {
            program: LineProgram::start(
                ("--reward-command", "--reward-timeout"),
                command,
                timeout,
            )?,
            tokenizer,
            logged: Mutex::default(),
        })
    }

    /// One request line per response of `input`.
    fn requests(&self, input: &RewardInput) -> Vec<serde_json::Value> {
        let size = input.texts.len();
        (0..size)
            .map(|i| {
                let mut row = input.fields[i].clone();
                let text = &input.texts[i];
                let prompt = self.tokenizer.decode(&input.prompts[i], true);
                // What TRL hands a reward function: the row's prompt as given, and the
                // completion as text or, after a conversation, as the assistant's message
                // (with tools, the messages of the assistant's turns and the results).
                let given = input.examples.map(|e| &e[i].prompt);
                let (raw_prompt, completion) = match given {
                    Some(Content::Messages(_)) => (
                        given.expect("matched").to_json(),
                        match input.messages {
                            Some(m) => serde_json::Value::Array(m[i].clone()),
                            None => serde_json::json!([{"role": "assistant", "content": text}]),
                        },
                    ),
                    Some(p @ Content::Text(_)) => (p.to_json(), text.clone().into()),
                    None => (prompt.clone().into(), text.clone().into()),
                };
                row.insert("prompt".into(), prompt.into());
                row.insert("response".into(), text.clone().into());
                row.insert("raw_prompt".into(), raw_prompt);
                row.insert("completion".into(), completion);
                row.insert(
                    "completion_ids".into(),
                    input.completion_ids[i].clone().into(),
                );
                if let Some((done, total)) = input.step {
                    let state = serde_json::json!({"global_step": done, "max_steps": total});
                    row.insert("trainer_state".into(), state);
                }
                let batch = serde_json::json!({"index": i, "size": size});
                row.insert("batch".into(), batch);
                serde_json::Value::Object(row)
            })
            .collect()
    }
}

/// A response's name in a reward program's errors.
fn response_name(row: usize) -> String {
    format!("response {row} of the batch")
}

impl RewardFunction for RewardCommand {
    fn begin(&self, input: &RewardInput) -> Result<()> {
        self.program.send(&self.requests(input), &response_name)
    }

    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        if !self.program.awaiting() {
            self.begin(input)?;
        }
        let lines = self.program.receive(&response_name)?;
        let (rewards, logged) = answers_of(&self.program, &lines, &response_name)?;
        *self.logged.lock().expect("not poisoned") = logged;
        Ok(rewards)
    }

    fn logged(&self) -> Logged {
        std::mem::take(&mut *self.logged.lock().expect("not poisoned"))
    }
}

/// Sends `requests` to `program` and reads one `{"reward": x}` line for each:
/// `--environment-reward`'s answers.
pub(crate) fn ask_rewards(
    program: &LineProgram,
    requests: &[serde_json::Value],
    name: &dyn Fn(usize) -> String,
) -> Result<Vec<f64>> {
    let lines = program.ask(requests, name)?;
    Ok(answers_of(program, &lines, name)?.0)
}

/// The rewards in a program's answer `lines`, one `{"reward": x}` each (x finite, or null
/// where the reward does not apply to that response: NaN, TRL's `None`), and what they
/// logged beside them (`"metrics"`, `"extra"`: see [`RewardCommand`]).
fn answers_of(
    program: &LineProgram,
    lines: &[String],
    name: &dyn Fn(usize) -> String,
) -> Result<(Vec<f64>, Logged)> {
    let mut logged = Logged::default();
    let mut extra = vec![];
    let mut rewards = vec![];
    for (i, line) in lines.iter().enumerate() {
        let fail = |message: String| program.error(&name(i), &message);
        let answer = serde_json::from_str::<serde_json::Value>(line).ok();
        let answer = answer.as_ref().and_then(|v| v.as_object());
        let reward = match answer.and_then(|a| a.get("reward")) {
            Some(serde_json::Value::Null) => Some(f64::NAN),
            Some(x) => x.as_f64().filter(|r| r.is_finite()),
            None => None,
        };
        let (Some(answer), Some(reward)) = (answer, reward) else {
            return Err(fail(format!(
                "expected a line {{\"reward\": <finite number or null>}}, got '{}'",
                LineProgram::shown(line)
            )));
        };
        rewards.push(reward);
        if let Some(metrics) = answer.get("metrics") {
            let metrics = metrics.as_object().ok_or_else(|| {
                fail(format!(
                    "\"metrics\" must be an object {{\"NAME\": number or [numbers]}}, got {}",
                    LineProgram::shown(&metrics.to_string())
                ))
            })?;
            for (metric, value) in metrics {
                let values: Option<Vec<f64>> = match value {
                    serde_json::Value::Array(xs) => xs.iter().map(|x| x.as_f64()).collect(),
                    x => x.as_f64().map(|x| vec![x]),
                };
                let values = values
                    .filter(|xs| xs.iter().all(|x| x.is_finite()) && !metric.is_empty())
                    .ok_or_else(|| {
                        fail(format!(
                            "metric '{metric}' must be named and be a finite number or a list of them, got {}",
                            LineProgram::shown(&value.to_string())
                        ))
                    })?;
                let entry = logged.metrics.entry(metric.clone()).or_insert((0.0, 0.0));
                *entry = (
                    entry.0 + values.iter().sum::<f64>(),
                    entry.1 + values.len() as f64,
                );
            }
        }
        match answer.get("extra") {
            None => extra.push(serde_json::Map::new()),
            Some(serde_json::Value::Object(columns)) => extra.push(columns.clone()),
            Some(other) => {
                return Err(fail(format!(
                    "\"extra\" must be an object {{\"COLUMN\": value}}, got {}",
                    LineProgram::shown(&other.to_string())
                )))
            }
        }
    }
    if extra.iter().any(|columns| !columns.is_empty()) {
        logged.extra = extra;
    }
    Ok((rewards, logged))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(rule: &ExactAnswer, text: &str, answer: serde_json::Value) -> f64 {
        let fields: PromptFields = [("answer".to_string(), answer)].into_iter().collect();
        let input = RewardInput {
            prompts: &[vec![]],
            responses: &[vec![]],
            completion_ids: &[vec![]],
            texts: &[text.to_string()],
            fields: &[fields],
            ended_with_eos: &[true],
            examples: None,
            step: None,
            messages: None,
        };
        rule.scores(&input).unwrap()[0]
    }

    #[test]
    fn exact_answer_extracts_normalises_and_compares() {
        let rule = ExactAnswer::new(None, 0.5).unwrap();
        let a = || serde_json::json!("12 rabbits, 23 chickens");
        assert_eq!(
            score(
                &rule,
                "Let x... The answer is 12  rabbits, 23 chickens.",
                a()
            ),
            1.0
        );
        // The last "The answer is" counts.
        assert_eq!(
            score(
                &rule,
                "The answer is 3. No: The answer is 12 rabbits, 23 chickens",
                a()
            ),
            1.0
        );
        assert_eq!(
            score(&rule, "The answer is 11 rabbits, 24 chickens.", a()),
            0.0
        );
        assert_eq!(score(&rule, "no idea", a()), -0.5);
        assert_eq!(
            score(
                &rule,
                "The answer is 1,234.\nthen more",
                serde_json::json!(1234)
            ),
            1.0
        );
        let custom = ExactAnswer::new(Some(r"rabbits: (\d+)"), 0.0).unwrap();
        assert_eq!(
            score(
                &custom,
                "rabbits: 12, chickens: 23",
                serde_json::json!("12")
            ),
            1.0
        );
        assert!(ExactAnswer::new(Some(r"\d+"), 0.0).is_err());
        assert!(ExactAnswer::new(Some(r"("), 0.0).is_err());
    }

    /// TRL's own examples and the formula's edges: `get_soft_overlong_punishment(100, 20)`
    /// gives −0.5 at 90 tokens; `get_repetition_penalty_reward(2, −1)` gives 0 and −0.75
    /// for `[1, 2, 3, 4]` and `[5, 5, 5, 5, 5]`; `think_format_reward`'s pattern.
    #[test]
    fn logged_metrics_pool_and_columns_follow_their_rows() {
        let metric = |sum: f64, n: f64| Logged {
            metrics: [("m".to_string(), (sum, n))].into(),
            extra: vec![],
        };
        let columns = |rows: &[serde_json::Value]| -> Vec<serde_json::Map<_, _>> {
            rows.iter()
                .map(|r| r.as_object().unwrap().clone())
                .collect()
        };
        let c = |x: i64| serde_json::json!({ "c": x });
        let a = Logged {
            extra: columns(&[c(0), c(1), c(2)]),
            ..metric(3.0, 2.0)
        };
        // A part of two rows without columns.
        let joined = Logged::concat(vec![(a.clone(), 3), (metric(1.0, 1.0), 2)]);
        assert_eq!(joined.metrics["m"], (4.0, 3.0));
        assert_eq!(joined.extra.len(), 5);
        assert!(joined.extra[3].is_empty() && joined.extra[4].is_empty());
        let picked = joined.select(&[2, 0]);
        assert_eq!(picked.extra, columns(&[c(2), c(0)]));
        assert_eq!(picked.metrics["m"], (4.0, 3.0));
        assert!(metric(1.0, 1.0).select(&[0]).extra.is_empty());
        // Two sources of the same rows: their columns side by side, their values pooled.
        let mut both = a.clone();
        both.merge(Logged {
            extra: columns(&vec![serde_json::json!({"d": 9}); 3]),
            ..metric(5.0, 1.0)
        });
        assert_eq!(
            both.extra[1],
            columns(&[serde_json::json!({"c": 1, "d": 9})])[0]
        );
        assert_eq!(both.metrics["m"], (8.0, 3.0));
        let mut none = Logged::default();
        none.merge(a.clone());
        assert_eq!(none, a);
    }

    #[test]
    fn trl_reward_functions() {
        let overlong = SoftOverlong {
            max_len: 100,
            cache: 20,
        };
        let got: Vec<f64> = [80, 90, 100, 101].map(|n| overlong.penalty(n)).to_vec();
        assert_eq!(got, [0.0, -0.5, -1.0, -1.0]);
        assert_eq!(
            SoftOverlong {
                max_len: 10,
                cache: 0
            }
            .penalty(10),
            0.0
        );
        // Through the rollout's view: 89 tokens and the EOS that ended them are 90.
        let responses = [vec![7; 89], vec![7; 89]];
        let input = RewardInput {
            prompts: &[vec![], vec![]],
            responses: &responses,
            completion_ids: &responses,
            texts: &[String::new(), String::new()],
            fields: &[PromptFields::new(), PromptFields::new()],
            ended_with_eos: &[true, false],
            examples: None,
            step: None,
            messages: None,
        };
        assert_eq!(overlong.scores(&input).unwrap(), [-0.5, -0.45]);
        let repetition = Repetition {
            n: 2,
            max_penalty: -1.0,
        };
        assert_eq!(repetition.penalty(&[1, 2, 3, 4]), 0.0);
        assert_eq!(repetition.penalty(&[5, 5, 5, 5, 5]), -0.75);
        assert_eq!(repetition.penalty(&[5]), 0.0);
        // The EOS counts as a token: [5, 5, 5, EOS] has bigrams (5,5), (5,5), (5,EOS).
        let input = RewardInput {
            responses: &[vec![5, 5, 5]],
            completion_ids: &[vec![5, 5, 5]],
            texts: &[String::new()],
            fields: &[PromptFields::new()],
            prompts: &[vec![]],
            ended_with_eos: &[true],
            examples: None,
            step: None,
            messages: None,
        };
        let got = repetition.scores(&input).unwrap()[0];
        assert!((got + 1.0 / 3.0).abs() < 1e-12, "{got}");
        // cosine-scaled: TRL's example (max_len 100, 50 tokens: 0.75 correct, −0.75
        // wrong), the ends, and lengths past max_len held at the long end.
        let cosine = CosineScaled {
            answer: ExactAnswer::new(None, 0.0).unwrap(),
            max_len: 100,
            values: (-1.0, -0.5, 0.5, 1.0),
        };
        let near = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(near(cosine.value(true, 50), 0.75) && near(cosine.value(false, 50), -0.75));
        assert!(near(cosine.value(true, 0), 1.0) && near(cosine.value(false, 0), -1.0));
        assert!(near(cosine.value(true, 100), 0.5) && near(cosine.value(false, 300), -0.5));
        let mut row = PromptFields::new();
        row.insert("answer".into(), serde_json::json!(12));
        let input = RewardInput {
            prompts: &[vec![], vec![]],
            responses: &[vec![1; 49], vec![1; 49]],
            completion_ids: &[vec![1; 49], vec![1; 49]],
            texts: &["The answer is 12".into(), "The answer is 13".into()],
            fields: &[row.clone(), row],
            ended_with_eos: &[true, true],
            examples: None,
            step: None,
            messages: None,
        };
        let got = cosine.scores(&input).unwrap();
        assert!(near(got[0], 0.75) && near(got[1], -0.75), "{got:?}");
        // format: matched from the start, as re.match; `$` and `(?s)` as the user writes.
        let format = FormatRule::new(r"(?s)<think>.*?</think>\s*<answer>.*?</answer>$").unwrap();
        for (text, want) in [
            ("<think>a\nb</think>\n<answer>12</answer>", true),
            (" <think>a</think><answer>12</answer>", false),
            ("<think>a</think><answer>12</answer> more", false),
            ("<think>a</think>", false),
        ] {
            assert_eq!(format.matches(text), want, "{text:?}");
        }
        assert!(FormatRule::new("a|b").unwrap().matches("b and more"));
        assert!(!FormatRule::new("a|b").unwrap().matches("c, a"));
        let e = FormatRule::new("(").err().unwrap().to_string();
        assert!(e.starts_with("--format-pattern '(':"), "{e}");
        for (text, want) in [
            ("<think>x</think>The answer is 12.", true),
            ("<think>\n\n</think>\n\n12", true),
            (" <think>x</think>", false),
            ("<think>x", false),
            ("<think>a</think><think>b</think>", false),
            ("12 rabbits", false),
        ] {
            assert_eq!(ThinkFormat::matches(text), want, "{text:?}");
        }
    }
}
