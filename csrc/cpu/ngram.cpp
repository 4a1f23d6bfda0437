// n-gram keys and counting on CPU (C++/OpenMP). Key definition: calibprune/ops/ngram/naive.py.
//
//   calibprune_cpp::ngram_hashes(ids [b,t] int64, mask [b,t] uint8|bool or None, n, exact) -> (keys [b,m] int64,
//                                valid [b,m] bool), m = max(t-n+1, 0); keys are 0 where invalid.
//   calibprune_cpp::ngram_stats(ids, mask, n, exact, max_k) -> (total, distinct, top [<=max_k] int64 descending)
//
// Counting: keys are scattered into up to 4096 partitions by the top bits of a mixed key (per-thread histograms,
// then a prefix sum gives every thread its own write ranges), and each partition is counted with an
// open-addressing table that stays in L2 (slots prefetched ahead). Partitions are independent, so the counting
// loop is parallel.
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

  // Key of the window starting at flat token offset ``base``; false when one of its tokens is padding.
  inline bool key(int64_t base, uint64_t& out) const {
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

  // Calls f(q, base) for windows q in [lo, hi) of the flattened [b, m] grid (row and column kept incrementally:
  // a 64-bit division per window costs more than the key itself).
  template <class F>
  inline void for_each(int64_t lo, int64_t hi, F&& f) const {
    if (lo >= hi) return;
    int64_t row = lo / m, j = lo - row * m;
    for (int64_t q = lo; q < hi; ++q) {
      f(q, row * t + j);
      if (++j == m) {
        j = 0;
        ++row;
      }
    }
  }
};

Windows make_windows(const at::Tensor& ids, const std::optional<at::Tensor>& mask, int64_t n, bool exact) {
  TORCH_CHECK(ids.device().is_cpu(), "ngram: ids must be on CPU");
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "ngram: ids must be [b, t] int64");
  TORCH_CHECK(ids.is_contiguous(), "ngram: ids must be contiguous");
  TORCH_CHECK(n >= 1 && (!exact || n <= 64), "ngram: n must be >= 1 (and <= 64 for exact packing)");
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

// Calls f(fmix64(key)) for each valid window in [lo, hi) of the flattened [b, m] grid, in order. Exact keys
// without a mask roll along the row: one load per window instead of n (n >= 2 keeps the shift width below 64).
template <class F>
inline void emit_mixed_keys(const Windows& w, int64_t lo, int64_t hi, F&& f) {
  if (lo >= hi) return;
  if (w.exact && !w.mask && w.n >= 2) {
    const int bits = static_cast<int>(w.n) * w.width;
    const uint64_t keep = bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
    int64_t row = lo / w.m, j = lo - row * w.m, q = lo;
    while (q < hi) {
      const int64_t* x = w.ids + row * w.t;
      const int64_t j0 = j, jend = std::min(w.m, j + (hi - q));
      uint64_t h = 0;
      for (int64_t k = 0; k + 1 < w.n; ++k) h = (h << w.width) | static_cast<uint64_t>(x[j + k]);
      for (; j < jend; ++j) {
        h = ((h << w.width) | static_cast<uint64_t>(x[j + w.n - 1])) & keep;
        f(fmix64(h));
      }
      q += jend - j0;
      j = 0;
      ++row;
    }
    return;
  }
  w.for_each(lo, hi, [&](int64_t, int64_t base) {
    uint64_t h;
    if (w.key(base, h)) f(fmix64(h));
  });
}

// Below this many windows (a few ms of work) one thread wins: on a busy machine a team's barriers can cost
// more than the work itself.
constexpr int64_t kParallelMin = int64_t{1} << 19;

int team_size(int64_t work) {
#ifdef _OPENMP
  return work >= kParallelMin ? std::max(1, omp_get_max_threads()) : 1;
#else
  (void)work;
  return 1;
#endif
}

std::tuple<at::Tensor, at::Tensor> ngram_hashes_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                                                     int64_t n, bool exact) {
  const Windows w = make_windows(ids, mask, n, exact);
  auto keys = at::empty({w.b, w.m}, ids.options());
  auto valid = at::empty({w.b, w.m}, ids.options().dtype(at::kBool));
  int64_t* kp = keys.data_ptr<int64_t>();
  bool* vp = valid.data_ptr<bool>();
  const int64_t windows = w.b * w.m;
  const int threads = team_size(windows);
#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id();
    w.for_each(windows * tid / threads, windows * (tid + 1) / threads, [&](int64_t q, int64_t base) {
      uint64_t h = 0;
      const bool ok = w.key(base, h);
      kp[q] = ok ? static_cast<int64_t>(h) : 0;
      vp[q] = ok;
    });
  }
  return {keys, valid};
}

// Target keys per partition when counting (see ngram_stats_cpu).
constexpr int64_t kPartKeys = int64_t{1} << 14;
// Prefetch distance of the table inserts.
constexpr int64_t kPrefetch = 16;

// Counts at or above this are kept exactly in a list; smaller ones only in a histogram (enough for top-k).
constexpr uint32_t kBig = 256;

struct Slot {
  uint64_t key;
  uint32_t count;
  uint32_t epoch;  // the slot is empty unless this is the table's current epoch: no clearing between partitions
};

// Per-thread scratch, grown but never shrunk: touching fresh pages on every call costs more than the counting.
struct Scratch {
  std::vector<uint64_t> mixed, grouped;
  std::vector<Slot> table;
  uint32_t epoch = 0;

  // A table of at least cap slots, all empty under the returned epoch.
  uint32_t next_table(size_t cap) {
    if (table.size() < cap) table.resize(cap, Slot{0, 0, 0});
    if (++epoch == 0) {  // wrapped: really clear once every 2^32 partitions
      std::fill(table.begin(), table.end(), Slot{0, 0, 0});
      epoch = 1;
    }
    return epoch;
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

template <class T>
T* grow(std::vector<T>& v, int64_t size) {
  if (static_cast<int64_t>(v.size()) < size) v.resize(size);
  return v.data();
}

// Counts mixed keys into an open-addressing table (linear probing). Keeps the histogram of counts below kBig up to
// date as counts grow, so the table never needs a final scan: first sightings go to ``ones``, later increments
// move one key between histogram bins, and keys reaching kBig are listed to read their exact count at the end.
struct KeyCounter {
  Slot* table;
  size_t capmask;
  uint32_t ep;
  int64_t* chist;  // [kBig + 1]
  std::vector<size_t>* big_slots;
  int64_t ones = 0;

  inline void add(uint64_t key) {
    size_t slot = static_cast<size_t>(key) & capmask;
    while (table[slot].epoch == ep && table[slot].key != key) slot = (slot + 1) & capmask;
    Slot& s = table[slot];
    if (s.epoch != ep) {
      s.key = key;
      s.count = 1;
      s.epoch = ep;
      ++ones;
      return;
    }
    const uint32_t c = s.count++;
    --chist[std::min(c, kBig)];
    ++chist[std::min(c + 1, kBig)];
    if (c + 1 == kBig) big_slots->push_back(slot);
  }

  // Call once per table: the histogram's bin 1 gets the first sightings, big keys their final counts.
  void finish(std::vector<int64_t>& big_counts) {
    chist[1] += ones;
    ones = 0;
    for (size_t slot : *big_slots) big_counts.push_back(table[slot].count);
    big_slots->clear();
  }
};

size_t table_cap(int64_t keys, int load_shift) {
  size_t cap = 16;
  while (cap < (static_cast<size_t>(keys) << load_shift)) cap <<= 1;
  return cap;
}

// Top max_k counts, descending, from the exact big counts and the histogram of smaller ones.
at::Tensor top_counts(std::vector<int64_t>& big_counts, const std::vector<int64_t>& count_hist, int64_t max_k) {
  std::sort(big_counts.begin(), big_counts.end(), std::greater<int64_t>());
  std::vector<int64_t> top(big_counts.begin(), big_counts.begin() + std::min<size_t>(big_counts.size(), max_k));
  for (uint32_t c = kBig - 1; c >= 1 && static_cast<int64_t>(top.size()) < max_k; --c) {
    const int64_t take = std::min<int64_t>(count_hist[c], max_k - static_cast<int64_t>(top.size()));
    top.insert(top.end(), take, static_cast<int64_t>(c));
  }
  auto out = at::empty({static_cast<int64_t>(top.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(top.begin(), top.end(), out.data_ptr<int64_t>());
  return out;
}

int64_t distinct_of(const std::vector<int64_t>& count_hist, const std::vector<int64_t>& big_counts) {
  int64_t distinct = static_cast<int64_t>(big_counts.size());
  for (uint32_t c = 1; c < kBig; ++c) distinct += count_hist[c];
  return distinct;
}

std::tuple<int64_t, int64_t, at::Tensor> ngram_stats_cpu(const at::Tensor& ids, const std::optional<at::Tensor>& mask,
                                                         int64_t n, bool exact, int64_t max_k) {
  TORCH_CHECK(max_k >= 0, "ngram_stats: max_k must be >= 0");
  const Windows w = make_windows(ids, mask, n, exact);
  const int64_t windows = w.b * w.m;
  TORCH_CHECK(windows < (int64_t{1} << 32), "ngram_stats: counts are 32-bit; split inputs with >= 2^32 n-grams");
  const int threads = team_size(windows);
  // Partitions of at most ~kPartKeys keys keep each table (<= 4 x kPartKeys slots of 16 B) within L2, and there
  // are enough of them (4 per thread) to balance the parallel counting.
  int pbits = 0;
  while (pbits < 12 && ((windows >> pbits) > kPartKeys || (threads > 1 && (1 << pbits) < 4 * threads))) ++pbits;
  const int parts = 1 << pbits;
  // fmix64 is a bijection, so counting mixed keys counts keys; mixed bits are uniform: the top pbits pick the
  // partition and the low bits the slot.
  auto part_of = [pbits](uint64_t z) { return pbits ? static_cast<int>(z >> (64 - pbits)) : 0; };

  uint64_t* mixed = grow(scratch().mixed, windows);
  std::vector<int64_t> bounds(threads + 1), nvalid(threads, 0);
  for (int i = 0; i <= threads; ++i) bounds[i] = windows * i / threads;
  std::vector<int64_t> hist(static_cast<size_t>(threads) * parts, 0);
  // Pass 1: mixed keys of valid windows, compacted within each thread's range, and partition histograms.
#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id();
    int64_t* hp = hist.data() + static_cast<size_t>(tid) * parts;
    uint64_t* out = mixed + bounds[tid];
    int64_t cnt = 0;
    emit_mixed_keys(w, bounds[tid], bounds[tid + 1], [&](uint64_t z) {
      out[cnt++] = z;
      ++hp[part_of(z)];
    });
    nvalid[tid] = cnt;
  }
  // Prefix sums, partition-major then thread: each partition is contiguous and each thread owns its slices.
  std::vector<int64_t> offset(static_cast<size_t>(threads) * parts);
  std::vector<int64_t> part_start(parts + 1, 0);
  int64_t run = 0;
  for (int p = 0; p < parts; ++p) {
    part_start[p] = run;
    for (int tid = 0; tid < threads; ++tid) {
      offset[static_cast<size_t>(tid) * parts + p] = run;
      run += hist[static_cast<size_t>(tid) * parts + p];
    }
  }
  part_start[parts] = run;
  const int64_t total = run;
  // Pass 2: scatter into partitions.
  uint64_t* grouped = grow(scratch().grouped, total);
#pragma omp parallel num_threads(threads)
  {
    const int tid = thread_id();
    int64_t* op = offset.data() + static_cast<size_t>(tid) * parts;
    const uint64_t* in = mixed + bounds[tid];
    for (int64_t i = 0; i < nvalid[tid]; ++i) grouped[op[part_of(in[i])]++] = in[i];
  }

  // Pass 3: count each partition in its own small table; merge the per-thread histograms and big counts.
  std::vector<int64_t> count_hist(kBig + 1, 0);
  std::vector<int64_t> big_counts;
#pragma omp parallel num_threads(threads)
  {
    Scratch& mine = scratch();
    std::vector<int64_t> chist(kBig + 1, 0), local_big;
    std::vector<size_t> big_slots;
#pragma omp for schedule(dynamic, 1)
    for (int p = 0; p < parts; ++p) {
      const int64_t lo = part_start[p], hi = part_start[p + 1];
      if (hi == lo) continue;
      const size_t cap = table_cap(hi - lo, 2);  // load <= 1/4: short probe runs, few mispredicted branches
      const uint32_t ep = mine.next_table(cap);
      KeyCounter counter{mine.table.data(), cap - 1, ep, chist.data(), &big_slots};
      for (int64_t i = lo; i < hi; ++i) {
        if (i + kPrefetch < hi) __builtin_prefetch(&counter.table[grouped[i + kPrefetch] & counter.capmask], 1, 3);
        counter.add(grouped[i]);
      }
      counter.finish(local_big);
    }
#pragma omp critical
    {
      for (uint32_t c = 1; c < kBig; ++c) count_hist[c] += chist[c];
      big_counts.insert(big_counts.end(), local_big.begin(), local_big.end());
    }
  }
  return {total, distinct_of(count_hist, big_counts), top_counts(big_counts, count_hist, max_k)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(calibprune_cpp, m) {
  m.def("ngram_hashes(Tensor ids, Tensor? mask, int n, bool exact) -> (Tensor, Tensor)", &ngram_hashes_cpu);
  m.def("ngram_stats(Tensor ids, Tensor? mask, int n, bool exact, int max_k) -> (int, int, Tensor)",
        &ngram_stats_cpu);
}
