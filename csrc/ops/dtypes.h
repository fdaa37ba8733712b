// The dtypes toreq's ops run in, shared by every op: float32 and float64, and float16 and
// bfloat16 with float32 arithmetic (at::opmath_type) in the elementwise kernels and float32
// accumulation inside the GEMMs (as oneDNN and cuBLAS compute reduced-precision products).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <limits>
#include <utility>

namespace toreq {

inline bool is_supported_dtype(c10::ScalarType dtype) {
  return dtype == c10::kFloat || dtype == c10::kDouble || dtype == c10::kHalf ||
         dtype == c10::kBFloat16;
}

constexpr const char* kSupportedDtypes = "float32, float64, float16 or bfloat16";

// The smallest normal and the largest finite magnitude of a supported dtype.
inline std::pair<double, double> normal_range(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return {std::numeric_limits<float>::min(), std::numeric_limits<float>::max()};
    case c10::kHalf:
      return {static_cast<double>(std::numeric_limits<c10::Half>::min()),
              static_cast<double>(std::numeric_limits<c10::Half>::max())};
    case c10::kBFloat16:
      return {static_cast<double>(std::numeric_limits<c10::BFloat16>::min()),
              static_cast<double>(std::numeric_limits<c10::BFloat16>::max())};
    default:
      return {std::numeric_limits<double>::min(), std::numeric_limits<double>::max()};
  }
}

}  // namespace toreq
