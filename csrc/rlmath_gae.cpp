// CPU kernel gae (the schema: csrc/rlmath.cpp; what the RL-math kernels share:
// csrc/rlmath_common.h).
//   gae              one backward pass: the recurrence is a dependency chain along T, so W rows
//                    (W = the vector width: 16 on AVX-512, 8 on AVX2) step back through time
//                    together, one lane per row, staged through W x W transposes in registers.
#include "rlmath_common.h"

namespace rlhf_fast {
namespace {

using rlvec::W;
using rlmath::kMinPerThread;
using rlmath::same_dtype;

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

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) {
  m.impl("gae", &gae_cpu);
}

}  // namespace rlhf_fast
