// NF4 dequantization on the CPU, bit-exact with bitsandbytes: W[i] = NF4[nibble(i)] * absmax[i / blocksize]
// in fp32, rounded once to the output dtype. Per block, the 16 possible outputs are computed once into a table,
// so the inner loop is two table lookups per packed byte.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>

namespace fastlora {
namespace {

constexpr std::array<float, 16> kNF4 = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};
constexpr int64_t kAbsmaxBlock = 256;  // second-level blocksize of double quantization

// bitsandbytes decodes a double-quantized absmax with a multiply and then an add, each rounded; the volatile
// keeps the compiler from fusing them into one FMA, which would change the last bit.
inline float nested_scale(const float* code, const uint8_t* absmax, const float* absmax2, float offset,
                          int64_t block) {
  volatile float product = code[absmax[block]] * absmax2[block / kAbsmaxBlock];
  return product + offset;
}

template <typename T>
void dequantize_blocks(const uint8_t* data, const float* absmax_f32, const uint8_t* absmax_u8, const float* code,
                       const float* absmax2, float offset, int64_t blocksize, int64_t numel, T* out,
                       int64_t first_block, int64_t end_block) {
  std::array<T, 16> table;
  for (int64_t block = first_block; block < end_block; ++block) {
    const float scale =
        absmax_u8 != nullptr ? nested_scale(code, absmax_u8, absmax2, offset, block) : absmax_f32[block];
    for (int k = 0; k < 16; ++k) table[k] = static_cast<T>(kNF4[k] * scale);
    // Blocksizes are even, so a block starts on a byte boundary; only the weight's last block can be ragged.
    const int64_t begin = block * blocksize;
    const int64_t end = std::min(begin + blocksize, numel);
    const int64_t pairs = (end - begin) / 2;
    const uint8_t* bytes = data + begin / 2;
    T* dst = out + begin;
    for (int64_t j = 0; j < pairs; ++j) {
      const uint8_t b = bytes[j];
      dst[2 * j] = table[b >> 4];
      dst[2 * j + 1] = table[b & 0xF];
    }
    if ((end - begin) % 2) dst[2 * pairs] = table[bytes[pairs] >> 4];  // an odd count: the last high nibble
  }
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "fastlora::native_nf4_dequantize: ", what); }

void nf4_dequantize(const at::Tensor& data, const at::Tensor& absmax, const std::optional<at::Tensor>& absmax_code,
                    const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& offset,
                    int64_t blocksize, int64_t numel, const at::Tensor& out) {
  check(data.is_cpu() && absmax.is_cpu() && out.is_cpu(), "tensors must be on the CPU");
  check(data.scalar_type() == at::kByte && data.is_contiguous(), "data must be contiguous uint8");
  check(data.numel() == (numel + 1) / 2, "data must hold (numel + 1) / 2 bytes");
  check(blocksize >= 2 && blocksize % 2 == 0, "blocksize must be even");
  check(out.is_contiguous() && out.numel() == numel, "out must be contiguous with numel elements");
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  check(absmax.is_contiguous() && absmax.numel() == blocks, "absmax must hold one value per block");
  const bool nested = absmax_code.has_value();
  check(nested == absmax2.has_value() && nested == offset.has_value(),
        "absmax_code, absmax2 and offset come together");
  const float* code = nullptr;
  const float* scale2 = nullptr;
  float off = 0.0f;
  at::Tensor code_table;  // keeps a contiguous copy alive while the loops read it
  if (nested) {
    check(absmax.scalar_type() == at::kByte, "absmax must be uint8 codes with double quantization");
    check(absmax_code->scalar_type() == at::kFloat && absmax_code->numel() == 256, "absmax_code must be fp32[256]");
    check(absmax2->scalar_type() == at::kFloat && absmax2->is_contiguous() &&
              absmax2->numel() == (blocks + kAbsmaxBlock - 1) / kAbsmaxBlock,
          "absmax2 must hold one fp32 value per 256 blocks");
    check(offset->scalar_type() == at::kFloat && offset->numel() == 1, "offset must be an fp32 scalar");
    code_table = absmax_code->contiguous();
    code = code_table.const_data_ptr<float>();
    scale2 = absmax2->const_data_ptr<float>();
    off = offset->item<float>();  // a CPU scalar: no device sync
  } else {
    check(absmax.scalar_type() == at::kFloat, "absmax must be fp32 without double quantization");
  }
  const uint8_t* bytes = data.const_data_ptr<uint8_t>();
  const float* absmax_f32 = nested ? nullptr : absmax.const_data_ptr<float>();
  const uint8_t* absmax_u8 = nested ? absmax.const_data_ptr<uint8_t>() : nullptr;
  // Enough blocks per task to amortise the table: about 16K elements.
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "native_nf4_dequantize", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t end) {
      dequantize_blocks(bytes, absmax_f32, absmax_u8, code, scale2, off, blocksize, numel, dst, first, end);
    });
  });
}

void nf4_dequantize_meta(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t,
                         const at::Tensor&) {}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def(
      "native_nf4_dequantize(Tensor data, Tensor absmax, Tensor? absmax_code, Tensor? absmax2, Tensor? offset, "
      "int blocksize, int numel, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) { m.impl("native_nf4_dequantize", &nf4_dequantize); }

TORCH_LIBRARY_IMPL(fastlora, Meta, m) { m.impl("native_nf4_dequantize", &nf4_dequantize_meta); }

}  // namespace fastlora
