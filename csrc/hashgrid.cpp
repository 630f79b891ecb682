// torch binding of gstalk's hash-encoding kernels (csrc/hashgrid_kernels.cu).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <cstdint>

extern "C" cudaError_t gstalk_hash_forward(const float* x, const float* tables, const int* res, float* out, int n,
                                          int dim, int levels, uint32_t table_size, int features,
                                          cudaStream_t stream);
extern "C" cudaError_t gstalk_hash_backward(const float* grad, const float* x, const int* res, float* grad_tables,
                                           int n, int dim, int levels, uint32_t table_size, int features,
                                           cudaStream_t stream);

static void check_inputs(const torch::Tensor& x, const torch::Tensor& res) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 CUDA [N, D]");
  TORCH_CHECK(x.size(1) == 2 || x.size(1) == 3, "x must be 2D or 3D points");
  TORCH_CHECK(res.is_cuda() && res.scalar_type() == torch::kInt32, "resolutions must be int32 on CUDA");
}

torch::Tensor hash_forward(torch::Tensor x, torch::Tensor tables, torch::Tensor res) {
  check_inputs(x, res);
  TORCH_CHECK(tables.is_cuda() && tables.scalar_type() == torch::kFloat32 && tables.dim() == 3 &&
                  tables.is_contiguous(), "tables must be contiguous float32 CUDA [L, T, F]");
  const int64_t table_size = tables.size(1);
  TORCH_CHECK((table_size & (table_size - 1)) == 0, "table size must be a power of two");
  auto out = torch::empty({x.size(0), tables.size(0) * tables.size(2)}, x.options());
  auto err = gstalk_hash_forward(x.data_ptr<float>(), tables.data_ptr<float>(), res.data_ptr<int>(),
                                 out.data_ptr<float>(), x.size(0), x.size(1), tables.size(0), uint32_t(table_size),
                                 tables.size(2), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hash forward kernel failed: ", cudaGetErrorString(err));
  return out;
}

torch::Tensor hash_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor res, int64_t levels,
                            int64_t table_size, int64_t features) {
  check_inputs(x, res);
  TORCH_CHECK(grad.is_cuda() && grad.scalar_type() == torch::kFloat32 && grad.is_contiguous(),
              "grad must be contiguous float32 CUDA");
  auto grad_tables = torch::zeros({levels, table_size, features}, x.options());
  auto err = gstalk_hash_backward(grad.data_ptr<float>(), x.data_ptr<float>(), res.data_ptr<int>(),
                                  grad_tables.data_ptr<float>(), x.size(0), x.size(1), levels, uint32_t(table_size),
                                  features, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "hash backward kernel failed: ", cudaGetErrorString(err));
  return grad_tables;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &hash_forward, "hash encoding forward (CUDA)");
  m.def("backward", &hash_backward, "hash encoding backward w.r.t. the tables (CUDA)");
}
