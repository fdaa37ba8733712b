// CPU kernel of toreq.max_pool2d. ATen's max_pool2d_with_indices walks NCHW planes window by
// window (its general kernel: padding, dilation, ceil mode), which made pooling half of a
// ConvEP training step on the CPU. Here windows have stride = size and no padding, and the
// common 2 x 2 window has a branch-free loop over a row's windows that vectorises. The planes
// are split over the intra-op threads with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "ops/cpu/parallel_rows.h"  // TOREQ_VECTOR_CLONES
#include "ops/pool.h"

namespace toreq {
namespace {

// max_pool2d's rule, window elements visited in row-major order: a larger value, or any NaN,
// takes the window (ties keep the first, and the last NaN wins). Evaluated in full (| rather
// than ||) so that no branch depends on the data.
template <typename acc>
TOREQ_ALWAYS_INLINE bool takes(acc candidate, acc best) {
  return (candidate > best) | (candidate != candidate);
}

// `take ? yes : no` on the bits, without a branch: at the row lengths ConvEP pools (14 and 7
// windows, below one vector) the compiler runs the loop as scalar code, where the selects had
// become branches on random data (a 20 x 16 x 28 x 28 pooling took 381 us with them, 178 with
// these, in a stand-alone build of the loop; at 16 windows, vectorised, 94 and 33).
template <typename T>
TOREQ_ALWAYS_INLINE T pick(bool take, T yes, T no) {
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(T) == sizeof(Bits));
  Bits y, n;
  std::memcpy(&y, &yes, sizeof(T));
  std::memcpy(&n, &no, sizeof(T));
  const Bits mask = Bits(0) - Bits(take);
  const Bits out = (y & mask) | (n & ~mask);
  T result;
  std::memcpy(&result, &out, sizeof(T));
  return result;
}

// Output row `r` of one plane for 2 x 2 windows. The rule applied to the window's two rows and
// then to their two winners picks the element the row-major scan picks (a NaN in the lower
// row is the last NaN; otherwise the upper row's winner stands unless the lower one is
// larger), with no loop-carried state: the loop over columns vectorises.
template <typename scalar_t>
TOREQ_ALWAYS_INLINE void pool_row_2x2(const scalar_t* plane, int64_t width, int64_t r,
                                      scalar_t* out, int64_t* index, int64_t cols) {
  using acc = at::opmath_type<scalar_t>;
  const scalar_t* upper = plane + 2 * r * width;
  const scalar_t* lower = upper + width;
  const int64_t start = 2 * r * width;
  for (int64_t c = 0; c < cols; ++c) {
    const acc a = upper[2 * c], b = upper[2 * c + 1];
    const acc d = lower[2 * c], e = lower[2 * c + 1];
    const bool right_up = takes(b, a), right_down = takes(e, d);
    const acc up = pick(right_up, b, a), down = pick(right_down, e, d);
    const bool below = takes(down, up);
    out[c] = static_cast<scalar_t>(pick(below, down, up));
    index[c] = start + 2 * c +
               pick<int64_t>(below, width + int64_t(right_down), int64_t(right_up));
  }
}

// Output row `r` of one plane, any window size: the window's elements in row-major order.
template <typename scalar_t>
TOREQ_ALWAYS_INLINE void pool_row_any_size(const scalar_t* plane, int64_t width, int64_t size,
                                           int64_t r, scalar_t* out, int64_t* index,
                                           int64_t cols) {
  using acc = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < cols; ++c) {
    int64_t best = r * size * width + c * size;
    acc best_value = -std::numeric_limits<acc>::infinity();
    for (int64_t i = r * size; i < (r + 1) * size; ++i) {
      for (int64_t j = c * size; j < (c + 1) * size; ++j) {
        const acc v = static_cast<acc>(plane[i * width + j]);
        if (takes(v, best_value)) {
          best_value = v;
          best = i * width + j;
        }
      }
    }
    out[c] = static_cast<scalar_t>(best_value);
    index[c] = best;
  }
}

// Planes [begin, end) of the (planes, height, width) input: one call per chunk of planes, so
// that the vector clones below are picked once per chunk rather than once per row.
template <typename scalar_t>
TOREQ_ALWAYS_INLINE void pool_planes_body(const scalar_t* in, int64_t height, int64_t width,
                                          int64_t size, scalar_t* out, int64_t* index,
                                          int64_t rows, int64_t cols, int64_t begin,
                                          int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const scalar_t* plane = in + p * height * width;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = (p * rows + r) * cols;
      if (size == 2) {
        pool_row_2x2(plane, width, r, out + o, index + o, cols);
      } else {
        pool_row_any_size(plane, width, size, r, out + o, index + o, cols);
      }
    }
  }
}

template <typename scalar_t>
void pool_planes(const scalar_t* in, int64_t height, int64_t width, int64_t size, scalar_t* out,
                 int64_t* index, int64_t rows, int64_t cols, int64_t begin, int64_t end) {
  pool_planes_body(in, height, width, size, out, index, rows, cols, begin, end);
}
TOREQ_VECTOR_CLONES void pool_planes(const float* in, int64_t height, int64_t width,
                                     int64_t size, float* out, int64_t* index, int64_t rows,
                                     int64_t cols, int64_t begin, int64_t end) {
  pool_planes_body(in, height, width, size, out, index, rows, cols, begin, end);
}
TOREQ_VECTOR_CLONES void pool_planes(const double* in, int64_t height, int64_t width,
                                     int64_t size, double* out, int64_t* index, int64_t rows,
                                     int64_t cols, int64_t begin, int64_t end) {
  pool_planes_body(in, height, width, size, out, index, rows, cols, begin, end);
}

void max_pool_cpu_kernel(const at::Tensor& input, int64_t size, const at::Tensor& values,
                         const at::Tensor& indices) {
  const int64_t planes = input.size(0) * input.size(1);
  const int64_t height = input.size(2), width = input.size(3);
  const int64_t rows = values.size(2), cols = values.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "toreq_max_pool2d", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = values.data_ptr<scalar_t>();
    int64_t* index = indices.data_ptr<int64_t>();
    // chunks of about 32K input elements: small batches stay on the calling thread
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, height * width));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      pool_planes(in, height, width, size, out, index, rows, cols, begin, end);
    });
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& input, int64_t size) {
  return max_pool2d(input, size, max_pool_cpu_kernel);
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, CPU, m) { m.impl("max_pool2d", &max_pool2d_cpu); }

}  // namespace toreq
