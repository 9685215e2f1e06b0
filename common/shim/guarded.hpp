// What every shim function does around its C++ body: C++ exceptions never cross into Rust.
// The function returns 0 on success, or -1 with the message kept for this thread, which
// rlhf_shim_error() (rng.cpp) returns.
#pragma once

#include <exception>
#include <string>

namespace rlhf {

inline thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return -1;
}

} // namespace rlhf
