// CPU kernels for the PPO reward / advantage math: kl_penalty, shape_rewards, gae, and the two
// passes of masked whitening (masked_moments, masked_whiten_apply).
//
// The peers do this with a Python `for t in reversed(range(T))` loop (GAE: ~10 tiny torch ops per
// token) and chains of elementwise torch ops (KL + shaping: ~8 passes over [B, T]). Here, written
// on at::vec::Vectorized<float> (csrc/vec_math.h, csrc/rlmath_vec.h) so that every ISA build
// (AVX-512, AVX2, portable, NEON: rlhf_fast/ops/_library.py) runs vector code; gcc's
// auto-vectorisation of `#pragma omp simd` loops left much of it scalar on AVX2 (issue 23):
//   kl_penalty       one pass, elementwise (vexp for k3).
//   shape_rewards    one pass per row: reads logprobs, ref, mask; writes rewards and kl; finds the
//                    row's last valid token (a word scan of the mask from the end) for the score.
//                    It also checks, for free, the finiteness the Python layer used to check with
//                    extra reductions (scores; log-probs where kl is not finite on a valid token):
//                    a ValueError the Python layer turns into the row-naming message. Those
//                    reductions cost more than the kernel itself at [64, 512].
//   gae              one backward pass: the recurrence is a dependency chain along T, so W rows
//                    (W = the vector width: 16 on AVX-512, 8 on AVX2) step back through time
//                    together, one lane per row, staged through W x W transposes in registers.
//   masked_moments   one read of x and mask: per 2048-element chunk (L1-resident) an exact
//                    two-pass (count, mean, M2) of x shifted by a valid entry of the chunk, merged
//                    across chunks with Chan's formula in double.
//   whiten_apply     one read of x and mask, one write.
// Threads: at::parallel_for, so the count follows torch.get_num_threads() and torch's own pool
// runs the work (no OpenMP region of our own beside torch's), and only from kMinPerThread (4 Mi)
// elements per thread: one pass over memory gains little from a second thread, and every fork /
// join waits for a worker the OS may not have scheduled. Measured on a 2-core machine shared with
// other jobs, 2 threads, p50: at 64 Ki elements per thread (torch's own grain) shape_rewards
// [512, 1024] 20 ms and gae 42 ms against 0.12 / 0.6 ms on one thread; at 1 Mi, [256, 8192]
// shape_rewards 14-16 ms and gae 16 ms against 1.2 / 10 ms. The peers' per-token GAE loop works
// on (B,) slices below torch's grain and never forks (issue 23: a GAE only 4x the torch loop).
//
// Bit-for-bit across the AVX-512 and AVX2 builds: every lane does the same float operations in the
// same order whatever the vector width, and the whitening sums use a fixed 32-lane accumulator
// layout and a fixed reduction tree (tests/test_cpu_isa_rlmath.py). The portable x86-64 build has
// no FMA: gcc contracts a * b + c into one FMA in C++ wherever the ISA has it (and vexp in
// csrc/vec_math.h uses fmadd), so that build differs in the last bits, within the float64 contract.
//
// Mask arguments are bool tensors (the Python layer converts 0/1 masks). Everything accumulates in
// float32 except the whitening statistics, which are double (they are a handful of scalars).
#include "common.h"
#include "rlmath_vec.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
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

using rlvec::W;

constexpr int64_t kMinPerThread = int64_t{1} << 22;  // elements; see the header comment

template <Estimator E>
static inline fVec kl_value(const fVec& lp, const fVec& ref) {
  const fVec d = lp - ref;
  if constexpr (E == Estimator::K1) {
    return d;
  } else if constexpr (E == Estimator::K2) {
    return fVec(0.5f) * d * d;
  } else {
    return vexp(d.neg()) + d - fVec(1.0f);
  }
}

// Calls f(std::integral_constant<Estimator, E>) so the estimator is a compile-time constant inside
// the vector loops.
template <typename F>
static inline void dispatch_estimator(Estimator e, F&& f) {
  switch (e) {
    case Estimator::K1: f(std::integral_constant<Estimator, Estimator::K1>{}); break;
    case Estimator::K2: f(std::integral_constant<Estimator, Estimator::K2>{}); break;
    case Estimator::K3: f(std::integral_constant<Estimator, Estimator::K3>{}); break;
  }
}

// Compares and selects (NaN compares false, so NaN stays NaN); without a clamp the bounds are
// -inf / inf, which change nothing.
static inline fVec clamp_kl(const fVec& k, const fVec& lo, const fVec& hi) {
  const fVec a = fVec::blendv(k, lo, k < lo);
  return fVec::blendv(a, hi, a > hi);
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
static void kl_range(const scalar_t* a, const scalar_t* b, float* o, int64_t n, float lo, float hi) {
  const fVec lov(lo), hiv(hi);
  int64_t i = 0;
  for (; i + W <= n; i += W) clamp_kl(kl_value<E>(rlvec::load(a + i), rlvec::load(b + i)), lov, hiv).store(o + i);
  if (i < n) clamp_kl(kl_value<E>(rlvec::load(a + i, n - i), rlvec::load(b + i, n - i)), lov, hiv).store(o + i, n - i);
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
      // Threads take whole 16384-element chunks (a multiple of every vector width).
      constexpr int64_t kChunk = 16384;
      const int64_t chunks = (n + kChunk - 1) / kChunk;
      at::parallel_for(0, chunks, kMinPerThread / kChunk, [&](int64_t c0, int64_t c1) {
        const int64_t i0 = c0 * kChunk, i1 = std::min(n, c1 * kChunk);
        kl_range<E>(a + i0, b + i0, o + i0, i1 - i0, lo, hi);
      });
    });
  });
  return out;
}

// One row of shape_rewards: kl and -coef * kl on valid tokens, 0 on masked ones. Selects, not
// multiplies: masked positions may hold inf / NaN padding (e.g. k3 of INVALID_LOGPROB pads) and
// must still give exactly 0. Returns the row's non-finite probe (NaN iff a valid kl is not finite).
// probe gains a NaN iff a valid kl is not finite. kClamp false: no clamp requested, the compares
// skipped (they were a quarter of the loop at [64, 512]).
template <Estimator E, bool kClamp, bool kStream, typename scalar_t>
static void shape_row(const scalar_t* a, const scalar_t* b, const uint8_t* mr, float* k_p, float* r_p, int64_t T,
                      float coef, const fVec& lo, const fVec& hi, fVec& probe) {
  const fVec zero(0.f), ncoef(-coef);
  auto step = [&](const fVec& m, const fVec& av, const fVec& bv) {
    fVec k = kl_value<E>(av, bv);
    if constexpr (kClamp) k = clamp_kl(k, lo, hi);
    k = rlvec::select(m, k, zero);
    probe = probe + rlvec::nonfinite_probe(k);
    return k;
  };
  int64_t t = 0;
  for (; t + W <= T; t += W) {
    const fVec m = rlvec::load_mask(mr + t);
    const fVec k = step(m, rlvec::load(a + t), rlvec::load(b + t));
    const fVec rw = rlvec::select(m, ncoef * k, zero);
    if constexpr (kStream) {
      rlvec::store_stream(k, k_p + t);
      rlvec::store_stream(rw, r_p + t);
    } else {
      k.store(k_p + t);
      rw.store(r_p + t);
    }
  }
  if (t < T) {
    const int64_t n = T - t;
    const fVec m = rlvec::load_mask(mr + t, n);
    const fVec k = step(m, rlvec::load(a + t, n), rlvec::load(b + t, n));
    k.store(k_p + t, n);
    rlvec::select(m, ncoef * k, zero).store(r_p + t, n);
  }
}

// Whether a valid entry of a or b is not finite: the error path only (a kl that is not finite).
template <typename scalar_t>
static bool any_nonfinite_valid(const scalar_t* a, const scalar_t* b, const uint8_t* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (m[i] && !(std::isfinite(to_float(a[i])) && std::isfinite(to_float(b[i])))) return true;
  return false;
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
  at::Tensor s = scores.scalar_type() == at::kFloat ? scores.contiguous() : scores.to(at::kFloat).contiguous();
  const int64_t B = lp.size(0), T = lp.size(1);
  auto opts = lp.options().dtype(at::kFloat);
  at::Tensor rewards = at::empty({B, T}, opts), kl = at::empty({B, T}, opts);
  float* r_p = rewards.data_ptr<float>();
  float* k_p = kl.data_ptr<float>();
  const uint8_t* m_p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const float* s_p = s.data_ptr<float>();
  bool scores_finite = true;
  for (int64_t row = 0; row < B; ++row) scores_finite &= std::isfinite(s_p[row]);
  const float coef = static_cast<float>(kl_coef);
  const auto [lo, hi] = clamp_bounds(clamp);
  std::atomic<bool> kl_finite{true};
  bool inputs_finite = true;
  dispatch_floating(lp.scalar_type(), "shape_rewards", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* a = lp.data_ptr<scalar_t>();
    const scalar_t* b = ref.data_ptr<scalar_t>();
    dispatch_estimator(est, [&](auto e) {
      constexpr Estimator E = decltype(e)::value;
      auto run = [&](auto clamp_tag, auto stream_tag) {
        constexpr bool kClamp = decltype(clamp_tag)::value;
        constexpr bool kStream = decltype(stream_tag)::value;
        const fVec lov(lo), hiv(hi);
        const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(T, 1));
        at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
          fVec probe(0.f);
          for (int64_t row = r0; row < r1; ++row) {
            const int64_t off = row * T;
            shape_row<E, kClamp, kStream>(a + off, b + off, m_p + off, k_p + off, r_p + off, T, coef, lov, hiv,
                                          probe);
            const int64_t last = rlvec::last_set(m_p + off, T);
            if (last >= 0) r_p[off + last] += s_p[row];  // empty row: the score lands nowhere
          }
          if (kStream) rlvec::stream_fence();
          if (rlvec::any_nan(probe)) kl_finite.store(false, std::memory_order_relaxed);
        });
      };
      // Outputs of 8 MiB and up bypass the caches, as in gae (below).
      const bool stream = B * T >= (int64_t{1} << 20);
      if (clamp.has_value()) {
        stream ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
      } else {
        stream ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
      }
    });
    if (!kl_finite.load()) inputs_finite = !any_nonfinite_valid(a, b, m_p, B * T);
  });
  // ValueError (TORCH_CHECK_VALUE): rlhf_fast/ops/rlmath.py catches it and names the row.
  TORCH_CHECK_VALUE(scores_finite, "shape_rewards: scores has a non-finite value");
  // The former Python check's rule (rlhf_fast/_rlmath_checks.py, check_shape_rewards_outputs): an
  // error when kl is not finite on a valid token *because* a log-prob is not finite; a clamp that
  // bounds an inf difference, or k3 overflowing from finite log-probs, is not an input error.
  TORCH_CHECK_VALUE(kl_finite.load() || inputs_finite,
                    "shape_rewards: a non-finite logprobs or ref_logprobs value on a valid token");
  return {rewards, kl};
}

// ---- GAE: W rows per lane group ----------------------------------------------------------------
//
// Lane l of every vector is row r0 + l. Per block of kTB time steps (from the end of the rows):
// the W row segments are copied (converted to float, the mask to lane masks) into row-major
// staging, each W x W tile of it is transposed to [time][lane] (at::vec::transpose_mxn: register
// transposes on AVX-512 / AVX2), the recurrence steps back through the tile one vector per time
// step, and the outputs go back the same way. The staging is what makes long rows fast: the W rows
// are T floats apart (32 KiB at T = 8192, a multiple of 4 KiB from T = 1024), so tiles read straight
// from the tensors hit one L1 set from every row and wrote partial lines; per-row copies of kTB
// steps stream. The recurrence is the scalar one lane for lane:
//   a = ((r + g * next_value) - value) + gl * running   (the order of the former scalar loop)
// selected, not branched, on the mask: the value at a masked position may be anything (NaN
// padding) and is never used. Rows past B (the last group) and steps past the block's end are
// staged as masked zeros, which leave the carries alone, so every row gets the same arithmetic.
constexpr int64_t kTB = 1024 / W;  // staging: 4 arrays of W x kTB floats = 16 KiB, L1-resident
// Staging rows kTB + W floats apart and the arrays an odd number of lines apart: at a 4 KiB stride
// the rows (and the arrays) all fell into the same L1 sets (and 4 KiB-aliased the source rows).
constexpr int64_t kLd = kTB + W;
constexpr int64_t kArr = W * kLd + 16;

struct GaeStaging {
  __at_align__ float buf[4 * kArr];
  float* r = buf;
  float* v = buf + kArr;
  float* m = buf + 2 * kArr;
  float* a = buf + 3 * kArr;
  __at_align__ float tr[W * W + 16], tv[W * W + 16], tm[W * W + 16], ta[W * W];  // [time][lane] tiles
};

// dst[0, n) = src[0, n) as float, zeros in [n, len) (len a multiple of W).
template <typename scalar_t>
static inline void stage_segment(const scalar_t* src, int64_t n, float* dst, int64_t len) {
  int64_t j = 0;
  for (; j + W <= n; j += W) rlvec::load(src + j).store(dst + j);
  if (j < n) {
    rlvec::load(src + j, n - j).store(dst + j);
    j += W;
  }
  for (; j < len; j += W) fVec(0.f).store(dst + j);
}

static inline void stage_mask(const uint8_t* src, int64_t n, float* dst, int64_t len) {
  int64_t j = 0;
  for (; j + W <= n; j += W) rlvec::load_mask(src + j).store(dst + j);
  if (j < n) {
    rlvec::load_mask(src + j, n - j).store(dst + j);
    j += W;
  }
  for (; j < len; j += W) fVec(0.f).store(dst + j);
}

template <bool kStream>
static inline void write_row(const float* a, const float* v, const float* m, int64_t n, float* adv, float* ret) {
  const fVec zero(0.f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const fVec av = fVec::loadu(a + j);
    const fVec rv = rlvec::select(fVec::loadu(m + j), av + fVec::loadu(v + j), zero);
    if constexpr (kStream) {
      rlvec::store_stream(av, adv + j);
      rlvec::store_stream(rv, ret + j);
    } else {
      av.store(adv + j);
      rv.store(ret + j);
    }
  }
  if (j < n) {
    const fVec av = fVec::loadu(a + j);
    av.store(adv + j, n - j);
    rlvec::select(fVec::loadu(m + j), av + fVec::loadu(v + j), zero).store(ret + j, n - j);
  }
}

// G lane groups (G * W rows from r, rows of them real) side by side. The recurrence is one
// dependent chain per group (running: a multiply, an add and a select per time step), so one
// group at a time left the loop bound by that chain's latency (issue 23: AVX2, 8 rows per chain);
// with G = 2 the two groups' steps interleave. Each lane's arithmetic is the same for any G.
template <int G, bool kStream, typename scalar_t>
static void gae_group(const scalar_t* r, const scalar_t* v, const uint8_t* m, float* adv, float* ret, int64_t T,
                      int64_t rows, float g, float gl, GaeStaging* st, fVec& probe) {
  const fVec gv(g), glv(gl), zero(0.f);
  fVec next_value[G], running[G];
  for (int k = 0; k < G; ++k) {
    next_value[k] = zero;  // the value after the last valid token is 0
    running[k] = zero;     // the advantage of the next valid token
  }
  for (int64_t t1 = T; t1 > 0;) {
    const int64_t rem = t1 % kTB;
    const int64_t n = (t1 == T && rem != 0) ? rem : kTB;  // the first block taken holds the T % kTB tail
    const int64_t t0 = t1 - n;
    const int64_t len = (n + W - 1) / W * W;
    // The next block taken is the kTB steps before this one, in every row: prefetch it now, so its
    // loads overlap this block's arithmetic (the blocks walk the rows backwards, a pattern the
    // hardware prefetchers follow poorly across W rows).
    if (t0 >= kTB) {
      for (int64_t l = 0; l < rows; ++l) {
        for (int64_t j = 0; j < kTB; j += 64 / static_cast<int64_t>(sizeof(scalar_t))) {
          __builtin_prefetch(r + l * T + t0 - kTB + j);
          __builtin_prefetch(v + l * T + t0 - kTB + j);
        }
        __builtin_prefetch(m + l * T + t0 - kTB);
        __builtin_prefetch(m + l * T + t0 - 1);
      }
    }
    for (int k = 0; k < G; ++k) {
      GaeStaging& sk = st[k];
      for (int64_t l = 0; l < W; ++l) {
        const int64_t row = k * W + l;
        if (row < rows) {
          stage_segment(r + row * T + t0, n, sk.r + l * kLd, len);
          stage_segment(v + row * T + t0, n, sk.v + l * kLd, len);
          stage_mask(m + row * T + t0, n, sk.m + l * kLd, len);
        } else {
          std::fill(sk.m + l * kLd, sk.m + l * kLd + len, 0.f);
          std::fill(sk.r + l * kLd, sk.r + l * kLd + len, 0.f);
          std::fill(sk.v + l * kLd, sk.v + l * kLd + len, 0.f);
        }
      }
    }
    for (int64_t j0 = len - W; j0 >= 0; j0 -= W) {
      for (int k = 0; k < G; ++k) {
        rlvec::transpose_tile(st[k].r + j0, kLd, st[k].tr, W);
        rlvec::transpose_tile(st[k].v + j0, kLd, st[k].tv, W);
        rlvec::transpose_tile(st[k].m + j0, kLd, st[k].tm, W);
      }
      for (int64_t j = W - 1; j >= 0; --j) {
#pragma GCC unroll 2
        for (int k = 0; k < G; ++k) {
          const fVec valid = fVec::loadu(st[k].tm + j * W);
          const fVec value = fVec::loadu(st[k].tv + j * W);
          const fVec reward = fVec::loadu(st[k].tr + j * W);
          probe = probe + rlvec::select(valid, rlvec::nonfinite_probe(reward) + rlvec::nonfinite_probe(value), zero);
          const fVec a = reward + gv * next_value[k] - value + glv * running[k];
          running[k] = rlvec::select(valid, a, running[k]);  // a hole: the carries pass across it
          next_value[k] = rlvec::select(valid, value, next_value[k]);
          rlvec::select(valid, a, zero).store(st[k].ta + j * W);
        }
      }
      for (int k = 0; k < G; ++k) rlvec::transpose_tile(st[k].ta, W, st[k].a + j0, kLd);
    }
    // Back in row order: advantages, and returns = advantage + value on valid tokens (the same
    // float addition as in the lanes, one transpose fewer). Vector copies: gcc inlined a memcpy
    // here as `rep movsq`, 40% of the time.
    for (int64_t row = 0; row < rows; ++row) {
      const GaeStaging& sk = st[row / W];
      const int64_t l = row % W;
      write_row<kStream>(sk.a + l * kLd, sk.v + l * kLd, sk.m + l * kLd, n, adv + row * T + t0, ret + row * T + t0);
    }
    t1 = t0;
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
  const uint8_t* m_p = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
  const float g = static_cast<float>(gamma);
  const float gl = static_cast<float>(gamma * lam);
  const int64_t groups = (B + W - 1) / W;
  std::atomic<bool> inputs_finite{true};
  dispatch_floating(r.scalar_type(), "gae", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* r_p = r.data_ptr<scalar_t>();
    const scalar_t* v_p = v.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(W * T, 1));
    // Outputs of 8 MiB and up (2 x 4 B x 1 Mi elements) are streamed past the caches: they would
    // not stay there anyway, and a plain store first reads every line it writes (a third of the
    // traffic): gae at [256, 8192], one thread, 5.4 -> 2.6 ms of CPU time (issue 23).
    const bool stream = B * T >= (int64_t{1} << 20);
    at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
      GaeStaging st[2];  // per thread, on its stack
      fVec probe(0.f);
      for (int64_t grp = g0; grp < g1;) {
        const int64_t off = grp * W * T;
        const int64_t pair = grp + 1 < g1 ? 2 : 1;  // two groups side by side where the task has them
        const int64_t rows = std::min<int64_t>(pair * W, B - grp * W);
        if (pair == 2) {
          stream ? gae_group<2, true>(r_p + off, v_p + off, m_p + off, a_p + off, q_p + off, T, rows, g, gl, st, probe)
                 : gae_group<2, false>(r_p + off, v_p + off, m_p + off, a_p + off, q_p + off, T, rows, g, gl, st, probe);
        } else {
          stream ? gae_group<1, true>(r_p + off, v_p + off, m_p + off, a_p + off, q_p + off, T, rows, g, gl, st, probe)
                 : gae_group<1, false>(r_p + off, v_p + off, m_p + off, a_p + off, q_p + off, T, rows, g, gl, st, probe);
        }
        grp += pair;
      }
      if (stream) rlvec::stream_fence();
      if (rlvec::any_nan(probe)) inputs_finite.store(false, std::memory_order_relaxed);
    });
  });
  // Finite rewards and values on valid tokens (rlhf_fast/_rlmath_checks.py, check_gae_inputs'
  // rule), checked while they are in registers instead of by a reduction over the returns
  // afterwards (an 8 MiB read at [256, 8192]); ValueError: rlhf_fast/ops/rlmath.py names the row.
  TORCH_CHECK_VALUE(inputs_finite.load(), "gae: a non-finite rewards or values value on a valid token");
  return {adv, ret};
}

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
