//! Preference pairs for DPO, tokenized as TRL 1.16's `DPOTrainer` does, and their batch.
//!
//! The rule (README, "DPO"): a ranking of K responses gives its K·(K−1)/2 pairs (better
//! first). Text rows: the chosen and rejected texts get the tokenizer's EOS appended
//! (unless they already end with it); `prompt` and `prompt + response` are tokenized with
//! the tokenizer's special tokens (BOS where it adds one). Conversational rows: the prompt
//! is rendered with the generation prompt, `prompt + response` without it, both without
//! extra special tokens. The completion starts where the tokenized prompt and the shorter
//! common prefix with either tokenized `prompt + response` ends (`common_prefix_length`).
//! `--max-prompt-length` keeps a prompt's last tokens; `--max-length` keeps the start of
//! `prompt + completion` (`keep_start`), and a pair whose prompt alone fills it is dropped.

use tch::{Device, Tensor};

use crate::error::Result;
use crate::formats::{Content, FeedbackExample, Message, PreferenceExample, TemplateArgs};
use crate::preference::pad_right;
use crate::rows::Rows;
use crate::sft::Truncation;
use crate::tokenizer::Tokenizer;

/// One pair: the shared prompt's tokens and each completion's.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    pub prompt: Vec<i64>,
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
    /// The row's gold completion (`reference`, TPO's; empty without one).
    pub gold: Vec<i64>,
}

impl TokenizedPair {
    /// The longest of its sequences.
    pub fn len(&self) -> usize {
        self.prompt.len()
            + self
                .chosen
                .len()
                .max(self.rejected.len())
                .max(self.gold.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn as_messages(c: &Content, role: &str) -> Vec<Message> {
    match c {
        Content::Messages(m) => m.clone(),
        Content::Text(t) => vec![Message::new(role, t)],
    }
}

fn common_prefix_length(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The prompt's tokens and `prompt + response`'s tokens for each response.
fn encode_row(
    tok: &Tokenizer,
    prompt: &Content,
    responses: &[&Content],
    template: &TemplateArgs,
) -> Result<(Vec<i64>, Vec<Vec<i64>>)> {
    let conversational = matches!(prompt, Content::Messages(_))
        || responses.iter().any(|r| matches!(r, Content::Messages(_)));
    if conversational {
        let prompt = as_messages(prompt, "user");
        let prompt_ids = tok.encode(&tok.render_chat(&prompt, template, true)?, false)?;
        let full = responses
            .iter()
            .map(|r| {
                let mut messages = prompt.clone();
                messages.extend(as_messages(r, "assistant"));
                tok.encode(&tok.render_chat(&messages, template, false)?, false)
            })
            .collect::<Result<_>>()?;
        return Ok((prompt_ids, full));
    }
    let text = |c: &Content| match c {
        Content::Text(t) => t.clone(),
        Content::Messages(_) => unreachable!("conversational rows are handled above"),
    };
    let prompt = text(prompt);
    let eos = tok.eos_token.clone().unwrap_or_default();
    let full = responses
        .iter()
        .map(|r| {
            let mut r = text(r);
            if !r.ends_with(&eos) {
                r.push_str(&eos);
            }
            tok.encode(&format!("{prompt}{r}"), true)
        })
        .collect::<Result<_>>()?;
    Ok((tok.encode(&prompt, true)?, full))
}

/// Every pair of a ranking (best first), tokenized; each with the row's gold completion,
/// whose start counts in where the completions start (TRL's TPO: the shortest common
/// prefix of the prompt with the three sequences).
pub fn tokenize(ex: &PreferenceExample, tok: &Tokenizer) -> Result<Vec<TokenizedPair>> {
    let responses: Vec<&Content> = ex.responses.iter().chain(ex.gold.as_ref()).collect();
    let (prompt, mut full) = encode_row(tok, &ex.prompt, &responses, &ex.template)?;
    let gold = ex.gold.as_ref().and_then(|_| full.pop());
    let gold_len = gold
        .as_ref()
        .map_or(usize::MAX, |g| common_prefix_length(&prompt, g));
    let mut pairs = vec![];
    for i in 0..full.len() {
        for j in i + 1..full.len() {
            let (c, r) = (&full[i], &full[j]);
            let len = common_prefix_length(&prompt, c)
                .min(common_prefix_length(&prompt, r))
                .min(gold_len);
            pairs.push(TokenizedPair {
                prompt: prompt[..len].to_vec(),
                chosen: c[len..].to_vec(),
                rejected: r[len..].to_vec(),
                gold: gold.as_ref().map_or(vec![], |g| g[len..].to_vec()),
            });
        }
    }
    Ok(pairs)
}

/// Length limits of a pair: `--max-prompt-length` (keep the prompt's end), `--max-length`
/// (keep the start of each sequence) and what to do with a sequence over it.
#[derive(Debug, Clone, Copy)]
pub struct PairLimits {
    pub max_prompt_length: Option<usize>,
    pub max_length: usize,
    pub truncation: Truncation,
}

/// `pair` within `limits`, or `None` when it is dropped; the flag says it was cut.
pub fn truncate(mut pair: TokenizedPair, limits: PairLimits) -> Option<(TokenizedPair, bool)> {
    let mut cut = false;
    if let Some(n) = limits.max_prompt_length {
        if pair.prompt.len() > n {
            pair.prompt.drain(..pair.prompt.len() - n);
            cut = true;
        }
    }
    if pair.prompt.len() >= limits.max_length {
        return None;
    }
    if pair.len() <= limits.max_length {
        return Some((pair, cut));
    }
    if limits.truncation == Truncation::Drop {
        return None;
    }
    let room = limits.max_length - pair.prompt.len();
    pair.chosen.truncate(room);
    pair.rejected.truncate(room);
    pair.gold.truncate(room);
    Some((pair, true))
}

#[derive(Debug, Default, Clone)]
pub struct PreparedPairs {
    pub pairs: Vec<TokenizedPair>,
    /// For each pair: its row in the file and the two responses' places in the ranking
    /// (unpaired: the response's place, twice).
    pub origin: Vec<(usize, usize, usize)>,
    /// Unpaired feedback ([`prepare_unpaired`]): whether each completion is desirable.
    pub labels: Vec<bool>,
    pub truncated: usize,
    pub dropped: usize,
}

impl PreparedPairs {
    /// `pair` within `limits` with its origin, or counted as dropped; whether it was kept.
    fn add(
        &mut self,
        pair: TokenizedPair,
        limits: PairLimits,
        origin: (usize, usize, usize),
    ) -> bool {
        match truncate(pair, limits) {
            Some((pair, cut)) => {
                self.truncated += usize::from(cut);
                self.pairs.push(pair);
                self.origin.push(origin);
                true
            }
            None => {
                self.dropped += 1;
                false
            }
        }
    }
}

/// Tokenizes every row's pairs and applies `limits`.
pub fn prepare(
    examples: &Rows<PreferenceExample>,
    tok: &Tokenizer,
    limits: PairLimits,
) -> Result<PreparedPairs> {
    let mut out = PreparedPairs::default();
    for (row, ex) in examples.iter().enumerate() {
        let pairs = tokenize(ex, tok).map_err(|e| examples.locate(row, e))?;
        let k = ex.responses.len();
        let places = (0..k).flat_map(|i| (i + 1..k).map(move |j| (i, j)));
        for (pair, (i, j)) in pairs.into_iter().zip(places) {
            out.add(pair, limits, (row, i, j));
        }
    }
    Ok(out)
}

/// One unpaired completion: prompt and completion tokens, whether it is desirable, and its
/// place among its row's responses.
pub type UnpairedItem = (Vec<i64>, Vec<i64>, bool, usize);

/// A row's unpaired completions, each tokenized alone as TRL's `KTOTrainer` does (the
/// completion starts after its own common prefix with the prompt), in two lists: an
/// unpaired row's one completion (first); a preference row's pairs unpaired, the chosen
/// responses (desirable) first and the rejected ones second.
pub fn tokenize_unpaired(
    ex: &FeedbackExample,
    tok: &Tokenizer,
) -> Result<(Vec<UnpairedItem>, Vec<UnpairedItem>)> {
    type Places = Vec<(usize, bool)>;
    let (prompt, responses, first, second): (&Content, Vec<&Content>, Places, Places) = match ex {
        FeedbackExample::Unpaired(u) => {
            (&u.prompt, vec![&u.completion], vec![(0, u.label)], vec![])
        }
        FeedbackExample::Preference(p) => {
            let k = p.responses.len();
            let pairs: Vec<(usize, usize)> = (0..k)
                .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
                .collect();
            let first = pairs.iter().map(|&(i, _)| (i, true)).collect();
            let second = pairs.iter().map(|&(_, j)| (j, false)).collect();
            (&p.prompt, p.responses.iter().collect(), first, second)
        }
    };
    let template = match ex {
        FeedbackExample::Unpaired(u) => &u.template,
        FeedbackExample::Preference(p) => &p.template,
    };
    let (prompt, full) = encode_row(tok, prompt, &responses, template)?;
    let item = |&(place, label): &(usize, bool)| {
        let len = common_prefix_length(&prompt, &full[place]);
        (
            prompt[..len].to_vec(),
            full[place][len..].to_vec(),
            label,
            place,
        )
    };
    Ok((
        first.iter().map(item).collect(),
        second.iter().map(item).collect(),
    ))
}

/// How many rows TRL's `unpair_preference_dataset` unpairs at once (`datasets.map`'s
/// default batch): within each block, every chosen completion comes before every rejected
/// one, so that the KL estimate's mismatched completions mostly answer other prompts.
const UNPAIR_BLOCK: usize = 1000;

/// Unpaired feedback for KTO, in TRL's order ([`UNPAIR_BLOCK`]; an unpaired row keeps
/// its place among the chosen completions): a prompt cut to `--max-prompt-length`, a
/// completion whose prompt alone fills `--max-length` dropped (as TRL drops it); then each
/// completion gets the mismatched completion KTO's KL estimate scores with its prompt: the
/// previous one in its run of `chunk` (the batch size), the first taking the run's last
/// (TRL's rotation by one within each batch). As [`TokenizedPair`]s: `chosen` the
/// completion, `rejected` the mismatched one, both cut to `--max-length` (keep the start);
/// `labels` says which are desirable; `origin` is (row, place, place).
pub fn prepare_unpaired(
    examples: &Rows<FeedbackExample>,
    tok: &Tokenizer,
    limits: PairLimits,
    chunk: usize,
) -> Result<PreparedPairs> {
    let mut out = PreparedPairs::default();
    let mut kept = vec![];
    let rows: Vec<(usize, &FeedbackExample)> = examples.iter().enumerate().collect();
    for block in rows.chunks(UNPAIR_BLOCK) {
        let (mut first, mut second) = (vec![], vec![]);
        for &(row, ex) in block {
            let (c, r) = tokenize_unpaired(ex, tok).map_err(|e| examples.locate(row, e))?;
            first.extend(c.into_iter().map(|item| (row, item)));
            second.extend(r.into_iter().map(|item| (row, item)));
        }
        for (row, (mut prompt, completion, label, place)) in first.into_iter().chain(second) {
            if let Some(n) = limits.max_prompt_length {
                prompt.drain(..prompt.len().saturating_sub(n));
            }
            if prompt.len() >= limits.max_length {
                out.dropped += 1;
                continue;
            }
            kept.push((prompt, completion, label, (row, place, place)));
        }
    }
    let limits = PairLimits {
        max_prompt_length: None,
        ..limits
    };
    for run in kept.chunks(chunk.max(1)) {
        for (k, (prompt, completion, label, origin)) in run.iter().enumerate() {
            let mismatched = &run[(k + run.len() - 1) % run.len()].1;
            let pair = TokenizedPair {
                prompt: prompt.clone(),
                chosen: completion.clone(),
                rejected: mismatched.clone(),
                gold: vec![],
            };
            if out.add(pair, limits, *origin) {
                out.labels.push(*label);
            }
        }
    }
    Ok(out)
}

/// `[2B, T]` right-padded rows: every pair's `prompt + chosen`, then every pair's
/// `prompt + rejected` (TRL's `DataCollatorForPreference`); `completion_mask` is 1 on the
/// completion tokens.
#[derive(Debug)]
pub struct PairBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub completion_mask: Tensor,
}

pub fn collate(pairs: &[&TokenizedPair], pad_id: i64, device: Device) -> PairBatch {
    let completions = pairs
        .iter()
        .map(|p| (*p, &p.chosen))
        .chain(pairs.iter().map(|p| (*p, &p.rejected)));
    collate_rows(completions, pad_id, device)
}

/// `[B, T]`: one side of each pair, `prompt + chosen` (`rejected` false) or
/// `prompt + rejected`, laid out as [`collate`] lays out each half.
pub fn collate_side(
    pairs: &[&TokenizedPair],
    rejected: bool,
    pad_id: i64,
    device: Device,
) -> PairBatch {
    let rows = pairs.iter().map(|&p| {
        let completion = if rejected { &p.rejected } else { &p.chosen };
        (p, completion)
    });
    collate_rows(rows, pad_id, device)
}

/// `[B, T]`: each pair's `prompt + gold` (its row's gold completion), laid out as
/// [`collate`] lays out each half.
pub fn collate_gold(pairs: &[&TokenizedPair], pad_id: i64, device: Device) -> PairBatch {
    collate_rows(pairs.iter().map(|&p| (p, &p.gold)), pad_id, device)
}

fn collate_rows<'a>(
    completions: impl Iterator<Item = (&'a TokenizedPair, &'a Vec<i64>)>,
    pad_id: i64,
    device: Device,
) -> PairBatch {
    let (sequences, completion): (Vec<Vec<i64>>, Vec<Vec<i64>>) = completions
        .map(|(p, c)| {
            let mask = [vec![0; p.prompt.len()], vec![1; c.len()]].concat();
            ([p.prompt.as_slice(), c].concat(), mask)
        })
        .unzip();
    let refs: Vec<&[i64]> = sequences.iter().map(Vec::as_slice).collect();
    let (input_ids, attention_mask) = pad_right(&refs, pad_id, device);
    let refs: Vec<&[i64]> = completion.iter().map(Vec::as_slice).collect();
    let (completion_mask, _) = pad_right(&refs, 0, device);
    PairBatch {
        input_ids,
        attention_mask,
        completion_mask,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: &[i64], c: &[i64], r: &[i64]) -> TokenizedPair {
        TokenizedPair {
            prompt: p.to_vec(),
            chosen: c.to_vec(),
            rejected: r.to_vec(),
            gold: vec![],
        }
    }

    /// TRL's collator example: chosen rows first, completion mask on the completions.
    #[test]
    fn collates_as_trl() {
        let a = pair(&[1, 2, 3], &[4, 5], &[6]);
        let b = pair(&[7, 8], &[9], &[10, 11]);
        let batch = collate(&[&a, &b], 0, Device::Cpu);
        let ids: Vec<Vec<i64>> = Vec::try_from(batch.input_ids).unwrap();
        assert_eq!(
            ids,
            [
                [1, 2, 3, 4, 5],
                [7, 8, 9, 0, 0],
                [1, 2, 3, 6, 0],
                [7, 8, 10, 11, 0]
            ]
        );
        let m: Vec<Vec<i64>> = Vec::try_from(batch.completion_mask).unwrap();
        assert_eq!(
            m,
            [
                [0, 0, 0, 1, 1],
                [0, 0, 1, 0, 0],
                [0, 0, 0, 1, 0],
                [0, 0, 1, 1, 0]
            ]
        );
        let a: Vec<Vec<i64>> = Vec::try_from(batch.attention_mask).unwrap();
        assert_eq!(a[1], [1, 1, 1, 0, 0]);
    }

    #[test]
    fn truncation_keeps_the_start_and_drops_full_prompts() {
        let limits = PairLimits {
            max_prompt_length: None,
            max_length: 5,
            truncation: Truncation::Truncate,
        };
        let (p, cut) = truncate(pair(&[1, 2, 3], &[4, 5, 6], &[7]), limits).unwrap();
        assert!(cut);
        assert_eq!((p.chosen, p.rejected), (vec![4, 5], vec![7]));
        assert!(truncate(pair(&[1, 2, 3, 4, 5], &[6], &[7]), limits).is_none());
        let drop = PairLimits {
            truncation: Truncation::Drop,
            ..limits
        };
        assert!(truncate(pair(&[1, 2, 3], &[4, 5, 6], &[7]), drop).is_none());
        let prompt_cap = PairLimits {
            max_prompt_length: Some(2),
            ..limits
        };
        let (p, cut) = truncate(pair(&[1, 2, 3], &[4, 5, 6], &[7]), prompt_cap).unwrap();
        assert!(cut);
        assert_eq!((p.prompt, p.chosen), (vec![2, 3], vec![4, 5, 6]));
    }
}
