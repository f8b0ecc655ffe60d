// Argument checks shared by the native ops' launchers; each message names the tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define OMNI_FAST_CHECK_DIM(x, n) TORCH_CHECK((x).dim() == (n), #x " must have " #n " dimensions, got ", (x).dim())
#define OMNI_FAST_CHECK_FLOAT(x) \
  TORCH_CHECK((x).is_floating_point(), #x " must be a float tensor, got ", (x).scalar_type())
#define OMNI_FAST_CHECK_UNIT_STRIDE(x, d) \
  TORCH_CHECK((x).size(d) <= 1 || (x).stride(d) == 1, #x " needs unit stride along dim " #d)
#define OMNI_FAST_CHECK_DEVICE(x, device_type) \
  TORCH_CHECK((x).device().type() == (device_type), #x " must be on ", (device_type), ", got ", (x).device())

// rewards [K, B*G] for the group-advantage ops (CPU and CUDA).
inline void check_group_advantage_args(const at::Tensor& rewards, int64_t group_size, int64_t scale) {
  OMNI_FAST_CHECK_DIM(rewards, 2);
  OMNI_FAST_CHECK_FLOAT(rewards);
  OMNI_FAST_CHECK_UNIT_STRIDE(rewards, 1);
  TORCH_CHECK(group_size >= 2, "group_size must be >= 2, got ", group_size);
  TORCH_CHECK(rewards.size(1) % group_size == 0, "rewards.size(1) = ", rewards.size(1),
              " is not a multiple of group_size = ", group_size);
  TORCH_CHECK(scale >= 0 && scale <= 2, "scale must be 0 (group), 1 (batch) or 2 (none)");
}
