// Max pooling with the argmax (the windows of ConvEP's convolutional layers): its schema and
// input checks live in pool.cpp, the loops in cpu/ and cuda/.
#pragma once

#include <ATen/core/Tensor.h>

namespace toreq {

// Fills values (B, C, H / size, W / size) and indices (int64, same shape) from the
// contiguous input (B, C, H, W): each value is the largest of its size x size window (stride
// size; rows and columns past the last whole window dropped), its index the position
// h * W + w of that element in its (b, c) plane, the first in row-major order on ties and a
// NaN wherever the window holds one (max_pool2d's conventions).
using MaxPoolKernel = void (*)(const at::Tensor& input, int64_t size, const at::Tensor& values,
                               const at::Tensor& indices);

// The checks and the output allocation every backend shares.
std::tuple<at::Tensor, at::Tensor> max_pool2d(const at::Tensor& input, int64_t size,
                                              MaxPoolKernel kernel);

}  // namespace toreq
