// What the CPU kernels for the PPO reward / advantage math share. The kernels: kl_penalty and
// shape_rewards (csrc/rlmath.cpp, which also defines the schemas of all five ops), gae
// (csrc/rlmath_gae.cpp), and the two passes of masked whitening, masked_moments and
// masked_whiten_apply (csrc/rlmath_whiten.cpp); each file's head comment says how its kernels work.
//
// The peers do this with a Python `for t in reversed(range(T))` loop (GAE: ~10 tiny torch ops per
// token) and chains of elementwise torch ops (KL + shaping: ~8 passes over [B, T]). Here, written
// on at::vec::Vectorized<float> (csrc/vec_math.h, csrc/rlmath_vec.h) so that every ISA build
// (AVX-512, AVX2, portable, NEON: rlhf_fast/ops/_library.py) runs vector code; gcc's
// auto-vectorisation of `#pragma omp simd` loops left much of it scalar on AVX2 (issue 23).
//
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
#pragma once

#include "common.h"
#include "rlmath_vec.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace rlhf_fast {
namespace rlmath {

constexpr int64_t kMinPerThread = int64_t{1} << 22;  // elements; see the head comment above

// Same dtype for a pair of float inputs: mixed pairs (e.g. float32 logprobs, bf16 ref) go to float32.
static inline std::pair<at::Tensor, at::Tensor> same_dtype(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == b.scalar_type()) return {a.contiguous(), b.contiguous()};
  return {a.to(at::kFloat).contiguous(), b.to(at::kFloat).contiguous()};
}

}  // namespace rlmath
}  // namespace rlhf_fast
