// torch binding of gstalk's fused posing kernel (csrc/pose_kernels.cu). Forward only: the
// kernel serves rendering, driving and the viewer; training differentiates the PyTorch twin.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cstdint>

extern "C" cudaError_t gstalk_pose_gaussians(const float* tri_o, const float* tri_r, const float* tri_s,
                                             const float* rest_r, const float* local_means,
                                             const float* local_quats, const float* local_log_scales,
                                             const int32_t* binding, const float* d_means, const float* d_quats,
                                             const float* d_log_scales, float* out_means, float* out_quats,
                                             float* out_scales, int n, int n_tri, int batch, cudaStream_t stream);

static void check(const torch::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == torch::kFloat32, name,
              " must be a contiguous float32 CUDA tensor");
  TORCH_CHECK(t.dim() == int64_t(shape.size()), name, " has the wrong number of dimensions");
  for (size_t k = 0; k < shape.size(); ++k) {
    TORCH_CHECK(shape[k] < 0 || t.size(k) == shape[k], name, " has the wrong shape at dimension ", k);
  }
}

std::vector<torch::Tensor> pose(torch::Tensor tri_o, torch::Tensor tri_r, torch::Tensor tri_s, torch::Tensor rest_r,
                                torch::Tensor local_means, torch::Tensor local_quats, torch::Tensor local_log_scales,
                                torch::Tensor binding, c10::optional<torch::Tensor> d_means,
                                c10::optional<torch::Tensor> d_quats, c10::optional<torch::Tensor> d_log_scales) {
  const int64_t B = tri_o.size(0), F = tri_o.size(1), N = local_means.size(0);
  check(tri_o, "tri_o", {B, F, 3});
  check(tri_r, "tri_r", {B, F, 3, 3});
  check(tri_s, "tri_s", {B, F});
  check(rest_r, "rest_r", {F, 3, 3});
  check(local_means, "local_means", {N, 3});
  check(local_quats, "local_quats", {N, 4});
  check(local_log_scales, "local_log_scales", {N, 3});
  TORCH_CHECK(binding.is_cuda() && binding.scalar_type() == torch::kInt32 && binding.is_contiguous() &&
                  binding.dim() == 1 && binding.size(0) == N, "binding must be a contiguous int32 CUDA [N]");
  const bool deform = d_means.has_value();
  if (deform) {
    TORCH_CHECK(d_quats.has_value() && d_log_scales.has_value(), "give all three deformation outputs or none");
    check(*d_means, "d_means", {B, N, 3});
    check(*d_quats, "d_quats", {B, N, 4});
    check(*d_log_scales, "d_log_scales", {B, N, 3});
  }
  auto opts = local_means.options();
  auto means = torch::empty({B, N, 3}, opts), quats = torch::empty({B, N, 4}, opts), scales = torch::empty({B, N, 3}, opts);
  auto err = gstalk_pose_gaussians(
      tri_o.data_ptr<float>(), tri_r.data_ptr<float>(), tri_s.data_ptr<float>(), rest_r.data_ptr<float>(),
      local_means.data_ptr<float>(), local_quats.data_ptr<float>(), local_log_scales.data_ptr<float>(),
      binding.data_ptr<int32_t>(), deform ? d_means->data_ptr<float>() : nullptr,
      deform ? d_quats->data_ptr<float>() : nullptr, deform ? d_log_scales->data_ptr<float>() : nullptr,
      means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(), int(N), int(F), int(B),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "pose kernel failed: ", cudaGetErrorString(err));
  return {means, quats, scales};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pose", &pose, "fused triangle binding + deformation of every Gaussian (CUDA)");
}
