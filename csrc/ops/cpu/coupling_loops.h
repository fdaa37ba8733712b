// The CPU relax kernel's couplings as hand-written loops, for the shapes where a BLAS GEMM call
// costs more than its arithmetic: one sample (a matrix-vector product, which BLAS runs on one
// thread in the weight's layout) and a narrow side, at most kNarrowUnits units, at any batch
// (the 10-unit output layer of a classifier: ATen's addmm took 10.7 us for 20x512 @ 512x10 and
// 38 us at batch 128 on this project's CPU, these loops 4.0 and 18.7; 10x512 the other way 4.7
// and 16.7 against 1.6 and 10.4).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace toreq {

constexpr int64_t kNarrowUnits = 16;

// Whether coupling_loops computes `rows` rows of s @ matrix (matrix: (n_in, n_out), a view of
// a float32 or float64 weight): with one row when the matrix has a unit stride, and at any
// number of rows when its narrow side is the one along which it is not contiguous.
bool uses_coupling_loops(const at::Tensor& matrix, int64_t rows);

// out[r, j] = init[r, j] + sum_i s[r, i] * matrix[i, j] for r < rows (out and s contiguous
// rows of n_out and n_in). init may be out itself (accumulate), a bias or one row
// (init_ld = 0) or nullptr (zero). The rows, or with one row the outputs, are split over the
// intra-op threads when the work is large enough to pay for the split.
template <typename scalar_t>
void coupling_loops(const at::Tensor& matrix, const scalar_t* s, int64_t rows, scalar_t* out,
                    const scalar_t* init, int64_t init_ld);

}  // namespace toreq
