// Loads and stores for csrc/rlmath*.cpp on at::vec::Vectorized<float> (fVec, csrc/vec_math.h): any
// supported input dtype to float lanes, bool mask bytes to lane masks, full vectors and tails.
// One source for every ISA build (rlhf_fast/ops/_library.py): AVX-512 and AVX2 get a
// byte -> int32 widening load for the mask, the other levels (portable x86, NEON) a short loop.
#pragma once

#include "common.h"
#include "vec_math.h"

#include <ATen/cpu/vec/functional.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace rlhf_fast {
namespace rlvec {

constexpr int64_t W = fVec::size();  // lanes: 16 on AVX-512, 8 on AVX2 / portable / NEON

// W elements from p as float (exact conversions: every supported dtype's value rounds to float
// the same way the scalar to_float does).
template <typename T>
inline fVec load(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return fVec::loadu(p);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    fVec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  } else {
    __at_align__ float buf[W];
    for (int64_t i = 0; i < W; ++i) buf[i] = to_float(p[i]);
    return fVec::loadu(buf);
  }
}

// n < W elements from p as float; lanes n.. are 0 (finite, so a masked-out tail lane never
// produces a NaN that a select would have to hide).
template <typename T>
inline fVec load(const T* p, int64_t n) {
  __at_align__ float buf[W] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(p[i]);
  return fVec::loadu(buf);
}

// A lane mask (all bits set where m[i] != 0) from W bool bytes, for fVec::blendv.
inline fVec load_mask(const uint8_t* m) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
  return _mm512_castsi512_ps(_mm512_movm_epi32(_mm512_test_epi32_mask(w, w)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(w, _mm256_setzero_si256()));
#else
  __at_align__ int32_t buf[W];
  for (int64_t i = 0; i < W; ++i) buf[i] = m[i] ? -1 : 0;
  return at::vec::cast<float>(iVec::loadu(buf));
#endif
}

// n < W mask bytes; lanes n.. are off.
inline fVec load_mask(const uint8_t* m, int64_t n) {
  __at_align__ int32_t buf[W] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = m[i] ? -1 : 0;
  return at::vec::cast<float>(iVec::loadu(buf));
}

inline fVec select(const fVec& mask, const fVec& a, const fVec& b) {  // mask ? a : b, lane for lane
  return fVec::blendv(b, a, mask);
}

// 0 where x is finite, NaN where x is +-inf or NaN: summed into an accumulator, the sum is NaN
// exactly when some lane ever was non-finite.
inline fVec nonfinite_probe(const fVec& x) { return x - x; }

inline bool any_nan(const fVec& x) {
  __at_align__ float buf[W];
  x.store(buf);
  for (int64_t i = 0; i < W; ++i)
    if (buf[i] != buf[i]) return true;
  return false;
}

// Index of the last nonzero byte of m[0, n), -1 if none; eight bytes per step (right padding can
// be half the row, and a byte loop there cost as much as the row's arithmetic).
inline int64_t last_set(const uint8_t* m, int64_t n) {
  int64_t t = n;
  while (t >= 8) {
    uint64_t w;
    std::memcpy(&w, m + t - 8, sizeof(w));
    if (w != 0) break;
    t -= 8;
  }
  while (t > 0 && !m[t - 1]) --t;
  return t - 1;
}

// A full-vector store that bypasses the caches (no read-for-ownership of the line) where the ISA
// has one and p is vector-aligned; a plain store otherwise. For outputs too large to stay in
// cache; stream_fence() orders them before the kernel returns.
inline void store_stream(const fVec& v, float* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, v);
#endif
  v.store(p);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// dst[j * ldd + i] = src[i * lds + j] for a W x W tile. AVX-512: the unpack / shuffle network of
// at::vec's transpose_block (FBGEMM's), with the sizes fixed at 16 so it is inlined branch-free
// (at::vec's entry point takes runtime M, N and measured a quarter of GAE's time); AVX2: at::vec's
// 8 x 8 register transpose; other levels: at::vec's element loop.
inline void transpose_tile(const float* src, int64_t lds, float* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 in[16], tmp[16];
  for (int i = 0; i < 16; ++i) in[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; ++i) {
    tmp[2 * i] = _mm512_unpacklo_ps(in[2 * i], in[2 * i + 1]);
    tmp[2 * i + 1] = _mm512_unpackhi_ps(in[2 * i], in[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(tmp[4 * i]), b = _mm512_castps_pd(tmp[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(tmp[4 * i + 1]), d = _mm512_castps_pd(tmp[4 * i + 3]);
    in[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    in[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    in[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    in[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int i = 0; i < 2; ++i) {
    for (int k = 0; k < 4; ++k) {
      tmp[8 * i + k] = _mm512_shuffle_f32x4(in[8 * i + k], in[8 * i + 4 + k], 0x88);
      tmp[8 * i + 4 + k] = _mm512_shuffle_f32x4(in[8 * i + k], in[8 * i + 4 + k], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) _mm512_storeu_ps(dst + i * ldd, _mm512_shuffle_f32x4(tmp[i], tmp[8 + i], 0x88));
  for (int i = 8; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, _mm512_shuffle_f32x4(tmp[i - 8], tmp[i], 0xdd));
#else
  at::vec::transpose_mxn<float, W, W>(src, lds, dst, ldd);
#endif
}

}  // namespace rlvec
}  // namespace rlhf_fast
