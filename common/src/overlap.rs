//! The gradient exchange of a data-parallel step, overlapped with its last backward pass
//! (`--overlap-grad-reduce`, what PyTorch's DDP does with its buckets).
//!
//! The optimiser's flat gradient buffers are cut into buckets of about `--bucket-cap-mb`
//! along the order the backward pass completes them: the transformer blocks from the last
//! to the first, then everything outside the blocks (embeddings, final norm, heads, soft
//! prompts), whose gradients can keep arriving until the end (the chunked LM head adds to
//! the tied embedding once per chunk). Every block parameter gets a post-accumulate hook
//! (`shim/grad_hook.cpp`). During the step's last backward a sender thread takes the
//! buckets in their fixed order and sums each over the ranks (or reduce-scatters it under
//! ZeRO-1) as soon as every hooked parameter in it has its gradient, while the backward
//! goes on below; what remains is sent when the backward returns.
//!
//! Every rank sends the same buckets in the same order whether or not its backward ran
//! overlapped (a rank without a last backward sends them all at the step), so the ranks'
//! collectives always pair up; and a bucket's sum is element-wise, so the result is bit
//! for bit the one the whole-buffer exchange gives. A gradient that reaches a bucket after
//! it went out would be lost from the sum: that stops the run with the parameter's name.

#![allow(unsafe_code)] // the hook's callbacks cross the C boundary

use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tch::Tensor;

use crate::optim::ZeroStage;
use crate::world::World;

#[allow(unsafe_code)]
mod ffi {
    use std::ffi::c_void;

    unsafe extern "C" {
        pub fn rlhf_post_accumulate_hook(
            tensor: *mut c_void,
            fire: extern "C" fn(*mut c_void, i64),
            release: extern "C" fn(*mut c_void),
            context: *mut c_void,
            index: i64,
        ) -> i32;
    }
}

/// DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_CAP_MB: f64 = 25.0;

/// A trainable parameter as the optimiser lays it out: its group (flat buffer), offset and
/// length there, and the variable itself (for its hook).
pub(crate) struct Member<'a> {
    pub name: &'a str,
    pub group: usize,
    pub offset: i64,
    pub numel: i64,
    pub tensor: &'a Tensor,
}

/// A contiguous range of one group's flat gradient buffer, sent as one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    group: usize,
    start: i64,
    len: i64,
}

/// The transformer block a parameter belongs to (the first all-digit component of its
/// name: `model.layers.3.mlp...`, `transformer.h.3...`), if any.
pub fn block_of(name: &str) -> Option<usize> {
    name.split('.').find_map(|part| part.parse().ok())
}

/// The order parameters are laid out in their flat buffers: the order a backward pass
/// completes them — the last block first — and the parameters outside the blocks last
/// (then by name).
pub fn layout_key(name: &str) -> (bool, std::cmp::Reverse<usize>, &str) {
    let block = block_of(name);
    (block.is_none(), std::cmp::Reverse(block.unwrap_or(0)), name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Backward passes of earlier micro-batches: gradients still accumulate.
    Accumulating,
    /// The step's last backward runs; the sender sends what is complete.
    Overlapping,
    /// The gradients have been exchanged; the step has not been taken yet.
    Sent,
}

#[derive(Debug)]
struct Progress {
    phase: Phase,
    /// The backward has returned (or unwound): the sender sends the rest.
    backward_done: bool,
    /// Per hooked parameter: whether its gradient has arrived in this backward.
    arrived: Vec<bool>,
    /// Per bucket: hooked parameters whose gradient has not arrived (a bucket holding
    /// parameters outside the blocks waits for the backward's end whatever this says).
    missing: Vec<usize>,
    /// Buckets the sender has taken (in order).
    taken: usize,
    /// Of those, the ones it took while the backward was still running.
    early: usize,
    /// What went wrong: a gradient that arrived after its bucket had gone.
    late: Option<String>,
}

#[derive(Debug)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
    /// Per hooked parameter: its name and its bucket.
    hooked: Vec<(String, usize)>,
    /// Per bucket: hooked parameters in it, and whether it waits for the backward's end.
    expected: Vec<(usize, bool)>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // A panic elsewhere must not turn every later hook into an abort.
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parameter `index`'s gradient has been accumulated.
    fn arrived(&self, index: usize) {
        let (name, bucket) = &self.hooked[index];
        let mut p = self.lock();
        let gone = match p.phase {
            Phase::Accumulating => return,
            Phase::Overlapping => *bucket < p.taken,
            Phase::Sent => true,
        };
        if gone {
            p.late.get_or_insert_with(|| {
                format!("the gradient of {name} arrived after it had been sent to the other ranks")
            });
        } else if !std::mem::replace(&mut p.arrived[index], true) {
            p.missing[*bucket] -= 1;
            if p.missing[*bucket] == 0 {
                self.changed.notify_all();
            }
        }
    }

    /// Waits until bucket `b` can go, and marks it taken.
    fn take(&self, b: usize) {
        let mut p = self.lock();
        while !(p.backward_done || (p.missing[b] == 0 && !self.expected[b].1)) {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        if !p.backward_done {
            p.early += 1;
        }
        p.taken = b + 1;
    }

    fn finish_backward(&self) {
        self.lock().backward_done = true;
        self.changed.notify_all();
    }
}

extern "C" fn on_gradient(context: *mut c_void, index: i64) {
    // SAFETY: the context is an `Arc<Shared>` the hook holds a reference to (see `new`).
    let shared = unsafe { &*(context as *const Shared) };
    shared.arrived(index as usize);
}

extern "C" fn release(context: *mut c_void) {
    // SAFETY: each hook was given one `Arc::into_raw` reference, released here once.
    drop(unsafe { Arc::from_raw(context as *const Shared) });
}

/// The buckets of a model's gradients and the hooks that fill them.
#[derive(Debug)]
pub(crate) struct Overlap {
    buckets: Vec<Bucket>,
    shared: Arc<Shared>,
    world: World,
    zero: ZeroStage,
    /// Each group's flat gradient buffer.
    grads: Vec<Tensor>,
    /// The first overlapped backward's count has been logged.
    reported: std::sync::atomic::AtomicBool,
}

impl Overlap {
    /// Buckets of at most `cap_bytes` over `members` (in their groups' layout order, each
    /// group's members in [`layout_key`] order), hooks on the block parameters among them.
    pub(crate) fn new(
        members: &[Member],
        grads: &[Tensor],
        cap_bytes: usize,
        world: &World,
        zero: ZeroStage,
    ) -> Self {
        // Cut each group's run of members where a bucket would outgrow the cap and where
        // the blocks end.
        let mut buckets: Vec<(Bucket, usize)> = vec![]; // with its lowest block (or MAX)
        let mut bucket_of = vec![0; members.len()];
        for (i, m) in members.iter().enumerate() {
            let bytes = grads[m.group].kind().elt_size_in_bytes() as i64;
            let block = block_of(m.name).unwrap_or(usize::MAX);
            let joins = buckets.last().is_some_and(|(b, lowest)| {
                b.group == m.group
                    && (*lowest == usize::MAX) == (block == usize::MAX)
                    && (b.len + m.numel) * bytes <= cap_bytes as i64
            });
            if joins {
                let (b, lowest) = buckets.last_mut().expect("joins");
                b.len += m.numel;
                *lowest = block;
            } else {
                let bucket = Bucket {
                    group: m.group,
                    start: m.offset,
                    len: m.numel,
                };
                buckets.push((bucket, block));
            }
            bucket_of[i] = buckets.len() - 1;
        }
        // The send order: by when a backward completes them (the lowest block in a bucket
        // comes last), the buckets outside the blocks at the end.
        let mut order: Vec<usize> = (0..buckets.len()).collect();
        order.sort_by_key(|&b| {
            let (bucket, lowest) = buckets[b];
            (
                lowest == usize::MAX,
                std::cmp::Reverse(lowest),
                bucket.group,
            )
        });
        let position: Vec<usize> = {
            let mut position = vec![0; order.len()];
            for (at, &b) in order.iter().enumerate() {
                position[b] = at;
            }
            position
        };
        let mut hooked = vec![];
        let mut expected = vec![(0, false); order.len()];
        for (i, m) in members.iter().enumerate() {
            let b = position[bucket_of[i]];
            match block_of(m.name) {
                Some(_) => {
                    expected[b].0 += 1;
                    hooked.push((m.name.to_string(), b, m.tensor));
                }
                None => expected[b].1 = true,
            }
        }
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                phase: Phase::Accumulating,
                backward_done: false,
                arrived: vec![false; hooked.len()],
                missing: expected.iter().map(|e| e.0).collect(),
                taken: 0,
                early: 0,
                late: None,
            }),
            changed: Condvar::new(),
            hooked: hooked
                .iter()
                .map(|(name, b, _)| (name.clone(), *b))
                .collect(),
            expected,
        });
        for (index, (name, _, tensor)) in hooked.iter().enumerate() {
            let context = Arc::into_raw(shared.clone()) as *mut c_void;
            let mut t = tensor.shallow_clone();
            // SAFETY: the tensor pointer is tch's at::Tensor*, valid for the call; the hook
            // takes over the context's reference (released also on failure).
            let rc = unsafe {
                ffi::rlhf_post_accumulate_hook(
                    t.as_mut_ptr() as *mut c_void,
                    on_gradient,
                    release,
                    context,
                    index as i64,
                )
            };
            assert_eq!(
                rc,
                0,
                "cannot hook the gradient of {name}: {}",
                crate::shim::last_error()
            );
        }
        Overlap {
            buckets: order.iter().map(|&b| buckets[b].0).collect(),
            shared,
            world: world.clone(),
            zero,
            grads: grads.iter().map(Tensor::shallow_clone).collect(),
            reported: Default::default(),
        }
    }

    /// How many buckets the gradients go in.
    pub(crate) fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Buckets taken by the sender in the last overlapped backward, and how many of them
    /// before that backward had returned.
    #[cfg(test)]
    pub(crate) fn sent(&self) -> (usize, usize) {
        let p = self.shared.lock();
        (p.taken, p.early)
    }

    /// Runs `backward` (the step's last) while a sender thread exchanges each bucket as
    /// soon as it is complete; returns when every bucket has been exchanged.
    pub(crate) fn during(&self, backward: impl FnOnce()) {
        {
            let mut p = self.shared.lock();
            if p.phase == Phase::Sent {
                // The gradients were summed already: this backward would be summed again.
                p.late.get_or_insert_with(|| {
                    "two backward passes were announced as the step's last".to_string()
                });
            }
            p.phase = Phase::Overlapping;
            p.backward_done = false;
            p.arrived.fill(false);
            p.missing = self.shared.expected.iter().map(|e| e.0).collect();
            p.taken = 0;
            p.early = 0;
        }
        /// Lets the sender finish even when the backward unwinds.
        struct Done<'a>(&'a Shared);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.finish_backward();
            }
        }
        let grads: Vec<Tensor> = self.grads.iter().map(Tensor::shallow_clone).collect();
        let (buckets, world, zero) = (&self.buckets, &self.world, self.zero);
        std::thread::scope(|scope| {
            let shared = &*self.shared;
            let sender = scope.spawn(move || {
                for (b, bucket) in buckets.iter().enumerate() {
                    shared.take(b);
                    send(world, zero, &grads[bucket.group], bucket);
                }
            });
            let done = Done(shared);
            backward();
            drop(done);
            if sender.join().is_err() {
                panic!("the gradient exchange failed");
            }
        });
        let mut p = self.shared.lock();
        p.phase = Phase::Sent;
        if !self
            .reported
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(
                "--overlap-grad-reduce: {} of {} buckets went out while the backward ran",
                p.early,
                self.buckets.len()
            );
        }
    }

    /// At the step: the gradients summed over the ranks — already, when the last backward
    /// ran through [`Overlap::during`], otherwise now, in the same buckets and order.
    pub(crate) fn reduce(&self) {
        let (phase, late) = {
            let mut p = self.shared.lock();
            (
                std::mem::replace(&mut p.phase, Phase::Accumulating),
                p.late.take(),
            )
        };
        if let Some(what) = late {
            panic!(
                "{what} (a backward pass after the step's last one, or a block parameter used twice in it): run without --overlap-grad-reduce"
            );
        }
        if phase != Phase::Sent {
            for bucket in &self.buckets {
                send(&self.world, self.zero, &self.grads[bucket.group], bucket);
            }
        }
    }
}

/// One bucket's exchange: summed over the ranks, or under ZeRO-1 into its owners' shards.
fn send(world: &World, zero: ZeroStage, grads: &Tensor, bucket: &Bucket) {
    match zero {
        ZeroStage::Off => world.sum_(&grads.narrow(0, bucket.start, bucket.len)),
        ZeroStage::Optimizer => world.reduce_scatter_range_(grads, (bucket.start, bucket.len)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, AdamWConfig, GradExchange};
    use crate::world::in_threads;
    use tch::{nn, Device, Kind};

    #[test]
    fn parameters_are_laid_out_in_the_order_a_backward_completes_them() {
        let mut names = vec![
            "model.embed_tokens.weight",
            "model.layers.10.mlp.weight",
            "model.layers.2.mlp.weight",
            "model.layers.2.attn.weight",
            "model.norm.weight",
            "base_model.model.model.layers.0.q_proj.lora_A.weight",
        ];
        names.sort_by_key(|n| layout_key(n));
        assert_eq!(
            names,
            [
                "model.layers.10.mlp.weight",
                "model.layers.2.attn.weight",
                "model.layers.2.mlp.weight",
                "base_model.model.model.layers.0.q_proj.lora_A.weight",
                "model.embed_tokens.weight",
                "model.norm.weight",
            ]
        );
    }

    /// AdamW over `vs`'s variables on `world`, the exchange overlapped in buckets of at
    /// most `bucket_bytes`.
    fn overlapped(vs: &nn::VarStore, world: &World, zero: ZeroStage, bucket_bytes: usize) -> AdamW {
        let config = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            loraplus_lr_ratio: None,
            eight_bit: false,
        };
        let exchange = GradExchange {
            zero,
            overlap_bucket_bytes: Some(bucket_bytes),
        };
        AdamW::distributed(vs.variables(), config, world, exchange)
    }

    /// What each rank's run gives: the summed (or, under ZeRO-1, owned-shard) gradients of
    /// every parameter, how many buckets were sent, how many of them before the backward
    /// returned.
    type Outcome = (Vec<(String, Vec<f32>)>, (usize, usize));

    /// Three block parameters and one outside the blocks, on two ranks: rank 0 backpropagates
    /// in two micro-batches, the second one overlapped (block 1's gradient first; the
    /// test waits, inside that backward, until its bucket has gone); rank 1 in one
    /// micro-batch without overlap, its buckets sent at the step. Both get the sums the
    /// whole-buffer exchange gives.
    fn run(zero: ZeroStage) -> Vec<Outcome> {
        in_threads(2, 1 << 20, move |world| {
            let rank = world.rank() as f64;
            let vs = nn::VarStore::new(Device::Cpu);
            let root = vs.root();
            let init = |n: i64, k: f64| Tensor::arange(n, (Kind::Float, Device::Cpu)) * k;
            let top = (&root / "layers" / "1").var_copy("w", &init(20, 0.1));
            let below = (&root / "layers" / "0").var_copy("w", &init(12, -0.2));
            let bias = (&root / "layers" / "0").var_copy("bias", &init(3, 0.3));
            let embed = (&root / "embed").var_copy("weight", &init(5, 0.5));
            let opt = overlapped(&vs, &world, zero, 40);
            let overlap = opt.overlap.as_ref().expect("overlapped");
            assert!(overlap.bucket_count() >= 4, "{}", overlap.bucket_count());
            let loss = |p: &Tensor, k: f64| (p * p * (k + rank)).sum(Kind::Float);
            let embed_loss = || (&embed * (rank + 2.0)).sin().sum(Kind::Float);
            if world.rank() == 0 {
                (loss(&top, 1.0) + loss(&below, 1.0) + embed_loss()).backward();
                opt.last_backward(|| {
                    loss(&top, 2.0).backward();
                    let start = std::time::Instant::now();
                    while overlap.sent().0 == 0 {
                        assert!(start.elapsed().as_secs() < 30, "no bucket went early");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    (loss(&below, 2.0) + (&bias * 3.0).sum(Kind::Float) + embed_loss()).backward();
                });
            } else {
                (loss(&top, 1.0) + loss(&below, 1.0) + embed_loss()).backward();
                (loss(&top, 2.0)
                    + loss(&below, 2.0)
                    + (&bias * 3.0).sum(Kind::Float)
                    + embed_loss())
                .backward();
            }
            opt.reduce_gradients();
            let sent = overlap.sent();
            let grads = [("layers.1.w", &top), ("layers.0.w", &below)]
                .into_iter()
                .chain([("layers.0.bias", &bias), ("embed.weight", &embed)])
                .map(|(name, p)| (name.to_string(), Vec::<f32>::try_from(p.grad()).unwrap()))
                .collect();
            (grads, sent)
        })
    }

    /// The sum over both ranks of the gradients [`run`] makes.
    fn expected(name: &str) -> Vec<f32> {
        let init = |n: i64, k: f64| Tensor::arange(n, (Kind::Float, Device::Cpu)) * k;
        let per_rank = |rank: f64| match name {
            "layers.1.w" => init(20, 0.1) * 2.0 * ((1.0 + rank) + (2.0 + rank)),
            "layers.0.w" => init(12, -0.2) * 2.0 * ((1.0 + rank) + (2.0 + rank)),
            "layers.0.bias" => Tensor::full([3], 3.0, (Kind::Float, Device::Cpu)),
            _ => (init(5, 0.5) * (rank + 2.0)).cos() * (2.0 * (rank + 2.0)),
        };
        Vec::try_from(per_rank(0.0) + per_rank(1.0)).unwrap()
    }

    #[test]
    fn buckets_go_during_the_last_backward_and_sum_as_the_whole_exchange() {
        let outcomes = run(ZeroStage::Off);
        for (rank, (grads, (taken, early))) in outcomes.into_iter().enumerate() {
            for (name, got) in grads {
                let want = expected(&name);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "rank {rank} {name}: {got:?} vs {want:?}"
                    );
                }
            }
            match rank {
                0 => assert!(
                    taken >= 4 && early >= 1,
                    "rank 0 sent {taken}, {early} early"
                ),
                _ => assert_eq!((taken, early), (0, 0), "rank 1 did not overlap"),
            }
        }
    }

    /// ZeRO-1: each rank's shard of the flat buffers holds the sum (bucket by bucket).
    #[test]
    fn under_zero_1_each_rank_gets_its_shard_of_the_sums() {
        let outcomes = run(ZeroStage::Optimizer);
        // The flat buffer of the decay group holds layers.1.w, layers.0.w and embed.weight
        // (20 + 12 + 5, in that order): rank 0's shard is its first 19 elements, rank 1's
        // the other 18.
        for (rank, (grads, _)) in outcomes.into_iter().enumerate() {
            let grads: std::collections::HashMap<_, _> = grads.into_iter().collect();
            let names = ["layers.1.w", "layers.0.w", "embed.weight"];
            let flat: Vec<f32> = names.iter().flat_map(|n| grads[*n].clone()).collect();
            let want: Vec<f32> = names.iter().flat_map(|n| expected(n)).collect();
            let (start, len) = if rank == 0 { (0, 19) } else { (19, 18) };
            for i in start..start + len {
                assert!(
                    (flat[i] - want[i]).abs() <= 1e-5 * want[i].abs().max(1.0),
                    "rank {rank} element {i}"
                );
            }
        }
    }

    /// A backward after the one announced as the last (its gradient would miss the sum), or
    /// two announced as the last (the second would be summed twice): the step stops the
    /// run, saying which.
    #[test]
    fn a_gradient_after_its_bucket_went_stops_the_step() {
        let messages = in_threads(2, 1 << 20, |world| {
            let vs = nn::VarStore::new(Device::Cpu);
            let w = (vs.root() / "layers" / "0")
                .var_copy("w", &Tensor::ones([4], (Kind::Float, Device::Cpu)));
            let opt = overlapped(&vs, &world, ZeroStage::Off, 1 << 20);
            let step = || {
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    opt.reduce_gradients()
                }));
                match caught {
                    Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
                    Ok(()) => String::new(),
                }
            };
            opt.last_backward(|| w.sum(Kind::Float).backward());
            w.sum(Kind::Float).backward();
            let after = step();
            opt.last_backward(|| w.sum(Kind::Float).backward());
            opt.last_backward(|| w.sum(Kind::Float).backward());
            let twice = step();
            // Used as announced, the next step goes through.
            opt.zero_grad();
            opt.last_backward(|| w.sum(Kind::Float).backward());
            let fine = step();
            (after, twice, fine, Vec::<f32>::try_from(w.grad()).unwrap())
        });
        for (after, twice, fine, grad) in messages {
            assert!(
                after.contains("the gradient of layers.0.w arrived after it had been sent"),
                "{after:?}"
            );
            assert!(
                twice.contains("two backward passes were announced as the step's last"),
                "{twice:?}"
            );
            assert_eq!(fine, "");
            assert_eq!(grad, [2.0; 4]);
        }
    }
}
