//! `--environment-command` (TRL's `environment_factory`): tools with state, one
//! environment per response, over the tool loop of [`common::tools`] (re-exported here).

use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use common::program::LineProgram;
use data::formats::PromptFields;
use serde_json::{json, Map, Value};

pub use common::tools::*;

use crate::reward_fn::{ask_rewards, RewardFunction, RewardInput};

/// `--environment-command`: TRL's `environment_factory` as one program holding one
/// environment per response (an episode). Before a batch is sampled it gets one line per
/// response, `{"reset": E, "prompt": …, …the prompt row's other fields}`, and answers each
/// with a JSON object, `{}` or `{"observation": "…"}` (text appended to the prompt's last
/// message, as TRL appends what `reset` returns); the calls of response E come
/// as `{"episode": E, "name", "arguments"}` and are answered as `--tool-command`'s; with
/// `--environment-reward`, once the responses are complete, `{"get_reward": E}` gets
/// `{"reward": x}` (TRL's `get_reward`). Episode numbers count up from 0 over the run (in
/// each process) and are never reused.
pub struct EnvironmentCommand {
    program: LineProgram,
    /// The episodes of the batch being sampled, one per row; the next free number.
    episodes: Mutex<(Vec<u64>, u64)>,
}

impl EnvironmentCommand {
    pub fn start(command: &str, timeout: Duration) -> Result<Self> {
        Ok(EnvironmentCommand {
            program: LineProgram::start(
                ("--environment-command", "--tool-timeout"),
                command,
                timeout,
            )?,
            episodes: Mutex::new((vec![], 0)),
        })
    }

    fn episodes(&self) -> Vec<u64> {
        self.episodes.lock().expect("not poisoned").0.clone()
    }
}

impl ToolRunner for EnvironmentCommand {
    fn begin(&self, rows: &[(String, PromptFields)]) -> Result<Vec<Option<String>>> {
        let first = {
            let mut e = self.episodes.lock().expect("not poisoned");
            let first = e.1;
            e.0 = (first..first + rows.len() as u64).collect();
            e.1 += rows.len() as u64;
            first
        };
        let requests: Vec<Value> = rows
            .iter()
            .enumerate()
            .map(|(i, (prompt, fields))| {
                let mut line = Map::new();
                line.insert("reset".into(), json!(first + i as u64));
                line.insert("prompt".into(), json!(prompt));
                line.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                Value::Object(line)
            })
            .collect();
        let name = |i: usize| format!("the reset of episode {}", first + i as u64);
        let lines = self.program.ask(&requests, &name)?;
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let answer = serde_json::from_str::<Value>(line).ok();
                let problem = match answer.as_ref().and_then(Value::as_object) {
                    None => format!(
                        "expected a JSON object ({{}} or {{\"observation\": \"…\"}}), got '{}'",
                        LineProgram::shown(line)
                    ),
                    Some(a) if a.contains_key("error") => format!("it failed: {}", a["error"]),
                    Some(a) => match a.get("observation") {
                        None | Some(Value::Null) => return Ok(None),
                        Some(Value::String(text)) => return Ok(Some(text.clone())),
                        Some(other) => {
                            format!("its observation must be a string or null, got {other}")
                        }
                    },
                };
                Err(self.program.error(&name(i), &problem))
            })
            .collect()
    }

    fn run(&self, rows: &[usize], calls: &[ToolCall]) -> Result<Vec<Answer>> {
        let episodes = self.episodes();
        let requests: Vec<Value> = rows
            .iter()
            .zip(calls)
            .map(|(&row, c)| json!({"episode": episodes[row], "name": c.name, "arguments": c.arguments}))
            .collect();
        call_answers(&self.program, &requests, calls)
    }
}

impl RewardFunction for EnvironmentCommand {
    fn scores(&self, input: &RewardInput) -> Result<Vec<f64>> {
        let episodes = self.episodes();
        anyhow::ensure!(
            episodes.len() == input.texts.len(),
            "--environment-reward: {} responses to score, {} episodes begun",
            input.texts.len(),
            episodes.len()
        );
        let requests: Vec<Value> = episodes.iter().map(|e| json!({"get_reward": e})).collect();
        let name = |i: usize| format!("the reward of episode {}", episodes[i]);
        ask_rewards(&self.program, &requests, &name)
    }
}
