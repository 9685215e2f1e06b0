//! `sft eval --tasks`: lm-evaluation-harness task files run on a model, with lm-eval's
//! numbers. The task side (prompts, filters, metrics) is `data::lmeval`; here the model
//! answers: the log-likelihood of each (context, continuation) pair as HF's `HFLM`
//! computes it, and greedy or sampled generations cut at the task's stop strings.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use common::generate::{generate_in_chunks, SamplingConfig};
use common::models::TokenSpec;
use common::Model;
use data::lmeval::metrics::{mean, mean_stderr, multiple_choice, Metric};
use data::lmeval::task::{chat_messages, move_trailing_space, plain_text, Doc, Turn};
use data::lmeval::{OutputType, PromptOptions, Task};
use data::sft::{collate, TokenizedSft};
use data::{Message, TemplateArgs, Tokenizer};
use serde_json::{json, Map, Value};
use tch::Kind;

#[derive(Debug, Clone, Default, Args)]
pub struct TaskArgs {
    /// lm-evaluation-harness task files (YAML), comma-separated or repeated; runs them
    /// instead of the NLL of --data.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<PathBuf>,
    /// Shots per prompt, over the task file's num_fewshot.
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// Evaluate only the first N documents of each task (the shot pool stays whole).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seeds the `default` shot sampler and sampled generations.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Render prompts with the model's chat template.
    #[arg(long)]
    pub apply_chat_template: bool,
    /// With --apply-chat-template: each shot as its own user and assistant turns (the
    /// default, as in lm-eval 0.4.13); `false` folds the shots into one user message.
    #[arg(long, requires = "apply_chat_template", num_args = 0..=1, default_missing_value = "true")]
    pub fewshot_as_multiturn: Option<bool>,
    /// A system instruction put before the task's description.
    #[arg(long)]
    pub system_instruction: Option<String>,
}

/// What the evaluation needs besides the task.
pub struct Evaluator<'a> {
    pub model: &'a Model,
    pub tok: &'a Tokenizer,
    pub args: &'a TaskArgs,
    pub batch_size: usize,
    /// The longest sequence scored or generated (the model's limit, or --max-length).
    pub max_length: usize,
}

/// A document's results: its sample lines (one per filter) and its metric values.
struct Scored {
    samples: Vec<Value>,
    /// `(metric, filter) → value`.
    values: Vec<((String, String), f64)>,
}

impl Evaluator<'_> {
    /// Runs every task; returns each task's summary line and the per-sample lines.
    pub fn run(&self) -> Result<(Vec<Value>, Vec<Value>)> {
        let options = PromptOptions {
            num_fewshot: self.args.num_fewshot,
            system_instruction: self.args.system_instruction.clone(),
            chat: self.args.apply_chat_template,
        };
        let (mut summaries, mut samples) = (vec![], vec![]);
        for path in &self.args.tasks {
            let task = Task::load(path, &options)?;
            let n = self.args.limit.unwrap_or(usize::MAX).min(task.docs.len());
            let contexts = self.contexts(&task, n)?;
            let scored = match task.config.output_type {
                OutputType::GenerateUntil => self.generate_task(&task, &contexts)?,
                _ => self.loglikelihood_task(&task, &contexts)?,
            };
            summaries.push(summary(&task, &scored));
            samples.extend(scored.into_iter().flat_map(|s| s.samples));
        }
        Ok((summaries, samples))
    }

    /// Every document's rendered prompts (one, or one per choice for a cloze task).
    fn contexts(&self, task: &Task, n: usize) -> Result<Vec<Vec<String>>> {
        let mut rng = Task::shot_rng(self.args.seed);
        (0..n)
            .map(|i| {
                let shots = task.shots(i, &mut rng)?;
                task.prompts(&task.docs[i], &shots)?
                    .iter()
                    .map(|turns| self.render(turns))
                    .collect()
            })
            .collect()
    }

    fn render(&self, turns: &[Turn]) -> Result<String> {
        if !self.args.apply_chat_template {
            return Ok(plain_text(turns));
        }
        let messages = |turns: &[Turn]| -> Vec<Message> {
            chat_messages(turns, self.args.fewshot_as_multiturn.unwrap_or(true))
                .into_iter()
                .map(|(role, content)| Message::new(role, &content))
                .collect()
        };
        let args = TemplateArgs::default();
        match self.tok.render_chat(&messages(turns), &args, true) {
            Ok(text) => Ok(text),
            // lm-eval retries without the system turn when a template refuses it.
            Err(e) if turns.first().is_some_and(|t| t.role == "system") => {
                tracing::warn!("{e}: rendering again without the system turn");
                Ok(self.tok.render_chat(&messages(&turns[1..]), &args, true)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// HFLM's `tok_encode`: the tokenizer's special tokens, unless the text already starts
    /// with the BOS (or, without one, the EOS) token's text.
    fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let prefix = self.prefix_token().map(|id| self.tok.decode(&[id], false));
        let starts = prefix.is_some_and(|p| !p.is_empty() && text.starts_with(&p));
        Ok(self.tok.encode(text, !starts)?)
    }

    fn prefix_token(&self) -> Option<i64> {
        self.tok.bos_id.or(self.tok.eos_id)
    }

    /// The token ids of context + continuation and how many at the end are the
    /// continuation, as HFLM's `loglikelihood` splits them.
    fn encode_pair(&self, context: &str, continuation: &str) -> Result<(Vec<i64>, usize)> {
        if context.is_empty() {
            let cont = self.tok.encode(continuation, false)?;
            let prefix = self.prefix_token().unwrap_or(0);
            if cont.first() == Some(&prefix) {
                let n = cont.len() - 1;
                return Ok((cont, n));
            }
            let n = cont.len();
            return Ok(([vec![prefix], cont].concat(), n));
        }
        let (context, continuation) = move_trailing_space(context, continuation);
        let whole = self.encode(&format!("{context}{continuation}"))?;
        let n_continuation = whole.len() - self.encode(&context)?.len().min(whole.len());
        Ok((whole, n_continuation))
    }

    /// `(sum of log-probs, greedy)` of each pair, `--batch-size` rows per forward; the row
    /// cut on the left to `max_length + 1` tokens as HFLM cuts it.
    fn loglikelihoods(&self, pairs: &[(String, String)]) -> Result<Vec<(f64, bool)>> {
        let _guard = tch::no_grad_guard();
        let rows = pairs
            .iter()
            .map(|(c, x)| {
                let (ids, n_cont) = self.encode_pair(c, x)?;
                let keep = ids.len().min(self.max_length + 1);
                let ids = ids[ids.len() - keep..].to_vec();
                let mut loss_mask = vec![0; ids.len()];
                let start = ids.len().saturating_sub(n_cont).max(1);
                loss_mask[start..].iter_mut().for_each(|m| *m = 1);
                Ok(TokenizedSft::new(ids, loss_mask))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(self.batch_size) {
            let refs: Vec<_> = chunk.iter().collect();
            let batch = collate(&refs, self.tok.pad_id, self.model.device());
            let t = batch.input_ids.size()[1];
            let hidden = self
                .model
                .hidden(&batch.input_ids, &batch.attention_mask, None)
                .narrow(1, 0, t - 1);
            let labels = batch.input_ids.narrow(1, 1, t - 1);
            let spec = TokenSpec {
                greedy: true,
                ..TokenSpec::default()
            };
            let o = self.model.token_outputs(&hidden, &labels, spec);
            let mask = batch.loss_mask.narrow(1, 1, t - 1);
            let sums = (o.logprobs.to_kind(Kind::Double) * mask.to_kind(Kind::Double))
                .sum_dim_intlist([1].as_slice(), false, Kind::Double);
            let misses = (o.greedy.expect("asked for").logical_not() * &mask).sum_dim_intlist(
                [1].as_slice(),
                false,
                Kind::Int64,
            );
            let sums = Vec::<f64>::try_from(sums.to_device(tch::Device::Cpu))?;
            let misses = Vec::<i64>::try_from(misses.to_device(tch::Device::Cpu))?;
            out.extend(sums.into_iter().zip(misses.into_iter().map(|m| m == 0)));
        }
        Ok(out)
    }

    fn loglikelihood_task(&self, task: &Task, contexts: &[Vec<String>]) -> Result<Vec<Scored>> {
        let requests = contexts
            .iter()
            .enumerate()
            .map(|(i, c)| task.loglikelihood_requests(&task.docs[i], c))
            .collect::<data::Result<Vec<_>>>()?;
        let flat: Vec<(String, String)> = requests.iter().flatten().cloned().collect();
        let mut results = self.loglikelihoods(&flat)?.into_iter();
        let mut out = vec![];
        for (i, reqs) in requests.iter().enumerate() {
            let doc = &task.docs[i];
            let res: Vec<(f64, bool)> = results.by_ref().take(reqs.len()).collect();
            let lls: Vec<f64> = res.iter().map(|r| r.0).collect();
            let mut values = vec![];
            if task.config.output_type == OutputType::MultipleChoice {
                let golds = task.gold_choices(doc)?;
                // acc_norm divides by the choices' lengths (for a cloze task, as lm-eval
                // does, the lengths of the contexts the choices make).
                let choices = task.doc_to_choice(doc, None)?;
                let (acc, acc_norm) = multiple_choice(&lls, &choices, &golds);
                for m in &task.config.metrics {
                    let v = if matches!(m, Metric::AccNorm) {
                        acc_norm
                    } else {
                        acc
                    };
                    values.push(((m.name().to_string(), "none".to_string()), v));
                }
            } else {
                values.push((
                    ("acc".to_string(), "none".to_string()),
                    f64::from(u8::from(res[0].1)),
                ));
            }
            let resps: Vec<Value> = res.iter().map(|(ll, g)| json!([[ll, g]])).collect();
            let filtered: Vec<Value> = res.iter().map(|(ll, g)| json!([ll, g])).collect();
            let mut sample = sample_line(task, i, doc, &reqs[0].0, "none", &values)?;
            sample.insert("arguments".into(), json!(reqs));
            sample.insert("resps".into(), Value::Array(resps));
            sample.insert("filtered_resps".into(), Value::Array(filtered));
            out.push(Scored {
                samples: vec![Value::Object(sample)],
                values,
            });
        }
        Ok(out)
    }

    /// Each document's `repeats` responses: greedy, or sampled with the task's temperature.
    fn generations(&self, task: &Task, contexts: &[Vec<String>]) -> Result<Vec<Vec<String>>> {
        let g = &task.config.generation;
        let repeats = task.config.repeats;
        let room = self.max_length.saturating_sub(g.max_gen_toks).max(1);
        let prompts = contexts
            .iter()
            .map(|c| {
                let ids = self.encode(&c[0])?;
                Ok(ids[ids.len().saturating_sub(room)..].to_vec())
            })
            .collect::<Result<Vec<_>>>()?;
        // Greedy repeats are all the same answer: generate it once.
        let copies = if g.do_sample { repeats } else { 1 };
        let rows: Vec<&[i64]> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.as_slice(), copies))
            .collect();
        // Sampling as transformers' generate samples the model (lm-eval passes only
        // do_sample and temperature): the generation config's top-k and top-p.
        let (top_k, top_p) = self.tok.generation_sampling()?;
        let eos_ids = self.tok.generation_eos_ids()?;
        let mut texts = Vec::with_capacity(rows.len());
        for (b, chunk) in rows.chunks(self.batch_size.max(1) * copies).enumerate() {
            let cfg = SamplingConfig {
                max_new_tokens: g.max_gen_toks as i64,
                temperature: if g.do_sample { g.temperature } else { 0.0 },
                top_k,
                top_p,
                min_p: 0.0,
                repetition_penalty: 1.0,
                eos_ids: eos_ids.clone(),
                pad_id: self.tok.pad_id,
                seed: self.args.seed.wrapping_add(b as u64),
                cuda_graph: true,
            };
            let batch = data::prompts::collate_left(chunk, self.tok.pad_id, self.model.device());
            let gen = generate_in_chunks(
                self.model,
                &batch.input_ids,
                &batch.attention_mask,
                &cfg,
                chunk.len(),
            );
            let tokens = Vec::<Vec<i64>>::try_from(gen.tokens.to_device(tch::Device::Cpu))?;
            for (ids, len) in tokens.iter().zip(&gen.lengths) {
                let text = self.tok.decode(&ids[..*len as usize], true);
                texts.push(cut_at_stops(&text, &g.until));
            }
        }
        Ok(texts
            .chunks(copies)
            .map(|c| c.iter().cycle().take(repeats).cloned().collect())
            .collect())
    }

    fn generate_task(&self, task: &Task, contexts: &[Vec<String>]) -> Result<Vec<Scored>> {
        let responses = self.generations(task, contexts)?;
        let g = &task.config.generation;
        let gen_kwargs = json!({"until": g.until, "max_gen_toks": g.max_gen_toks, "do_sample": g.do_sample, "temperature": g.temperature});
        let mut out = vec![];
        for (i, resps) in responses.iter().enumerate() {
            let doc = &task.docs[i];
            let golds = task.gold_texts(doc)?;
            let mut scored = Scored {
                samples: vec![],
                values: vec![],
            };
            for pipeline in &task.config.filters {
                let answer = pipeline.apply(resps);
                let mut values = vec![];
                for m in &task.config.metrics {
                    if let Metric::ExactMatch(em) = m {
                        let v = golds
                            .iter()
                            .map(|gold| em.score(&answer, gold))
                            .fold(0.0, f64::max);
                        values.push(((m.name().to_string(), pipeline.name.clone()), v));
                    }
                }
                let mut sample =
                    sample_line(task, i, doc, &contexts[i][0], &pipeline.name, &values)?;
                sample.insert("arguments".into(), json!([[contexts[i][0], gen_kwargs]]));
                sample.insert("resps".into(), json!([resps]));
                sample.insert("filtered_resps".into(), json!([answer]));
                scored.samples.push(Value::Object(sample));
                scored.values.extend(values);
            }
            out.push(scored);
        }
        Ok(out)
    }
}

/// The text before the first of the stop strings (lm-eval cuts at each in turn).
pub fn cut_at_stops(text: &str, until: &[String]) -> String {
    let mut s = text;
    for stop in until.iter().filter(|s| !s.is_empty()) {
        if let Some(i) = s.find(stop.as_str()) {
            s = &s[..i];
        }
    }
    s.to_string()
}

/// A per-sample line with lm-eval's fields (`doc_id`, `doc`, `target`, `filter`,
/// `metrics`, each metric's value) and the full `prompt`.
fn sample_line(
    task: &Task,
    doc_id: usize,
    doc: &Doc,
    prompt: &str,
    filter: &str,
    values: &[((String, String), f64)],
) -> Result<Map<String, Value>> {
    let mut m = Map::new();
    m.insert("task".into(), json!(task.config.task));
    m.insert("doc_id".into(), json!(doc_id));
    m.insert("doc".into(), Value::Object(doc.clone()));
    m.insert("target".into(), task.doc_to_target(doc, None)?.to_json());
    m.insert("prompt".into(), json!(prompt));
    m.insert("filter".into(), json!(filter));
    m.insert(
        "metrics".into(),
        json!(values
            .iter()
            .map(|((name, _), _)| name.clone())
            .collect::<Vec<_>>()),
    );
    for ((name, _), v) in values {
        m.insert(name.clone(), json!(v));
    }
    Ok(m)
}

/// A task's summary line: `"metric,filter"` keys with their `_stderr` twins (`"N/A"`
/// below two documents), as lm-eval's results.
fn summary(task: &Task, scored: &[Scored]) -> Value {
    let mut keys: Vec<(String, String)> = vec![];
    for s in scored {
        for (k, _) in &s.values {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    let mut m = Map::new();
    m.insert("task".into(), json!(task.config.task));
    m.insert("num_fewshot".into(), json!(task.num_fewshot));
    m.insert("sample_len".into(), json!(scored.len()));
    for (metric, filter) in keys {
        let xs: Vec<f64> = scored
            .iter()
            .flat_map(|s| {
                s.values
                    .iter()
                    .filter(|(k, _)| k.0 == metric && k.1 == filter)
                    .map(|(_, v)| *v)
            })
            .collect();
        m.insert(format!("{metric},{filter}"), json!(mean(&xs)));
        m.insert(
            format!("{metric}_stderr,{filter}"),
            mean_stderr(&xs).map_or(json!("N/A"), |s| json!(s)),
        );
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_cut_at_the_first() {
        let until = vec!["\n\n".to_string(), "Q:".to_string(), String::new()];
        assert_eq!(cut_at_stops("12 rabbits\n\nQ: next", &until), "12 rabbits");
        assert_eq!(cut_at_stops("12 Q: x\n\ny", &until), "12 ");
        assert_eq!(cut_at_stops("no stop", &until), "no stop");
    }
}
