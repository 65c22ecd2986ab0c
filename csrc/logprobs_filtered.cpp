// CPU kernel for rlhf_fast::gather_logprobs_filtered: token log-probs (+ entropy) under the
// sampler's top-k / top-p filter, with the kept set found and summed in the same passes.
//
// gather_logprobs_filtered(logits (B, T, V), labels (B, T), temperature, return_entropy,
//     ignore_index, top_k, top_p) -> (logprobs, entropy, row_stats, cut_value, cut_index)
// gives what kept_cut followed by gather_logprobs(..., cut_value, cut_index) gives (the same cut,
// found by the sampler's own row_cut in csrc/kept_cut.h, so the sampler and the trainer keep the
// same set bit for bit), and the backward is gather_logprobs_backward with that cut (csrc/logprobs.cpp).
// Separately the two ops read every row four to six times (issue 35: top-p 0.9 cost 3.2-5.9x the
// unfiltered op at V = 151,936): the cut's passes, then the max and the sums again. Here, per row:
//   - the scan of the cut (the row as float z = x / T, its max, the largest logits collected);
//   - where the kept set is among the collected logits (top-k, and top-p on peaked rows), its sums
//     are taken over those tokens only: no further pass;
//   - top-p on flat rows: the bracket pass of csrc/kept_cut.h sums the bins above the bracket and
//     keeps the bracket's tokens, whose kept part is added;
//   - top-p on flat rows by the histogram of every token: the walk's kept mass, and for the entropy
//     one pass over the row;
//   - otherwise (the fallbacks) one pass sums the kept tokens.
// The sums are s = sum exp(z - m), t = sum exp(z - m) (z - m) over the kept tokens, float64 (the
// candidates' and the bracket's tokens one by one, a row pass in 64 compensated float lanes merged in
// double), then, as in csrc/logprobs.cpp: log-prob (z_y - m) - log s (-inf for a label outside the
// kept set, 0 for ignore_index), entropy log s - t / s, row stats (m, log s) for the backward.
// Rows are independent (at::parallel_for over rows, each reduced by one thread in a fixed order).
#include "kept_cut.h"

#include <ATen/Parallel.h>

namespace rlhf_fast {
namespace {

// s, t over the tokens the cut keeps (Cut{false, ...}: cut value -inf, index V - 1, the mask
// gather_logprobs applies for kept_cut's "no cut": a NaN is not kept), one pass over the row.
template <bool kT>
void row_sums(const float* z, int64_t V, float m, const Cut& cut, double* s_out, double* t_out) {
  constexpr int64_t nv = kScanBlock / kW;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const Cut c = cut.on ? cut : Cut{true, kNegInf, V - 1};
  const fVec mv(m), zero(0.f), cv(c.value), lane = fVec::arange(0.f, 1.f);
  fVec s[nv], sc[nv], t[nv], tc[nv];
  for (int64_t v = 0; v < nv; ++v) s[v] = sc[v] = t[v] = tc[v] = zero;
  int64_t j = 0;
  for (; j + kScanBlock <= V; j += kScanBlock) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t j0 = j + v * kW;
      const fVec zv = fVec::loadu(z + j0), d = zv - mv;
      const float r = static_cast<float>(std::clamp<int64_t>(c.index - j0, -1, kW));
      const fVec keep = (zv > cv) | ((zv == cv) & (lane <= fVec(r)));
      const fVec e = vexp_nonpos(d) & keep;
      const fVec y = e - sc[v], ts = s[v] + y;
      sc[v] = (ts - s[v]) - y;
      s[v] = ts;
      if constexpr (kT) {
        const fVec ed = (e * d) & (e > zero), yt = ed - tc[v], tt = t[v] + yt;
        tc[v] = (tt - t[v]) - yt;
        t[v] = tt;
      }
    }
  }
  float sl[kScanBlock], scl[kScanBlock], tl[kScanBlock], tcl[kScanBlock];
  for (int64_t v = 0; v < nv; ++v) {
    s[v].store(sl + v * kW);
    sc[v].store(scl + v * kW);
    t[v].store(tl + v * kW);
    tc[v].store(tcl + v * kW);
  }
  double S = 0.0, T = 0.0;
  for (int64_t l = 0; l < kScanBlock; ++l) {
    S += static_cast<double>(sl[l]) - static_cast<double>(scl[l]);
    if (kT) T += static_cast<double>(tl[l]) - static_cast<double>(tcl[l]);
  }
  for (; j < V; ++j) {
    if (!kept(c, z[j], j)) continue;
    const float d = z[j] - m, e = fast_expf(d);
    S += static_cast<double>(e);
    if (kT && e > 0.f) T += static_cast<double>(e * d);
  }
  *s_out = S;
  *t_out = T;
}

// s, t over the kept tokens where row_cut found them (see the header).
void kept_sums(const float* z, int64_t V, float m, const CutInfo& ci, bool want_t, const Scratch& sc,
               double* s_out, double* t_out) {
  double s = 0.0, t = 0.0;
  auto add = [&](float zj, float e) {
    s += static_cast<double>(e);
    if (want_t && e > 0.f) t += static_cast<double>(e * (zj - m));
  };
  if (ci.how == Found::kCandidates) {
    for (const auto& [zj, j] : sc.cand)
      if (kept(ci.cut, zj, j)) add(zj, fast_expf(zj - m));
  } else if (ci.how == Found::kBracket) {
    s = sc.G;
    t = sc.T;
    for (const BracketTok& b : sc.br)
      if (kept(ci.cut, b.z, b.j)) add(b.z, b.e);
  } else if (want_t) {
    row_sums<true>(z, V, m, ci.cut, &s, &t);
  } else if (ci.how == Found::kHistogram) {
    s = sc.kept;  // the walk's mass of the kept set (float64 bin sums, then the crossing bin's tokens)
  } else {
    row_sums<false>(z, V, m, ci.cut, &s, &t);
  }
  *s_out = s;
  *t_out = t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_logprobs_filtered_cpu(
    const at::Tensor& logits, const at::Tensor& labels, double temperature, bool return_entropy,
    int64_t ignore_index, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 3, "gather_logprobs_filtered: logits must be (B, T, V), got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "gather_logprobs_filtered: labels must be (B, T)");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "gather_logprobs_filtered: labels must be int64");
  TORCH_CHECK(logits.size(2) > 0, "gather_logprobs_filtered: logits must have V >= 1");
  at::Tensor x = logits.stride(2) == 1 ? logits : logits.contiguous();
  at::Tensor y = labels.contiguous();
  const int64_t B = x.size(0), Tn = x.size(1), N = B * Tn, V = x.size(2);
  const int64_t sb = x.stride(0), st = x.stride(1);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({B, Tn}, opts), ent = at::empty({B, Tn}, opts);
  at::Tensor stats = at::empty({B, Tn, 2}, opts);
  at::Tensor cut_value = at::empty({B, Tn}, opts), cut_index = at::empty({B, Tn}, opts.dtype(at::kLong));
  float* lp_p = lp.data_ptr<float>();
  float* ent_p = ent.data_ptr<float>();
  float* stats_p = stats.data_ptr<float>();
  float* cv_p = cut_value.data_ptr<float>();
  int64_t* ci_p = cut_index.data_ptr<int64_t>();
  const int64_t* y_p = y.data_ptr<int64_t>();
  const float temp = static_cast<float>(temperature);
  const float kNegInf = -std::numeric_limits<float>::infinity();
  dispatch_floating(x.scalar_type(), "gather_logprobs_filtered", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(static_cast<size_t>(V));
      Scratch s(V);
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* xr = x_p + (i / Tn) * sb + (i % Tn) * st;
        auto [z, m, finite, thr] =
            load_row<scalar_t>(xr, V, temp, nullptr, 0, buf.data(), collect_count(V, top_k, top_p), s);
        const CutInfo ci = row_cut(z, V, m, finite, top_k, top_p, thr, s, return_entropy);
        double sum = 0.0, t = 0.0;
        kept_sums(z, V, m, ci, return_entropy, s, &sum, &t);
        const Cut cut = ci.cut.on ? ci.cut : Cut{true, kNegInf, V - 1};
        const double log_s_d = std::log(sum);
        const float log_s = static_cast<float>(log_s_d);
        const int64_t label = y_p[i];
        float logprob;
        if (label == ignore_index) {
          logprob = 0.f;
        } else if (label < 0 || label >= V) {
          logprob = std::numeric_limits<float>::quiet_NaN();  // the Python layer rejects these first
        } else if (!kept(cut, z[label], label)) {
          logprob = kNegInf;  // not in the kept set: the sampler could not have drawn it
        } else {
          logprob = (z[label] - m) - log_s;
        }
        lp_p[i] = logprob;
        ent_p[i] = return_entropy ? static_cast<float>(log_s_d - t / sum) : 0.f;
        stats_p[2 * i] = m;
        stats_p[2 * i + 1] = log_s;
        cv_p[i] = cut.value;
        ci_p[i] = cut.index;
      }
    });
  });
  return {lp, ent, stats, cut_value, cut_index};
}

}  // namespace

// Mirrored in rlhf_fast/ops/logprobs.py (SCHEMAS) for the no-compiler fallback.
TORCH_LIBRARY_FRAGMENT(rlhf_fast, m) {
  m.def(
      "gather_logprobs_filtered(Tensor logits, Tensor labels, float temperature, bool return_entropy, "
      "int ignore_index, int top_k, float top_p) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) { m.impl("gather_logprobs_filtered", &gather_logprobs_filtered_cpu); }

}  // namespace rlhf_fast
