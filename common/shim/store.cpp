// The c10d TCPStore of the torch wheel we build against, behind a C interface: the
// rendezvous of a data-parallel run (torchrun's agent store, or one rank's server) and,
// on CPU, the medium of the collectives (src/dist.rs). Every function catches C++
// exceptions (guarded.hpp).

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "guarded.hpp"

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
using rlhf::guarded;

c10d::Store* as_store(void* handle) {
  return static_cast<c10d::Store*>(handle);
}
} // namespace

extern "C" {

// A TCPStore at host:port: the server (waiting for world_size processes, itself
// included) or a client. Null on failure.
void* rlhf_store_connect(
    const char* host,
    uint16_t port,
    int64_t world_size,
    int is_server,
    int64_t timeout_ms) {
  void* out = nullptr;
  guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world_size);
    // Every process counts itself in (c10d's init key); the server waits for them all.
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    out = store.release();
  });
  return out;
}

void rlhf_store_close(void* handle) {
  if (handle != nullptr) {
    c10::intrusive_ptr<c10d::Store>::reclaim(as_store(handle));
  }
}

int rlhf_store_set(void* handle, const char* key, const uint8_t* data, size_t len) {
  return guarded([&] {
    as_store(handle)->set(std::string(key), std::vector<uint8_t>(data, data + len));
  });
}

// Waits for key (up to the store's timeout); the value in a malloc'd buffer the caller
// frees with rlhf_store_free.
int rlhf_store_get(void* handle, const char* key, uint8_t** out, size_t* len) {
  return guarded([&] {
    std::vector<uint8_t> value = as_store(handle)->get(std::string(key));
    *len = value.size();
    *out = static_cast<uint8_t*>(std::malloc(value.size() > 0 ? value.size() : 1));
    if (!value.empty()) {
      std::memcpy(*out, value.data(), value.size());
    }
  });
}

void rlhf_store_free(uint8_t* buffer) {
  std::free(buffer);
}

int rlhf_store_add(void* handle, const char* key, int64_t value, int64_t* out) {
  return guarded([&] { *out = as_store(handle)->add(std::string(key), value); });
}

// Whether key is set, without waiting for it.
int rlhf_store_check(void* handle, const char* key, int* out) {
  return guarded([&] { *out = as_store(handle)->check({std::string(key)}) ? 1 : 0; });
}

int rlhf_store_delete(void* handle, const char* key) {
  return guarded([&] { as_store(handle)->deleteKey(std::string(key)); });
}

} // extern "C"
