// Row-parallel loops for the CPU kernels: small problems stay on the calling thread, where
// at::parallel_for's start-up would cost more than the work.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>

// TOREQ_VECTOR_CLONES on a function compiles it for AVX-512, AVX2 and the baseline ISA and
// picks one when the library loads (GCC/Clang function multiversioning on x86-64 ELF), so hot
// elementwise loops use the machine's vector width without building for one CPU. Elsewhere it
// is empty and the baseline build is used.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define TOREQ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define TOREQ_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TOREQ_VECTOR_CLONES
#define TOREQ_ALWAYS_INLINE inline
#endif

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
