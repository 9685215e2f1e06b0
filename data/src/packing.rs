//! Sequence packing for SFT, TRL's `pack_dataset` strategies ([`Strategy`]): rows are put
//! into sequences of at most `capacity` tokens by best-fit decreasing (`bfd`; with
//! `bfd_split` a row longer than `capacity` is first cut into pieces of `capacity`), so a
//! batch of packs carries (almost) no padding. A pack remembers its rows' lengths (TRL's
//! `seq_lengths`): the model restarts positions at each row and never attends across rows,
//! and the first token of each row is no target (nothing before it in the row predicts it).
//! `wrapped` instead runs every row together and cuts the stream every `capacity` tokens:
//! plain sequences, attention across the rows in them, a row's first token predicted from
//! the row before.

use std::collections::{BTreeMap, VecDeque};

use crate::sft::TokenizedSft;

/// Bins of row indices for rows of `lengths` tokens (each at most `capacity`), as TRL's
/// `_pack_bfd`: rows longest first (ties in file order), each into the open bin with the
/// least room that still fits it (ties: the bin that got that room first), else a new bin;
/// bins in the order they were opened, rows in each in the order they went in.
pub fn bfd_bins(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&i| lengths[i] > 0).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
    let mut bins: Vec<Vec<usize>> = vec![];
    // Room left → the bins with that much room, in the order they got it.
    let mut by_room: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i];
        assert!(
            len <= capacity,
            "row {i}: {len} tokens > capacity {capacity}"
        );
        let fit = by_room.range(len..).next().map(|(&room, _)| room);
        let (bin, room) = match fit {
            Some(room) => {
                let queue = by_room.get_mut(&room).expect("present");
                let bin = queue.pop_front().expect("non-empty");
                if queue.is_empty() {
                    by_room.remove(&room);
                }
                (bin, room)
            }
            None => {
                bins.push(vec![]);
                (bins.len() - 1, capacity)
            }
        };
        bins[bin].push(i);
        if room > len {
            by_room.entry(room - len).or_default().push_back(bin);
        }
    }
    bins
}

/// Packs `rows` into sequences of at most `capacity` tokens ([`bfd_bins`]).
pub fn pack(rows: &[TokenizedSft], capacity: usize) -> Vec<TokenizedSft> {
    let lengths: Vec<usize> = rows.iter().map(|r| r.ids.len()).collect();
    bfd_bins(&lengths, capacity)
        .into_iter()
        .map(|bin| {
            let mut packed = TokenizedSft::default();
            for i in bin {
                let row = &rows[i];
                packed.ids.extend_from_slice(&row.ids);
                packed.loss_mask.push(0);
                packed.loss_mask.extend_from_slice(&row.loss_mask[1..]);
                packed.seq_lengths.push(row.ids.len());
            }
            packed
        })
        .collect()
}

/// `--packing-strategy`, under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Best-fit decreasing; rows longer than the capacity are cut to it (keep the start).
    #[default]
    Bfd,
    /// Best-fit decreasing of the rows cut into pieces of at most the capacity.
    BfdSplit,
    /// The rows run together and cut every `capacity` tokens.
    Wrapped,
}

impl Strategy {
    const NAMES: [(&'static str, Strategy); 3] = [
        ("bfd", Strategy::Bfd),
        ("bfd_split", Strategy::BfdSplit),
        ("wrapped", Strategy::Wrapped),
    ];

    /// Whether the strategy cuts long rows itself (they reach it whole).
    pub fn cuts_rows(self) -> bool {
        self != Strategy::Bfd
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                format!("'{s}' is not a packing strategy (expected bfd, bfd_split or wrapped)")
            })
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = Self::NAMES
            .iter()
            .find(|(_, v)| v == self)
            .expect("named")
            .0;
        f.write_str(name)
    }
}

/// `rows` packed into sequences of at most `capacity` tokens by `strategy` (for `bfd`, each
/// row already at most `capacity` long).
pub fn pack_with(rows: &[TokenizedSft], capacity: usize, strategy: Strategy) -> Vec<TokenizedSft> {
    match strategy {
        Strategy::Bfd => pack(rows, capacity),
        Strategy::BfdSplit => pack(&split(rows, capacity), capacity),
        Strategy::Wrapped => wrap(rows, capacity),
    }
}

/// Each row cut into pieces of `capacity` tokens, the last the rest (TRL's
/// `on_seq_length_overflow="split"`); each piece then packs as a row of its own.
pub fn split(rows: &[TokenizedSft], capacity: usize) -> Vec<TokenizedSft> {
    rows.iter()
        .flat_map(|r| {
            r.ids
                .chunks(capacity)
                .zip(r.loss_mask.chunks(capacity))
                .map(|(ids, mask)| TokenizedSft::new(ids.to_vec(), mask.to_vec()))
        })
        .collect()
}

/// Every row's tokens (and targets) one after another, cut every `capacity` tokens (TRL's
/// `_pack_wrapped`): plain sequences, the last the rest.
pub fn wrap(rows: &[TokenizedSft], capacity: usize) -> Vec<TokenizedSft> {
    let ids: Vec<i64> = rows.iter().flat_map(|r| r.ids.iter().copied()).collect();
    let mask: Vec<i64> = rows
        .iter()
        .flat_map(|r| r.loss_mask.iter().copied())
        .collect();
    ids.chunks(capacity)
        .zip(mask.chunks(capacity))
        .map(|(ids, mask)| TokenizedSft::new(ids.to_vec(), mask.to_vec()))
        .collect()
}

/// How full the packs are: real tokens over `packs × capacity`.
pub fn fill(packs: &[TokenizedSft], capacity: usize) -> f64 {
    let tokens: usize = packs.iter().map(|p| p.ids.len()).sum();
    tokens as f64 / (packs.len() * capacity).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_trls() {
        // TRL 1.16.0: pack_dataset(Dataset.from_dict({"input_ids": [[i] * n for i, n in
        // enumerate(lengths)]}), 12, strategy="bfd") gives these rows, in this order.
        let lengths = [5, 9, 3, 7, 7, 2, 10, 1, 4, 6, 8, 3];
        let bins = bfd_bins(&lengths, 12);
        assert_eq!(
            bins,
            [
                vec![6, 5],
                vec![1, 2],
                vec![10, 8],
                vec![3, 0],
                vec![4, 11, 7],
                vec![9]
            ]
        );
        // Every row once; no bin over capacity; empty rows are left out (as TRL does).
        let bins = bfd_bins(&[0, 12, 12, 1], 12);
        assert_eq!(bins, [vec![1], vec![2], vec![3]]);
    }

    /// Rows `i` of `lengths[i]` tokens `100·i + j`, every third token (from the second) no
    /// target.
    fn numbered(lengths: &[usize]) -> Vec<TokenizedSft> {
        lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let ids = (0..n as i64).map(|j| 100 * i as i64 + j).collect();
                let mask = (0..n).map(|j| i64::from(j % 3 != 1)).collect();
                TokenizedSft::new(ids, mask)
            })
            .collect()
    }

    #[test]
    fn split_and_wrapped_packs_are_trls() {
        // TRL 1.16.0: pack_dataset(Dataset.from_dict({"input_ids": rows, "labels": ...}),
        // 12, strategy=...) of these rows gives these sequences, in this order.
        let lengths = [5, 9, 3, 7, 7, 2, 10, 1, 4, 6, 8, 3, 15, 26];
        let rows = numbered(&lengths);
        let ids = |packs: &[TokenizedSft]| -> Vec<Vec<i64>> {
            packs.iter().map(|p| p.ids.clone()).collect()
        };
        let r = |i: i64, js: std::ops::Range<i64>| js.map(move |j| 100 * i + j);
        let seq = |parts: Vec<Vec<i64>>| parts.concat();
        let split = pack_with(&rows, 12, Strategy::BfdSplit);
        assert_eq!(
            ids(&split),
            [
                r(12, 0..12).collect::<Vec<_>>(),
                r(13, 0..12).collect(),
                r(13, 12..24).collect(),
                seq(vec![r(6, 0..10).collect(), r(5, 0..2).collect()]),
                seq(vec![r(1, 0..9).collect(), r(2, 0..3).collect()]),
                seq(vec![r(10, 0..8).collect(), r(8, 0..4).collect()]),
                seq(vec![r(3, 0..7).collect(), r(0, 0..5).collect()]),
                seq(vec![
                    r(4, 0..7).collect(),
                    r(11, 0..3).collect(),
                    r(13, 24..26).collect()
                ]),
                seq(vec![
                    r(9, 0..6).collect(),
                    r(12, 12..15).collect(),
                    r(7, 0..1).collect()
                ]),
            ]
        );
        let lengths_of: Vec<Vec<usize>> = split.iter().map(|p| p.seq_lengths.clone()).collect();
        assert_eq!(
            lengths_of,
            [
                vec![12],
                vec![12],
                vec![12],
                vec![10, 2],
                vec![9, 3],
                vec![8, 4],
                vec![7, 5],
                vec![7, 3, 2],
                vec![6, 3, 1]
            ]
        );
        // A piece's first token is no target; the rest keep the row's.
        assert_eq!(split[2].loss_mask[..4], [0, 0, 1, 1]);
        let wrapped = pack_with(&rows, 12, Strategy::Wrapped);
        let stream: Vec<i64> = rows.iter().flat_map(|r| r.ids.clone()).collect();
        assert_eq!(
            ids(&wrapped),
            stream.chunks(12).map(<[i64]>::to_vec).collect::<Vec<_>>()
        );
        assert_eq!(wrapped.len(), 9);
        assert!(wrapped.iter().all(|p| p.seq_lengths.is_empty()));
        // The targets run on across rows (row 1 starts at position 5 of the first sequence,
        // a target predicted from row 0's last token).
        assert_eq!(wrapped[0].loss_mask, [1, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 1]);
    }

    #[test]
    fn packs_keep_each_rows_targets_but_its_first_token() {
        let a = TokenizedSft::new(vec![1, 2, 3], vec![1, 1, 1]);
        let b = TokenizedSft::new(vec![4, 5, 6, 7], vec![0, 0, 1, 1]);
        let packs = pack(&[a, b], 8);
        assert_eq!(packs.len(), 1);
        assert_eq!(packs[0].ids, [4, 5, 6, 7, 1, 2, 3]);
        assert_eq!(packs[0].loss_mask, [0, 0, 1, 1, 0, 1, 1]);
        assert_eq!(packs[0].seq_lengths, [4, 3]);
        assert!((fill(&packs, 8) - 7.0 / 8.0).abs() < 1e-12);
    }
}
