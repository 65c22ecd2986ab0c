// Vector math for the CPU kernels, on at::vec::Vectorized: one source, compiled once per ISA level
// (AVX-512, AVX2, portable on x86; NEON / SVE on aarch64; rlhf_fast/ops/_library.py picks the level
// torch itself runs at, docs/architecture.md "CPU kernels"). Vectorized<float> is 16 lanes on
// AVX-512, 8 on AVX2 and NEON-pairs, so a loop written with it vectorises on every level, where
// `#pragma omp simd` over branchy code was left scalar by gcc on AVX2 (issue 23: 6x slower).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <limits>

namespace rlhf_fast {

using fVec = at::vec::Vectorized<float>;
using iVec = at::vec::Vectorized<int32_t>;

// exp(x), lane for lane the polynomial of fast_expf in common.h (Cephes, ~1 ulp on
// [-87.3, 88.7]); exactly 0 below -87.3 and for -inf, inf above 88.7, NaN for NaN.
static inline fVec vexp(const fVec& x) {
  const fVec lo(-87.33654475f), hi(88.72283905f);
  const fVec kLog2e(1.44269504088896341f), kMagic(12582912.0f);
  const fVec kLn2Hi(0.693359375f), kLn2Lo(-2.12194440e-4f);
  // Clamp with compares + blends (at::vec::maximum / minimum propagate NaN; the NaN lane is
  // restored from x at the end either way).
  fVec xc = fVec::blendv(x, lo, x < lo);
  xc = fVec::blendv(xc, hi, xc > hi);
  const fVec n = at::vec::fmadd(xc, kLog2e, kMagic) - kMagic;  // round(x * log2 e)
  fVec r = at::vec::fnmadd(n, kLn2Hi, xc);
  r = at::vec::fnmadd(n, kLn2Lo, r);
  fVec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, fVec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, fVec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, fVec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, fVec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, fVec(5.0000001201e-1f));
  p = at::vec::fmadd(p * r, r, r) + fVec(1.0f);
  // 2^n from exponent bits, in two factors so n = 128 does not overflow the exponent field.
  const iVec ni = at::vec::convert_to_int_of_same_size(n);
  const iVec n1 = ni >> iVec(1);
  const iVec n2 = ni - n1;
  const iVec bias(127);
  const fVec s1 = at::vec::cast<float>((n1 + bias) << iVec(23));
  const fVec s2 = at::vec::cast<float>((n2 + bias) << iVec(23));
  fVec y = p * s1 * s2;
  y = fVec::blendv(y, fVec(0.0f), x < lo);
  y = fVec::blendv(y, fVec(std::numeric_limits<float>::infinity()), x > hi);
  return fVec::blendv(y, x, x.isnan());
}

}  // namespace rlhf_fast

namespace rlhf_fast {

// exp(x) for x <= 0 (and -inf, NaN): what vexp returns there, bit for bit, with fewer operations,
// for the forward sums of csrc/logprobs.cpp, whose arguments are z - max(z) <= 0 (issue 23: the
// sums are bound by the exp's instruction count). Above 0 it is wrong (2^n overflows the exponent
// field for n > 127): never call it there.
//   - no upper clamp or inf blend: x <= 0 never reaches 88.7; the lower clamp is a max;
//   - 2^n in one factor: n = round(x log2 e) is in [-126, 0] after the lower clamp, so
//     (n + 127) << 23 is a normal float, and p * 2^n rounds the same exact product p * 2^n that
//     vexp's (p * 2^(n >> 1)) * 2^(n - (n >> 1)) rounds (its first product is exact);
//   - no NaN blend: a NaN x propagates through the polynomial (NaN * 2^n is NaN) and fails the
//     x < lo test, so the result is a NaN (its payload may differ from x's).
static inline fVec vexp_nonpos(const fVec& x) {
  const fVec lo(-87.33654475f);
  const fVec kLog2e(1.44269504088896341f), kMagic(12582912.0f);
  const fVec kLn2Hi(0.693359375f), kLn2Lo(-2.12194440e-4f);
  const fVec under = x < lo;
  // x < lo ? lo : x (maxps(lo, x) on x86: one instruction where torch's AVX-512 blendv is three;
  // a NaN x stays NaN on every level).
  const fVec xc = at::vec::clamp_min(x, lo);
  const fVec n = at::vec::fmadd(xc, kLog2e, kMagic) - kMagic;  // round(x * log2 e)
  fVec r = at::vec::fnmadd(n, kLn2Hi, xc);
  r = at::vec::fnmadd(n, kLn2Lo, r);
  fVec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, fVec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, fVec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, fVec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, fVec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, fVec(5.0000001201e-1f));
  p = at::vec::fmadd(p * r, r, r) + fVec(1.0f);
  const iVec ni = at::vec::convert_to_int_of_same_size(n);
  const fVec s = at::vec::cast<float>((ni + iVec(127)) << iVec(23));
  return fVec::blendv(p * s, fVec(0.0f), under);
}

}  // namespace rlhf_fast

namespace rlhf_fast {

#if defined(__GNUC__) || defined(__clang__)
#define RLHF_FAST_FORCE_INLINE inline __attribute__((always_inline))
#else
#define RLHF_FAST_FORCE_INLINE inline
#endif

// vexp_nonpos on K independent vectors, step by step across them (each step for x[0 .. K-1], then
// the next step): every lane gets vexp_nonpos's operations (2^n by an exact integer identity, below),
// so the results are its bits (and fast_expf's: compared on every 5th non-positive float bit
// pattern, 429M inputs, at AVX-512, AVX2 and the portable level, both kUnder variants, issue 23). The polynomial is one long dependent chain per vector, and
// one vector at a time left the forward sums of csrc/logprobs.cpp bound by that latency rather than
// by the FP pipes (issue 23); K chains side by side in program order keep the pipes busy.
// Forced inline: gcc left it an out-of-line call (its arrays through memory, a vzeroupper per
// block), slower than the one-vector loop.
// kUnder = false: the caller knows no x is below lo (x >= lo or NaN), so the underflow blend,
// which would select nothing, is left out (csrc/logprobs.cpp checks this per row from the row's
// min). 2^n is built from the bits of t = x log2 e + 1.5 * 2^23, whose low mantissa bits hold n
// (n in [-126, 0]): t_bits << 23 is n << 23 modulo 2^32 (the bits of 1.5 * 2^23 shift out), so
// (t_bits << 23) + (127 << 23) is vexp_nonpos's (n + 127) << 23 without the float -> int convert.
template <int K, bool kUnder = true>
static RLHF_FAST_FORCE_INLINE void vexp_nonpos_n(const fVec* x, fVec* out) {
  const fVec lo(-87.33654475f);
  const fVec kLog2e(1.44269504088896341f), kMagic(12582912.0f);
  const fVec kLn2Hi(0.693359375f), kLn2Lo(-2.12194440e-4f);
  fVec xc[K], t[K], n[K], r[K], p[K];
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) xc[k] = at::vec::clamp_min(x[k], lo);
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) t[k] = at::vec::fmadd(xc[k], kLog2e, kMagic);
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) n[k] = t[k] - kMagic;
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) r[k] = at::vec::fnmadd(n[k], kLn2Hi, xc[k]);
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) r[k] = at::vec::fnmadd(n[k], kLn2Lo, r[k]);
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(fVec(1.9875691500e-4f), r[k], fVec(1.3981999507e-3f));
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], r[k], fVec(8.3334519073e-3f));
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], r[k], fVec(4.1665795894e-2f));
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], r[k], fVec(1.6666665459e-1f));
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], r[k], fVec(5.0000001201e-1f));
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k] * r[k], r[k], r[k]) + fVec(1.0f);
#pragma GCC unroll 16
  for (int k = 0; k < K; ++k) {
    const iVec tb = at::vec::cast<int32_t>(t[k]);
    const fVec s = at::vec::cast<float>((tb << iVec(23)) + iVec(127 << 23));
    if constexpr (kUnder) {
      out[k] = fVec::blendv(p[k] * s, fVec(0.0f), x[k] < lo);
    } else {
      out[k] = p[k] * s;
    }
  }
}

}  // namespace rlhf_fast
