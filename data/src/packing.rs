//! Sequence packing for SFT: rows are put into sequences of at most `capacity` tokens by
//! best-fit decreasing, as TRL's `pack_dataset(..., strategy="bfd")` does, so a batch of
//! packs carries (almost) no padding. A pack remembers its rows' lengths (TRL's
//! `seq_lengths`): the model restarts positions at each row and never attends across rows,
//! and the first token of each row is no target (nothing before it in the row predicts it).

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
