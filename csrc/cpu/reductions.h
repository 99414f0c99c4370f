#pragma once
// What the CPU loss kernels (loss.cpp, cross_entropy.cpp) share: deterministic sums in double,
// and the tensors around them. A reduction cuts its items into fixed-size chunks (the cut depends
// on the shape only), each chunk is summed in index order by one task, and the chunk partials are
// added in chunk order: the result is bitwise the same with any number of threads, run after run.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/isa.h"

#include "common/dispatch.h"

namespace pyengine {
namespace cpu {

// Elements per partial sum. A multiple of 8, so lane_sum's lanes sit at the same offsets in every
// chunk; a 1M-element loss gives 256 partials, grouped kElementwiseGrain / kSumChunk per task.
constexpr int64_t kSumChunk = 4096;

// Sums into K accumulators over [0, n): f(begin, end, acc) adds the chunk [begin, end) into acc.
// Chunks of `chunk` items; `grain` chunks at least per parallel task.
template <int K, typename F>
inline std::array<double, K> deterministic_sum(int64_t n, int64_t chunk, int64_t grain, F f) {
  std::array<double, K> total{};
  if (n <= 0) return total;
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (chunks == 1) {
    f(int64_t(0), n, total);
    return total;
  }
  std::vector<std::array<double, K>> partial(chunks);
  at::parallel_for(0, chunks, std::max<int64_t>(1, grain), [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      std::array<double, K> acc{};
      f(c * chunk, std::min(n, (c + 1) * chunk), acc);
      partial[c] = acc;
    }
  });
  for (const auto& p : partial)
    for (int k = 0; k < K; ++k) total[k] += p[k];
  return total;
}

// sum of term(i) over [begin, end) in double, in 8 interleaved lanes (fixed layout, so a fixed
// order of additions) that the compiler can keep in SIMD registers.
template <typename F>
inline double lane_sum(int64_t begin, int64_t end, F term) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8)
    PE_LANES for (int j = 0; j < 8; ++j) lane[j] += static_cast<double>(term(i + j));
  for (; i < end; ++i) lane[0] += static_cast<double>(term(i));
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// The optional weight argument, or null when it is absent.
inline const at::Tensor* weight_or_null(const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? &*weight : nullptr;
}

// A 0-d tensor holding `value`.
inline at::Tensor scalar_like(double value, const at::Tensor& like) {
  at::Tensor out = at::empty({}, like.options());
  dispatch_floating(like.scalar_type(), "loss", [&](auto tag) {
    using scalar_t = decltype(tag);
    *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(value);
  });
  return out;
}

}  // namespace cpu
}  // namespace pyengine
