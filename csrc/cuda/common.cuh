// Shared by the calibprune CUDA sources: error checks and the device guard + current stream.
//
// A CUDA build of torch ships the c10/cuda headers; a CPU build (used only to compile-check these files with plain
// nvcc, .ci/check_cuda.sh) lacks their generated config header, so the default stream stands in there.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define CALIBPRUNE_HAS_C10_CUDA 1
#else
#define CALIBPRUNE_HAS_C10_CUDA 0
#endif

namespace calibprune {

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
}

}  // namespace calibprune

// Declares `stream` (torch's current stream on `tensor`'s device, with a device guard held for the scope).
#if CALIBPRUNE_HAS_C10_CUDA
#define CALIBPRUNE_GUARD_AND_STREAM(tensor)                      \
  const c10::cuda::CUDAGuard calibprune_device_guard((tensor).device()); \
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream()
#else
#define CALIBPRUNE_GUARD_AND_STREAM(tensor) const cudaStream_t stream = nullptr
#endif
