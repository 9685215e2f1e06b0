// libtorch's default random generators (the CPU one, and a GPU's), their state read and
// restored as bytes: what a checkpoint keeps of each rank's randomness (LoRA dropout
// draws from it), as Hugging Face's Trainer keeps rng_state_{rank}.pth. tch exposes no
// generator state. Also the one accessor of the shims' last error (guarded.hpp).

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "guarded.hpp"

namespace {
using rlhf::guarded;

// device_type 0: the CPU; 1: CUDA device `index` (initialising CUDA if needed).
at::Generator generator(int device_type, int index) {
  if (device_type == 0) {
    return at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CPU));
  }
  return at::globalContext().defaultGenerator(
      c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
}
} // namespace

extern "C" {

const char* rlhf_shim_error() {
  return rlhf::last_error.c_str();
}

// The generator's state, in a malloc'd buffer the caller frees with free().
int rlhf_rng_get_state(int device_type, int index, uint8_t** out, size_t* len) {
  return guarded([&] {
    at::Generator gen = generator(device_type, index);
    at::Tensor state;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      state = gen.get_state();
    }
    state = state.contiguous();
    *len = static_cast<size_t>(state.numel());
    *out = static_cast<uint8_t*>(std::malloc(*len > 0 ? *len : 1));
    std::memcpy(*out, state.data_ptr<uint8_t>(), *len);
  });
}

int rlhf_rng_set_state(int device_type, int index, const uint8_t* data, size_t len) {
  return guarded([&] {
    at::Generator gen = generator(device_type, index);
    at::Tensor state = at::empty({static_cast<int64_t>(len)}, at::kByte);
    std::memcpy(state.data_ptr<uint8_t>(), data, len);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  });
}

void rlhf_shim_free(uint8_t* buffer) {
  std::free(buffer);
}

} // extern "C"
