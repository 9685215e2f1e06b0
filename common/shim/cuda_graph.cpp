// CUDA graphs for the decode loop: a thin C ABI over libtorch's own at::cuda::CUDAGraph
// (the mechanism behind torch.cuda.graph), built by common/build.rs against the torch
// wheel's headers. Every function returns 0 on success, or -1 with the message available
// from rlhf_shim_error() (guarded.hpp).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "guarded.hpp"

#include <exception>
#include <optional>
#include <string>

namespace {

using rlhf::guarded;

// One captured decode step: the graph, and while a side stream is current (capture is
// not allowed on the default stream), the stream to go back to. Streams are switched with
// c10's exported functions rather than CUDAStreamGuard, whose inline code would need the
// CUDA runtime linked here too.
struct Graph {
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStream> previous;

  void use_side_stream() {
    c10::cuda::device_synchronize();
    previous = c10::cuda::getCurrentCUDAStream();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool());
  }

  void back_to_previous_stream() {
    if (previous) {
      c10::cuda::device_synchronize();
      c10::cuda::setCurrentCUDAStream(*previous);
      previous.reset();
    }
  }
};

}  // namespace

extern "C" {


int rlhf_graph_new(void** out) {
  return guarded([&] { *out = new Graph(); });
}

// Makes a side stream current (after the device is idle), for warm-up and capture.
int rlhf_graph_side_stream(void* g) {
  return guarded([&] { static_cast<Graph*>(g)->use_side_stream(); });
}

int rlhf_graph_capture_begin(void* g) {
  return guarded([&] { static_cast<Graph*>(g)->graph.capture_begin(); });
}

// Ends the capture and goes back to the default stream (after the side stream is idle).
int rlhf_graph_capture_end(void* g) {
  return guarded([&] {
    auto* graph = static_cast<Graph*>(g);
    graph->graph.capture_end();
    graph->back_to_previous_stream();
  });
}

// Leaves the side stream without capturing (capture failed or was not attempted).
int rlhf_graph_main_stream(void* g) {
  return guarded([&] { static_cast<Graph*>(g)->back_to_previous_stream(); });
}

int rlhf_graph_replay(void* g) {
  return guarded([&] { static_cast<Graph*>(g)->graph.replay(); });
}

// Destroys the graph (its private memory pool goes with it) and hands the allocator's
// cached free blocks back to the device, so training gets the memory back.
int rlhf_graph_free(void* g) {
  return guarded([&] {
    auto* graph = static_cast<Graph*>(g);
    graph->back_to_previous_stream();
    delete graph;
    c10::cuda::device_synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
  });
}

}  // extern "C"
