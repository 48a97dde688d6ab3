// First-order ablation effect per sample and neuron on CPU:
//   ablation[n, c] = -sum_p grad_out[n, c, p] * (y[n, c, p] - bias[c])
// (the inner product of sample n's weight gradient with weight row c; see
// spurfast/ops/ablation_stats.py). One read of y and grad_out, accumulated in float32
// (float64 for float64 input).
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spurfast {

namespace {

template <typename scalar_t>
void ablation_rows(const scalar_t* y, const scalar_t* g, const scalar_t* bias, int64_t B, int64_t C,
                   int64_t P, bool channels_last, scalar_t* out) {
  if (!channels_last) {  // [B, C, P]: one contiguous row of P per (n, c)
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < B * C; ++r) {
      const scalar_t b = bias ? bias[r % C] : scalar_t(0);
      const scalar_t* yr = y + r * P;
      const scalar_t* gr = g + r * P;
      scalar_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < P; ++p) s += gr[p] * (yr[p] - b);
      out[r] = -s;
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < B; ++n) {  // [B, P, C]: accumulate rows of C
    scalar_t* o = out + n * C;
    for (int64_t c = 0; c < C; ++c) o[c] = 0;
    for (int64_t p = 0; p < P; ++p) {
      const scalar_t* yr = y + (n * P + p) * C;
      const scalar_t* gr = g + (n * P + p) * C;
      if (bias) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] -= gr[c] * (yr[c] - bias[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] -= gr[c] * yr[c];
      }
    }
  }
}

}  // namespace

// y, grad_out: [B, C, P] (channels first) or [B, P, C]; bias: [C] or undefined. Returns [B, C].
at::Tensor ablation_stats_cpu(const at::Tensor& y_in, const at::Tensor& g_in,
                              const c10::optional<at::Tensor>& bias_in, bool channels_last) {
  TORCH_CHECK(y_in.dim() == 3, "y must be 3-D ([B, C, P] or [B, P, C]), got ", y_in.sizes());
  TORCH_CHECK(g_in.sizes() == y_in.sizes(), "grad_out must have the shape of y ", y_in.sizes(),
              ", got ", g_in.sizes());
  const int64_t B = y_in.size(0);
  const int64_t C = channels_last ? y_in.size(2) : y_in.size(1);
  const int64_t P = channels_last ? y_in.size(1) : y_in.size(2);
  const auto acc = (y_in.scalar_type() == at::kDouble || g_in.scalar_type() == at::kDouble) ? at::kDouble
                                                                                            : at::kFloat;
  const auto y = y_in.to(acc).contiguous();
  const auto g = g_in.to(acc).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == C, "bias must have shape [", C, "], got ",
                bias_in->sizes());
    bias = bias_in->to(acc).contiguous();
  }
  auto out = at::empty({B, C}, y.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "ablation_stats", [&] {
    ablation_rows<scalar_t>(y.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                            bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, B, C, P, channels_last,
                            out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace spurfast
