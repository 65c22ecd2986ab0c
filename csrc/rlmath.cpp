// CPU kernels for the PPO reward / advantage math: kl_penalty, shape_rewards, gae, and the two
// passes of masked whitening (masked_moments, masked_whiten_apply).
//
// The peers do this with a Python `for t in reversed(range(T))` loop (GAE: ~10 tiny torch ops per
// token) and chains of elementwise torch ops (KL + shaping: ~8 passes over [B, T]). Here:
//   kl_penalty       one pass, elementwise (vectorised exp for k3).
//   shape_rewards    one pass per row: reads logprobs, ref, mask; writes rewards and kl. The row is
//                    walked once to find its last valid token (a byte scan of the mask, from the end).
//   gae              one backward pass per row: reads rewards, values, mask; writes advantages and
//                    returns. The recurrence is a scalar dependency chain (one FMA per valid
//                    token), so rows, not tokens, are the parallel axis (OpenMP over rows).
//   masked_moments   one read of x and mask: per 2048-element chunk (L1-resident) an exact
//                    two-pass (count, mean, M2) of x shifted by a valid entry of the chunk, merged
//                    across chunks with Chan's formula in double.
//   whiten_apply     one read of x and mask, one write.
// Mask arguments are bool tensors (the Python layer converts 0/1 masks). Everything accumulates in
// float32 except the whitening statistics, which are double (they are a handful of scalars).
#include "common.h"

#include <omp.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

namespace rlhf_fast {
namespace {

// Estimators: k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 with d = lp - ref (Schulman's
// "Approximating KL divergence" naming; k3 = exp(ref - lp) - (ref - lp) - 1).
enum class Estimator : int { K1 = 0, K2 = 1, K3 = 2 };

Estimator parse_estimator(c10::string_view name) {
  if (name == "k1") return Estimator::K1;
  if (name == "k2") return Estimator::K2;
  if (name == "k3") return Estimator::K3;
  TORCH_CHECK(false, "unknown KL estimator '", std::string(name), "' (expected k1, k2 or k3)");
}

template <Estimator E>
static inline float kl_value(float lp, float ref) {
  const float d = lp - ref;
  if constexpr (E == Estimator::K1) {
    return d;
  } else if constexpr (E == Estimator::K2) {
    return 0.5f * d * d;
  } else {
    return fast_expf(-d) + d - 1.0f;
  }
}

// Calls f(std::integral_constant<Estimator, E>) so the estimator is a compile-time constant inside
// the vectorised loops.
template <typename F>
static inline void dispatch_estimator(Estimator e, F&& f) {
  switch (e) {
    case Estimator::K1: f(std::integral_constant<Estimator, Estimator::K1>{}); break;
    case Estimator::K2: f(std::integral_constant<Estimator, Estimator::K2>{}); break;
    case Estimator::K3: f(std::integral_constant<Estimator, Estimator::K3>{}); break;
  }
}

// Branch-free so the loops vectorise (an early return for "no clamp" kept gcc from it): without a
// clamp the bounds are -inf / inf, which change nothing (NaN stays NaN either way).
static inline float clamp_kl(float k, float lo, float hi) {
  k = k < lo ? lo : k;
  return k > hi ? hi : k;
}

static inline std::pair<float, float> clamp_bounds(const std::optional<double>& clamp) {
  const float inf = std::numeric_limits<float>::infinity();
  if (!clamp.has_value()) return {-inf, inf};
  const float c = static_cast<float>(*clamp);
  return {-c, c};
}

// Same dtype for a pair of float inputs: mixed pairs (e.g. float32 logprobs, bf16 ref) go to float32.
std::pair<at::Tensor, at::Tensor> same_dtype(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == b.scalar_type()) return {a.contiguous(), b.contiguous()};
  return {a.to(at::kFloat).contiguous(), b.to(at::kFloat).contiguous()};
}

template <Estimator E, typename scalar_t>
static void kl_chunk(const scalar_t* __restrict a, const scalar_t* __restrict b, float* __restrict o, int64_t n,
                     float lo, float hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] = clamp_kl(kl_value<E>(to_float(a[i]), to_float(b[i])), lo, hi);
}

at::Tensor kl_penalty_cpu(const at::Tensor& logprobs, const at::Tensor& ref_logprobs,
                          c10::string_view estimator, std::optional<double> clamp) {
  TORCH_CHECK(logprobs.sizes() == ref_logprobs.sizes(), "kl_penalty: logprobs and ref_logprobs shapes differ");
  const Estimator est = parse_estimator(estimator);
  auto [lp, ref] = same_dtype(logprobs, ref_logprobs);
  at::Tensor out = at::empty(lp.sizes(), lp.options().dtype(at::kFloat));
  const int64_t n = lp.numel();
  const auto [lo, hi] = clamp_bounds(clamp);
  float* o = out.data_ptr<float>();
  dispatch_floating(lp.scalar_type(), "kl_penalty", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* a = lp.data_ptr<scalar_t>();
    const scalar_t* b = ref.data_ptr<scalar_t>();
    dispatch_estimator(est, [&](auto e) {
      constexpr Estimator E = decltype(e)::value;
      // Chunks over threads, each a vectorised function call (a `parallel for simd` over the
      // flat range measured 25x slower than torch's elementwise sub on this CPU).
      constexpr int64_t kChunk = 16384;
      const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 2)
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const int64_t i0 = ch * kChunk, len = std::min(kChunk, n - i0);
        kl_chunk<E>(a + i0, b + i0, o + i0, len, lo, hi);
      }
    });
  });
  return out;
}

// One row of shape_rewards, a function of its own with restrict pointers: inlined into the
// OpenMP row loop, gcc did not vectorise it (measured 3x slower than three torch passes).
template <Estimator E, typename scalar_t>
static void shape_row(const scalar_t* __restrict a, const scalar_t* __restrict b, const uint8_t* __restrict mr,
                      float* __restrict k_p, float* __restrict r_p, int64_t T, float coef, float lo, float hi) {
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    // A select, not a multiply: masked positions may hold inf / NaN padding (e.g. k3 of
    // INVALID_LOGPROB pads) and must still give exactly 0.
    float k = clamp_kl(kl_value<E>(to_float(a[t]), to_float(b[t])), lo, hi);
    k = mr[t] ? k : 0.f;
    k_p[t] = k;
    r_p[t] = mr[t] ? -coef * k : 0.f;
  }
}

std::tuple<at::Tensor, at::Tensor> shape_rewards_cpu(const at::Tensor& scores, const at::Tensor& logprobs,
                                                     const at::Tensor& ref_logprobs, const at::Tensor& mask,
                                                     double kl_coef, c10::string_view estimator,
                                                     std::optional<double> clamp) {
  TORCH_CHECK(logprobs.dim() == 2, "shape_rewards: logprobs must be (B, T)");
  TORCH_CHECK(ref_logprobs.sizes() == logprobs.sizes() && mask.sizes() == logprobs.sizes(),
              "shape_rewards: logprobs, ref_logprobs and mask must have the same shape");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == logprobs.size(0), "shape_rewards: scores must be (B,)");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "shape_rewards: mask must be bool");
  const Estimator est = parse_estimator(estimator);
  auto [lp, ref] = same_dtype(logprobs, ref_logprobs);
  at::Tensor m = mask.contiguous();
  at::Tensor s = scores.to(at::kFloat).contiguous();
  const int64_t B = lp.size(0), T = lp.size(1);
  auto opts = lp.options().dtype(at::kFloat);
  at::Tensor rewards = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
  float* r_p = rewards.data_ptr<float>();
  float* k_p = kl.data_ptr<float>();
  const uint8_t* m_p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());  // bytes: bool loads do not vectorise
  const float* s_p = s.data_ptr<float>();
  const float coef = static_cast<float>(kl_coef);
  const auto [lo, hi] = clamp_bounds(clamp);
  dispatch_floating(lp.scalar_type(), "shape_rewards", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* a = lp.data_ptr<scalar_t>();
    const scalar_t* b = ref.data_ptr<scalar_t>();
    dispatch_estimator(est, [&](auto e) {
      constexpr Estimator E = decltype(e)::value;
#pragma omp parallel for schedule(static) if (B * T > 32768)
      for (int64_t row = 0; row < B; ++row) {
        const int64_t off = row * T;
        const uint8_t* mr = m_p + off;
        shape_row<E>(a + off, b + off, mr, k_p + off, r_p + off, T, coef, lo, hi);
        int64_t last = T - 1;
        while (last >= 0 && !mr[last]) --last;
        if (last >= 0) r_p[off + last] += s_p[row];  // empty row: the score lands nowhere
      }
    });
  });
  return {rewards, kl};
}

// One row, scalar: the tail rows that do not fill a lane group.
template <typename scalar_t>
void gae_row(const scalar_t* r, const scalar_t* v, const bool* m, float* adv, float* ret, int64_t T, float g,
             float gl) {
  float next_value = 0.f;  // the value after the last valid token is 0
  float running = 0.f;     // the advantage of the next valid token
  for (int64_t t = T - 1; t >= 0; --t) {
    if (m[t]) {
      const float value = to_float(v[t]);
      running = to_float(r[t]) + g * next_value - value + gl * running;
      next_value = value;
      adv[t] = running;
      ret[t] = running + value;
    } else {  // a hole: the next value and the running advantage carry across it
      adv[t] = 0.f;
      ret[t] = 0.f;
    }
  }
}

// kLanes rows at once, stepping back through time together. One row alone is a dependency chain
// (one FMA latency per token); kLanes independent rows interleaved keep the FP units busy. Measured
// on a 2-core AMD EPYC (Zen 4), one thread, [512, 1024]: 1 row 0.55 ms, 4 rows 0.34 ms, 8 rows
// 0.81 ms and 16 rows 2.6 ms (at T = 1024 the rows are 4 KiB apart: 8 x 5 streams alias in the same
// L1 sets), and staging rows through [chunk][lane] buffers for SIMD was slower still (the scalar
// transposes cost more than the recurrence). Selects, not branches: the value at a masked position
// may be anything (NaN padding) and is never used.
constexpr int64_t kLanes = 4;

template <typename scalar_t>
void gae_lanes(const scalar_t* r, const scalar_t* v, const bool* m, float* adv, float* ret, int64_t T, float g,
               float gl) {
  float next_value[kLanes] = {0.f}, running[kLanes] = {0.f};
  for (int64_t t = T - 1; t >= 0; --t) {
#pragma GCC unroll 4
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t i = l * T + t;
      const bool valid = m[i];
      const float value = to_float(v[i]);
      const float a = to_float(r[i]) + g * next_value[l] - value + gl * running[l];
      running[l] = valid ? a : running[l];
      next_value[l] = valid ? value : next_value[l];
      adv[i] = valid ? a : 0.f;
      ret[i] = valid ? a + value : 0.f;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> gae_cpu(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(rewards.dim() == 2, "gae: rewards must be (B, T)");
  TORCH_CHECK(values.sizes() == rewards.sizes() && mask.sizes() == rewards.sizes(),
              "gae: rewards, values and mask must have the same shape");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "gae: mask must be bool");
  auto [r, v] = same_dtype(rewards, values);
  at::Tensor m = mask.contiguous();
  const int64_t B = r.size(0), T = r.size(1);
  auto opts = r.options().dtype(at::kFloat);
  at::Tensor adv = at::empty({B, T}, opts), ret = at::empty({B, T}, opts);
  float* a_p = adv.data_ptr<float>();
  float* q_p = ret.data_ptr<float>();
  const bool* m_p = m.data_ptr<bool>();
  const float g = static_cast<float>(gamma);
  const float gl = static_cast<float>(gamma * lam);
  const int64_t groups = B / kLanes;
  dispatch_floating(r.scalar_type(), "gae", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* r_p = r.data_ptr<scalar_t>();
    const scalar_t* v_p = v.data_ptr<scalar_t>();
    const int64_t work = groups + (B - groups * kLanes);  // lane groups, then the tail rows one by one
#pragma omp parallel for schedule(static) if (B * T > 65536)
    for (int64_t w = 0; w < work; ++w) {
      if (w < groups) {
        const int64_t off = w * kLanes * T;
        gae_lanes<scalar_t>(r_p + off, v_p + off, m_p + off, a_p + off, q_p + off, T, g, gl);
      } else {
        const int64_t off = (groups * kLanes + (w - groups)) * T;
        gae_row<scalar_t>(r_p + off, v_p + off, m_p + off, a_p + off, q_p + off, T, g, gl);
      }
    }
  });
  return {adv, ret};
}

// (count, mean, M2) of the valid entries of one chunk x[0, len). A function of its own, on
// __restrict pointers: written inline in the OpenMP loop body, the loops below read x, the mask
// and the pivot through OpenMP's shared-variable block and GCC emitted them scalar (~2 ns per
// element, 15x the vector loop's time; perf showed vaddss / vsubss).
//
// Shifted data: sums of x - pivot, with the pivot a valid entry of the chunk, so a large offset
// (mean >> std) does not swamp the float32 sums: x - pivot is exact for entries within a factor 2
// of the pivot (Sterbenz), and the chunk mean is pivot + mean(x - pivot) in double. Plain float
// sums of x drifted the chunk mean by ~86 at an offset of 1e7.
template <typename scalar_t>
void chunk_moments(const scalar_t* __restrict x, const uint8_t* __restrict m, int64_t len, double* cnt,
                   double* mean, double* m2) {
  int64_t first = 0;
  while (first < len && !m[first]) ++first;
  if (first == len) {  // no valid entry in this chunk
    *cnt = *mean = *m2 = 0.0;
    return;
  }
  const float pivot = to_float(x[first]);
  float s = 0.f, k = 0.f;  // a float count is exact up to 2^24 > the chunk, and keeps the loop one SIMD type
#pragma omp simd reduction(+ : s, k)
  for (int64_t i = 0; i < len; ++i) {
    const bool valid = m[i];
    s += valid ? to_float(x[i]) - pivot : 0.f;
    k += valid ? 1.f : 0.f;
  }
  const float mu = s / k;  // mean of x - pivot
  float q = 0.f;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < len; ++i) {
    const float d = (to_float(x[i]) - pivot) - mu;
    q += m[i] ? d * d : 0.f;
  }
  *cnt = static_cast<double>(k);
  *mean = static_cast<double>(pivot) + static_cast<double>(mu);
  *m2 = static_cast<double>(q);
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
  const uint8_t* m_p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());  // bytes: bool loads do not vectorise
  dispatch_floating(xc.scalar_type(), "masked_moments", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = xc.data_ptr<scalar_t>();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t lo = c * kChunk, len = std::min(n, lo + kChunk) - lo;
      chunk_moments<scalar_t>(x_p + lo, m_p + lo, len, &cnt[c], &mean[c], &m2[c]);
    }
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

// out[i] = ((x - mu_hi) - mu_lo) * rstd + add_lo + add_hi on valid entries, 0 elsewhere; its own
// function on __restrict pointers for the same reason as chunk_moments.
template <typename scalar_t>
void whiten_apply_range(const scalar_t* __restrict x, const uint8_t* __restrict m, float* __restrict o, int64_t len,
                        float mu_hi, float mu_lo, float rstd, float add_hi, float add_lo) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float y = ((to_float(x[i]) - mu_hi) - mu_lo) * rstd + add_lo + add_hi;
    o[i] = m[i] ? y : 0.f;
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
  at::Tensor st = stats.to(at::kDouble).contiguous();
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
  const uint8_t* m_p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());  // bytes: bool loads do not vectorise
  const int64_t n = xc.numel();
  dispatch_floating(xc.scalar_type(), "masked_whiten_apply", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = xc.data_ptr<scalar_t>();
    constexpr int64_t kBlock = 16384;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lo = b * kBlock;
      whiten_apply_range<scalar_t>(x_p + lo, m_p + lo, o + lo, std::min(n, lo + kBlock) - lo, mu_hi, mu_lo, rstd,
                                   add_back, add_back_lo);
    }
  });
  return out;
}

}  // namespace

// Mirrored in rlhf_fast/ops/rlmath.py (SCHEMAS) for the no-compiler fallback; a test checks they agree.
TORCH_LIBRARY_FRAGMENT(rlhf_fast, m) {
  m.def("kl_penalty(Tensor logprobs, Tensor ref_logprobs, str estimator='k1', float? clamp=None) -> Tensor");
  m.def(
      "shape_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, float kl_coef, "
      "str estimator='k1', float? clamp=None) -> (Tensor, Tensor)");
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("masked_moments(Tensor x, Tensor mask) -> Tensor");
  m.def(
      "masked_whiten_apply(Tensor x, Tensor mask, Tensor stats, bool shift_mean=True, bool unbiased=True, "
      "float eps=1e-08) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("kl_penalty", &kl_penalty_cpu);
  m.impl("shape_rewards", &shape_rewards_cpu);
  m.impl("gae", &gae_cpu);
  m.impl("masked_moments", &masked_moments_cpu);
  m.impl("masked_whiten_apply", &masked_whiten_apply_cpu);
}

}  // namespace rlhf_fast
