// A callback after autograd has accumulated a leaf's gradient into its .grad (the C++ side
// of torch's Tensor.register_post_accumulate_grad_hook): how a data-parallel step learns,
// during the backward pass, that a bucket of gradients is complete and can be sent while
// the rest of the backward runs (src/overlap.rs).

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>
#include <memory>

#include "guarded.hpp"

namespace {

using Fire = void (*)(void* context, int64_t index);
using Release = void (*)(void* context);

// Calls fire(context, index) after each accumulation; release(context) when the tensor
// drops its hook (it holds one reference to the context).
struct Hook : torch::autograd::PostAccumulateGradHook {
  Fire fire;
  Release release;
  void* context;
  int64_t index;

  Hook(Fire f, Release r, void* c, int64_t i) : fire(f), release(r), context(c), index(i) {}
  ~Hook() override { release(context); }
  void operator()(const torch::autograd::Variable& /*tensor*/) override { fire(context, index); }
};

} // namespace

extern "C" {

// Sets the post-accumulate hook of the leaf `tensor` (a tch tensor: at::Tensor*), replacing
// any earlier one. The hook owns one reference to `context`, released by `release` when the
// hook goes (with the tensor, or replaced), also when this call fails.
int rlhf_post_accumulate_hook(void* tensor, Fire fire, Release release, void* context,
                              int64_t index) {
  std::unique_ptr<Hook> hook;
  try {
    hook = std::make_unique<Hook>(fire, release, context, index);
  } catch (...) {
    release(context);
    rlhf::last_error = "cannot allocate a gradient hook";
    return -1;
  }
  return rlhf::guarded([&] {
    torch::autograd::impl::set_post_acc_grad_hooks(*static_cast<at::Tensor*>(tensor),
                                                   std::move(hook));
  });
}

} // extern "C"
