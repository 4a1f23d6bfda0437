// n-gram keys on the GPU; counting is done by torch sort-unique in calibprune/ops/ngram. Key definition:
// calibprune/ops/ngram/naive.py (exact big-endian packing of floor(64/n)-bit ids, or a splitmix64 chain).
//
//   calibprune_cuda::ngram_hashes(ids [b,t] int64, mask [b,t] uint8|bool or None, n, exact)
//       -> (keys [b,m] int64, valid [b,m] bool), m = max(t-n+1, 0); keys are 0 where invalid.
// No torch/extension.h: it pulls in Python.h, which a plain nvcc compile of this file does not see.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "common.cuh"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace {

constexpr uint64_t kSeed = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;
constexpr int kThreads = 256;

__device__ __forceinline__ uint64_t fmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

// One thread per window q of the flattened [b, m] output; window q reads ids[row, j : j + n].
__global__ void ngram_hash_kernel(const int64_t* __restrict__ ids, const uint8_t* __restrict__ mask,
                                  int64_t* __restrict__ keys, bool* __restrict__ valid, int64_t windows, int64_t m,
                                  int64_t t, int n, bool exact, int width) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < windows;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = q / m;
    const int64_t base = row * t + (q - row * m);
    bool ok = true;
    if (mask != nullptr) {
      for (int k = 0; k < n; ++k) ok = ok && mask[base + k] != 0;
    }
    uint64_t h = 0;
    if (ok) {
      if (exact) {
        h = static_cast<uint64_t>(ids[base]);
        for (int k = 1; k < n; ++k) h = (h << width) | static_cast<uint64_t>(ids[base + k]);
      } else {
        h = kSeed;
        for (int k = 0; k < n; ++k) h = fmix64(h ^ static_cast<uint64_t>(ids[base + k]));
      }
    }
    keys[q] = static_cast<int64_t>(h);
    valid[q] = ok;
  }
}

std::tuple<at::Tensor, at::Tensor> ngram_hashes_cuda(const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                                                      int64_t n, bool exact) {
  TORCH_CHECK(ids.is_cuda(), "ngram: ids must be on a CUDA device");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "ngram: ids must be [b, t] int64");
  TORCH_CHECK(ids.is_contiguous(), "ngram: ids must be contiguous");
  TORCH_CHECK(n >= 1 && (!exact || n <= 64), "ngram: n must be >= 1 (and <= 64 for exact packing)");
  const uint8_t* mask_ptr = nullptr;
  if (mask.has_value()) {
    const auto& mk = *mask;
    TORCH_CHECK(mk.sizes() == ids.sizes(), "ngram: mask must have the shape of ids");
    TORCH_CHECK(mk.scalar_type() == at::kByte || mk.scalar_type() == at::kBool, "ngram: mask must be uint8 or bool");
    TORCH_CHECK(mk.is_contiguous() && mk.device() == ids.device(), "ngram: mask must be contiguous on ids' device");
    mask_ptr = static_cast<const uint8_t*>(mk.data_ptr());
  }
  CALIBPRUNE_GUARD_AND_STREAM(ids);
  const int64_t b = ids.size(0), t = ids.size(1), m = std::max<int64_t>(t - n + 1, 0);
  auto keys = at::empty({b, m}, ids.options());
  auto valid = at::empty({b, m}, ids.options().dtype(at::kBool));
  const int64_t windows = b * m;
  if (windows > 0) {
    const int64_t blocks = std::min<int64_t>((windows + kThreads - 1) / kThreads, 65535LL * 32);
    ngram_hash_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        ids.data_ptr<int64_t>(), mask_ptr, keys.data_ptr<int64_t>(), valid.data_ptr<bool>(), windows, m, t,
        static_cast<int>(n), exact, static_cast<int>(64 / n));
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, "ngram_hash_kernel launch failed: ", cudaGetErrorString(err));
  }
  return {keys, valid};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(calibprune_cuda, m) {
  m.def("ngram_hashes(Tensor ids, Tensor? mask, int n, bool exact) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(calibprune_cuda, CUDA, m) { m.impl("ngram_hashes", &ngram_hashes_cuda); }
