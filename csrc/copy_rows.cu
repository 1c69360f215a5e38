// Compaction kernel: rows[dst[i]] = rows[src[i]] for every i, where no destination is a
// source (compaction copies out of place, into fresh blocks). One pass, one warp per row,
// 16-byte vector copies when the row length allows. It copies bits, so any 2-byte or
// 1-byte dtype (fp16, bf16, fp8) and any head size whose rows are 16-byte multiples (64,
// 80, 96, 128, ... for fp16/bf16) take the vector path; others fall back to 2-byte or
// 1-byte copies.
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void copy_rows_kernel(T* __restrict__ rows, int64_t row_stride,
                                 const int64_t* __restrict__ src,
                                 const int64_t* __restrict__ dst, int64_t num_rows,
                                 int64_t row_len) {
  const int64_t warp = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t i = warp; i < num_rows; i += (int64_t)gridDim.x * kWarpsPerBlock) {
    const T* from = rows + src[i] * row_stride;
    T* to = rows + dst[i] * row_stride;
    for (int64_t j = lane; j < row_len; j += 32) to[j] = from[j];
  }
}

template <typename T>
void launch(torch::Tensor& rows, const torch::Tensor& src, const torch::Tensor& dst) {
  const int64_t elem = rows.element_size();
  const int64_t row_len = rows.size(1) * elem / sizeof(T);
  const int64_t row_stride = rows.stride(0) * elem / sizeof(T);
  const int64_t n = src.numel();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((n + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535 * 8);
  copy_rows_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      reinterpret_cast<T*>(rows.data_ptr()), row_stride, src.data_ptr<int64_t>(),
      dst.data_ptr<int64_t>(), n, row_len);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool fits(const torch::Tensor& rows, int64_t width) {
  const int64_t bytes = rows.size(1) * rows.element_size();
  const int64_t stride = rows.stride(0) * rows.element_size();
  return bytes % width == 0 && stride % width == 0 &&
         reinterpret_cast<uintptr_t>(rows.data_ptr()) % width == 0;
}

}  // namespace

void copy_rows(torch::Tensor rows, torch::Tensor src, torch::Tensor dst) {
  TORCH_CHECK(rows.is_cuda() && src.is_cuda() && dst.is_cuda(), "copy_rows: CUDA tensors expected");
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1, "copy_rows: rows must be [R, E] with unit last stride");
  TORCH_CHECK(src.scalar_type() == torch::kInt64 && dst.scalar_type() == torch::kInt64,
              "copy_rows: int64 indices expected");
  TORCH_CHECK(src.numel() == dst.numel(), "copy_rows: src and dst differ in length");
  if (src.numel() == 0) return;
  const at::cuda::OptionalCUDAGuard guard(rows.device());
  auto s = src.contiguous(), d = dst.contiguous();
  if (fits(rows, 16)) launch<int4>(rows, s, d);
  else if (fits(rows, 2)) launch<uint16_t>(rows, s, d);
  else launch<uint8_t>(rows, s, d);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("copy_rows", &copy_rows, "rows[dst] = rows[src], no destination a source (one pass)");
}
