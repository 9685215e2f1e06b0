//! CUDA graphs through `shim/cuda_graph.cpp`, a C shim over libtorch's `at::cuda::CUDAGraph`
//! (what `torch.cuda.graph` uses). A graph records every kernel one call of a closure
//! launches, on fixed tensor addresses, and `replay` relaunches them all with one host
//! call: a decode step's few hundred small kernels stop costing a host launch each.
//!
//! The closure must only read and write tensors that outlive the graph (inputs are
//! updated in place before, or by, each replay) and must never wait for the device.

#![allow(unsafe_code)] // FFI to the shim; every call is checked and its pointer owned here

use crate::error::{Error, Result};

/// Whether this build has the shim (a libtorch with CUDA and its headers at build time).
pub fn available() -> bool {
    cfg!(cuda_graphs)
}

#[cfg(cuda_graphs)]
mod ffi {
    use std::ffi::{c_int, c_void};
    unsafe extern "C" {
        pub fn rlhf_graph_new(out: *mut *mut c_void) -> c_int;
        pub fn rlhf_graph_side_stream(g: *mut c_void) -> c_int;
        pub fn rlhf_graph_capture_begin(g: *mut c_void) -> c_int;
        pub fn rlhf_graph_capture_end(g: *mut c_void) -> c_int;
        pub fn rlhf_graph_main_stream(g: *mut c_void) -> c_int;
        pub fn rlhf_graph_replay(g: *mut c_void) -> c_int;
        pub fn rlhf_graph_free(g: *mut c_void) -> c_int;
    }
}

/// One captured CUDA graph. Dropping it frees the graph and its memory pool and returns
/// the allocator's cached blocks to the device.
#[derive(Debug)]
pub struct CudaGraph {
    #[cfg(cuda_graphs)]
    ptr: *mut std::ffi::c_void,
}

#[cfg(cuda_graphs)]
fn check(rc: std::ffi::c_int, what: &str) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let first = crate::shim::last_error();
    let first = first.lines().next().unwrap_or("").to_string();
    Err(Error::CudaGraph(format!("CUDA graph {what}: {first}")))
}

impl CudaGraph {
    /// Runs `step` once on a side stream (eagerly: it does real work, and lets libraries
    /// create their handles and workspaces), then records a second call. The recorded call
    /// does not execute: the first `replay` does. On an error, `step` ran at most once.
    pub fn capture(mut step: impl FnMut()) -> Result<Self> {
        #[cfg(cuda_graphs)]
        {
            let mut ptr = std::ptr::null_mut();
            // SAFETY: `ptr` is written by the shim before any other use; each call below
            // receives the live pointer, and on error `graph` frees it when dropped.
            check(unsafe { ffi::rlhf_graph_new(&mut ptr) }, "creation")?;
            let graph = CudaGraph { ptr };
            check(unsafe { ffi::rlhf_graph_side_stream(ptr) }, "stream")?;
            step();
            if let Err(e) = check(unsafe { ffi::rlhf_graph_capture_begin(ptr) }, "capture") {
                unsafe { ffi::rlhf_graph_main_stream(ptr) };
                return Err(e);
            }
            step();
            check(unsafe { ffi::rlhf_graph_capture_end(ptr) }, "capture")?;
            Ok(graph)
        }
        #[cfg(not(cuda_graphs))]
        {
            let _ = &mut step;
            Err(Error::CudaGraph(
                "CUDA graphs: this build's libtorch has no CUDA".into(),
            ))
        }
    }

    /// Relaunches the recorded kernels on the current stream.
    pub fn replay(&self) -> Result<()> {
        #[cfg(cuda_graphs)]
        {
            // SAFETY: `ptr` is a live graph owned by `self`.
            check(unsafe { ffi::rlhf_graph_replay(self.ptr) }, "replay")
        }
        #[cfg(not(cuda_graphs))]
        unreachable!("no CudaGraph exists without the shim")
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(cuda_graphs)]
        // SAFETY: `ptr` came from rlhf_graph_new and is freed only here.
        if let Err(e) = check(unsafe { ffi::rlhf_graph_free(self.ptr) }, "release") {
            tracing::warn!("{e}");
        }
    }
}
