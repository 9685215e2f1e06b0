//! Data parallelism's engine: c10d's `TCPStore` from the torch wheel (`shim/store.cpp`),
//! found the way torchrun and Slurm describe a run, and the collectives [`crate::World`]
//! needs, carried over the same store: each rank writes its bytes under a key of the
//! collective's sequence number and reads every rank's, summing in rank order so that
//! every rank gets bit-identical results. That is c10d's store-based exchange, right for
//! CPU runs and tests; NCCL for CUDA tensors plugs in beside it (issue 19).

use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};

#[allow(unsafe_code)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    extern "C" {
        pub fn rlhf_store_connect(
            host: *const c_char,
            port: u16,
            world_size: i64,
            is_server: c_int,
            timeout_ms: i64,
        ) -> *mut c_void;
        pub fn rlhf_store_close(handle: *mut c_void);
        pub fn rlhf_store_set(
            handle: *mut c_void,
            key: *const c_char,
            data: *const u8,
            len: usize,
        ) -> c_int;
        pub fn rlhf_store_get(
            handle: *mut c_void,
            key: *const c_char,
            out: *mut *mut u8,
            len: *mut usize,
        ) -> c_int;
        pub fn rlhf_store_add(
            handle: *mut c_void,
            key: *const c_char,
            value: i64,
            out: *mut i64,
        ) -> c_int;
        pub fn rlhf_store_check(handle: *mut c_void, key: *const c_char, out: *mut c_int) -> c_int;
        pub fn rlhf_store_delete(handle: *mut c_void, key: *const c_char) -> c_int;
    }
}

use crate::shim::last_error;

/// A connection to a c10d `TCPStore` (the server runs in one of the processes).
#[derive(Debug)]
pub struct Store {
    handle: *mut c_void,
    address: String,
}

// SAFETY: c10d's TCPStore serialises its client socket behind a mutex; the handle is an
// owned intrusive pointer released once, in Drop.
#[allow(unsafe_code)]
unsafe impl Send for Store {}
#[allow(unsafe_code)]
unsafe impl Sync for Store {}

#[allow(unsafe_code)]
impl Store {
    /// Connects to (or, with `server`, starts and waits for `world_size` processes at) the
    /// store at `host:port`.
    pub fn connect(
        host: &str,
        port: u16,
        world_size: usize,
        server: bool,
        timeout: Duration,
    ) -> Result<Store> {
        let address = format!("{host}:{port}");
        let c_host = CString::new(host).map_err(|_| Error::InvalidArgument(address.clone()))?;
        // SAFETY: c_host outlives the call; the shim copies it.
        let handle = unsafe {
            ffi::rlhf_store_connect(
                c_host.as_ptr(),
                port,
                world_size as i64,
                i32::from(server),
                timeout.as_millis() as i64,
            )
        };
        if handle.is_null() {
            return Err(Error::InvalidArgument(format!(
                "data parallel: cannot reach the c10d store at {address}: {}",
                last_error()
            )));
        }
        Ok(Store { handle, address })
    }

    fn key(key: &str) -> CString {
        CString::new(key).expect("store keys have no NUL")
    }

    /// A failed store call: the run cannot go on without the other ranks.
    fn fail(&self, what: &str) -> ! {
        self.fail_with(&format!(
            "{what} on the c10d store at {} failed: {} (another rank stopped?)",
            self.address,
            last_error()
        ))
    }

    /// Ends this rank with one line (torchrun then ends the others).
    fn fail_with(&self, message: &str) -> ! {
        eprintln!("error: data parallel: {message}");
        std::process::exit(1)
    }

    pub fn set(&self, key: &str, value: &[u8]) {
        let k = Self::key(key);
        // SAFETY: the pointers are valid for the call; the shim copies the bytes.
        if unsafe { ffi::rlhf_store_set(self.handle, k.as_ptr(), value.as_ptr(), value.len()) } != 0
        {
            self.fail("set");
        }
    }

    /// Waits for `key` (up to the store's timeout) and returns its value.
    pub fn get(&self, key: &str) -> Vec<u8> {
        let k = Self::key(key);
        let (mut out, mut len) = (std::ptr::null_mut(), 0usize);
        // SAFETY: out/len are written by the shim on success; the buffer is copied, then
        // freed with the shim's allocator.
        unsafe {
            if ffi::rlhf_store_get(self.handle, k.as_ptr(), &mut out, &mut len) != 0 {
                self.fail("get");
            }
            crate::shim::take_buffer(out, len)
        }
    }

    /// Adds `value` to the counter `key` and returns the new count.
    pub fn add(&self, key: &str, value: i64) -> i64 {
        let k = Self::key(key);
        let mut out = 0;
        // SAFETY: valid pointers for the call.
        if unsafe { ffi::rlhf_store_add(self.handle, k.as_ptr(), value, &mut out) } != 0 {
            self.fail("add");
        }
        out
    }

    /// Whether `key` is set (without waiting for it).
    pub fn check(&self, key: &str) -> bool {
        let k = Self::key(key);
        let mut out = 0;
        // SAFETY: valid pointers for the call.
        if unsafe { ffi::rlhf_store_check(self.handle, k.as_ptr(), &mut out) } != 0 {
            self.fail("check");
        }
        out != 0
    }

    pub fn delete(&self, key: &str) {
        let k = Self::key(key);
        // SAFETY: valid pointers for the call.
        if unsafe { ffi::rlhf_store_delete(self.handle, k.as_ptr()) } != 0 {
            self.fail("delete");
        }
    }
}

#[allow(unsafe_code)]
impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: the handle came from rlhf_store_connect and is released once.
        unsafe { ffi::rlhf_store_close(self.handle) }
    }
}

/// The collectives of one run over its store.
#[derive(Debug)]
pub struct Comm {
    store: Store,
    prefix: String,
    rank: usize,
    size: usize,
    /// Collectives so far; every rank calls them in the same order.
    seq: AtomicU64,
    /// This process hosts the store (and must outlive the others' use of it).
    server: bool,
    timeout: Duration,
}

impl Comm {
    pub fn new(
        store: Store,
        prefix: String,
        (rank, size): (usize, usize),
        server: bool,
        timeout: Duration,
    ) -> Self {
        Comm {
            store,
            prefix,
            rank,
            size,
            seq: AtomicU64::new(0),
            server,
            timeout,
        }
    }

    /// Waits until `count` (a counter every rank adds 1 to) reaches the world size, at
    /// collective `what`, whose key `arrived(r)` rank `r` sets once it has counted. A rank
    /// that got SIGTERM (torchrun ending the run after another rank died) and waits more
    /// than a few seconds leaves at once instead of at the timeout. A rank that has left never reaches a collective the others wait at (a
    /// rank leaves only after writing to every collective of the run, or on an error of its
    /// own), so seeing one gone ends the wait too. Each way out names the ranks waited for.
    fn wait_for_all(&self, count: &str, what: &str, arrived: impl Fn(usize) -> String) {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_micros(50);
        while self.store.add(count, 0) < self.size as i64 {
            let waited = start.elapsed();
            // A rank that wrote its part and then left normally was counted before it left.
            let gone = self.store.add(&self.exit_key(), 0) > 0;
            if gone && self.store.add(count, 0) >= self.size as i64 {
                break;
            }
            let why = if gone {
                let left: Vec<usize> = (0..self.size)
                    .filter(|&r| self.store.check(&self.left_key(r)))
                    .collect();
                Some(format!(
                    "{} left the run (it failed; see its message)",
                    Self::ranks(&left, "another rank")
                ))
            } else if waited > self.timeout {
                Some(format!(
                    "{} did not arrive within --dist-timeout ({} s): hung, or far slower than this rank",
                    self.missing(&arrived),
                    self.timeout.as_secs()
                ))
            } else if TERMINATED.load(Ordering::SeqCst) && waited > Duration::from_secs(3) {
                Some(format!(
                    "stopped by a signal while waiting for {}",
                    self.missing(&arrived)
                ))
            } else {
                None
            };
            if let Some(why) = why {
                let at = self.seq.load(Ordering::SeqCst).saturating_sub(1);
                self.fail(&format!(
                    "rank {}: {why}, at \"{what}\" (collective {at})",
                    self.rank
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// "rank 1", "ranks 1, 3", or `none` when the list is empty.
    fn ranks(ranks: &[usize], none: &str) -> String {
        let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
        match ranks.len() {
            0 => none.to_string(),
            1 => format!("rank {}", list[0]),
            _ => format!("ranks {}", list.join(", ")),
        }
    }

    /// The ranks that have not arrived at the collective whose arrival keys `arrived` gives.
    fn missing(&self, arrived: &impl Fn(usize) -> String) -> String {
        let missing: Vec<usize> = (0..self.size)
            .filter(|&r| !self.store.check(&arrived(r)))
            .collect();
        Self::ranks(&missing, "the other ranks")
    }

    fn exit_key(&self) -> String {
        format!("{}exit", self.prefix)
    }

    /// Set by rank `rank` as it leaves the run (beside its count in the exit key).
    fn left_key(&self, rank: usize) -> String {
        format!("{}left/{rank}", self.prefix)
    }

    /// Counts this rank out and ends the process with one line (torchrun ends the others).
    fn fail(&self, message: &str) -> ! {
        self.leave();
        self.store.fail_with(message)
    }

    /// Marks this rank gone: the others waiting at a collective stop, naming it.
    fn leave(&self) {
        self.store.set(&self.left_key(self.rank), b"");
        self.store.add(&self.exit_key(), 1);
    }

    /// One collective over the store: `write` sets this rank's values (keys under the
    /// collective's own prefix), every rank waits until every rank has written, `read`
    /// takes what this rank needs, and the last rank to have read runs `clean` and removes
    /// the counters — so the store holds one collective's data at a time.
    /// Each rank sets an arrival key once it has counted itself in (after, not before: a
    /// rank stopped between its data and its count is one the others still wait for, and
    /// the key names it), by which a rank that waits too long names the ranks it waits for.
    fn collective<T>(
        &self,
        what: &str,
        write: impl FnOnce(&str),
        read: impl FnOnce(&str) -> T,
        clean: impl FnOnce(&str),
    ) -> T {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let keys = format!("{}c{seq}/", self.prefix);
        write(&keys);
        let count = format!("{keys}written");
        let arrived = |r: usize| format!("{keys}in/{r}");
        self.store.add(&count, 1);
        self.store.set(&arrived(self.rank), b"");
        self.wait_for_all(&count, what, arrived);
        let value = read(&keys);
        let read = format!("{keys}read");
        if self.store.add(&read, 1) == self.size as i64 {
            clean(&keys);
            self.store.delete(&count);
            self.store.delete(&read);
            for r in 0..self.size {
                self.store.delete(&arrived(r));
            }
        }
        value
    }

    /// The header's name of collective `what` (at most 255 bytes of it).
    fn label(what: &str) -> &[u8] {
        &what.as_bytes()[..what.len().min(255)]
    }

    /// `bytes` behind a header naming the collective (`what`), which the receiver checks
    /// ([`Comm::opened`]).
    fn sealed(what: &str, bytes: &[u8]) -> Vec<u8> {
        let label = Self::label(what);
        let mut out = Vec::with_capacity(1 + label.len() + bytes.len());
        out.push(label.len() as u8);
        out.extend_from_slice(label);
        out.extend_from_slice(bytes);
        out
    }

    /// The bytes of a value [`Comm::sealed`] made on rank `from`, after checking that it
    /// was sent by the same collective as this rank's (`what`): ranks whose collectives
    /// fall out of step (a bug) stop with one line instead of exchanging each other's data.
    fn opened(&self, what: &str, from: usize, value: Vec<u8>) -> Vec<u8> {
        let n = value.first().map_or(0, |&n| n as usize);
        let label = value.get(1..1 + n).unwrap_or_default();
        if label != Self::label(what) {
            self.fail(&format!(
                "rank {}: the ranks are out of step: this rank is at \"{what}\", rank {from} at \"{}\" (collective {})",
                self.rank,
                String::from_utf8_lossy(label),
                self.seq.load(Ordering::SeqCst).saturating_sub(1)
            ));
        }
        value[1 + n..].to_vec()
    }

    /// Every rank's `bytes`, in rank order; `what` names the collective (the same on every
    /// rank, checked).
    pub fn all_gather(&self, what: &str, bytes: &[u8]) -> Vec<Vec<u8>> {
        let sealed = Self::sealed(what, bytes);
        self.collective(
            what,
            |keys| self.store.set(&format!("{keys}{}", self.rank), &sealed),
            |keys| {
                (0..self.size)
                    .map(|r| self.opened(what, r, self.store.get(&format!("{keys}{r}"))))
                    .collect()
            },
            |keys| {
                for r in 0..self.size {
                    self.store.delete(&format!("{keys}{r}"));
                }
            },
        )
    }

    /// Point to point within one step: `parts[s]` goes to rank `s`; every rank gets, in rank
    /// order, what each rank sent it. Every rank must agree on which ranks receive (send
    /// `Some` to the same ones); a rank that receives nothing gets an empty list. Each
    /// value is read once, by its receiver, who deletes it. `what` names the collective, as
    /// for [`Comm::all_gather`].
    pub fn all_to_all(&self, what: &str, parts: &[Option<&[u8]>]) -> Vec<Vec<u8>> {
        assert_eq!(parts.len(), self.size, "one part per rank");
        let key = |keys: &str, from: usize, to: usize| format!("{keys}{from}/{to}");
        self.collective(
            what,
            |keys| {
                for (to, part) in parts.iter().enumerate() {
                    if let Some(bytes) = part {
                        let sealed = Self::sealed(what, bytes);
                        self.store.set(&key(keys, self.rank, to), &sealed);
                    }
                }
            },
            |keys| {
                let mut received = vec![];
                if parts[self.rank].is_some() {
                    for from in 0..self.size {
                        let value = self.store.get(&key(keys, from, self.rank));
                        received.push(self.opened(what, from, value));
                        self.store.delete(&key(keys, from, self.rank));
                    }
                }
                received
            },
            |_| {},
        )
    }
}

/// ProcessGroupNCCL from the torch wheel (`shim/nccl.cpp`), rendezvousing over the run's
/// store: the collectives on CUDA tensors, device to device. A build without NCCL's
/// header has none, and CUDA tensors go through the store (copied through the host).
#[derive(Debug)]
pub struct Nccl {
    handle: *mut c_void,
}

// SAFETY: ProcessGroupNCCL is thread-safe (torch.distributed calls it from any thread);
// the handle is an owned intrusive pointer released once, in Drop.
#[allow(unsafe_code)]
unsafe impl Send for Nccl {}
#[allow(unsafe_code)]
unsafe impl Sync for Nccl {}

#[cfg(nccl)]
#[allow(unsafe_code)]
mod nccl_ffi {
    use std::ffi::{c_char, c_int, c_void};

    unsafe extern "C" {
        pub fn rlhf_nccl_new(
            store: *mut c_void,
            prefix: *const c_char,
            rank: c_int,
            size: c_int,
            timeout_ms: i64,
            out: *mut *mut c_void,
        ) -> c_int;
        pub fn rlhf_nccl_all_reduce_sum(group: *mut c_void, tensor: *mut c_void) -> c_int;
        pub fn rlhf_nccl_free(group: *mut c_void);
    }
}

#[allow(unsafe_code)]
impl Nccl {
    /// Whether this build has ProcessGroupNCCL.
    pub fn available() -> bool {
        cfg!(nccl)
    }

    /// The process group of `comm`'s ranks (its communicator is made at the first
    /// collective, on the device of that collective's tensor).
    pub fn new(comm: &Comm) -> Result<Nccl> {
        #[cfg(nccl)]
        {
            let prefix = CString::new(format!("{}nccl/", comm.prefix)).expect("no NUL");
            let mut handle = std::ptr::null_mut();
            // SAFETY: the store handle is live for the call (the shim takes its own
            // reference); prefix outlives the call; handle is written on success.
            let rc = unsafe {
                nccl_ffi::rlhf_nccl_new(
                    comm.store.handle,
                    prefix.as_ptr(),
                    comm.rank as i32,
                    comm.size as i32,
                    comm.timeout.as_millis() as i64,
                    &mut handle,
                )
            };
            if rc != 0 {
                return Err(Error::InvalidArgument(format!(
                    "data parallel: cannot create the NCCL process group: {}",
                    last_error()
                )));
            }
            Ok(Nccl { handle })
        }
        #[cfg(not(nccl))]
        {
            let _ = comm;
            Err(Error::InvalidArgument(
                "data parallel: this build has no NCCL (no nccl.h beside libtorch at build time)"
                    .into(),
            ))
        }
    }

    /// Σ over ranks of the contiguous CUDA tensor `t`, in place; the current stream waits
    /// for it. A failure ends the process with one line (as a store failure does).
    pub fn all_reduce_sum(&self, t: &tch::Tensor) {
        #[cfg(nccl)]
        {
            let mut t = t.shallow_clone();
            // SAFETY: the group is live; the tensor pointer is tch's at::Tensor*, valid
            // for the call.
            let rc = unsafe {
                nccl_ffi::rlhf_nccl_all_reduce_sum(self.handle, t.as_mut_ptr() as *mut c_void)
            };
            if rc != 0 {
                eprintln!(
                    "error: data parallel: NCCL all-reduce failed: {}",
                    last_error()
                );
                std::process::exit(1);
            }
        }
        #[cfg(not(nccl))]
        let _ = t;
    }
}

#[allow(unsafe_code)]
impl Drop for Nccl {
    fn drop(&mut self) {
        #[cfg(nccl)]
        // SAFETY: the handle came from rlhf_nccl_new and is released once.
        unsafe {
            nccl_ffi::rlhf_nccl_free(self.handle)
        }
    }
}

/// Leaving: a rank that hosts the store waits until every rank has done its last store
/// operation (each counts itself out as that last operation), so that no rank loses the
/// store while it still needs it; the others count out and go.
impl Drop for Comm {
    fn drop(&mut self) {
        self.leave();
        let key = self.exit_key();
        if !self.server {
            return;
        }
        let deadline = std::time::Instant::now() + self.timeout;
        while self.store.add(&key, 0) < self.size as i64 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Set by SIGTERM or SIGINT in a data-parallel run (see [`Comm::wait_for_all`]).
static TERMINATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Watches for SIGTERM and SIGINT (beside the run's own graceful-stop flag).
fn watch_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            #[allow(unsafe_code)]
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            let _ = unsafe {
                signal_hook::low_level::register(signal, || {
                    TERMINATED.store(true, Ordering::SeqCst)
                })
            };
        }
    });
}

/// How torchrun or Slurm describe this process, read from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub host: String,
    pub port: u16,
    /// torchrun's agent hosts the store (`TORCHELASTIC_USE_AGENT_STORE=True`): every
    /// rank is a client. Otherwise rank 0 starts it.
    pub agent_store: bool,
    /// torchrun's restart count, so a restarted run never reads an earlier attempt's keys.
    pub attempt: String,
}

impl Launch {
    /// `None` for a run of one process (no `WORLD_SIZE`/`SLURM_NTASKS`, or 1 without
    /// `MASTER_ADDR`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |names: &[&str]| -> Result<Option<usize>> {
            for name in names {
                if let Some(v) = var(name) {
                    return v.trim().parse().map(Some).map_err(|_| {
                        Error::InvalidArgument(format!(
                            "environment variable {name}={v:?} is not a number"
                        ))
                    });
                }
            }
            Ok(None)
        };
        let size = number(&["WORLD_SIZE", "SLURM_NTASKS"])?.unwrap_or(1);
        // One process is a run of its own, unless a launcher set it up as a world of one
        // (`torchrun --nproc-per-node 1` sets MASTER_ADDR): then it connects, and CUDA
        // tensors go through NCCL as with more ranks.
        if size == 0 || (size == 1 && var("MASTER_ADDR").is_none()) {
            return Ok(None);
        }
        // A world of one needs no rank to be said.
        let rank = number(&["RANK", "SLURM_PROCID"])?;
        let rank = rank.or((size == 1).then_some(0)).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "WORLD_SIZE is {size} but RANK (or SLURM_PROCID) is not set"
            ))
        })?;
        if rank >= size {
            return Err(Error::InvalidArgument(format!(
                "RANK {rank} is not below WORLD_SIZE {size}"
            )));
        }
        let host = var("MASTER_ADDR").ok_or_else(|| {
            Error::InvalidArgument(format!("WORLD_SIZE is {size} but MASTER_ADDR is not set (torchrun sets it; under Slurm export the first node's name, e.g. MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1))"))
        })?;
        let port = match var("MASTER_PORT") {
            None => 29500,
            Some(p) => p.trim().parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "environment variable MASTER_PORT={p:?} is not a port"
                ))
            })?,
        };
        Ok(Some(Launch {
            rank,
            size,
            local_rank: number(&["LOCAL_RANK", "SLURM_LOCALID"])?.unwrap_or(0),
            host,
            port,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE").as_deref() == Some("True"),
            attempt: var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into()),
        }))
    }

    /// The run's collectives: the store reached (or started) and keys under a prefix of
    /// this attempt.
    pub fn connect(&self, timeout: Duration) -> Result<Comm> {
        watch_signals();
        let server = !self.agent_store && self.rank == 0;
        let store = Store::connect(&self.host, self.port, self.size, server, timeout)?;
        // A process may run several stages in turn (the bench does): each connection's
        // keys (its collectives, its exit count, its NCCL group) are its own.
        let run = {
            static RUNS: std::sync::Mutex<Vec<(String, u16, usize)>> =
                std::sync::Mutex::new(Vec::new());
            let mut runs = RUNS.lock().unwrap_or_else(|e| e.into_inner());
            let me = (self.host.clone(), self.port, self.rank);
            let earlier = runs.iter().filter(|r| **r == me).count();
            runs.push(me);
            earlier
        };
        let prefix = format!("/rlhf/attempt_{}/run_{run}/", self.attempt);
        Ok(Comm::new(
            store,
            prefix,
            (self.rank, self.size),
            server,
            timeout,
        ))
    }
}

/// A local port the system just handed out (free a moment ago): for a store or a
/// rendezvous endpoint of tests.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

#[cfg(test)]
impl Launch {
    /// `size` ranks in this process's machine, rank 0 hosting the store on a port the
    /// system just handed out: each rank's launch, in rank order.
    pub(crate) fn local(size: usize) -> Vec<Launch> {
        let port = free_port();
        (0..size)
            .map(|rank| Launch {
                rank,
                size,
                local_rank: rank,
                host: "127.0.0.1".into(),
                port,
                agent_store: false,
                attempt: "0".into(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_and_slurm_environments() {
        assert_eq!(Launch::from_env(env(&[])).unwrap(), None);
        assert_eq!(Launch::from_env(env(&[("WORLD_SIZE", "1")])).unwrap(), None);
        let alone = [("WORLD_SIZE", "1"), ("MASTER_ADDR", "localhost")];
        let alone = Launch::from_env(env(&alone)).unwrap().unwrap();
        assert_eq!((alone.rank, alone.size), (0, 1));
        let torchrun = Launch::from_env(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                torchrun.rank,
                torchrun.size,
                torchrun.local_rank,
                torchrun.port
            ),
            (3, 4, 1, 29400)
        );
        assert!(torchrun.agent_store);
        assert_eq!(torchrun.attempt, "2");
        let slurm = Launch::from_env(env(&[
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "1"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "n1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((slurm.rank, slurm.size, slurm.port), (1, 2, 29500));
        assert!(!slurm.agent_store);
        let e = Launch::from_env(env(&[("WORLD_SIZE", "2"), ("RANK", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR is not set"), "{e}");
        let e = Launch::from_env(env(&[("WORLD_SIZE", "two")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE=\"two\" is not a number"), "{e}");
    }

    /// ProcessGroupNCCL from the shim over a real store: on a machine with a GPU it is
    /// made; without one, c10d's own refusal comes back as an error (no crash).
    #[cfg(nccl)]
    #[test]
    fn nccl_group_is_made_or_refused_cleanly() {
        let launch = Launch::local(1).remove(0);
        let comm = launch.connect(Duration::from_secs(30)).unwrap();
        match Nccl::new(&comm) {
            Ok(group) => {
                assert!(tch::Cuda::is_available(), "made without a GPU");
                let t = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cuda(0)));
                group.all_reduce_sum(&t);
                assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), 4.0);
            }
            Err(e) => {
                assert!(!tch::Cuda::is_available(), "{e}");
                assert!(e.to_string().contains("NCCL"), "{e}");
                eprintln!("{e}");
            }
        }
    }

    /// Two ranks in threads over a real TCPStore: gathers in rank order and sends point to
    /// point.
    #[test]
    fn store_collectives_between_two_ranks() {
        let ranks: Vec<_> = Launch::local(2)
            .into_iter()
            .map(|l| {
                let rank = l.rank;
                std::thread::spawn(move || {
                    let comm = l.connect(Duration::from_secs(60)).unwrap();
                    let gathered = comm.all_gather("test", &[rank as u8; 3]);
                    let again = comm.all_gather("test", &[10 + rank as u8]);
                    // Rank r sends [r, s] to rank s; only rank 1 receives the second time.
                    let parts: Vec<Vec<u8>> = (0..2).map(|s| vec![rank as u8, s]).collect();
                    let refs: Vec<Option<&[u8]>> = parts.iter().map(|p| Some(&p[..])).collect();
                    let swapped = comm.all_to_all("test", &refs);
                    let one = comm.all_to_all("test", &[None, Some(&[rank as u8 + 5])]);
                    (gathered, again, swapped, one)
                })
            })
            .collect();
        for (rank, handle) in ranks.into_iter().enumerate() {
            let (gathered, again, swapped, one) = handle.join().unwrap();
            assert_eq!(gathered, [vec![0, 0, 0], vec![1, 1, 1]]);
            assert_eq!(again, [vec![10], vec![11]]);
            let r = rank as u8;
            assert_eq!(swapped, [vec![0, r], vec![1, r]]);
            let want: Vec<Vec<u8>> = if rank == 1 {
                vec![vec![5], vec![6]]
            } else {
                vec![]
            };
            assert_eq!(one, want);
        }
    }

    /// Ranks whose collectives fall out of step (rank 0 sums a scalar where rank 1 sums a
    /// tensor of 8 bytes too) stop with one line naming both, instead of taking each
    /// other's bytes. In a child process of this test, since the rank ends its process.
    #[test]
    fn ranks_out_of_step_stop_with_one_line() {
        const CHILD: &str = "RLHF_OUT_OF_STEP_CHILD";
        if std::env::var_os(CHILD).is_some() {
            crate::world::in_threads(2, 1 << 20, |world| match world.rank() {
                0 => drop(world.sum(1.0)),
                _ => world.sum_(&tch::Tensor::from_slice(&[1f64])),
            });
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "dist::tests::ranks_out_of_step_stop_with_one_line",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains("the ranks are out of step: this rank is at")
                && log.contains("\"sums of 1\"")
                && log.contains("\"sum of 1 Double\""),
            "{log}"
        );
    }

    /// A rank that does not come to a collective: the one waiting there stops after
    /// --dist-timeout naming it and the collective — also when it was stopped after writing
    /// its data but before counting itself in (as a SIGSTOP can land); a rank that left: at
    /// once, naming it. In child processes of this test (run at once), since the waiting
    /// rank ends its process.
    #[test]
    fn a_rank_that_hangs_or_leaves_is_named() {
        const CHILD: &str = "RLHF_MISSING_RANK_CHILD";
        if let Ok(how) = std::env::var(CHILD) {
            let ranks: Vec<_> = Launch::local(2)
                .into_iter()
                .map(|l| {
                    let how = how.clone();
                    std::thread::spawn(move || {
                        let comm = l.connect(Duration::from_secs(5)).unwrap();
                        match (l.rank, how.as_str()) {
                            (0, _) => drop(comm.all_gather("sum of 3 Float", &[0])),
                            (_, "hang") => std::thread::sleep(Duration::from_secs(60)),
                            (_, "hang-after-writing") => {
                                // What all_gather's write does, and no more.
                                let sealed = Comm::sealed("sum of 3 Float", &[1]);
                                comm.store.set(&format!("{}c0/1", comm.prefix), &sealed);
                                std::thread::sleep(Duration::from_secs(60))
                            }
                            _ => drop(comm), // leaves before the collective
                        }
                    })
                })
                .collect();
            for rank in ranks {
                rank.join().unwrap();
            }
            return;
        }
        let hung = "rank 0: rank 1 did not arrive within --dist-timeout (5 s): hung, or far slower than this rank, at \"sum of 3 Float\" (collective 0)";
        let cases = [
            ("hang", hung),
            ("hang-after-writing", hung),
            (
                "leave",
                "rank 0: rank 1 left the run (it failed; see its message), at \"sum of 3 Float\"",
            ),
        ];
        let started = std::time::Instant::now();
        let children: Vec<_> = cases
            .iter()
            .map(|(how, _)| {
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args([
                        "--exact",
                        "dist::tests::a_rank_that_hangs_or_leaves_is_named",
                        "--nocapture",
                    ])
                    .env(CHILD, how)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for ((how, says), child) in cases.iter().zip(children) {
            let out = child.wait_with_output().unwrap();
            let log = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{how}: {log}");
            assert!(log.contains(says), "{how}: {log}");
            assert!(started.elapsed() < Duration::from_secs(30), "{how}: {log}");
        }
    }

    /// A process that runs several stages in turn connects once per stage (the bench
    /// does, under torchrun): each connection's collectives and exit count are its own, so
    /// the second stage neither reads the first's keys nor takes the first's exit count
    /// for a rank that left. The store is hosted apart from the ranks, as torchrun's agent
    /// hosts it (`TORCHELASTIC_USE_AGENT_STORE=True`), so it outlives every connection.
    #[test]
    fn each_connection_of_a_process_has_its_own_keys() {
        let launches = Launch::local(2);
        let agent = Store::connect(
            "127.0.0.1",
            launches[0].port,
            1,
            true,
            Duration::from_secs(30),
        )
        .unwrap();
        let ranks: Vec<_> = launches
            .into_iter()
            .map(|l| {
                let l = Launch {
                    agent_store: true,
                    ..l
                };
                std::thread::spawn(move || {
                    let rank = l.rank as u8;
                    let stages: Vec<Vec<Vec<u8>>> = (0..3u8)
                        .map(|stage| {
                            let comm = l.connect(Duration::from_secs(30)).unwrap();
                            let mut got = comm.all_gather("stage", &[stage, rank]);
                            got.extend(comm.all_gather("again", &[rank]));
                            got
                        })
                        .collect();
                    stages
                })
            })
            .collect();
        for handle in ranks {
            let stages = handle.join().unwrap();
            for (stage, got) in stages.iter().enumerate() {
                let s = stage as u8;
                assert_eq!(got, &[vec![s, 0], vec![s, 1], vec![0], vec![1]]);
            }
        }
        for run in 0..3 {
            assert_eq!(agent.add(&format!("/rlhf/attempt_0/run_{run}/exit"), 0), 2);
        }
    }
}
