//! Seeded shuffling over a dataset (rows, prompts), with a position (epoch, index) that can be saved and
//! restored, so a resumed run sees exactly the batches it would have seen.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SamplerPosition {
    pub epoch: u64,
    /// Rows of this epoch already handed out.
    pub index: usize,
}

#[derive(Debug, Clone)]
pub struct Sampler {
    len: usize,
    seed: u64,
    shuffle: bool,
    /// With lengths: groups of rows of similar length (see `grouped_by_length`).
    lengths: Option<(Vec<usize>, usize)>,
    position: SamplerPosition,
    order: Vec<usize>,
}

/// Batches per group when batching by length (`transformers`' `LengthGroupedSampler`
/// uses 50 as well).
const GROUP_BATCHES: usize = 50;

impl Sampler {
    pub fn new(len: usize, seed: u64, shuffle: bool) -> Self {
        assert!(len > 0, "a sampler needs at least one row");
        let mut s = Sampler {
            len,
            seed,
            shuffle,
            lengths: None,
            position: SamplerPosition::default(),
            order: vec![],
        };
        s.order = s.epoch_order(0);
        s
    }

    /// A shuffling sampler that hands out rows of similar length together, so batches
    /// carry little padding: each epoch's shuffled order is cut into groups of
    /// 50 × `batch` rows, each group sorted longest first, and the batches of all groups
    /// shuffled (as `transformers`' `group_by_length`, plus the batch shuffle so that
    /// consecutive steps do not run from long to short).
    pub fn grouped_by_length(lengths: Vec<usize>, batch: usize, seed: u64) -> Self {
        let mut s = Self::new(lengths.len(), seed, true);
        s.lengths = Some((lengths, batch.max(1)));
        s.order = s.epoch_order(0);
        s
    }

    /// The order of epoch `epoch`: a function of (seed, epoch) only.
    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            order.shuffle(&mut rng);
            if let Some((lengths, batch)) = &self.lengths {
                let mut batches: Vec<Vec<usize>> = vec![];
                for group in order.chunks(batch * GROUP_BATCHES) {
                    let mut group = group.to_vec();
                    group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
                    batches.extend(group.chunks(*batch).map(<[usize]>::to_vec));
                }
                // A short last batch stays last (it is the epoch's tail either way).
                let last = batches.pop();
                batches.shuffle(&mut rng);
                batches.extend(last);
                order = batches.concat();
            }
        }
        order
    }

    pub fn position(&self) -> SamplerPosition {
        self.position
    }

    pub fn restore(&mut self, position: SamplerPosition) {
        self.order = self.epoch_order(position.epoch);
        self.position = position;
    }

    /// The next `n` row indices; an epoch that runs out continues into the next one.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.position.index == self.len {
                self.restore(SamplerPosition {
                    epoch: self.position.epoch + 1,
                    index: 0,
                });
            }
            let take = (n - out.len()).min(self.len - self.position.index);
            out.extend_from_slice(&self.order[self.position.index..self.position.index + take]);
            self.position.index += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_position_yields_the_same_remaining_order() {
        let mut straight = Sampler::new(10, 42, true);
        let first: Vec<_> = (0..3).map(|_| straight.next_batch(4)).collect();
        let saved = straight.position();
        assert_eq!(saved, SamplerPosition { epoch: 1, index: 2 });
        let rest: Vec<_> = (0..5).map(|_| straight.next_batch(4)).collect();

        let mut resumed = Sampler::new(10, 42, true);
        resumed.restore(saved);
        let again: Vec<_> = (0..5).map(|_| resumed.next_batch(4)).collect();
        assert_eq!(rest, again);
        // each epoch is a permutation, and epochs differ
        let mut e0: Vec<usize> = first.concat()[..10].to_vec();
        e0.sort();
        assert_eq!(e0, (0..10).collect::<Vec<_>>());
        assert_ne!(
            Sampler::new(10, 42, true).epoch_order(0),
            Sampler::new(10, 42, true).epoch_order(1)
        );
    }

    #[test]
    fn grouping_by_length_cuts_padding_and_keeps_every_row() {
        let lengths: Vec<usize> = (0..1000).map(|i| (i * 7919) % 97 + 1).collect();
        let padded = |order: &[usize]| -> usize {
            order
                .chunks(8)
                .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap() * b.len())
                .sum()
        };
        let mut grouped = Sampler::grouped_by_length(lengths.clone(), 8, 3);
        let plain = Sampler::new(1000, 3, true);
        let order = grouped.next_batch(1000);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        // Random batches pad to near the maximum; grouped ones to near each row's length.
        let real: usize = lengths.iter().sum();
        assert!(
            padded(&order) < real * 11 / 10,
            "{} vs {real}",
            padded(&order)
        );
        assert!(padded(&plain.order) > real * 16 / 10);
        // Resuming mid-epoch gives the same remaining batches.
        let saved = grouped.position();
        let rest = grouped.next_batch(24);
        let mut resumed = Sampler::grouped_by_length(lengths, 8, 3);
        resumed.restore(saved);
        assert_eq!(resumed.next_batch(24), rest);
    }

    #[test]
    fn unshuffled_is_in_file_order() {
        let mut s = Sampler::new(3, 0, false);
        assert_eq!(s.next_batch(5), [0, 1, 2, 0, 1]);
    }
}
