// Loops for the relax kernel's couplings of one sample or with a narrow side (coupling_loops.h).
// The weight is read in its stored layout: "dot" when output j's weights are contiguous (a
// transposed view of an (n_out, n_in) weight), "axpy" when input i's are. Several rows are
// computed together so that each weight element loaded serves all of them, and the sums run in
// independent accumulators so that the compiler vectorises without reordering a sum.
#include "ops/cpu/coupling_loops.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "ops/cpu/parallel_rows.h"  // TOREQ_VECTOR_CLONES, TOREQ_ALWAYS_INLINE

namespace toreq {
namespace {

constexpr int64_t kRowBlock = 4;   // rows computed together
constexpr int64_t kDotLanes = 32;  // accumulators of one dot product
constexpr int64_t kAxpyLanes = 32; // outputs kept in registers per row

// out[b, j] = init[b, j] + sum_i s[b, i] * w[j * ld + i], for S rows and j in [begin, end).
template <int S, typename T>
TOREQ_ALWAYS_INLINE void dot_block(T* out, const T* init, int64_t init_ld, const T* w,
                                   int64_t ld, const T* s, int64_t n_in, int64_t n_out,
                                   int64_t begin, int64_t end) {
  const int64_t full = n_in - n_in % kDotLanes;
  for (int64_t j = begin; j < end; ++j) {
    const T* row = w + j * ld;
    T acc[S][kDotLanes] = {};
    for (int64_t i = 0; i < full; i += kDotLanes) {
      for (int b = 0; b < S; ++b) {
        for (int64_t k = 0; k < kDotLanes; ++k) acc[b][k] += s[b * n_in + i + k] * row[i + k];
      }
    }
    for (int b = 0; b < S; ++b) {
      for (int64_t i = full; i < n_in; ++i) acc[b][0] += s[b * n_in + i] * row[i];
      T total = 0;
      for (int64_t k = 0; k < kDotLanes; ++k) total += acc[b][k];
      out[b * n_out + j] = (init ? init[b * init_ld + j] : T(0)) + total;
    }
  }
}

// out[b, j] = init[b, j] + sum_i s[b, i] * w[i * ld + j], for S rows and j in [j0, j0 + J).
template <int S, int J, typename T>
TOREQ_ALWAYS_INLINE void axpy_block(T* out, const T* init, int64_t init_ld, const T* w,
                                    int64_t ld, const T* s, int64_t n_in, int64_t n_out,
                                    int64_t j0) {
  T acc[S][J];
  for (int b = 0; b < S; ++b) {
    for (int k = 0; k < J; ++k) acc[b][k] = init ? init[b * init_ld + j0 + k] : T(0);
  }
  for (int64_t i = 0; i < n_in; ++i) {
    const T* row = w + i * ld + j0;
    for (int b = 0; b < S; ++b) {
      const T a = s[b * n_in + i];
      for (int k = 0; k < J; ++k) acc[b][k] += a * row[k];
    }
  }
  for (int b = 0; b < S; ++b) {
    for (int k = 0; k < J; ++k) out[b * n_out + j0 + k] = acc[b][k];
  }
}

// The same for S rows, in chunks of kAxpyLanes outputs kept in registers while the n_in
// inputs are summed (n_in is narrow where S > 1).
template <int S, typename T>
TOREQ_ALWAYS_INLINE void axpy_span(T* out, const T* init, int64_t init_ld, const T* w,
                                   int64_t ld, const T* s, int64_t n_in, int64_t n_out,
                                   int64_t begin, int64_t end) {
  int64_t j = begin;
  for (; j + kAxpyLanes <= end; j += kAxpyLanes) {
    axpy_block<S, kAxpyLanes>(out, init, init_ld, w, ld, s, n_in, n_out, j);
  }
  for (; j < end; ++j) axpy_block<S, 1>(out, init, init_ld, w, ld, s, n_in, n_out, j);
}

// One row: the weight streamed row by row into the outputs, which stay in L1 (out already holds
// init). Chunks of outputs in registers (axpy_span) would read a wide weight (256 x 256) by
// columns: the three-hidden-layer MLP's free phase at batch 1 was about 30% slower so.
template <typename T>
TOREQ_ALWAYS_INLINE void axpy_stream(T* out, const T* w, int64_t ld, const T* s, int64_t n_in,
                                     int64_t begin, int64_t end) {
  for (int64_t i = 0; i < n_in; ++i) {
    const T a = s[i];
    const T* row = w + i * ld;
    for (int64_t j = begin; j < end; ++j) out[j] += a * row[j];
  }
}

// Blocks of kRowBlock rows, in a function of their own: inlined into one function with the
// single-row loops below, those ran up to 25% slower (512 x 512, GCC 12).
template <typename T>
TOREQ_ALWAYS_INLINE void row_blocks(bool dot, T* out, const T* init, int64_t init_ld, const T* w,
                                    int64_t ld, const T* s, int64_t blocks, int64_t n_in,
                                    int64_t n_out) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r = b * kRowBlock;
    const T* row_init = init ? init + r * init_ld : nullptr;
    if (dot) {
      dot_block<kRowBlock>(out + r * n_out, row_init, init_ld, w, ld, s + r * n_in, n_in, n_out,
                           0, n_out);
    } else {
      axpy_span<kRowBlock>(out + r * n_out, row_init, init_ld, w, ld, s + r * n_in, n_in, n_out,
                           0, n_out);
    }
  }
}

TOREQ_VECTOR_CLONES void row_blocks_vec(bool dot, float* out, const float* init, int64_t init_ld,
                                        const float* w, int64_t ld, const float* s,
                                        int64_t blocks, int64_t n_in, int64_t n_out) {
  row_blocks(dot, out, init, init_ld, w, ld, s, blocks, n_in, n_out);
}
TOREQ_VECTOR_CLONES void row_blocks_vec(bool dot, double* out, const double* init,
                                        int64_t init_ld, const double* w, int64_t ld,
                                        const double* s, int64_t blocks, int64_t n_in,
                                        int64_t n_out) {
  row_blocks(dot, out, init, init_ld, w, ld, s, blocks, n_in, n_out);
}
TOREQ_VECTOR_CLONES void dot_row_vec(float* out, const float* init, const float* w, int64_t ld,
                                     const float* s, int64_t n_in, int64_t begin, int64_t end) {
  dot_block<1>(out, init, 0, w, ld, s, n_in, 0, begin, end);
}
TOREQ_VECTOR_CLONES void dot_row_vec(double* out, const double* init, const double* w,
                                     int64_t ld, const double* s, int64_t n_in, int64_t begin,
                                     int64_t end) {
  dot_block<1>(out, init, 0, w, ld, s, n_in, 0, begin, end);
}
TOREQ_VECTOR_CLONES void axpy_row_vec(float* out, const float* w, int64_t ld, const float* s,
                                      int64_t n_in, int64_t begin, int64_t end) {
  axpy_stream(out, w, ld, s, n_in, begin, end);
}
TOREQ_VECTOR_CLONES void axpy_row_vec(double* out, const double* w, int64_t ld, const double* s,
                                      int64_t n_in, int64_t begin, int64_t end) {
  axpy_stream(out, w, ld, s, n_in, begin, end);
}

// Rows [r0, r1) one by one, outputs [begin, end).
template <typename T>
void single_rows(bool dot, T* out, const T* init, int64_t init_ld, const T* w, int64_t ld,
                 const T* s, int64_t r0, int64_t r1, int64_t n_in, int64_t n_out, int64_t begin,
                 int64_t end) {
  for (int64_t r = r0; r < r1; ++r) {
    T* row_out = out + r * n_out;
    const T* row_init = init ? init + r * init_ld : nullptr;
    if (dot) {
      dot_row_vec(row_out, row_init, w, ld, s + r * n_in, n_in, begin, end);
      continue;
    }
    if (row_init != row_out) {
      for (int64_t j = begin; j < end; ++j) row_out[j] = row_init ? row_init[j] : T(0);
    }
    axpy_row_vec(row_out, w, ld, s + r * n_in, n_in, begin, end);
  }
}

}  // namespace

bool uses_coupling_loops(const at::Tensor& matrix, int64_t rows) {
  if (matrix.scalar_type() != at::kFloat && matrix.scalar_type() != at::kDouble) return false;
  const bool dot = matrix.stride(0) == 1, axpy = matrix.stride(1) == 1;
  if (rows == 1) return dot || axpy;
  return (dot && matrix.size(1) <= kNarrowUnits) || (axpy && matrix.size(0) <= kNarrowUnits);
}

template <typename scalar_t>
void coupling_loops(const at::Tensor& matrix, const scalar_t* s, int64_t rows, scalar_t* out,
                    const scalar_t* init, int64_t init_ld) {
  const int64_t n_in = matrix.size(0), n_out = matrix.size(1);
  const scalar_t* w = matrix.const_data_ptr<scalar_t>();
  const bool dot = matrix.stride(0) == 1;
  const int64_t ld = dot ? matrix.stride(1) : matrix.stride(0);
  if (rows == 1) {
    // Chunks of at least 1M multiply-adds: up to hidden 1024 a second thread gained nothing
    // here (the loop is bound by reading the weight), and waiting for it made steps slower
    // whenever another process held a core.
    const int64_t grain = std::max<int64_t>(kDotLanes, (1 << 20) / std::max<int64_t>(1, n_in));
    at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
      single_rows(dot, out, init, init_ld, w, ld, s, 0, 1, n_in, n_out, begin, end);
    });
    return;
  }
  // Blocks of rows, at least 128K multiply-adds per chunk: below that the threads' start-up
  // costs more than they save.
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t block_work = kRowBlock * std::max<int64_t>(1, n_in * n_out);
  const int64_t grain = std::max<int64_t>(1, ((1 << 17) + block_work - 1) / block_work);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t whole = std::min(end, rows / kRowBlock);  // blocks of kRowBlock rows
    const int64_t r0 = begin * kRowBlock;
    if (whole > begin) {
      row_blocks_vec(dot, out + r0 * n_out, init ? init + r0 * init_ld : nullptr, init_ld, w, ld,
                     s + r0 * n_in, whole - begin, n_in, n_out);
    }
    single_rows(dot, out, init, init_ld, w, ld, s, std::max(begin, whole) * kRowBlock,
                std::min(rows, end * kRowBlock), n_in, n_out, 0, n_out);
  });
}

template void coupling_loops<float>(const at::Tensor&, const float*, int64_t, float*,
                                    const float*, int64_t);
template void coupling_loops<double>(const at::Tensor&, const double*, int64_t, double*,
                                     const double*, int64_t);

}  // namespace toreq
