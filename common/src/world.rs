//! The processes of one training run: this process's rank, how many there are, and the
//! few collective operations the training loops need.
//!
//! Every statistic that must be global goes through here — gradient sums in the training
//! unit's `step`, the token counts that normalise a loss, advantage whitening, the KL
//! controller's input, logged metrics — and only the main rank writes files (the run
//! directory, checkpoints, metrics). Today the world is one process and each collective
//! is the identity; data parallelism (c10d) plugs in here without touching the loops.

use tch::Tensor;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    rank: usize,
    size: usize,
}

impl World {
    /// A run of one process.
    pub fn single() -> Self {
        World { rank: 0, size: 1 }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether this process writes the run's files and logs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Σ over ranks of a scalar.
    pub fn sum(&self, x: f64) -> f64 {
        x
    }

    /// Mean over ranks of a scalar (each rank holding an equal share of the batch).
    pub fn mean(&self, x: f64) -> f64 {
        self.sum(x) / self.size as f64
    }

    /// Σ over ranks of a tensor, in place on every rank.
    pub fn sum_(&self, _t: &Tensor) {}

    /// Σ over ranks of a tensor, as a new tensor (the input is left as it was).
    pub fn summed(&self, t: &Tensor) -> Tensor {
        let out = t.copy();
        self.sum_(&out);
        out
    }

    /// The main rank's values of `t`, copied into `t` on every rank.
    pub fn broadcast_(&self, _t: &Tensor) {}

    /// Waits until every rank has reached this point.
    pub fn barrier(&self) {}

    /// This rank's share of a global batch: contiguous, the first `len % size` ranks
    /// holding one more item.
    pub fn shard<'a, T>(&self, global: &'a [T]) -> &'a [T] {
        let (start, len) = shard_range(global.len(), self.rank, self.size);
        &global[start..start + len]
    }
}

/// `(start, len)` of rank `rank`'s share of `n` items split over `size` ranks.
pub fn shard_range(n: usize, rank: usize, size: usize) -> (usize, usize) {
    let (base, extra) = (n / size, n % size);
    (
        rank * base + rank.min(extra),
        base + usize::from(rank < extra),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_once_in_order() {
        for (n, size) in [(10, 3), (4, 4), (3, 5), (16, 2)] {
            let mut covered = vec![];
            for rank in 0..size {
                let (start, len) = shard_range(n, rank, size);
                assert_eq!(start, covered.len(), "n {n} size {size} rank {rank}");
                covered.extend(start..start + len);
            }
            assert_eq!(covered, (0..n).collect::<Vec<_>>());
        }
        let world = World::single();
        assert_eq!(world.shard(&[1, 2, 3]), [1, 2, 3]);
        assert_eq!(world.mean(4.0), 4.0);
    }
}
