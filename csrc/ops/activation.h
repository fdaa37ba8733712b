// Activation functions shared by every op and backend. Kernels are templated on the
// activation so that the choice is made once per call, not once per element.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace toreq {

// SteepSigmoid is sigmoid(4 (x - 1/2)): the hard sigmoid's smooth counterpart (the same value
// and slope at 1/2), the activation of Ernoult et al. 2019 and Laborieux et al. 2021.
enum class Activation { Identity, HardSigmoid, Tanh, Sigmoid, SteepSigmoid };

// Parses "identity", "hard_sigmoid", "tanh", "sigmoid" or "steep_sigmoid"; anything else is an
// error that names the op and the argument.
Activation parse_activation(c10::string_view name, const char* op, const char* argument,
                            bool allow_identity);

// --- exp, tanh and sigmoid --------------------------------------------------------------
// On the device, CUDA's own functions. On the host, exp written out (no libm call), so that
// the CPU kernels' element loops vectorise: libm's scalar tanhf costs about 15 ns an element,
// more than a step's GEMM at hidden 128. The transcendental is the one part of the element
// code whose implementation differs by device (as it would with libm against CUDA's library
// anyway). Both are within one unit in the last place of 1 in absolute terms (the host's tanh
// near 0 is accurate in absolute, not relative, terms: the states it feeds are activities).
// These and the activations below are force-inlined: left to GCC's heuristics, a grown
// translation unit (the relax kernel's) went over its inlining budget and called tanh once per
// element from the vector loops, which halved the speed of a tanh network's relaxation.
namespace host_math {

template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  using Bits = uint32_t;  // unsigned: the bit arithmetic wraps instead of overflowing
  static constexpr float kLog2e = 0x1.715476p+0f;
  static constexpr float kLn2Hi = 0x1.63p-1f;             // ln 2 to 9 bits: n * kLn2Hi is exact
  static constexpr float kLn2Lo = -2.12194440054690583e-4f;  // ln 2 - kLn2Hi
  static constexpr float kRound = 0x1.8p+23f;  // adding it rounds to an integer in the low bits
  static constexpr float kMin = -87.0f, kMax = 88.0f;  // 2^n stays a normal float
  static constexpr int kMantissa = 23, kBias = 127, kDegree = 7;
};
template <>
struct ExpConstants<double> {
  using Bits = uint64_t;
  static constexpr double kLog2e = 0x1.71547652b82fep+0;
  static constexpr double kLn2Hi = 0x1.62e42fee00000p-1;  // ln 2 to 32 bits
  static constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;  // ln 2 - kLn2Hi
  static constexpr double kRound = 0x1.8p+52;
  static constexpr double kMin = -708.0, kMax = 709.0;
  static constexpr int kMantissa = 52, kBias = 1023, kDegree = 13;
};

template <typename To, typename From>
C10_ALWAYS_INLINE To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its Taylor polynomial
// (truncation below 1e-8 relative in float, 1e-17 in double). NaN stays NaN. Below kMin the
// result is 0 (libm's would be subnormal, less than 2^-125 or 2^-1021 away): so that
// sigmoid(-inf) is 0, as torch's, and not e^kMin.
template <typename T>
C10_ALWAYS_INLINE T exp(T x) {
  using C = ExpConstants<T>;
  using Bits = typename C::Bits;
  const bool underflows = x < C::kMin;
  x = underflows ? C::kMin : (x > C::kMax ? C::kMax : x);
  const T shifted = x * C::kLog2e + C::kRound;
  const T n = shifted - C::kRound;
  const T r = (x - n * C::kLn2Hi) - n * C::kLn2Lo;
  // Horner: 1 + r (1 + r/2 (1 + r/3 (...))); 1/k is folded into a constant.
  T sum = T(1);
  for (int k = C::kDegree; k >= 1; --k) sum = T(1) + sum * (r * (T(1) / T(k)));
  // 2^n from n's integer, read from the low bits of `shifted` (no float-to-int conversion).
  const Bits integer = bit_cast<Bits>(shifted) - bit_cast<Bits>(C::kRound);
  const T scale = bit_cast<T>(static_cast<Bits>((integer + C::kBias) << C::kMantissa));
  return underflows ? T(0) : sum * scale;
}

// tanh(|x|) = (1 - e) / (1 + e) with e = e^(-2|x|) in (0, 1], the sign restored.
template <typename T>
C10_ALWAYS_INLINE T tanh(T x) {
  const T magnitude = x < T(0) ? -x : x;
  const T e = exp(T(-2) * magnitude);
  const T t = (T(1) - e) / (T(1) + e);
  return x < T(0) ? -t : t;
}

// sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) otherwise, with e = e^(-|x|).
template <typename T>
C10_ALWAYS_INLINE T sigmoid(T x) {
  const T e = exp(x < T(0) ? x : -x);
  return (x < T(0) ? e : T(1)) / (T(1) + e);
}

}  // namespace host_math

C10_ALWAYS_INLINE C10_HOST_DEVICE float activation_tanh(float v) {
#ifdef __CUDA_ARCH__
  return ::tanhf(v);
#else
  return host_math::tanh(v);
#endif
}
C10_ALWAYS_INLINE C10_HOST_DEVICE double activation_tanh(double v) {
#ifdef __CUDA_ARCH__
  return ::tanh(v);
#else
  return host_math::tanh(v);
#endif
}
C10_ALWAYS_INLINE C10_HOST_DEVICE float activation_sigmoid(float v) {
#ifdef __CUDA_ARCH__
  return 1.0f / (1.0f + ::expf(-v));
#else
  return host_math::sigmoid(v);
#endif
}
C10_ALWAYS_INLINE C10_HOST_DEVICE double activation_sigmoid(double v) {
#ifdef __CUDA_ARCH__
  return 1.0 / (1.0 + ::exp(-v));
#else
  return host_math::sigmoid(v);
#endif
}

template <Activation A, typename T>
C10_ALWAYS_INLINE C10_HOST_DEVICE T activate(T v) {
  if constexpr (A == Activation::HardSigmoid) {
    return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
  } else if constexpr (A == Activation::Tanh) {
    return activation_tanh(v);
  } else if constexpr (A == Activation::Sigmoid) {
    return activation_sigmoid(v);
  } else if constexpr (A == Activation::SteepSigmoid) {
    return activation_sigmoid(T(4) * (v - T(0.5)));
  } else {
    return v;
  }
}

// Calls f(std::integral_constant<Activation, a>{}) so that f can instantiate a kernel for a
// (host code: it picks the kernel; activate<A> is what runs on the device).
template <typename F>
decltype(auto) dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::HardSigmoid:
      return f(std::integral_constant<Activation, Activation::HardSigmoid>{});
    case Activation::Tanh:
      return f(std::integral_constant<Activation, Activation::Tanh>{});
    case Activation::Sigmoid:
      return f(std::integral_constant<Activation, Activation::Sigmoid>{});
    case Activation::SteepSigmoid:
      return f(std::integral_constant<Activation, Activation::SteepSigmoid>{});
    default:
      return f(std::integral_constant<Activation, Activation::Identity>{});
  }
}

}  // namespace toreq
