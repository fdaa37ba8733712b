#include "ops/activation.h"

#include <c10/util/Exception.h>

namespace toreq {

Activation parse_activation(c10::string_view name, const char* op, const char* argument,
                            bool allow_identity) {
  if (name == "hard_sigmoid") return Activation::HardSigmoid;
  if (name == "tanh") return Activation::Tanh;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "steep_sigmoid") return Activation::SteepSigmoid;
  if (allow_identity && name == "identity") return Activation::Identity;
  TORCH_CHECK(false, op, ": ", argument, " must be one of ",
              allow_identity ? "'identity', " : "",
              "'hard_sigmoid', 'tanh', 'sigmoid' or 'steep_sigmoid', got '",
              std::string(name.data(), name.size()), "'");
}

}  // namespace toreq
