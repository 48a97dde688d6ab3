// Per-group float64 sums of the rows of a [B, C] table on CPU:
//   out[g, c] = sum_{n : group_ids[n] = g} values[n, c]
// in one read of values (see spurfast/ops/group_row_sums.py). Threads own column blocks of
// out, so there are no atomics and each thread's rows of out stay in cache.
#include <torch/extension.h>

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spurfast {

namespace {

constexpr int64_t kColumnBlock = 512;

template <typename scalar_t>
void add_rows_by_group(const scalar_t* values, const int64_t* group_ids, int64_t B, int64_t C, double* out) {
  const int64_t blocks = (C + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kColumnBlock, c1 = std::min(C, c0 + kColumnBlock);
    for (int64_t n = 0; n < B; ++n) {
      const scalar_t* row = values + n * C;
      double* dst = out + group_ids[n] * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) dst[c] += static_cast<double>(row[c]);
    }
  }
}

}  // namespace

// values: [B, C] float32/float64, group_ids: [B] int64 in [0, num_groups). Returns [G, C] float64.
at::Tensor group_row_sums_cpu(const at::Tensor& values_in, const at::Tensor& group_ids_in, int64_t num_groups) {
  TORCH_CHECK(values_in.dim() == 2, "values must be 2-D [B, C], got ", values_in.sizes());
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  const int64_t B = values_in.size(0), C = values_in.size(1);
  TORCH_CHECK(group_ids_in.dim() == 1 && group_ids_in.size(0) == B, "group_ids must have shape [", B, "], got ",
              group_ids_in.sizes());
  TORCH_CHECK(group_ids_in.scalar_type() == at::kLong, "group_ids must be int64");
  auto out = at::zeros({num_groups, C}, values_in.options().dtype(at::kDouble));
  if (B == 0 || C == 0) return out;
  const auto group_ids = group_ids_in.contiguous();
  const auto [lo, hi] = at::aminmax(group_ids);
  TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < num_groups, "group_ids must lie in [0, ", num_groups,
              "), got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  const auto values = values_in.scalar_type() == at::kDouble ? values_in.contiguous()
                                                              : values_in.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "group_row_sums", [&] {
    add_rows_by_group<scalar_t>(values.data_ptr<scalar_t>(), group_ids.data_ptr<int64_t>(), B, C,
                                out.data_ptr<double>());
  });
  return out;
}

}  // namespace spurfast
