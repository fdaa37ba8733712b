// Row-parallel loops for the CPU kernels: small problems stay on the calling thread, where
// at::parallel_for's start-up would cost more than the work.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

namespace toreq {

// Calls body(row) for every row in [0, rows), in parallel chunks of about 32K elements.
template <typename Body>
void parallel_rows(int64_t rows, int64_t row_length, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) body(r);
  });
}

}  // namespace toreq
