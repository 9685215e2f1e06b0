// torch.distributed's ProcessGroupNCCL from the torch wheel we build against, behind a C
// interface: the collectives of a data-parallel run on CUDA tensors (src/dist.rs, Nccl).
// The group rendezvouses over the run's c10d store (under a prefix of its own) and
// creates its NCCL communicator at the first collective, as torch.distributed does. Built
// by common/build.rs only against a CUDA libtorch with NCCL's header beside it.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "guarded.hpp"

namespace {
using rlhf::guarded;

c10d::ProcessGroupNCCL* as_group(void* handle) {
  return static_cast<c10d::ProcessGroupNCCL*>(handle);
}
} // namespace

extern "C" {

// A process group of `size` ranks over the store `store` (a handle of store.cpp, which
// keeps its own reference), its keys under `prefix`; collectives time out after
// timeout_ms. The handle is released with rlhf_nccl_free.
int rlhf_nccl_new(
    void* store,
    const char* prefix,
    int rank,
    int size,
    int64_t timeout_ms,
    void** out) {
  return guarded([&] {
    auto base = c10::intrusive_ptr<c10d::Store>::reclaim_copy(
        static_cast<c10d::Store*>(store));
    auto prefixed = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms);
    auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, options);
    *out = group.release();
  });
}

// Σ over ranks of `tensor` (a tch tensor: at::Tensor*), in place. The current CUDA stream
// waits for the result; the host does not.
int rlhf_nccl_all_reduce_sum(void* handle, void* tensor) {
  return guarded([&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    as_group(handle)->allreduce(tensors, options)->wait();
  });
}

void rlhf_nccl_free(void* handle) {
  if (handle != nullptr) {
    auto group = c10::intrusive_ptr<c10d::ProcessGroupNCCL>::reclaim(as_group(handle));
    group->shutdown();
  }
}

} // extern "C"
