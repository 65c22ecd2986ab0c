// Shared helpers for the CPU kernels: a branch-free, auto-vectorisable expf and dtype plumbing.
//
// Why our own exp: std::exp does not vectorise under gcc without -ffast-math, and -ffast-math
// would break the -inf / NaN semantics the ops promise. This is the Cephes single-precision
// polynomial (max error ~1 ulp on [-87.3, 88.7]) written without branches so `#pragma omp simd`
// loops compile to AVX2 / AVX-512 code. exp(x) is exactly 0 for x < -87.3 (and -inf), inf for
// x > 88.7, NaN for NaN.
#pragma once

#include <torch/library.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace rlhf_fast {

#pragma omp declare simd notinbranch
static inline float fast_expf(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f;
  const float kLn2Lo = -2.12194440e-4f;
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const bool underflow = x < -87.33654475f;
  const bool overflow = x > 88.72283905f;
  float xc = x < -87.33654475f ? -87.33654475f : x;
  xc = xc > 88.72283905f ? 88.72283905f : xc;
  float n = (xc * kLog2e + kMagic) - kMagic;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n built from the exponent bits; n is in [-126, 128] after the clamp, split in two
  // factors so n = 128 does not overflow the exponent field.
  int32_t ni = static_cast<int32_t>(n);
  int32_t n1 = ni >> 1;
  int32_t n2 = ni - n1;
  int32_t b1 = (n1 + 127) << 23;
  int32_t b2 = (n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(float));
  std::memcpy(&s2, &b2, sizeof(float));
  float y = p * s1 * s2;
  y = underflow ? 0.0f : y;
  y = overflow ? std::numeric_limits<float>::infinity() : y;
  y = (x != x) ? x : y;  // NaN in, NaN out (the clamps above would otherwise swallow it)
  return y;
}

// Element loads as float for every supported logits dtype.
template <typename T>
static inline float to_float(T v) { return static_cast<float>(v); }

template <typename T>
static inline T from_float(float v) { return static_cast<T>(v); }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<scalar_t>{}) for float / double / bfloat16 / half logits. A function, not a
// macro, so `#pragma omp` lines inside the body compile.
template <typename F>
static inline void dispatch_floating(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kDouble: f(TypeTag<double>{}); break;
    case at::kBFloat16: f(TypeTag<c10::BFloat16>{}); break;
    case at::kHalf: f(TypeTag<c10::Half>{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

}  // namespace rlhf_fast
