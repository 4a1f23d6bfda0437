// n-gram keys and counting on CPU (C++/OpenMP). Key definition: calibprune/ops/ngram/naive.py.
//
//   calibprune_cpp::ngram_hashes(ids [b,t] int64, mask [b,t] uint8|bool or None, n, exact) -> (keys [b,m] int64,
//                                valid [b,m] bool), m = max(t-n+1, 0); keys are 0 where invalid.
//   calibprune_cpp::ngram_stats(ids, mask, n, exact, max_k) -> (total, distinct, top [<=max_k] int64 descending)
//
// Counting: keys are scattered into 2^kPartBits partitions by the top bits of a mixed key (per-thread histograms,
// then a prefix sum gives every thread its own write ranges), and each partition is counted with a small
// open-addressing table that stays in cache. Partitions are independent, so the counting loop is parallel.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr uint64_t kSeed = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;
constexpr int kPartBits = 8;
constexpr int kParts = 1 << kPartBits;

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline uint64_t fmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

struct Windows {
  const int64_t* ids;
  const uint8_t* mask;  // nullptr: every token valid
  int64_t b, t, n, m;
  bool exact;
  int width;

  // Key of window q (flattened over [b, m]); false when a token of the window is padding.
  inline bool key(int64_t q, uint64_t& out) const {
    const int64_t row = q / m, j = q - row * m;
    const int64_t base = row * t + j;
    if (mask) {
      for (int64_t k = 0; k < n; ++k)
        if (!mask[base + k]) return false;
    }
    const int64_t* x = ids + base;
    uint64_t h;
    if (exact) {
      h = static_cast<uint64_t>(x[0]);
      for (int64_t k = 1; k < n; ++k) h = (h << width) | static_cast<uint64_t>(x[k]);
    } else {
      h = kSeed;
      for (int64_t k = 0; k < n; ++k) h = fmix64(h ^ static_cast<uint64_t>(x[k]));
    }
    out = h;
    return true;
  }
};

Windows make_windows(const at::Tensor& ids, const std::optional<at::Tensor>& mask, int64_t n, bool exact) {
  TORCH_CHECK(ids.device().is_cpu(), "ngram: ids must be on CPU");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "ngram: ids must be [b, t] int64");
  TORCH_CHECK(ids.is_contiguous(), "ngram: ids must be contiguous");
  TORCH_CHECK(n >= 1, "ngram: n must be >= 1");
  TORCH_CHECK(exact ? n <= 64 : true, "ngram: exact packing needs n <= 64");
  Windows w{ids.data_ptr<int64_t>(), nullptr, ids.size(0), ids.size(1), n, std::max<int64_t>(ids.size(1) - n + 1, 0),
            exact, static_cast<int>(64 / n)};
  if (mask.has_value()) {
    const auto& mk = *mask;
    TORCH_CHECK(mk.sizes() == ids.sizes(), "ngram: mask must have the shape of ids");
    TORCH_CHECK(mk.scalar_type() == at::kByte || mk.scalar_type() == at::kBool, "ngram: mask must be uint8 or bool");
    TORCH_CHECK(mk.is_contiguous() && mk.device().is_cpu(), "ngram: mask must be contiguous on CPU");
    w.mask = static_cast<const uint8_t*>(mk.data_ptr());
  }
  return w;
}

std::tuple<at::Tensor, at::Tensor> ngram_hashes_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                                                     int64_t n, bool exact) {
  const Windows w = make_windows(ids, mask, n, exact);
  auto keys = at::empty({w.b, w.m}, ids.options());
  auto valid = at::empty({w.b, w.m}, ids.options().dtype(at::kBool));
  int64_t* kp = keys.data_ptr<int64_t>();
  bool* vp = valid.data_ptr<bool>();
  const int64_t total = w.b * w.m;
#pragma omp parallel for schedule(static) if (total > 32768)
  for (int64_t q = 0; q < total; ++q) {
    uint64_t h = 0;
    const bool ok = w.key(q, h);
    kp[q] = ok ? static_cast<int64_t>(h) : 0;
    vp[q] = ok;
  }
  return {keys, valid};
}

std::tuple<int64_t, int64_t, at::Tensor> ngram_stats_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                                                         int64_t n, bool exact, int64_t max_k) {
  TORCH_CHECK(max_k >= 0, "ngram_stats: max_k must be >= 0");
  const Windows w = make_windows(ids, mask, n, exact);
  const int64_t windows = w.b * w.m;
#ifdef _OPENMP
  const int threads = windows > 32768 ? omp_get_max_threads() : 1;
#else
  const int threads = 1;
#endif
  // fmix64 is a bijection, so counting mixed keys counts keys; the mixed bits are uniform, so the top bits pick a
  // partition and the low bits a table slot.
  constexpr uint16_t kInvalid = kParts;
  std::vector<uint64_t> mixed(windows);
  std::vector<uint16_t> parts(windows);
  std::vector<int64_t> hist(static_cast<size_t>(threads) * kParts, 0);
  std::vector<int64_t> bounds(threads + 1);
  for (int i = 0; i <= threads; ++i) bounds[i] = windows * i / threads;
  // Pass 1: keys and per-thread partition histograms.
#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id();
    int64_t* hp = hist.data() + static_cast<size_t>(tid) * kParts;
    for (int64_t q = bounds[tid]; q < bounds[tid + 1]; ++q) {
      uint64_t h;
      if (w.key(q, h)) {
        const uint64_t z = fmix64(h);
        const int p = static_cast<int>(z >> (64 - kPartBits));
        mixed[q] = z;
        parts[q] = static_cast<uint16_t>(p);
        ++hp[p];
      } else {
        parts[q] = kInvalid;
      }
    }
  }
  // Prefix sums, partition-major then thread: each partition is contiguous and each thread owns its slices.
  std::vector<int64_t> offset(static_cast<size_t>(threads) * kParts);
  std::vector<int64_t> part_start(kParts + 1, 0);
  int64_t run = 0;
  for (int p = 0; p < kParts; ++p) {
    part_start[p] = run;
    for (int tid = 0; tid < threads; ++tid) {
      offset[static_cast<size_t>(tid) * kParts + p] = run;
      run += hist[static_cast<size_t>(tid) * kParts + p];
    }
  }
  part_start[kParts] = run;
  const int64_t total = run;
  // Pass 2: scatter into partitions.
  std::vector<uint64_t> sorted(total);
#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id();
    int64_t* op = offset.data() + static_cast<size_t>(tid) * kParts;
    for (int64_t q = bounds[tid]; q < bounds[tid + 1]; ++q)
      if (parts[q] != kInvalid) sorted[op[parts[q]]++] = mixed[q];
  }

  // Pass 3: count each partition in its own open-addressing table; keep its max_k largest counts.
  int64_t distinct = 0;
  std::vector<int64_t> candidates;
#pragma omp parallel num_threads(threads) reduction(+ : distinct)
  {
    std::vector<uint64_t> tkeys;
    std::vector<int64_t> tcount;
    std::vector<int64_t> local_counts, local_top;
#pragma omp for schedule(dynamic, 4)
    for (int p = 0; p < kParts; ++p) {
      const int64_t lo = part_start[p], hi = part_start[p + 1];
      if (hi == lo) continue;
      size_t cap = 16;
      while (cap < static_cast<size_t>(2 * (hi - lo))) cap <<= 1;
      const size_t capmask = cap - 1;
      tkeys.assign(cap, 0);
      tcount.assign(cap, 0);
      local_counts.clear();
      for (int64_t i = lo; i < hi; ++i) {
        const uint64_t key = sorted[i];
        size_t slot = static_cast<size_t>(key) & capmask;
        while (tcount[slot] != 0 && tkeys[slot] != key) slot = (slot + 1) & capmask;
        if (tcount[slot] == 0) tkeys[slot] = key;
        ++tcount[slot];
      }
      for (size_t s = 0; s < cap; ++s)
        if (tcount[s]) local_counts.push_back(tcount[s]);
      distinct += static_cast<int64_t>(local_counts.size());
      if (max_k > 0) {
        const size_t keep = std::min<size_t>(local_counts.size(), static_cast<size_t>(max_k));
        std::nth_element(local_counts.begin(), local_counts.begin() + (keep - 1), local_counts.end(),
                         std::greater<int64_t>());
        local_top.insert(local_top.end(), local_counts.begin(), local_counts.begin() + keep);
      }
    }
#pragma omp critical
    candidates.insert(candidates.end(), local_top.begin(), local_top.end());
  }
  const size_t keep = std::min<size_t>(candidates.size(), static_cast<size_t>(max_k));
  std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), std::greater<int64_t>());
  auto top = at::empty({static_cast<int64_t>(keep)}, at::TensorOptions().dtype(at::kLong));
  std::copy(candidates.begin(), candidates.begin() + keep, top.data_ptr<int64_t>());
  return {total, distinct, top};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(calibprune_cpp, m) {
  m.def("ngram_hashes(Tensor ids, Tensor? mask, int n, bool exact) -> (Tensor, Tensor)", &ngram_hashes_cpu);
  m.def("ngram_stats(Tensor ids, Tensor? mask, int n, bool exact, int max_k) -> (int, int, Tensor)",
        &ngram_stats_cpu);
}
