// Python bindings of spurfast._C. Op schemas live in Python (spurfast/ops/_library.py) so
// that they exist with or without native code; these functions are their CPU kernels.
#include <torch/extension.h>

#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spurfast {
std::vector<at::Tensor> linear_grad_stats_cpu(const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, int64_t, const std::string&);
std::vector<at::Tensor> linear_grad_stats_ablation_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, int64_t);
std::vector<at::Tensor> conv2d_grad_stats_cpu(const at::Tensor&, const at::Tensor&,
                                              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                              at::IntArrayRef, int64_t, const at::Tensor&, int64_t,
                                              const std::string&);
std::vector<at::Tensor> activation_stats_cpu(const at::Tensor&, const at::Tensor&, int64_t, bool);
at::Tensor ablation_stats_cpu(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, bool);
at::Tensor group_row_sums_cpu(const at::Tensor&, const at::Tensor&, int64_t);
void masked_adam_step_cpu(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          const std::vector<c10::optional<at::Tensor>>&, double, double, double, double, double,
                          bool, bool, bool);
void masked_sgd_step_cpu(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                         const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                         const std::vector<c10::optional<at::Tensor>>&, double, double, double, double, bool, bool);
#ifdef SPURFAST_WITH_CUDA
void masked_adam_step_cuda(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                           const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                           const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                           const std::vector<c10::optional<at::Tensor>>&, double, double, double, double, double,
                           bool, bool, bool);
void masked_sgd_step_cuda(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          const std::vector<at::Tensor>&, const std::vector<at::Tensor>&,
                          const std::vector<c10::optional<at::Tensor>>&, double, double, double, double, bool, bool);
#endif
}  // namespace spurfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spurfast native kernels";
  m.def("linear_grad_stats", &spurfast::linear_grad_stats_cpu,
        "grad_sq [B, C] and group_grad [G, C, D] of a linear layer (CPU)");
  m.def("linear_grad_stats_ablation", &spurfast::linear_grad_stats_ablation_cpu,
        "grad_sq [B, C], group_grad [G, C, D] and the removal effect [B, C] of a linear layer, "
        "from its per-sample products (CPU)");
  m.def("conv2d_grad_stats", &spurfast::conv2d_grad_stats_cpu,
        "grad_sq [B, Cout] and group_grad [G, *W.shape] of a 2-D convolution (CPU)");
  m.def("activation_stats", &spurfast::activation_stats_cpu,
        "per-sample channel means and their per-group moments (CPU)");
  m.def("ablation_stats", &spurfast::ablation_stats_cpu,
        "first-order effect [B, C] of zeroing each weight row, from the output and its gradient (CPU)");
  m.def("group_row_sums", &spurfast::group_row_sums_cpu,
        "per-group float64 sums [G, C] of the rows of a [B, C] table (CPU)");
  m.def("masked_adam_step", &spurfast::masked_adam_step_cpu,
        "fused multi-tensor Adam/AdamW step of the active rows, per-row step counts (CPU)");
  m.def("masked_sgd_step", &spurfast::masked_sgd_step_cpu,
        "fused multi-tensor SGD step of the active rows, per-row step counts (CPU)");
#ifdef SPURFAST_WITH_CUDA
  m.def("masked_adam_step_cuda", &spurfast::masked_adam_step_cuda,
        "fused multi-tensor Adam/AdamW step of the active rows, per-row step counts (CUDA)");
  m.def("masked_sgd_step_cuda", &spurfast::masked_sgd_step_cuda,
        "fused multi-tensor SGD step of the active rows, per-row step counts (CUDA)");
#endif
  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("with_cuda", []() {
#ifdef SPURFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
