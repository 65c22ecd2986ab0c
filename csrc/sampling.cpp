// CPU kernels for the sampler's kept set and token choice, without a sort over the vocabulary
// (issue 35: at V = 151,936 a full-vocabulary sort per row made the top-p sampler 1.3 s per decode
// step at B = 64 and the top-p log-prob op 260x its unfiltered cost).
//
// rlhf_fast::kept_cut(logits (N, V), temperature, top_k, top_p) -> (cut_value (N,) float32,
//     cut_index (N,) int64): the cut of rlhf_fast/_filter.py ("The kept set" there states the rule).
// rlhf_fast::sample_tokens(logits (B, V), u (B,) float64, temperature, top_k, top_p, do_sample,
//     blocked_ids, block_active) -> (tokens (B,) int64, logprobs (B,) float32): one decode step.
//
// Per row, z = x / T in a float row buffer (the float32 values torch's `logits.float() / T` gives),
// blocked stop ids set to -inf, m = max z:
//   - top-k: a histogram of counts over NB bins of (m - z) finds the bin holding the k-th largest
//     logit; only the tokens down to that bin are copied and nth_element'd (no sort of V);
//   - top-p: e_j = exp(z_j - m) (float32, csrc/vec_math.h's vexp_nonpos), a histogram of their
//     float64 mass over the same bins finds the bin where the mass from the top reaches p * S; only
//     that bin's tokens (and, if rounding says so, the next bins') are sorted, by (z desc, id asc);
//   - the draw: float64 sums of the kept e_j over blocks of kBlock ids, the block where u * S falls,
//     then a float64 walk inside it (inverse CDF in token-id order, as rlhf_fast/reference/sampling.py).
// The bins are monotone in z (fl(m - z) and the scaling are monotone), so a bin holds a contiguous
// range of the (z desc, id asc) order and the walk over whole bins is a walk over that order.
// Rows are independent (at::parallel_for over rows, one thread reduces a row in a fixed order), so
// no result depends on the thread count or on the other rows.
#include "common.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

namespace rlhf_fast {
namespace {

constexpr int64_t kW = fVec::size();
constexpr int64_t kBins = 4096;          // histogram bins over [m - kSpan, m]
constexpr float kSpan = 32.f;            // e^-32 ~ 1.3e-14 per token; below: the last bin
constexpr float kInvWidth = kBins / kSpan;
constexpr int64_t kBlock = 256;          // ids per block of the two-level inverse CDF

inline int64_t bin_of(float m, float z) {
  // monotone non-increasing in z; -inf (and anything below m - kSpan) lands in the last bin
  const float b = (m - z) * kInvWidth;
  return b < static_cast<float>(kBins - 1) ? static_cast<int64_t>(b) : kBins - 1;
}

struct Cut {
  bool on;
  float value;
  int64_t index;
};

inline bool kept(const Cut& c, float z, int64_t j) {
  return !c.on || z > c.value || (z == c.value && j <= c.index);
}

// G(c) + t * e_c with two roundings on every build (the torch rule in rlhf_fast/_filter.py computes
// the same two operations): no contraction into one fused multiply-add.
__attribute__((noinline)) double tie_mass(double above, int64_t t, double e_c) {
  volatile double prod = static_cast<double>(t) * e_c;
  return above + prod;
}

struct Scratch {
  std::vector<int64_t> count;
  std::vector<double> mass;
  std::vector<std::pair<float, int64_t>> cand;  // (z, id)
  std::vector<float> e;                           // exp(z - m) of the row, 0 outside the top-k set
  std::vector<int64_t> ties;                      // ids of the tokens at the cut value, ascending
  std::vector<int32_t> bin;                       // bin_of of every token (top_p_histogram)
  explicit Scratch(int64_t V) : count(kBins), mass(kBins), e(static_cast<size_t>(V)), bin(static_cast<size_t>(V)) {}
};

inline bool by_order(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
  return a.first > b.first || (a.first == b.first && a.second < b.second);
}

inline bool by_value(const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
  return a.first > b.first;
}

constexpr int64_t kTopP0 = 128;        // top-p first walks the 128 largest logits (peaked rows stop there)
constexpr int64_t kMaxCollect = 4096;  // top-k above this: the histogram finds the k-th value
// The scans work in whole 64-token blocks (the collection shrinks only between blocks, the mass
// keeps 64 logical lanes), so no result depends on the vector width (AVX2 = AVX-512).
constexpr int64_t kScanBlock = 64;

// float64 sum of exp(z - m) over z >= kth: 64 compensated float lanes (element j of a 64-block in
// lane j % 64, on every vector width), merged in double in lane order, then the tail.
double kept_mass(const float* z, int64_t V, float m, float kth) {
  constexpr int64_t nv = kScanBlock / kW;
  const fVec mv(m), kv(kth), zero(0.f);
  fVec acc[nv], comp[nv];
  for (int64_t v = 0; v < nv; ++v) acc[v] = comp[v] = zero;
  int64_t j = 0;
  for (; j + kScanBlock <= V; j += kScanBlock) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < nv; ++v) {
      const fVec zj = fVec::loadu(z + j + v * kW);
      const fVec e = vexp_nonpos(zj - mv) & (zj >= kv);
      const fVec y = e - comp[v], t = acc[v] + y;
      comp[v] = (t - acc[v]) - y;
      acc[v] = t;
    }
  }
  float a[kScanBlock], c[kScanBlock];
  for (int64_t v = 0; v < nv; ++v) {
    acc[v].store(a + v * kW);
    comp[v].store(c + v * kW);
  }
  double S = 0.0;
  for (int64_t l = 0; l < kScanBlock; ++l) S += static_cast<double>(a[l]) - static_cast<double>(c[l]);
  for (; j < V; ++j) S += z[j] >= kth ? static_cast<double>(fast_expf(z[j] - m)) : 0.0;
  return S;
}

// The top-p walk over the first n tokens of `sorted` ((z desc, id asc), every token of each value
// present): from mass `above` (strictly above the first), keep values while the mass above them is
// < pS. Returns true when the walk stopped (the cut is the last kept value, its ids in s.ties),
// false when the tokens ran out first (`above` carries on).
bool walk(const std::vector<std::pair<float, int64_t>>& sorted, size_t n, float m, double pS, double& above,
          bool& have, float& c, double& G_c, Scratch& s) {
  size_t g = 0;
  while (g < n) {
    const float w = sorted[g].first;
    if (above >= pS) return true;
    have = true;
    c = w;
    G_c = above;
    s.ties.clear();
    const double e = static_cast<double>(fast_expf(w - m));
    for (; g < n && sorted[g].first == w; ++g) {
      above += e;
      s.ties.push_back(sorted[g].second);
    }
  }
  return above >= pS;
}

// The cut from the tokens at value c (ids ascending in s.ties): the t-th is kept iff t == 0 or
// G(c) + t * e_c < pS.
Cut tie_cut(float c, float m, double G_c, double pS, const Scratch& s) {
  const double e_c = static_cast<double>(fast_expf(c - m));
  int64_t index = s.ties[0];
  for (size_t t = 1; t < s.ties.size(); ++t) {
    if (!(tie_mass(G_c, static_cast<int64_t>(t), e_c) < pS)) break;
    index = s.ties[t];
  }
  return Cut{true, c, index};
}

// The k-th largest z (k in [1, V)) by a histogram of counts, NaN-free row with finite max m.
float kth_largest(const float* z, int64_t V, float m, int64_t k, Scratch& s) {
  std::fill(s.count.begin(), s.count.end(), 0);
  for (int64_t j = 0; j < V; ++j) s.count[bin_of(m, z[j])] += 1;
  int64_t bk = 0, above = 0;
  for (; bk < kBins; ++bk) {
    if (above + s.count[bk] >= k) break;
    above += s.count[bk];
  }
  s.cand.clear();
  for (int64_t j = 0; j < V; ++j)
    if (bin_of(m, z[j]) == bk) s.cand.emplace_back(z[j], j);
  const int64_t r = k - 1 - above;  // rank of the k-th largest inside the bin
  std::nth_element(s.cand.begin(), s.cand.begin() + r, s.cand.end(), by_value);
  return s.cand[r].first;
}

// The top-p cut when the largest logits did not reach p * S: a histogram of the float64 mass over
// the bins of (m - z) finds the bin where it does; only that bin's tokens are sorted. The exps and
// bin numbers are computed vectorised into row buffers; the histogram itself is one scalar loop.
Cut top_p_histogram(const float* z, int64_t V, float m, float kth, double pS, Scratch& s) {
  const fVec mv(m), kv(kth), inv(kInvWidth), last(static_cast<float>(kBins - 1));
  int64_t j = 0;
  for (; j + kW <= V; j += kW) {
    const fVec zj = fVec::loadu(z + j);
    (vexp_nonpos(zj - mv) & (zj >= kv)).store(s.e.data() + j);
    // bin_of, lane for lane: (m - z) * inv, capped at the last bin (a -inf z gives inf: capped)
    const fVec b = fVec::blendv(last, (mv - zj) * inv, (mv - zj) * inv < last);
    at::vec::convert_to_int_of_same_size(b).store(s.bin.data() + j);
  }
  for (; j < V; ++j) {
    s.e[j] = z[j] >= kth ? fast_expf(z[j] - m) : 0.f;
    s.bin[j] = static_cast<int32_t>(bin_of(m, z[j]));
  }
  std::fill(s.mass.begin(), s.mass.end(), 0.0);
  for (j = 0; j < V; ++j) s.mass[s.bin[j]] += static_cast<double>(s.e[j]);
  double above = 0.0;
  int64_t b = 0;
  for (; b < kBins; ++b) {
    if (above + s.mass[b] >= pS) break;
    above += s.mass[b];
  }
  bool have = false;
  float c = 0.f;
  double G_c = 0.0;
  const int full = static_cast<int>((1LL << kW) - 1);
  // Rounding (bin sums against the walk's) may leave the walk short of pS at the end of bin b:
  // then the next bins follow.
  for (; b < kBins; ++b) {
    if (s.mass[b] == 0.0 && b != kBins - 1) continue;
    s.cand.clear();
    const iVec bv(static_cast<int32_t>(b));
    int64_t i = 0;
    for (; i + kW <= V; i += kW) {
      const int bits = ~at::vec::cast<float>(iVec::loadu(s.bin.data() + i) == bv).zero_mask() & full;
      if (bits == 0) continue;
      for (int l = 0; l < kW; ++l)
        if ((bits & (1 << l)) && z[i + l] >= kth) s.cand.emplace_back(z[i + l], i + l);
    }
    for (; i < V; ++i)
      if (s.bin[i] == b && z[i] >= kth) s.cand.emplace_back(z[i], i);
    std::sort(s.cand.begin(), s.cand.end(), by_order);
    if (walk(s.cand, s.cand.size(), m, pS, above, have, c, G_c, s)) break;
  }
  if (!have) return Cut{kth > -std::numeric_limits<float>::infinity(), kth, V - 1};
  return tie_cut(c, m, G_c, pS, s);
}


// How many of the largest logits row_cut collects in the scan (0: none).
inline int64_t collect_count(int64_t V, int64_t top_k, double top_p) {
  const bool k_on = top_k > 0 && top_k < V, p_on = top_p < 1.0;
  if (!(k_on || p_on)) return 0;
  const int64_t k0 = std::min<int64_t>(V, std::max<int64_t>(k_on ? top_k : 0, p_on ? kTopP0 : 0));
  return k0 <= kMaxCollect ? k0 : 0;
}

// One vectorised pass over the row: its max (NaN skipped), whether it holds a NaN, and with
// k0 > 0 a running threshold collection that leaves in s.cand every token with z > *thr and at
// least k0 tokens with z >= *thr, or (fewer than k0 logits above -inf) every token above -inf with
// *thr = -inf; the threshold is raised by nth_element when a block ends with 2 * k0 held.
void scan_row(const float* z, int64_t V, int64_t k0, Scratch& s, float* m_out, bool* nan_out, float* thr_out) {
  constexpr int64_t nv = kScanBlock / kW;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int full = static_cast<int>((1LL << kW) - 1);
  float thr = kNegInf;
  s.cand.clear();
  auto shrink = [&]() {
    std::nth_element(s.cand.begin(), s.cand.begin() + (k0 - 1), s.cand.end(), by_value);
    thr = s.cand[k0 - 1].first;
    s.cand.resize(k0);
  };
  fVec mv(kNegInf), nanv(0.f);
  int64_t j = 0;
  for (; j + kScanBlock <= V; j += kScanBlock) {
    const fVec tv(thr);
#pragma GCC unroll 8
    for (int64_t v = 0; v < nv; ++v) {
      const fVec zv = fVec::loadu(z + j + v * kW);
      mv = at::vec::clamp_min(mv, zv);  // `z > m ? z : m`: a NaN is skipped here, caught below
      nanv = nanv | (zv != zv);
      if (k0 > 0) {
        const int bits = ~(zv > tv).zero_mask() & full;
        if (bits != 0)
          for (int l = 0; l < kW; ++l)
            if (bits & (1 << l)) s.cand.emplace_back(z[j + v * kW + l], j + v * kW + l);
      }
    }
    if (k0 > 0 && static_cast<int64_t>(s.cand.size()) >= 2 * k0) shrink();
  }
  float lanes[kW], nl[kW];
  mv.store(lanes);
  nanv.store(nl);
  float m = kNegInf;
  bool has_nan = false;
  for (int64_t l = 0; l < kW; ++l) {
    m = lanes[l] > m ? lanes[l] : m;
    has_nan |= nl[l] != 0.f;  // an all-ones lane is a NaN, != 0
  }
  for (; j < V; ++j) {
    has_nan |= z[j] != z[j];
    m = z[j] > m ? z[j] : m;
    if (k0 > 0 && z[j] > thr) s.cand.emplace_back(z[j], j);
  }
  if (k0 > 0 && static_cast<int64_t>(s.cand.size()) > k0) shrink();
  *m_out = m;
  *nan_out = has_nan;
  *thr_out = thr;
}

// The row as float32 z = x / T (the values torch's `logits.float() / T` gives), blocked ids -inf,
// then scan_row: float32 logits at T = 1 with nothing blocked are read in place, otherwise written
// to buf first. Returns (z, max z, whether the row is NaN-free with a finite max: otherwise the
// filter keeps everything, the collection's threshold).
template <typename scalar_t>
std::tuple<const float*, float, bool, float> load_row(const scalar_t* x, int64_t V, float temp,
                                                      const int64_t* blocked, int64_t n_blocked, float* buf,
                                                      int64_t k0, Scratch& s) {
  const float* z = buf;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (temp == 1.f && n_blocked == 0) {
      z = x;
    } else {
      const fVec tv(temp);
      int64_t j = 0;
      for (; j + kW <= V; j += kW) (fVec::loadu(x + j) / tv).store(buf + j);
      for (; j < V; ++j) buf[j] = x[j] / temp;
    }
  } else {
    for (int64_t j = 0; j < V; ++j) buf[j] = to_float(x[j]) / temp;
  }
  for (int64_t i = 0; i < n_blocked; ++i) buf[blocked[i]] = -std::numeric_limits<float>::infinity();
  float m = 0.f, thr = 0.f;
  bool has_nan = false;
  scan_row(z, V, k0, s, &m, &has_nan, &thr);
  return {z, m, !has_nan && std::isfinite(m), thr};
}

Cut row_cut(const float* z, int64_t V, float m, bool finite, int64_t top_k, double top_p, float thr, Scratch& s) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const bool k_on = top_k > 0 && top_k < V, p_on = top_p < 1.0;
  if (!finite || !(k_on || p_on)) return Cut{false, kNegInf, V - 1};
  const bool collected = collect_count(V, top_k, top_p) > 0;  // s.cand: every z > thr, >= k0 tokens >= thr
  float kth = kNegInf;
  if (k_on) {
    if (collected && static_cast<int64_t>(s.cand.size()) < top_k) {
      kth = kNegInf;  // fewer than k tokens above -inf (the only ones scan_row skips): all kept
    } else if (collected) {
      std::nth_element(s.cand.begin(), s.cand.begin() + (top_k - 1), s.cand.end(), by_value);
      kth = s.cand[top_k - 1].first;
    } else {
      kth = kth_largest(z, V, m, top_k, s);
    }
  }
  if (!p_on) return Cut{true, kth, V - 1};
  const double pS = top_p * kept_mass(z, V, m, kth);
  if (collected) {
    // Peaked rows: the walk over the tokens above thr (every token of each such value is held)
    // reaches pS there.
    auto mid = std::partition(s.cand.begin(), s.cand.end(),
                              [&](const auto& a) { return a.first > thr && a.first >= kth; });
    const size_t n = static_cast<size_t>(mid - s.cand.begin());
    std::sort(s.cand.begin(), mid, by_order);
    double above = 0.0, G_c = 0.0;
    bool have = false;
    float c = 0.f;
    if (walk(s.cand, n, m, pS, above, have, c, G_c, s) && have) return tie_cut(c, m, G_c, pS, s);
  }
  return top_p_histogram(z, V, m, kth, pS, s);
}

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
        const Cut c = row_cut(z, V, m, finite, top_k, top_p, thr, s);
        v_p[i] = c.on ? c.value : -std::numeric_limits<float>::infinity();
        i_p[i] = c.on ? c.index : V - 1;
      }
    });
  });
  return {value, index};
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
        const Cut cut = row_cut(z, V, m, finite, top_k, top_p, thr, s);
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
  m.def(
      "sample_tokens(Tensor logits, Tensor u, float temperature, int top_k, float top_p, bool do_sample, "
      "Tensor? blocked_ids=None, Tensor? block_active=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("kept_cut", &kept_cut_cpu);
  m.impl("sample_tokens", &sample_tokens_cpu);
}

}  // namespace rlhf_fast
