// CPU kernels for the sampler's kept set and token choice, without a sort over the vocabulary
// (issue 35: at V = 151,936 a full-vocabulary sort per row made the top-p sampler 1.3 s per decode
// step at B = 64 and the top-p log-prob op 260x its unfiltered cost).
//
// rlhf_fast::kept_cut(logits (N, V), temperature, top_k, top_p) -> (cut_value (N,) float32,
//     cut_index (N,) int64): the cut of rlhf_fast/_filter.py ("The kept set" there states the rule).
// rlhf_fast::sample_tokens(logits (B, V), u (B,) float64, temperature, top_k, top_p, do_sample,
//     blocked_ids, block_active) -> (tokens (B,) int64, logprobs (B,) float32): one decode step.
//
// Per row (the cut itself lives in csrc/kept_cut.h, shared with the fused log-prob op of
// csrc/logprobs_filtered.cpp), z = x / T (the float32 values torch's `logits.float() / T` gives),
// blocked stop ids set to -inf, m = max z:
//   - one pass forms z, m and a running threshold collection of the largest logits (k + 1 for
//     top-k, 128 for top-p): the k-th value by nth_element on those; a peaked row's top-p walk
//     (e_j = exp(z_j - m), csrc/vec_math.h's vexp_nonpos, float64 mass from the top against p * S)
//     ends among them;
//   - other top-p rows: bins of (m - z); a sample of 1 token in 16 brackets the bin where the mass
//     from the top reaches p * S, one pass sums the bins above and keeps the bracket's tokens; rows
//     where the bracket fails (flat rows: too wide) take a float64 histogram of every token's mass;
//     only the crossing bin's tokens (and, if rounding says so, the next bins') are sorted, by
//     (z desc, id asc); a top-k above 4,095 finds its k-th value by a histogram of counts;
//   - the draw: float64 sums of the kept e_j over blocks of kBlock ids, the block where u * S falls,
//     then a float64 walk inside it (inverse CDF in token-id order, as rlhf_fast/reference/sampling.py).
// The bins are monotone in z (fl(m - z) and the scaling are monotone), so a bin holds a contiguous
// range of the (z desc, id asc) order and the walk over whole bins is a walk over that order.
// Rows are independent (at::parallel_for over rows, one thread reduces a row in a fixed order), so
// no result depends on the thread count or on the other rows.
#include "kept_cut.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

namespace rlhf_fast {
namespace {

at::Tensor as_rows(const char* name, const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, name, ": logits must be (N, V), got ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0, name, ": logits must have V >= 1");
  return logits.is_contiguous() ? logits : logits.contiguous();
}

std::tuple<at::Tensor, at::Tensor> kept_cut_cpu(const at::Tensor& logits, double temperature, int64_t top_k,
                                                double top_p) {
  at::Tensor x = as_rows("kept_cut", logits);
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor value = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor index = at::empty({N}, x.options().dtype(at::kLong));
  float* v_p = value.data_ptr<float>();
  int64_t* i_p = index.data_ptr<int64_t>();
  const float temp = static_cast<float>(temperature);
  dispatch_floating(x.scalar_type(), "kept_cut", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(static_cast<size_t>(V));
      Scratch s(V);
      for (int64_t i = begin; i < end; ++i) {
        auto [z, m, finite, thr] =
            load_row<scalar_t>(x_p + i * V, V, temp, nullptr, 0, buf.data(), collect_count(V, top_k, top_p), s);
        const Cut c = row_cut(z, V, m, finite, top_k, top_p, thr, s).cut;
        v_p[i] = c.on ? c.value : -std::numeric_limits<float>::infinity();
        i_p[i] = c.on ? c.index : V - 1;
      }
    });
  });
  return {value, index};
}

// Which way row_cut found each row's cut (Found in csrc/kept_cut.h: 0 no cut, 1 among the collected
// candidates, 2 a sampled bracket, 3 a pass over the whole row, 4 top-p's histogram of every token): a diagnostic for the tests and the
// benchmarks, which must show every way taken.
at::Tensor kept_cut_path_cpu(const at::Tensor& logits, double temperature, int64_t top_k, double top_p) {
  at::Tensor x = as_rows("kept_cut_path", logits);
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor path = at::empty({N}, x.options().dtype(at::kLong));
  int64_t* p_p = path.data_ptr<int64_t>();
  const float temp = static_cast<float>(temperature);
  dispatch_floating(x.scalar_type(), "kept_cut_path", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    std::vector<float> buf(static_cast<size_t>(V));
    Scratch s(V);
    for (int64_t i = 0; i < N; ++i) {
      auto [z, m, finite, thr] =
          load_row<scalar_t>(x_p + i * V, V, temp, nullptr, 0, buf.data(), collect_count(V, top_k, top_p), s);
      p_p[i] = static_cast<int64_t>(row_cut(z, V, m, finite, top_k, top_p, thr, s).how);
    }
  });
  return path;
}

// One row's token and log-prob. z: the scaled row; greedy picks the argmax of the unscaled row x
// (first index; a NaN counts as the largest, as torch.argmax).
template <typename scalar_t>
std::pair<int64_t, float> draw_row(const scalar_t* x, const float* z, int64_t V, float m, const Cut& cut,
                                   bool do_sample, double u, const int64_t* blocked, int64_t n_blocked,
                                   Scratch& s, std::vector<double>& blocks) {
  // kept e_j into s.e and float64 block sums
  const fVec mv(m);
  const int64_t nb = (V + kBlock - 1) / kBlock;
  double total = 0.0;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t j0 = bi * kBlock, j1 = std::min(V, j0 + kBlock);
    int64_t j = j0;
    for (; j + kW <= j1; j += kW) {
      fVec e = vexp_nonpos(fVec::loadu(z + j) - mv);
      if (cut.on) {
        const float r = static_cast<float>(std::clamp<int64_t>(cut.index - j, -1, kW));
        const fVec zj = fVec::loadu(z + j), cv(cut.value);
        e = e & ((zj > cv) | ((zj == cv) & (fVec::arange(0.f, 1.f) <= fVec(r))));
      }
      e.store(s.e.data() + j);
    }
    for (; j < j1; ++j) s.e[j] = kept(cut, z[j], j) ? fast_expf(z[j] - m) : 0.f;
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (j = j0; j + 8 <= j1; j += 8)
      for (int l = 0; l < 8; ++l) acc[l] += static_cast<double>(s.e[j + l]);
    double bs = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < j1; ++j) bs += static_cast<double>(s.e[j]);
    blocks[bi] = bs;
    total += bs;
  }
  int64_t tok = 0;
  if (do_sample) {
    const double target = u * total;
    double cum = 0.0;
    int64_t bi = 0, last_nonzero = -1;
    for (; bi < nb; ++bi) {
      if (blocks[bi] > 0.0) last_nonzero = bi;
      if (cum + blocks[bi] > target) break;
      cum += blocks[bi];
    }
    if (bi == nb) bi = std::max<int64_t>(last_nonzero, 0);
    const int64_t j0 = bi * kBlock, j1 = std::min(V, j0 + kBlock);
    tok = -1;
    int64_t last_kept = j0;
    for (int64_t j = j0; j < j1; ++j) {
      if (s.e[j] > 0.f) last_kept = j;
      cum += static_cast<double>(s.e[j]);
      if (cum > target && s.e[j] > 0.f) { tok = j; break; }
    }
    if (tok < 0) tok = last_kept;  // rounding left u * S past the block's sum
  } else {
    float best = 0.f;
    bool first = true;
    for (int64_t j = 0; j < V; ++j) {
      float v = to_float(x[j]);
      for (int64_t i = 0; i < n_blocked; ++i)
        if (blocked[i] == j) v = -std::numeric_limits<float>::infinity();
      if (v != v) { tok = j; break; }
      if (first || v > best) { best = v; tok = j; first = false; }
    }
  }
  // (z - m) - log S in float64, rounded once: the log-prob of the token under the kept set
  const double lp = (static_cast<double>(z[tok]) - static_cast<double>(m)) - std::log(total);
  return {tok, static_cast<float>(lp)};
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits, const at::Tensor& u,
                                                     double temperature, int64_t top_k, double top_p,
                                                     bool do_sample, const std::optional<at::Tensor>& blocked_ids,
                                                     const std::optional<at::Tensor>& block_active) {
  at::Tensor x = as_rows("sample_tokens", logits);
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(u.dim() == 1 && u.size(0) == B, "sample_tokens: u must be (B,) = (", B, ",), got ", u.sizes());
  at::Tensor uu = u.to(at::kDouble).contiguous();
  at::Tensor blk;
  bool active = blocked_ids.has_value() && blocked_ids->defined() && blocked_ids->numel() > 0;
  if (active && block_active.has_value() && block_active->defined())
    active = block_active->reshape({-1})[0].item<bool>();
  if (active) {
    blk = blocked_ids->to(at::kLong).contiguous();
    TORCH_CHECK(blk.min().item<int64_t>() >= 0 && blk.max().item<int64_t>() < V,
                "sample_tokens: blocked ids must be in [0, V = ", V, ")");
  }
  const int64_t* blk_p = active ? blk.data_ptr<int64_t>() : nullptr;
  const int64_t n_blk = active ? blk.numel() : 0;
  at::Tensor tokens = at::empty({B}, x.options().dtype(at::kLong));
  at::Tensor lps = at::empty({B}, x.options().dtype(at::kFloat));
  int64_t* t_p = tokens.data_ptr<int64_t>();
  float* l_p = lps.data_ptr<float>();
  const double* u_p = uu.data_ptr<double>();
  const float temp = static_cast<float>(temperature);
  dispatch_floating(x.scalar_type(), "sample_tokens", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* x_p = x.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(static_cast<size_t>(V));
      std::vector<double> blocks(static_cast<size_t>((V + kBlock - 1) / kBlock));
      Scratch s(V);
      for (int64_t i = begin; i < end; ++i) {
        auto [z, m, finite, thr] =
            load_row<scalar_t>(x_p + i * V, V, temp, blk_p, n_blk, buf.data(), collect_count(V, top_k, top_p), s);
        const Cut cut = row_cut(z, V, m, finite, top_k, top_p, thr, s).cut;
        auto [tok, lp] = draw_row<scalar_t>(x_p + i * V, z, V, m, cut, do_sample, u_p[i], blk_p, n_blk, s, blocks);
        t_p[i] = tok;
        l_p[i] = lp;
      }
    });
  });
  return {tokens, lps};
}

}  // namespace

// The schemas are mirrored in rlhf_fast/ops/sampling.py (SCHEMAS) for the no-compiler fallback.
TORCH_LIBRARY_FRAGMENT(rlhf_fast, m) {
  m.def("kept_cut(Tensor logits, float temperature, int top_k, float top_p) -> (Tensor, Tensor)");
  m.def("kept_cut_path(Tensor logits, float temperature, int top_k, float top_p) -> Tensor");
  m.def(
      "sample_tokens(Tensor logits, Tensor u, float temperature, int top_k, float top_p, bool do_sample, "
      "Tensor? blocked_ids=None, Tensor? block_active=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("kept_cut", &kept_cut_cpu);
  m.impl("kept_cut_path", &kept_cut_path_cpu);
  m.impl("sample_tokens", &sample_tokens_cpu);
}

}  // namespace rlhf_fast
