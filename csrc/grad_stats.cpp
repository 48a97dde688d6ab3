// Fused per-sample, per-neuron gradient statistics on CPU.
//
// For a layer whose weight gradient is sum_n G_n^T X_n (Linear: X_n = [T, D] tokens of
// sample n; Conv: X_n = im2col patches [L, K] of sample n, per conv group), compute
//   grad_sq[n, c]      = || (G_n^T X_n)[c, :] ||^2
//   group_grad[g, c, :] = sum_{n : group_ids[n] = g} (G_n^T X_n)[c, :]
// without holding all B per-sample gradients: samples are processed in chunks whose
// per-sample products fit a fixed budget, and each chunk's products are reduced into
// both statistics in one fused OpenMP pass ("direct" path). The "gram" path avoids
// per-sample products entirely: grad_sq[n, c] = g_nc^T (X_n X_n^T) g_nc, which is
// cheaper when T is small against C and D; group sums then come from one GEMM per group.
// For an ungrouped convolution X_n X_n^T is gathered from the Gram of the sample's input
// positions, so neither path writes an im2col patch matrix for stride-1 or Gram layers.
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spurfast {

namespace {

// Per-sample products held at once: about 8 MiB of float32, so they stay near the cache
// between the GEMM that writes them and the pass that reduces them.
constexpr int64_t kProductElements = int64_t(1) << 21;
// im2col patches (or Gram matrices) held at once: a workspace of at most 64 MiB of float32;
// larger chunks let one GEMM cover many samples.
constexpr int64_t kWorkspaceElements = int64_t(1) << 24;
// im2col patches of a small-map weight gradient held at once (4 MiB of float32; twice that
// with the copy into GEMM layout), as spurfast/ops/group_grad.py's _PATCH_CHUNK_ELEMENTS.
constexpr int64_t kPatchChunkElements = int64_t(1) << 20;

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t chunk_samples(int64_t per_sample_elements, int64_t budget = kProductElements) {
  return std::max<int64_t>(1, budget / std::max<int64_t>(1, per_sample_elements));
}

// products: [n, C, D] contiguous; grad_sq: [n, C] rows of the output; group_grad: [G, C, D].
// With weight [C, D] (else null), also ablation[n, c] = -<products[n, c], weight[c]> while
// the row is in cache: the first-order effect of zeroing neuron c, with no layer output kept.
template <typename scalar_t>
void reduce_products(const scalar_t* products, int64_t n, int64_t C, int64_t D,
                     const int64_t* group_ids, scalar_t* grad_sq, scalar_t* group_grad,
                     bool with_group_grad, const scalar_t* weight = nullptr,
                     scalar_t* ablation = nullptr) {
  // Parallel over neurons: each thread owns whole rows of group_grad, so no atomics.
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* w = weight == nullptr ? nullptr : weight + c * D;
    for (int64_t s = 0; s < n; ++s) {
      const scalar_t* row = products + (s * C + c) * D;
      scalar_t sq = 0, dot = 0;
      if (with_group_grad && w != nullptr) {
        scalar_t* dst = group_grad + (group_ids[s] * C + c) * D;
#pragma omp simd reduction(+ : sq, dot)
        for (int64_t k = 0; k < D; ++k) {
          const scalar_t v = row[k];
          sq += v * v;
          dot += v * w[k];
          dst[k] += v;
        }
      } else if (with_group_grad) {
        scalar_t* dst = group_grad + (group_ids[s] * C + c) * D;
#pragma omp simd reduction(+ : sq)
        for (int64_t k = 0; k < D; ++k) {
          const scalar_t v = row[k];
          sq += v * v;
          dst[k] += v;
        }
      } else {
#pragma omp simd reduction(+ : sq)
        for (int64_t k = 0; k < D; ++k) {
          sq += row[k] * row[k];
        }
      }
      grad_sq[s * C + c] = sq;
      if (w != nullptr) ablation[s * C + c] = -dot;
    }
  }
}

// One token per sample: grad_sq[n, c] = g[n, c]^2 * ||x_n||^2, one pass; g: [B, C], x_sq: [B].
template <typename scalar_t>
void rank_one_grad_sq(const scalar_t* g, const scalar_t* x_sq, int64_t B, int64_t C, scalar_t* grad_sq) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < B; ++n) {
    const scalar_t* gn = g + n * C;
    scalar_t* out = grad_sq + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = gn[c] * gn[c] * x_sq[n];
  }
}

// grad_sq[s, c] = sum_t kg[s, t, c] * g[s, t, c] for a chunk; kg, g: [n, T, C].
template <typename scalar_t>
void contract_gram(const scalar_t* kg, const scalar_t* g, int64_t n, int64_t T, int64_t C,
                   scalar_t* grad_sq) {
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < n; ++s) {
    scalar_t* out = grad_sq + s * C;
    for (int64_t c = 0; c < C; ++c) out[c] = 0;
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* a = kg + (s * T + t) * C;
      const scalar_t* b = g + (s * T + t) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] += a[c] * b[c];
    }
  }
}

void check_inputs(const at::Tensor& group_ids, int64_t batch, int64_t num_groups) {
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == batch,
              "group_ids must have shape [", batch, "], got ", group_ids.sizes());
  TORCH_CHECK(group_ids.scalar_type() == at::kLong, "group_ids must be int64");
  TORCH_CHECK(group_ids.device().is_cpu(), "group_ids must be on CPU");
  if (batch > 0) {
    const int64_t lo = group_ids.min().item<int64_t>();
    const int64_t hi = group_ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < num_groups, "group_ids must lie in [0, ", num_groups,
                "), got values in [", lo, ", ", hi, "]");
  }
}

// Samples sorted by group: (order, offsets) with group g at order[offsets[g]:offsets[g+1]].
std::pair<at::Tensor, std::vector<int64_t>> sort_by_group(const at::Tensor& group_ids,
                                                          int64_t num_groups) {
  auto order = std::get<1>(group_ids.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto counts = at::bincount(group_ids, {}, num_groups);
  auto counts_a = counts.accessor<int64_t, 1>();
  std::vector<int64_t> offsets(num_groups + 1, 0);
  for (int64_t g = 0; g < num_groups; ++g) offsets[g + 1] = offsets[g] + counts_a[g];
  return {order, offsets};
}


// Stride-1, ungrouped convolutions without an im2col patch matrix. x is copied once into a
// zero-padded [n, Cin, Hp + 1, Wp] buffer (the extra zero row keeps every shifted read in
// bounds) and grad_out into [n, Cout, Ho * Wp], zero beyond column Wo of each row. Over these
// Ho * Wp "wide" positions, kernel tap (i, j) reads the padded input at the fixed offset
// i * dh * Wp + j * dw: a strided [Cin, Ho * Wp] matrix per sample, and one batched GEMM per
// tap covers a chunk of samples. Wide columns past Wo meet zeros in grad_out and add nothing.
// dst planes [planes, Hd, Wd] = src planes [planes, H, W] placed at (top, left), zeros elsewhere;
// one pass over dst (src contiguous).
template <typename scalar_t>
void pad_planes(const scalar_t* src, scalar_t* dst, int64_t planes, int64_t H, int64_t W, int64_t top,
                int64_t left, int64_t Hd, int64_t Wd) {
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    const scalar_t* s = src + p * H * W;
    scalar_t* d = dst + p * Hd * Wd;
    std::fill(d, d + top * Wd, scalar_t(0));
    for (int64_t h = 0; h < H; ++h) {
      scalar_t* row = d + (top + h) * Wd;
      std::fill(row, row + left, scalar_t(0));
      std::copy(s + h * W, s + (h + 1) * W, row + left);
      std::fill(row + left + W, row + Wd, scalar_t(0));
    }
    std::fill(d + (top + H) * Wd, d + Hd * Wd, scalar_t(0));
  }
}

// Strided convolutions the same way, on phase images: with stride (sh, sw) (dilation 1) tap
// (i, j) reads only padded rows = i mod sh and columns = j mod sw, so x is split into sh * sw
// phase planes [Hph, Wph] (phase (a, b) holds padded rows a, a + sh, ... and columns b, b + sw,
// ...), and in its phase the tap is a stride-1 shift by (i / sh, j / sw). Wph = Wo + (kw - 1) / sw
// keeps every live read in its row; one more zero row keeps the wide columns' reads in bounds.
template <typename scalar_t>
void phase_planes(const scalar_t* src, scalar_t* dst, int64_t planes, int64_t H, int64_t W, int64_t sh,
                  int64_t sw, int64_t top, int64_t left, int64_t Hph, int64_t Wph) {
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < planes; ++p) {
    const scalar_t* s = src + p * H * W;
    scalar_t* d = dst + p * sh * sw * Hph * Wph;
    for (int64_t a = 0; a < sh; ++a)
      for (int64_t b = 0; b < sw; ++b)
        for (int64_t r = 0; r < Hph; ++r) {
          const int64_t h = a + sh * r - top;
          scalar_t* row = d + ((a * sw + b) * Hph + r) * Wph;
          for (int64_t c = 0; c < Wph; ++c) {
            const int64_t w = b + sw * c - left;
            row[c] = (h >= 0 && h < H && w >= 0 && w < W) ? s[h * W + w] : scalar_t(0);
          }
        }
  }
}

struct WideConv {
  at::Tensor xpad;   // [n, Cin, phases, Hph, Wph] (stride 1: one phase, the padded input)
  at::Tensor gwide;  // [n, Cout, Ho * Wph]
  int64_t n, Cin, Cout, Wph, wide, plane, channel_stride;
  std::vector<int64_t> offsets;  // per tap, into one sample's first channel

  WideConv(const at::Tensor& x, const at::Tensor& g, int64_t kh, int64_t kw, at::IntArrayRef stride,
           at::IntArrayRef padding, at::IntArrayRef dilation)
      : n(x.size(0)), Cin(x.size(1)), Cout(g.size(1)) {
    const int64_t Ho = g.size(2), Wo = g.size(3), sh = stride[0], sw = stride[1];
    int64_t Hph;
    if (sh == 1 && sw == 1) {
      Hph = x.size(2) + 2 * padding[0] + 1;
      Wph = x.size(3) + 2 * padding[1];
    } else {
      TORCH_CHECK(dilation[0] == 1 && dilation[1] == 1, "strided implicit convolution needs dilation 1");
      Hph = Ho + (kh - 1) / sh + 1;
      Wph = Wo + (kw - 1) / sw;
    }
    wide = Ho * Wph;
    plane = Hph * Wph;
    channel_stride = sh * sw * plane;
    xpad = at::empty({n, Cin, sh * sw, Hph, Wph}, x.options());
    gwide = at::empty({n, Cout, Ho, Wph}, g.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pad_planes", [&] {
      if (sh == 1 && sw == 1) {
        pad_planes<scalar_t>(x.data_ptr<scalar_t>(), xpad.data_ptr<scalar_t>(), n * Cin, x.size(2), x.size(3),
                             padding[0], padding[1], Hph, Wph);
      } else {
        phase_planes<scalar_t>(x.data_ptr<scalar_t>(), xpad.data_ptr<scalar_t>(), n * Cin, x.size(2), x.size(3),
                               sh, sw, padding[0], padding[1], Hph, Wph);
      }
      pad_planes<scalar_t>(g.data_ptr<scalar_t>(), gwide.data_ptr<scalar_t>(), n * Cout, Ho, Wo, 0, 0, Ho, Wph);
    });
    gwide = gwide.view({n, Cout, wide});
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t phase = (i % sh) * sw + (j % sw);
        offsets.push_back(phase * plane + (i / sh) * dilation[0] * Wph + (j / sw) * dilation[1]);
      }
  }

  // Tap t's input rows of samples [s0, s0 + count) as [count, wide, Cin]: unit stride along
  // positions, so a transposed BLAS operand; no copy.
  at::Tensor tap_rows(size_t t, int64_t s0, int64_t count) const {
    return xpad.as_strided({count, wide, Cin}, {Cin * channel_stride, 1, channel_stride},
                           xpad.storage_offset() + s0 * Cin * channel_stride + offsets[t]);
  }
};

// Gram matrices [n, L, L] of the im2col patches of an ungrouped convolution, without the
// patches: patch (l, tap) reads input position p(l, tap) (or padding), so
//   K_n[l, l'] = sum_tap XX_n[p(l, tap), p(l', tap)],   XX_n = X_n^T X_n,
// X_n = [Cin, P] the sample's input positions: one bmm over channels (P^2 Cin per sample,
// against L^2 Cin kh kw from the patches) and a gather over taps, for any stride, padding
// and dilation. xx: [n, P + 1, P + 1], its last row and column zero, the position that a
// read of the padding maps to; taps_pos: [taps, L] positions in [0, P].
template <typename scalar_t>
void gather_patch_gram(const scalar_t* xx, const int64_t* taps_pos, int64_t n, int64_t P, int64_t L,
                       int64_t taps, scalar_t* gram) {
  const int64_t stride = P + 1;
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < n; ++s) {
    const scalar_t* xs = xx + s * stride * stride;
    scalar_t* out = gram + s * L * L;
    std::fill(out, out + L * L, scalar_t(0));
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t* pos = taps_pos + t * L;
      for (int64_t l = 0; l < L; ++l) {
        if (pos[l] == P) continue;  // a padding read: a zero row
        const scalar_t* row = xs + pos[l] * stride;
        scalar_t* dst = out + l * L;
#pragma omp simd
        for (int64_t m = 0; m < L; ++m) dst[m] += row[pos[m]];
      }
    }
  }
}

// [taps, L] input position (h * W + w) read by output position l at kernel tap (i, j); H * W
// where that read falls in the padding.
at::Tensor patch_positions(int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t kh, int64_t kw,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  auto pos = at::empty({kh * kw, Ho * Wo}, at::kLong);
  auto* p = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t h = oh * stride[0] + i * dilation[0] - padding[0];
          const int64_t w = ow * stride[1] + j * dilation[1] - padding[1];
          *p++ = (h >= 0 && h < H && w >= 0 && w < W) ? h * W + w : H * W;
        }
  return pos;
}

// grad_sq[r] = <a[r, :], b[r, :]> for rows of length L; a, b: [rows, L] contiguous.
template <typename scalar_t>
void row_dots(const scalar_t* a, const scalar_t* b, int64_t rows, int64_t L, scalar_t* out) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < L; ++k) acc += a[r * L + k] * b[r * L + k];
    out[r] = acc;
  }
}

// One tap's products [n, C, D] of a chunk of samples, reduced while they are in cache:
// grad_sq [n, C] += the rows' squares (the taps add up), tap_sums[g, c, :] += the rows, with
// tap_sums the tap's slice of [G, taps, C, D] (group stride taps * C * D).
template <typename scalar_t>
void reduce_tap_chunk(const scalar_t* products, int64_t n, int64_t C, int64_t D, const int64_t* group_ids,
                      int64_t group_stride, scalar_t* grad_sq, scalar_t* tap_sums) {
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t s = 0; s < n; ++s) {
      const scalar_t* row = products + (s * C + c) * D;
      scalar_t* dst = tap_sums + group_ids[s] * group_stride + c * D;
      scalar_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t k = 0; k < D; ++k) {
        const scalar_t v = row[k];
        sq += v * v;
        dst[k] += v;
      }
      grad_sq[s * C + c] += sq;
    }
  }
}
}  // namespace

// x [B, T, D] and grad_out [B, T, C] of a linear layer, agreeing in B and T.
static void check_token_pair(const at::Tensor& x, const at::Tensor& grad_out) {
  TORCH_CHECK(x.dim() == 3 && grad_out.dim() == 3, "x and grad_out must be 3-D [B, T, *]");
  TORCH_CHECK(x.size(0) == grad_out.size(0) && x.size(1) == grad_out.size(1),
              "x [B, T, D] and grad_out [B, T, C] must agree in B and T, got ", x.sizes(),
              " and ", grad_out.sizes());
}

// The direct path of a linear layer: per chunk of samples, products [n, C, D] by one batched
// GEMM, reduced into grad_sq, group_grad (zeroed by the caller) and, with weight, ablation.
static void direct_products(const at::Tensor& x, const at::Tensor& g, const at::Tensor& group_ids,
                            const c10::optional<at::Tensor>& weight, at::Tensor& grad_sq, at::Tensor& group_grad,
                            const c10::optional<at::Tensor>& ablation) {
  const int64_t B = x.size(0), D = x.size(2), C = g.size(2);
  const int64_t step = chunk_samples(C * D);
  const auto gt = g.transpose(1, 2);  // [B, C, T]
  for (int64_t s0 = 0; s0 < B; s0 += step) {
    const int64_t n = std::min(step, B - s0);
    const auto products = at::bmm(gt.narrow(0, s0, n), x.narrow(0, s0, n)).contiguous();
    const auto gid = group_ids.narrow(0, s0, n).contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "reduce_products", [&] {
      reduce_products<scalar_t>(products.data_ptr<scalar_t>(), n, C, D, gid.data_ptr<int64_t>(),
                                grad_sq.data_ptr<scalar_t>() + s0 * C, group_grad.data_ptr<scalar_t>(), true,
                                weight ? weight->data_ptr<scalar_t>() : nullptr,
                                ablation ? ablation->data_ptr<scalar_t>() + s0 * C : nullptr);
    });
  }
}

// x: [B, T, D], grad_out: [B, T, C], weight: [C, D], group_ids: [B] int64.
// grad_sq, group_grad as linear_grad_stats_cpu's direct path, and ablation [B, C] =
// -<dW_n[c], W[c]>, all from one pass over the per-sample products.
std::vector<at::Tensor> linear_grad_stats_ablation_cpu(const at::Tensor& x_in, const at::Tensor& grad_out_in,
                                                       const at::Tensor& weight_in, const at::Tensor& group_ids,
                                                       int64_t num_groups) {
  check_token_pair(x_in, grad_out_in);
  const int64_t B = x_in.size(0), D = x_in.size(2), C = grad_out_in.size(2);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(0) == C && weight_in.size(1) == D,
              "weight must have shape [", C, ", ", D, "], got ", weight_in.sizes());
  check_inputs(group_ids, B, num_groups);
  const auto acc = acc_type(x_in.scalar_type());
  const auto x = x_in.to(acc).contiguous();
  const auto g = grad_out_in.to(acc).contiguous();
  const auto w = weight_in.to(acc).contiguous();
  auto grad_sq = at::empty({B, C}, x.options());
  auto group_grad = at::zeros({num_groups, C, D}, x.options());
  auto ablation = at::empty({B, C}, x.options());
  if (B > 0) direct_products(x, g, group_ids, w, grad_sq, group_grad, ablation);
  return {grad_sq, group_grad, ablation};
}

// x: [B, T, D], grad_out: [B, T, C], group_ids: [B] int64.
// Returns grad_sq [B, C] and group_grad [G, C, D] in the accumulation dtype.
std::vector<at::Tensor> linear_grad_stats_cpu(const at::Tensor& x_in, const at::Tensor& grad_out_in,
                                              const at::Tensor& group_ids, int64_t num_groups,
                                              const std::string& method) {
  check_token_pair(x_in, grad_out_in);
  TORCH_CHECK(method == "direct" || method == "gram", "method must be 'direct' or 'gram'");
  const int64_t B = x_in.size(0), T = x_in.size(1), D = x_in.size(2), C = grad_out_in.size(2);
  check_inputs(group_ids, B, num_groups);
  const auto acc = acc_type(x_in.scalar_type());
  const auto x = x_in.to(acc).contiguous();
  const auto g = grad_out_in.to(acc).contiguous();
  auto grad_sq = at::empty({B, C}, x.options());
  // The direct path accumulates into group_grad; the others overwrite non-empty groups.
  const bool accumulate = method == "direct" && T > 1;
  auto group_grad = accumulate || B == 0 ? at::zeros({num_groups, C, D}, x.options())
                                         : at::empty({num_groups, C, D}, x.options());
  if (B == 0) return {grad_sq, group_grad};

  if (accumulate) {
    direct_products(x, g, group_ids, c10::nullopt, grad_sq, group_grad, c10::nullopt);
    return {grad_sq, group_grad};
  }

  if (T == 1) {
    // Rank-one per-sample gradient: ||g_n[c] x_n||^2 = g_nc^2 ||x_n||^2.
    const auto x_sq = x.squeeze(1).square().sum(1).contiguous();  // [B]
    AT_DISPATCH_FLOATING_TYPES(acc, "rank_one_grad_sq", [&] {
      rank_one_grad_sq<scalar_t>(g.data_ptr<scalar_t>(), x_sq.data_ptr<scalar_t>(), B, C,
                                 grad_sq.data_ptr<scalar_t>());
    });
  } else {
    const int64_t step = chunk_samples(T * (T + C), kWorkspaceElements);
    for (int64_t s0 = 0; s0 < B; s0 += step) {
      const int64_t n = std::min(step, B - s0);
      const auto xs = x.narrow(0, s0, n), gs = g.narrow(0, s0, n);
      const auto gram = at::bmm(xs, xs.transpose(1, 2));  // [n, T, T]
      const auto kg = at::bmm(gram, gs).contiguous();     // [n, T, C]
      AT_DISPATCH_FLOATING_TYPES(acc, "contract_gram", [&] {
        contract_gram<scalar_t>(kg.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), n, T, C,
                                grad_sq.data_ptr<scalar_t>() + s0 * C);
      });
    }
  }
  // Group sums: one GEMM per non-empty group, on the samples of that group.
  if (num_groups == 1) {  // the weight gradient itself: no reordering needed
    auto dst = group_grad[0];
    at::mm_out(dst, g.reshape({B * T, C}).t(), x.reshape({B * T, D}));
    return {grad_sq, group_grad};
  }
  auto [order, offsets] = sort_by_group(group_ids, num_groups);
  const auto xs = x.index_select(0, order).reshape({B * T, D});
  const auto gs = g.index_select(0, order).reshape({B * T, C});
  for (int64_t gi = 0; gi < num_groups; ++gi) {
    const int64_t lo = offsets[gi], hi = offsets[gi + 1];
    if (hi == lo) {
      group_grad[gi].zero_();
      continue;
    }
    auto dst = group_grad[gi];
    at::mm_out(dst, gs.narrow(0, lo * T, (hi - lo) * T).t(),
               xs.narrow(0, lo * T, (hi - lo) * T));
  }
  return {grad_sq, group_grad};
}

// x: [B, Cin, H, W], grad_out: [B, Cout, Ho, Wo].
// Returns grad_sq [B, Cout] and group_grad [G, Cout, Cin / groups, kh, kw].
std::vector<at::Tensor> conv2d_grad_stats_cpu(const at::Tensor& x_in, const at::Tensor& grad_out_in,
                                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                              int64_t groups, const at::Tensor& group_ids,
                                              int64_t num_groups, const std::string& method) {
  TORCH_CHECK(x_in.dim() == 4 && grad_out_in.dim() == 4,
              "x and grad_out must be 4-D [B, C, H, W], got ", x_in.sizes(), " and ",
              grad_out_in.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "kernel_size, stride, padding and dilation must have 2 entries each");
  TORCH_CHECK(method == "direct" || method == "gram", "method must be 'direct' or 'gram'");
  const int64_t B = x_in.size(0), Cin = x_in.size(1), Cout = grad_out_in.size(1);
  TORCH_CHECK(groups >= 1 && Cin % groups == 0 && Cout % groups == 0,
              "groups=", groups, " must divide in_channels=", Cin, " and out_channels=", Cout);
  TORCH_CHECK(grad_out_in.size(0) == B, "x and grad_out disagree in batch size");
  check_inputs(group_ids, B, num_groups);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t Cg = Cout / groups, Kg = (Cin / groups) * kh * kw;
  const int64_t L = grad_out_in.size(2) * grad_out_in.size(3);
  const auto acc = acc_type(x_in.scalar_type());
  const auto x = x_in.to(acc).contiguous();
  const auto g = grad_out_in.to(acc).contiguous();
  auto grad_sq = at::empty({B, Cout}, x.options());
  // The direct path accumulates into group_grad; the Gram path overwrites non-empty groups.
  // Below about 16 input channels a tap's GEMM is too thin to pay for itself (a 3-channel
  // stem: 5.1 ms implicit against 1.9 ms with im2col at 32x32); im2col is cheap there anyway.
  // Strided convs (dilation 1) run on phase images (WideConv).
  const bool unit_stride = stride[0] == 1 && stride[1] == 1;
  const bool implicit =
      groups == 1 && Cin >= 16 && (unit_stride || (dilation[0] == 1 && dilation[1] == 1)) &&
      grad_out_in.size(2) == (x_in.size(2) + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1 &&
      grad_out_in.size(3) == (x_in.size(3) + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  // The im2col direct path accumulates into group_grad; the other paths overwrite it.
  auto group_grad = (method == "direct" && !implicit) || B == 0
                        ? at::zeros({num_groups, Cout, Kg}, x.options())
                        : at::empty({num_groups, Cout, Kg}, x.options());
  if (B == 0) return {grad_sq, group_grad.view({num_groups, Cout, Cin / groups, kh, kw})};

  const auto patches_of = [&](int64_t s0, int64_t n) {
    // [n, Cin*kh*kw, L] -> [n*groups, Kg, L]; im2col orders rows (Cin, kh, kw), as the weight.
    auto u = at::im2col(x.narrow(0, s0, n), {kh, kw}, dilation, padding, stride);
    TORCH_CHECK(u.size(2) == L, "grad_out spatial size does not match the convolution of x: ",
                "expected ", u.size(2), " output positions, got ", L);
    return u.view({n * groups, Kg, L});
  };
  const auto grads_of = [&](int64_t s0, int64_t n) {
    return g.narrow(0, s0, n).reshape({n * groups, Cg, L});
  };

  if (implicit && method == "direct") {
    const int64_t taps = kh * kw;
    auto tap_sums = at::zeros({num_groups, taps, Cout, Cin}, x.options());  // group sums, tap-major
    grad_sq.zero_();
    const auto gid = group_ids.contiguous();
    // The padded (or phase) copies of x and grad_out for at most a 64 MiB workspace of samples at once
    const int64_t Wwide = x_in.size(3) + 2 * padding[1] + kw;
    const int64_t outer = chunk_samples(Cin * (x_in.size(2) + 2 * padding[0] + kh + 1) * Wwide +
                                            Cout * grad_out_in.size(2) * Wwide, kWorkspaceElements);
    // Per tap, chunks of samples whose products (about 2 MiB) stay in cache for their reduction.
    const int64_t step = chunk_samples(Cout * Cin, kProductElements / 4);
    auto products = at::empty({std::min(step, B), Cout, Cin}, x.options());
    for (int64_t o0 = 0; o0 < B; o0 += outer) {
      const int64_t m = std::min(outer, B - o0);
      const WideConv wc(x.narrow(0, o0, m), g.narrow(0, o0, m), kh, kw, stride, padding, dilation);
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t s0 = 0; s0 < m; s0 += step) {
          const int64_t n = std::min(step, m - s0);
          auto dst = products.narrow(0, 0, n);
          at::bmm_out(dst, wc.gwide.narrow(0, s0, n), wc.tap_rows(t, s0, n));
          AT_DISPATCH_FLOATING_TYPES(acc, "reduce_tap_chunk", [&] {
            reduce_tap_chunk<scalar_t>(dst.data_ptr<scalar_t>(), n, Cout, Cin, gid.data_ptr<int64_t>() + o0 + s0,
                                       taps * Cout * Cin, grad_sq.data_ptr<scalar_t>() + (o0 + s0) * Cout,
                                       tap_sums.data_ptr<scalar_t>() + t * Cout * Cin);
          });
        }
      }
    }
    // [G, kh, kw, Cout, Cin] -> [G, Cout, Cin, kh, kw], the weight's layout.
    group_grad.view({num_groups, Cout, Cin, kh, kw})
        .copy_(tap_sums.view({num_groups, kh, kw, Cout, Cin}).permute({0, 3, 4, 1, 2}));
    return {grad_sq, group_grad.view({num_groups, Cout, Cin, kh, kw})};
  }

  if (method == "direct") {
    const int64_t step = std::min(chunk_samples(Cout * Kg), chunk_samples(groups * Kg * L, kWorkspaceElements));
    for (int64_t s0 = 0; s0 < B; s0 += step) {
      const int64_t n = std::min(step, B - s0);
      // [n*groups, Cg, Kg] is laid out as [n, Cout, Kg].
      const auto products =
          at::bmm(grads_of(s0, n), patches_of(s0, n).transpose(1, 2)).contiguous();
      const auto gid = group_ids.narrow(0, s0, n).contiguous();
      AT_DISPATCH_FLOATING_TYPES(acc, "reduce_products", [&] {
        reduce_products<scalar_t>(products.data_ptr<scalar_t>(), n, Cout, Kg,
                                  gid.data_ptr<int64_t>(), grad_sq.data_ptr<scalar_t>() + s0 * Cout,
                                  group_grad.data_ptr<scalar_t>(), true);
      });
    }
    return {grad_sq, group_grad.view({num_groups, Cout, Cin / groups, kh, kw})};
  }

  // grad_sq from Gram matrices: from the input's own Gram (ungrouped convs) or from im2col
  // patches (grouped ones): grad_sq[n, c] = g_nc^T K_n g_nc over the L output positions.
  if (groups == 1) {
    const int64_t H = x_in.size(2), W = x_in.size(3), P = H * W, taps = kh * kw;
    const auto positions = patch_positions(H, W, grad_out_in.size(2), grad_out_in.size(3), kh, kw, stride,
                                           padding, dilation);
    const int64_t step = chunk_samples((P + 1) * (P + 1 + Cin) + L * L + 2 * Cout * L, kWorkspaceElements);
    for (int64_t s0 = 0; s0 < B; s0 += step) {
      const int64_t n = std::min(step, B - s0);
      // one zero position after the P real ones, for the reads of the padding
      auto xs = at::zeros({n, Cin, P + 1}, x.options());
      xs.narrow(2, 0, P).copy_(x.narrow(0, s0, n).view({n, Cin, P}));
      const auto xx = at::bmm(xs.transpose(1, 2), xs);         // [n, P + 1, P + 1]
      auto gram = at::empty({n, L, L}, x.options());
      const auto gs = g.narrow(0, s0, n).view({n, Cout, L});
      AT_DISPATCH_FLOATING_TYPES(acc, "gather_patch_gram", [&] {
        gather_patch_gram<scalar_t>(xx.data_ptr<scalar_t>(), positions.data_ptr<int64_t>(), n, P, L, taps,
                                    gram.data_ptr<scalar_t>());
      });
      const auto kg = at::bmm(gs, gram);                         // [n, Cout, L]; K_n is symmetric
      AT_DISPATCH_FLOATING_TYPES(acc, "row_dots", [&] {
        row_dots<scalar_t>(kg.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), n * Cout, L,
                           grad_sq.data_ptr<scalar_t>() + s0 * Cout);
      });
    }
  } else {
    const int64_t step = chunk_samples(groups * L * (L + Kg + Cg), kWorkspaceElements);
    for (int64_t s0 = 0; s0 < B; s0 += step) {
      const int64_t n = std::min(step, B - s0);
      const auto u = patches_of(s0, n);                               // [n*groups, Kg, L]
      const auto gram = at::bmm(u.transpose(1, 2), u);                // [n*groups, L, L]
      const auto gt = grads_of(s0, n).transpose(1, 2).contiguous();   // [n*groups, L, Cg]
      const auto kg = at::bmm(gram, gt).contiguous();                 // [n*groups, L, Cg]
      auto sq = at::empty({n * groups, Cg}, x.options());
      AT_DISPATCH_FLOATING_TYPES(acc, "contract_gram", [&] {
        contract_gram<scalar_t>(kg.data_ptr<scalar_t>(), gt.data_ptr<scalar_t>(), n * groups, L, Cg,
                                sq.data_ptr<scalar_t>());
      });
      grad_sq.narrow(0, s0, n).copy_(sq.view({n, Cout}));
    }
  }
  // Group sums: a weight gradient of each group's samples. On small maps of a wide, ungrouped
  // layer, im2col + one GEMM into the output (the same rule as spurfast/ops/group_grad.py's
  // _im2col_pays; oneDNN's kernels ran at 7-40 GF/s there on an AVX2 host), else the library's own kernel.
  const auto weight_shape = std::vector<int64_t>{Cout, Cin / groups, kh, kw};
  const auto w_dummy = at::empty(weight_shape, x.options());
  const bool by_im2col = groups == 1 && Cout >= 256 && kh * kw > 1 && L <= 16;
  const auto weight_grad_into = [&](const at::Tensor& gs, const at::Tensor& xs, at::Tensor dst) {  // dst: [Cout, Kg]
    if (by_im2col) {
      const int64_t step = chunk_samples(L * Kg, kPatchChunkElements);
      for (int64_t s0 = 0; s0 < xs.size(0); s0 += step) {
        const int64_t n = std::min(step, xs.size(0) - s0);
        const auto u = at::im2col(xs.narrow(0, s0, n), {kh, kw}, dilation, padding, stride);  // [n, Kg, L]
        const auto patches = u.transpose(1, 2).reshape({n * L, Kg});
        const auto rows = gs.narrow(0, s0, n).reshape({n, Cout, L}).transpose(0, 1).reshape({Cout, n * L});
        if (s0 == 0) {
          at::mm_out(dst, rows, patches);
        } else {
          dst.addmm_(rows, patches);
        }
      }
      return;
    }
    auto grads = at::convolution_backward(gs, xs, w_dummy, c10::nullopt, stride, padding, dilation,
                                          /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                                          {false, true, false});
    dst.copy_(std::get<1>(grads).view({Cout, Kg}));
  };
  if (num_groups == 1 && !by_im2col) {  // the weight gradient itself, returned as is (no copy of |W|)
    auto grads = at::convolution_backward(g, x, w_dummy, c10::nullopt, stride, padding, dilation,
                                          /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
                                          {false, true, false});
    return {grad_sq, std::get<1>(grads).unsqueeze(0)};
  }
  if (num_groups == 1) {
    weight_grad_into(g, x, group_grad[0]);
    return {grad_sq, group_grad.view({num_groups, Cout, Cin / groups, kh, kw})};
  }
  auto [order, offsets] = sort_by_group(group_ids, num_groups);
  for (int64_t gi = 0; gi < num_groups; ++gi) {
    const int64_t lo = offsets[gi], hi = offsets[gi + 1];
    if (hi == lo) {
      group_grad[gi].zero_();
      continue;
    }
    const auto idx = order.narrow(0, lo, hi - lo);
    const bool whole = hi - lo == B;  // one group holds the batch: no gather needed
    weight_grad_into(whole ? g : g.index_select(0, idx), whole ? x : x.index_select(0, idx), group_grad[gi]);
  }
  return {grad_sq, group_grad.view({num_groups, Cout, Cin / groups, kh, kw})};
}

}  // namespace spurfast
