// GRPO group advantages on the CPU: the per-group math of csrc/kernels/group_advantage.cuh, groups in parallel.
#include <ATen/Parallel.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "check.h"
#include "kernels/group_advantage.cuh"
#include "ops.h"

namespace ga = omni_fast::group_advantage;

at::Tensor group_advantage_cpu(const at::Tensor& rewards, int64_t group_size, double eps, int64_t scale) {
  OMNI_FAST_CHECK_DEVICE(rewards, at::kCPU);
  check_group_advantage_args(rewards, group_size, scale);
  const int64_t k_count = rewards.size(0), n_groups = rewards.size(1) / group_size;
  const int64_t stride_k = rewards.stride(0);
  auto out = at::empty({rewards.size(1)}, rewards.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "group_advantage_cpu", [&] {
    using A = typename ga::AccType<scalar_t>::type;
    const scalar_t* src = rewards.data_ptr<scalar_t>();
    const auto group_values = [&](int64_t g) {
      return [=](int64_t i) { return ga::reward_at<scalar_t, A>(src, stride_k, k_count, g * group_size + i); };
    };
    A batch_denom = 1;
    if (scale == ga::kBatch) {
      ga::Moments<A> total{0, 0, 0};
      for (int64_t g = 0; g < n_groups; ++g) total = ga::merge(total, ga::group_moments<A>(group_values(g), group_size));
      batch_denom = ga::unbiased_std(total) + static_cast<A>(eps);
    }
    at::parallel_for(0, n_groups, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const auto values = group_values(g);
        const ga::Moments<A> m = ga::group_moments<A>(values, group_size);
        const A denom = ga::group_denominator<A>(static_cast<int>(scale), m, static_cast<A>(eps), batch_denom);
        ga::write_group<A>(values, group_size, m.mean, denom, dst + g * group_size);
      }
    });
  });
  return out;
}
