//! The processes of one training run: this process's rank, how many there are, and the
//! few collective operations the training loops need.
//!
//! Every statistic that must be global goes through here — gradient sums in the training
//! unit's `step`, the token counts that normalise a loss, advantage whitening, the KL
//! controller's input, logged metrics — and only the main rank writes files (the run
//! directory, checkpoints, metrics). A run of one process has identity collectives; a
//! run launched by torchrun or Slurm ([`World::from_env`]) exchanges over c10d's store
//! ([`crate::dist`]), summing in rank order so that every rank holds the same numbers.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::dist::{Comm, Launch, Nccl};
use crate::error::Result;

/// The largest message of one collective: a gradient buffer goes over in buckets, so that
/// the store holds at most one bucket from each rank at a time, whatever the model's size.
/// c10d's libuv TCPStore (the default) refuses values over 8 MiB (it resets the
/// connection), so a bucket is half that.
const BUCKET_BYTES: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    /// NCCL for CUDA tensors, made at the first collective on one (when connected, in a
    /// build with NCCL); dropped before the store it rendezvoused over.
    nccl: Option<Arc<OnceLock<Nccl>>>,
    comm: Option<Arc<Comm>>,
    bucket_bytes: usize,
}

impl World {
    /// A run of one process.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            nccl: None,
            comm: None,
            bucket_bytes: BUCKET_BYTES,
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
        Ok(World::connected(&launch, comm))
    }

    /// The rank `launch` describes, exchanging over `comm`.
    fn connected(launch: &Launch, comm: Comm) -> Self {
        World {
            rank: launch.rank,
            size: launch.size,
            local_rank: launch.local_rank,
            nccl: Nccl::available().then(|| Arc::new(OnceLock::new())),
            comm: Some(Arc::new(comm)),
            bucket_bytes: BUCKET_BYTES,
        }
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

    /// Whether this process exchanges with others (launched by torchrun or Slurm, also as
    /// a world of one).
    pub fn is_distributed(&self) -> bool {
        self.comm.is_some()
    }

    /// Whether this process writes the run's files and logs.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Σ over ranks of a scalar.
    pub fn sum(&self, x: f64) -> f64 {
        self.sums([x])[0]
    }

    /// The store's collectives, when there are other ranks to exchange with.
    fn store(&self) -> Option<&Comm> {
        self.comm.as_deref().filter(|_| self.size > 1)
    }

    /// NCCL, for a CUDA tensor in a connected run of a build with NCCL (also with one
    /// rank, so that `torchrun --nproc-per-node 1` goes through it).
    fn nccl_for(&self, t: &Tensor) -> Option<&Nccl> {
        let (cell, comm) = (self.nccl.as_ref()?, self.comm.as_ref()?);
        if !t.device().is_cuda() {
            return None;
        }
        Some(cell.get_or_init(|| {
            let group = Nccl::new(comm).unwrap_or_else(|e| {
                eprintln!("error: {e}");
                std::process::exit(1)
            });
            tracing::info!(
                "data parallel: NCCL process group of {} ranks for CUDA tensors (rank {})",
                self.size,
                self.rank
            );
            group
        }))
    }

    /// Σ over ranks of each of several scalars, in one exchange (summed in rank order).
    pub fn sums<const N: usize>(&self, xs: [f64; N]) -> [f64; N] {
        self.sum_vec(&xs).try_into().expect("N sums")
    }

    /// [`World::sums`] of a run-time number of scalars (the same on every rank).
    pub fn sum_vec(&self, xs: &[f64]) -> Vec<f64> {
        let Some(comm) = self.store() else {
            return xs.to_vec();
        };
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut total = vec![0.0; xs.len()];
        for part in comm.all_gather(&format!("sums of {}", xs.len()), &bytes) {
            for (t, b) in total.iter_mut().zip(part.chunks_exact(8)) {
                *t += f64::from_le_bytes(b.try_into().expect("8 bytes"));
            }
        }
        total
    }

    /// The smallest `lo` and the largest `hi` over every rank's `(lo, hi)`.
    pub fn min_max(&self, (lo, hi): (f64, f64)) -> (f64, f64) {
        let bytes: Vec<u8> = [lo, hi].iter().flat_map(|x| x.to_le_bytes()).collect();
        self.gather_bytes(&bytes)
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), part| {
                let at = |i: usize| f64::from_le_bytes(part[i..i + 8].try_into().expect("8 bytes"));
                (a.min(at(0)), b.max(at(8)))
            })
    }

    /// Every rank's `bytes`, in rank order.
    pub fn gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        match self.store() {
            None => vec![bytes.to_vec()],
            Some(comm) => comm.all_gather("gather_bytes", bytes),
        }
    }

    /// Mean over ranks of a scalar (each rank holding an equal share of the batch).
    pub fn mean(&self, x: f64) -> f64 {
        self.sum(x) / self.size as f64
    }

    /// Σ over ranks of a tensor, in place on every rank (summed in rank order, in the
    /// tensor's dtype, on the CPU; a bucket at a time).
    pub fn sum_(&self, t: &Tensor) {
        let _guard = tch::no_grad_guard();
        let contiguous = t.is_contiguous();
        let flat = match contiguous {
            true => t.view([-1]),
            false => t.contiguous().view([-1]),
        };
        let write_back = || {
            if !contiguous {
                t.shallow_clone().copy_(&flat.view(t.size().as_slice()));
            }
        };
        if let Some(nccl) = self.nccl_for(t) {
            nccl.all_reduce_sum(&flat);
            return write_back();
        }
        let Some(comm) = self.store() else {
            return;
        };
        for (start, len) in self.buckets(flat.numel() as i64, t.kind()) {
            let part = flat.narrow(0, start, len);
            let what = format!("sum of {len} {:?}", t.kind());
            let total =
                sum_in_rank_order(comm.all_gather(&what, &host_bytes(&part)), len, t.kind());
            part.shallow_clone().copy_(&total);
        }
        write_back();
    }

    /// This rank's shard `(start, len)` of a flat buffer of `n` elements under ZeRO-1: what
    /// [`World::reduce_scatter_`] sums into and [`World::all_gather_shards_`] sends.
    pub fn shard_of(&self, n: i64) -> (i64, i64) {
        self.shards(n)[self.rank]
    }

    /// Every rank's shard of `n` elements, in rank order.
    fn shards(&self, n: i64) -> Vec<(i64, i64)> {
        (0..self.size)
            .map(|r| {
                let (start, len) = shard_range(n as usize, r, self.size);
                (start as i64, len as i64)
            })
            .collect()
    }

    /// The buckets over the range `(start, len)` of a sharded flat buffer of `n` elements
    /// of `kind`: for each, every rank's part of it (`None` where the rank's shard misses
    /// the bucket), in rank order.
    fn bucket_pieces(
        &self,
        n: i64,
        (start, len): (i64, i64),
        kind: Kind,
    ) -> Vec<Vec<Option<(i64, i64)>>> {
        let shards = self.shards(n);
        self.buckets(len, kind)
            .into_iter()
            .map(|(a, l)| shards.iter().map(|s| overlap((start + a, l), *s)).collect())
            .collect()
    }

    /// Consecutive ranges of at most one bucket's elements covering `n` elements of `kind`.
    fn buckets(&self, n: i64, kind: Kind) -> Vec<(i64, i64)> {
        let per = (self.bucket_bytes / kind.elt_size_in_bytes()).max(1) as i64;
        (0..n)
            .step_by(per as usize)
            .map(|a| (a, per.min(n - a)))
            .collect()
    }

    /// ZeRO's reduce-scatter: Σ over ranks of the flat tensor `flat`, written only into this
    /// rank's shard ([`World::shard_of`]); the rest keeps this rank's own values. Summed in
    /// rank order as [`World::sum_`], so the shard holds exactly what `sum_` would give.
    pub fn reduce_scatter_(&self, flat: &Tensor) {
        self.reduce_scatter_range_(flat, (0, flat.numel() as i64));
    }

    /// [`World::reduce_scatter_`] of the elements `(start, len)` of `flat` (one bucket of
    /// it): each rank's shard of the whole buffer gets the sum where it meets the range.
    pub fn reduce_scatter_range_(&self, flat: &Tensor, range: (i64, i64)) {
        if let Some(nccl) = self.nccl_for(flat) {
            // NCCL's own reduce-scatter needs equal shards: the whole sum is a superset.
            return nccl.all_reduce_sum(&flat.narrow(0, range.0, range.1));
        }
        let Some(comm) = self.store() else {
            return;
        };
        let _guard = tch::no_grad_guard();
        for pieces in self.bucket_pieces(flat.numel() as i64, range, flat.kind()) {
            let bytes: Vec<Option<Vec<u8>>> = pieces
                .iter()
                .map(|p| p.map(|(a, l)| host_bytes(&flat.narrow(0, a, l))))
                .collect();
            let parts: Vec<Option<&[u8]>> = bytes.iter().map(|b| b.as_deref()).collect();
            let what = format!("reduce-scatter of {} {:?}", range.1, flat.kind());
            let received = comm.all_to_all(&what, &parts);
            if let Some((a, l)) = pieces[self.rank] {
                let total = sum_in_rank_order(received, l, flat.kind());
                flat.narrow(0, a, l).copy_(&total);
            }
        }
    }

    /// ZeRO's all-gather: every rank's shard of the flat tensor `flat`, from that rank,
    /// into every rank's copy.
    pub fn all_gather_shards_(&self, flat: &Tensor) {
        let _guard = tch::no_grad_guard();
        if let Some(nccl) = self.nccl_for(flat) {
            // NCCL's all-gather needs equal shards: the others' parts zeroed, then summed
            // (x + 0 is exactly x).
            let n = flat.numel() as i64;
            let (start, len) = self.shard_of(n);
            let _ = flat.narrow(0, 0, start).zero_();
            let _ = flat.narrow(0, start + len, n - start - len).zero_();
            return nccl.all_reduce_sum(flat);
        }
        let Some(comm) = self.store() else {
            return;
        };
        let n = flat.numel() as i64;
        for pieces in self.bucket_pieces(n, (0, n), flat.kind()) {
            let mine = pieces[self.rank]
                .map(|(a, l)| host_bytes(&flat.narrow(0, a, l)))
                .unwrap_or_default();
            let what = format!("all-gather of {n} {:?}", flat.kind());
            for (piece, bytes) in pieces.iter().zip(comm.all_gather(&what, &mine)) {
                if let Some((a, l)) = piece {
                    let value = from_bytes(&bytes, *l, flat.kind());
                    flat.narrow(0, *a, *l).copy_(&value);
                }
            }
        }
    }

    /// The whole flat tensor of `n` elements on the main rank (on the CPU), assembled from
    /// every rank's shard (`shard` is this rank's, [`World::shard_of`]`(n)` long); `None`
    /// on the other ranks. One process: `shard` itself.
    pub fn gather_shards(&self, shard: &Tensor, n: i64) -> Option<Tensor> {
        let Some(comm) = self.store() else {
            return Some(shard.shallow_clone());
        };
        let _guard = tch::no_grad_guard();
        let kind = shard.kind();
        let out = self
            .is_main()
            .then(|| Tensor::zeros([n], (kind, Device::Cpu)));
        let my_start = self.shard_of(n).0;
        for pieces in self.bucket_pieces(n, (0, n), kind) {
            let mine = pieces[self.rank]
                .map(|(a, l)| host_bytes(&shard.narrow(0, a - my_start, l)))
                .unwrap_or_default();
            let mut parts: Vec<Option<&[u8]>> = vec![None; self.size];
            parts[0] = Some(&mine);
            let received = comm.all_to_all(&format!("gather of {n} {kind:?}"), &parts);
            if let Some(out) = &out {
                for (piece, bytes) in pieces.iter().zip(received) {
                    if let Some((a, l)) = piece {
                        out.narrow(0, *a, *l).copy_(&from_bytes(&bytes, *l, kind));
                    }
                }
            }
        }
        out
    }

    /// Σ over ranks of a tensor, as a new tensor (the input is left as it was).
    pub fn summed(&self, t: &Tensor) -> Tensor {
        let out = t.copy();
        self.sum_(&out);
        out
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

/// Runs `f` as each of `size` ranks, in threads of this process connected over a real
/// TCPStore, with buckets of `bucket_bytes`; returns each rank's result in rank order.
#[cfg(test)]
pub(crate) fn in_threads<T: Send + 'static>(
    size: usize,
    bucket_bytes: usize,
    f: impl Fn(World) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let ranks: Vec<_> = Launch::local(size)
        .into_iter()
        .map(|launch| {
            let f = f.clone();
            std::thread::spawn(move || {
                let comm = launch.connect(Duration::from_secs(60)).unwrap();
                f(World {
                    bucket_bytes,
                    ..World::connected(&launch, comm)
                })
            })
        })
        .collect();
    ranks.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The bytes of `t` (copied to the CPU, contiguous).
fn host_bytes(t: &Tensor) -> Vec<u8> {
    let cpu = t.detach().to_device(Device::Cpu).contiguous();
    let numel = cpu.numel();
    let mut bytes = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
    cpu.copy_data_u8(&mut bytes, numel);
    bytes
}

/// A CPU tensor of `len` elements of `kind` from its bytes.
fn from_bytes(bytes: &[u8], len: i64, kind: Kind) -> Tensor {
    Tensor::from_data_size(bytes, &[len], kind)
}

/// Σ of every rank's `len` elements, added in rank order (what every rank computes alike).
fn sum_in_rank_order(parts: Vec<Vec<u8>>, len: i64, kind: Kind) -> Tensor {
    parts
        .iter()
        .map(|bytes| from_bytes(bytes, len, kind))
        .reduce(|acc, x| acc + x)
        .expect("one rank at least")
}

/// The common part of two element ranges `(start, len)`, if any.
fn overlap((a, n): (i64, i64), (b, m): (i64, i64)) -> Option<(i64, i64)> {
    let (start, end) = (a.max(b), (a + n).min(b + m));
    (start < end).then_some((start, end - start))
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
        assert_eq!(world.shard_of(7), (0, 7));
    }

    /// A buffer bigger than the store takes in one value (8 MiB): summed in buckets.
    #[test]
    fn buffers_over_the_store_limit_sum_in_buckets() {
        let n = 3 << 20; // 12 MiB of f32
        let sums = in_threads(2, BUCKET_BYTES, move |world| {
            let t = Tensor::ones([n], (Kind::Float, Device::Cpu)) * (world.rank() as f64 + 1.0);
            world.sum_(&t);
            t.min().double_value(&[]) == 3.0 && t.max().double_value(&[]) == 3.0
        });
        assert_eq!(sums, [true, true]);
    }

    /// Two ranks in threads over a real TCPStore, with buckets of 3 elements (so buckets
    /// straddle the shards of a 10-element buffer): the sum, ZeRO's reduce-scatter (which
    /// equals the sum on the rank's shard and leaves the rest), its all-gather, and the
    /// gathering of shards on the main rank.
    #[test]
    fn bucketed_collectives_between_two_ranks() {
        let results = in_threads(2, 12, |world| {
            let rank = world.rank();
            let mine = |k: f32| {
                Tensor::from_slice(&(0..10).map(|i| k * (i as f32 + 1.0)).collect::<Vec<_>>())
            };
            let own = mine(rank as f32 + 1.0);
            let summed = world.summed(&own);
            // A non-contiguous tensor sums in place too.
            let wide = mine(rank as f32 + 1.0).view([5, 2]).transpose(0, 1);
            world.sum_(&wide);
            let scattered = own.copy();
            world.reduce_scatter_(&scattered);
            let (start, len) = world.shard_of(10);
            // Each rank's shard set to the rank's id + 1, then gathered everywhere.
            let updated = Tensor::zeros([10], (Kind::Float, Device::Cpu));
            let _ = updated.narrow(0, start, len).fill_(rank as f64 + 1.0);
            world.all_gather_shards_(&updated);
            let whole = world.gather_shards(&scattered.narrow(0, start, len), 10);
            (rank, own, summed, wide, scattered, updated, whole)
        });
        for (rank, own, summed, wide, scattered, updated, whole) in results {
            let want: Vec<f32> = (0..10).map(|i| 3.0 * (i as f32 + 1.0)).collect();
            let want = Tensor::from_slice(&want);
            assert!(summed.equal(&want), "rank {rank}: {summed}");
            assert!(wide.transpose(0, 1).reshape([-1]).equal(&want));
            let (start, len) = shard_range(10, rank, 2);
            let (start, len) = (start as i64, len as i64);
            for i in 0..10 {
                let expect = if (start..start + len).contains(&i) {
                    &want
                } else {
                    &own
                };
                assert_eq!(
                    scattered.double_value(&[i]),
                    expect.double_value(&[i]),
                    "rank {rank} element {i}"
                );
            }
            let ids: Vec<f32> = (0..10).map(|i| if i < 5 { 1.0 } else { 2.0 }).collect();
            assert!(updated.equal(&Tensor::from_slice(&ids)));
            match whole {
                Some(w) => {
                    assert_eq!(rank, 0);
                    assert!(w.equal(&want));
                }
                None => assert_eq!(rank, 1),
            }
        }
    }
}
