// Activation functions shared by every op and backend. Kernels are templated on the
// activation so that the choice is made once per call, not once per element.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <type_traits>

namespace toreq {

enum class Activation { Identity, HardSigmoid, Tanh, Sigmoid };

// Parses "identity", "hard_sigmoid", "tanh" or "sigmoid"; anything else is an error that
// names the op and the argument.
Activation parse_activation(c10::string_view name, const char* op, const char* argument,
                            bool allow_identity);

inline C10_HOST_DEVICE float activation_tanh(float v) { return ::tanhf(v); }
inline C10_HOST_DEVICE double activation_tanh(double v) { return ::tanh(v); }
inline C10_HOST_DEVICE float activation_exp(float v) { return ::expf(v); }
inline C10_HOST_DEVICE double activation_exp(double v) { return ::exp(v); }

template <Activation A, typename T>
inline C10_HOST_DEVICE T activate(T v) {
  if constexpr (A == Activation::HardSigmoid) {
    return v < T(0) ? T(0) : (v > T(1) ? T(1) : v);
  } else if constexpr (A == Activation::Tanh) {
    return activation_tanh(v);
  } else if constexpr (A == Activation::Sigmoid) {
    return T(1) / (T(1) + activation_exp(-v));
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
    default:
      return f(std::integral_constant<Activation, Activation::Identity>{});
  }
}

}  // namespace toreq
