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
// Rows are independent: OpenMP over rows (the same libgomp runtime torch uses, so
// torch.set_num_threads applies). Each row is reduced by one thread in a fixed order, so a row's
// results do not depend on the thread count or on the other rows of the batch.
//
// Sampling filter (top-k / top-p, rlhf_fast/_filter.py): an optional cut per row (cut_value c,
// cut_index i) keeps token j iff z_j > c or (z_j == c and j <= i); the sums run over kept tokens
// only, so log-probs and entropy are those of the renormalised kept set, and d(logits) is 0 outside
// it (the set is a constant of the forward). A label outside the set has log-prob -inf and no
// gradient. Without a cut the loops are the unfiltered ones, unchanged.
#include "common.h"

#include <omp.h>

#include <type_traits>

namespace rlhf_fast {
namespace {

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

template <typename scalar_t>
RowStats logprob_row(const scalar_t* x, int64_t V, int64_t label, bool use_div,
                     float temperature, int64_t ignore_index, bool want_entropy, float* buf,
                     Cut cut) {
  float m = -std::numeric_limits<float>::infinity();
  if (use_div) {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      float z = to_float(x[j]) / temperature;
      buf[j] = z;
      m = z > m ? z : m;
    }
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    // float32 at temperature 1: read the row itself twice (it stays in L2) instead of copying it.
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) m = x[j] > m ? x[j] : m;
    buf = const_cast<float*>(reinterpret_cast<const float*>(x));  // only read below
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) {
      float z = to_float(x[j]);
      buf[j] = z;
      m = z > m ? z : m;
    }
  }
  // The sums are compensated (Kahan) in kLanes float lanes, then merged in double. Plain float
  // lanes lost ~2 ulps of s at V = 341 (the lane holding exp(0) = 1 rounds every small term it
  // adds), which the gradient (through p = exp(z - m - log s)) amplified past torch's float32
  // error (an @example in tests/test_gather_logprobs.py). Widening every term to double fixes
  // that too but vectorises worse (~1.4x the time); Kahan keeps one float SIMD loop. -O3 without
  // -ffast-math keeps the compensation.
  constexpr int64_t kLanes = 16;
  float s_l[kLanes] = {0.f}, sc_l[kLanes] = {0.f}, t_l[kLanes] = {0.f}, tc_l[kLanes] = {0.f};
  const int64_t V_main = V - V % kLanes;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  if (cut.on) {
    // The same compensated sums over kept tokens: a dropped token's d is -inf, its exp 0.
    for (int64_t j0 = 0; j0 < V_main; j0 += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const float z = buf[j0 + l];
        const bool k = z > cut.value || (z == cut.value && j0 + l <= cut.index);
        const float d = k ? z - m : kNegInf;
        const float e = fast_expf(d);
        const float ed = e > 0.f ? e * d : 0.f;
        const float ys = e - sc_l[l], ts = s_l[l] + ys;
        sc_l[l] = (ts - s_l[l]) - ys;
        s_l[l] = ts;
        const float yt = ed - tc_l[l], tt = t_l[l] + yt;
        tc_l[l] = (tt - t_l[l]) - yt;
        t_l[l] = tt;
      }
    }
  } else if (want_entropy) {
    for (int64_t j0 = 0; j0 < V_main; j0 += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const float d = buf[j0 + l] - m;
        const float e = fast_expf(d);
        const float ed = e > 0.f ? e * d : 0.f;  // exp(-inf) * -inf would be NaN: a -inf logit adds nothing
        const float ys = e - sc_l[l], ts = s_l[l] + ys;
        sc_l[l] = (ts - s_l[l]) - ys;
        s_l[l] = ts;
        const float yt = ed - tc_l[l], tt = t_l[l] + yt;
        tc_l[l] = (tt - t_l[l]) - yt;
        t_l[l] = tt;
      }
    }
  } else {
    for (int64_t j0 = 0; j0 < V_main; j0 += kLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const float e = fast_expf(buf[j0 + l] - m);
        const float ys = e - sc_l[l], ts = s_l[l] + ys;
        sc_l[l] = (ts - s_l[l]) - ys;
        s_l[l] = ts;
      }
    }
  }
  double s = 0.0, t = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) {
    s += static_cast<double>(s_l[l]) - static_cast<double>(sc_l[l]);
    t += static_cast<double>(t_l[l]) - static_cast<double>(tc_l[l]);
  }
  for (int64_t j = V_main; j < V; ++j) {
    const float d = (!cut.on || kept(cut, buf[j], j)) ? buf[j] - m : kNegInf;
    const float e = fast_expf(d);
    s += static_cast<double>(e);
    t += e > 0.f ? static_cast<double>(e * d) : 0.0;
  }
  // A row with NaN: the max reduction may skip the NaN, the sum does not.
  const double log_s_d = std::log(s);
  const float log_s = static_cast<float>(log_s_d);
  RowStats r;
  r.max = m;
  r.log_sum = log_s;
  r.entropy = want_entropy ? static_cast<float>(log_s_d - t / s) : 0.f;
  if (label == ignore_index) {
    r.logprob = 0.f;
  } else if (label >= 0 && label < V && cut.on && !kept(cut, buf[label], label)) {
    r.logprob = kNegInf;  // not in the kept set: the sampler could not have drawn it
  } else if (label >= 0 && label < V) {
    // (z - m) - log_s, not z - (m + log_s): a rounded lse of ~10 carries an absolute error of
    // ~5e-7, four times what torch's log_softmax has on log-probs of order 1.
    r.logprob = (buf[label] - m) - log_s;
  } else {
    r.logprob = std::numeric_limits<float>::quiet_NaN();  // the Python layer rejects these first
  }
  return r;
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
#pragma omp parallel if (N > 1)
    {
      std::vector<float> buf(static_cast<size_t>(V));
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        RowStats r = logprob_row<scalar_t>(x_p + (i / Tn) * sb + (i % Tn) * st, V, y_p[i], use_div,
                                           temp, ignore_index, return_entropy, buf.data(),
                                           Cut{cv_p != nullptr, cv_p ? cv_p[i] : 0.f, ci_p ? ci_p[i] : 0});
        lp_p[i] = r.logprob;
        ent_p[i] = r.entropy;
        stats_p[2 * i] = r.max;
        stats_p[2 * i + 1] = r.log_sum;
      }
    }
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
#pragma omp parallel for schedule(static) if (N > 1)
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t* xr = x_p + (i / Tn) * sb + (i % Tn) * st;
      scalar_t* dr = dx_p + i * V;
      const int64_t label = y_p[i];
      const float row_max = stats_p[2 * i], log_sum = stats_p[2 * i + 1];
      const float h = ent_p[i];
      if (cv_p != nullptr) {  // filtered: kept tokens only; a label outside the set is a constant -inf
        const Cut cut{true, cv_p[i], ci_p[i]};
        bool has_label = label != ignore_index && label >= 0 && label < V;
        has_label = has_label && kept(cut, to_float(xr[label]) / temp, label);
        const float g_lp = has_label ? glp_p[i] : 0.f;
        const float g_h = has_gh ? gh_p[i] : 0.f;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) {
          const float z = to_float(xr[j]) / temp;
          const bool k = z > cut.value || (z == cut.value && j <= cut.index);
          float logp = (z - row_max) - log_sum;
          float p = k ? fast_expf(logp) : 0.f;
          float ent_term = p > 0.f ? p * (logp + h) : 0.f;
          float dz = (has_label && j == label ? g_lp : 0.f) - g_lp * p - g_h * ent_term;
          dr[j] = from_float<scalar_t>(dz / temp);
        }
        continue;
      }
      const bool has_label = label != ignore_index && label >= 0 && label < V;
      const float g_lp = has_label ? glp_p[i] : 0.f;
      const float g_h = has_gh ? gh_p[i] : 0.f;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        float logp = (to_float(xr[j]) / temp - row_max) - log_sum;
        float p = fast_expf(logp);
        float ent_term = p > 0.f ? p * (logp + h) : 0.f;
        float dz = -g_lp * p - g_h * ent_term;
        dr[j] = from_float<scalar_t>(dz / temp);
      }
      if (has_label) {
        float logp = (to_float(xr[label]) / temp - row_max) - log_sum;
        float p = fast_expf(logp);
        float ent_term = p > 0.f ? p * (logp + h) : 0.f;
        float dz = g_lp * (1.f - p) - g_h * ent_term;
        dr[label] = from_float<scalar_t>(dz / temp);
      }
    }
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
