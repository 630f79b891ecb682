// gstalk multi-resolution hash encoding: forward and backward CUDA kernels (no torch headers,
// so nvcc alone can compile this file). The torch binding is csrc/hashgrid.cpp; the PyTorch
// twin is gstalk/deform/hashgrid.py::hash_encode_torch, and tests compare the two.
#include <cuda_runtime.h>
#include <cstdint>

namespace {

constexpr int kMaxFeatures = 8;
__device__ __constant__ uint32_t kPrimes[3] = {1u, 2654435761u, 805459861u};

template <int D>
__device__ __forceinline__ uint32_t corner_index(const int* p0, int corner, int res, uint32_t table_size,
                                                 bool dense) {
  if (dense) {
    uint32_t idx = 0, stride = 1;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      idx += uint32_t(p0[d] + ((corner >> d) & 1)) * stride;
      stride *= uint32_t(res + 1);
    }
    return idx;
  }
  uint32_t h = 0;
#pragma unroll
  for (int d = 0; d < D; ++d) h ^= uint32_t(p0[d] + ((corner >> d) & 1)) * kPrimes[d];
  return h & (table_size - 1);  // table sizes are powers of two
}

template <int D>
__device__ __forceinline__ void cell(const float* x, int res, int* p0, float* fr) {
#pragma unroll
  for (int d = 0; d < D; ++d) {
    float xv = fminf(fmaxf(x[d], 0.f), 1.f - 1e-6f);
    float pos = xv * float(res);
    float fl = floorf(pos);
    p0[d] = int(fl);
    fr[d] = pos - fl;
  }
}

template <int D>
__device__ __forceinline__ bool fits_dense(int res, uint32_t table_size) {
  double cells = 1.0;
#pragma unroll
  for (int d = 0; d < D; ++d) cells *= double(res + 1);
  return cells <= double(table_size);
}

template <int D>
__global__ void hash_forward_kernel(const float* __restrict__ x, const float* __restrict__ tables,
                                    const int* __restrict__ res, float* __restrict__ out, int n, int levels,
                                    uint32_t table_size, int features) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int l = blockIdx.y;
  if (i >= n) return;
  const int r = res[l];
  int p0[D];
  float fr[D];
  cell<D>(x + size_t(i) * D, r, p0, fr);
  const bool dense = fits_dense<D>(r, table_size);
  float acc[kMaxFeatures] = {0.f};
  const float* table = tables + size_t(l) * table_size * features;
#pragma unroll
  for (int c = 0; c < (1 << D); ++c) {
    float w = 1.f;
#pragma unroll
    for (int d = 0; d < D; ++d) w *= ((c >> d) & 1) ? fr[d] : 1.f - fr[d];
    const uint32_t idx = corner_index<D>(p0, c, r, table_size, dense);
    for (int f = 0; f < features; ++f) acc[f] += w * table[size_t(idx) * features + f];
  }
  float* o = out + size_t(i) * levels * features + size_t(l) * features;
  for (int f = 0; f < features; ++f) o[f] = acc[f];
}

template <int D>
__global__ void hash_backward_kernel(const float* __restrict__ grad, const float* __restrict__ x,
                                     const int* __restrict__ res, float* __restrict__ grad_tables, int n,
                                     int levels, uint32_t table_size, int features) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int l = blockIdx.y;
  if (i >= n) return;
  const int r = res[l];
  int p0[D];
  float fr[D];
  cell<D>(x + size_t(i) * D, r, p0, fr);
  const bool dense = fits_dense<D>(r, table_size);
  const float* g = grad + size_t(i) * levels * features + size_t(l) * features;
  float* gt = grad_tables + size_t(l) * table_size * features;
#pragma unroll
  for (int c = 0; c < (1 << D); ++c) {
    float w = 1.f;
#pragma unroll
    for (int d = 0; d < D; ++d) w *= ((c >> d) & 1) ? fr[d] : 1.f - fr[d];
    const uint32_t idx = corner_index<D>(p0, c, r, table_size, dense);
    for (int f = 0; f < features; ++f) atomicAdd(gt + size_t(idx) * features + f, w * g[f]);
  }
}

}  // namespace

extern "C" cudaError_t gstalk_hash_forward(const float* x, const float* tables, const int* res, float* out, int n,
                                          int dim, int levels, uint32_t table_size, int features,
                                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (features > kMaxFeatures || (dim != 2 && dim != 3)) return cudaErrorInvalidValue;
  const dim3 block(256), grid((n + 255) / 256, levels);
  if (dim == 3)
    hash_forward_kernel<3><<<grid, block, 0, stream>>>(x, tables, res, out, n, levels, table_size, features);
  else
    hash_forward_kernel<2><<<grid, block, 0, stream>>>(x, tables, res, out, n, levels, table_size, features);
  return cudaGetLastError();
}

extern "C" cudaError_t gstalk_hash_backward(const float* grad, const float* x, const int* res, float* grad_tables,
                                           int n, int dim, int levels, uint32_t table_size, int features,
                                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (features > kMaxFeatures || (dim != 2 && dim != 3)) return cudaErrorInvalidValue;
  const dim3 block(256), grid((n + 255) / 256, levels);
  if (dim == 3)
    hash_backward_kernel<3><<<grid, block, 0, stream>>>(grad, x, res, grad_tables, n, levels, table_size, features);
  else
    hash_backward_kernel<2><<<grid, block, 0, stream>>>(grad, x, res, grad_tables, n, levels, table_size, features);
  return cudaGetLastError();
}
