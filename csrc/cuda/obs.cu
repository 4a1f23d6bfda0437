// obs_prune, CUDA backend: torch.ops.calibprune_cuda.obs_prune(W, U, sparsity, prune_n, prune_m, blocksize).
//
// SparseGPT OBS prune (Frantar & Alistarh 2023, Alg. 1; IST-DASLab fasterprune numerics) with one kernel launch per
// column block. Inside a block the rows are independent: a warp owns one row at a time and keeps the row's slice of
// the block in registers (lane l holds columns l, l + 32, …), the thread block stages the block's U tile in shared
// memory once for all its warps, and the sequential column loop runs entirely on chip. The trailing columns get one
// fp32 GEMM per block, then a subtraction, exactly as in the torch path (fused_trailing: one addmm_).
//
// The reference's arithmetic: scores, errors and updates use the _rn intrinsics (IEEE division; a product and a
// subtraction that are never contracted into an FMA), and the extension is built without --use_fast_math (no
// flush-to-zero). N:M ties are ranked lowest column first, which is CUDA torch.topk's rule, so masks agree with the
// torch backend on the same GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "common.cuh"

#include <algorithm>
#include <tuple>

namespace {

using calibprune::check_cuda;

constexpr int kWarps = 8;          // warps (rows in flight) per thread block
constexpr int kRowsPerWarp = 4;    // rows each warp walks in turn, sharing the staged U tile
constexpr unsigned kFull = 0xffffffffu;

// Slot j of a per-lane register array, with j uniform across the warp (no local-memory indexing).
template <int CPL>
__device__ __forceinline__ float pick(const float (&v)[CPL], int j) {
  float out = 0.f;
#pragma unroll
  for (int s = 0; s < CPL; ++s) out = (s == j) ? v[s] : out;
  return out;
}

// One column block. W: [rows, ldw] fp32 (block at column offset 0), U: [count, count] block tile (leading dim ldu),
// Err: [rows, count] out, Mask: [rows, ldm] bool out, Loss: [rows] accumulated, Thresh: [1] (unstructured only).
// CPL = columns per lane (count <= 32·CPL). SMEM_U: stage U in shared memory (else read it through L1/L2).
template <int CPL, bool SMEM_U>
__global__ void __launch_bounds__(kWarps * 32)
obs_block_kernel(float* __restrict__ W, int64_t ldw, const float* __restrict__ U, int64_t ldu, float* __restrict__ Err,
                 bool* __restrict__ Mask, int64_t ldm, float* __restrict__ Loss, const float* __restrict__ Thresh,
                 int64_t rows, int count, int prune_n, int prune_m) {
  extern __shared__ float u_smem[];
  const float* Ut = U;
  int64_t ld = ldu;
  if constexpr (SMEM_U) {
    for (int idx = threadIdx.x; idx < count * count; idx += blockDim.x) {
      const int a = idx / count, b = idx % count;
      u_smem[idx] = b >= a ? U[a * ldu + b] : 0.f;  // only the upper triangle is ever read
    }
    __syncthreads();
    Ut = u_smem;
    ld = count;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float thresh = prune_n == 0 ? *Thresh : 0.f;

  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int64_t r = (static_cast<int64_t>(blockIdx.x) * kWarps * kRowsPerWarp) + rr * kWarps + warp;
    if (r >= rows) break;  // warp-uniform
    float w[CPL], e[CPL], dsq[CPL];
    bool m[CPL];
#pragma unroll
    for (int s = 0; s < CPL; ++s) {
      const int c = lane + 32 * s;
      const bool in = c < count;
      w[s] = in ? W[r * ldw + c] : 0.f;
      const float dg = in ? Ut[c * ld + c] : 1.f;
      dsq[s] = __fmul_rn(dg, dg);
      e[s] = 0.f;
      m[s] = in && prune_n == 0 && __fdiv_rn(__fmul_rn(w[s], w[s]), dsq[s]) <= thresh;
    }
    for (int i = 0; i < count; ++i) {
      const int slot = i / 32, owner = i % 32;
      if (prune_n != 0 && i % prune_m == 0) {
        // N:M on the already-updated weights: rank each column of the group among the group (ties: lower first).
        const int len = min(prune_m, count - i);
        const int c_mine0 = lane;  // my columns are lane + 32·s
#pragma unroll
        for (int s = 0; s < CPL; ++s) {
          const int c = c_mine0 + 32 * s;
          const bool mine = c >= i && c < i + len;
          const float my_score = __fdiv_rn(__fmul_rn(w[s], w[s]), dsq[s]);
          int rank = 0;
          for (int k = 0; k < len; ++k) {
            const int ck = i + k;
            const float wk = __shfl_sync(kFull, pick<CPL>(w, ck / 32), ck % 32);
            const float dk = __shfl_sync(kFull, pick<CPL>(dsq, ck / 32), ck % 32);
            const float sk = __fdiv_rn(__fmul_rn(wk, wk), dk);
            rank += (sk < my_score) || (sk == my_score && ck < c);
          }
          if (mine) m[s] = rank < prune_n;
        }
      }
      // err = (w·mask)/U[i,i], broadcast from the owner lane.
      float err = 0.f;
#pragma unroll
      for (int s = 0; s < CPL; ++s)
        if (s == slot && lane == owner) err = m[s] ? __fdiv_rn(w[s], Ut[i * ld + i]) : 0.f;
      err = __shfl_sync(kFull, err, owner);
      if (err == 0.f) continue;  // w − 0·u == w exactly
      const float* urow = Ut + static_cast<int64_t>(i) * ld;
#pragma unroll
      for (int s = 0; s < CPL; ++s) {
        const int c = lane + 32 * s;
        if (c > i && c < count) w[s] = __fsub_rn(w[s], __fmul_rn(err, urow[c]));
        if (c == i) e[s] = err;
      }
    }
    float sq = 0.f;
#pragma unroll
    for (int s = 0; s < CPL; ++s) {
      const int c = lane + 32 * s;
      if (c < count) {
        W[r * ldw + c] = m[s] ? 0.f : w[s];
        Err[r * count + c] = e[s];
        Mask[r * ldm + c] = m[s];
        sq = __fadd_rn(sq, __fmul_rn(e[s], e[s]));
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sq += __shfl_xor_sync(kFull, sq, off);
    if (lane == 0) Loss[r] += sq * 0.5f;
  }
}

template <int CPL>
void launch_block(float* W, int64_t ldw, const float* U, int64_t ldu, float* Err, bool* Mask, int64_t ldm,
                  float* Loss, const float* Thresh, int64_t rows, int count, int prune_n, int prune_m,
                  cudaStream_t stream) {
  const int64_t rows_per_cta = kWarps * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta));
  const size_t smem = static_cast<size_t>(count) * count * sizeof(float);
  int dev = 0, optin = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  if (smem <= static_cast<size_t>(optin)) {
    auto kernel = obs_block_kernel<CPL, true>;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
               "cudaFuncSetAttribute");
    kernel<<<grid, kWarps * 32, smem, stream>>>(W, ldw, U, ldu, Err, Mask, ldm, Loss, Thresh, rows, count, prune_n,
                                               prune_m);
  } else {
    obs_block_kernel<CPL, false><<<grid, kWarps * 32, 0, stream>>>(W, ldw, U, ldu, Err, Mask, ldm, Loss, Thresh,
                                                                   rows, count, prune_n, prune_m);
  }
  check_cuda(cudaGetLastError(), "kernel launch");
}

std::tuple<at::Tensor, at::Tensor> obs_prune_cuda(at::Tensor W, const at::Tensor& U, double sparsity,
                                                  int64_t prune_n, int64_t prune_m, int64_t blocksize,
                                                  bool fused_trailing) {
  TORCH_CHECK(W.is_cuda() && U.is_cuda() && W.device() == U.device(), "obs_prune (cuda): W and U on one GPU");
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat, "obs_prune (cuda): W must be a 2-D fp32 matrix");
  const int64_t rows = W.size(0), cols = W.size(1);
  TORCH_CHECK(U.dim() == 2 && U.size(0) == cols && U.size(1) == cols && U.scalar_type() == at::kFloat,
              "obs_prune (cuda): U must be [cols, cols] fp32");
  TORCH_CHECK(blocksize >= 1 && blocksize <= 256, "obs_prune (cuda): blocksize must be in [1, 256]");
  TORCH_CHECK(prune_n == 0 || (0 < prune_n && prune_n < prune_m), "obs_prune (cuda): N:M needs 0 < n < m");
  if (rows == 0 || cols == 0)
    return {at::zeros({rows, cols}, W.options().dtype(at::kBool)), at::zeros({rows}, W.options())};
  CALIBPRUNE_GUARD_AND_STREAM(W);

  // The kernel reads rows of a row-major copy of U; the trailing GEMM uses U itself, whose layout (column-major
  // from cuSOLVER) the reference's GEMM sees: cuBLAS's rounding depends on it.
  at::Tensor Wc = W.contiguous();
  const at::Tensor Uc = U.contiguous();
  at::Tensor mask = at::empty({rows, cols}, W.options().dtype(at::kBool));
  at::Tensor losses = at::zeros({rows}, W.options());
  const int64_t bs = std::min(blocksize, cols);
  at::Tensor Err = at::empty({rows * bs}, W.options());
  at::Tensor thresh = at::zeros({1}, W.options());

  for (int64_t i1 = 0; i1 < cols; i1 += blocksize) {
    const int64_t i2 = std::min(i1 + blocksize, cols), count = i2 - i1;
    at::Tensor W1 = Wc.narrow(1, i1, count);
    const at::Tensor U1 = Uc.narrow(0, i1, count).narrow(1, i1, count);
    at::Tensor Err1 = Err.narrow(0, 0, rows * count).view({rows, count});
    if (prune_n == 0) {
      // sorted(W1²/diag(U1)²)[int(numel·s)], computed as the torch path does (no host sync).
      const at::Tensor score = W1.square().div_(U1.diagonal().square());
      const auto k = static_cast<int64_t>(static_cast<double>(rows * count) * sparsity);
      thresh.copy_(std::get<0>(at::kthvalue(score.flatten(), k + 1)).reshape({1}));
    }
    float* wp = W1.data_ptr<float>();
    const float* up = U1.data_ptr<float>();
    float* ep = Err1.data_ptr<float>();
    bool* mp = mask.data_ptr<bool>() + i1;
    float* lp = losses.data_ptr<float>();
    const float* tp = thresh.data_ptr<float>();
    const int c = static_cast<int>(count), n = static_cast<int>(prune_n), m = static_cast<int>(prune_m);
    if (count <= 32)
      launch_block<1>(wp, cols, up, cols, ep, mp, cols, lp, tp, rows, c, n, m, stream);
    else if (count <= 64)
      launch_block<2>(wp, cols, up, cols, ep, mp, cols, lp, tp, rows, c, n, m, stream);
    else if (count <= 128)
      launch_block<4>(wp, cols, up, cols, ep, mp, cols, lp, tp, rows, c, n, m, stream);
    else
      launch_block<8>(wp, cols, up, cols, ep, mp, cols, lp, tp, rows, c, n, m, stream);
    if (i2 < cols) {
      at::Tensor W2 = Wc.narrow(1, i2, cols - i2);
      const at::Tensor U12 = U.narrow(0, i1, count).narrow(1, i2, cols - i2);
      if (fused_trailing) {
        W2.addmm_(Err1, U12, 1.0, -1.0);
      } else {
        W2.sub_(at::mm(Err1, U12));  // product, then subtraction: the reference's two roundings
      }
    }
  }
  if (!W.is_contiguous()) W.copy_(Wc);
  return {mask, losses};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(calibprune_cuda, m) {
  m.def("obs_prune(Tensor(a!) W, Tensor U, float sparsity, int prune_n, int prune_m, int blocksize, "
        "bool fused_trailing=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(calibprune_cuda, CUDA, m) { m.impl("obs_prune", &obs_prune_cuda); }
