// The kept set of the sampling filter without a sort over the vocabulary: shared by the sampler
// (csrc/sampling.cpp) and the fused filtered log-prob op (csrc/logprobs_filtered.cpp), so the two
// find the same cut for the same row, bit for bit. The rule is rlhf_fast/_filter.py's ("The kept
// set"); how it is found is described in csrc/sampling.cpp's header and at row_cut below.
#pragma once

#include "common.h"
#include "vec_math.h"

#include <ATen/cpu/vec/functional.h>

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

// kW logits from p as float: a load (float32) or a load and an exact widening (bf16 / fp16).
template <typename scalar_t>
inline fVec load_f(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return fVec::loadu(p);
  } else {
    fVec o;
    at::vec::load_to_float<scalar_t>(p, o);
    return o;
  }
}

// A token of the bracket (top_p_bracket): its scaled logit, exp(z - m), bin and id.
struct BracketTok {
  float z, e;
  int32_t bin;
  int64_t j;
};

struct Scratch {
  std::vector<int64_t> count;
  std::vector<double> mass, mass2;
  std::vector<std::pair<float, int64_t>> cand;  // (z, id)
  std::vector<float> e;                           // exp(z - m) of the row, 0 outside the top-k set
  std::vector<int64_t> ties;                      // ids of the tokens at the cut value, ascending
  std::vector<int32_t> bin;                       // bin_of of every token (top_p_histogram)
  std::vector<float> samp;                        // the bracket's sample of the row
  std::vector<BracketTok> br;                     // the bracket's tokens (top_p_bracket)
  double G = 0.0, T = 0.0;                        // sum e, sum e (z - m) over the bins above the bracket
  double kept = 0.0;                              // the kept set's mass after a top-p walk (tie_cut)
  explicit Scratch(int64_t V)
      : count(kBins), mass(kBins), mass2(kBins), e(static_cast<size_t>(V)), bin(static_cast<size_t>(V)) {}
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
// G(c) + t * e_c < pS. s.kept = G(c) + (kept ties) * e_c: the kept set's mass as the walk counts it.
Cut tie_cut(float c, float m, double G_c, double pS, Scratch& s) {
  const double e_c = static_cast<double>(fast_expf(c - m));
  int64_t index = s.ties[0];
  size_t t = 1;
  for (; t < s.ties.size(); ++t) {
    if (!(tie_mass(G_c, static_cast<int64_t>(t), e_c) < pS)) break;
    index = s.ties[t];
  }
  s.kept = tie_mass(G_c, static_cast<int64_t>(t), e_c);
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
  // Two histograms, even and odd ids, merged after: an add into a bin does not wait for the
  // previous token's store when both fall in the same bin (the loop is this way's largest cost).
  std::fill(s.mass.begin(), s.mass.end(), 0.0);
  std::fill(s.mass2.begin(), s.mass2.end(), 0.0);
  for (j = 0; j + 1 < V; j += 2) {
    s.mass[s.bin[j]] += static_cast<double>(s.e[j]);
    s.mass2[s.bin[j + 1]] += static_cast<double>(s.e[j + 1]);
  }
  if (j < V) s.mass[s.bin[j]] += static_cast<double>(s.e[j]);
  for (int64_t b = 0; b < kBins; ++b) s.mass[b] += s.mass2[b];
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
  // top_k + 1: the scan's threshold then lies below the k-th value unless the (k+1)-th ties with it,
  // so every token of the top-k set is held (row_cut: Found::kCandidates) and the log-prob op sums it
  // without another pass; the k-th value, and so the cut, is the same whatever the collection's size.
  const int64_t k0 = std::min<int64_t>(V, std::max<int64_t>(k_on ? top_k + 1 : 0, p_on ? kTopP0 : 0));
  return k0 <= kMaxCollect ? k0 : 0;
}

// One vectorised pass over the row: its max (NaN skipped), whether it holds a NaN, and with
// k0 > 0 a running threshold collection that leaves in s.cand every token with z > *thr and at
// least k0 tokens with z >= *thr, or (fewer than k0 logits above -inf) every token above -inf with
// *thr = -inf; the threshold is raised by nth_element when a block ends with 2 * k0 held.
// kStore: the pass also forms the scaled row z = x / T (T = 1: x as float) into buf, the values
// torch's `logits.float() / T` gives (one IEEE division per element, vector or scalar alike);
// otherwise x is float32 at T = 1 and is z itself.
template <typename scalar_t, bool kStore>
void scan_row(const scalar_t* x, int64_t V, float temp, float* buf, int64_t k0, Scratch& s, float* m_out,
              bool* nan_out, float* thr_out) {
  constexpr int64_t nv = kScanBlock / kW;
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const int full = static_cast<int>((1LL << kW) - 1);
  const bool div = kStore && temp != 1.f;
  const float* z = nullptr;
  if constexpr (kStore) {
    z = buf;
  } else {
    static_assert(std::is_same_v<scalar_t, float>, "only float32 rows are read in place");
    z = x;
  }
  float thr = kNegInf;
  s.cand.clear();
  auto shrink = [&]() {
    std::nth_element(s.cand.begin(), s.cand.begin() + (k0 - 1), s.cand.end(), by_value);
    thr = s.cand[k0 - 1].first;
    s.cand.resize(k0);
  };
  const fVec tempv(temp);
  fVec mv(kNegInf), nanv(0.f);
  int64_t j = 0;
  for (; j + kScanBlock <= V; j += kScanBlock) {
    const fVec tv(thr);
#pragma GCC unroll 8
    for (int64_t v = 0; v < nv; ++v) {
      fVec zv;
      if constexpr (kStore) {
        zv = load_f(x + j + v * kW);
        if (div) zv = zv / tempv;
        zv.store(buf + j + v * kW);
      } else {
        zv = fVec::loadu(x + j + v * kW);
      }
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
    if constexpr (kStore) buf[j] = div ? to_float(x[j]) / temp : to_float(x[j]);
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
// and scan_row's max, NaN test and collection, in one pass where nothing is blocked: float32 logits
// at T = 1 are read in place, float32 / bf16 / fp16 otherwise formed into buf by the scan itself.
// Blocked ids (or float64 logits) take a conversion pass first. Returns (z, max z, whether the row
// is NaN-free with a finite max: otherwise the filter keeps everything, the collection's threshold).
template <typename scalar_t>
std::tuple<const float*, float, bool, float> load_row(const scalar_t* x, int64_t V, float temp,
                                                      const int64_t* blocked, int64_t n_blocked, float* buf,
                                                      int64_t k0, Scratch& s) {
  float m = 0.f, thr = 0.f;
  bool has_nan = false;
  const float* z = buf;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (n_blocked == 0) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (temp == 1.f) {
          scan_row<float, false>(x, V, temp, nullptr, k0, s, &m, &has_nan, &thr);
          return {x, m, !has_nan && std::isfinite(m), thr};
        }
      }
      scan_row<scalar_t, true>(x, V, temp, buf, k0, s, &m, &has_nan, &thr);
      return {buf, m, !has_nan && std::isfinite(m), thr};
    }
  }
  for (int64_t j = 0; j < V; ++j) buf[j] = to_float(x[j]) / temp;
  for (int64_t i = 0; i < n_blocked; ++i) buf[blocked[i]] = -std::numeric_limits<float>::infinity();
  scan_row<float, true>(buf, V, 1.f, buf, k0, s, &m, &has_nan, &thr);
  return {z, m, !has_nan && std::isfinite(m), thr};
}

// ---- top-p on flat rows: a bracket from a sample, then one pass (issue 35) ----------------------
//
// top_p_histogram costs a scalar histogram of every token's mass, ~2.5x the whole unfiltered
// log-prob op at V = 151,936. Instead: one token in kStride of the row, in runs of kSampleRun ids (the sample; the collected
// candidates above the scan's threshold counted exactly) estimates the mass above each bin, with its
// standard error; the bins [lo, hi] where the crossing of p * S lies within kSigmas errors are the
// bracket. One vectorised pass then sums the mass of the bins above the bracket (G, and with the
// entropy T = sum e (z - m)) in 64 compensated float lanes merged in double (as kept_mass), and keeps
// the bracket's tokens (z, e, bin, id) with a float64 mass per bin; the walk of top_p_histogram
// runs from G over the bracket's bins. A walk that does not end inside the bracket (the sample was
// unlucky, or the row is not flat enough for it) falls back to top_p_histogram: the cut is the
// rule's either way, only the float64 rounding of the mass above differs (rlhf_fast/_filter.py).
constexpr int64_t kStride = 16;         // one token of 16 sampled
constexpr int64_t kSampleRun = 16;       // in runs of 16 consecutive ids (one 64-byte line of floats)
constexpr int64_t kMinBracketV = 16384;  // below: top_p_histogram (a sample of < 1,024 tokens)
constexpr double kSigmas = 4.0;

// The bracket's bins from the sample; false when it would hold more than a quarter of the row.
bool bracket_bins(const float* z, int64_t V, float m, float kth, float thr, size_t n_cand, double pS,
                  Scratch& s, int64_t* lo, int64_t* hi) {
  // the sample: the first kSampleRun tokens of every kStride * kSampleRun (whole cache lines, not
  // one float per line: a strided gather of single floats cost more than the rest of the bracket)
  int64_t ns = 0;
  s.samp.resize(static_cast<size_t>((V / (kStride * kSampleRun) + 1) * kSampleRun));
  for (int64_t j0 = 0; j0 < V; j0 += kStride * kSampleRun)
    for (int64_t j = j0; j < std::min(V, j0 + kSampleRun); ++j, ++ns) s.samp[ns] = z[j];
  const fVec mv(m), inv(kInvWidth), last(static_cast<float>(kBins - 1));
  int64_t i = 0;
  for (; i + kW <= ns; i += kW) {
    const fVec zi = fVec::loadu(s.samp.data() + i);
    vexp_nonpos(zi - mv).store(s.e.data() + i);
    const fVec b = fVec::blendv(last, (mv - zi) * inv, (mv - zi) * inv < last);
    at::vec::convert_to_int_of_same_size(b).store(s.bin.data() + i);
  }
  for (; i < ns; ++i) {
    s.e[i] = fast_expf(s.samp[i] - m);
    s.bin[i] = static_cast<int32_t>(bin_of(m, s.samp[i]));
  }
  std::fill(s.mass.begin(), s.mass.end(), 0.0);
  std::fill(s.mass2.begin(), s.mass2.end(), 0.0);
  std::fill(s.count.begin(), s.count.end(), 0);
  for (i = 0; i < ns; ++i) {
    const float zi = s.samp[i];
    if (zi > thr || !(zi >= kth)) continue;  // the candidates are counted exactly below
    const double e = static_cast<double>(s.e[i]);
    s.mass[s.bin[i]] += e * kStride;
    s.mass2[s.bin[i]] += e * e;
    s.count[s.bin[i]] += kStride;
  }
  for (size_t c = 0; c < n_cand; ++c) s.mass[bin_of(m, s.cand[c].first)] += fast_expf(s.cand[c].first - m);
  // lo: the last bin whose estimated mass above is below pS by kSigmas errors; hi: the first bin
  // whose estimated mass through it is above pS by kSigmas errors.
  double G = 0.0, var = 0.0;
  int64_t b = 0, tokens = 0;
  *lo = 0;
  *hi = kBins - 1;
  for (; b < kBins; ++b) {
    if (G + kSigmas * kStride * std::sqrt(var) < pS) *lo = b;
    G += s.mass[b];
    var += s.mass2[b];
    if (G - kSigmas * kStride * std::sqrt(var) >= pS) {
      *hi = b;
      break;
    }
  }
  for (b = *lo; b <= *hi; ++b) tokens += s.count[b];
  return tokens <= V / 4;
}

// The bracket pass (see above): s.G, s.T (kT), s.br and s.mass[lo .. hi].
template <bool kT>
void bracket_pass(const float* z, int64_t V, float m, float kth, int64_t lo, int64_t hi, Scratch& s) {
  constexpr int64_t nv = kScanBlock / kW;
  const int full = static_cast<int>((1LL << kW) - 1);
  const fVec mv(m), kv(kth), zero(0.f), inv(kInvWidth), last(static_cast<float>(kBins - 1));
  const fVec lov(static_cast<float>(lo)), hiv(static_cast<float>(hi + 1));
  fVec g[nv], gc[nv], t[nv], tc[nv];
  for (int64_t v = 0; v < nv; ++v) g[v] = gc[v] = t[v] = tc[v] = zero;
  std::fill(s.mass.begin() + lo, s.mass.begin() + hi + 1, 0.0);
  s.br.clear();
  auto keep = [&](float zj, float e, int32_t b, int64_t j) {
    s.br.push_back(BracketTok{zj, e, b, j});
    s.mass[b] += static_cast<double>(e);
  };
  int64_t j = 0;
  for (; j + kScanBlock <= V; j += kScanBlock) {
#pragma GCC unroll 8
    for (int64_t v = 0; v < nv; ++v) {
      const fVec zv = fVec::loadu(z + j + v * kW), d = zv - mv;
      const fVec e = vexp_nonpos(d) & (zv >= kv);
      const fVec bf = fVec::blendv(last, (mv - zv) * inv, (mv - zv) * inv < last);
      const fVec ea = e & (bf < lov);
      const fVec y = ea - gc[v], ts = g[v] + y;
      gc[v] = (ts - g[v]) - y;
      g[v] = ts;
      if constexpr (kT) {
        const fVec ed = (ea * d) & (ea > zero), yt = ed - tc[v], tt = t[v] + yt;
        tc[v] = (tt - t[v]) - yt;
        t[v] = tt;
      }
      const int bits = ~((bf >= lov) & (bf < hiv) & (zv >= kv)).zero_mask() & full;
      if (bits != 0) {
        float el[kW], bl[kW];
        e.store(el);
        bf.store(bl);
        for (int l = 0; l < kW; ++l)
          if (bits & (1 << l)) keep(z[j + v * kW + l], el[l], static_cast<int32_t>(bl[l]), j + v * kW + l);
      }
    }
  }
  float gl[kScanBlock], gcl[kScanBlock], tl[kScanBlock], tcl[kScanBlock];
  for (int64_t v = 0; v < nv; ++v) {
    g[v].store(gl + v * kW);
    gc[v].store(gcl + v * kW);
    t[v].store(tl + v * kW);
    tc[v].store(tcl + v * kW);
  }
  double G = 0.0, T = 0.0;
  for (int64_t l = 0; l < kScanBlock; ++l) {
    G += static_cast<double>(gl[l]) - static_cast<double>(gcl[l]);
    if (kT) T += static_cast<double>(tl[l]) - static_cast<double>(tcl[l]);
  }
  for (; j < V; ++j) {
    if (!(z[j] >= kth)) continue;
    const int64_t b = bin_of(m, z[j]);
    const float d = z[j] - m, e = fast_expf(d);
    if (b < lo) {
      G += static_cast<double>(e);
      if (kT && e > 0.f) T += static_cast<double>(e * d);
    } else if (b <= hi) {
      keep(z[j], e, static_cast<int32_t>(b), j);
    }
  }
  s.G = G;
  s.T = T;
}

// top-p's cut from a bracket; false (nothing decided) when the walk does not end inside it.
bool top_p_bracket(const float* z, int64_t V, float m, float kth, float thr, size_t n_cand, double pS,
                   bool want_t, Scratch& s, Cut* out) {
  int64_t lo = 0, hi = 0;
  if (V < kMinBracketV || !bracket_bins(z, V, m, kth, thr, n_cand, pS, s, &lo, &hi)) return false;
  want_t ? bracket_pass<true>(z, V, m, kth, lo, hi, s) : bracket_pass<false>(z, V, m, kth, lo, hi, s);
  if (!(s.G < pS)) return false;  // the cut lies above the bracket
  double above = s.G, G_c = 0.0;
  int64_t b = lo;
  for (; b <= hi; ++b) {
    if (above + s.mass[b] >= pS) break;
    above += s.mass[b];
  }
  bool have = false;
  float c = 0.f;
  for (; b <= hi; ++b) {
    if (s.mass[b] == 0.0 && b != kBins - 1) continue;
    s.cand.clear();
    for (const BracketTok& t : s.br)
      if (t.bin == b) s.cand.emplace_back(t.z, t.j);
    std::sort(s.cand.begin(), s.cand.end(), by_order);
    if (walk(s.cand, s.cand.size(), m, pS, above, have, c, G_c, s)) break;
  }
  if (b > hi || !have) return false;
  *out = tie_cut(c, m, G_c, pS, s);
  return true;
}

// How row_cut found the cut, for the fused log-prob op (csrc/logprobs_filtered.cpp): where the
// kept tokens' sums can come from without another pass over the row.
enum class Found {
  kAll,         // no cut (the filter is off, or the row has a NaN or no finite max): every token kept
  kCandidates,  // every kept token is in s.cand
  kBracket,     // the kept tokens: every token of a bin above the bracket (sums s.G, s.T) + kept s.br
  kRow,         // the kept set needs a pass over the row to be summed
  kHistogram,   // top-p by the histogram of every token (flat rows): the kept mass is s.kept; its
                // entropy sum needs a pass over the row
};

struct CutInfo {
  Cut cut;
  Found how;
};

// The cut of rlhf_fast/_filter.py ("The kept set") for the scaled row z (max m, finite: no NaN and
// a finite max; thr and s.cand from scan_row). want_t: the bracket also sums e (z - m) above it.
CutInfo row_cut(const float* z, int64_t V, float m, bool finite, int64_t top_k, double top_p, float thr,
                Scratch& s, bool want_t = false) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const bool k_on = top_k > 0 && top_k < V, p_on = top_p < 1.0;
  if (!finite || !(k_on || p_on)) return {Cut{false, kNegInf, V - 1}, Found::kAll};
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
  // every token >= kth is in s.cand when kth > thr (s.cand holds every token above thr)
  const Found from_cand = collected && kth > thr ? Found::kCandidates : Found::kRow;
  if (!p_on) return {Cut{true, kth, V - 1}, from_cand};
  const double pS = top_p * kept_mass(z, V, m, kth);
  size_t n = 0;
  if (collected) {
    // Peaked rows: the walk over the tokens above thr (every token of each such value is held)
    // reaches pS there.
    auto mid = std::partition(s.cand.begin(), s.cand.end(),
                              [&](const auto& a) { return a.first > thr && a.first >= kth; });
    n = static_cast<size_t>(mid - s.cand.begin());
    std::sort(s.cand.begin(), mid, by_order);
    double above = 0.0, G_c = 0.0;
    bool have = false;
    float c = 0.f;
    if (walk(s.cand, n, m, pS, above, have, c, G_c, s) && have) {
      s.cand.resize(n);  // the kept tokens are a prefix of these
      return {tie_cut(c, m, G_c, pS, s), Found::kCandidates};
    }
  }
  Cut cut;
  if (top_p_bracket(z, V, m, kth, collected ? thr : std::numeric_limits<float>::infinity(), n, pS, want_t, s,
                    &cut))
    return {cut, Found::kBracket};
  s.kept = -1.0;  // set by tie_cut when the histogram's walk ends
  const Cut hist = top_p_histogram(z, V, m, kth, pS, s);
  return {hist, s.kept >= 0.0 ? Found::kHistogram : Found::kRow};
}

}  // namespace
}  // namespace rlhf_fast
