//! Tool calling in sampled responses, as TRL 1.16's `GRPOTrainer(tools=…)` (`ppo train`)
//! and `DistillationTrainer(tools=…)` (`sft train --teacher-model`'s on-policy samples) do
//! it: the policy
//! answers; where its answer calls tools (in the chat template's own tool-call form), the
//! calls are run, their results are appended as `tool` messages rendered by the chat
//! template, and the policy continues from there — up to `--max-tool-calling-iterations`
//! times, within `--response-length` tokens in all. The tool results' tokens are part of
//! the response the policy is scored on but not tokens it sampled: the tool mask keeps
//! them out of every loss, KL and advantage (TRL's `tool_mask`) and, in distillation, out
//! of the loss. Each answer is read as the
//! message TRL's `parse_response` makes of it ([`data::response`]): its calls are the ones
//! run, and the messages, results between them, are the completion reward programs get.
//!
//! Tools are run by `--tool-command`, a long-lived program that reads one JSON line per
//! call, `{"name": …, "arguments": {…}}`, and answers each with one line,
//! `{"result": …}` or `{"error": "…"}` (also for a call to a tool it does not have: TRL
//! answers those with `{"error": "Tool NAME not found."}`). The tools' schemas (`--tools FILE`, or each prompt
//! row's `tools`) are rendered into the prompt by the chat template, as
//! `apply_chat_template(tools=…)` does.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Result};
use data::formats::{Message, PromptFields, TemplateArgs};
use data::response::{self, ResponseTemplate};
use data::Tokenizer;
use serde_json::{json, Value};

use crate::generate::{generate_picked, FinishReason, Generation, SamplingConfig};
use crate::program::LineProgram;
use crate::python_str::python_str;
use crate::Model;

/// One call the policy made: a function name and its arguments — a JSON object, or
/// whatever else the answer wrote there, passed on as it is (TRL calls the tool with it,
/// and a Python tool answers `fn(**arguments)`'s `TypeError`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolCall {
    /// The call as an assistant message's `tool_calls` entry.
    fn to_message_value(&self) -> Value {
        json!({"type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// How a chat template writes a tool call: the response template its answers are read with
/// (TRL's `add_response_schema`, or the tokenizer's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks, text around them being
    /// the message's content (Qwen2.5, Qwen3, Hermes; TRL's `qwen3_template`).
    Hermes,
    /// `<tool_call><function=NAME><parameter=KEY>value</parameter>…</function></tool_call>`
    /// blocks (Qwen3.5, Qwen3.6, Qwen3.8; TRL's `qwen3_5_template`).
    QwenXml,
    /// A JSON object `{"name": …, "parameters": {…}}` ending the answer (Llama 3.1/3.2;
    /// TRL's `llama3_template`).
    Llama3,
    /// `<tool_call>NAME` with `<arg_key>`/`<arg_value>` pairs (GLM-4.5, 4.6; TRL's
    /// `glm4moe_template`).
    Glm4,
    /// `<|tool_call>call:NAME{…}<tool_call|>` (Gemma 4; TRL's `gemma4_template`).
    Gemma4,
    /// `to=functions.NAME<|channel|>commentary json<|message|>{…}<|call|>` (gpt-oss; TRL's
    /// `gptoss_template`).
    GptOss,
    /// `<|tool_call_start|>[NAME(key=value, …), …]<|tool_call_end|>`, Python-style calls
    /// (LFM2.5; TRL's `lfm2_2_5_template`).
    Lfm2,
    /// Qwen3.5's blocks in Nemotron 3's templates (Nano, Super, Ultra, 3.5 Lightning: their
    /// `truncate_history_thinking`), read with TRL's `nemotron_3_template`: the reasoning
    /// is only what a `</think>` closes.
    Nemotron3,
    /// DeepSeek-R1-Distill's template, which writes no calls (it drops an assistant turn's
    /// `tool_calls`): TRL's `deepseek_r1_distill_template` reads reasoning and content, and
    /// the answers never call tools, as in TRL.
    DeepSeekR1,
    /// The tokenizer's own `response_template` (which TRL uses where there is one).
    Native,
}

impl ToolFormat {
    /// The form `tok`'s chat template writes: a conversation with one tool call and its
    /// result is rendered, and the call's text recognised (any, where the tokenizer has a
    /// response template of its own).
    pub fn of(tok: &Tokenizer) -> Result<ToolFormat> {
        let probe = ToolCall {
            name: "probe_tool".into(),
            arguments: json!({"probe_argument": 1}),
        };
        let messages = vec![
            Message::new("user", "q"),
            assistant_calling(std::slice::from_ref(&probe)),
            tool_message("probe_tool", "probe_result"),
        ];
        let text = tok
            .render_chat(&messages, &TemplateArgs::default(), false)
            .map_err(|e| anyhow::anyhow!("the chat template cannot render a tool-calling conversation (user, assistant with tool_calls, tool): {e}"))?;
        if !text.contains("probe_result") {
            bail!("the chat template does not render tool results (a 'tool' message's content is missing from its text)");
        }
        let json_in_block = text
            .split_once("<tool_call>")
            .is_some_and(|(_, call)| call.trim_start().starts_with('{'));
        let format = if tok.response_template()?.is_some() {
            ToolFormat::Native
        } else if text.contains("<function=probe_tool>") {
            let source = tok.chat_template_source().unwrap_or_default();
            match source.contains("truncate_history_thinking") {
                true => ToolFormat::Nemotron3,
                false => ToolFormat::QwenXml,
            }
        } else if text.contains("<|tool_call>call:probe_tool") {
            ToolFormat::Gemma4
        } else if text.contains("to=functions.probe_tool") {
            ToolFormat::GptOss
        } else if text.contains("<|tool_call_start|>[probe_tool(") {
            ToolFormat::Lfm2
        } else if text.contains("<tool_call>probe_tool") {
            ToolFormat::Glm4
        } else if json_in_block {
            ToolFormat::Hermes
        } else if text.contains("{\"name\": \"probe_tool\", \"parameters\"") {
            ToolFormat::Llama3
        } else if text.contains("<｜Assistant｜>") && !text.contains("probe_tool") {
            ToolFormat::DeepSeekR1
        } else {
            bail!("the chat template writes tool calls in a form this version does not parse, and the tokenizer has no response_template of its own (it parses <tool_call>{{…}}</tool_call> as Qwen2.5, Qwen3 and Hermes write them, Qwen3.5's <tool_call><function=…>, Llama 3.1's bare {{\"name\", \"parameters\"}} JSON, GLM-4's <tool_call>NAME<arg_key>…, Gemma 4's <|tool_call>call:NAME{{…}}, gpt-oss's to=functions.NAME and LFM2.5's <|tool_call_start|>[NAME(…)])")
        };
        // Results are appended to the tokens sampled so far: the template must render a
        // conversation's start the same whatever follows (TRL swaps such templates for its
        // training variants).
        suffix_ids(tok, &[("probe_tool".into(), "probe_result".into())])?;
        Ok(format)
    }

    /// The response template its answers are read with.
    fn template(self, tok: &Tokenizer) -> &ResponseTemplate {
        static BUILTIN: OnceLock<Vec<(ToolFormat, ResponseTemplate)>> = OnceLock::new();
        if self == ToolFormat::Native {
            return tok
                .response_template()
                .ok()
                .flatten()
                .expect("ToolFormat::of read it");
        }
        let builtin = BUILTIN.get_or_init(|| {
            use ToolFormat::*;
            [
                (Hermes, "qwen3"),
                (QwenXml, "qwen3_5"),
                (Llama3, "llama3"),
                (Glm4, "glm4moe"),
                (Gemma4, "gemma4"),
                (GptOss, "gptoss"),
                (Lfm2, "lfm2_2_5"),
                (Nemotron3, "nemotron_3"),
                (DeepSeekR1, "deepseek_r1_distill"),
            ]
            .into_iter()
            .map(|(format, name)| {
                let spec = response::builtin_json(name).expect("a built-in");
                (
                    format,
                    ResponseTemplate::from_json(&spec).expect("a valid built-in"),
                )
            })
            .collect()
        });
        &builtin
            .iter()
            .find(|(f, _)| *f == self)
            .expect("every format")
            .1
    }

    /// An answer's tokens `ids` (with the EOS that ended it) after `prefix` (the prompt, or
    /// everything before the answer) as an assistant message: TRL's `parse_response`
    /// ([`data::response`]), its content the plain text where it cannot be read, its calls'
    /// arguments typed by the `tools` the prompt was rendered with.
    pub fn message(
        self,
        tok: &Tokenizer,
        (prefix, ids): (&[i64], &[i64]),
        tools: Option<&Value>,
    ) -> Value {
        self.template(tok).message_of_ids(tok, (prefix, ids), tools)
    }
}

/// The tool calls of an assistant `message` ([`ToolFormat::message`]), `None` where it makes
/// none.
pub fn calls_of(message: &Value) -> Option<Vec<ToolCall>> {
    let calls = message.get("tool_calls")?.as_array()?;
    let calls: Vec<ToolCall> = calls
        .iter()
        .map(|c| ToolCall {
            name: c["function"]["name"].as_str().unwrap_or_default().into(),
            arguments: c["function"]["arguments"].clone(),
        })
        .collect();
    (!calls.is_empty()).then_some(calls)
}

fn assistant_calling(calls: &[ToolCall]) -> Message {
    let mut m = Message::new("assistant", "");
    m.extra.insert(
        "tool_calls".into(),
        Value::Array(calls.iter().map(ToolCall::to_message_value).collect()),
    );
    m
}

fn tool_message(name: &str, content: &str) -> Message {
    let mut m = Message::new("tool", content);
    m.extra.insert("name".into(), name.into());
    m
}

/// The tokens that follow an answer ending in EOS when `results` (`(tool name, content)`)
/// are appended, up to the next assistant turn's generation prompt: TRL's
/// `_get_tool_suffix_ids` (a dummy conversation rendered without and with the tool
/// messages; the first cut after its last EOS).
pub fn suffix_ids(tok: &Tokenizer, results: &[(String, String)]) -> Result<Vec<i64>> {
    let call = ToolCall {
        name: results[0].0.clone(),
        arguments: json!({}),
    };
    let mut messages = vec![Message::new("user", "dummy"), assistant_calling(&[call])];
    let args = TemplateArgs::default();
    let mut prefix = tok.encode(&tok.render_chat(&messages, &args, false)?, false)?;
    messages.extend(results.iter().map(|(n, c)| tool_message(n, c)));
    let full = tok.encode(&tok.render_chat(&messages, &args, true)?, false)?;
    if let Some(eos) = tok.eos_id {
        if let Some(last) = prefix.iter().rposition(|&t| t == eos) {
            prefix.truncate(last + 1);
        }
    }
    if !full.starts_with(&prefix) {
        bail!("the chat template is not prefix-preserving (an answer calling tools renders differently once tool results follow it, as Qwen3's drops its empty think block): give one that is with --chat-template, such as TRL's qwen3_training.jinja");
    }
    Ok(full[prefix.len()..].to_vec())
}

/// A call's answer: its result, or the error it gave (which the policy reads as the
/// result).
pub type Answer = std::result::Result<String, String>;

/// Runs tool calls: `--tool-command`, `--environment-command`, or anything else in tests.
pub trait ToolRunner {
    /// Before a batch's responses are sampled: each row's prompt (its text) and the other
    /// fields of its prompt row. An environment starts one episode per row here, and may
    /// give text to append to the row's prompt (TRL's `reset` observation).
    fn begin(&self, rows: &[(String, PromptFields)]) -> Result<Vec<Option<String>>> {
        Ok(vec![None; rows.len()])
    }
    /// Each call's answer; `rows[i]` is the batch row whose response made `calls[i]`.
    fn run(&self, rows: &[usize], calls: &[ToolCall]) -> Result<Vec<Answer>>;
}

/// `--tool-command`: one `{"name", "arguments"}` line per call, one `{"result": …}` (the
/// content is Python's `str` of it, as TRL writes a tool's return value) or
/// `{"error": "…"}` line back.
pub struct ToolCommand {
    program: LineProgram,
}

impl ToolCommand {
    pub fn start(command: &str, timeout: Duration) -> Result<Self> {
        Ok(ToolCommand {
            program: LineProgram::start(("--tool-command", "--tool-timeout"), command, timeout)?,
        })
    }
}

impl ToolRunner for ToolCommand {
    fn run(&self, _rows: &[usize], calls: &[ToolCall]) -> Result<Vec<Answer>> {
        let requests: Vec<Value> = calls
            .iter()
            .map(|c| json!({"name": c.name, "arguments": c.arguments}))
            .collect();
        call_answers(&self.program, &requests, calls)
    }
}

/// Sends `requests` (one per call of `calls`) and reads each answer line,
/// `{"result": …}` or `{"error": "…"}`.
pub fn call_answers(
    program: &LineProgram,
    requests: &[Value],
    calls: &[ToolCall],
) -> Result<Vec<Answer>> {
    let name = |i: usize| format!("tool call {i} of the batch ({})", calls[i].name);
    let lines = program.ask(requests, &name)?;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let answer = serde_json::from_str::<Value>(line).ok();
            match answer.as_ref().and_then(Value::as_object) {
                Some(a) if a.contains_key("result") => Ok(Ok(python_str(&a["result"]))),
                Some(a) if a.contains_key("error") => Ok(Err(python_str(&a["error"]))),
                _ => Err(program.error(
                    &name(i),
                    &format!(
                        "expected a line {{\"result\": …}} or {{\"error\": \"…\"}}, got '{}'",
                        LineProgram::shown(line)
                    ),
                )),
            }
        })
        .collect()
}

/// `--tools FILE`: a JSON list of tool schemas, as `apply_chat_template(tools=…)` takes them.
pub fn read_schemas(file: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("--tools {}: cannot read it: {e}", file.display()))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Array(_)) => Ok(v),
        Ok(_) => bail!("--tools {}: not a JSON list of tool schemas ([{{\"type\": \"function\", \"function\": {{…}}}}, …])", file.display()),
        Err(e) => bail!("--tools {}: invalid JSON: {e}", file.display()),
    }
}

/// One sampled stretch of an answer: its tokens (the EOS included when it ended with one)
/// and their log-probs at sampling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Segment {
    pub ids: Vec<i64>,
    pub logprobs: Vec<f32>,
    pub eos: bool,
}

/// A whole response after the tool loop: sampled segments with the tool results between
/// them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolResponse {
    pub ids: Vec<i64>,
    pub logprobs: Vec<f32>,
    /// 1 on sampled tokens, 0 on tool-result tokens.
    pub sampled: Vec<bool>,
    /// Whether its last segment ended with an EOS.
    pub eos: bool,
    /// The response as TRL's reward functions get it with tools: each sampled segment an
    /// assistant message ([`ToolFormat::message`]), each result a `tool` message
    /// (`{"role": "tool", "name", "content"}`).
    pub messages: Vec<Value>,
}

/// What the loop did, for `tools/call_frequency` and `tools/failure_frequency`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ToolStats {
    pub calls: usize,
    pub failures: usize,
}

impl ToolStats {
    /// TRL's `tools/call_frequency` (calls per response) and `tools/failure_frequency` (the
    /// failed share of the calls) of these counts over `responses`, over every rank.
    pub fn frequencies(&self, responses: f64, world: &crate::World) -> [(&'static str, f64); 2] {
        let [calls, failures, responses] =
            world.sums([self.calls as f64, self.failures as f64, responses]);
        let failed = if calls > 0.0 { failures / calls } else { 0.0 };
        [
            ("tools/call_frequency", calls / responses.max(1.0)),
            ("tools/failure_frequency", failed),
        ]
    }
}

/// Each row of a generation as a segment: its tokens and log-probs up to its length.
pub fn segments(g: &Generation) -> Result<Vec<Segment>> {
    let tokens = Vec::<Vec<i64>>::try_from(g.tokens.to_device(tch::Device::Cpu))?;
    let logprobs = Vec::<Vec<f32>>::try_from(
        g.logprobs
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float),
    )?;
    Ok(tokens
        .into_iter()
        .zip(logprobs)
        .zip(g.lengths.iter().zip(&g.finish))
        .map(|((t, lp), (&len, finish))| Segment {
            ids: t[..len as usize].to_vec(),
            logprobs: lp[..len as usize].to_vec(),
            eos: *finish == FinishReason::Eos,
        })
        .collect())
}

/// The seed of a tool loop's `iteration`-th round of continuations.
fn continuation_seed(seed: u64, iteration: usize) -> u64 {
    seed.wrapping_add((iteration as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A run's tools: the form its chat template writes calls in, the program that runs them,
/// and the most rounds of calls in one response (`--max-tool-calling-iterations`).
pub struct Tools {
    pub format: ToolFormat,
    /// `--tool-command`'s program (or `ppo train --environment-command`'s, shared with its
    /// reward source).
    pub runner: std::sync::Arc<dyn ToolRunner>,
    pub max_iterations: usize,
}

impl Tools {
    /// `first`, `model`'s answers to `prompts` (unpadded), through [`ToolLoop::run`]: the
    /// continuations are sampled by `model` with `cfg` (a round's own seed, at most
    /// `cfg.max_new_tokens` tokens a whole response, tool results included, and no more
    /// than its positions hold), `chunk` rows at a time, each row with the random numbers
    /// of its number among `rows` (`offset..` of `total`), so a resumed run or another
    /// split over ranks samples the same. `schemas`: each row's tool schemas.
    pub fn run(
        &self,
        (model, tok): (&Model, &Tokenizer),
        (prompts, first): (&[Vec<i64>], &Generation),
        (cfg, chunk, (offset, total)): (&SamplingConfig, usize, (i64, i64)),
        schemas: &[Option<Value>],
    ) -> Result<(Vec<ToolResponse>, ToolStats)> {
        let looped = ToolLoop {
            format: self.format,
            tokenizer: tok,
            runner: &*self.runner,
            budget: cfg.max_new_tokens as usize,
            max_len: model.max_positions().unwrap_or(usize::MAX),
            max_iterations: self.max_iterations,
            schemas,
        };
        let mut continue_rows = |rows: &[usize], continued: &[Vec<i64>], iteration, max_new| {
            let refs: Vec<&[i64]> = continued.iter().map(Vec::as_slice).collect();
            let batch = data::prompts::collate_left(&refs, cfg.pad_id, model.device());
            let cfg = SamplingConfig {
                max_new_tokens: max_new as i64,
                seed: continuation_seed(cfg.seed, iteration),
                ..cfg.clone()
            };
            let global: Vec<i64> = rows.iter().map(|&r| offset + r as i64).collect();
            let g = generate_picked(
                model,
                &batch.input_ids,
                &batch.attention_mask,
                &cfg,
                chunk,
                (&global, total),
            );
            segments(&g)
        };
        looped.run(prompts, segments(first)?, &mut continue_rows)
    }
}

/// What the loop needs to know of the run.
pub struct ToolLoop<'a> {
    pub format: ToolFormat,
    pub tokenizer: &'a Tokenizer,
    pub runner: &'a dyn ToolRunner,
    /// `--response-length`: the most tokens of a whole response, tool results included.
    pub budget: usize,
    /// The longest sequence the policy's positions hold.
    pub max_len: usize,
    pub max_iterations: usize,
    /// Each row's tool schemas, where its prompt was rendered with some: a call's text
    /// arguments are typed by them (none given: none typed).
    pub schemas: &'a [Option<Value>],
}

/// `generate(rows, prompts, iteration, max_new)`: one segment for each of `rows`, continuing
/// `prompts` (unpadded), at most `max_new` tokens.
pub type Continue<'g> = dyn FnMut(&[usize], &[Vec<i64>], usize, usize) -> Result<Vec<Segment>> + 'g;

impl ToolLoop<'_> {
    /// TRL's `_tool_call_loop`: `first` are the answers to `prompts`; while some of the
    /// latest segments call tools (and fewer than `max_iterations` rounds have run), the
    /// calls are run, their results' tokens appended, and those rows continued. A row whose
    /// results would not fit (`budget`, `max_len`) stops where it is, the results dropped.
    pub fn run(
        &self,
        prompts: &[Vec<i64>],
        first: Vec<Segment>,
        generate: &mut Continue,
    ) -> Result<(Vec<ToolResponse>, ToolStats)> {
        let mut stats = ToolStats::default();
        let mut calls: Vec<(usize, Vec<ToolCall>)> = vec![];
        let mut out: Vec<ToolResponse> = first
            .into_iter()
            .enumerate()
            .map(|(row, seg)| {
                let message = self.message((&prompts[row], &seg.ids), row);
                if let Some(c) = calls_of(&message) {
                    calls.push((row, c));
                }
                ToolResponse {
                    sampled: vec![true; seg.ids.len()],
                    ids: seg.ids,
                    logprobs: seg.logprobs,
                    eos: seg.eos,
                    messages: vec![message],
                }
            })
            .collect();
        let mut iteration = 0;
        while !calls.is_empty() && iteration < self.max_iterations {
            let flat: Vec<ToolCall> = calls.iter().flat_map(|(_, c)| c.clone()).collect();
            let flat_rows: Vec<usize> = calls
                .iter()
                .flat_map(|(row, c)| std::iter::repeat_n(*row, c.len()))
                .collect();
            stats.calls += flat.len();
            let mut results = self.runner.run(&flat_rows, &flat)?.into_iter();
            let mut rows = vec![];
            let mut continued = vec![];
            for (row, row_calls) in &calls {
                let messages: Vec<(String, String)> = row_calls
                    .iter()
                    .map(|call| match results.next().expect("one result per call") {
                        Ok(content) => (call.name.clone(), content),
                        Err(e) => {
                            stats.failures += 1;
                            (call.name.clone(), python_str(&json!({"error": e})))
                        }
                    })
                    .collect();
                let suffix = suffix_ids(self.tokenizer, &messages)?;
                let r = &out[*row];
                let used = r.ids.len() + suffix.len();
                let whole = prompts[*row].len() + used;
                if used > self.budget || whole >= self.max_len {
                    continue; // TRL's overlong rule: the row ends with its answer as it is
                }
                let r = &mut out[*row];
                r.messages.extend(
                    messages
                        .iter()
                        .map(|(n, c)| json!({"role": "tool", "name": n, "content": c})),
                );
                r.ids.extend(&suffix);
                r.logprobs.extend(std::iter::repeat_n(0.0, suffix.len()));
                r.sampled.extend(std::iter::repeat_n(false, suffix.len()));
                rows.push(*row);
                continued.push([prompts[*row].as_slice(), &r.ids].concat());
            }
            if rows.is_empty() {
                break;
            }
            let rooms: Vec<usize> = rows
                .iter()
                .map(|&r| self.budget - out[r].ids.len())
                .collect();
            // A row the results filled to the budget continues with nothing (TRL generates
            // and cuts to nothing); the others are continued together.
            let live: Vec<usize> = (0..rows.len()).filter(|&i| rooms[i] > 0).collect();
            let mut segments = vec![Segment::default(); rows.len()];
            if let Some(max_new) = live.iter().map(|&i| rooms[i]).max() {
                let pick = |i: &usize| rows[*i];
                let generated = generate(
                    &live.iter().map(pick).collect::<Vec<_>>(),
                    &live
                        .iter()
                        .map(|&i| continued[i].clone())
                        .collect::<Vec<_>>(),
                    iteration,
                    max_new,
                )?;
                for (&i, seg) in live.iter().zip(generated) {
                    segments[i] = seg;
                }
            }
            calls.clear();
            for (((&row, &room), mut seg), before) in
                rows.iter().zip(&rooms).zip(segments).zip(&continued)
            {
                if seg.ids.len() > room {
                    seg.ids.truncate(room);
                    seg.logprobs.truncate(room);
                    seg.eos = false;
                }
                let r = &mut out[row];
                if !seg.ids.is_empty() {
                    let message = self.message((before, &seg.ids), row);
                    if let Some(c) = calls_of(&message) {
                        calls.push((row, c));
                    }
                    r.messages.push(message);
                }
                r.sampled.extend(std::iter::repeat_n(true, seg.ids.len()));
                r.ids.extend(seg.ids);
                r.logprobs.extend(seg.logprobs);
                r.eos = seg.eos;
            }
            iteration += 1;
        }
        Ok((out, stats))
    }

    /// Row `row`'s answer `ids` after `prefix` as its message.
    fn message(&self, (prefix, ids): (&[i64], &[i64]), row: usize) -> Value {
        let tools = self.schemas.get(row).and_then(Option::as_ref);
        self.format.message(self.tokenizer, (prefix, ids), tools)
    }
}
