// CPU kernels for rlhf_fast::gather_logprobs (token log-probs + entropy from logits).
//
// Forward, per row of V logits: one pass converts x / T to a float row buffer and finds the
// max, one pass over that (L1/L2-resident) buffer accumulates sum(exp(z - m)) and
// sum(exp(z - m) * (z - m)) with a vectorised exp. Nothing of size [N, V] is written: the outputs
// are four floats per row (log-prob, entropy, and the row stats m and log(s)).
//   logprob = (z[y] - m) - log(s),  entropy = log(s) - t / s.
// Backward, per row, one read of the logits and one write of d(logits), with
// log p_k = (z_k - m) - log(s):
//   dz_k = g_lp * (1[k = y] - p_k) - g_H * p_k * (log p_k + H),  dx = dz / T.
//
// The loops are written on at::vec::Vectorized<float> (csrc/vec_math.h), compiled once per ISA
// level (rlhf_fast/ops/_library.py): gcc left the branchy `#pragma omp simd` loops scalar on AVX2
// (issue 23: 3.5-4x slower than torch there). Every result is computed the same way on every level:
//   - the sums keep kLanes = 64 logical lanes (four Vectorized on AVX-512, eight on AVX2 /
//     NEON-pairs): element j of a 64-block always goes to lane j % 64, each lane is a Kahan sum,
//     and the lanes are merged in double in lane order, then the < 64 tail in double. 64 rather
//     than 16 (issue 23): a block's exps run side by side (vexp_nonpos_n), several independent
//     polynomial chains per iteration instead of one (AVX-512) or two (AVX2);
//   - vexp (and vexp_nonpos on z - max <= 0) is bit-identical to the scalar fast_expf
//     (csrc/vec_math.h; checked on 307M non-positive inputs per build), and the only multiply-adds
//     are explicit (at::vec::fmadd / fnmadd, fnmadd_s below), so no result depends on where the
//     compiler contracts a * b + c.
// So the AVX2 and AVX-512 builds give bit-identical outputs and gradients (tests/test_cpu_isa.py).
//
// Rows are independent: at::parallel_for over rows, torch's own thread pool, so
// torch.set_num_threads applies and the kernels do not oversubscribe a busy machine (issue 23).
// Each row is reduced by one thread in a fixed order, so a row's results do not depend on the
// thread count or on the other rows of the batch.
//
// Sampling filter (top-k / top-p, rlhf_fast/_filter.py): an optional cut per row (cut_value c,
// cut_index i) keeps token j iff z_j > c or (z_j == c and j <= i); the sums run over kept tokens
// only, so log-probs and entropy are those of the renormalised kept set, and d(logits) is 0 outside
// it (the set is a constant of the forward). A label outside the set has log-prob -inf and no
// gradient. Without a cut the loops are the unfiltered ones, unchanged.
#include "common.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <type_traits>

namespace rlhf_fast {
namespace {

constexpr int64_t kLanes = 64;                  // logical lanes of the compensated sums
constexpr int64_t kW = fVec::size();            // floats per Vectorized on this ISA level
constexpr int64_t kVecs = kLanes / kW;          // Vectorized per kLanes-block
static_assert(kLanes % kW == 0, "kLanes logical lanes must be a whole number of Vectorized<float>");

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// c - a * b, rounded once where the build has FMA (what at::vec::fnmadd does on such a build),
// twice where it has none (x86-64 baseline: at::vec::fnmadd is -(a * b) + c there): the scalar
// tails then match the vector loops bit for bit.
static inline float fnmadd_s(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(-a, b, c);
#else
  return -(a * b) + c;
#endif
}

struct RowStats {
  float logprob, entropy, max, log_sum;  // lse = max + log_sum, kept in two parts (see below)
};

struct Cut {
  bool on;       // false: every token is kept
  float value;   // the scaled logit of the last kept token in (z desc, id asc) order
  int64_t index; // its token id
};

static inline bool kept(const Cut& c, float z, int64_t j) {
  return z > c.value || (z == c.value && j <= c.index);
}

// The kept mask of the kW tokens j0 .. j0 + kW - 1 (all-ones lanes where kept). The index test
// j <= i is done as lane <= i - j0 on small floats (exact: clamped to [-1, kW]), so it holds for
// any V.
static inline fVec kept_vec(const Cut& c, const fVec& z, int64_t j0) {
  const float r = static_cast<float>(std::clamp<int64_t>(c.index - j0, -1, kW));
  const fVec cv(c.value);
  const fVec lane = fVec::arange(0.f, 1.f);
  return (z > cv) | ((z == cv) & (lane <= fVec(r)));
}

// kW logits from p as float: a load (float32) or a load and an exact widening (bf16 / fp16).
template <typename scalar_t>
static inline fVec load_f(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return fVec::loadu(p);
  } else {
    fVec o;
    at::vec::load_to_float<scalar_t>(p, o);
    return o;
  }
}

// Pass 1 at temperature 1 for float32 / bf16 / fp16 logits: the max (and min) of the row itself, no copy
// (pass 2 reads the row again; a [V] bf16 row is half the bytes of a float buffer, and writing
// that buffer cost more than widening twice, issue 23). Four accumulators so the loop is not
// bound by the latency of one max chain. Each is `z > m ? z : m` lane for lane as in
// load_row_max, and so is their merge: a NaN is skipped, and the max of the non-NaN values is the
// same whatever the grouping (only which of +0 / -0 is kept when the max is 0 can change, which
// moves no output but the sign of a zero). The min (NaN skipped too) tells pass 2 whether any
// z - max can be below vexp's underflow bound (see finish_row).
template <typename scalar_t>
float row_max(const scalar_t* x, int64_t V, float* min_out) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const float kInf = std::numeric_limits<float>::infinity();
  fVec m0(kNegInf), m1(kNegInf), m2(kNegInf), m3(kNegInf);
  fVec n0(kInf), n1(kInf);
  int64_t j = 0;
  for (; j + 4 * kW <= V; j += 4 * kW) {
    const fVec a = load_f(x + j), b = load_f(x + j + kW);
    const fVec c = load_f(x + j + 2 * kW), d = load_f(x + j + 3 * kW);
    m0 = at::vec::clamp_min(m0, a);
    m1 = at::vec::clamp_min(m1, b);
    m2 = at::vec::clamp_min(m2, c);
    m3 = at::vec::clamp_min(m3, d);
    // `z < mn ? z : mn` lane for lane (minps(z, mn)): a NaN z is skipped.
    n0 = at::vec::clamp_max(at::vec::clamp_max(n0, a), c);
    n1 = at::vec::clamp_max(at::vec::clamp_max(n1, b), d);
  }
  for (; j + kW <= V; j += kW) {
    const fVec a = load_f(x + j);
    m0 = at::vec::clamp_min(m0, a);
    n0 = at::vec::clamp_max(n0, a);
  }
  m0 = at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3));
  n0 = at::vec::clamp_max(n0, n1);
  float lanes[kW], lanes_n[kW];
  m0.store(lanes);
  n0.store(lanes_n);
  float m = kNegInf, mn = kInf;
  for (int64_t l = 0; l < kW; ++l) {
    m = lanes[l] > m ? lanes[l] : m;
    mn = lanes_n[l] < mn ? lanes_n[l] : mn;
  }
  for (; j < V; ++j) {
    const float z = to_float(x[j]);
    m = z > m ? z : m;
    mn = z < mn ? z : mn;
  }
  *min_out = mn;
  return m;
}

// Pass 1: the row as float (x / T) into buf, and its max. The max is clamp_min(m, z), on x86
// `z > m ? z : m` lane for lane (maxps(z, m); the portable build's loop is that ternary), so a NaN
// is skipped and the sums below carry it; on aarch64 vmaxq may keep the NaN as the max instead:
// the row's outputs are NaN either way. Returns the max; *row points at the float row to read.
template <typename scalar_t>
float load_row_max(const scalar_t* x, int64_t V, bool use_div, float temperature, float* buf,
                   const float** row) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  fVec mv(kNegInf);
  const fVec tv(temperature);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!use_div) {
      // float32 at temperature 1: read the row itself twice (it stays in L2) instead of copying it.
      for (; j + kW <= V; j += kW) {
        const fVec z = fVec::loadu(x + j);
        mv = at::vec::clamp_min(mv, z);
      }
      *row = x;
    } else {
      for (; j + kW <= V; j += kW) {
        const fVec z = fVec::loadu(x + j) / tv;
        z.store(buf + j);
        mv = at::vec::clamp_min(mv, z);
      }
      *row = buf;
    }
  } else if constexpr (kReduced<scalar_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    static_assert(rVec::size() == 2 * kW, "a reduced-float Vectorized converts to two float ones");
    for (; j + rVec::size() <= V; j += rVec::size()) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(rVec::loadu(x + j));
      if (use_div) {
        a = a / tv;
        b = b / tv;
      }
      a.store(buf + j);
      b.store(buf + j + kW);
      mv = at::vec::clamp_min(mv, a);
      mv = at::vec::clamp_min(mv, b);
    }
    *row = buf;
  } else {
    *row = buf;  // double logits: the scalar loop below converts them
  }
  float lanes[kW];
  mv.store(lanes);
  float m = kNegInf;
  for (int64_t l = 0; l < kW; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (; j < V; ++j) {
    const float z = use_div ? to_float(x[j]) / temperature : to_float(x[j]);
    if (*row == buf) buf[j] = z;
    m = z > m ? z : m;
  }
  return m;
}

// Pass 2: the compensated sums s = sum exp(d), t = sum exp(d) * d over the kept tokens, d = z - m.
// Kahan in kLanes float lanes, then merged in double. Plain float lanes lost ~2 ulps of s at
// V = 341 (the lane holding exp(0) = 1 rounds every small term it adds), which the gradient
// (through p = exp(z - m - log s)) amplified past torch's float32 error (an @example in
// tests/test_gather_logprobs.py). Widening every term to double fixes that too but vectorises
// worse (~1.4x the time); Kahan keeps one float SIMD loop. -O3 without -ffast-math keeps the
// compensation.
template <bool kCut, bool kEnt, bool kUnder, typename scalar_t>
void compensated_sums(const scalar_t* z, int64_t V, float m, const Cut& cut, double* s_out,
                      double* t_out) {
  const fVec zero(0.f), mv(m);
  fVec s[kVecs], sc[kVecs], t[kVecs], tc[kVecs];
  for (int64_t v = 0; v < kVecs; ++v) s[v] = sc[v] = t[v] = tc[v] = zero;
  const int64_t V_main = V - V % kLanes;
  for (int64_t j0 = 0; j0 < V_main; j0 += kLanes) {
    // The block's kVecs exps side by side (vexp_nonpos_n: vexp_nonpos's bits, interleaved).
    fVec x[kVecs], d[kVecs], e[kVecs];
#pragma GCC unroll 16
    for (int64_t v = 0; v < kVecs; ++v) {
      x[v] = load_f(z + j0 + v * kW);
      d[v] = x[v] - mv;
    }
    vexp_nonpos_n<kVecs, kUnder>(d, e);  // d <= 0: m is the max of these very values
    if constexpr (kCut) {
      // A dropped token's exp is +0 (the bits exp(-inf) gave when d was set to -inf first). The
      // index test is needed only in the one vector holding the cut's index: before it every
      // token with z == c is kept (z >= c), after it none is (z > c).
      const fVec cv(cut.value);
#pragma GCC unroll 16
      for (int64_t v = 0; v < kVecs; ++v) {
        const int64_t j = j0 + v * kW;
        const fVec keep = j + kW - 1 <= cut.index ? (x[v] >= cv) : j > cut.index ? (x[v] > cv) : kept_vec(cut, x[v], j);
        e[v] = e[v] & keep;
      }
    }
#pragma GCC unroll 16
    for (int64_t v = 0; v < kVecs; ++v) {
      const fVec ys = e[v] - sc[v], ts = s[v] + ys;
      sc[v] = (ts - s[v]) - ys;
      s[v] = ts;
      if constexpr (kEnt) {
        // exp(-inf) * -inf would be NaN: a -inf logit adds nothing. `& mask` is
        // blendv(0, e * d, mask) bit for bit (+0 is all zero bits), one instruction on every level.
        const fVec ed = (e[v] * d[v]) & (e[v] > zero);
        const fVec yt = ed - tc[v], tt = t[v] + yt;
        tc[v] = (tt - t[v]) - yt;
        t[v] = tt;
      }
    }
  }
  float s_l[kLanes], sc_l[kLanes], t_l[kLanes], tc_l[kLanes];
  for (int64_t v = 0; v < kVecs; ++v) {
    s[v].store(s_l + v * kW);
    sc[v].store(sc_l + v * kW);
    t[v].store(t_l + v * kW);
    tc[v].store(tc_l + v * kW);
  }
  double sd = 0.0, td = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) {
    sd += static_cast<double>(s_l[l]) - static_cast<double>(sc_l[l]);
    td += static_cast<double>(t_l[l]) - static_cast<double>(tc_l[l]);
  }
  const float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t j = V_main; j < V; ++j) {
    const float zj = to_float(z[j]);
    const float d = (!kCut || kept(cut, zj, j)) ? zj - m : kNegInf;
    const float e = fast_expf(d);
    sd += static_cast<double>(e);
    if (kEnt) td += e > 0.f ? static_cast<double>(e * d) : 0.0;
  }
  *s_out = sd;
  *t_out = td;
}

// Passes 2 and 3 of a row: the sums over z (the row as float, or float32 / bf16 / fp16 logits
// read in place at temperature 1; their float values are the same either way) and the outputs.
// no_under: the caller checked fl(min z - m) >= vexp's lower bound (-87.33654475, csrc/vec_math.h).
// fl(z - m) is monotone in z, so then no z - m of the row is below it and vexp_nonpos's underflow
// blend would select no lane: pass 2 leaves it out (same bits, three instructions less per vector
// on AVX2). A -inf logit, a +inf max or a cut takes the general loop.
template <typename zscalar_t>
RowStats finish_row(const zscalar_t* z, float m, int64_t V, int64_t label, int64_t ignore_index,
                    bool want_entropy, Cut cut, bool no_under) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  double s = 0.0, t = 0.0;
  if (cut.on) {
    // The entropy sum only when asked for (s is the same either way: its lanes never see t's).
    // Dropped tokens are masked after their exp, so only the kept ones' d = z - m <= 0 matter:
    // no_under (every z - m of the row above vexp's bound) still lets the underflow blend go.
    if (want_entropy) {
      no_under ? compensated_sums<true, true, false>(z, V, m, cut, &s, &t)
               : compensated_sums<true, true, true>(z, V, m, cut, &s, &t);
    } else {
      no_under ? compensated_sums<true, false, false>(z, V, m, cut, &s, &t)
               : compensated_sums<true, false, true>(z, V, m, cut, &s, &t);
    }
  } else if (want_entropy) {
    no_under ? compensated_sums<false, true, false>(z, V, m, cut, &s, &t)
             : compensated_sums<false, true, true>(z, V, m, cut, &s, &t);
  } else {
    no_under ? compensated_sums<false, false, false>(z, V, m, cut, &s, &t)
             : compensated_sums<false, false, true>(z, V, m, cut, &s, &t);
  }
  // A row with NaN: the max skips the NaN, the sum does not.
  const double log_s_d = std::log(s);
  const float log_s = static_cast<float>(log_s_d);
  RowStats r;
  r.max = m;
  r.log_sum = log_s;
  r.entropy = want_entropy ? static_cast<float>(log_s_d - t / s) : 0.f;
  if (label == ignore_index) {
    r.logprob = 0.f;
  } else if (label >= 0 && label < V && cut.on && !kept(cut, to_float(z[label]), label)) {
    r.logprob = kNegInf;  // not in the kept set: the sampler could not have drawn it
  } else if (label >= 0 && label < V) {
    // (z - m) - log_s, not z - (m + log_s): a rounded lse of ~10 carries an absolute error of
    // ~5e-7, four times what torch's log_softmax has on log-probs of order 1.
    r.logprob = (to_float(z[label]) - m) - log_s;
  } else {
    r.logprob = std::numeric_limits<float>::quiet_NaN();  // the Python layer rejects these first
  }
  return r;
}

template <typename scalar_t>
RowStats logprob_row(const scalar_t* x, int64_t V, int64_t label, bool use_div,
                     float temperature, int64_t ignore_index, bool want_entropy, float* buf,
                     Cut cut) {
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (!use_div) {
      // Temperature 1: z is x, read in place by both passes.
      float mn = 0.f;
      const float m = row_max(x, V, &mn);
      const bool no_under = mn - m >= -87.33654475f;  // false for NaN (inf - inf)
      return finish_row(x, m, V, label, ignore_index, want_entropy, cut, no_under);
    }
  }
  const float* z = nullptr;
  const float m = load_row_max<scalar_t>(x, V, use_div, temperature, buf, &z);
  return finish_row(z, m, V, label, ignore_index, want_entropy, cut, false);
}

// Rows per parallel_for task: at least ~32K logits, so a batch of short rows is not split into
// tasks smaller than the pool's start-up cost.
static inline int64_t row_grain(int64_t V) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
}

struct BackwardRow {
  float max, log_sum, h;  // the forward's row stats and entropy
  float g_lp, g_h;        // upstream gradients (g_lp = 0 when the label is ignored / not kept)
  float temperature;
  Cut cut;
};

// d(logits) of one row for every token as if it were not the label (the caller rewrites the
// label's entry): dz = -g_lp * p - g_H * p * (log p + H), 0 outside the kept set; dx = dz / T.
// The scalar tail is the vector body lane for lane (fast_expf == vexp, explicit fnmadd), so an
// element's gradient does not depend on the vector width.
// kDiv = false at temperature 1, where x / T and dz / T are x and dz exactly: two vector divisions
// less per vector (the slowest instructions of the loop).
template <bool kCut, bool kDiv>
static inline fVec backward_vec(const fVec& x, int64_t j0, const BackwardRow& r, const fVec& tv) {
  const fVec zero(0.f);
  const fVec z = kDiv ? x / tv : x;
  const fVec logp = (z - fVec(r.max)) - fVec(r.log_sum);
  fVec p = vexp(logp);
  if constexpr (kCut) p = p & kept_vec(r.cut, z, j0);      // blendv(0, p, kept), as above
  const fVec ent_term = (p * (logp + fVec(r.h))) & (p > zero);
  const fVec dz = at::vec::fnmadd(fVec(r.g_h), ent_term, at::vec::fnmadd(fVec(r.g_lp), p, zero));
  return kDiv ? dz / tv : dz;
}

template <bool kCut, bool kDiv>
static inline float backward_scalar(float x, int64_t j, const BackwardRow& r) {
  const float z = kDiv ? x / r.temperature : x;
  const float logp = (z - r.max) - r.log_sum;
  float p = fast_expf(logp);
  if (kCut) p = kept(r.cut, z, j) ? p : 0.f;
  const float ent_term = p > 0.f ? p * (logp + r.h) : 0.f;
  const float dz = fnmadd_s(r.g_h, ent_term, fnmadd_s(r.g_lp, p, 0.f));
  return kDiv ? dz / r.temperature : dz;
}

template <bool kCut, bool kDiv, typename scalar_t>
void backward_row_impl(const scalar_t* xr, scalar_t* dr, int64_t V, const BackwardRow& r) {
  const fVec tv(r.temperature);
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; j + kW <= V; j += kW) backward_vec<kCut, kDiv>(fVec::loadu(xr + j), j, r, tv).store(dr + j);
  } else if constexpr (kReduced<scalar_t>) {
    using rVec = at::vec::Vectorized<scalar_t>;
    for (; j + rVec::size() <= V; j += rVec::size()) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(rVec::loadu(xr + j));
      at::vec::convert_from_float<scalar_t>(backward_vec<kCut, kDiv>(a, j, r, tv),
                                            backward_vec<kCut, kDiv>(b, j + kW, r, tv))
          .store(dr + j);
    }
  }
  for (; j < V; ++j) dr[j] = from_float<scalar_t>(backward_scalar<kCut, kDiv>(to_float(xr[j]), j, r));
}

template <typename scalar_t>
void backward_row(const scalar_t* xr, scalar_t* dr, int64_t V, const BackwardRow& r) {
  const bool div = r.temperature != 1.f;
  if (r.cut.on) {
    div ? backward_row_impl<true, true>(xr, dr, V, r) : backward_row_impl<true, false>(xr, dr, V, r);
  } else {
    div ? backward_row_impl<false, true>(xr, dr, V, r) : backward_row_impl<false, false>(xr, dr, V, r);
  }
}

// The optional (B, T) float32 cut values / int64 cut indices, both present or both absent.
static std::pair<at::Tensor, at::Tensor> cut_tensors(const char* name, const std::optional<at::Tensor>& cut_value,
                                                     const std::optional<at::Tensor>& cut_index, int64_t B,
                                                     int64_t Tn) {
  const bool has_v = cut_value.has_value() && cut_value->defined();
  const bool has_i = cut_index.has_value() && cut_index->defined();
  TORCH_CHECK(has_v == has_i, name, ": cut_value and cut_index must be given together");
  if (!has_v) return {at::Tensor(), at::Tensor()};
  TORCH_CHECK(cut_value->scalar_type() == at::kFloat && cut_index->scalar_type() == at::kLong, name,
              ": cut_value must be float32 and cut_index int64");
  TORCH_CHECK(cut_value->numel() == B * Tn && cut_index->numel() == B * Tn, name,
              ": cut_value and cut_index must have one entry per row (", B * Tn, ")");
  return {cut_value->contiguous(), cut_index->contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_logprobs_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, bool return_entropy,
    int64_t ignore_index, const std::optional<at::Tensor>& cut_value,
    const std::optional<at::Tensor>& cut_index) {
  TORCH_CHECK(logits.dim() == 3, "gather_logprobs: logits must be (B, T, V), got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "gather_logprobs: labels must be (B, T)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "gather_logprobs: labels must be int64");
  // (B, T, V) with any strides on B and T (e.g. logits[:, :-1] of a [B, T+1, V] tensor) is read
  // in place; only a non-unit stride along V forces a copy.
  at::Tensor x = logits.stride(2) == 1 ? logits : logits.contiguous();
  at::Tensor y = labels.contiguous();
  const int64_t B = x.size(0), Tn = x.size(1), N = B * Tn, V = x.size(2);
  const int64_t sb = x.stride(0), st = x.stride(1);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({B, Tn}, opts), ent = at::empty({B, Tn}, opts);
  at::Tensor stats = at::empty({B, Tn, 2}, opts);  // (max, log sum exp(z - max)) per row
  float* lp_p = lp.data_ptr<float>();
  float* ent_p = ent.data_ptr<float>();
  float* stats_p = stats.data_ptr<float>();
  const int64_t* y_p = y.data_ptr<int64_t>();
  const float temp = static_cast<float>(temperature);
  const bool use_div = temp != 1.0f;
  auto [cv, ci] = cut_tensors("gather_logprobs", cut_value, cut_index, B, Tn);
  const float* cv_p = cv.defined() ? cv.data_ptr<float>() : nullptr;
  const int64_t* ci_p = ci.defined() ? ci.data_ptr<int64_t>() : nullptr;
  dispatch_floating(x.scalar_type(), "gather_logprobs", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    // Rows of at least ~32K elements per task: below that the pool's start-up outweighs the work.
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      std::vector<float> buf(static_cast<size_t>(V));
      for (int64_t i = begin; i < end; ++i) {
        RowStats r = logprob_row<scalar_t>(x_p + (i / Tn) * sb + (i % Tn) * st, V, y_p[i], use_div,
                                           temp, ignore_index, return_entropy, buf.data(),
                                           Cut{cv_p != nullptr, cv_p ? cv_p[i] : 0.f, ci_p ? ci_p[i] : 0});
        lp_p[i] = r.logprob;
        ent_p[i] = r.entropy;
        stats_p[2 * i] = r.max;
        stats_p[2 * i + 1] = r.log_sum;
      }
    });
  });
  return {lp, ent, stats};
}

at::Tensor gather_logprobs_backward_cpu(const at::Tensor& grad_logprobs,
                                       const std::optional<at::Tensor>& grad_entropy,
                                       const at::Tensor& logits, const at::Tensor& labels,
                                       const at::Tensor& stats, const at::Tensor& entropy,
                                       double temperature, int64_t ignore_index,
                                       const std::optional<at::Tensor>& cut_value,
                                       const std::optional<at::Tensor>& cut_index) {
  TORCH_CHECK(logits.dim() == 3, "gather_logprobs_backward: logits must be (B, T, V)");
  at::Tensor x = logits.stride(2) == 1 ? logits : logits.contiguous();
  const int64_t B = x.size(0), Tn = x.size(1), N = B * Tn, V = x.size(2);
  const int64_t sb = x.stride(0), st = x.stride(1);
  at::Tensor glp = grad_logprobs.to(at::kFloat).contiguous();
  const bool has_gh = grad_entropy.has_value() && grad_entropy->defined();
  at::Tensor gh = has_gh ? grad_entropy->to(at::kFloat).contiguous() : glp;
  at::Tensor y = labels.contiguous(), stats_c = stats.contiguous(), ent_c = entropy.contiguous();
  at::Tensor dx = at::empty({B, Tn, V}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* glp_p = glp.data_ptr<float>();
  const float* gh_p = gh.data_ptr<float>();
  const float* stats_p = stats_c.data_ptr<float>();
  const float* ent_p = ent_c.data_ptr<float>();
  const int64_t* y_p = y.data_ptr<int64_t>();
  const float temp = static_cast<float>(temperature);
  auto [cv, ci] = cut_tensors("gather_logprobs_backward", cut_value, cut_index, B, Tn);
  const float* cv_p = cv.defined() ? cv.data_ptr<float>() : nullptr;
  const int64_t* ci_p = ci.defined() ? ci.data_ptr<int64_t>() : nullptr;
  dispatch_floating(x.scalar_type(), "gather_logprobs_backward", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    scalar_t* dx_p = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* xr = x_p + (i / Tn) * sb + (i % Tn) * st;
        const int64_t label = y_p[i];
        const Cut cut{cv_p != nullptr, cv_p ? cv_p[i] : 0.f, ci_p ? ci_p[i] : 0};
        bool has_label = label != ignore_index && label >= 0 && label < V;
        // filtered: kept tokens only; a label outside the set is a constant -inf
        if (cut.on) has_label = has_label && kept(cut, to_float(xr[label]) / temp, label);
        BackwardRow row{stats_p[2 * i], stats_p[2 * i + 1], ent_p[i], has_label ? glp_p[i] : 0.f,
                        has_gh ? gh_p[i] : 0.f, temp, cut};
        backward_row<scalar_t>(xr, dx_p + i * V, V, row);
        if (has_label) {
          const float z = to_float(xr[label]) / temp;
          const float logp = (z - row.max) - row.log_sum;
          const float p = fast_expf(logp);
          const float ent_term = p > 0.f ? p * (logp + row.h) : 0.f;
          // Unfiltered g_lp * (1 - p), filtered g_lp - g_lp * p: the formulas of the two loops
          // before issue 23, kept.
          const float a = cut.on ? fnmadd_s(row.g_lp, p, row.g_lp) : row.g_lp * (1.f - p);
          dx_p[i * V + label] = from_float<scalar_t>(fnmadd_s(row.g_h, ent_term, a) / temp);
        }
      }
    });
  });
  return dx;
}

}  // namespace

// The schemas are mirrored in rlhf_fast/ops/logprobs.py (SCHEMAS) for the no-compiler fallback;
// tests/test_gather_logprobs.py checks the two agree.
TORCH_LIBRARY_FRAGMENT(rlhf_fast, m) {
  m.def(
      "gather_logprobs(Tensor logits, Tensor labels, float temperature=1.0, "
      "bool return_entropy=False, int ignore_index=-100, Tensor? cut_value=None, "
      "Tensor? cut_index=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gather_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
      "Tensor labels, Tensor row_stats, Tensor entropy, float temperature, int ignore_index, "
      "Tensor? cut_value=None, Tensor? cut_index=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gather_logprobs", &gather_logprobs_cpu);
  m.impl("gather_logprobs_backward", &gather_logprobs_backward_cpu);
}

}  // namespace rlhf_fast
