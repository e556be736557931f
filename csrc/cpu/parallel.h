#pragma once
// How the C++ CPU kernels cut work into blocks and hand it to torch's threads.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace vqkernels::cpu {

inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

inline int64_t round_up(int64_t x, int64_t m) { return ceil_div(x, m) * m; }

// Rows per block: a multiple of min_block, at most max_block, fewer when
// `units` independent problems would otherwise leave threads without a block.
inline int64_t block_rows(int64_t rows, int64_t units, int64_t min_block, int64_t max_block) {
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t per_unit = ceil_div(threads, std::max<int64_t>(units, 1));
  return std::clamp(round_up(ceil_div(rows, per_unit), min_block), min_block, max_block);
}

// Runs worker(next) once on each of torch's parallel_for threads; next() hands
// out the tasks [0, n), each once, in order as threads free up (-1: none
// left), so a thread slowed down (two threads on one core) takes fewer.
template <typename Worker>
void share_tasks(int64_t n, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  const auto next = [&] {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < n ? t : int64_t{-1};
  };
  const int64_t threads = std::min<int64_t>(n, torch::stable::get_num_threads());
  torch::stable::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(next); });
}

}  // namespace vqkernels::cpu
