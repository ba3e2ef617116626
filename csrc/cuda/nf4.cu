// NF4 dequantization on NVIDIA GPUs that Triton does not serve (Volta): the CUDA kernel behind the `cuda`
// backend of nf4_dequantize. Bit-exact with bitsandbytes: NF4[nibble] * absmax in fp32, one rounding to the
// output dtype; a double-quantized absmax is decoded with a multiply and then an add, each rounded (the _rn
// intrinsics are never contracted into an FMA). The op's schema is defined in csrc/cpu/nf4.cpp.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

namespace fastlora {
namespace {

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};
constexpr int kThreads = 256;

// One thread per packed byte (two outputs), grid-stride. Nibble indices diverge within a warp, so the table is
// read from shared memory rather than the constant cache, which serialises divergent reads.
template <typename T, bool NESTED>
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ data, const float* __restrict__ absmax_f32,
                                      const uint8_t* __restrict__ absmax_u8, const float* __restrict__ code,
                                      const float* __restrict__ absmax2, const float* __restrict__ offset,
                                      int64_t blocksize, int64_t numel, T* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = kNF4[threadIdx.x];
  __syncthreads();
  const int64_t bytes = (numel + 1) / 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < bytes; b += stride) {
    const int64_t block = (2 * b) / blocksize;  // blocksizes are even: both elements share the block
    float scale;
    if constexpr (NESTED) {
      scale = __fadd_rn(__fmul_rn(code[absmax_u8[block]], absmax2[block / 256]), *offset);
    } else {
      scale = absmax_f32[block];
    }
    const uint8_t byte = data[b];
    out[2 * b] = static_cast<T>(__fmul_rn(table[byte >> 4], scale));
    if (2 * b + 1 < numel) out[2 * b + 1] = static_cast<T>(__fmul_rn(table[byte & 0xF], scale));
  }
}

void nf4_dequantize_cuda(const at::Tensor& data, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax_code,
                         const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                         int64_t blocksize, int64_t numel, const at::Tensor& out) {
  TORCH_CHECK(data.is_cuda() && absmax.is_cuda() && out.is_cuda() && data.device() == out.device(),
              "fastlora::native_nf4_dequantize: tensors must be on one CUDA device");
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == (numel + 1) / 2,
              "fastlora::native_nf4_dequantize: data must be contiguous uint8 of (numel + 1) / 2 bytes");
  TORCH_CHECK(out.is_contiguous() && out.numel() == numel,
              "fastlora::native_nf4_dequantize: out must be contiguous with numel elements");
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, "fastlora::native_nf4_dequantize: blocksize must be even");
  const bool nested = absmax_code.has_value();
  TORCH_CHECK(nested == absmax2.has_value() && nested == offset.has_value(),
              "fastlora::native_nf4_dequantize: absmax_code, absmax2 and offset come together");
  TORCH_CHECK(absmax.scalar_type() == (nested ? at::kByte : at::kFloat) && absmax.is_contiguous(),
              "fastlora::native_nf4_dequantize: absmax must be contiguous uint8 codes (double quantization) or fp32");
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(data.device());
  const int64_t bytes = (numel + 1) / 2;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, data.device().index()));
  const int blocks = static_cast<int>(std::min<int64_t>((bytes + kThreads - 1) / kThreads, int64_t{sms} * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t* d = data.const_data_ptr<uint8_t>();
  const at::Tensor code_table = nested ? absmax_code->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "native_nf4_dequantize", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    if (nested) {
      nf4_dequantize_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          d, nullptr, absmax.const_data_ptr<uint8_t>(), code_table.const_data_ptr<float>(),
          absmax2->const_data_ptr<float>(), offset->const_data_ptr<float>(), blocksize, numel, o);
    } else {
      nf4_dequantize_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          d, absmax.const_data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, blocksize, numel, o);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlora, CUDA, m) { m.impl("native_nf4_dequantize", &nf4_dequantize_cuda); }

}  // namespace fastlora
