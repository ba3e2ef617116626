// SwiGLU on the CPU: y = silu(gate) * up, and its backward. fp32 maths whatever the storage dtype, one
// rounding per output, the same contract as the Triton kernel. Outputs are allocated by the Python launcher
// (so tests can poison them) and passed in as out arguments.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastlora {
namespace {

// Elements per task: large enough that thread start-up is amortised, small enough to split a 4K x 14K tensor.
constexpr int64_t kGrain = 16384;

void check_same(const char* op, const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected ", ref.sizes());
}

// exp(x) in plain float arithmetic (Cephes' expf: Cody-Waite reduction, degree-6 polynomial, about 1 ulp), so
// that GCC vectorises the loops below; std::exp is a library call per element and was 5x slower than torch.
C10_ALWAYS_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);  // 2^n stays a normal float
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick: plain adds vectorise, rounding calls may not.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

C10_ALWAYS_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

// The loops live in functions of their own with __restrict pointers: inside parallel_for's lambda GCC cannot
// prove that the outputs do not alias the captured pointers, and leaves the loop scalar. float and bf16 loops
// vectorise; c10::Half's conversion does not (fp16 is not a CPU compute dtype in the precision policy).
template <typename T>
void swiglu_fwd_range(const T* __restrict g, const T* __restrict u, T* __restrict y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = static_cast<float>(g[i]);
    y[i] = static_cast<T>(gv * sigmoid(gv) * static_cast<float>(u[i]));
  }
}

template <typename T>
void swiglu_bwd_range(const T* __restrict dy, const T* __restrict g, const T* __restrict u, T* __restrict dg,
                      T* __restrict du, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gv = static_cast<float>(g[i]);
    const float uv = static_cast<float>(u[i]);
    const float dyv = static_cast<float>(dy[i]);
    const float s = sigmoid(gv);
    // d silu(g)/dg = s * (1 + g * (1 - s))
    dg[i] = static_cast<T>(dyv * uv * s * (1.0f + gv * (1.0f - s)));
    du[i] = static_cast<T>(dyv * gv * s);
  }
}

void swiglu_fwd(const at::Tensor& gate, const at::Tensor& up, const at::Tensor& out) {
  const char* op = "fastlora::native_swiglu_fwd";
  check_same(op, gate, gate, "gate");
  check_same(op, gate, up, "up");
  check_same(op, gate, out, "out");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "native_swiglu_fwd", [&] {
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      swiglu_fwd_range(g + begin, u + begin, y + begin, end - begin);
    });
  });
}

void swiglu_bwd(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& grad_gate,
                const at::Tensor& grad_up) {
  const char* op = "fastlora::native_swiglu_bwd";
  check_same(op, gate, gate, "gate");
  check_same(op, gate, grad, "grad");
  check_same(op, gate, up, "up");
  check_same(op, gate, grad_gate, "grad_gate");
  check_same(op, gate, grad_up, "grad_up");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "native_swiglu_bwd", [&] {
    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* dg = grad_gate.mutable_data_ptr<scalar_t>();
    scalar_t* du = grad_up.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      swiglu_bwd_range(dy + begin, g + begin, u + begin, dg + begin, du + begin, end - begin);
    });
  });
}

// The outputs are given, so shape propagation has nothing to do; this lets torch.compile and opcheck trace
// the ops with fake tensors.
void swiglu_fwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&) {}
void swiglu_bwd_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&) {}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlora, m) {
  m.def("native_swiglu_fwd(Tensor gate, Tensor up, Tensor(a!) out) -> ()");
  m.def("native_swiglu_bwd(Tensor grad, Tensor gate, Tensor up, Tensor(a!) grad_gate, Tensor(b!) grad_up) -> ()");
}

TORCH_LIBRARY_IMPL(fastlora, CPU, m) {
  m.impl("native_swiglu_fwd", &swiglu_fwd);
  m.impl("native_swiglu_bwd", &swiglu_bwd);
}

TORCH_LIBRARY_IMPL(fastlora, Meta, m) {
  m.impl("native_swiglu_fwd", &swiglu_fwd_meta);
  m.impl("native_swiglu_bwd", &swiglu_bwd_meta);
}

}  // namespace fastlora
