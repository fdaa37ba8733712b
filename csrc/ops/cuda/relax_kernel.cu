// CUDA kernel of toreq.relax, with the semantics of cpu/relax_kernel.cpp: the couplings and the
// output nudge are the shared compute_preactivation (cuBLAS GEMMs through ATen, into reused
// buffers), and each layer's activation, damping, masked write and per-sample convergence
// test are one fused kernel. The per-sample bookkeeping (active mask, steps, residual,
// non-finite flags) stays on the device, so the step loop does not wait for the GPU: the host
// reads it back once every kCheckEvery steps.
//
// Only float32 and float64 are dispatched: make_relax_problem rejects every other dtype.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: the same
// getCurrentCUDAStream without the cuBLAS/cuSPARSE/cuSOLVER headers this file does not need.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ops/relax.h"

namespace toreq {
namespace {

// The host learns which samples converged, and whether a state became NaN or Inf, once every
// kCheckEvery steps (one device-to-host copy, the only synchronisation of the loop). Running
// up to kCheckEvery - 1 steps past the point where every sample converged changes no result:
// those steps are fully masked (converged rows are neither written nor counted, so states,
// steps and residual stay as they were); they only cost their GEMMs. A non-finite state is
// reported with the step and row count of the first step it appeared at, as on the CPU.
constexpr int64_t kCheckEvery = 8;

constexpr int kWarp = 32;
constexpr int kMaxRowThreads = 256;
// Grid-stride loops: beyond this many blocks, blocks take several rows (or elements) each.
constexpr int64_t kMaxBlocks = 4096;

// The CPU kernel's max: a NaN never replaces the running maximum (NaN compares false), so a
// row's change stays a number; the NaN itself is reported through the non-finite flag.
template <typename T>
__device__ __forceinline__ T max_keep(T running, T candidate) {
  return candidate > running ? candidate : running;
}

__device__ __forceinline__ float abs_value(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_value(double v) { return fabs(v); }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v = max_keep(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  return v;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// One layer of one step: s <- damping * s + (1 - damping) * act(pre) on the active rows;
// row_change[r] becomes max(row_change[r], max_j |change|) and row_nonfinite[r] is set where a
// new state is NaN or Inf. One block owns a row at a time (grid-stride over rows), so the
// row's maximum is a block reduction and a plain write, with no atomics, and the layers of a
// step, launched one after another on one stream, fold into row_change in order.
// blockDim.x is a multiple of kWarp, at most kMaxRowThreads.
template <typename scalar_t, Activation A>
__global__ void update_layer_kernel(scalar_t* __restrict__ s, const scalar_t* __restrict__ pre,
                                    int64_t batch, int64_t n, scalar_t damping,
                                    const uint8_t* __restrict__ active,
                                    scalar_t* __restrict__ row_change,
                                    uint8_t* __restrict__ row_nonfinite) {
  __shared__ scalar_t warp_partial[kMaxRowThreads / kWarp];
  const scalar_t keep = scalar_t(1) - damping;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t r = blockIdx.x; r < batch; r += gridDim.x) {
    if (!active[r]) continue;  // the same for the whole block, so no barrier is skipped unevenly
    scalar_t* sr = s + r * n;
    const scalar_t* pr = pre + r * n;
    scalar_t change = 0;
    bool nonfinite = false;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const scalar_t old = sr[j];
      const scalar_t next = damping * old + keep * activate<A>(pr[j]);
      change = max_keep(change, abs_value(next - old));
      nonfinite |= !isfinite(next);
      sr[j] = next;
    }
    change = warp_max(change);
    if (lane == 0) warp_partial[warp] = change;
    // One barrier both publishes the warps' maxima and ORs the non-finite flags.
    nonfinite = __syncthreads_or(nonfinite);
    if (warp == 0) {
      change = lane < static_cast<int>(blockDim.x / kWarp) ? warp_partial[lane] : scalar_t(0);
      change = warp_max(change);
      if (lane == 0) {
        row_change[r] = max_keep(row_change[r], change);
        if (nonfinite) row_nonfinite[r] = 1;
      }
    }
    __syncthreads();  // warp 0 has read warp_partial before the next row overwrites it
  }
}

// The end of a step, for every active row: its residual and step count become this step's,
// it leaves the active set when its change is below tol, and row_change is cleared for the
// next step. counts[0] += rows still active, counts[1] += active rows holding a NaN or Inf
// (this step's slot of the window read back by the host). blockDim.x is a multiple of kWarp.
template <typename scalar_t>
__global__ void finish_step_kernel(uint8_t* __restrict__ active, scalar_t* __restrict__ row_change,
                                   const uint8_t* __restrict__ row_nonfinite,
                                   int64_t* __restrict__ steps, scalar_t* __restrict__ residual,
                                   int64_t batch, int64_t step, scalar_t tol,
                                   unsigned long long* __restrict__ counts) {
  unsigned long long still_active = 0, nonfinite = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < batch;
       r += stride) {
    if (!active[r]) continue;
    const scalar_t change = row_change[r];
    row_change[r] = 0;
    residual[r] = change;
    steps[r] = step;
    nonfinite += row_nonfinite[r];
    if (change < tol) {
      active[r] = 0;
    } else {
      ++still_active;
    }
  }
  // Every thread reaches here (no early exit above), so full-warp shuffles are safe; one
  // atomic per warp instead of one per row.
  still_active = warp_sum(still_active);
  nonfinite = warp_sum(nonfinite);
  if (threadIdx.x % kWarp == 0) {
    if (still_active != 0) atomicAdd(&counts[0], still_active);
    if (nonfinite != 0) atomicAdd(&counts[1], nonfinite);
  }
}

int row_threads(int64_t n) {
  // Enough whole warps to cover a row in one pass, at most kMaxRowThreads: a 10-unit layer
  // gets one warp per row rather than 256 mostly idle threads.
  const int64_t warps = std::max<int64_t>(1, (n + kWarp - 1) / kWarp);
  return static_cast<int>(std::min<int64_t>(warps * kWarp, kMaxRowThreads));
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_cuda(
    at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
    at::TensorList weights, at::IntArrayRef targets, at::IntArrayRef sources,
    const c10::List<bool>& transposed, c10::string_view activation, double damping,
    int64_t max_steps, double tol, c10::string_view schedule, double beta, c10::string_view loss,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& readout_weight,
    const std::optional<at::Tensor>& readout_bias) {
  // Host-only checks first: they reject mixed devices with a clear message, after which every
  // tensor is on states[0]'s device, a CUDA one since the dispatcher chose this kernel.
  const RelaxProblem p = make_relax_problem(states, drives, weights, targets, sources, transposed,
                                            activation, damping, max_steps, tol, schedule, beta,
                                            loss, target, readout_weight, readout_bias);
  TORCH_INTERNAL_ASSERT(states[0].is_cuda());
  // The ATen calls (clones, GEMMs, softmax) and our launches all use the current device's
  // current stream: make the inputs' device current so that both are the right ones.
  const c10::cuda::CUDAGuard guard(states[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t batch = p.batch;
  std::vector<at::Tensor> s, pre;
  for (const at::Tensor& init : states) {
    s.push_back(init.clone(at::MemoryFormat::Contiguous));
    pre.push_back(at::empty_like(s.back(), at::MemoryFormat::Contiguous));
  }
  const auto options = s[0].options();
  at::Tensor steps = at::zeros({batch}, options.dtype(at::kLong));
  at::Tensor residual = at::full({batch}, std::numeric_limits<double>::infinity(), options);
  if (batch == 0 || p.max_steps == 0) return {s, steps, residual};  // no step runs, as on the CPU

  at::Tensor active = at::ones({batch}, options.dtype(at::kByte));
  at::Tensor row_nonfinite = at::zeros({batch}, options.dtype(at::kByte));
  at::Tensor row_change = at::zeros({batch}, options);
  // counts[j] = (rows still active after, active rows non-finite at) step j of the window.
  at::Tensor counts = at::empty({kCheckEvery, 2}, options.dtype(at::kLong));

  const int64_t row_blocks = std::min<int64_t>(batch, kMaxBlocks);
  constexpr int kFinishThreads = 256;
  const int64_t finish_blocks =
      std::min<int64_t>((batch + kFinishThreads - 1) / kFinishThreads, kMaxBlocks);

  AT_DISPATCH_FLOATING_TYPES(s[0].scalar_type(), "toreq_relax_cuda", [&] {
    dispatch_activation(p.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      const auto damping_s = static_cast<scalar_t>(p.damping);
      const auto tol_s = static_cast<scalar_t>(p.tol);
      uint8_t* active_ptr = active.data_ptr<uint8_t>();
      uint8_t* nonfinite_ptr = row_nonfinite.data_ptr<uint8_t>();
      scalar_t* change_ptr = row_change.data_ptr<scalar_t>();
      int64_t* steps_ptr = steps.data_ptr<int64_t>();
      scalar_t* residual_ptr = residual.data_ptr<scalar_t>();
      auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());

      int64_t step = 0;
      while (step < p.max_steps) {
        const int64_t window = std::min(kCheckEvery, p.max_steps - step);
        const int64_t first_step = step + 1;
        counts.zero_();  // asynchronous, on the current stream like everything else
        for (int64_t j = 0; j < window; ++j) {
          ++step;
          for (const std::vector<int64_t>& group : p.groups) {
            for (int64_t l : group) compute_preactivation(p, l, s, pre[l]);
            for (int64_t l : group) {
              const int64_t n = s[l].size(1);
              if (n == 0) continue;  // nothing to update, and row_change is unaffected
              update_layer_kernel<scalar_t, A><<<row_blocks, row_threads(n), 0, stream>>>(
                  s[l].data_ptr<scalar_t>(), pre[l].const_data_ptr<scalar_t>(), batch, n,
                  damping_s, active_ptr, change_ptr, nonfinite_ptr);
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          }
          finish_step_kernel<scalar_t><<<finish_blocks, kFinishThreads, 0, stream>>>(
              active_ptr, change_ptr, nonfinite_ptr, steps_ptr, residual_ptr, batch, step, tol_s,
              counts_ptr + 2 * j);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // The one synchronisation per window: a blocking copy on the current stream.
        const at::Tensor host = counts.to(at::kCPU);
        const int64_t* h = host.const_data_ptr<int64_t>();
        bool all_converged = false;
        for (int64_t j = 0; j < window && !all_converged; ++j) {
          // The CPU kernel raises at the first step with a non-finite active row, before
          // retiring converged rows; the later steps of the window do not matter then.
          if (h[2 * j + 1] > 0) report_nonfinite_state(p, states, first_step + j, h[2 * j + 1]);
          all_converged = h[2 * j] == 0;
        }
        if (all_converged) break;
      }
    });
  });
  return {s, steps, residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, CUDA, m) { m.impl("relax", &relax_cuda); }

}  // namespace toreq
