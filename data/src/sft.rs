//! SFT rows as token ids with a loss mask, the truncation rule, and the right-padded batch.

use tch::{Device, Kind, Tensor};

use crate::error::{DataError, Result};
use crate::formats::{Message, SftExample, TemplateArgs};
use crate::rows::Rows;
use crate::tokenizer::Tokenizer;

/// One row's tokens; `loss_mask[t]` is 1 where token `t` is a training target.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizedSft {
    pub ids: Vec<i64>,
    pub loss_mask: Vec<i64>,
    /// A pack of several rows ([`crate::packing`]): their lengths, in order (TRL's
    /// `seq_lengths`); empty for a plain row.
    pub seq_lengths: Vec<usize>,
}

impl TokenizedSft {
    pub fn new(ids: Vec<i64>, loss_mask: Vec<i64>) -> Self {
        TokenizedSft {
            ids,
            loss_mask,
            seq_lengths: vec![],
        }
    }
}

/// What to do with rows longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Cut the end of the row (the completion's end); a row left with no target is dropped.
    #[default]
    Truncate,
    /// Drop the row.
    Drop,
}

impl std::str::FromStr for Truncation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "truncate" => Ok(Truncation::Truncate),
            "drop" => Ok(Truncation::Drop),
            _ => Err(format!(
                "'{s}' is not a truncation rule (expected truncate or drop)"
            )),
        }
    }
}

impl std::fmt::Display for Truncation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Truncation::Truncate => "truncate",
            Truncation::Drop => "drop",
        })
    }
}

/// Which tokens of a row are targets: TRL's `completion_only_loss` and
/// `assistant_only_loss` (both on here by default; TRL's `assistant_only_loss` is off by
/// default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossScope {
    /// Prompt–completion rows (text or conversational): no loss on the prompt.
    pub completion_only: bool,
    /// Conversations: loss on the assistant turns only; off, on every token (from the
    /// completion on, for a conversational prompt–completion row with `completion_only`).
    pub assistant_only: bool,
}

impl Default for LossScope {
    fn default() -> Self {
        LossScope {
            completion_only: true,
            assistant_only: true,
        }
    }
}

/// Tokenizes one row. Prompt/completion follows TRL: `prompt + completion` is tokenized
/// as one text and the loss starts after the prompt's tokens; the EOS is appended when
/// `append_eos` and the row does not already end with it. Conversations put the loss on
/// the assistant turns (each turn's text as the template renders it, end-of-turn tokens
/// included). `scope` widens the loss to the prompt or to every turn.
pub fn tokenize(
    ex: &SftExample,
    tok: &Tokenizer,
    append_eos: bool,
    scope: LossScope,
) -> Result<TokenizedSft> {
    let mut out = match ex {
        SftExample::PromptCompletion { prompt, completion } => {
            let prompt_len = match scope.completion_only {
                true => tok.encode(prompt, true)?.len(),
                false => 0,
            };
            let ids = tok.encode(&format!("{prompt}{completion}"), true)?;
            let loss_mask = (0..ids.len()).map(|i| i64::from(i >= prompt_len)).collect();
            TokenizedSft::new(ids, loss_mask)
        }
        SftExample::Text(text) => {
            let ids = tok.encode(text, true)?;
            let loss_mask = vec![1; ids.len()];
            TokenizedSft::new(ids, loss_mask)
        }
        SftExample::Messages {
            messages,
            template,
            first_target,
        } => {
            let first_target = if scope.completion_only {
                *first_target
            } else {
                0
            };
            return match scope.assistant_only {
                true => tokenize_chat(messages, template, first_target, tok),
                false => tokenize_chat_from(messages, template, first_target, tok),
            };
        }
    };
    if append_eos {
        if let Some(eos) = tok.eos_id {
            if out.ids.last() != Some(&eos) {
                out.ids.push(eos);
                out.loss_mask.push(1);
            }
        }
    }
    Ok(out)
}

/// Byte spans of the assistant turns from `first_target` on: from where the
/// conversation-so-far rendered with the generation prompt stops agreeing with the whole
/// conversation to where the conversation rendered through the turn does.
fn tokenize_chat(
    messages: &[Message],
    template: &TemplateArgs,
    first_target: usize,
    tok: &Tokenizer,
) -> Result<TokenizedSft> {
    let full = tok.render_chat(messages, template, false)?;
    let mut spans = vec![];
    for (i, m) in messages
        .iter()
        .enumerate()
        .filter(|(i, m)| m.role == "assistant" && *i >= first_target)
    {
        let before = tok.render_chat(&messages[..i], template, true)?;
        let through = tok.render_chat(&messages[..=i], template, false)?;
        // The turn starts where the rendering with the generation prompt stops agreeing with
        // the whole conversation's (DeepSeek-V3's prompt adds "<think>\n"), and ends where
        // the rendering through it does (Phi-3 closes every rendering with EOS; the whole
        // conversation has it at its end only).
        let start = common_prefix_len(&before, &full);
        let end = common_prefix_len(&through, &full);
        moved_turn_check(messages, i, template, &full, tok)?;
        if end <= start {
            return Err(DataError::file(
                "tokenizer_config.json",
                format!("the chat template does not render turn {i} ({}) as a prefix of the whole conversation, so its loss mask cannot be derived", m.role),
            ));
        }
        spans.push((start, end));
    }
    encode_spans(&full, &spans, tok)
}

/// `text` tokenized, the loss on the tokens that start inside one of the byte `spans`.
fn encode_spans(text: &str, spans: &[(usize, usize)], tok: &Tokenizer) -> Result<TokenizedSft> {
    let (ids, offsets) = tok.encode_with_offsets(text, false)?;
    let loss_mask = offsets
        .iter()
        .map(|&(start, _)| i64::from(spans.iter().any(|&(a, b)| start >= a && start < b)))
        .collect();
    Ok(TokenizedSft::new(ids, loss_mask))
}

/// Loss on every token of the rendered conversation from turn `first_target` on (where
/// the turns before it, rendered with the generation prompt, stop agreeing with the whole
/// conversation: TRL's completion mask of a conversational prompt–completion row), or on
/// every token when `first_target` is 0 (TRL's `assistant_only_loss=False`).
fn tokenize_chat_from(
    messages: &[Message],
    template: &TemplateArgs,
    first_target: usize,
    tok: &Tokenizer,
) -> Result<TokenizedSft> {
    let full = tok.render_chat(messages, template, false)?;
    let start = match first_target {
        0 => 0,
        i => common_prefix_len(&tok.render_chat(&messages[..i], template, true)?, &full),
    };
    encode_spans(&full, &[(start, full.len())], tok)
}

/// The prefix rule holds only where the turns before assistant turn `i` render the same
/// whether or not later turns follow. Mistral's templates put the system message into
/// the last user turn (and drop it once an assistant turn ends the conversation), so the
/// conversation so far is not a start of the whole one and the rule would put the user's
/// words in the loss: refused. A template that only closes every rendering with a trailer
/// (Phi-3's EOS) passes: the last turn's text is inside the shared start.
fn moved_turn_check(
    messages: &[Message],
    i: usize,
    template: &TemplateArgs,
    full: &str,
    tok: &Tokenizer,
) -> Result<()> {
    let Some(last) = i.checked_sub(1).map(|j| &messages[j]) else {
        return Ok(());
    };
    let so_far = tok.render_chat(&messages[..i], template, false)?;
    let shared = common_prefix_len(&so_far, full);
    if last.content.is_empty() || !so_far[shared..].contains(&last.content) {
        return Ok(());
    }
    Err(DataError::file(
        "tokenizer_config.json",
        format!("the chat template renders turn {} ({}) differently once later turns follow (Mistral's templates move the system message into the last user turn), so the loss mask of assistant turn {i} cannot be derived by the prefix rule; leave out the system message, or give prompt/completion rows", i - 1, last.role),
    ))
}

/// Bytes `a` and `b` share at their start, at a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// Applies `max_length`; `None` means the row is dropped.
pub fn truncate(row: TokenizedSft, max_length: usize, rule: Truncation) -> Option<TokenizedSft> {
    if row.ids.len() <= max_length {
        return Some(row);
    }
    match rule {
        Truncation::Drop => None,
        Truncation::Truncate => {
            let row = TokenizedSft::new(
                row.ids[..max_length].to_vec(),
                row.loss_mask[..max_length].to_vec(),
            );
            // A target at position 0 is never predicted: some later token must remain.
            row.loss_mask[1..].contains(&1).then_some(row)
        }
    }
}

/// Counts from preparing a dataset, reported when a stage starts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Prepared {
    pub rows: Vec<TokenizedSft>,
    /// Indices (in the file) of the kept rows.
    pub kept: Vec<usize>,
    pub truncated: usize,
    pub dropped: usize,
}

/// Tokenizes and truncates every row.
pub fn prepare(
    examples: &Rows<SftExample>,
    tok: &Tokenizer,
    (max_length, rule): (usize, Truncation),
    append_eos: bool,
    scope: LossScope,
) -> Result<Prepared> {
    let mut out = Prepared::default();
    for (i, ex) in examples.iter().enumerate() {
        let row = tokenize(ex, tok, append_eos, scope).map_err(|e| examples.locate(i, e))?;
        let long = row.ids.len() > max_length;
        match truncate(row, max_length, rule) {
            Some(r) => {
                out.truncated += usize::from(long);
                out.rows.push(r);
                out.kept.push(i);
            }
            None => out.dropped += 1,
        }
    }
    Ok(out)
}

/// A right-padded training batch, `[B, T]` each.
#[derive(Debug)]
pub struct SftBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub loss_mask: Tensor,
    /// With packs in the batch: which row of its sequence each token belongs to (1, 2, …;
    /// 0 for padding; a plain row is all 1).
    pub segment_ids: Option<Tensor>,
}

pub fn collate(rows: &[&TokenizedSft], pad_id: i64, device: Device) -> SftBatch {
    let t = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let pad = |v: &[i64], fill: i64| {
        let mut v = v.to_vec();
        v.resize(t, fill);
        v
    };
    let ids: Vec<Vec<i64>> = rows.iter().map(|r| pad(&r.ids, pad_id)).collect();
    let attn: Vec<Vec<i64>> = rows.iter().map(|r| pad(&vec![1; r.ids.len()], 0)).collect();
    let loss: Vec<Vec<i64>> = rows.iter().map(|r| pad(&r.loss_mask, 0)).collect();
    let to = |v: Vec<Vec<i64>>| {
        Tensor::from_slice2(&v)
            .to_kind(Kind::Int64)
            .to_device(device)
    };
    let packed = rows.iter().any(|r| !r.seq_lengths.is_empty());
    let segments = packed.then(|| {
        let numbered = |r: &&TokenizedSft| -> Vec<i64> {
            if r.seq_lengths.is_empty() {
                return pad(&vec![1; r.ids.len()], 0);
            }
            let mut v = Vec::with_capacity(t);
            for (k, &n) in r.seq_lengths.iter().enumerate() {
                v.extend(std::iter::repeat_n(k as i64 + 1, n));
            }
            pad(&v, 0)
        };
        to(rows.iter().map(numbered).collect())
    });
    SftBatch {
        input_ids: to(ids),
        attention_mask: to(attn),
        loss_mask: to(loss),
        segment_ids: segments,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, targets_from: usize) -> TokenizedSft {
        TokenizedSft::new(
            (0..n as i64).collect(),
            (0..n).map(|i| i64::from(i >= targets_from)).collect(),
        )
    }

    #[test]
    fn truncation_rules() {
        assert_eq!(truncate(row(5, 2), 5, Truncation::Drop), Some(row(5, 2)));
        assert_eq!(truncate(row(6, 2), 5, Truncation::Drop), None);
        let cut = truncate(row(8, 2), 5, Truncation::Truncate).unwrap();
        assert_eq!(cut.ids, [0, 1, 2, 3, 4]);
        assert_eq!(cut.loss_mask, [0, 0, 1, 1, 1]);
        // the prompt alone fills max_length: nothing left to learn
        assert_eq!(truncate(row(8, 6), 5, Truncation::Truncate), None);
    }

    #[test]
    fn collate_pads_right_and_masks_by_length() {
        // pad id 4 equals a real token id: the masks must still come from lengths
        let a = row(3, 1);
        let b = row(5, 2);
        let batch = collate(&[&a, &b], 4, Device::Cpu);
        assert_eq!(
            Vec::<i64>::try_from(batch.input_ids.view([-1])).unwrap(),
            [0, 1, 2, 4, 4, 0, 1, 2, 3, 4]
        );
        assert_eq!(
            Vec::<i64>::try_from(batch.attention_mask.view([-1])).unwrap(),
            [1, 1, 1, 0, 0, 1, 1, 1, 1, 1]
        );
        assert_eq!(
            Vec::<i64>::try_from(batch.loss_mask.view([-1])).unwrap(),
            [0, 1, 1, 0, 0, 0, 0, 1, 1, 1]
        );
        assert!(batch.segment_ids.is_none());
        // A pack beside a plain row: rows numbered from 1, padding 0.
        let mut p = row(4, 0);
        p.seq_lengths = vec![1, 3];
        let batch = collate(&[&p, &a], 0, Device::Cpu);
        assert_eq!(
            Vec::<i64>::try_from(batch.segment_ids.unwrap().view([-1])).unwrap(),
            [1, 2, 2, 2, 1, 1, 1, 0]
        );
    }
}
