// gstalk's fused per-Gaussian posing kernel: triangle binding and the deformation outputs
// applied in one pass (one thread a Gaussian a frame). PyTorch twin and the semantics:
// gstalk/avatar/posing.py (pose_gaussians_torch). Plain CUDA with an extern "C" launcher, so
// that nvcc compiles it without torch's headers; csrc/pose.cpp binds it to torch.
//
// For Gaussian i of frame b, bound to triangle f = binding[i] (f < 0: free, e.g. torso):
//   R = tri_r[b, f] (columns: the triangle's local axes), s = tri_s[b, f], o = tri_o[b, f]
//   mean  = R (s * local_mean) + o          + R R0[f]^T d_mean   (offsets live in rest space)
//   quat  = quat(R) * local_quat             * d_quat
//   scale = s * exp(local_log_scale)         * exp(d_log_scale)
// free: mean = local_mean + d_mean, quat = local_quat * d_quat, scale = exp(local_log_scale + d_log_scale).
// Without deformation (d_* null) the deformation terms are left out.
#include <cuda_runtime.h>
#include <cstdint>

namespace {

__device__ __forceinline__ void quat_mul(const float a[4], const float b[4], float out[4]) {
  out[0] = a[0] * b[0] - a[1] * b[1] - a[2] * b[2] - a[3] * b[3];
  out[1] = a[0] * b[1] + a[1] * b[0] + a[2] * b[3] - a[3] * b[2];
  out[2] = a[0] * b[2] - a[1] * b[3] + a[2] * b[0] + a[3] * b[1];
  out[3] = a[0] * b[3] + a[1] * b[2] - a[2] * b[1] + a[3] * b[0];
}

// rotation matrix (row-major m[r*3+c]) -> unit quaternion (w, x, y, z), w >= 0; the branch
// with the largest diagonal term, as the twin does.
__device__ __forceinline__ void rotmat_to_quat(const float m[9], float q[4]) {
  const float t = m[0] + m[4] + m[8];
  float c[4];
  if (t >= m[0] && t >= m[4] && t >= m[8]) {
    c[0] = 1.f + t; c[1] = m[7] - m[5]; c[2] = m[2] - m[6]; c[3] = m[3] - m[1];
  } else if (m[0] >= m[4] && m[0] >= m[8]) {
    c[0] = m[7] - m[5]; c[1] = 1.f + m[0] - m[4] - m[8]; c[2] = m[1] + m[3]; c[3] = m[2] + m[6];
  } else if (m[4] >= m[8]) {
    c[0] = m[2] - m[6]; c[1] = m[1] + m[3]; c[2] = 1.f - m[0] + m[4] - m[8]; c[3] = m[5] + m[7];
  } else {
    c[0] = m[3] - m[1]; c[1] = m[2] + m[6]; c[2] = m[5] + m[7]; c[3] = 1.f - m[0] - m[4] + m[8];
  }
  float n = rsqrtf(fmaxf(c[0] * c[0] + c[1] * c[1] + c[2] * c[2] + c[3] * c[3], 1e-24f));
  const float sgn = c[0] < 0.f ? -1.f : 1.f;
  for (int k = 0; k < 4; ++k) q[k] = c[k] * n * sgn;
}

__global__ void pose_kernel(const float* __restrict__ tri_o, const float* __restrict__ tri_r,
                            const float* __restrict__ tri_s, const float* __restrict__ rest_r,
                            const float* __restrict__ local_means, const float* __restrict__ local_quats,
                            const float* __restrict__ local_log_scales, const int32_t* __restrict__ binding,
                            const float* __restrict__ d_means, const float* __restrict__ d_quats,
                            const float* __restrict__ d_log_scales, float* __restrict__ out_means,
                            float* __restrict__ out_quats, float* __restrict__ out_scales, int n, int n_tri,
                            int batch) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(n) * batch) return;
  const int i = int(idx % n);
  const int b = int(idx / n);
  const int f = binding[i];
  const bool deform = d_means != nullptr;
  const float lm[3] = {local_means[3 * i], local_means[3 * i + 1], local_means[3 * i + 2]};
  const float lq[4] = {local_quats[4 * i], local_quats[4 * i + 1], local_quats[4 * i + 2], local_quats[4 * i + 3]};
  float ls[3] = {local_log_scales[3 * i], local_log_scales[3 * i + 1], local_log_scales[3 * i + 2]};
  float dm[3] = {0.f, 0.f, 0.f};
  float dq[4] = {1.f, 0.f, 0.f, 0.f};
  if (deform) {
    const int64_t j = idx;
    for (int k = 0; k < 3; ++k) {
      dm[k] = d_means[3 * j + k];
      ls[k] += d_log_scales[3 * j + k];
    }
    for (int k = 0; k < 4; ++k) dq[k] = d_quats[4 * j + k];
  }
  float mean[3], q[4], sc[3];
  if (f >= 0) {
    const int64_t t = int64_t(b) * n_tri + f;
    float R[9];
    for (int k = 0; k < 9; ++k) R[k] = tri_r[9 * t + k];
    const float s = tri_s[t];
    for (int r = 0; r < 3; ++r) {
      mean[r] = tri_o[3 * t + r] + s * (R[3 * r] * lm[0] + R[3 * r + 1] * lm[1] + R[3 * r + 2] * lm[2]);
    }
    if (deform) {  // rest-space offset -> rest-local (R0^T) -> posed (R)
      const float* R0 = rest_r + 9 * int64_t(f);
      float loc[3];
      for (int c = 0; c < 3; ++c) loc[c] = R0[c] * dm[0] + R0[3 + c] * dm[1] + R0[6 + c] * dm[2];
      for (int r = 0; r < 3; ++r) mean[r] += R[3 * r] * loc[0] + R[3 * r + 1] * loc[1] + R[3 * r + 2] * loc[2];
    }
    float qr[4];
    rotmat_to_quat(R, qr);
    quat_mul(qr, lq, q);
    for (int k = 0; k < 3; ++k) sc[k] = s * __expf(ls[k]);
  } else {
    for (int k = 0; k < 3; ++k) {
      mean[k] = lm[k] + dm[k];
      sc[k] = __expf(ls[k]);
    }
    for (int k = 0; k < 4; ++k) q[k] = lq[k];
  }
  float qo[4];
  if (deform) {
    quat_mul(q, dq, qo);
  } else {
    for (int k = 0; k < 4; ++k) qo[k] = q[k];
  }
  for (int k = 0; k < 3; ++k) {
    out_means[3 * idx + k] = mean[k];
    out_scales[3 * idx + k] = sc[k];
  }
  for (int k = 0; k < 4; ++k) out_quats[4 * idx + k] = qo[k];
}

}  // namespace

extern "C" cudaError_t gstalk_pose_gaussians(const float* tri_o, const float* tri_r, const float* tri_s,
                                             const float* rest_r, const float* local_means,
                                             const float* local_quats, const float* local_log_scales,
                                             const int32_t* binding, const float* d_means, const float* d_quats,
                                             const float* d_log_scales, float* out_means, float* out_quats,
                                             float* out_scales, int n, int n_tri, int batch, cudaStream_t stream) {
  const int64_t total = int64_t(n) * batch;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int blocks = int((total + threads - 1) / threads);
  pose_kernel<<<blocks, threads, 0, stream>>>(tri_o, tri_r, tri_s, rest_r, local_means, local_quats,
                                              local_log_scales, binding, d_means, d_quats, d_log_scales, out_means,
                                              out_quats, out_scales, n, n_tri, batch);
  return cudaGetLastError();
}
