//! A rollout: sample responses to a batch of prompts with the KV cache, then score every
//! sampled token once under the policy, the reference and the critic when there is one
//! (no gradient), and the whole response under the reward.

use anyhow::{Context, Result};
use common::generate::{generate_rows, FinishReason, Generation, SamplingConfig};
use common::models::adapter::without_adapters;
use common::models::TokenSpec;
use common::Model;
use data::Tokenizer;
use tch::{Kind, Tensor};

use crate::reward_fn::{Logged, RewardInput, RewardSource};
use crate::tools::{ToolResponse, ToolStats, Tools};
use data::formats::{Content, PromptExample, PromptFields};

/// Everything PPO needs of one batch, `[B, N]` over response tokens unless noted.
pub struct Rollout {
    /// Prompt and response, `[B, P + N]` (prompt left-padded, response right-padded).
    pub full_ids: Tensor,
    pub full_mask: Tensor,
    pub prompt_len: i64,
    pub response: Tensor,
    /// 1 on sampled tokens (the EOS included), f32.
    pub mask: Tensor,
    pub logprobs: Tensor,
    /// The decoding forward's log-probs of the sampled tokens (with the KV cache, at the
    /// temperature, before top-k/top-p filtering and the repetition penalty); `logprobs`
    /// recomputes them with the training forward.
    pub sampler_logprobs: Tensor,
    /// `--sampling-correction`'s weight on each token's policy loss `[B, N]`, when asked
    /// for ([`crate::math::sampling_correction`]).
    pub correction: Option<Tensor>,
    pub ref_logprobs: Tensor,
    /// The critic's values, when the run has a critic.
    pub values: Option<Tensor>,
    pub entropy: Tensor,
    /// Reward per response `[B]`: the weighted sum of the sources, after the missing-EOS
    /// penalty and clipping.
    pub scores: Tensor,
    /// Each source's name in the metrics (`rewards/NAME/mean`).
    pub source_names: Vec<&'static str>,
    /// Each source's own scores `[B, K]` (before weighting, penalty and clipping; NaN where
    /// it did not score a response), and its weight: what GDPO normalises one source at a
    /// time.
    pub source_scores: Tensor,
    pub source_weights: Vec<f64>,
    pub ended_with_eos: Vec<bool>,
    pub prompts: Vec<Vec<i64>>,
    pub texts: Vec<String>,
    /// What the reward sources logged beside their scores (their metrics, each response's
    /// extra columns).
    pub logged: Logged,
    /// Largest |log-prob at sampling − log-prob recomputed|: should be ~0.
    pub logprob_check: f64,
    /// With `--filter-groups`: how many batches of prompts were sampled to fill it.
    pub gen_batches: Option<usize>,
    /// With tools: how many calls the responses made, and how many failed.
    pub tool_stats: Option<ToolStats>,
    /// SDFT: the teacher's prompts before the same responses.
    pub teacher: Option<crate::sdft::TeacherInputs>,
}

impl Rollout {
    /// The responses' mask `[B, N]`: 1 on every sampled token and tool result, the EOS
    /// included (`mask` leaves the tool results out).
    pub fn response_mask(&self) -> Tensor {
        let n = self.response.size()[1];
        self.full_mask.narrow(1, self.prompt_len, n)
    }
}

/// `[B, N]` log-probs (at `temperature`) and entropies of the response tokens; the
/// entropies keep their graph only with `entropy_grad` (an entropy bonus in the loss).
pub fn response_logprobs(
    model: &Model,
    full_ids: &Tensor,
    full_mask: &Tensor,
    prompt_len: i64,
    (temperature, entropy_grad): (f64, bool),
) -> (Tensor, Tensor) {
    let n = full_ids.size()[1] - prompt_len;
    let hidden = model
        .hidden(full_ids, full_mask, None)
        .narrow(1, prompt_len - 1, n);
    let response = full_ids.narrow(1, prompt_len, n);
    let spec = TokenSpec {
        temperature,
        entropy: true,
        entropy_grad,
        ..TokenSpec::default()
    };
    let out = model.token_outputs(&hidden, &response, spec);
    (out.logprobs, out.entropy.expect("asked for"))
}

/// `[B, N]` values: the value of the state before each response token.
pub fn response_values(
    model: &Model,
    full_ids: &Tensor,
    full_mask: &Tensor,
    prompt_len: i64,
) -> Tensor {
    let n = full_ids.size()[1] - prompt_len;
    model
        .forward(full_ids, full_mask)
        .narrow(1, prompt_len - 1, n)
        .to_kind(Kind::Float)
}

/// Where the rollout's reference log-probs come from.
#[derive(Clone, Copy)]
pub enum RefModel<'a> {
    /// A frozen copy of the starting policy.
    Frozen(&'a Model),
    /// The policy with its adapters switched off (a fresh LoRA or soft prompt).
    AdapterOff,
    /// None is held (`--kl-coef 0`: the KL penalty weighs nothing): the reference
    /// log-probs are the policy's, every KL estimate exactly 0.
    NotHeld,
}

pub struct RolloutModels<'a> {
    pub policy: &'a Model,
    pub reference: RefModel<'a>,
    pub critic: Option<&'a Model>,
    pub rewards: &'a [RewardSource<'a>],
    pub tokenizer: &'a Tokenizer,
    /// `--tool-command` or `--environment-command`: responses may call tools
    /// ([`crate::tools`]).
    pub tools: Option<&'a Tools>,
}

/// The weighted sum of every source's scores, and each source's scores (`[source][row]`),
/// the sources working at once where they can (`RewardFunction::begin`).
/// A source that answered null for a response (NaN: it does not apply, TRL's `None`) is
/// left out of that response's sum; a response no source scored gets NaN (TRL's
/// unscorable completion). With them, what the sources logged.
fn summed_rewards(
    sources: &[RewardSource],
    input: &RewardInput,
) -> Result<(Vec<f64>, Vec<Vec<f64>>, Logged)> {
    let mut scores = vec![f64::NAN; input.texts.len()];
    let mut by_source = vec![];
    let mut logged = Logged::default();
    // Every program gets its requests before any answer is awaited: they work at once.
    for source in sources {
        source.function.begin(input)?;
    }
    for source in sources {
        let s = source.function.scores(input)?;
        anyhow::ensure!(
            s.len() == scores.len(),
            "reward source {} gave {} scores for {} responses",
            source.name,
            s.len(),
            scores.len()
        );
        for (total, x) in scores.iter_mut().zip(&s) {
            if !x.is_nan() {
                *total = if total.is_nan() { 0.0 } else { *total } + source.weight * x;
            }
        }
        by_source.push(s);
        logged.merge(source.function.logged());
    }
    Ok((scores, by_source, logged))
}

pub struct RolloutOptions {
    pub sampling: SamplingConfig,
    /// Most rows sampled at once, and through one forward at once (`None`: all).
    pub generation_batch: Option<usize>,
    pub forward_batch: Option<usize>,
    pub missing_eos_penalty: Option<f64>,
    /// The range scores are clipped to (`--score-clip`, `--reward-clip-range`).
    pub score_clip: Option<(f64, f64)>,
    /// These rows' place in the whole rollout batch (offset, rows of all ranks): what
    /// seeds each row's sampling.
    pub rows: (i64, i64),
    /// Each row's prompt as its row gave it: an environment's reset observation extends
    /// it, and a reward model with a tokenizer of its own reads it.
    pub reprompt: Option<Reprompt>,
    /// The iterations done and those of the run, for the rewards (`RewardInput::step`).
    pub step: Option<(u64, u64)>,
}

/// Each row's prompt as its row gave it, and `--max-prompt-length` (as the policy's
/// positions allow): a prompt an observation extends is rendered again and cut as the
/// prompts were read.
pub struct Reprompt {
    pub examples: Vec<PromptExample>,
    pub max_prompt_length: usize,
}

impl Reprompt {
    /// Row `row`'s prompt, with `observation` appended to its last message (or its text)
    /// as TRL's `environment_factory` appends what `reset` returns.
    fn example(&self, row: usize, observation: Option<&str>) -> Result<PromptExample> {
        let mut example = self.examples[row].clone();
        let Some(observation) = observation else {
            return Ok(example);
        };
        match &mut example.prompt {
            Content::Text(t) => t.push_str(observation),
            Content::Messages(m) => {
                let last = m.last_mut().context("a prompt without messages")?;
                last.content.push_str(observation);
                last.extra.remove("content"); // a `content: null` no more
            }
        }
        Ok(example)
    }

    /// Row `row`'s prompt extended by `observation`, in tokens, cut as the prompts were.
    fn with(&self, tokenizer: &Tokenizer, row: usize, observation: &str) -> Result<Vec<i64>> {
        let ids = tokenizer.encode_prompt(&self.example(row, Some(observation))?)?;
        Ok(ids[ids.len().saturating_sub(self.max_prompt_length)..].to_vec())
    }
}

/// What the reward sees of a generated batch: unpadded prompts, responses without the EOS
/// that ended them and with it, and their decoded text.
struct RewardView {
    prompts: Vec<Vec<i64>>,
    responses: Vec<Vec<i64>>,
    completion_ids: Vec<Vec<i64>>,
    texts: Vec<String>,
    ended_with_eos: Vec<bool>,
}

impl RewardView {
    fn of(
        prompt_ids: &Tensor,
        prompt_mask: &Tensor,
        generated: &Generation,
        tokenizer: &Tokenizer,
    ) -> Result<Self> {
        let response_rows =
            Vec::<Vec<i64>>::try_from(generated.tokens.to_device(tch::Device::Cpu))?;
        let ended_with_eos: Vec<bool> = generated
            .finish
            .iter()
            .map(|f| *f == FinishReason::Eos)
            .collect();
        let prompts = unpadded(prompt_ids, prompt_mask)?;
        let completion_ids: Vec<Vec<i64>> = response_rows
            .iter()
            .zip(&generated.lengths)
            .map(|(r, &len)| r[..len as usize].to_vec())
            .collect();
        let responses: Vec<Vec<i64>> = completion_ids
            .iter()
            .zip(&ended_with_eos)
            .map(|(r, &eos)| r[..r.len() - usize::from(eos)].to_vec())
            .collect();
        let texts = responses
            .iter()
            .map(|r| tokenizer.decode(r, true))
            .collect();
        Ok(RewardView {
            prompts,
            responses,
            completion_ids,
            texts,
            ended_with_eos,
        })
    }
}

/// Each row of left-padded `ids` without its padding.
fn unpadded(ids: &Tensor, mask: &Tensor) -> Result<Vec<Vec<i64>>> {
    let rows = Vec::<Vec<i64>>::try_from(ids.to_device(tch::Device::Cpu))?;
    let masks = Vec::<Vec<i64>>::try_from(mask.to_device(tch::Device::Cpu).to_kind(Kind::Int64))?;
    Ok(rows
        .iter()
        .zip(&masks)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect())
}

/// What the tool loop made of a generation: the whole responses (tool results included)
/// as one generation, their tool masks (`[B, N]`, 1 on sampled tokens), the loop's counts,
/// and each response's messages.
type Looped = (Generation, Tensor, ToolStats, Vec<Vec<serde_json::Value>>);

/// `generated` carried through the tool loop.
fn with_tools(
    models: &RolloutModels,
    tools: &Tools,
    (prompt_ids, prompt_mask): (&Tensor, &Tensor),
    generated: Generation,
    (opts, schemas): (&RolloutOptions, &[Option<serde_json::Value>]),
) -> Result<Looped> {
    let prompts = unpadded(prompt_ids, prompt_mask)?;
    let device = generated.tokens.device();
    let (mask_kind, pad_id) = (generated.mask.kind(), opts.sampling.pad_id);
    let chunk = opts.generation_batch.unwrap_or(prompts.len());
    let (responses, stats) = tools.run(
        (models.policy, models.tokenizer),
        (&prompts, &generated),
        (&opts.sampling, chunk, opts.rows),
        schemas,
    )?;
    let width = responses
        .iter()
        .map(|r| r.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let rows = responses.len() as i64;
    let padded = |f: &dyn Fn(&ToolResponse) -> Vec<f32>, fill: f32| {
        let flat: Vec<f32> = responses
            .iter()
            .flat_map(|r| {
                let mut v = f(r);
                v.resize(width, fill);
                v
            })
            .collect();
        Tensor::from_slice(&flat)
            .view([rows, width as i64])
            .to_device(device)
    };
    let ids: Vec<i64> = responses
        .iter()
        .flat_map(|r| {
            let mut v = r.ids.clone();
            v.resize(width, pad_id);
            v
        })
        .collect();
    let generation = Generation {
        tokens: Tensor::from_slice(&ids)
            .view([rows, width as i64])
            .to_device(device),
        mask: padded(&|r| vec![1.0; r.ids.len()], 0.0).to_kind(mask_kind),
        logprobs: padded(&|r| r.logprobs.clone(), 0.0),
        lengths: responses.iter().map(|r| r.ids.len() as i64).collect(),
        finish: responses
            .iter()
            .map(|r| match r.eos {
                true => FinishReason::Eos,
                false => FinishReason::Length,
            })
            .collect(),
    };
    let sampled = padded(
        &|r| r.sampled.iter().map(|&s| f32::from(u8::from(s))).collect(),
        0.0,
    );
    let messages = responses.into_iter().map(|r| r.messages).collect();
    Ok((generation, sampled, stats, messages))
}

/// Log-probs and entropies under the policy, log-probs under the reference, values.
type TokenScores = (Tensor, Tensor, Tensor, Option<Tensor>);

/// Per-token log-probs and entropies under the policy, log-probs under the reference, and
/// the critic's values, of `(ids, mask, prompt_len)`, each forward over blocks of at most
/// `block` rows (`--forward-batch-size`).
fn score_tokens(
    models: &RolloutModels,
    (full_ids, full_mask, prompt_len): (&Tensor, &Tensor, i64),
    t: f64,
    block: i64,
) -> TokenScores {
    let rows = full_ids.size()[0];
    // `f` over each block of rows, each of its outputs concatenated over the blocks.
    let in_blocks = |f: &dyn Fn(&Tensor, &Tensor) -> Vec<Tensor>| -> Vec<Tensor> {
        let blocks: Vec<Vec<Tensor>> = (0..rows)
            .step_by(block as usize)
            .map(|start| {
                let len = block.min(rows - start);
                f(
                    &full_ids.narrow(0, start, len),
                    &full_mask.narrow(0, start, len),
                )
            })
            .collect();
        (0..blocks[0].len())
            .map(|i| Tensor::cat(&blocks.iter().map(|b| &b[i]).collect::<Vec<_>>(), 0))
            .collect()
    };
    let [logprobs, entropy]: [Tensor; 2] = in_blocks(&|ids, mask| {
        let (lp, ent) = response_logprobs(models.policy, ids, mask, prompt_len, (t, false));
        vec![lp, ent]
    })
    .try_into()
    .expect("two outputs");
    let reference = |model| {
        in_blocks(&|ids, mask| vec![response_logprobs(model, ids, mask, prompt_len, (t, false)).0])
            .remove(0)
    };
    let ref_logprobs = match models.reference {
        RefModel::Frozen(model) => reference(model),
        RefModel::AdapterOff => without_adapters(|| reference(models.policy)),
        RefModel::NotHeld => logprobs.shallow_clone(),
    };
    let values = models.critic.map(|critic| {
        in_blocks(&|ids, mask| vec![response_values(critic, ids, mask, prompt_len)]).remove(0)
    });
    (logprobs, entropy, ref_logprobs, values)
}

/// Responses sampled for a batch of prompts and their rewards: what a rollout and an
/// evaluation both need.
pub struct Sampled {
    pub generated: Generation,
    /// Unpadded prompts, responses without their EOS, and the decoded texts.
    pub prompts: Vec<Vec<i64>>,
    pub texts: Vec<String>,
    pub ended_with_eos: Vec<bool>,
    /// Each response's reward: the weighted sum of the sources, after the missing-EOS
    /// penalty and clipping.
    pub scores: Vec<f64>,
    /// `[source][row]`, before weighting (NaN: the source did not score the row).
    pub by_source: Vec<Vec<f64>>,
    /// What the reward sources logged beside their scores.
    pub logged: Logged,
    /// With tools: 1 on the tokens the policy sampled, 0 on tool results (`[B, N]`, f32).
    pub tool_mask: Option<Tensor>,
    pub tool_stats: Option<ToolStats>,
}

impl Sampled {
    /// The groups of `k` consecutive responses (one prompt's) whose scored rewards are not
    /// all equal (in f32): those that teach something.
    /// Responses no source scored (NaN) are left out.
    pub fn varied_groups(&self, k: usize) -> Vec<usize> {
        let scores: Vec<f32> = self.scores.iter().map(|&s| s as f32).collect();
        scores
            .chunks(k)
            .enumerate()
            .filter(|(_, g)| {
                let mut scored = g.iter().filter(|s| !s.is_nan());
                let first = scored.next();
                scored.any(|s| Some(s) != first)
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The rows `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Sampled {
        let index = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>())
            .to_device(self.generated.tokens.device());
        let g = &self.generated;
        let pick = |v: &[f64]| rows.iter().map(|&r| v[r]).collect::<Vec<_>>();
        let by_source: Vec<Vec<f64>> = self.by_source.iter().map(|s| pick(s)).collect();
        Sampled {
            generated: Generation {
                tokens: g.tokens.index_select(0, &index),
                mask: g.mask.index_select(0, &index),
                logprobs: g.logprobs.index_select(0, &index),
                lengths: rows.iter().map(|&r| g.lengths[r]).collect(),
                finish: rows.iter().map(|&r| g.finish[r]).collect(),
            },
            prompts: rows.iter().map(|&r| self.prompts[r].clone()).collect(),
            texts: rows.iter().map(|&r| self.texts[r].clone()).collect(),
            ended_with_eos: rows.iter().map(|&r| self.ended_with_eos[r]).collect(),
            scores: pick(&self.scores),
            by_source,
            logged: self.logged.select(rows),
            tool_mask: self.tool_mask.as_ref().map(|m| m.index_select(0, &index)),
            tool_stats: self.tool_stats,
        }
    }

    /// `parts` one after another, the responses right-padded (`pad_id`, mask 0) to the
    /// widest.
    pub fn concat(parts: Vec<Sampled>, pad_id: i64) -> Sampled {
        let width = parts
            .iter()
            .map(|p| p.generated.tokens.size()[1])
            .max()
            .unwrap_or(0);
        let pad = |t: &Tensor, value: i64| {
            let missing = width - t.size()[1];
            if missing == 0 {
                return t.shallow_clone();
            }
            let fill = Tensor::full([t.size()[0], missing], value, (t.kind(), t.device()));
            Tensor::cat(&[t.shallow_clone(), fill], 1)
        };
        let cat = |f: &dyn Fn(&Generation) -> Tensor| {
            Tensor::cat(
                &parts.iter().map(|p| f(&p.generated)).collect::<Vec<_>>(),
                0,
            )
        };
        let sources = parts.first().map_or(0, |p| p.by_source.len());
        let by_source: Vec<Vec<f64>> = (0..sources)
            .map(|i| parts.iter().flat_map(|p| p.by_source[i].clone()).collect())
            .collect();
        let logged = Logged::concat(
            parts
                .iter()
                .map(|p| (p.logged.clone(), p.texts.len()))
                .collect(),
        );
        Sampled {
            generated: Generation {
                tokens: cat(&|g| pad(&g.tokens, pad_id)),
                mask: cat(&|g| pad(&g.mask, 0)),
                logprobs: cat(&|g| pad(&g.logprobs, 0)),
                lengths: parts
                    .iter()
                    .flat_map(|p| p.generated.lengths.clone())
                    .collect(),
                finish: parts
                    .iter()
                    .flat_map(|p| p.generated.finish.clone())
                    .collect(),
            },
            prompts: parts.iter().flat_map(|p| p.prompts.clone()).collect(),
            texts: parts.iter().flat_map(|p| p.texts.clone()).collect(),
            ended_with_eos: parts
                .iter()
                .flat_map(|p| p.ended_with_eos.clone())
                .collect(),
            scores: parts.iter().flat_map(|p| p.scores.clone()).collect(),
            by_source,
            logged,
            tool_mask: parts.iter().all(|p| p.tool_mask.is_some()).then(|| {
                Tensor::cat(
                    &parts
                        .iter()
                        .map(|p| pad(p.tool_mask.as_ref().expect("all have one"), 0))
                        .collect::<Vec<_>>(),
                    0,
                )
            }),
            tool_stats: parts
                .iter()
                .filter_map(|p| p.tool_stats)
                .reduce(|a, b| ToolStats {
                    calls: a.calls + b.calls,
                    failures: a.failures + b.failures,
                }),
        }
    }
}

/// What an environment's resets returned: each row's observation, and the prompts they
/// extend (`None` where none returned one).
type Observed = (Vec<Option<String>>, Option<data::prompts::PromptBatch>);

/// Begins the batch with the tool program (an environment starts an episode per row).
fn observe(
    models: &RolloutModels,
    tools: &Tools,
    (prompt_ids, prompt_mask): (&Tensor, &Tensor),
    fields: &[PromptFields],
    opts: &RolloutOptions,
) -> Result<Observed> {
    let prompts = unpadded(prompt_ids, prompt_mask)?;
    let begun: Vec<(String, PromptFields)> = prompts
        .iter()
        .zip(fields)
        .map(|(p, f)| (models.tokenizer.decode(p, true), f.clone()))
        .collect();
    let observations = tools.runner.begin(&begun)?;
    if observations.iter().all(Option::is_none) {
        return Ok((observations, None));
    }
    let reprompt = opts
        .reprompt
        .as_ref()
        .context("an observation to append, but not the prompt rows")?;
    let rows: Vec<Vec<i64>> = prompts
        .into_iter()
        .zip(&observations)
        .enumerate()
        .map(|(i, (p, o))| match o {
            None => Ok(p),
            Some(o) => reprompt.with(models.tokenizer, i, o),
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&[i64]> = rows.iter().map(Vec::as_slice).collect();
    let batch = data::prompts::collate_left(&refs, opts.sampling.pad_id, prompt_ids.device());
    Ok((observations, Some(batch)))
}

/// The completions of a batch without tools as TRL's reward functions get them: where the
/// policy's tokenizer has a response template of its own and the prompts are conversations,
/// each answer (`completion_ids`, after its prompt) as the one message it parses into
/// (reasoning apart from the content, as `parse_response` reads it); else `None`, the
/// decoded text as the assistant's message.
pub fn completion_messages(
    tok: &Tokenizer,
    (prompts, completion_ids): (&[Vec<i64>], &[Vec<i64>]),
    conversational: bool,
) -> Result<Option<Vec<Vec<serde_json::Value>>>> {
    let Some(template) = tok.response_template()?.filter(|_| conversational) else {
        return Ok(None);
    };
    Ok(Some(
        prompts
            .iter()
            .zip(completion_ids)
            .map(|(prompt, ids)| vec![template.message_of_ids(tok, (prompt, ids), None)])
            .collect(),
    ))
}

/// Samples one response to each row of `prompt_ids` (`fields`: the other fields of each
/// row's prompt, for the rewards) and rewards it.
pub fn sample_and_reward(
    models: &RolloutModels,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    fields: &[PromptFields],
    opts: &RolloutOptions,
) -> Result<Sampled> {
    let _guard = tch::no_grad_guard();
    let rows = prompt_ids.size()[0] as usize;
    let (observations, observed) = match models.tools {
        Some(tools) => observe(models, tools, (prompt_ids, prompt_mask), fields, opts)?,
        None => (vec![None; rows], None),
    };
    let examples = match &opts.reprompt {
        Some(r) => Some(
            (0..rows)
                .map(|i| r.example(i, observations[i].as_deref()))
                .collect::<Result<Vec<_>>>()?,
        ),
        None => None,
    };
    let (prompt_ids, prompt_mask) = match &observed {
        Some(batch) => (&batch.input_ids, &batch.attention_mask),
        None => (prompt_ids, prompt_mask),
    };
    let generated = generate_rows(
        models.policy,
        prompt_ids,
        prompt_mask,
        &opts.sampling,
        opts.generation_batch.unwrap_or(rows),
        opts.rows,
    );
    let (generated, tool_mask, tool_stats, messages) = match models.tools {
        None => (generated, None, None, None),
        Some(tools) => {
            // The tool schemas each prompt was rendered with type its calls' arguments.
            let schemas: Vec<_> = examples
                .iter()
                .flatten()
                .map(|e| e.template.tools.clone())
                .collect();
            let prompt = (prompt_ids, prompt_mask);
            let (g, mask, stats, messages) =
                with_tools(models, tools, prompt, generated, (opts, &schemas))?;
            (g, Some(mask), Some(stats), Some(messages))
        }
    };
    let seen = RewardView::of(prompt_ids, prompt_mask, &generated, models.tokenizer)?;
    let messages = match messages {
        Some(m) => Some(m),
        None => {
            let conversational = examples
                .as_ref()
                .and_then(|e| e.first())
                .is_some_and(|e| matches!(e.prompt, Content::Messages(_)));
            let answers = (&seen.prompts[..], &seen.completion_ids[..]);
            completion_messages(models.tokenizer, answers, conversational)?
        }
    };
    let input = RewardInput {
        prompts: &seen.prompts,
        responses: &seen.responses,
        completion_ids: &seen.completion_ids,
        texts: &seen.texts,
        fields,
        ended_with_eos: &seen.ended_with_eos,
        examples: examples.as_deref(),
        step: opts.step,
        messages: messages.as_deref(),
    };
    let (mut scores, by_source, logged) = summed_rewards(models.rewards, &input)?;
    for (s, &eos) in scores.iter_mut().zip(&seen.ended_with_eos) {
        if let (Some(penalty), false) = (opts.missing_eos_penalty, eos) {
            *s -= penalty;
        }
        if let Some((lo, hi)) = opts.score_clip {
            *s = s.clamp(lo, hi);
        }
    }
    Ok(Sampled {
        generated,
        prompts: seen.prompts,
        texts: seen.texts,
        ended_with_eos: seen.ended_with_eos,
        scores,
        by_source,
        logged,
        tool_mask,
        tool_stats,
    })
}

/// Samples one response to each row of `prompt_ids` (`fields`: the other fields of each
/// row's prompt, for the rewards), rewards it, and scores its tokens under the policy, the
/// reference and the critic.
pub fn rollout(
    models: &RolloutModels,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    fields: &[PromptFields],
    opts: &RolloutOptions,
) -> Result<Rollout> {
    let sampled = sample_and_reward(models, prompt_ids, prompt_mask, fields, opts)?;
    // An environment's observations may have extended the prompts: the sampled ones count.
    let observed = models.tools.map(|_| {
        let prompts: Vec<&[i64]> = sampled.prompts.iter().map(Vec::as_slice).collect();
        data::prompts::collate_left(&prompts, opts.sampling.pad_id, prompt_ids.device())
    });
    let (prompt_ids, prompt_mask) = match &observed {
        Some(batch) => (&batch.input_ids, &batch.attention_mask),
        None => (prompt_ids, prompt_mask),
    };
    Ok(score_sampled(
        models,
        prompt_ids,
        prompt_mask,
        sampled,
        opts,
    ))
}

/// The rollout of responses already sampled and rewarded (`prompt_ids`, left-padded, are
/// their prompts): their tokens scored under the policy, the reference and the critic.
pub fn score_sampled(
    models: &RolloutModels,
    prompt_ids: &Tensor,
    prompt_mask: &Tensor,
    sampled: Sampled,
    opts: &RolloutOptions,
) -> Rollout {
    let _guard = tch::no_grad_guard();
    let device = models.policy.device();
    let generated = sampled.generated;
    let rows = prompt_ids.size()[0];
    let prompt_len = prompt_ids.size()[1];
    // The loss mask: sampled tokens only (tool results are read, not sampled).
    let mask = match &sampled.tool_mask {
        Some(tools) => generated.mask.to_kind(Kind::Float) * tools,
        None => generated.mask.to_kind(Kind::Float),
    };
    let full_ids = Tensor::cat(
        &[
            prompt_ids.to_device(device),
            generated.tokens.shallow_clone(),
        ],
        1,
    );
    let full_mask = Tensor::cat(
        &[
            prompt_mask.to_device(device),
            generated.mask.shallow_clone(),
        ],
        1,
    );
    let block = opts.forward_batch.map_or(rows, |b| b as i64).max(1);
    let (logprobs, entropy, ref_logprobs, values) = score_tokens(
        models,
        (&full_ids, &full_mask, prompt_len),
        opts.sampling.temperature,
        block,
    );
    let logprob_check = ((&generated.logprobs - &logprobs).abs() * &mask)
        .max()
        .double_value(&[]);
    let by_row: Vec<f32> = (0..rows as usize)
        .flat_map(|r| sampled.by_source.iter().map(move |s| s[r] as f32))
        .collect();
    let source_scores = Tensor::from_slice(&by_row)
        .view([rows, sampled.by_source.len() as i64])
        .to_device(device);
    let scores: Vec<f32> = sampled.scores.iter().map(|&s| s as f32).collect();
    Rollout {
        full_ids,
        full_mask,
        prompt_len,
        response: generated.tokens,
        mask,
        logprobs,
        sampler_logprobs: generated.logprobs,
        correction: None,
        ref_logprobs,
        values,
        entropy,
        scores: Tensor::from_slice(&scores).to_device(device),
        source_names: models.rewards.iter().map(|s| s.name).collect(),
        source_scores,
        source_weights: models.rewards.iter().map(|s| s.weight).collect(),
        ended_with_eos: sampled.ended_with_eos,
        prompts: sampled.prompts,
        texts: sampled.texts,
        logged: sampled.logged,
        logprob_check,
        gen_batches: None,
        tool_stats: sampled.tool_stats,
        teacher: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward_fn::RewardFunction;

    /// Fixed scores, NaN where the source does not apply.
    struct Fixed(Vec<f64>);

    impl RewardFunction for Fixed {
        fn scores(&self, _: &RewardInput) -> Result<Vec<f64>> {
            Ok(self.0.clone())
        }
    }

    /// TRL's `nansum` of the weighted sources: a source that did not score a response is
    /// left out of its sum, and a response none scored is NaN.
    #[test]
    fn summed_rewards_leave_out_what_a_source_did_not_score() {
        let nan = f64::NAN;
        let (a, b) = (
            Fixed(vec![1.0, nan, nan, 2.0]),
            Fixed(vec![3.0, 4.0, nan, nan]),
        );
        let sources = [
            RewardSource {
                name: "a",
                weight: 1.0,
                function: &a,
            },
            RewardSource {
                name: "b",
                weight: 0.5,
                function: &b,
            },
        ];
        let texts = vec![String::new(); 4];
        let input = RewardInput {
            prompts: &[],
            responses: &[],
            completion_ids: &[],
            texts: &texts,
            fields: &[],
            ended_with_eos: &[],
            examples: None,
            step: None,
            messages: None,
        };
        let (scores, by_source, _) = summed_rewards(&sources, &input).unwrap();
        assert_eq!([scores[0], scores[1], scores[3]], [2.5, 2.0, 2.0]);
        assert!(scores[2].is_nan());
        assert!(by_source[0][1].is_nan() && by_source[1][3].is_nan());
    }
}
