//! Byte-level BPE pieces and the bytes of text they stand for, for aligning two
//! tokenizations of one text by byte offsets (cross-tokenizer distillation, TRL's GOLD).
//!
//! A byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM, Phi, Mistral v0.3+) writes each
//! byte of the text as one character of its pieces (GPT-2's `bytes_to_unicode` table), so a
//! piece's length in characters is its length in bytes. Its encoder's offsets are those of
//! the characters a token came from: the tokens of one multi-byte character share that
//! character's span. [`normalize_byte_offsets`] splits such spans into the tokens' own
//! bytes, as TRL's `encode_with_byte_offsets` does.

use std::sync::OnceLock;

use crate::tokenizer::ByteSpan;

/// GPT-2's `bytes_to_unicode` inverse: the byte each piece character stands for.
fn byte_of(c: char) -> Option<u8> {
    static TABLE: OnceLock<std::collections::HashMap<char, u8>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let mut next = 256u32;
        (0..=255u8)
            .map(|b| {
                let c = match printable(b) {
                    true => u32::from(b),
                    false => {
                        next += 1;
                        next - 1
                    }
                };
                (char::from_u32(c).expect("a valid code point"), b)
            })
            .collect()
    });
    table.get(&c).copied()
}

/// The bytes a byte-level piece stands for (TRL's `piece_byte_len`: one per character).
pub fn piece_len(piece: &str) -> usize {
    piece.chars().count()
}

/// TRL's `_byte_level_piece_len`: the bytes of `piece` as they appear in `text` at `start`
/// (a leading space the pre-tokenizer added, not in the text, does not count); `None` for a
/// piece that is not byte-level.
fn piece_len_in(piece: &str, text: &[u8], start: usize) -> Option<usize> {
    let bytes: Option<Vec<u8>> = piece.chars().map(byte_of).collect();
    let bytes = bytes?;
    let added_space = bytes.first() == Some(&b' ') && text.get(start) != Some(&b' ');
    Some(bytes.len() - usize::from(added_space))
}

/// Runs of tokens given the same span (the tokens of one multi-byte character) get
/// consecutive spans of their pieces' lengths, where those add up to the span.
fn split_repeated(offsets: &[ByteSpan], pieces: &[String]) -> Vec<ByteSpan> {
    let mut out = offsets.to_vec();
    let mut i = 0;
    while i < offsets.len() {
        let j = (i + 1..offsets.len())
            .find(|&j| offsets[j] != offsets[i])
            .unwrap_or(offsets.len());
        let (start, end) = offsets[i];
        let lengths: Vec<usize> = pieces[i..j].iter().map(|p| piece_len(p)).collect();
        if j - i > 1 && lengths.iter().sum::<usize>() == end - start {
            let mut cursor = start;
            for (k, len) in (i..j).zip(lengths) {
                out[k] = (cursor, cursor + len);
                cursor += len;
            }
        }
        i = j;
    }
    out
}

/// TRL's `_normalize_byte_offsets`: each token's own bytes of `text`, monotonic (a
/// zero-width token sits where the previous one ended). `None` where the encoder's spans
/// overlap in a way its pieces cannot explain.
pub fn normalize_byte_offsets(
    offsets: &[ByteSpan],
    pieces: &[String],
    text: &[u8],
) -> Option<Vec<ByteSpan>> {
    let offsets = split_repeated(offsets, pieces);
    let mut out = Vec::with_capacity(offsets.len());
    let mut cursor = 0;
    for (i, &(mut start, mut end)) in offsets.iter().enumerate() {
        if start == end {
            out.push((cursor, cursor));
            continue;
        }
        let piece = piece_len_in(&pieces[i], text, start);
        let next_start = offsets.get(i + 1).map(|s| s.0);
        let overlap = start < cursor || next_start.is_some_and(|n| n < end);
        if let Some(len) = piece.filter(|&len| overlap || len == end - start) {
            let s = start.max(cursor);
            if s + len <= end {
                (start, end) = (s, s + len);
            }
        }
        if start < cursor || end < start {
            return None;
        }
        out.push((start, end));
        cursor = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPT-2's table: printable bytes are themselves, the space is 'Ġ', the newline 'Ċ'.
    #[test]
    fn pieces_map_back_to_their_bytes() {
        assert_eq!(byte_of('a'), Some(b'a'));
        assert_eq!(byte_of('Ġ'), Some(b' '));
        assert_eq!(byte_of('Ċ'), Some(b'\n'));
        assert_eq!(byte_of('é'), Some(0xE9));
        assert_eq!(byte_of('鸡'), None);
        assert_eq!(piece_len("Ġrabbits"), 8);
    }

    /// The three byte tokens of 鸡 (one character, bytes 1..4) share its span from the
    /// encoder; normalized, each has its byte. A leading space the pre-tokenizer added is
    /// not the text's; zero-width tokens sit at the cursor.
    #[test]
    fn shared_character_spans_split_into_the_tokens_bytes() {
        let text = " 鸡!".as_bytes();
        let pieces: Vec<String> = ["Ġ", "é", "¸", "¡", "!"].map(String::from).to_vec();
        let offsets = [(0, 1), (1, 4), (1, 4), (1, 4), (4, 5)];
        assert_eq!(
            normalize_byte_offsets(&offsets, &pieces, text),
            Some(vec![(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)])
        );
        let pieces: Vec<String> = ["Ġhi", "<eos>"].map(String::from).to_vec();
        assert_eq!(
            normalize_byte_offsets(&[(0, 2), (2, 2)], &pieces, b"hi"),
            Some(vec![(0, 2), (2, 2)])
        );
        assert_eq!(
            normalize_byte_offsets(&[(0, 2), (1, 3)], &["ab".into(), "bc".into()], b"abc"),
            None
        );
    }
}
