// CPU kernel of toreq.relax: the step loop in C++, the couplings as BLAS GEMMs into reused
// buffers, and the activation, damping, masking and convergence test fused in one pass.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <numeric>

#include "ops/cpu/parallel_rows.h"
#include "ops/relax.h"

namespace toreq {
namespace {

// pre <- act(pre), in place, through ATen's vectorised and multithreaded kernels.
void activate_in_place(at::Tensor& pre, Activation activation) {
  switch (activation) {
    case Activation::HardSigmoid: pre.clamp_(0, 1); break;
    case Activation::Tanh: pre.tanh_(); break;
    case Activation::Sigmoid: pre.sigmoid_(); break;
    default: break;
  }
}

// One row of the state update: s <- damping * s + (1 - damping) * activity. Returns the row's
// largest |change| and sets *nonfinite where a new state is NaN or Inf. The reductions run in
// kLanes independent accumulators so that the compiler can vectorise the loop without
// reordering floating-point operations.
template <typename scalar_t>
TOREQ_ALWAYS_INLINE scalar_t update_row_body(scalar_t* s, const scalar_t* activity, int64_t n,
                                             scalar_t damping, bool* nonfinite) {
  constexpr int64_t kLanes = 16;
  const scalar_t keep = scalar_t(1) - damping;
  scalar_t change[kLanes] = {};
  scalar_t poison[kLanes] = {};  // stays 0 unless a new state is NaN or Inf (0 * Inf = NaN)
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const scalar_t next = damping * s[j + k] + keep * activity[j + k];
      const scalar_t delta = std::abs(next - s[j + k]);
      change[k] = delta > change[k] ? delta : change[k];
      poison[k] += next * scalar_t(0);
      s[j + k] = next;
    }
  }
  for (int64_t j = full; j < n; ++j) {
    const scalar_t next = damping * s[j] + keep * activity[j];
    const scalar_t delta = std::abs(next - s[j]);
    change[0] = delta > change[0] ? delta : change[0];
    poison[0] += next * scalar_t(0);
    s[j] = next;
  }
  scalar_t row_max = 0, row_poison = 0;
  for (int64_t k = 0; k < kLanes; ++k) {
    row_max = change[k] > row_max ? change[k] : row_max;
    row_poison += poison[k];
  }
  if (row_poison != scalar_t(0)) *nonfinite = true;
  return row_max;
}

TOREQ_VECTOR_CLONES float update_row(float* s, const float* activity, int64_t n, float damping,
                                     bool* nonfinite) {
  return update_row_body(s, activity, n, damping, nonfinite);
}

TOREQ_VECTOR_CLONES double update_row(double* s, const double* activity, int64_t n,
                                      double damping, bool* nonfinite) {
  return update_row_body(s, activity, n, damping, nonfinite);
}

// The state update of one layer on the rows still active; row_change[r] becomes
// max(row_change[r], the row's largest |change|) and row_nonfinite[r] is set where a new state
// is NaN or Inf.
template <typename scalar_t>
void update_layer(scalar_t* s, const scalar_t* activity, int64_t batch, int64_t n,
                  scalar_t damping, const uint8_t* active, scalar_t* row_change,
                  uint8_t* row_nonfinite) {
  parallel_rows(batch, n, [&](int64_t r) {
    if (!active[r]) return;
    bool nonfinite = false;
    const scalar_t change = update_row(s + r * n, activity + r * n, n, damping, &nonfinite);
    row_change[r] = change > row_change[r] ? change : row_change[r];
    if (nonfinite) row_nonfinite[r] = 1;
  });
}

// --- batch 1: the couplings as matrix-vector products -------------------------------------
// With one sample left relaxing, a coupling's GEMM is a matrix-vector product: BLAS runs it on
// one thread, and its layout is fixed by the weight's. These loops read each weight once in its
// stored layout, split over the intra-op threads when the weight is large.

constexpr int64_t kMatVecLanes = 32;  // independent accumulators, so the loops vectorise

// out[j] += sum_i w[j * ld + i] * s[i] for j in [begin, end): rows of w dotted with s.
template <typename scalar_t>
TOREQ_ALWAYS_INLINE void dot_rows_body(scalar_t* out, const scalar_t* w, int64_t ld,
                                       const scalar_t* s, int64_t n, int64_t begin, int64_t end) {
  const int64_t full = n - n % kMatVecLanes;
  for (int64_t j = begin; j < end; ++j) {
    const scalar_t* row = w + j * ld;
    scalar_t acc[kMatVecLanes] = {};
    for (int64_t i = 0; i < full; i += kMatVecLanes) {
      for (int64_t k = 0; k < kMatVecLanes; ++k) acc[k] += row[i + k] * s[i + k];
    }
    for (int64_t i = full; i < n; ++i) acc[0] += row[i] * s[i];
    scalar_t total = 0;
    for (int64_t k = 0; k < kMatVecLanes; ++k) total += acc[k];
    out[j] += total;
  }
}

// out[j] += sum_i s[i] * w[i * ld + j] for j in [begin, end): rows of w scaled and summed.
template <typename scalar_t>
TOREQ_ALWAYS_INLINE void axpy_rows_body(scalar_t* out, const scalar_t* w, int64_t ld,
                                        const scalar_t* s, int64_t n, int64_t begin,
                                        int64_t end) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t a = s[i];
    const scalar_t* row = w + i * ld;
    for (int64_t j = begin; j < end; ++j) out[j] += a * row[j];
  }
}

TOREQ_VECTOR_CLONES void dot_rows(float* out, const float* w, int64_t ld, const float* s,
                                  int64_t n, int64_t begin, int64_t end) {
  dot_rows_body(out, w, ld, s, n, begin, end);
}
TOREQ_VECTOR_CLONES void dot_rows(double* out, const double* w, int64_t ld, const double* s,
                                  int64_t n, int64_t begin, int64_t end) {
  dot_rows_body(out, w, ld, s, n, begin, end);
}
TOREQ_VECTOR_CLONES void axpy_rows(float* out, const float* w, int64_t ld, const float* s,
                                   int64_t n, int64_t begin, int64_t end) {
  axpy_rows_body(out, w, ld, s, n, begin, end);
}
TOREQ_VECTOR_CLONES void axpy_rows(double* out, const double* w, int64_t ld, const double* s,
                                   int64_t n, int64_t begin, int64_t end) {
  axpy_rows_body(out, w, ld, s, n, begin, end);
}

// Whether every coupling into `layer` has a unit stride along one of its dimensions, which the
// matrix-vector loops need; otherwise the layer takes the GEMM path.
bool has_matvec_layout(const RelaxProblem& p, int64_t layer) {
  for (const Incoming& c : p.incoming[layer]) {
    if (c.matrix.stride(0) != 1 && c.matrix.stride(1) != 1) return false;
  }
  return true;
}

// compute_preactivation for a single sample (p.batch == 1), the couplings by the loops above.
template <typename scalar_t>
void compute_preactivation_one_sample(const RelaxProblem& p, int64_t layer,
                                      const std::vector<at::Tensor>& states, at::Tensor& pre) {
  const at::Tensor& drive = p.drives[layer];
  if (drive.defined()) {
    pre.copy_(drive);
  } else {
    pre.zero_();
  }
  scalar_t* out = pre.data_ptr<scalar_t>();
  const int64_t n_out = pre.size(1);
  for (const Incoming& c : p.incoming[layer]) {
    // matrix is (n_source, n_out): pre += s @ matrix
    const scalar_t* s = states[c.source].const_data_ptr<scalar_t>();
    const scalar_t* w = c.matrix.const_data_ptr<scalar_t>();
    const int64_t n_in = c.matrix.size(0);
    // Chunks of at least 1M multiply-adds: up to hidden 1024 a second thread gained nothing
    // here (the loop is bound by reading the weight), and waiting for it made steps slower
    // whenever another process held a core.
    const int64_t grain = std::max<int64_t>(kMatVecLanes, (1 << 20) / std::max<int64_t>(1, n_in));
    if (c.matrix.stride(0) == 1) {  // output j reads a contiguous row of the weight
      const int64_t ld = c.matrix.stride(1);
      at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
        dot_rows(out, w, ld, s, n_in, begin, end);
      });
    } else {
      const int64_t ld = c.matrix.stride(0);
      at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
        axpy_rows(out, w, ld, s, n_in, begin, end);
      });
    }
  }
  add_output_nudge(p, layer, states, pre);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relax_cpu(
    at::TensorList states, const c10::List<std::optional<at::Tensor>>& drives,
    at::TensorList weights, at::IntArrayRef targets, at::IntArrayRef sources,
    const c10::List<bool>& transposed, c10::string_view activation, double damping,
    int64_t max_steps, double tol, c10::string_view schedule, double beta, c10::string_view loss,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& readout_weight,
    const std::optional<at::Tensor>& readout_bias) {
  const RelaxProblem p = make_relax_problem(states, drives, weights, targets, sources, transposed,
                                            activation, damping, max_steps, tol, schedule, beta,
                                            loss, target, readout_weight, readout_bias);
  const int64_t batch = p.batch;
  // out holds the full batch; s, pre and `work` hold the rows still relaxing. Once at most half
  // of them are, the converged rows are written back to out and dropped, so that the GEMMs of
  // later steps run over the active rows only (samples never interact, so the result is the
  // same). Until the first such compaction s aliases out and rows is undefined.
  std::vector<at::Tensor> out, s, pre;
  for (const at::Tensor& init : states) {
    out.push_back(init.clone(at::MemoryFormat::Contiguous));
    pre.push_back(at::empty_like(out.back(), at::MemoryFormat::Contiguous));
  }
  s = out;
  RelaxProblem work = p;
  at::Tensor rows;                       // int64: the batch index of each working row
  std::vector<int64_t> sample(batch);    // the same, on the host
  std::iota(sample.begin(), sample.end(), 0);
  // filled in the loop below rather than by ATen fills: each ATen call costs about as much as a
  // step's elementwise work at batch 1
  at::Tensor steps = at::empty({batch}, out[0].options().dtype(at::kLong));
  at::Tensor residual = at::empty({batch}, out[0].options());

  AT_DISPATCH_FLOATING_TYPES(out[0].scalar_type(), "toreq_relax_cpu", [&] {
    std::vector<uint8_t> active(batch, 1), row_nonfinite(batch, 0);
    std::vector<uint8_t> matvec(p.incoming.size());
    for (size_t l = 0; l < matvec.size(); ++l) matvec[l] = has_matvec_layout(p, l);
    std::vector<scalar_t> row_change(batch);
    int64_t* steps_ptr = steps.data_ptr<int64_t>();
    scalar_t* residual_ptr = residual.data_ptr<scalar_t>();
    std::fill(steps_ptr, steps_ptr + batch, int64_t(0));
    std::fill(residual_ptr, residual_ptr + batch, std::numeric_limits<scalar_t>::infinity());
    const auto tol_s = static_cast<scalar_t>(p.tol);
    int64_t num_active = batch, step = 0;
    while (step < p.max_steps && num_active > 0) {
      ++step;
      const int64_t working = work.batch;
      std::fill(row_change.begin(), row_change.end(), scalar_t(0));
      for (const std::vector<int64_t>& group : p.groups) {
        for (int64_t l : group) {
          if (working == 1 && matvec[l]) {
            compute_preactivation_one_sample<scalar_t>(work, l, s, pre[l]);
          } else {
            compute_preactivation(work, l, s, pre[l]);
          }
          activate_in_place(pre[l], p.activation);
        }
        for (int64_t l : group) {
          update_layer<scalar_t>(s[l].data_ptr<scalar_t>(), pre[l].const_data_ptr<scalar_t>(),
                                 working, s[l].size(1), static_cast<scalar_t>(p.damping),
                                 active.data(), row_change.data(), row_nonfinite.data());
        }
      }
      int64_t nonfinite = 0;
      for (int64_t r = 0; r < working; ++r) {
        if (!active[r]) continue;
        nonfinite += row_nonfinite[r];
        residual_ptr[sample[r]] = row_change[r];
        steps_ptr[sample[r]] = step;
        if (row_change[r] < tol_s) {
          active[r] = 0;
          --num_active;
        }
      }
      if (nonfinite > 0) report_nonfinite_state(p, states, step, nonfinite);
      if (num_active == 0 || num_active * 2 > working || step == p.max_steps) continue;

      at::Tensor keep = at::empty({num_active}, out[0].options().dtype(at::kLong));
      int64_t* keep_ptr = keep.data_ptr<int64_t>();
      std::vector<int64_t> kept_sample;
      for (int64_t r = 0; r < working; ++r) {
        if (!active[r]) continue;
        keep_ptr[kept_sample.size()] = r;
        kept_sample.push_back(sample[r]);
      }
      if (rows.defined()) {
        for (size_t l = 0; l < s.size(); ++l) out[l].index_copy_(0, rows, s[l]);
      }
      rows = at::empty({num_active}, keep.options());
      std::copy(kept_sample.begin(), kept_sample.end(), rows.data_ptr<int64_t>());
      for (size_t l = 0; l < s.size(); ++l) {
        s[l] = s[l].index_select(0, keep);
        pre[l] = at::empty_like(s[l]);
      }
      work = select_rows(p, rows);
      sample = std::move(kept_sample);
      std::fill(active.begin(), active.begin() + num_active, uint8_t(1));
    }
  });
  if (rows.defined()) {
    for (size_t l = 0; l < s.size(); ++l) out[l].index_copy_(0, rows, s[l]);
  }
  return {out, steps, residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(toreq, CPU, m) { m.impl("relax", &relax_cpu); }

}  // namespace toreq
