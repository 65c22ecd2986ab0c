// CPU kernels of masked whitening, masked_moments and masked_whiten_apply (the schemas:
// csrc/rlmath.cpp; what the RL-math kernels share: csrc/rlmath_common.h).
//   masked_moments   one read of x and mask: per 2048-element chunk (L1-resident) an exact
//                    two-pass (count, mean, M2) of x shifted by a valid entry of the chunk, merged
//                    across chunks with Chan's formula in double.
//   whiten_apply     one read of x and mask, one write.
#include "rlmath_common.h"

namespace rlhf_fast {
namespace {

using rlvec::W;
using rlmath::kMinPerThread;

// ---- masked whitening ----------------------------------------------------------------------------

// The whitening sums accumulate element e of a chunk into lane e % kAccLanes, kAccLanes / W vectors
// wide on every ISA, and reduce the lanes with one fixed tree: the same float additions in the same
// order on AVX-512 (2 vectors), AVX2 and portable (4 vectors), so the builds agree bit for bit.
constexpr int64_t kAccLanes = 32;
constexpr int64_t kAccVecs = kAccLanes / W;
static_assert(kAccLanes % W == 0, "the accumulator layout needs W to divide 32");

struct Acc {
  fVec v[kAccVecs];
  Acc() {
    for (auto& x : v) x = fVec(0.f);
  }
  float sum() const {
    __at_align__ float b[kAccLanes];
    for (int64_t u = 0; u < kAccVecs; ++u) v[u].store(b + u * W);
    for (int64_t width = kAccLanes / 2; width >= 1; width /= 2)
      for (int64_t i = 0; i < width; ++i) b[i] += b[i + width];
    return b[0];
  }
};

// Calls f(u, x, valid) for each accumulator vector u of each kAccLanes-element step over [0, len);
// elements past len load as 0 with their mask off.
template <typename scalar_t, typename F>
static inline void for_acc_steps(const scalar_t* x, const uint8_t* m, int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + kAccLanes <= len; i += kAccLanes)
    for (int64_t u = 0; u < kAccVecs; ++u) f(u, rlvec::load(x + i + u * W), rlvec::load_mask(m + i + u * W));
  if (i < len) {
    for (int64_t u = 0; u < kAccVecs; ++u) {
      const int64_t o = i + u * W, n = std::max<int64_t>(0, std::min<int64_t>(W, len - o));
      f(u, rlvec::load(x + o, n), rlvec::load_mask(m + o, n));
    }
  }
}

// (count, mean, M2) of the valid entries of one chunk x[0, len).
//
// Shifted data: sums of x - pivot, with the pivot a valid entry of the chunk, so a large offset
// (mean >> std) does not swamp the float32 sums: x - pivot is exact for entries within a factor 2
// of the pivot (Sterbenz), and the chunk mean is pivot + mean(x - pivot) in double. Plain float
// sums of x drifted the chunk mean by ~86 at an offset of 1e7.
template <typename scalar_t>
void chunk_moments(const scalar_t* x, const uint8_t* m, int64_t len, double* cnt, double* mean, double* m2) {
  int64_t first = 0;
  while (first < len && !m[first]) ++first;
  if (first == len) {  // no valid entry in this chunk
    *cnt = *mean = *m2 = 0.0;
    return;
  }
  const float pivot = to_float(x[first]);
  const fVec pv(pivot), zero(0.f), one(1.f);
  Acc s, k;  // a float count is exact up to 2^24 > the chunk
  for_acc_steps(x, m, len, [&](int64_t u, const fVec& xv, const fVec& valid) {
    s.v[u] = s.v[u] + rlvec::select(valid, xv - pv, zero);
    k.v[u] = k.v[u] + rlvec::select(valid, one, zero);
  });
  const float kf = k.sum();
  const float mu = s.sum() / kf;  // mean of x - pivot
  const fVec muv(mu);
  Acc q;
  for_acc_steps(x, m, len, [&](int64_t u, const fVec& xv, const fVec& valid) {
    const fVec d = (xv - pv) - muv;
    q.v[u] = q.v[u] + rlvec::select(valid, d * d, zero);
  });
  *cnt = static_cast<double>(kf);
  *mean = static_cast<double>(pivot) + static_cast<double>(mu);
  *m2 = static_cast<double>(q.sum());
}

// (count, mean, M2) over the valid entries of x, as a float64 tensor of 3 elements.
at::Tensor masked_moments_cpu(const at::Tensor& x, const at::Tensor& mask) {
  TORCH_CHECK(x.sizes() == mask.sizes(), "masked_moments: x and mask must have the same shape");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_moments: mask must be bool");
  at::Tensor xc = x.contiguous(), m = mask.contiguous();
  const int64_t n = xc.numel();
  constexpr int64_t kChunk = 2048;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> cnt(chunks), mean(chunks), m2(chunks);
  const uint8_t* m_p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  dispatch_floating(xc.scalar_type(), "masked_moments", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = xc.data_ptr<scalar_t>();
    at::parallel_for(0, chunks, kMinPerThread / kChunk, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * kChunk, len = std::min(n, lo + kChunk) - lo;
        chunk_moments<scalar_t>(x_p + lo, m_p + lo, len, &cnt[c], &mean[c], &m2[c]);
      }
    });
  });
  // Chan et al.'s pairwise merge, in chunk order (a few hundred scalars: serial is fine).
  double N = 0.0, mu = 0.0, M2 = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    if (cnt[c] == 0.0) continue;
    const double n2 = N + cnt[c];
    const double d = mean[c] - mu;
    mu += d * cnt[c] / n2;
    M2 += m2[c] + d * d * N * cnt[c] / n2;
    N = n2;
  }
  at::Tensor out = at::empty({3}, xc.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = N;
  o[1] = mu;
  o[2] = M2;
  return out;
}

// out[i] = ((x - mu_hi) - mu_lo) * rstd + add_lo + add_hi on valid entries, 0 elsewhere.
template <typename scalar_t>
void whiten_apply_range(const scalar_t* x, const uint8_t* m, float* o, int64_t len, float mu_hi, float mu_lo,
                        float rstd, float add_hi, float add_lo) {
  const fVec hi(mu_hi), lo(mu_lo), rs(rstd), ahi(add_hi), alo(add_lo), zero(0.f);
  auto y = [&](const fVec& xv) { return ((xv - hi) - lo) * rs + alo + ahi; };
  int64_t i = 0;
  for (; i + W <= len; i += W) rlvec::select(rlvec::load_mask(m + i), y(rlvec::load(x + i)), zero).store(o + i);
  if (i < len) {
    const int64_t n = len - i;
    rlvec::select(rlvec::load_mask(m + i, n), y(rlvec::load(x + i, n)), zero).store(o + i, n);
  }
}

// out = (x - mean) * rsqrt(var + eps) (+ mean when !shift_mean) on valid entries, 0 elsewhere, with
// stats = (count, mean, M2) and var = M2 / max(count - ddof, 1) (a single valid entry: var 0, not NaN).
at::Tensor masked_whiten_apply_cpu(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& stats,
                                   bool shift_mean, bool unbiased, double eps) {
  TORCH_CHECK(x.sizes() == mask.sizes(), "masked_whiten_apply: x and mask must have the same shape");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_whiten_apply: mask must be bool");
  TORCH_CHECK(stats.numel() == 3, "masked_whiten_apply: stats must hold (count, mean, M2)");
  at::Tensor xc = x.contiguous(), m = mask.contiguous();
  at::Tensor st = stats.scalar_type() == at::kDouble ? stats.contiguous() : stats.to(at::kDouble).contiguous();
  const double* sp = st.data_ptr<double>();
  const double count = sp[0];
  const double denom = std::max(count - (unbiased ? 1.0 : 0.0), 1.0);
  const double var = sp[2] / denom;
  // The mean as a float pair hi + lo: x - mu_hi is exact near the mean (Sterbenz), so an offset
  // much larger than the spread costs nothing; one float mean would carry its rounding (~1 ulp of
  // the offset) into every output.
  const float mu_hi = static_cast<float>(sp[1]);
  const float mu_lo = static_cast<float>(sp[1] - static_cast<double>(mu_hi));
  const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
  const float add_back = shift_mean ? 0.f : mu_hi;
  const float add_back_lo = shift_mean ? 0.f : mu_lo;
  at::Tensor out = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const uint8_t* m_p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const int64_t n = xc.numel();
  dispatch_floating(xc.scalar_type(), "masked_whiten_apply", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = xc.data_ptr<scalar_t>();
    constexpr int64_t kBlock = 16384;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, kMinPerThread / kBlock, [&](int64_t b0, int64_t b1) {
      const int64_t lo = b0 * kBlock, hi = std::min(n, b1 * kBlock);
      whiten_apply_range<scalar_t>(x_p + lo, m_p + lo, o + lo, hi - lo, mu_hi, mu_lo, rstd, add_back, add_back_lo);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("masked_moments", &masked_moments_cpu);
  m.impl("masked_whiten_apply", &masked_whiten_apply_cpu);
}

}  // namespace rlhf_fast
