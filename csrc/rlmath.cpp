// CPU kernels kl_penalty and shape_rewards, and the schemas of every RL-math op (the two other
// files register only their kernels). What the RL-math kernels share: csrc/rlmath_common.h.
//   kl_penalty       one pass, elementwise (vexp for k3).
//   shape_rewards    one pass per row: reads logprobs, ref, mask; writes rewards and kl; finds the
//                    row's last valid token (a word scan of the mask from the end) for the score.
//                    It also checks, for free, the finiteness the Python layer used to check with
//                    extra reductions (scores; log-probs where kl is not finite on a valid token):
//                    a ValueError the Python layer turns into the row-naming message. Those
//                    reductions cost more than the kernel itself at [64, 512].
#include "rlmath_common.h"

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
using rlmath::kMinPerThread;
using rlmath::same_dtype;

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
      // Outputs of 8 MiB and up bypass the caches, as in gae (csrc/rlmath_gae.cpp).
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
}

}  // namespace rlhf_fast
