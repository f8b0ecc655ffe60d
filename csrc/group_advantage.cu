// GRPO group advantages on CUDA: checks, dtype dispatch, launch (device code in kernels/group_advantage.cuh).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include "check.h"
#include "kernels/group_advantage.cuh"
#include "ops.h"

namespace ga = omni_fast::group_advantage;

at::Tensor group_advantage_cuda(const at::Tensor& rewards, int64_t group_size, double eps, int64_t scale) {
  OMNI_FAST_CHECK_DEVICE(rewards, at::kCUDA);
  check_group_advantage_args(rewards, group_size, scale);
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto out = at::empty({rewards.size(1)}, rewards.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rewards.scalar_type(), "group_advantage_cuda", [&] {
    const cudaError_t err = ga::launch_group_advantage<scalar_t>(
        rewards.data_ptr<scalar_t>(), rewards.stride(0), rewards.size(0), rewards.size(1) / group_size, group_size,
        eps, static_cast<int>(scale), out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "group_advantage_cuda (group_size ", group_size, "): ", cudaGetErrorString(err));
  });
  return out;
}
