// CUDA kernel of toreq.relax, with the semantics of cpu/relax_kernel.cpp: the couplings are the
// shared compute_preactivation and dloss/ds through a readout or softmax the shared
// output_gradient (cuBLAS GEMMs through ATen, into reused buffers), and each layer's nudge,
// activation, damping, masked write and per-sample convergence test are one fused kernel
// around the element code the CPU kernel runs too (relax_element.h). The per-sample bookkeeping (active mask, steps, residual,
// non-finite flags) stays on the device, so the step loop does not wait for the GPU: the host
// reads it back once every kCheckEvery steps.
//
// Small networks: a step of a narrow network is a handful of tiny launches (one GEMM per
// coupling, the nudge's, one update per layer, a finish kernel), so launch latency, not
// arithmetic, sets its speed. Under masking every launch of a window has the same shapes and
// pointers, so a window of kCheckEvery steps is captured once as a CUDA graph and replayed
// for every later full window (one launch instead of dozens); TOREQ_CUDA_GRAPHS=0 turns
// this off (the eager launches are the reference the GPU check compares against).
//
// Masking, not the CPU kernel's converged-row compaction: compacting needs the host to know
// how many rows are left before it can size the next GEMMs (a synchronisation per step where
// masking has one per window), changes the shapes (so no graph could be replayed), and costs
// gathers and scatters of every state; while a GPU GEMM over a few hundred rows is bound by
// launch latency, not by its row count, so dropping rows would save almost nothing.
//
// float32, float64, float16 and bfloat16 are dispatched; make_relax_problem rejects the rest.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
// c10's stream and guard headers, not ATen/cuda/CUDAContext.h: the same
// getCurrentCUDAStream without the cuBLAS/cuSPARSE/cuSOLVER headers this file does not need
// (ATen/cuda/CUDAGraph.h, for the captured windows, includes only c10's).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>

#include "ops/relax.h"
#include "ops/relax_element.h"

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

// One layer of one step, every element by the shared update_element: the elementwise nudge
// (N, last layer only), act, damping, on the active rows; row_change[r] becomes
// max(row_change[r], max_j |change|) and row_nonfinite[r] is set where a new state is NaN or
// Inf. One block owns a row at a time (grid-stride over rows), so the row's maximum is a block
// reduction and a plain write, with no atomics, and the layers of a step, launched one after
// another on one stream, fold into row_change in order. blockDim.x is a multiple of kWarp, at
// most kMaxRowThreads.
template <typename scalar_t, Activation A, ElementNudge N>
__global__ void update_layer_kernel(scalar_t* __restrict__ s, const scalar_t* __restrict__ pre,
                                    const scalar_t* __restrict__ target, int64_t batch, int64_t n,
                                    acc_t<scalar_t> damping, acc_t<scalar_t> beta,
                                    const uint8_t* __restrict__ active,
                                    acc_t<scalar_t>* __restrict__ row_change,
                                    uint8_t* __restrict__ row_nonfinite) {
  using acc = acc_t<scalar_t>;
  __shared__ acc warp_partial[kMaxRowThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t r = blockIdx.x; r < batch; r += gridDim.x) {
    if (!active[r]) continue;  // the same for the whole block, so no barrier is skipped unevenly
    scalar_t* sr = s + r * n;
    const scalar_t* pr = pre + r * n;
    const scalar_t* tr = N == ElementNudge::None ? nullptr : target + r * n;
    acc change = 0, poison = 0;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      update_element<A, N>(sr + j, pr + j, N == ElementNudge::None ? nullptr : tr + j, beta,
                           damping, change, poison);
    }
    change = warp_max(change);
    if (lane == 0) warp_partial[warp] = change;
    // One barrier both publishes the warps' maxima and ORs the non-finite markers.
    const bool nonfinite = __syncthreads_or(poison != acc(0));
    if (warp == 0) {
      change = lane < static_cast<int>(blockDim.x / kWarp) ? warp_partial[lane] : acc(0);
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
// The step number is window_start[0] + offset, read from the device, so that a captured
// window replays with the right step numbers.
template <typename acc>
__global__ void finish_step_kernel(uint8_t* __restrict__ active, acc* __restrict__ row_change,
                                   const uint8_t* __restrict__ row_nonfinite,
                                   int64_t* __restrict__ steps, acc* __restrict__ residual,
                                   int64_t batch, const int64_t* __restrict__ window_start,
                                   int64_t offset, acc tol,
                                   unsigned long long* __restrict__ counts) {
  const int64_t step = *window_start + offset;
  unsigned long long still_active = 0, nonfinite = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < batch;
       r += stride) {
    if (!active[r]) continue;
    const acc change = row_change[r];
    row_change[r] = 0;
    residual[r] = change;
    steps[r] = step;
    nonfinite += row_nonfinite[r];
    if (is_converged(change, tol)) {
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

// Whether full windows are captured as CUDA graphs (TOREQ_CUDA_GRAPHS=0 turns it off), read
// once per process.
bool graphs_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("TOREQ_CUDA_GRAPHS");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

// Whether the call captures a window: where at least two full windows may follow the first.
bool captures_windows(const RelaxProblem& p) {
  return graphs_enabled() && p.batch > 0 && p.max_steps / kCheckEvery >= 3;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_on_current_stream(
    const RelaxProblem& p, at::TensorList states);

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_cuda(
    at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
    at::TensorList weights, at::IntArrayRef targets, at::IntArrayRef sources,
    const c10::List<bool>& transposed, c10::string_view activation, double damping,
    int64_t max_steps, double tol, c10::string_view schedule, double beta, c10::string_view loss,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& readout_weight,
    const std::optional<at::Tensor>& readout_bias, c10::string_view nudge_position) {
  // Host-only checks first: they reject mixed devices with a clear message, after which every
  // tensor is on states[0]'s device, a CUDA one since the dispatcher chose this kernel.
  const RelaxProblem p = make_relax_problem(states, drives, weights, targets, sources, transposed,
                                            activation, damping, max_steps, tol, schedule, beta,
                                            loss, target, readout_weight, readout_bias,
                                            nudge_position);
  TORCH_INTERNAL_ASSERT(states[0].is_cuda());
  // The ATen calls (clones, GEMMs, softmax) and our launches all use the current device's
  // current stream: make the inputs' device current so that both are the right ones.
  const c10::cuda::CUDAGuard guard(states[0].device());
  // A CUDA graph cannot be captured on the legacy default stream, which is where most callers
  // run: the whole call then runs on a side stream that first waits for the caller's stream,
  // and the caller's stream waits for it at the end, so the call stays ordered like any other
  // op on the caller's stream (the inputs' and outputs' memory is used only inside it).
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream();
  std::optional<c10::cuda::CUDAStreamGuard> side;
  if (captures_windows(p) && caller == c10::cuda::getDefaultCUDAStream()) {
    const c10::cuda::CUDAStream worker = c10::cuda::getStreamFromPool();
    c10::cuda::CUDAEvent ready;
    ready.record(caller);
    ready.block(worker);
    side.emplace(worker);
  }
  const auto result = relax_on_current_stream(p, states);
  if (side) {
    c10::cuda::CUDAEvent done;
    done.record(c10::cuda::getCurrentCUDAStream());
    side.reset();
    done.block(caller);
    // The outputs were allocated on the side stream: tell the caching allocator that the
    // caller's stream uses them, so their memory is not reused before it is done with them.
    for (const at::Tensor& t : std::get<0>(result)) t.record_stream(caller);
    std::get<1>(result).record_stream(caller);
    std::get<2>(result).record_stream(caller);
  }
  return result;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_on_current_stream(
    const RelaxProblem& p, at::TensorList states) {
  const int64_t batch = p.batch;
  std::vector<at::Tensor> s, pre;
  for (const at::Tensor& init : states) {
    s.push_back(init.clone(at::MemoryFormat::Contiguous));
    pre.push_back(at::empty_like(s.back(), at::MemoryFormat::Contiguous));
  }
  const auto options = s[0].options();
  // the convergence test's dtype: float32 for float16 and bfloat16 states
  const auto acc_options = options.dtype(at::toOpMathType(s[0].scalar_type()));
  at::Tensor steps = at::zeros({batch}, options.dtype(at::kLong));
  at::Tensor residual = at::full({batch}, std::numeric_limits<double>::infinity(), acc_options);
  if (batch == 0 || p.max_steps == 0) return {s, steps, residual};  // no step runs, as on the CPU

  at::Tensor active = at::ones({batch}, options.dtype(at::kByte));
  at::Tensor row_nonfinite = at::zeros({batch}, options.dtype(at::kByte));
  at::Tensor row_change = at::zeros({batch}, acc_options);
  // counts[j] = (rows still active after, active rows non-finite at) step j of the window.
  at::Tensor counts = at::empty({kCheckEvery, 2}, options.dtype(at::kLong));
  // the number of steps done before the window; the window's last launch advances it
  at::Tensor window_start = at::zeros({1}, options.dtype(at::kLong));

  const int64_t row_blocks = std::min<int64_t>(batch, kMaxBlocks);
  constexpr int kFinishThreads = 256;
  const int64_t finish_blocks =
      std::min<int64_t>((batch + kFinishThreads - 1) / kFinishThreads, kMaxBlocks);
  const int64_t last = static_cast<int64_t>(s.size()) - 1;
  // dloss/ds of the last layer, where output_gradient computes it
  at::Tensor output_grad;
  if (p.needs_output_gradient) output_grad = at::empty_like(s.back());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s[0].scalar_type(),
                                  "toreq_relax_cuda", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_activation(p.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      const auto damping_s = static_cast<acc>(p.damping);
      const auto beta_s = static_cast<acc>(p.beta);
      const auto tol_s = static_cast<acc>(p.tol);
      // y (MSE) or dloss/ds (Gradient), by rows
      const scalar_t* target_ptr =
          p.element_nudge == ElementNudge::None ? nullptr
          : p.needs_output_gradient             ? output_grad.const_data_ptr<scalar_t>()
                                                : p.target.const_data_ptr<scalar_t>();
      uint8_t* active_ptr = active.data_ptr<uint8_t>();
      uint8_t* nonfinite_ptr = row_nonfinite.data_ptr<uint8_t>();
      acc* change_ptr = row_change.data_ptr<acc>();
      int64_t* steps_ptr = steps.data_ptr<int64_t>();
      acc* residual_ptr = residual.data_ptr<acc>();
      const int64_t* window_start_ptr = window_start.const_data_ptr<int64_t>();
      auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());

      // Enqueues `window` steps on the current stream (that of a graph being captured, too):
      // every pointer and shape is the same from one window to the next.
      auto enqueue_window = [&](int64_t window) {
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
        counts.zero_();
        for (int64_t j = 0; j < window; ++j) {
          for (const std::vector<int64_t>& group : p.groups) {
            for (int64_t l : group) compute_preactivation(p, l, s, pre[l]);
            for (int64_t l : group) {
              const int64_t n = s[l].size(1);
              if (n == 0) continue;  // nothing to update, and row_change is unaffected
              const ElementNudge nudge = l == last ? p.element_nudge : ElementNudge::None;
              if (nudge != ElementNudge::None && p.needs_output_gradient) {
                output_gradient(p, s[l], output_grad);
              }
              dispatch_element_nudge(nudge, [&](auto element_nudge) {
                constexpr ElementNudge N = decltype(element_nudge)::value;
                update_layer_kernel<scalar_t, A, N><<<row_blocks, row_threads(n), 0, stream>>>(
                    s[l].data_ptr<scalar_t>(), pre[l].const_data_ptr<scalar_t>(), target_ptr,
                    batch, n, damping_s, beta_s, active_ptr, change_ptr, nonfinite_ptr);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
            }
          }
          finish_step_kernel<acc><<<finish_blocks, kFinishThreads, 0, stream>>>(
              active_ptr, change_ptr, nonfinite_ptr, steps_ptr, residual_ptr, batch,
              window_start_ptr, j + 1, tol_s, counts_ptr + 2 * j);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        window_start.add_(window);
      };

      // Runs on the current stream: the first window eagerly (which also creates the cuBLAS
      // handle and workspace outside any capture), then, where at least two more full windows
      // may follow, one full window is captured and replayed for each of them.
      const bool use_graph = captures_windows(p);
      std::unique_ptr<at::cuda::CUDAGraph> graph;
      int64_t step = 0;
      while (step < p.max_steps) {
        const int64_t window = std::min(kCheckEvery, p.max_steps - step);
        const int64_t first_step = step + 1;
        if (use_graph && step > 0 && window == kCheckEvery) {
          if (!graph) {
            graph = std::make_unique<at::cuda::CUDAGraph>();
            graph->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
            enqueue_window(window);
            graph->capture_end();
          }
          graph->replay();
        } else {
          enqueue_window(window);
        }
        step += window;
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
