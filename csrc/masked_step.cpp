// Masked optimizer steps on CPU: one fused multi-tensor Adam/AdamW or SGD step that updates
// only the active rows of each parameter and does not read the others at all.
//
// A parameter p of shape [C, ...] is seen as C rows of D = numel / C elements (a 1-D
// parameter has rows of one element). Per tensor t:
//   param   [C, D]  param_t (float32, float64, bfloat16 or float16)
//   grad    [C, D]  param_t
//   state   [C, D]  float32 (float64 for float64 parameters): exp_avg, exp_avg_sq, max_exp_avg_sq
//                   or momentum_buffer
//   step    [C]     float32, the number of updates of each row so far (incremented here)
//   active  [C]     bool, or undefined for "every row"
// Rows are cut into work items of about kChunkElems elements, spread over OpenMP threads
// (dynamic schedule: masked rows make items uneven). Inside an item, each maximal run of
// consecutive active rows with the same step count is one contiguous span, updated by one
// vectorizable loop; a masked row is skipped without a load of its parameter, gradient or state.
//
// The arithmetic follows torch.optim's single-tensor path operation by operation (lerp_,
// mul_/addcmul_, sqrt / bias_correction2_sqrt + eps, addcdiv_ with value=-step_size, and the
// bias corrections in double as Python computes them), so without a mask it matches torch
// to rounding; a build without FMA contraction matches it bit for bit.
#include <torch/extension.h>

#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace spurfast {

namespace {

constexpr int64_t kChunkElems = 1 << 15;

struct WorkItem {
  int64_t tensor;
  int64_t row_begin;
  int64_t row_end;
};

// Rows of every tensor cut into items of about kChunkElems elements (at least one row).
std::vector<WorkItem> work_items(const std::vector<int64_t>& rows, const std::vector<int64_t>& row_len) {
  std::vector<WorkItem> items;
  for (size_t t = 0; t < rows.size(); ++t) {
    const int64_t per_item = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, row_len[t]));
    for (int64_t r = 0; r < rows[t]; r += per_item) {
      items.push_back({static_cast<int64_t>(t), r, std::min(rows[t], r + per_item)});
    }
  }
  return items;
}

// Calls fn(begin_row, end_row, step_before) for every maximal run of active rows in
// [r0, r1) that share one step count, after adding 1 to their step counts.
template <typename Fn>
inline void for_active_runs(const bool* active, float* step, int64_t r0, int64_t r1, Fn&& fn) {
  int64_t r = r0;
  while (r < r1) {
    if (active != nullptr && !active[r]) {
      ++r;
      continue;
    }
    const float s = step[r];
    int64_t end = r + 1;
    while (end < r1 && (active == nullptr || active[end]) && step[end] == s) ++end;
    for (int64_t i = r; i < end; ++i) step[i] = s + 1.0f;
    fn(r, end, s + 1.0f);
    r = end;
  }
}

int64_t rows_of(const at::Tensor& p) { return p.dim() == 0 ? 1 : p.size(0); }

// Each row one contiguous block, rows back to back (contiguous, or a channels-last conv weight):
// the kernels see the tensor as a flat [C, D] buffer.
bool dense_rows(const at::Tensor& p) {
  if (p.dim() <= 1 || p.is_contiguous()) return p.is_contiguous();
  return p.is_non_overlapping_and_dense() && (p.size(0) == 1 || p.stride(0) == p.numel() / p.size(0));
}

// Same device, shape, layout as the parameter, and the given dtype.
void check_same(const at::Tensor& p, const at::Tensor& x, const char* what, size_t t, at::ScalarType dtype) {
  TORCH_CHECK(x.device() == p.device(), what, "[", t, "] must be on ", p.device(), ", got ", x.device());
  TORCH_CHECK(x.sizes() == p.sizes(), what, "[", t, "] must have shape ", p.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, what, "[", t, "] must be ", dtype, ", got ", x.scalar_type());
  TORCH_CHECK(x.strides() == p.strides(), what, "[", t, "] must have the parameter's strides ", p.strides(),
              ", got ", x.strides());
}

at::ScalarType state_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by both steps; returns (rows, row length) per tensor.
void check_common(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& steps, const std::vector<c10::optional<at::Tensor>>& active,
                  std::vector<int64_t>& rows, std::vector<int64_t>& row_len) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && steps.size() == n && active.size() == n,
              "params, grads, steps and active must have the same length, got ", n, ", ", grads.size(), ", ",
              steps.size(), ", ", active.size());
  for (size_t t = 0; t < n; ++t) {
    const auto& p = params[t];
    TORCH_CHECK(p.device().is_cpu(), "params[", t, "] must be a CPU tensor");
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                "params[", t, "] must be float32/float64/bfloat16/float16, got ", dtype);
    TORCH_CHECK(dense_rows(p), "params[", t, "] must be dense with contiguous rows, got strides ", p.strides());
    TORCH_CHECK(params[0].scalar_type() == dtype, "params must share one dtype, params[", t, "] is ", dtype);
    check_same(p, grads[t], "grads", t, dtype);
    const int64_t c = rows_of(p);
    const auto& s = steps[t];
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == c &&
                    s.dim() <= 1,
                "steps[", t, "] must be a contiguous float32 CPU tensor of shape [", c, "], got ", s.scalar_type(),
                " ", s.sizes());
    if (active[t].has_value() && active[t]->defined()) {
      const auto& a = *active[t];
      TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == at::kBool && a.is_contiguous() && a.numel() == c &&
                      a.dim() <= 1,
                  "active[", t, "] must be a contiguous bool CPU tensor of shape [", c, "], got ", a.scalar_type(),
                  " ", a.sizes());
    }
    rows.push_back(c);
    row_len.push_back(c == 0 ? 0 : p.numel() / c);
  }
}

const bool* active_ptr(const std::vector<c10::optional<at::Tensor>>& active, size_t t) {
  if (!active[t].has_value() || !active[t]->defined()) return nullptr;
  return active[t]->data_ptr<bool>();
}

// ------------------------------------------------------------------------------------ Adam
template <typename opmath_t>
struct AdamScalars {
  opmath_t sign;          // -1 with maximize
  opmath_t weight_decay;  // L2 (Adam) weight decay
  opmath_t decay;         // 1 - lr * weight_decay (AdamW)
  opmath_t lerp_weight;   // 1 - beta1
  bool lerp_low;          // lerp's branch: |weight| < 0.5, as in ATen
  opmath_t beta2;
  opmath_t one_minus_beta2;
  opmath_t eps;
};

// One element of the Adam update, in the order of torch's single-tensor path.
template <typename opmath_t, bool AMSGRAD, bool L2, bool DECOUPLED>
inline opmath_t adam_element(opmath_t param, opmath_t grad, opmath_t& m, opmath_t& v, opmath_t* vmax,
                             const AdamScalars<opmath_t>& k, opmath_t neg_step_size, opmath_t bc2_sqrt) {
  grad = k.sign * grad;
  if (L2) grad = grad + k.weight_decay * param;
  if (DECOUPLED) param = param * k.decay;
  m = k.lerp_low ? m + k.lerp_weight * (grad - m) : grad - (grad - m) * (opmath_t(1) - k.lerp_weight);
  v = v * k.beta2 + k.one_minus_beta2 * grad * grad;
  opmath_t v_use = v;
  if (AMSGRAD) {
    v_use = *vmax < v ? v : *vmax;
    *vmax = v_use;
  }
  const opmath_t denom = std::sqrt(v_use) / bc2_sqrt + k.eps;
  return param + neg_step_size * m / denom;
}

#if defined(__SSE2__)
// The Adam loop is vectorized by hand: GCC does not vectorize std::sqrt unless built with
// -fno-math-errno (a conditional libm call for negative inputs stays in the loop), and SSE2
// is in every x86-64. Plain SSE2 has no FMA, so each operation rounds as torch's does.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m128;
  static constexpr int kWidth = 4;
  static V set1(float x) { return _mm_set1_ps(x); }
  static V load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, V x) { _mm_storeu_ps(p, x); }
  static V sqrt(V x) { return _mm_sqrt_ps(x); }
  static V max(V a, V b) { return _mm_max_ps(a, b); }  // a > b ? a : b, as the scalar code's select
};
template <>
struct Simd<double> {
  using V = __m128d;
  static constexpr int kWidth = 2;
  static V set1(double x) { return _mm_set1_pd(x); }
  static V load(const double* p) { return _mm_loadu_pd(p); }
  static void store(double* p, V x) { _mm_storeu_pd(p, x); }
  static V sqrt(V x) { return _mm_sqrt_pd(x); }
  static V max(V a, V b) { return _mm_max_pd(a, b); }
};

// Parameters and gradients of another dtype than the state (bfloat16, float16) are converted
// element by element through a small buffer.
template <typename param_t, typename opmath_t>
inline typename Simd<opmath_t>::V load_as(const param_t* p) {
  using S = Simd<opmath_t>;
  if constexpr (std::is_same_v<param_t, opmath_t>) {
    return S::load(p);
  } else {
    opmath_t buf[S::kWidth];
    for (int j = 0; j < S::kWidth; ++j) buf[j] = static_cast<opmath_t>(p[j]);
    return S::load(buf);
  }
}

template <typename param_t, typename opmath_t>
inline void store_as(param_t* p, typename Simd<opmath_t>::V x) {
  using S = Simd<opmath_t>;
  if constexpr (std::is_same_v<param_t, opmath_t>) {
    S::store(p, x);
  } else {
    opmath_t buf[S::kWidth];
    S::store(buf, x);
    for (int j = 0; j < S::kWidth; ++j) p[j] = static_cast<param_t>(buf[j]);
  }
}
#endif

template <typename param_t, typename opmath_t, bool AMSGRAD, bool L2, bool DECOUPLED>
inline void adam_span(param_t* __restrict p, const param_t* __restrict g, opmath_t* __restrict m,
                      opmath_t* __restrict v, opmath_t* __restrict vmax, int64_t n, const AdamScalars<opmath_t>& k,
                      opmath_t neg_step_size, opmath_t bc2_sqrt) {
  int64_t i = 0;
#if defined(__SSE2__)
  using S = Simd<opmath_t>;
  using V = typename S::V;
  const V sign = S::set1(k.sign), wd = S::set1(k.weight_decay), decay = S::set1(k.decay);
  const V w = S::set1(k.lerp_weight), one_minus_w = S::set1(opmath_t(1) - k.lerp_weight);
  const V beta2 = S::set1(k.beta2), b2c = S::set1(k.one_minus_beta2), eps = S::set1(k.eps);
  const V nss = S::set1(neg_step_size), bc2s = S::set1(bc2_sqrt);
  for (; i + S::kWidth <= n; i += S::kWidth) {
    V grad = sign * load_as<param_t, opmath_t>(g + i);
    V param = load_as<param_t, opmath_t>(p + i);
    if (L2) grad = grad + wd * param;
    if (DECOUPLED) param = param * decay;
    V mi = S::load(m + i);
    mi = k.lerp_low ? mi + w * (grad - mi) : grad - (grad - mi) * one_minus_w;
    const V vi = S::load(v + i) * beta2 + b2c * grad * grad;
    S::store(m + i, mi);
    S::store(v + i, vi);
    V v_use = vi;
    if (AMSGRAD) {
      v_use = S::max(vi, S::load(vmax + i));
      S::store(vmax + i, v_use);
    }
    const V denom = S::sqrt(v_use) / bc2s + eps;
    store_as<param_t, opmath_t>(p + i, param + nss * mi / denom);
  }
#endif
  for (; i < n; ++i) {
    p[i] = static_cast<param_t>(adam_element<opmath_t, AMSGRAD, L2, DECOUPLED>(
        static_cast<opmath_t>(p[i]), static_cast<opmath_t>(g[i]), m[i], v[i], AMSGRAD ? vmax + i : nullptr, k,
        neg_step_size, bc2_sqrt));
  }
}

template <typename param_t, typename opmath_t, bool AMSGRAD, bool L2, bool DECOUPLED>
void adam_all(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
              const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
              const std::vector<c10::optional<at::Tensor>>& active, const std::vector<WorkItem>& items,
              const std::vector<int64_t>& row_len, const AdamScalars<opmath_t>& k, double lr, double beta1,
              double beta2) {
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < num_items; ++it) {
    const WorkItem item = items[it];
    const size_t t = static_cast<size_t>(item.tensor);
    const int64_t d = row_len[t];
    param_t* p = params[t].data_ptr<param_t>();
    const param_t* g = grads[t].data_ptr<param_t>();
    opmath_t* m = exp_avgs[t].data_ptr<opmath_t>();
    opmath_t* v = exp_avg_sqs[t].data_ptr<opmath_t>();
    opmath_t* vmax = AMSGRAD ? max_exp_avg_sqs[t].data_ptr<opmath_t>() : nullptr;
    float* step = steps[t].data_ptr<float>();
    float cached_step = -1.0f;  // runs of one item mostly share a step count: pow once
    opmath_t neg_step_size = 0, bc2_sqrt = 1;
    for_active_runs(active_ptr(active, t), step, item.row_begin, item.row_end, [&](int64_t r0, int64_t r1, float s) {
      if (s != cached_step) {
        // Python's `1 - beta ** step`, `lr / bc1` and `bc2 ** 0.5`, in double.
        const double step_d = static_cast<double>(s);
        const double bc1 = 1.0 - std::pow(beta1, step_d);
        const double bc2 = 1.0 - std::pow(beta2, step_d);
        neg_step_size = static_cast<opmath_t>(-(lr / bc1));
        bc2_sqrt = static_cast<opmath_t>(std::pow(bc2, 0.5));
        cached_step = s;
      }
      const int64_t off = r0 * d;
      adam_span<param_t, opmath_t, AMSGRAD, L2, DECOUPLED>(p + off, g + off, m + off, v + off,
                                                           AMSGRAD ? vmax + off : nullptr, (r1 - r0) * d, k,
                                                           neg_step_size, bc2_sqrt);
    });
  }
}

template <typename param_t, typename opmath_t>
void adam_dispatch(bool amsgrad, bool l2, bool decoupled, const std::vector<at::Tensor>& params,
                   const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
                   const std::vector<at::Tensor>& exp_avg_sqs, const std::vector<at::Tensor>& max_exp_avg_sqs,
                   const std::vector<at::Tensor>& steps, const std::vector<c10::optional<at::Tensor>>& active,
                   const std::vector<WorkItem>& items, const std::vector<int64_t>& row_len,
                   const AdamScalars<opmath_t>& k, double lr, double beta1, double beta2) {
#define SPURFAST_ADAM(A, L, D)                                                                            \
  return adam_all<param_t, opmath_t, A, L, D>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, \
                                              active, items, row_len, k, lr, beta1, beta2)
  if (amsgrad) {
    if (l2) SPURFAST_ADAM(true, true, false);
    if (decoupled) SPURFAST_ADAM(true, false, true);
    SPURFAST_ADAM(true, false, false);
  }
  if (l2) SPURFAST_ADAM(false, true, false);
  if (decoupled) SPURFAST_ADAM(false, false, true);
  SPURFAST_ADAM(false, false, false);
#undef SPURFAST_ADAM
}

// ------------------------------------------------------------------------------------- SGD
template <typename opmath_t>
struct SgdScalars {
  opmath_t sign;
  opmath_t weight_decay;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t neg_lr;
};

// FIRST: the rows' first update, where torch sets the buffer to the gradient (no dampening).
template <typename param_t, typename opmath_t, bool MOMENTUM, bool NESTEROV, bool L2>
inline void sgd_span(param_t* __restrict p, const param_t* __restrict g, opmath_t* __restrict buf, int64_t n,
                     const SgdScalars<opmath_t>& k, bool first) {
  const opmath_t sign = k.sign, wd = k.weight_decay, mom = k.momentum, damp = k.one_minus_dampening,
                 neg_lr = k.neg_lr;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const opmath_t param = static_cast<opmath_t>(p[i]);
    opmath_t grad = sign * static_cast<opmath_t>(g[i]);
    if (L2) grad = grad + wd * param;
    if (MOMENTUM) {
      const opmath_t b = first ? grad : buf[i] * mom + damp * grad;
      buf[i] = b;
      grad = NESTEROV ? grad + mom * b : b;
    }
    p[i] = static_cast<param_t>(param + neg_lr * grad);
  }
}

template <typename param_t, typename opmath_t, bool MOMENTUM, bool NESTEROV, bool L2>
void sgd_all(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
             const std::vector<at::Tensor>& buffers, const std::vector<at::Tensor>& steps,
             const std::vector<c10::optional<at::Tensor>>& active, const std::vector<WorkItem>& items,
             const std::vector<int64_t>& row_len, const SgdScalars<opmath_t>& k) {
  const int64_t num_items = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < num_items; ++it) {
    const WorkItem item = items[it];
    const size_t t = static_cast<size_t>(item.tensor);
    const int64_t d = row_len[t];
    param_t* p = params[t].data_ptr<param_t>();
    const param_t* g = grads[t].data_ptr<param_t>();
    opmath_t* buf = MOMENTUM ? buffers[t].data_ptr<opmath_t>() : nullptr;
    float* step = steps[t].data_ptr<float>();
    for_active_runs(active_ptr(active, t), step, item.row_begin, item.row_end, [&](int64_t r0, int64_t r1, float s) {
      const int64_t off = r0 * d;
      sgd_span<param_t, opmath_t, MOMENTUM, NESTEROV, L2>(p + off, g + off, MOMENTUM ? buf + off : nullptr,
                                                          (r1 - r0) * d, k, s == 1.0f);
    });
  }
}

template <typename param_t, typename opmath_t>
void sgd_dispatch(bool momentum, bool nesterov, bool l2, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& buffers,
                  const std::vector<at::Tensor>& steps, const std::vector<c10::optional<at::Tensor>>& active,
                  const std::vector<WorkItem>& items, const std::vector<int64_t>& row_len,
                  const SgdScalars<opmath_t>& k) {
#define SPURFAST_SGD(M, N, L) \
  return sgd_all<param_t, opmath_t, M, N, L>(params, grads, buffers, steps, active, items, row_len, k)
  if (momentum) {
    if (nesterov) {
      if (l2) SPURFAST_SGD(true, true, true);
      SPURFAST_SGD(true, true, false);
    }
    if (l2) SPURFAST_SGD(true, false, true);
    SPURFAST_SGD(true, false, false);
  }
  if (l2) SPURFAST_SGD(false, false, true);
  SPURFAST_SGD(false, false, false);
#undef SPURFAST_SGD
}

}  // namespace

void masked_adam_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                          const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
                          const std::vector<c10::optional<at::Tensor>>& active, double lr, double beta1, double beta2,
                          double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize) {
  std::vector<int64_t> rows, row_len;
  check_common(params, grads, steps, active, rows, row_len);
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n, "exp_avgs and exp_avg_sqs must have ", n,
              " tensors");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "amsgrad needs ", n, " max_exp_avg_sqs, got ",
              max_exp_avg_sqs.size());
  const auto sdtype = state_dtype(params[0].scalar_type());
  for (size_t t = 0; t < n; ++t) {
    check_same(params[t], exp_avgs[t], "exp_avgs", t, sdtype);
    check_same(params[t], exp_avg_sqs[t], "exp_avg_sqs", t, sdtype);
    if (amsgrad) check_same(params[t], max_exp_avg_sqs[t], "max_exp_avg_sqs", t, sdtype);
  }
  const auto items = work_items(rows, row_len);
  const bool l2 = weight_decay != 0.0 && !decoupled_weight_decay;
  const bool decoupled = weight_decay != 0.0 && decoupled_weight_decay;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "masked_adam_step", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const double w = 1.0 - beta1;
    AdamScalars<opmath_t> k{static_cast<opmath_t>(maximize ? -1.0 : 1.0),
                            static_cast<opmath_t>(weight_decay),
                            static_cast<opmath_t>(1.0 - lr * weight_decay),
                            static_cast<opmath_t>(w),
                            std::abs(static_cast<opmath_t>(w)) < opmath_t(0.5),
                            static_cast<opmath_t>(beta2),
                            static_cast<opmath_t>(1.0 - beta2),
                            static_cast<opmath_t>(eps)};
    adam_dispatch<scalar_t, opmath_t>(amsgrad, l2, decoupled, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                      steps, active, items, row_len, k, lr, beta1, beta2);
  });
}

void masked_sgd_step_cpu(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& steps,
                         const std::vector<c10::optional<at::Tensor>>& active, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool maximize) {
  std::vector<int64_t> rows, row_len;
  check_common(params, grads, steps, active, rows, row_len);
  const size_t n = params.size();
  if (n == 0) return;
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || momentum_buffers.size() == n, "momentum needs ", n, " momentum_buffers, got ",
              momentum_buffers.size());
  TORCH_CHECK(!nesterov || has_momentum, "nesterov needs a nonzero momentum");
  const auto sdtype = state_dtype(params[0].scalar_type());
  if (has_momentum) {
    for (size_t t = 0; t < n; ++t) check_same(params[t], momentum_buffers[t], "momentum_buffers", t, sdtype);
  }
  const auto items = work_items(rows, row_len);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "masked_sgd_step", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    SgdScalars<opmath_t> k{static_cast<opmath_t>(maximize ? -1.0 : 1.0), static_cast<opmath_t>(weight_decay),
                           static_cast<opmath_t>(momentum), static_cast<opmath_t>(1.0 - dampening),
                           static_cast<opmath_t>(-lr)};
    sgd_dispatch<scalar_t, opmath_t>(has_momentum, nesterov, weight_decay != 0.0, params, grads, momentum_buffers,
                                     steps, active, items, row_len, k);
  });
}

}  // namespace spurfast
