// GRPO group advantages, torch-free: the per-group math shared by the CUDA kernels (below, nvcc only) and the
// C++ CPU op (csrc/cpu/group_advantage.cpp).
//
// rewards [K, M] (row stride stride_k, unit stride along M), M = n_groups * group_size, out float [M]:
//   v[i]    = sum_k rewards[k, i]
//   mean_g  = v[first] + sum_g (v - v[first]) / G      (shifted: identical rewards give mean == reward exactly)
//   m2_g    = sum_g (v - mean_g)^2,  std_g = sqrt(m2_g / (G - 1))
//   kGroup: out = (v - mean_g) / (std_g + eps)
//   kBatch: out = (v - mean_g) / (std_all + eps), std_all the unbiased std of all M values (group moments
//           merged with Chan et al.'s formula)
//   kNone:  out = v - mean_g
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define OMNI_FAST_HD __host__ __device__ __forceinline__
#else
#define OMNI_FAST_HD inline
#endif

namespace omni_fast::group_advantage {

enum Scale : int { kGroup = 0, kBatch = 1, kNone = 2 };

// Arithmetic type: float, or double for double rewards.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

// Correctly rounded division and square root, also under nvcc --use_fast_math (setup.py builds with it).
OMNI_FAST_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
OMNI_FAST_HD double div_rn(double a, double b) { return a / b; }
OMNI_FAST_HD float sqrt_rn(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
OMNI_FAST_HD double sqrt_rn(double x) { return ::sqrt(x); }

template <typename A> struct Moments {
  A count;  // number of values
  A mean;
  A m2;     // sum of squared deviations from mean
};

template <typename T, typename A>
OMNI_FAST_HD A reward_at(const T* rewards, int64_t stride_k, int64_t k_count, int64_t i) {
  A v = 0;
  for (int64_t k = 0; k < k_count; ++k) v += static_cast<A>(rewards[k * stride_k + i]);
  return v;
}

// value_at(i) gives the i-th summed reward of one group, i in [0, group_size).
template <typename A, typename ValueAt>
OMNI_FAST_HD Moments<A> group_moments(const ValueAt& value_at, int64_t group_size) {
  const A shift = value_at(0);
  A sum = 0;
  for (int64_t i = 0; i < group_size; ++i) sum += value_at(i) - shift;
  const A mean = shift + div_rn(sum, static_cast<A>(group_size));
  A m2 = 0;
  for (int64_t i = 0; i < group_size; ++i) {
    const A d = value_at(i) - mean;
    m2 += d * d;
  }
  return {static_cast<A>(group_size), mean, m2};
}

template <typename A>
OMNI_FAST_HD Moments<A> merge(const Moments<A>& a, const Moments<A>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const A count = a.count + b.count;
  const A delta = b.mean - a.mean;
  return {count, a.mean + delta * div_rn(b.count, count),
          a.m2 + b.m2 + delta * delta * div_rn(a.count * b.count, count)};
}

template <typename A>
OMNI_FAST_HD A unbiased_std(const Moments<A>& m) {
  return sqrt_rn(div_rn(m.m2, m.count - 1));
}

// Divisor of (v - mean) for one group; batch_denom is std_all + eps.
template <typename A>
OMNI_FAST_HD A group_denominator(int scale, const Moments<A>& m, A eps, A batch_denom) {
  return scale == kGroup ? unbiased_std(m) + eps : scale == kBatch ? batch_denom : A(1);
}

template <typename A, typename ValueAt>
OMNI_FAST_HD void write_group(const ValueAt& value_at, int64_t group_size, A mean, A denom, float* out) {
  for (int64_t i = 0; i < group_size; ++i) out[i] = static_cast<float>(div_rn(value_at(i) - mean, denom));
}

#ifdef __CUDACC__

constexpr int kThreads = 256;      // threads per block
constexpr int kTileValues = 2048;  // summed rewards staged in shared memory per block and step

// Stage the summed rewards of groups [first_group, first_group + n) in shared memory, coalesced.
template <typename T, typename A>
__device__ void stage_tile(const T* rewards, int64_t stride_k, int64_t k_count, int64_t group_size,
                           int64_t first_group, int64_t n, A* tile) {
  const int64_t base = first_group * group_size;
  for (int64_t i = threadIdx.x; i < n * group_size; i += blockDim.x)
    tile[i] = reward_at<T, A>(rewards, stride_k, k_count, base + i);
}

// kGroup / kNone: block b handles groups [b * groups_per_block, ...): stage, one thread per group for the
// moments, then a coalesced write of every value.
template <typename T, typename A>
__global__ void group_advantage_kernel(const T* __restrict__ rewards, int64_t stride_k, int64_t k_count,
                                       int64_t n_groups, int64_t group_size, int64_t groups_per_block, A eps,
                                       int scale, float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  A* tile = reinterpret_cast<A*>(smem);                            // [groups_per_block * group_size]
  A* mean = tile + groups_per_block * group_size;                  // [groups_per_block]
  A* denom = mean + groups_per_block;                              // [groups_per_block]
  const int64_t first = blockIdx.x * groups_per_block;
  const int64_t n = min(groups_per_block, n_groups - first);
  stage_tile<T, A>(rewards, stride_k, k_count, group_size, first, n, tile);
  __syncthreads();
  for (int64_t g = threadIdx.x; g < n; g += blockDim.x) {
    const A* values = tile + g * group_size;
    const Moments<A> m = group_moments<A>([values](int64_t i) { return values[i]; }, group_size);
    mean[g] = m.mean;
    denom[g] = group_denominator<A>(scale, m, eps, A(1));
  }
  __syncthreads();
  float* dst = out + first * group_size;
  for (int64_t i = threadIdx.x; i < n * group_size; i += blockDim.x) {
    const int64_t g = i / group_size;
    dst[i] = static_cast<float>(div_rn(tile[i] - mean[g], denom[g]));
  }
}

// kBatch: one block walks the whole batch twice (moments, then the write); the per-thread moments are merged
// in shared memory.
template <typename T, typename A>
__global__ void group_advantage_batch_kernel(const T* __restrict__ rewards, int64_t stride_k, int64_t k_count,
                                             int64_t n_groups, int64_t group_size, A eps,
                                             float* __restrict__ out) {
  __shared__ Moments<A> partial[kThreads];
  const auto group_values = [=](int64_t g) {
    return [=](int64_t i) { return reward_at<T, A>(rewards, stride_k, k_count, g * group_size + i); };
  };
  Moments<A> local{0, 0, 0};
  for (int64_t g = threadIdx.x; g < n_groups; g += blockDim.x)
    local = merge(local, group_moments<A>(group_values(g), group_size));
  partial[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] = merge(partial[threadIdx.x], partial[threadIdx.x + stride]);
    __syncthreads();
  }
  const A denom = unbiased_std(partial[0]) + eps;
  for (int64_t g = threadIdx.x; g < n_groups; g += blockDim.x) {
    const auto values = group_values(g);
    write_group<A>(values, group_size, group_moments<A>(values, group_size).mean, denom, out + g * group_size);
  }
}

// Launch on `stream`; returns the launch error (cudaSuccess when fine). A group is staged whole in 48 KB of
// shared memory: group_size up to 12,286 (float accumulation) or 6,142 (double), else cudaErrorInvalidValue.
template <typename T>
cudaError_t launch_group_advantage(const T* rewards, int64_t stride_k, int64_t k_count, int64_t n_groups,
                                   int64_t group_size, double eps, int scale, float* out, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  if (n_groups == 0) return cudaSuccess;
  if (scale == kBatch) {
    group_advantage_batch_kernel<T, A><<<1, kThreads, 0, stream>>>(rewards, stride_k, k_count, n_groups,
                                                                   group_size, static_cast<A>(eps), out);
    return cudaGetLastError();
  }
  const int64_t groups_per_block = group_size >= kTileValues ? 1 : kTileValues / group_size;
  const int64_t blocks = (n_groups + groups_per_block - 1) / groups_per_block;
  const size_t smem = sizeof(A) * groups_per_block * (group_size + 2);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;
  group_advantage_kernel<T, A><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      rewards, stride_k, k_count, n_groups, group_size, groups_per_block, static_cast<A>(eps), scale, out);
  return cudaGetLastError();
}

#endif  // __CUDACC__

}  // namespace omni_fast::group_advantage
