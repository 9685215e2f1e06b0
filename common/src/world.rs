//! The processes of one training run: this process's rank, how many there are, and the
//! few collective operations the training loops need.
//!
//! Every statistic that must be global goes through here — gradient sums in the training
//! unit's `step`, the token counts that normalise a loss, advantage whitening, the KL
//! controller's input, logged metrics — and only the main rank writes files (the run
//! directory, checkpoints, metrics). A run of one process has identity collectives; a
//! run launched by torchrun or Slurm ([`World::from_env`]) exchanges over c10d's store
//! ([`crate::dist`]), summing in rank order so that every rank holds the same numbers.

use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Tensor};

use crate::dist::{Comm, Launch};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    comm: Option<Arc<Comm>>,
}

impl World {
    /// A run of one process.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            comm: None,
        }
    }

    /// The run torchrun or Slurm launched this process into (`WORLD_SIZE`, `RANK`,
    /// `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; `SLURM_NTASKS`, `SLURM_PROCID`,
    /// `SLURM_LOCALID`), connected; one process without them. A rank waits at most
    /// `timeout` for the others at any collective.
    pub fn from_env(timeout: Duration) -> Result<Self> {
        let Some(launch) = Launch::from_env(|k| std::env::var(k).ok())? else {
            return Ok(World::single());
        };
        let comm = launch.connect(timeout)?;
        tracing::info!(
            "data parallel: rank {} of {} (local rank {}), store {}:{}",
            launch.rank,
            launch.size,
            launch.local_rank,
            launch.host,
            launch.port
        );
        Ok(World {
            rank: launch.rank,
            size: launch.size,
            local_rank: launch.local_rank,
            comm: Some(Arc::new(comm)),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's index on its machine (its GPU).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// The device of this rank: with several ranks, `cuda` means this rank's GPU
    /// (`cuda:LOCAL_RANK`).
    pub fn device(&self, requested: Device) -> Device {
        match requested {
            Device::Cuda(_) if self.size > 1 => Device::Cuda(self.local_rank),
            other => other,
        }
    }

    /// Whether this process writes the run's files and logs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Σ over ranks of a scalar.
    pub fn sum(&self, x: f64) -> f64 {
        self.sums([x])[0]
    }

    /// Σ over ranks of each of several scalars, in one exchange (summed in rank order).
    pub fn sums<const N: usize>(&self, xs: [f64; N]) -> [f64; N] {
        let Some(comm) = &self.comm else {
            return xs;
        };
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut total = [0.0; N];
        for part in comm.all_gather(&bytes) {
            for (t, b) in total.iter_mut().zip(part.chunks_exact(8)) {
                *t += f64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
        }
        total
    }

    /// Every rank's `bytes`, in rank order.
    pub fn gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        match &self.comm {
            None => vec![bytes.to_vec()],
            Some(comm) => comm.all_gather(bytes),
        }
    }

    /// Mean over ranks of a scalar (each rank holding an equal share of the batch).
    pub fn mean(&self, x: f64) -> f64 {
        self.sum(x) / self.size as f64
    }

    /// Σ over ranks of a tensor, in place on every rank (summed in rank order, in the
    /// tensor's dtype, on the CPU).
    pub fn sum_(&self, t: &Tensor) {
        let Some(comm) = &self.comm else {
            return;
        };
        let (cpu, bytes) = host_bytes(t);
        let mut total: Option<Tensor> = None;
        for part in comm.all_gather(&bytes) {
            let x = Tensor::from_data_size(&part, &cpu.size(), cpu.kind());
            total = Some(match total {
                None => x,
                Some(acc) => acc + x,
            });
        }
        let _guard = tch::no_grad_guard();
        t.shallow_clone().copy_(&total.expect("one rank at least"));
    }

    /// Σ over ranks of a tensor, as a new tensor (the input is left as it was).
    pub fn summed(&self, t: &Tensor) -> Tensor {
        let out = t.copy();
        self.sum_(&out);
        out
    }

    /// The main rank's values of `t`, copied into `t` on every rank.
    pub fn broadcast_(&self, t: &Tensor) {
        let Some(comm) = &self.comm else {
            return;
        };
        let (cpu, bytes) = host_bytes(t);
        let value = comm.broadcast(&bytes);
        let _guard = tch::no_grad_guard();
        t.shallow_clone()
            .copy_(&Tensor::from_data_size(&value, &cpu.size(), cpu.kind()));
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&self) {
        self.sum(0.0);
    }

    /// This rank's share of a global batch: contiguous, the first `len % size` ranks
    /// holding one more item.
    pub fn shard<'a, T>(&self, global: &'a [T]) -> &'a [T] {
        let (start, len) = shard_range(global.len(), self.rank, self.size);
        &global[start..start + len]
    }
}

/// `t` on the CPU, contiguous, and its bytes.
fn host_bytes(t: &Tensor) -> (Tensor, Vec<u8>) {
    let cpu = t.detach().to_device(Device::Cpu).contiguous();
    let numel = cpu.numel();
    let mut bytes = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
    cpu.copy_data_u8(&mut bytes, numel);
    (cpu, bytes)
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
