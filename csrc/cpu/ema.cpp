// EMA codebook update, C++ CPU kernels (math in csrc/common/ema.h, spec in
// vqkernels/reference/ema.py).
//
//   counts[k] = #{n : idx[n] = k},  sums[k, :] = sum_{n : idx[n] = k} z[n, :]
// then the per-code EMA finalize of csrc/common/ema.h.
//
// Two parallel passes: (1) per-chunk histograms, summed (exact), after every
// index is checked, so that a bad one throws before anything is written;
// (2) each task owns a block of consecutive codes (and a column slice when one
// code outweighs a block) and streams the whole batch in row order, adding
// its codes' rows. Every element of `sums` is thus a sequential sum in row
// order: the result never depends on the thread count, and `deterministic`
// costs nothing. The update then finalizes each task's codes while in cache.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/ema.h"
#include "cpu/parallel.h"
#include "vqkernels.h"

namespace vqkernels {
namespace {

constexpr int64_t kColumnBlock = 64;               // columns per slice when D is wider
constexpr int64_t kRowsPerCountChunk = 16384;      // rows per histogram chunk
constexpr int64_t kMaxHistogramEntries = 1 << 22;  // chunks x K counters, at most
constexpr int64_t kShortRowBytes = 64;             // rows up to this long: branch-free pass
constexpr int64_t kRowsPerList = 4096;             // long rows: rows listed at a time
constexpr int64_t kPrefetchRows = 8;               // long rows: prefetch distance, in rows
constexpr int64_t kCacheLine = 64;                 // bytes per prefetch

// Per-code row counts of the batch; throws on an index outside [0, k).
template <typename I>
std::vector<int64_t> count_codes(const I* indices, int64_t n, int64_t k) {
  const int64_t chunks = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(torch::stable::get_num_threads()),
                   cpu::ceil_div(n, kRowsPerCountChunk), kMaxHistogramEntries / k}));
  const int64_t rows_per_chunk = cpu::ceil_div(n, chunks);
  std::vector<int64_t> hist(chunks * k, 0);
  std::vector<int64_t> bad_row(chunks, -1);
  torch::stable::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* h = hist.data() + c * k;
      for (int64_t r = c * rows_per_chunk, end = std::min(n, r + rows_per_chunk); r < end; ++r) {
        const I code = indices[r];
        if (!common::is_valid_code(code, k)) {
          bad_row[c] = r;
          break;
        }
        ++h[code];
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    VQK_CHECK(bad_row[c] < 0, "indices must be in [0, ", k, ") (the number of codes), "
              "found ", static_cast<int64_t>(indices[bad_row[c]]), " at row ", bad_row[c]);
  }
  for (int64_t c = 1; c < chunks; ++c) {
    for (int64_t code = 0; code < k; ++code) hist[code] += hist[c * k + code];
  }
  hist.resize(k);
  return hist;
}

// Adds z[r, d0 .. d0 + dc) to out[idx[r] * dim + d0 ..] for every row r, in
// row order, whose code is in [c0, c1) (all codes are valid here). Inlined
// into one copy per instruction set below.
template <typename T, typename I>
VQK_ALWAYS_INLINE void accumulate_rows(const T* __restrict__ z, const I* __restrict__ indices,
                                       int64_t n, int64_t dim, int64_t c0, int64_t c1, int64_t d0,
                                       int64_t dc, float* __restrict__ out) {
  const uint64_t width = static_cast<uint64_t>(c1 - c0);
  const auto mine = [&](int64_t r) { return static_cast<uint64_t>(indices[r] - c0) < width; };
  const auto add_row = [&](int64_t r, float* __restrict__ dst) {
    const T* __restrict__ zr = z + r * dim + d0;
    for (int64_t d = 0; d < dc; ++d) dst[d] += static_cast<float>(zr[d]);
  };
  const int64_t row_bytes = dc * static_cast<int64_t>(sizeof(T));
  if (row_bytes <= kShortRowBytes) {
    // Short rows: a mispredicted branch costs more than the row, so every row
    // is added, the other blocks' rows into a scratch row.
    float trash[kShortRowBytes];
    for (int64_t r = 0; r < n; ++r) add_row(r, mine(r) ? out + indices[r] * dim + d0 : trash);
    return;
  }
  // Long rows: a chunk's rows of this block are listed first, so the one
  // kPrefetchRows ahead is known and fetched in time.
  int32_t rows[kRowsPerList];
  for (int64_t r0 = 0; r0 < n; r0 += kRowsPerList) {
    int64_t m = 0;
    for (int64_t r = r0, end = std::min(n, r0 + kRowsPerList); r < end; ++r) {
      rows[m] = static_cast<int32_t>(r - r0);
      m += mine(r);
    }
    for (int64_t j = 0; j < m; ++j) {
      if (j + kPrefetchRows < m) {
        const T* next = z + (r0 + rows[j + kPrefetchRows]) * dim + d0;
        for (int64_t b = 0; b < row_bytes; b += kCacheLine) {
          __builtin_prefetch(reinterpret_cast<const char*>(next) + b);
        }
      }
      const int64_t r = r0 + rows[j];
      add_row(r, out + indices[r] * dim + d0);
    }
  }
}

#define VQK_DEFINE_ACCUMULATE(NAME, TARGET, VB)                                               \
  template <typename T, typename I>                                                            \
  TARGET void accumulate_rows_##NAME(const T* z, const I* indices, int64_t n, int64_t dim,     \
                                     int64_t c0, int64_t c1, int64_t d0, int64_t dc,           \
                                     float* out) {                                             \
    accumulate_rows(z, indices, n, dim, c0, c1, d0, dc, out);                                  \
  }
VQK_DEFINE_ISA_COPIES(VQK_DEFINE_ACCUMULATE)
#undef VQK_DEFINE_ACCUMULATE

// The widest copy torch's CPU capability allows, but at most AVX2 for rows of
// up to kShortRowBytes, where AVX-512 is slower. Being elementwise, the width
// never changes a sum.
template <typename T, typename I>
auto select_accumulate(int64_t row_bytes) -> decltype(&accumulate_rows_baseline<T, I>) {
  const common::Isa isa = row_bytes > kShortRowBytes
                              ? common::cpu_isa()
                              : std::min(common::cpu_isa(), common::Isa::kAvx2);
#define VQK_ACCUMULATE(NAME) &accumulate_rows_##NAME<T, I>
  return VQK_PICK_ISA(isa, VQK_ACCUMULATE);
#undef VQK_ACCUMULATE
}

// Tasks of pass 2: code blocks [bounds[b], bounds[b + 1]) of about equal work
// (rows + 1 per code), one per thread, times column slices of width `slice`.
struct Tasks {
  std::vector<int64_t> bounds;
  int64_t slice, slices;
  int64_t count() const { return (static_cast<int64_t>(bounds.size()) - 1) * slices; }
};

Tasks plan_tasks(const std::vector<int64_t>& counts, int64_t dim) {
  const int64_t k = static_cast<int64_t>(counts.size());
  int64_t n = 0, heaviest = 0;
  for (const int64_t c : counts) {
    n += c;
    heaviest = std::max(heaviest, c);
  }
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t blocks = std::max<int64_t>(1, std::min(k, threads));
  Tasks t{std::vector<int64_t>(blocks + 1, k), dim, 1};
  t.bounds[0] = 0;
  int64_t work = 0;  // rows + codes before `code`
  for (int64_t code = 0, b = 1; code < k && b < blocks; work += counts[code] + 1, ++code) {
    while (b < blocks && work * blocks >= b * (n + k)) t.bounds[b++] = code;
  }
  // Slicing re-walks the rows (a TLB miss per row and slice): only against imbalance.
  if (dim > kColumnBlock && heaviest * blocks > n + k) {
    t.slice = kColumnBlock;
    t.slices = cpu::ceil_div(dim, kColumnBlock);
  }
  return t;
}

// Runs pass 2: for each task, zeroes its part of `sums`, adds its rows in, then
// calls finish(c0, c1, d0, dc) on it.
template <typename T, typename I, typename Finish>
void sum_by_code(const T* z, const I* indices, int64_t n, int64_t dim, const Tasks& tasks,
                 float* sums, const Finish& finish) {
  const auto accumulate = select_accumulate<T, I>(tasks.slice * static_cast<int64_t>(sizeof(T)));
  torch::stable::parallel_for(0, tasks.count(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tasks.slices, d0 = (t % tasks.slices) * tasks.slice;
      const int64_t dc = std::min(tasks.slice, dim - d0);
      const int64_t c0 = tasks.bounds[b], c1 = tasks.bounds[b + 1];
      for (int64_t code = c0; code < c1; ++code) std::fill_n(sums + code * dim + d0, dc, 0.0f);
      accumulate(z, indices, n, dim, c0, c1, d0, dc, sums);
      finish(c0, c1, d0, dc);
    }
  });
}

template <typename F>
void dispatch_indices(const Tensor& indices, const F& f) {
  if (indices.scalar_type() == ScalarType::Int) {
    f(cdata<int32_t>(indices));
  } else {
    f(cdata<int64_t>(indices));
  }
}

// cluster_size = ema_mix(cluster_size, count(k)) in place; returns the total of
// the debiased sizes, summed in float64 in code order.
template <typename Count>
float update_cluster_sizes(float* cluster_size, int64_t k, const common::EmaParams& p,
                           const Count& count) {
  double total = 0.0;
  for (int64_t code = 0; code < k; ++code) {
    cluster_size[code] = common::ema_mix(cluster_size[code], count(code), p);
    total += common::ema_debiased(cluster_size[code], p);
  }
  return static_cast<float>(total);
}

// embed_sum and codebook columns [d0, d0 + dc) of one code from its statistics.
// Two loops rather than a store under a condition, so both vectorize.
template <typename C>
void finalize_code(float* embed_row, C* codebook_row, const float* stat, int64_t dc,
                   float smoothed, const common::EmaParams& p) {
  if (!common::ema_code_is_updated(smoothed)) {
    for (int64_t d = 0; d < dc; ++d) embed_row[d] = common::ema_mix(embed_row[d], stat[d], p);
    return;
  }
  for (int64_t d = 0; d < dc; ++d) {
    const float e = common::ema_mix(embed_row[d], stat[d], p);
    embed_row[d] = e;
    codebook_row[d] = static_cast<C>(common::ema_code_value(e, smoothed, p));
  }
}

struct EmaState {
  float* cluster_size;
  float* embed_sum;
  int64_t k, dim;
  common::EmaParams params;
  float total;

  float smoothed(int64_t code) const {
    return common::ema_smoothed_size(common::ema_debiased(cluster_size[code], params), total,
                                     params);
  }
};

EmaState make_state(const Tensor& cluster_size, const Tensor& embed_sum, double decay,
                    double eps, bool bias_correction, int64_t step) {
  const int64_t k = cluster_size.numel();
  return {data<float>(cluster_size), data<float>(embed_sum), k,
          embed_sum.size(1), common::make_ema_params(decay, eps, bias_correction, step, k), 0.0f};
}

void check_state(const Tensor& cluster_size, const Tensor& embed_sum, const Tensor& codebook) {
  for (const Tensor* t : {&cluster_size, &embed_sum, &codebook}) {
    VQK_CHECK_DEVICE(*t, DeviceType::CPU);
    VQK_CHECK(t->is_contiguous(), "the EMA state and codebook must be contiguous");
  }
  VQK_CHECK(cluster_size.dim() == 1 && cluster_size.numel() >= 1,
            "cluster_size must be 1-D (K,) with K >= 1");
  const int64_t k = cluster_size.numel();
  VQK_CHECK(embed_sum.dim() == 2 && embed_sum.size(0) == k && same_sizes(codebook, embed_sum),
            "embed_sum and codebook must be (K, D) with K = ", k);
  VQK_CHECK(cluster_size.scalar_type() == ScalarType::Float &&
                embed_sum.scalar_type() == ScalarType::Float,
            "cluster_size and embed_sum must be float32");
}

void check_batch(const Tensor& z, const Tensor& indices, int64_t num_codes) {
  VQK_CHECK_DEVICE(z, DeviceType::CPU);
  VQK_CHECK_DEVICE(indices, DeviceType::CPU);
  VQK_CHECK(num_codes >= 1, "num_codes must be >= 1, got ", num_codes);
  VQK_CHECK(z.dim() == 2 && z.size(1) >= 1, "z must be 2-D (N, D) with D >= 1");
  VQK_CHECK(indices.dim() == 1 && indices.size(0) == z.size(0),
            "indices must be 1-D of length N = ", z.size(0));
  VQK_CHECK(indices.scalar_type() == ScalarType::Long || indices.scalar_type() == ScalarType::Int,
            "indices must be int64 or int32, got ", indices.scalar_type());
}

}  // namespace

std::tuple<Tensor, Tensor> code_counts_and_sums_cpu(const Tensor& z, const Tensor& indices,
                                                    int64_t num_codes,
                                                    bool /*deterministic: always*/) {
  check_batch(z, indices, num_codes);
  const Tensor zc = contiguous(z), ic = contiguous(indices);
  const int64_t n = zc.size(0), dim = zc.size(1);
  Tensor counts = new_empty(zc, {num_codes}, ScalarType::Float);
  Tensor sums = new_empty(zc, {num_codes, dim}, ScalarType::Float);
  dispatch_indices(ic, [&](auto idx) {
    const std::vector<int64_t> code_counts = count_codes(idx, n, num_codes);
    std::copy(code_counts.begin(), code_counts.end(), data<float>(counts));
    const Tasks tasks = plan_tasks(code_counts, dim);
    VQK_DISPATCH_FLOATING(zc.scalar_type(), "code_counts_and_sums", [&] {
      sum_by_code(cdata<scalar_t>(zc), idx, n, dim, tasks, data<float>(sums),
                  [](int64_t, int64_t, int64_t, int64_t) {});
    });
  });
  return {counts, sums};
}

void ema_update_cpu(const Tensor& cluster_size, const Tensor& embed_sum, const Tensor& codebook,
                    const Tensor& z, const Tensor& indices, double decay, double eps,
                    bool bias_correction, int64_t step, bool /*deterministic: always*/) {
  check_state(cluster_size, embed_sum, codebook);
  check_batch(z, indices, cluster_size.numel());
  VQK_CHECK(z.size(1) == embed_sum.size(1), "z must have D = ", embed_sum.size(1), " columns");
  const Tensor zc = contiguous(z), ic = contiguous(indices);
  const int64_t n = zc.size(0);
  EmaState s = make_state(cluster_size, embed_sum, decay, eps, bias_correction, step);
  const std::unique_ptr<float[]> sums(new float[s.k * s.dim]);  // pass 2 zeroes its blocks
  dispatch_indices(ic, [&](auto idx) {
    const std::vector<int64_t> counts = count_codes(idx, n, s.k);  // throws before any write
    s.total = update_cluster_sizes(s.cluster_size, s.k, s.params, [&](int64_t code) {
      return static_cast<float>(counts[code]);
    });
    const Tasks tasks = plan_tasks(counts, s.dim);
    VQK_DISPATCH_FLOATING(zc.scalar_type(), "ema_update_z", [&] {
      using T = scalar_t;
      VQK_DISPATCH_FLOATING(codebook.scalar_type(), "ema_update_codebook", [&] {
        scalar_t* cb = data<scalar_t>(codebook);
        sum_by_code(cdata<T>(zc), idx, n, s.dim, tasks, sums.get(),
                    [&](int64_t c0, int64_t c1, int64_t d0, int64_t dc) {
                      for (int64_t code = c0; code < c1; ++code) {
                        const int64_t at = code * s.dim + d0;
                        finalize_code(s.embed_sum + at, cb + at, sums.get() + at, dc,
                                      s.smoothed(code), s.params);
                      }
                    });
      });
    });
  });
}

void ema_update_from_stats_cpu(const Tensor& cluster_size, const Tensor& embed_sum,
                               const Tensor& codebook, const Tensor& counts, const Tensor& sums,
                               double decay, double eps, bool bias_correction, int64_t step) {
  check_state(cluster_size, embed_sum, codebook);
  VQK_CHECK_DEVICE(counts, DeviceType::CPU);
  VQK_CHECK_DEVICE(sums, DeviceType::CPU);
  VQK_CHECK(counts.numel() == cluster_size.numel() && same_sizes(sums, embed_sum),
            "counts must be (K,) and sums (K, D) like cluster_size and embed_sum");
  VQK_CHECK(counts.scalar_type() == ScalarType::Float && sums.scalar_type() == ScalarType::Float,
            "counts and sums must be float32");
  const Tensor cc = contiguous(counts), sc = contiguous(sums);
  const float* cp = cdata<float>(cc);
  const float* sp = cdata<float>(sc);
  EmaState s = make_state(cluster_size, embed_sum, decay, eps, bias_correction, step);
  s.total = update_cluster_sizes(s.cluster_size, s.k, s.params,
                                 [&](int64_t code) { return cp[code]; });
  VQK_DISPATCH_FLOATING(codebook.scalar_type(), "ema_update_from_stats", [&] {
    scalar_t* cb = data<scalar_t>(codebook);
    const int64_t grain = std::max<int64_t>(1, 16384 / s.dim);
    torch::stable::parallel_for(0, s.k, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t code = k0; code < k1; ++code) {
        const int64_t at = code * s.dim;
        finalize_code(s.embed_sum + at, cb + at, sp + at, s.dim, s.smoothed(code), s.params);
      }
    });
  });
}

}  // namespace vqkernels
