// Per-sample channel means of a layer's output and their per-group moments on CPU.
//   act[n, c]   = mean over positions of y[n, c, ...]
//   count[g]    = number of samples of group g
//   mean[g, c]  = mean of act[n, c] over the samples of group g
//   m2[g, c]    = sum over those samples of (act[n, c] - mean[g, c])^2
// Moments are returned in float64 so that batches merge (Chan et al.) without drift.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spurfast {

namespace {

// y: [B, C, P] (channels first) or [B, P, C] (channels last); act: [B, C].
template <typename scalar_t>
void channel_means(const scalar_t* y, int64_t B, int64_t C, int64_t P, bool channels_last,
                   scalar_t* act) {
  if (P == 1) {  // one position (a Linear on one token, or tables already reduced): the mean is y
    std::copy(y, y + B * C, act);
    return;
  }
  if (!channels_last) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < B * C; ++r) {
      const scalar_t* row = y + r * P;
      scalar_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t p = 0; p < P; ++p) s += row[p];
      act[r] = s / static_cast<scalar_t>(P);
    }
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < B; ++n) {
    scalar_t* out = act + n * C;
    for (int64_t c = 0; c < C; ++c) out[c] = 0;
    for (int64_t p = 0; p < P; ++p) {
      const scalar_t* row = y + (n * P + p) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] += row[c];
    }
    const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(P);
    for (int64_t c = 0; c < C; ++c) out[c] *= inv;
  }
}

// Two passes over act (mean, then squared deviations) per group, parallel over blocks of
// channels: each thread walks the rows of act in order over its own block, so the reads are
// contiguous and no two threads write the same sums.
template <typename scalar_t>
void group_moments(const scalar_t* act, const int64_t* group_ids, int64_t B, int64_t C,
                   int64_t G, const int64_t* count, double* mean, double* m2) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kBlock, c1 = std::min(C, c0 + kBlock);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = c0; c < c1; ++c) mean[g * C + c] = 0.0, m2[g * C + c] = 0.0;
    for (int64_t n = 0; n < B; ++n) {
      const scalar_t* row = act + n * C;
      double* sum = mean + group_ids[n] * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) sum[c] += static_cast<double>(row[c]);
    }
    for (int64_t g = 0; g < G; ++g) {
      const double inv = count[g] > 0 ? 1.0 / static_cast<double>(count[g]) : 0.0;
      for (int64_t c = c0; c < c1; ++c) mean[g * C + c] *= inv;
    }
    for (int64_t n = 0; n < B; ++n) {
      const scalar_t* row = act + n * C;
      const double* mu = mean + group_ids[n] * C;
      double* dev = m2 + group_ids[n] * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) {
        const double d = static_cast<double>(row[c]) - mu[c];
        dev[c] += d * d;
      }
    }
  }
}

}  // namespace

// y: [B, C, P] if channel_dim == 1 else [B, P, C]. Returns (act, count, mean, m2).
std::vector<at::Tensor> activation_stats_cpu(const at::Tensor& y_in, const at::Tensor& group_ids,
                                             int64_t num_groups, bool channels_last) {
  TORCH_CHECK(y_in.dim() == 3, "y must be 3-D ([B, C, P] or [B, P, C]), got ", y_in.sizes());
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1");
  const int64_t B = y_in.size(0);
  TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == B && group_ids.scalar_type() == at::kLong,
              "group_ids must be int64 of shape [", B, "]");
  const int64_t C = channels_last ? y_in.size(2) : y_in.size(1);
  const int64_t P = channels_last ? y_in.size(1) : y_in.size(2);
  TORCH_CHECK(P > 0, "y has no positions to average over");
  const auto acc = y_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto y = y_in.to(acc).contiguous();
  const auto gid = group_ids.contiguous();
  if (B > 0) {
    const int64_t lo = gid.min().item<int64_t>(), hi = gid.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < num_groups, "group_ids must lie in [0, ", num_groups,
                "), got values in [", lo, ", ", hi, "]");
  }
  auto act = at::empty({B, C}, y.options());
  auto count = at::bincount(gid, {}, num_groups);
  auto mean = at::empty({num_groups, C}, y.options().dtype(at::kDouble));  // zeroed by group_moments
  auto m2 = at::empty({num_groups, C}, y.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "activation_stats", [&] {
    channel_means<scalar_t>(y.data_ptr<scalar_t>(), B, C, P, channels_last, act.data_ptr<scalar_t>());
    group_moments<scalar_t>(act.data_ptr<scalar_t>(), gid.data_ptr<int64_t>(), B, C, num_groups,
                            count.data_ptr<int64_t>(), mean.data_ptr<double>(), m2.data_ptr<double>());
  });
  return {act, count, mean, m2};
}

}  // namespace spurfast
