// hessian_update, CUDA backend: torch.ops.calibprune_cuda.hessian_update(H, X, beta, alpha, upper_only).
//
// H ← β·H + α·XᵀX for X: [tokens, d] (fp32 / bf16 / fp16), H: [d, d] fp32, as a symmetric rank-k update (SYRK):
// a 2-D grid of 64×64 output tiles where only programs with tile row <= tile column work (about half the flops of a
// GEMM); each writes its tile and the tile's mirror below the diagonal, so H stays exactly symmetric. With
// upper_only (numerics="fast") the mirror is skipped; calibprune.ops.hessian_finalize mirrors once at the end.
// All index arithmetic is 64-bit (X reaches 2^31 elements at 128×2048 tokens of a 14336-wide layer).
//   * fp32 X: shared-memory tiling, 256 threads × a 4×4 register micro-tile, fp32 FMA (no TF32: the reference
//     numerics are plain fp32).
//   * bf16 / fp16 X: WMMA 16×16×16 tensor-core fragments with fp32 accumulators (bf16 needs sm_80+).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "common.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

namespace {

using calibprune::check_cuda;

constexpr int kTile = 64;   // output tile edge
constexpr int kK = 16;      // tokens per shared-memory stage
constexpr int kThreads = 256;
constexpr int kPad = 8;     // shared-memory row padding (keeps WMMA ldm a multiple of 8 and breaks bank conflicts)

// β·H + α·acc for one tile, from a shared [kTile][kTile + 4] fp32 accumulator: the upper part (r <= c) in place,
// then the mirror (c < r) below the diagonal from the same shared values, so H stays exactly symmetric. Both
// passes write consecutive columns of H from consecutive threads.
__device__ __forceinline__ void write_tile(float* __restrict__ H, int64_t d, int64_t m0, int64_t n0, float beta,
                                           float alpha, float (*acc)[kTile + 4], bool upper_only) {
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
    const int a = idx / kTile, b = idx % kTile;
    const int64_t r = m0 + a, c = n0 + b;
    if (r < d && c < d && r <= c) {
      const float out = beta * H[r * d + c] + alpha * acc[a][b];
      H[r * d + c] = out;
      acc[a][b] = out;  // each thread rewrites only its own element
    }
  }
  if (upper_only) return;
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
    const int a = idx / kTile, b = idx % kTile;
    const int64_t r = n0 + a, c = m0 + b;  // H[n0 + a, m0 + b] = out[b][a]
    if (r < d && c < d && c < r) H[r * d + c] = acc[b][a];
  }
}

__device__ __forceinline__ bool upper_tile(int64_t& m0, int64_t& n0) {
  if (blockIdx.y > blockIdx.x) return false;
  m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  return true;
}

// fp32 path. Thread (ty, tx) of a 16×16 grid owns rows ty + 16i and columns tx + 16j (i, j < 4) of the tile.
__global__ void __launch_bounds__(kThreads) syrk_f32_kernel(float* __restrict__ H, const float* __restrict__ X,
                                                            int64_t tokens, int64_t d, float beta, float alpha,
                                                            bool upper_only) {
  int64_t m0, n0;
  if (!upper_tile(m0, n0)) return;
  __shared__ float As[kK][kTile + 4];
  __shared__ float Bs[kK][kTile + 4];
  __shared__ float acc_s[kTile][kTile + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < tokens; k0 += kK) {
    for (int idx = threadIdx.x; idx < kK * kTile; idx += kThreads) {
      const int kk = idx / kTile, mm = idx % kTile;
      const int64_t t = k0 + kk;
      As[kk][mm] = (t < tokens && m0 + mm < d) ? X[t * d + m0 + mm] : 0.f;
      Bs[kk][mm] = (t < tokens && n0 + mm < d) ? X[t * d + n0 + mm] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc_s[ty + 16 * i][tx + 16 * j] = acc[i][j];
  __syncthreads();
  write_tile(H, d, m0, n0, beta, alpha, acc_s, upper_only);
}

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }

// 16-bit path: 8 warps as a 4×2 grid, each warp a 16×32 slice of the tile = 1×2 WMMA accumulators.
// Shared tiles hold X[k0:k0+kK, m0:m0+kTile] k-major, which is Xᵀ's tile in column-major order (matrix_a,
// col_major) and X's tile in row-major order (matrix_b, row_major).
template <typename T>
__global__ void __launch_bounds__(kThreads) syrk_wmma_kernel(float* __restrict__ H, const T* __restrict__ X,
                                                             int64_t tokens, int64_t d, float beta, float alpha,
                                                             bool upper_only) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  int64_t m0, n0;
  if (!upper_tile(m0, n0)) return;
  __shared__ __align__(32) T As[kK][kTile + kPad];
  __shared__ __align__(32) T Bs[kK][kTile + kPad];
  __shared__ __align__(32) float acc_s[kTile][kTile + 4];
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 16, wn = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
  wmma::fill_fragment(c[0], 0.f);
  wmma::fill_fragment(c[1], 0.f);
  const T zero = zero_of<T>();
  for (int64_t k0 = 0; k0 < tokens; k0 += kK) {
    for (int idx = threadIdx.x; idx < kK * kTile; idx += kThreads) {
      const int kk = idx / kTile, mm = idx % kTile;
      const int64_t t = k0 + kk;
      As[kk][mm] = (t < tokens && m0 + mm < d) ? X[t * d + m0 + mm] : zero;
      Bs[kk][mm] = (t < tokens && n0 + mm < d) ? X[t * d + n0 + mm] : zero;
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
    wmma::load_matrix_sync(a, &As[0][wm], kTile + kPad);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(b, &Bs[0][wn + 16 * j], kTile + kPad);
      wmma::mma_sync(c[j], a, b, c[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) wmma::store_matrix_sync(&acc_s[wm][wn + 16 * j], c[j], kTile + 4, wmma::mem_row_major);
  __syncthreads();
  write_tile(H, d, m0, n0, beta, alpha, acc_s, upper_only);
#endif
}

void hessian_update_cuda(at::Tensor H, const at::Tensor& X, double beta, double alpha, bool upper_only) {
  TORCH_CHECK(H.is_cuda() && X.is_cuda() && H.device() == X.device(), "hessian_update (cuda): H and X on one GPU");
  TORCH_CHECK(H.dim() == 2 && H.size(0) == H.size(1) && H.scalar_type() == at::kFloat && H.is_contiguous(),
              "hessian_update (cuda): H must be a contiguous square fp32 matrix");
  TORCH_CHECK(X.dim() == 2 && X.size(1) == H.size(0), "hessian_update (cuda): X must be [tokens, d]");
  CALIBPRUNE_GUARD_AND_STREAM(H);
  const at::Tensor Xc = X.contiguous();
  const int64_t tokens = Xc.size(0), d = Xc.size(1);
  if (d == 0) return;  // a zero-size grid is not a valid launch
  const int tiles = static_cast<int>((d + kTile - 1) / kTile);
  TORCH_CHECK(tiles <= 65535, "hessian_update (cuda): d = ", d, " is too wide for one launch");
  const dim3 grid(tiles, tiles);
  const float b = static_cast<float>(beta), a = static_cast<float>(alpha);
  switch (Xc.scalar_type()) {
    case at::kFloat:
      syrk_f32_kernel<<<grid, kThreads, 0, stream>>>(H.data_ptr<float>(), Xc.data_ptr<float>(), tokens, d, b, a,
                                                      upper_only);
      break;
    case at::kBFloat16:
    case at::kHalf: {
      int major = 0;
      check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, H.get_device()),
                 "cudaDeviceGetAttribute");
      TORCH_CHECK(major >= 8, "hessian_update (cuda): 16-bit inputs need sm_80 or newer; upcast X to fp32");
      if (Xc.scalar_type() == at::kBFloat16)
        syrk_wmma_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
            H.data_ptr<float>(), reinterpret_cast<const __nv_bfloat16*>(Xc.data_ptr<at::BFloat16>()), tokens, d, b, a,
            upper_only);
      else
        syrk_wmma_kernel<__half><<<grid, kThreads, 0, stream>>>(
            H.data_ptr<float>(), reinterpret_cast<const __half*>(Xc.data_ptr<at::Half>()), tokens, d, b, a, upper_only);
      break;
    }
    default:
      TORCH_CHECK(false, "hessian_update (cuda): X must be fp32, bf16 or fp16, got ", Xc.scalar_type());
  }
  check_cuda(cudaGetLastError(), "kernel launch");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(calibprune_cuda, m) {
  m.def("hessian_update(Tensor(a!) H, Tensor X, float beta, float alpha, bool upper_only=False) -> ()");
}

TORCH_LIBRARY_IMPL(calibprune_cuda, CUDA, m) { m.impl("hessian_update", &hessian_update_cuda); }
