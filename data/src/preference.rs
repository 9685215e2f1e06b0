//! Rankings for the reward model: every response of a prompt tokenized as one sequence
//! (prompt + response, scored at its last token, no EOS appended — see
//! `common::scoring`, which also scores them), and the batch that runs each response through the model once.

use tch::{Device, Tensor};

use crate::error::Result;
use crate::formats::{Content, Message, PreferenceExample, SftExample, TemplateArgs};
use crate::rows::Rows;
use crate::sft::Truncation;
use crate::tokenizer::Tokenizer;

/// One ranking: token ids of each response's sequence, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedRanking {
    pub sequences: Vec<Vec<i64>>,
    pub margin: f64,
}

fn as_messages(c: &Content, role: &str) -> Vec<Message> {
    match c {
        Content::Messages(m) => m.clone(),
        Content::Text(t) => vec![Message::new(role, t)],
    }
}

/// Token ids of `prompt` followed by `response`: plain concatenation when both are text,
/// otherwise the conversation (a text prompt as a user turn, a text response as an
/// assistant turn) rendered with the chat template and the row's `template` arguments.
pub fn sequence(
    tok: &Tokenizer,
    prompt: &Content,
    response: &Content,
    template: &TemplateArgs,
) -> Result<Vec<i64>> {
    match (prompt, response) {
        (Content::Text(p), Content::Text(r)) => tok.encode(&format!("{p}{r}"), true),
        _ => {
            let mut messages = as_messages(prompt, "user");
            messages.extend(as_messages(response, "assistant"));
            tok.encode(&tok.render_chat(&messages, template, false)?, false)
        }
    }
}

/// The sequence an SFT row stands for, to be scored (normalisation, `reward eval`).
pub fn sft_sequence(tok: &Tokenizer, ex: &SftExample) -> Result<Vec<i64>> {
    match ex {
        SftExample::PromptCompletion { prompt, completion } => sequence(
            tok,
            &Content::Text(prompt.clone()),
            &Content::Text(completion.clone()),
            &TemplateArgs::default(),
        ),
        SftExample::Messages {
            messages, template, ..
        } => tok.encode(&tok.render_chat(messages, template, false)?, false),
        SftExample::Text(t) => tok.encode(t, true),
    }
}

pub fn tokenize(ex: &PreferenceExample, tok: &Tokenizer) -> Result<TokenizedRanking> {
    Ok(TokenizedRanking {
        sequences: ex
            .responses
            .iter()
            .map(|r| sequence(tok, &ex.prompt, r, &ex.template))
            .collect::<Result<_>>()?,
        margin: ex.margin.unwrap_or(0.0),
    })
}

/// Applies `max_length` to a sequence that is scored at its end: `Truncate` keeps the last
/// `max_length` tokens (the start of the prompt goes), `Drop` refuses it.
pub fn truncate_left(seq: &[i64], max_length: usize, rule: Truncation) -> Option<Vec<i64>> {
    if seq.len() <= max_length {
        return Some(seq.to_vec());
    }
    match rule {
        Truncation::Drop => None,
        Truncation::Truncate => Some(seq[seq.len() - max_length..].to_vec()),
    }
}

#[derive(Debug, Default, Clone)]
pub struct PreparedRankings {
    pub rows: Vec<TokenizedRanking>,
    /// Indices (in the file) of the kept rows.
    pub kept: Vec<usize>,
    pub truncated: usize,
    pub dropped: usize,
}

/// Tokenizes every ranking; a ranking with any sequence over `max_length` is truncated
/// or dropped whole.
pub fn prepare(
    examples: &Rows<PreferenceExample>,
    tok: &Tokenizer,
    max_length: usize,
    rule: Truncation,
) -> Result<PreparedRankings> {
    let mut out = PreparedRankings::default();
    for (i, ex) in examples.iter().enumerate() {
        let row = tokenize(ex, tok).map_err(|e| examples.locate(i, e))?;
        let long = row.sequences.iter().any(|s| s.len() > max_length);
        let sequences: Option<Vec<_>> = row
            .sequences
            .iter()
            .map(|s| truncate_left(s, max_length, rule))
            .collect();
        match sequences {
            Some(sequences) => {
                out.truncated += usize::from(long);
                out.rows.push(TokenizedRanking {
                    sequences,
                    margin: row.margin,
                });
                out.kept.push(i);
            }
            None => out.dropped += 1,
        }
    }
    Ok(out)
}

/// Every response of the batch's rankings as one right-padded row, `[N, T]` with
/// N = Σ K; `group_sizes[e]` rows belong to element `e`, best first.
#[derive(Debug)]
pub struct PreferenceBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub group_sizes: Vec<usize>,
    pub margins: Vec<f64>,
}

/// Right-padded `[N, T]` ids and mask of `sequences`.
pub fn pad_right(sequences: &[&[i64]], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let t = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(sequences.len());
    let mut mask = Vec::with_capacity(sequences.len());
    for s in sequences {
        let mut row = s.to_vec();
        row.resize(t, pad_id);
        ids.push(row);
        let mut m = vec![1i64; s.len()];
        m.resize(t, 0);
        mask.push(m);
    }
    (
        Tensor::from_slice2(&ids).to_device(device),
        Tensor::from_slice2(&mask).to_device(device),
    )
}

pub fn collate(rows: &[&TokenizedRanking], pad_id: i64, device: Device) -> PreferenceBatch {
    let sequences: Vec<&[i64]> = rows
        .iter()
        .flat_map(|r| r.sequences.iter().map(Vec::as_slice))
        .collect();
    let (input_ids, attention_mask) = pad_right(&sequences, pad_id, device);
    PreferenceBatch {
        input_ids,
        attention_mask,
        group_sizes: rows.iter().map(|r| r.sequences.len()).collect(),
        margins: rows.iter().map(|r| r.margin).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_response_is_one_row() {
        let a = TokenizedRanking {
            sequences: vec![vec![1, 2, 3], vec![1, 2], vec![1], vec![1, 2, 3, 4]],
            margin: 0.0,
        };
        let b = TokenizedRanking {
            sequences: vec![vec![5], vec![6, 7]],
            margin: 1.5,
        };
        let batch = collate(&[&a, &b], 0, Device::Cpu);
        assert_eq!(batch.input_ids.size(), [6, 4]);
        assert_eq!(batch.group_sizes, [4, 2]);
        assert_eq!(batch.margins, [0.0, 1.5]);
        let mask: Vec<i64> = Vec::try_from(batch.attention_mask.sum_dim_intlist(
            [1].as_slice(),
            false,
            tch::Kind::Int64,
        ))
        .unwrap();
        assert_eq!(mask, [3, 2, 1, 4, 1, 2]);
    }

    #[test]
    fn truncation_keeps_the_end() {
        assert_eq!(
            truncate_left(&[1, 2, 3, 4], 2, Truncation::Truncate),
            Some(vec![3, 4])
        );
        assert_eq!(truncate_left(&[1, 2, 3, 4], 2, Truncation::Drop), None);
        assert_eq!(
            truncate_left(&[1, 2], 2, Truncation::Drop),
            Some(vec![1, 2])
        );
    }
}
