// NF4 dequantization on the CPU, bit-exact with bitsandbytes: W[i] = NF4[nibble(i)] * absmax[i / blocksize]
// in fp32, rounded once to the output dtype. A block has only 16 possible outputs, so each path builds that
// table once per block, already rounded to the output dtype, and then only looks values up: the AVX-512 path
// 16 or 32 at a time with one permute of a register holding the table, the AVX2 path with two 8-entry permutes
// and a blend (fp32) or two byte shuffles (16-bit outputs), the portable path one by one.
//
// The SIMD paths carry per-function target attributes, so a build for any x86-64 CPU holds them all; the path
// is chosen at each call from what this CPU supports (see current_isa).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTLORA_X86_SIMD 1
#define FASTLORA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define FASTLORA_AVX2 __attribute__((target("avx2,f16c")))
#endif

namespace fastlora {
namespace {

alignas(64) constexpr std::array<float, 16> kNF4 = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};
constexpr int64_t kAbsmaxBlock = 256;  // second-level blocksize of double quantization

// What one call decodes; every path reads the same fields.
struct Source {
  const uint8_t* data;
  const float* absmax_f32;  // plain absmax, or nullptr when nested
  const uint8_t* absmax_u8;  // nested: codes into `code`
  const float* code;
  const float* absmax2;
  float offset;
  int64_t blocksize;
  int64_t numel;

  // bitsandbytes decodes a double-quantized absmax with a multiply and then an add, each rounded; the volatile
  // keeps the compiler from fusing them into one FMA, which would change the last bit.
  float scale(int64_t block) const {
    if (absmax_u8 == nullptr) return absmax_f32[block];
    volatile float product = code[absmax_u8[block]] * absmax2[block / kAbsmaxBlock];
    return product + offset;
  }
  int64_t begin(int64_t block) const { return block * blocksize; }
  // Blocksizes are even, so a block starts on a byte boundary; only the weight's last block can be ragged.
  int64_t count(int64_t block) const { return std::min(blocksize, numel - block * blocksize); }
};

// Elements [0, n) of a block whose bytes start at `bytes`, through a table of the block's 16 outputs.
template <typename T>
inline void lookup_scalar(const uint8_t* bytes, int64_t n, const T* table, T* dst) {
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t b = bytes[j];
    dst[2 * j] = table[b >> 4];
    dst[2 * j + 1] = table[b & 0xF];
  }
  if (n % 2) dst[2 * pairs] = table[bytes[pairs] >> 4];  // an odd count: the last high nibble
}

template <typename T>
void blocks_portable(const Source& s, T* out, int64_t first, int64_t last) {
  std::array<T, 16> table;
  for (int64_t block = first; block < last; ++block) {
    const float scale = s.scale(block);
    // NF4[0] is -1 and NF4[15] is 1: a sign flip and a copy, as a compiler folds those products when it sees the
    // constants (a NaN scale then keeps its payload, and its sign flips at -1), but not when it vectorises the
    // loop; spelled out, every build and every path gives the same bits.
    table[0] = static_cast<T>(-scale);
    for (int k = 1; k < 15; ++k) table[k] = static_cast<T>(kNF4[k] * scale);
    table[15] = static_cast<T>(scale);
    lookup_scalar(s.data + s.begin(block) / 2, s.count(block), table.data(), out + s.begin(block));
  }
}

#ifdef FASTLORA_X86_SIMD
// The helpers below pass vectors by value between functions of one target; GCC warns about the ABI of a
// vector argument in a build without AVX, which does not apply to functions it inlines.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// c10::BFloat16's rounding (round to nearest even; every NaN becomes 0x7FC0), on 16 lanes. Not VCVTNEPS2BF16:
// it flushes subnormals to zero, c10 does not.
FASTLORA_AVX512 inline __m256i bf16_avx512(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// The hardware conversion is c10::Half's own in a build with F16C (c10 calls _cvtss_sh, rounding the same way).
// Without F16C c10 converts in software, which agrees on every value but NaN: it makes each one sign | 0x7E00.
FASTLORA_AVX512 inline __m256i half_avx512(__m512 f) {
  const __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
#ifdef __F16C__
  return h;
#else
  const __m256i magnitude = _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF));
  const __m256i canonical = _mm256_or_si256(_mm256_andnot_si256(magnitude, h), _mm256_set1_epi16(0x7E00));
  return _mm256_mask_mov_epi16(h, _mm256_cmpgt_epi16_mask(magnitude, _mm256_set1_epi16(0x7C00)), canonical);
#endif
}

// NF4 times the scale with entries 0 and 15 a sign flip and a copy, as blocks_portable computes them.
FASTLORA_AVX512 inline __m512 scaled_avx512(__m512 nf4, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  const __m512 flipped =
      _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), _mm512_set1_epi32(INT32_MIN)));
  return _mm512_mask_mov_ps(_mm512_mask_mov_ps(_mm512_mul_ps(nf4, s), 0x0001, flipped), 0x8000, s);
}

FASTLORA_AVX512 void blocks_avx512_f32(const Source& s, float* out, int64_t first, int64_t last) {
  const __m512 nf4 = _mm512_load_ps(kNF4.data());
  for (int64_t block = first; block < last; ++block) {
    const __m512 table = scaled_avx512(nf4, s.scale(block));
    const int64_t n = s.count(block);
    const uint8_t* src = s.data + s.begin(block) / 2;
    float* dst = out + s.begin(block);
    // Each byte widened to a 64-bit lane as (byte >> 4) | (byte << 32): the low dword indexes the element
    // before the high one, as the high nibble comes first; the permute reads only each dword's low 4 bits.
    auto lookup = [&](__m128i bytes) FASTLORA_AVX512 {
      const __m512i q = _mm512_cvtepu8_epi64(bytes);
      return _mm512_permutexvar_ps(_mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32)), table);
    };
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      _mm512_storeu_ps(dst + i, lookup(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i / 2))));
    }
    if (i < n) {  // masked: never reads or writes past the weight
      const int64_t rest = n - i;
      const __m128i bytes = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((rest + 1) / 2)) - 1), src + i / 2);
      _mm512_mask_storeu_ps(dst + i, static_cast<__mmask16>((1u << rest) - 1), lookup(bytes));
    }
  }
}

template <bool kHalf>
FASTLORA_AVX512 void blocks_avx512_16(const Source& s, uint16_t* out, int64_t first, int64_t last) {
  const __m512 nf4 = _mm512_load_ps(kNF4.data());
  for (int64_t block = first; block < last; ++block) {
    const __m512 scaled = scaled_avx512(nf4, s.scale(block));
    // The 16 rounded outputs in both halves of the register: the word permute reads 5 index bits.
    const __m512i table = _mm512_broadcast_i64x4(kHalf ? half_avx512(scaled) : bf16_avx512(scaled));
    const int64_t n = s.count(block);
    const uint8_t* src = s.data + s.begin(block) / 2;
    uint16_t* dst = out + s.begin(block);
    // Each byte widened to a dword as (byte >> 4) | (byte << 16): two word indices, high nibble first; the
    // low word's extra bits (4..7 of the byte) land in the duplicated half of the table.
    auto lookup = [&](__m128i bytes) FASTLORA_AVX512 {
      const __m512i d = _mm512_cvtepu8_epi32(bytes);
      return _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16)), table);
    };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      _mm512_storeu_si512(dst + i, lookup(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i / 2))));
    }
    if (i < n) {
      const int64_t rest = n - i;
      const __m128i bytes = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((rest + 1) / 2)) - 1), src + i / 2);
      _mm512_mask_storeu_epi16(dst + i, static_cast<__mmask32>((1ull << rest) - 1), lookup(bytes));
    }
  }
}

// As scaled_avx512: the table's low half (entry 0 is -1) and high half (entry 15 is 1).
FASTLORA_AVX2 inline __m256 scaled_lo_avx2(__m256 nf4_lo, __m256 s) {
  const __m256 flipped =
      _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(s), _mm256_set1_epi32(INT32_MIN)));
  return _mm256_blend_ps(_mm256_mul_ps(nf4_lo, s), flipped, 0x01);
}
FASTLORA_AVX2 inline __m256 scaled_hi_avx2(__m256 nf4_hi, __m256 s) {
  return _mm256_blend_ps(_mm256_mul_ps(nf4_hi, s), s, 0x80);
}

FASTLORA_AVX2 void blocks_avx2_f32(const Source& s, float* out, int64_t first, int64_t last) {
  const __m256 nf4_lo = _mm256_load_ps(kNF4.data());
  const __m256 nf4_hi = _mm256_load_ps(kNF4.data() + 8);
  for (int64_t block = first; block < last; ++block) {
    const __m256 scale = _mm256_set1_ps(s.scale(block));
    const __m256 lo = scaled_lo_avx2(nf4_lo, scale);
    const __m256 hi = scaled_hi_avx2(nf4_hi, scale);
    const int64_t n = s.count(block);
    const uint8_t* src = s.data + s.begin(block) / 2;
    float* dst = out + s.begin(block);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      int32_t word;
      std::memcpy(&word, src + i / 2, 4);
      // As in the AVX-512 path, 64-bit lanes of (byte >> 4) | (byte << 32); bit 3 of each index picks the
      // upper half of the table, shifted into the sign bit that the blend reads.
      const __m256i q = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(word));
      const __m256i idx = _mm256_or_si256(_mm256_srli_epi64(q, 4), _mm256_slli_epi64(q, 32));
      const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      _mm256_storeu_ps(dst + i, v);
    }
    if (i < n) {
      alignas(32) float table[16];
      _mm256_store_ps(table, lo);
      _mm256_store_ps(table + 8, hi);
      lookup_scalar(src + i / 2, n - i, table, dst + i);
    }
  }
}

template <bool kHalf>
FASTLORA_AVX2 inline __m256i round16_avx2(__m256 lo, __m256 hi) {
  if (kHalf) {  // as half_avx512
    const __m256i h = _mm256_set_m128i(_mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT),
                                       _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT));
#ifdef __F16C__
    return h;
#else
    const __m256i magnitude = _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF));
    const __m256i canonical = _mm256_or_si256(_mm256_andnot_si256(magnitude, h), _mm256_set1_epi16(0x7E00));
    return _mm256_blendv_epi8(h, canonical, _mm256_cmpgt_epi16(magnitude, _mm256_set1_epi16(0x7C00)));
#endif
  }
  auto bf16 = [](__m256 f) FASTLORA_AVX2 {  // as bf16_avx512, in dwords
    const __m256i u = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r =
        _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0),
                              _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
  };
  // packus interleaves the two inputs by 128-bit lane; the permute puts the words back in order.
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16(lo), bf16(hi)), 0xD8);
}

template <bool kHalf>
FASTLORA_AVX2 void blocks_avx2_16(const Source& s, uint16_t* out, int64_t first, int64_t last) {
  const __m256 nf4_lo = _mm256_load_ps(kNF4.data());
  const __m256 nf4_hi = _mm256_load_ps(kNF4.data() + 8);
  // Within each lane: the low bytes of the eight words, then their high bytes.
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t block = first; block < last; ++block) {
    const __m256 scale = _mm256_set1_ps(s.scale(block));
    const __m256i words = round16_avx2<kHalf>(scaled_lo_avx2(nf4_lo, scale), scaled_hi_avx2(nf4_hi, scale));
    // Two 16-byte tables (the outputs' low and high bytes), each in both lanes, for the byte shuffle.
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(words, split), 0xD8);
    const __m256i low = _mm256_permute2x128_si256(bytes, bytes, 0x00);
    const __m256i high = _mm256_permute2x128_si256(bytes, bytes, 0x11);
    const int64_t n = s.count(block);
    const uint8_t* src = s.data + s.begin(block) / 2;
    uint16_t* dst = out + s.begin(block);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m128i in = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i / 2));
      const __m128i h = _mm_and_si128(_mm_srli_epi16(in, 4), nibble);
      const __m128i l = _mm_and_si128(in, nibble);
      // Nibble indices in element order, outputs 0-15 in lane 0 and 16-31 in lane 1.
      const __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(h, l), _mm_unpacklo_epi8(h, l));
      const __m256i lb = _mm256_shuffle_epi8(low, idx);
      const __m256i hb = _mm256_shuffle_epi8(high, idx);
      const __m256i w0 = _mm256_unpacklo_epi8(lb, hb);  // outputs 0-7 | 16-23
      const __m256i w1 = _mm256_unpackhi_epi8(lb, hb);  // outputs 8-15 | 24-31
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute2x128_si256(w0, w1, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
    }
    if (i < n) {
      alignas(32) uint16_t table[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(table), words);
      lookup_scalar(src + i / 2, n - i, table, dst + i);
    }
  }
}

#pragma GCC diagnostic pop
#endif  // FASTLORA_X86_SIMD

enum class Isa { kPortable, kAvx2, kAvx512 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

// What this CPU (and its OS, which must save the wider registers) can run; "" when it can.
std::string missing(Isa isa) {
#ifdef FASTLORA_X86_SIMD
  __builtin_cpu_init();
  if (isa == Isa::kAvx512) {
    if (!__builtin_cpu_supports("avx512f")) return "this CPU lacks avx512f";
    if (!__builtin_cpu_supports("avx512bw")) return "this CPU lacks avx512bw";
    if (!__builtin_cpu_supports("avx512vl")) return "this CPU lacks avx512vl";
  }
  if (isa == Isa::kAvx2) {
    if (!__builtin_cpu_supports("avx2")) return "this CPU lacks avx2";
    if (!__builtin_cpu_supports("f16c")) return "this CPU lacks f16c";
  }
  return "";
#else
  return isa == Isa::kPortable ? "" : "not an x86-64 build";
#endif
}

// The widest path this CPU runs, capped by ATEN_CPU_CAPABILITY when it names a narrower one, so that the runs
// which test torch's other CPU kernels this way test these paths too.
Isa default_isa() {
  static const Isa isa = [] {
    const char* aten = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = aten ? aten : "";
    Isa best = missing(Isa::kAvx512).empty() ? Isa::kAvx512
               : missing(Isa::kAvx2).empty() ? Isa::kAvx2
                                             : Isa::kPortable;
    if (cap == "default") return Isa::kPortable;
    if (cap == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
    return best;
  }();
  return isa;
}

// FASTLORA_CPU_ISA (read at every call, for tests and benchmarks) forces a path; one this CPU cannot run is an
// error, never a silent fallback.
Isa current_isa() {
  const char* env = std::getenv("FASTLORA_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return default_isa();
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kPortable}) {
    if (std::strcmp(env, isa_name(isa)) == 0) {
      const std::string why = missing(isa);
      TORCH_CHECK(why.empty(), "fastlora: FASTLORA_CPU_ISA=", env, " cannot run here: ", why);
      return isa;
    }
  }
  TORCH_CHECK(false, "fastlora: FASTLORA_CPU_ISA=", env, " is not one of auto, avx512, avx2, portable");
  return Isa::kPortable;
}

template <typename T>
void run_blocks(Isa isa, const Source& s, T* out, int64_t first, int64_t last) {
#ifdef FASTLORA_X86_SIMD
  constexpr bool k16 = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
  constexpr bool kHalf = std::is_same_v<T, c10::Half>;
  if constexpr (std::is_same_v<T, float> || k16) {
    if (isa == Isa::kAvx512) {
      if constexpr (k16) return blocks_avx512_16<kHalf>(s, reinterpret_cast<uint16_t*>(out), first, last);
      else return blocks_avx512_f32(s, out, first, last);
    }
    if (isa == Isa::kAvx2) {
      if constexpr (k16) return blocks_avx2_16<kHalf>(s, reinterpret_cast<uint16_t*>(out), first, last);
      else return blocks_avx2_f32(s, out, first, last);
    }
  }
#endif
  blocks_portable(s, out, first, last);  // also every path's fp64
}

std::string cpu_isa() { return isa_name(current_isa()); }

// A fresh output's first touch faults its memory in one 4 KB page at a time, and those faults cost more than the
// decoding (about 2 us a page on a virtual machine: 16 ms of a 4096x4096 bf16 weight's 22 ms); 2 MB pages take
// 512x fewer. Only memory nobody has touched yet is advised (its first page is not resident), so a buffer in use
// keeps its pages; where transparent huge pages are off, or FASTLORA_CPU_HUGEPAGES=0, nothing changes.
void advise_huge_pages(void* ptr, size_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end <= begin) return;
  const char* env = std::getenv("FASTLORA_CPU_HUGEPAGES");
  if (env != nullptr && std::strcmp(env, "0") == 0) return;
  unsigned char resident = 1;
  if (mincore(reinterpret_cast<void*>(begin), 1, &resident) == 0 && !(resident & 1)) {
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice: a failure changes nothing
  }
#endif
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
  Source s{data.const_data_ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr, 0.0f, blocksize, numel};
  at::Tensor code_table;  // keeps a contiguous copy alive while the loops read it
  if (nested) {
    check(absmax.scalar_type() == at::kByte, "absmax must be uint8 codes with double quantization");
    check(absmax_code->scalar_type() == at::kFloat && absmax_code->numel() == 256, "absmax_code must be fp32[256]");
    check(absmax2->scalar_type() == at::kFloat && absmax2->is_contiguous() &&
              absmax2->numel() == (blocks + kAbsmaxBlock - 1) / kAbsmaxBlock,
          "absmax2 must hold one fp32 value per 256 blocks");
    check(offset->scalar_type() == at::kFloat && offset->numel() == 1, "offset must be an fp32 scalar");
    code_table = absmax_code->contiguous();
    s.code = code_table.const_data_ptr<float>();
    s.absmax2 = absmax2->const_data_ptr<float>();
    s.offset = offset->item<float>();  // a CPU scalar: no device sync
    s.absmax_u8 = absmax.const_data_ptr<uint8_t>();
  } else {
    check(absmax.scalar_type() == at::kFloat, "absmax must be fp32 without double quantization");
    s.absmax_f32 = absmax.const_data_ptr<float>();
  }
  const Isa isa = current_isa();
  advise_huge_pages(out.mutable_data_ptr(), static_cast<size_t>(out.nbytes()));
  // About 16K elements per task: enough to amortise a task's start.
  const int64_t grain = std::max<int64_t>(1, 16384 / blocksize);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "native_nf4_dequantize", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t end) { run_blocks(isa, s, dst, first, end); });
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
  // The path native_nf4_dequantize takes now ("avx512", "avx2" or "portable"), for `fastlora env` and tests.
  m.def("native_cpu_isa() -> str", &cpu_isa);
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) { m.impl("native_nf4_dequantize", &nf4_dequantize); }

TORCH_LIBRARY_IMPL(fastlora, Meta, m) { m.impl("native_nf4_dequantize", &nf4_dequantize_meta); }

}  // namespace fastlora
