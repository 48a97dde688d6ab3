// Masked optimizer steps on CUDA: one launch of a fused multi-tensor Adam/AdamW or SGD step
// that updates only the active rows of each parameter (see csrc/masked_step.cpp for the
// layout: a parameter [C, ...] is C rows of D elements, step [C] float32 per row, active [C]
// bool or absent). Compiled only with a CUDA torch and toolkit (SPURFAST_WITH_CUDA).
//
// Per tensor one TensorMeta (pointers, numel, D, first block) in device memory; CUDA block b
// finds its tensor by binary search over the first blocks and takes kBlockElems consecutive
// elements, kPerThread per thread, strided by the block size so that loads coalesce. A block
// whose elements all lie in masked rows returns after reading only the masks. The active rows'
// step counts are incremented before the launch (foreach adds), so every block of a row reads
// its new count. Bias corrections 1 - beta^step per element: -expm1(step * ln beta), accurate
// (expm1f is not one of the functions --use_fast_math replaces); division and sqrt are the
// correctly rounded intrinsics, as the extension is built with --use_fast_math.
#ifdef SPURFAST_WITH_CUDA

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace spurfast {

namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 4;
constexpr int64_t kBlockElems = kThreads * kPerThread;

struct TensorMeta {
  void* param;
  const void* grad;
  void* state0;  // exp_avg, or momentum_buffer
  void* state1;  // exp_avg_sq
  void* state2;  // max_exp_avg_sq
  const float* step;
  const bool* active;  // nullptr: every row
  int64_t numel;
  int64_t row_len;
  int64_t block_begin;
};

template <typename T>
__device__ __forceinline__ T div_rn(T a, T b) { return a / b; }
template <>
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
template <typename T>
__device__ __forceinline__ T sqrt_rn(T a) { return sqrt(a); }
template <>
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ float one_minus_pow(float step, float ln_beta) { return -expm1f(step * ln_beta); }
__device__ __forceinline__ double one_minus_pow(double step, double ln_beta) { return -expm1(step * ln_beta); }

// The tensor of block b: the last one whose first block is <= b.
__device__ __forceinline__ int find_tensor(const TensorMeta* meta, int num_tensors, int64_t b) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta[mid].block_begin <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Element indices and live flags (in range, active row) of this thread; false when the whole
// CUDA block is masked (every thread returns then).
__device__ __forceinline__ bool block_elements(const TensorMeta& tm, int64_t block, int64_t (&idx)[kPerThread],
                                               int64_t (&row)[kPerThread], bool (&live)[kPerThread]) {
  const int64_t start = (block - tm.block_begin) * kBlockElems + threadIdx.x;
  bool any = false;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    idx[k] = start + static_cast<int64_t>(k) * kThreads;
    live[k] = idx[k] < tm.numel;
    row[k] = live[k] ? idx[k] / tm.row_len : 0;
    if (live[k] && tm.active != nullptr) live[k] = tm.active[row[k]];
    any = any || live[k];
  }
  return __syncthreads_or(any) != 0;
}

template <typename opmath_t>
struct AdamArgs {
  opmath_t lr, ln_beta1, ln_beta2, lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay, sign;
};

template <typename param_t, typename opmath_t, bool AMSGRAD, bool L2, bool DECOUPLED, bool LERP_LOW>
__global__ void __launch_bounds__(kThreads) masked_adam_kernel(const TensorMeta* __restrict__ meta, int num_tensors,
                                                               AdamArgs<opmath_t> a) {
  const int64_t block = blockIdx.x;
  const TensorMeta tm = meta[find_tensor(meta, num_tensors, block)];
  int64_t idx[kPerThread], row[kPerThread];
  bool live[kPerThread];
  if (!block_elements(tm, block, idx, row, live)) return;
  param_t* p = static_cast<param_t*>(tm.param);
  const param_t* g = static_cast<const param_t*>(tm.grad);
  opmath_t* m = static_cast<opmath_t*>(tm.state0);
  opmath_t* v = static_cast<opmath_t*>(tm.state1);
  opmath_t* vmax = static_cast<opmath_t*>(tm.state2);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    if (!live[k]) continue;
    const int64_t i = idx[k];
    const opmath_t s = static_cast<opmath_t>(tm.step[row[k]]);
    const opmath_t neg_step_size = -div_rn(a.lr, one_minus_pow(s, a.ln_beta1));
    const opmath_t bc2_sqrt = sqrt_rn(one_minus_pow(s, a.ln_beta2));
    opmath_t param = static_cast<opmath_t>(p[i]);
    opmath_t grad = a.sign * static_cast<opmath_t>(g[i]);
    if (L2) grad = grad + a.weight_decay * param;
    if (DECOUPLED) param = param * a.decay;
    opmath_t mi = m[i];
    mi = LERP_LOW ? mi + a.lerp_weight * (grad - mi) : grad - (grad - mi) * (opmath_t(1) - a.lerp_weight);
    opmath_t vi = v[i] * a.beta2 + a.one_minus_beta2 * grad * grad;
    m[i] = mi;
    v[i] = vi;
    if (AMSGRAD) {
      vi = vmax[i] < vi ? vi : vmax[i];
      vmax[i] = vi;
    }
    const opmath_t denom = div_rn(sqrt_rn(vi), bc2_sqrt) + a.eps;
    p[i] = static_cast<param_t>(param + div_rn(neg_step_size * mi, denom));
  }
}

template <typename opmath_t>
struct SgdArgs {
  opmath_t neg_lr, momentum, one_minus_dampening, weight_decay, sign;
};

template <typename param_t, typename opmath_t, bool MOMENTUM, bool NESTEROV, bool L2>
__global__ void __launch_bounds__(kThreads) masked_sgd_kernel(const TensorMeta* __restrict__ meta, int num_tensors,
                                                              SgdArgs<opmath_t> a) {
  const int64_t block = blockIdx.x;
  const TensorMeta tm = meta[find_tensor(meta, num_tensors, block)];
  int64_t idx[kPerThread], row[kPerThread];
  bool live[kPerThread];
  if (!block_elements(tm, block, idx, row, live)) return;
  param_t* p = static_cast<param_t*>(tm.param);
  const param_t* g = static_cast<const param_t*>(tm.grad);
  opmath_t* buf = static_cast<opmath_t*>(tm.state0);
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    if (!live[k]) continue;
    const int64_t i = idx[k];
    const opmath_t param = static_cast<opmath_t>(p[i]);
    opmath_t grad = a.sign * static_cast<opmath_t>(g[i]);
    if (L2) grad = grad + a.weight_decay * param;
    if (MOMENTUM) {
      const bool first = tm.step[row[k]] == 1.0f;  // the row's first update: buffer = grad, as torch
      const opmath_t b = first ? grad : buf[i] * a.momentum + a.one_minus_dampening * grad;
      buf[i] = b;
      grad = NESTEROV ? grad + a.momentum * b : b;
    }
    p[i] = static_cast<param_t>(param + a.neg_lr * grad);
  }
}

// Calls fn(std::integral_constant<bool, flag>) : turns a runtime flag into a template argument.
template <typename Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag) fn(std::true_type{}); else fn(std::false_type{});
}

template <typename param_t, typename opmath_t>
void launch_adam(bool amsgrad, bool l2, bool decoupled, bool lerp_low, int64_t blocks, cudaStream_t stream,
                 const TensorMeta* meta, int num_tensors, const AdamArgs<opmath_t>& args) {
  with_flag(amsgrad, [&](auto A) {
    with_flag(l2, [&](auto L) {
      with_flag(decoupled, [&](auto D) {
        with_flag(lerp_low, [&](auto W) {
          masked_adam_kernel<param_t, opmath_t, decltype(A)::value, decltype(L)::value, decltype(D)::value,
                             decltype(W)::value><<<blocks, kThreads, 0, stream>>>(meta, num_tensors, args);
        });
      });
    });
  });
}

template <typename param_t, typename opmath_t>
void launch_sgd(bool momentum, bool nesterov, bool l2, int64_t blocks, cudaStream_t stream, const TensorMeta* meta,
                int num_tensors, const SgdArgs<opmath_t>& args) {
  with_flag(momentum, [&](auto M) {
    with_flag(nesterov && momentum, [&](auto N) {
      with_flag(l2, [&](auto L) {
        masked_sgd_kernel<param_t, opmath_t, decltype(M)::value, decltype(N)::value, decltype(L)::value>
            <<<blocks, kThreads, 0, stream>>>(meta, num_tensors, args);
      });
    });
  });
}

int64_t rows_of(const at::Tensor& p) { return p.dim() == 0 ? 1 : p.size(0); }

bool dense_rows(const at::Tensor& p) {
  if (p.dim() <= 1 || p.is_contiguous()) return p.is_contiguous();
  return p.is_non_overlapping_and_dense() && (p.size(0) == 1 || p.stride(0) == p.numel() / p.size(0));
}

void check_like(const at::Tensor& p, const at::Tensor& x, const char* what, size_t t, at::ScalarType dtype) {
  TORCH_CHECK(x.device() == p.device() && x.sizes() == p.sizes() && x.scalar_type() == dtype &&
                  x.strides() == p.strides(),
              what, "[", t, "] must be a ", dtype, " tensor on ", p.device(), " with the parameter's shape ",
              p.sizes(), " and strides ", p.strides());
}

// Validates the lists, increments the active rows' step counts and returns the metadata on the
// device with the total number of CUDA blocks.
std::pair<at::Tensor, int64_t> prepare(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                                       const std::vector<std::vector<at::Tensor>>& states,
                                       const std::vector<at::Tensor>& steps,
                                       const std::vector<c10::optional<at::Tensor>>& active) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && steps.size() == n && active.size() == n,
              "params, grads, steps and active must have the same length");
  const auto dtype = params[0].scalar_type();
  const auto sdtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<TensorMeta> meta(n);
  std::vector<at::Tensor> every, masked, masks;
  int64_t blocks = 0;
  for (size_t t = 0; t < n; ++t) {
    const auto& p = params[t];
    TORCH_CHECK(p.is_cuda() && p.device() == params[0].device(), "params[", t, "] must be on ", params[0].device());
    TORCH_CHECK(p.scalar_type() == dtype, "params must share one dtype, params[", t, "] is ", p.scalar_type());
    TORCH_CHECK(dense_rows(p), "params[", t, "] must be dense with contiguous rows");
    check_like(p, grads[t], "grads", t, dtype);
    for (size_t k = 0; k < states.size(); ++k) {
      TORCH_CHECK(states[k].size() == n, "every state list must have ", n, " tensors");
      check_like(p, states[k][t], "state", t, sdtype);
    }
    const int64_t c = rows_of(p);
    TORCH_CHECK(steps[t].device() == p.device() && steps[t].scalar_type() == at::kFloat && steps[t].numel() == c &&
                    steps[t].dim() <= 1 && steps[t].is_contiguous(),
                "steps[", t, "] must be a contiguous float32 tensor of shape [", c, "] on ", p.device());
    const bool has_mask = active[t].has_value() && active[t]->defined();
    if (has_mask) {
      const auto& a = *active[t];
      TORCH_CHECK(a.device() == p.device() && a.scalar_type() == at::kBool && a.numel() == c && a.dim() <= 1 &&
                      a.is_contiguous(),
                  "active[", t, "] must be a contiguous bool tensor of shape [", c, "] on ", p.device());
      masked.push_back(steps[t]);
      masks.push_back(a);
    } else {
      every.push_back(steps[t]);
    }
    TensorMeta& tm = meta[t];
    tm.param = p.data_ptr();
    tm.grad = grads[t].data_ptr();
    tm.state0 = states.size() > 0 ? states[0][t].data_ptr() : nullptr;
    tm.state1 = states.size() > 1 ? states[1][t].data_ptr() : nullptr;
    tm.state2 = states.size() > 2 ? states[2][t].data_ptr() : nullptr;
    tm.step = steps[t].data_ptr<float>();
    tm.active = has_mask ? active[t]->data_ptr<bool>() : nullptr;
    tm.numel = p.numel();
    tm.row_len = c == 0 ? 1 : std::max<int64_t>(1, p.numel() / c);
    tm.block_begin = blocks;
    blocks += (tm.numel + kBlockElems - 1) / kBlockElems;
  }
  if (!every.empty()) at::_foreach_add_(every, 1.0);
  if (!masked.empty()) at::_foreach_add_(masked, masks);
  auto host = at::empty({static_cast<int64_t>(n * sizeof(TensorMeta))}, at::TensorOptions().dtype(at::kByte))
                  .pin_memory();
  std::memcpy(host.data_ptr(), meta.data(), n * sizeof(TensorMeta));
  return {host.to(params[0].device(), /*non_blocking=*/true), blocks};
}

}  // namespace

void masked_adam_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                           const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                           const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
                           const std::vector<c10::optional<at::Tensor>>& active, double lr, double beta1,
                           double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool amsgrad,
                           bool maximize) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<std::vector<at::Tensor>> states{exp_avgs, exp_avg_sqs};
  if (amsgrad) states.push_back(max_exp_avg_sqs);
  auto prepared = prepare(params, grads, states, steps, active);
  const at::Tensor& meta = prepared.first;
  const int64_t blocks = prepared.second;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "too many elements for one launch");
  const bool l2 = weight_decay != 0.0 && !decoupled_weight_decay;
  const bool decoupled = weight_decay != 0.0 && decoupled_weight_decay;
  const bool lerp_low = std::abs(1.0 - beta1) < 0.5;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* meta_ptr = reinterpret_cast<const TensorMeta*>(meta.data_ptr());
  const int num_tensors = static_cast<int>(params.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "masked_adam_step_cuda", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    AdamArgs<opmath_t> args{static_cast<opmath_t>(lr),
                            static_cast<opmath_t>(beta1 > 0 ? std::log(beta1) : -INFINITY),
                            static_cast<opmath_t>(beta2 > 0 ? std::log(beta2) : -INFINITY),
                            static_cast<opmath_t>(1.0 - beta1),
                            static_cast<opmath_t>(beta2),
                            static_cast<opmath_t>(1.0 - beta2),
                            static_cast<opmath_t>(eps),
                            static_cast<opmath_t>(weight_decay),
                            static_cast<opmath_t>(1.0 - lr * weight_decay),
                            static_cast<opmath_t>(maximize ? -1.0 : 1.0)};
    launch_adam<scalar_t, opmath_t>(amsgrad, l2, decoupled, lerp_low, blocks, stream, meta_ptr, num_tensors, args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void masked_sgd_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& steps,
                          const std::vector<c10::optional<at::Tensor>>& active, double lr, double momentum,
                          double dampening, double weight_decay, bool nesterov, bool maximize) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!nesterov || has_momentum, "nesterov needs a nonzero momentum");
  std::vector<std::vector<at::Tensor>> states;
  if (has_momentum) states.push_back(momentum_buffers);
  auto prepared = prepare(params, grads, states, steps, active);
  const at::Tensor& meta = prepared.first;
  const int64_t blocks = prepared.second;
  if (blocks == 0) return;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "too many elements for one launch");
  const bool l2 = weight_decay != 0.0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* meta_ptr = reinterpret_cast<const TensorMeta*>(meta.data_ptr());
  const int num_tensors = static_cast<int>(params.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "masked_sgd_step_cuda", [&] {
    using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    SgdArgs<opmath_t> args{static_cast<opmath_t>(-lr), static_cast<opmath_t>(momentum),
                           static_cast<opmath_t>(1.0 - dampening), static_cast<opmath_t>(weight_decay),
                           static_cast<opmath_t>(maximize ? -1.0 : 1.0)};
    launch_sgd<scalar_t, opmath_t>(has_momentum, nesterov, l2, blocks, stream, meta_ptr, num_tensors, args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace spurfast

#endif  // SPURFAST_WITH_CUDA
