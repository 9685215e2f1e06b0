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
    position: SamplerPosition,
    order: Vec<usize>,
}

impl Sampler {
    pub fn new(len: usize, seed: u64, shuffle: bool) -> Self {
        assert!(len > 0, "a sampler needs at least one row");
        let mut s = Sampler {
            len,
            seed,
            shuffle,
            position: SamplerPosition::default(),
            order: vec![],
        };
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
    fn unshuffled_is_in_file_order() {
        let mut s = Sampler::new(3, 0, false);
        assert_eq!(s.next_batch(5), [0, 1, 2, 0, 1]);
    }
}
