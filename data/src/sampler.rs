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

/// Rows per mixture epoch of each dataset (FLAN / T5's mixing): with `weights`, the
/// weights' shares of all the rows (largest remainders, so they add up); else
/// examples-proportional, each dataset's size capped at `cap` (T5's K).
pub fn mixture_counts(sizes: &[usize], weights: Option<&[f64]>, cap: Option<usize>) -> Vec<usize> {
    let Some(w) = weights else {
        return sizes.iter().map(|&n| cap.map_or(n, |k| n.min(k))).collect();
    };
    let total: usize = sizes.iter().sum();
    let sum: f64 = w.iter().sum();
    let exact: Vec<f64> = w.iter().map(|x| x / sum * total as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let short = total - counts.iter().sum::<usize>();
    for &i in order.iter().take(short) {
        counts[i] += 1;
    }
    counts
}

/// Several datasets drawn in fixed proportions. A mixture epoch holds `counts[m]` rows of
/// dataset `m`, in an order shuffled per (seed, epoch); each dataset hands out its rows
/// from its own shuffled epochs, so one larger than its count continues where it stopped
/// in the next mixture epoch. The whole state is the mixture's position: what each dataset
/// has handed out follows from it, so a resumed run draws the same rows.
#[derive(Debug, Clone)]
pub struct Mixture {
    schedule: Sampler,
    /// The dataset of each slot of a mixture epoch.
    slots: Vec<usize>,
    parts: Vec<Sampler>,
    /// Index of each dataset's first row among all rows.
    offsets: Vec<usize>,
    counts: Vec<usize>,
}

impl Mixture {
    pub fn new(sizes: &[usize], counts: Vec<usize>, seed: u64) -> Self {
        assert!(counts.iter().sum::<usize>() > 0, "an empty mixture");
        let slots: Vec<usize> = counts
            .iter()
            .enumerate()
            .flat_map(|(m, &c)| std::iter::repeat_n(m, c))
            .collect();
        let parts = sizes
            .iter()
            .enumerate()
            .map(|(m, &n)| {
                Sampler::new(
                    n,
                    seed.wrapping_add(1 + m as u64)
                        .wrapping_mul(0x2545_F491_4F6C_DD1D),
                    true,
                )
            })
            .collect();
        let offsets = sizes
            .iter()
            .scan(0, |acc, &n| {
                let start = *acc;
                *acc += n;
                Some(start)
            })
            .collect();
        Mixture {
            schedule: Sampler::new(slots.len(), seed, true),
            slots,
            parts,
            offsets,
            counts,
        }
    }

    /// Rows in one mixture epoch.
    pub fn epoch_len(&self) -> usize {
        self.slots.len()
    }

    /// The dataset a row index (as [`Mixture::next_batch`] returns them) belongs to.
    pub fn dataset_of(&self, row: usize) -> usize {
        self.offsets.partition_point(|&o| o <= row) - 1
    }

    pub fn position(&self) -> SamplerPosition {
        self.schedule.position()
    }

    pub fn restore(&mut self, position: SamplerPosition) {
        self.schedule.restore(position);
        let done = &self.schedule.order[..position.index];
        for (m, part) in self.parts.iter_mut().enumerate() {
            let drawn = position.epoch as usize * self.counts[m]
                + done.iter().filter(|&&slot| self.slots[slot] == m).count();
            part.restore(SamplerPosition {
                epoch: (drawn / part.len) as u64,
                index: drawn % part.len,
            });
        }
    }

    /// The next `n` rows, as indices into all the datasets' rows in order.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        self.schedule
            .next_batch(n)
            .into_iter()
            .map(|slot| {
                let m = self.slots[slot];
                self.offsets[m] + self.parts[m].next_batch(1)[0]
            })
            .collect()
    }
}

/// The order rows are trained in: one dataset's, or a mixture's.
#[derive(Debug, Clone)]
pub enum RowOrder {
    One(Sampler),
    Mix(Mixture),
}

impl RowOrder {
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        match self {
            RowOrder::One(s) => s.next_batch(n),
            RowOrder::Mix(m) => m.next_batch(n),
        }
    }

    pub fn position(&self) -> SamplerPosition {
        match self {
            RowOrder::One(s) => s.position(),
            RowOrder::Mix(m) => m.position(),
        }
    }

    pub fn restore(&mut self, position: SamplerPosition) {
        match self {
            RowOrder::One(s) => s.restore(position),
            RowOrder::Mix(m) => m.restore(position),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// T5's rule with a cap: 1000, 300 and 40 rows with K = 200 give 200, 200 and 40 rows
    /// per mixture epoch; the counts hold in every epoch, a capped dataset continues through
    /// its rows across epochs (no row twice before all were seen), and a restored position
    /// continues the same order.
    #[test]
    fn a_capped_mixture_follows_the_rule_and_resumes() {
        let sizes = [1000, 300, 40];
        let counts = mixture_counts(&sizes, None, Some(200));
        assert_eq!(counts, [200, 200, 40]);
        let mut mix = Mixture::new(&sizes, counts, 7);
        assert_eq!(mix.epoch_len(), 440);
        let mut seen_first = std::collections::HashSet::new();
        for epoch in 0..3 {
            let rows = mix.next_batch(440);
            let per: Vec<usize> = (0..3)
                .map(|m| rows.iter().filter(|&&r| mix.dataset_of(r) == m).count())
                .collect();
            assert_eq!(per, [200, 200, 40], "epoch {epoch}");
            for &r in rows.iter().filter(|&&r| r < 1000) {
                assert!(
                    seen_first.insert(r),
                    "row {r} of the first dataset twice within 1000 draws"
                );
            }
        }
        assert_eq!(seen_first.len(), 600);
        // Mid-epoch resume.
        let saved = mix.position();
        let rest = mix.next_batch(300);
        let mut resumed = Mixture::new(&sizes, mixture_counts(&sizes, None, Some(200)), 7);
        resumed.restore(saved);
        assert_eq!(resumed.next_batch(300), rest);
        // Explicit weights: shares of all the rows, adding up.
        assert_eq!(
            mixture_counts(&sizes, Some(&[1.0, 1.0, 2.0]), None),
            [335, 335, 670]
        );
        assert_eq!(
            mixture_counts(&[3, 3, 3], Some(&[1.0, 1.0, 1.0]), None),
            [3, 3, 3]
        );
    }

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
