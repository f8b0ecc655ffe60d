// Declarations of the native ops bound in bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

// rewards [K, B*G] float/double/half/bfloat16 (unit stride along B*G) -> advantages float32 [B*G];
// scale: 0 group, 1 batch, 2 none (csrc/kernels/group_advantage.cuh).
at::Tensor group_advantage_cpu(const at::Tensor& rewards, int64_t group_size, double eps, int64_t scale);
#ifdef OMNI_FAST_WITH_CUDA
at::Tensor group_advantage_cuda(const at::Tensor& rewards, int64_t group_size, double eps, int64_t scale);
#endif
