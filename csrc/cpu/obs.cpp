// SparseGPT OBS prune, C++/OpenMP CPU backend: torch.ops.calibprune_cpp.obs_prune.
//
// Frantar & Alistarh (2023), Alg. 1, numerics of IST-DASLab fasterprune kept exactly. Inside a column block the
// rows are independent: each row runs the whole sequential column loop on its own contiguous slice of W, so rows
// are spread over threads and each row's rank-1 update w[i+1:] -= err·U[i, i+1:] is a unit-stride, vectorisable
// loop. The trailing columns get one fp32 GEMM per block, then a subtraction, exactly like the torch path
// (fused_trailing: one addmm_, numerics="fast").
//
// Bitwise agreement with the reference: scores are w·w/(d·d) like torch's W1²/diag²; the rank-1 update is one
// rounded product then one rounded subtraction (what the reference's k=1 matmul followed by -= does), so no FMA
// contraction is possible in it; a pruned-away update with err == 0 is skipped because w − 0·u == w exactly.
// N:M ties are broken exactly as the reference's torch.topk(largest=False) on CPU does (see mark_smallest).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// Marks the k smallest of s[0..m), exactly as the reference's torch.topk(s, k, largest=False) on CPU chooses them
// (ATen TopKImpl.h): (score, index) pairs in index order, std::partial_sort when k·64 <= m, else std::nth_element
// at k − 1, compared by score alone with NaN last; the first k pairs after that are the chosen ones. On an exact
// tie this keeps no fixed index order (it is whatever the selection algorithm leaves in front), so the same
// algorithm on the same pairs is the only way to agree with the reference.
using TopkElem = std::pair<double, int64_t>;  // ATen uses acc_type<float> = double; the order is the same

inline bool topk_smaller(const TopkElem& x, const TopkElem& y) {
  return (!std::isnan(x.first) && std::isnan(y.first)) || (x.first < y.first);
}

inline void mark_smallest(const float* s, int64_t m, int64_t k, uint8_t* out, std::vector<TopkElem>& queue) {
  queue.resize(m);
  for (int64_t j = 0; j < m; ++j) queue[j] = {static_cast<double>(s[j]), j};
  if (k * 64 <= m) {
    std::partial_sort(queue.begin(), queue.begin() + k, queue.end(), topk_smaller);
  } else {
    std::nth_element(queue.begin(), queue.begin() + k - 1, queue.end(), topk_smaller);
  }
  for (int64_t j = 0; j < m; ++j) out[j] = 0;
  for (int64_t j = 0; j < k; ++j) out[queue[j].second] = 1;
}

// w[0..len) -= err * u[0..len), one rounding per operation (no FMA), unit stride.
inline void axpy_sub(float* __restrict w, const float* __restrict u, float err, int64_t len) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) {
    const float p = err * u[j];
    w[j] = w[j] - p;
  }
}

// One row of one column block: the sequential OBS loop over `count` columns.
//   w: [count] the row's slice of W (updated in place), U1: [count, count] tile with leading dim ldu,
//   m: [count] mask in/out (pre-filled for unstructured), e: [count] scaled errors out. Returns Σ e².
float prune_row(float* __restrict w, const float* __restrict U1, int64_t ldu, int64_t count, const float* dsq,
                int64_t prune_n, int64_t prune_m, uint8_t* __restrict m, float* __restrict e) {
  float sq = 0.f;
  thread_local std::vector<float> score;
  thread_local std::vector<TopkElem> queue;
  for (int64_t i = 0; i < count; ++i) {
    if (prune_n != 0 && i % prune_m == 0) {
      const int64_t len = std::min(prune_m, count - i);
      score.resize(len);
      for (int64_t k = 0; k < len; ++k) score[k] = w[i + k] * w[i + k] / dsq[i + k];
      mark_smallest(score.data(), len, std::min(prune_n, len), m + i, queue);
    }
    const float d = U1[i * ldu + i];
    const float err = m[i] ? w[i] / d : 0.f;
    e[i] = err;
    if (err != 0.f) {
      sq += err * err;
      axpy_sub(w + i + 1, U1 + i * ldu + i + 1, err, count - i - 1);
    }
  }
  for (int64_t i = 0; i < count; ++i)
    if (m[i]) w[i] = 0.f;
  return sq;
}

std::tuple<at::Tensor, at::Tensor> obs_prune_cpu(at::Tensor W, const at::Tensor& U, double sparsity, int64_t prune_n,
                                                 int64_t prune_m, int64_t blocksize, bool fused_trailing) {
  TORCH_CHECK(W.device().is_cpu() && U.device().is_cpu(), "obs_prune (cpp): W and U must be on CPU");
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat, "obs_prune (cpp): W must be a 2-D fp32 matrix");
  const int64_t rows = W.size(0), cols = W.size(1);
  TORCH_CHECK(U.dim() == 2 && U.size(0) == cols && U.size(1) == cols && U.scalar_type() == at::kFloat,
              "obs_prune (cpp): U must be [cols, cols] fp32");
  TORCH_CHECK(blocksize >= 1, "obs_prune (cpp): blocksize must be >= 1");
  TORCH_CHECK(prune_n == 0 || (0 < prune_n && prune_n < prune_m), "obs_prune (cpp): N:M needs 0 < n < m");
  if (rows == 0 || cols == 0)
    return {at::zeros({rows, cols}, W.options().dtype(at::kBool)), at::zeros({rows}, W.options())};

  // Work on a contiguous buffer; write back at the end if W is a strided view. The row loop reads a row-major copy
  // of U; the trailing GEMM uses U itself: its layout (column-major from LAPACK) is what the reference's GEMM sees,
  // and the GEMM's rounding depends on it.
  at::Tensor Wc = W.contiguous();
  const at::Tensor Uc = U.contiguous();
  at::Tensor mask = at::empty({rows, cols}, W.options().dtype(at::kBool));
  at::Tensor losses = at::zeros({rows}, W.options());
  const int64_t bs = std::min(blocksize, cols);
  at::Tensor Err = at::empty({rows, bs}, W.options());

  float* wp = Wc.data_ptr<float>();
  const float* up = Uc.data_ptr<float>();
  uint8_t* mp = reinterpret_cast<uint8_t*>(mask.data_ptr<bool>());
  float* lp = losses.data_ptr<float>();
  float* ep = Err.data_ptr<float>();
  std::vector<float> dsq(bs);
  std::vector<float> scores;
  std::vector<float> scratch;
  const bool unstructured = prune_n == 0;
  const int64_t grain = std::max<int64_t>(1, 16384 / (bs * bs / 2 + 1));

  for (int64_t i1 = 0; i1 < cols; i1 += blocksize) {
    const int64_t i2 = std::min(i1 + blocksize, cols), count = i2 - i1;
    const float* U1 = up + i1 * cols + i1;
    for (int64_t k = 0; k < count; ++k) dsq[k] = U1[k * cols + k] * U1[k * cols + k];

    float thresh = 0.f;
    if (unstructured) {
      // Block threshold = sorted(W1²/diag(U1)²)[int(numel·sparsity)], chosen once on the block as it stands.
      scores.resize(rows * count);
      at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* w = wp + r * cols + i1;
          float* s = scores.data() + r * count;
          for (int64_t k = 0; k < count; ++k) s[k] = w[k] * w[k] / dsq[k];
        }
      });
      scratch.assign(scores.begin(), scores.end());
      const auto kth = static_cast<int64_t>(static_cast<double>(rows * count) * sparsity);
      std::nth_element(scratch.begin(), scratch.begin() + kth, scratch.end());
      thresh = scratch[kth];
    }

    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        uint8_t* m = mp + r * cols + i1;
        if (unstructured) {
          const float* s = scores.data() + r * count;
          for (int64_t k = 0; k < count; ++k) m[k] = s[k] <= thresh;
        } else {
          std::fill(m, m + count, uint8_t{0});
        }
        const float sq = prune_row(wp + r * cols + i1, U1, cols, count, dsq.data(), prune_n, prune_m, m,
                                   ep + r * count);
        lp[r] += sq / 2.f;
      }
    });

    if (i2 < cols) {
      // Err holds this block's errors as a dense [rows, count] matrix (row stride count).
      const at::Tensor Err1 = Err.view({-1}).narrow(0, 0, rows * count).view({rows, count});
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

TORCH_LIBRARY_FRAGMENT(calibprune_cpp, m) {
  m.def("obs_prune(Tensor(a!) W, Tensor U, float sparsity, int prune_n, int prune_m, int blocksize, "
        "bool fused_trailing=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(calibprune_cpp, CPU, m) { m.impl("obs_prune", &obs_prune_cpu); }
