#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_advantage_cpu", &group_advantage_cpu, "GRPO group advantages (CPU)");
#ifdef OMNI_FAST_WITH_CUDA
  m.def("group_advantage_cuda", &group_advantage_cuda, "GRPO group advantages (CUDA)");
#endif
}
