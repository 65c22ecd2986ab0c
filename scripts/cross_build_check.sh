#!/usr/bin/env bash
# Compile-only check of every csrc/*.cpp at each ISA level rlhf_fast/ops/_library.py builds for:
# x86-64 AVX-512 / AVX2 / portable, and aarch64 NEON / SVE256 with a cross compiler (issue 23: the
# kernels are written on at::vec::Vectorized, whose implementation is picked by CPU_CAPABILITY_*, so
# each level is different code). Nothing is linked or run; a level whose compiler is missing is
# reported as SKIP and fails the run unless ALLOW_SKIP=1.
#
#   scripts/cross_build_check.sh              # python from PATH (the venv with torch)
#   CXX_AARCH64=aarch64-linux-gnu-g++ PYTHON=python3 scripts/cross_build_check.sh
#
# The aarch64 cross compile reads the x86 torch wheel's headers, which are the same headers an
# aarch64 wheel ships (ATen/cpu/vec selects vec128 NEON / SVE by __aarch64__ and CPU_CAPABILITY_*),
# and the host's Python headers, of which only pyconfig.h is machine-specific (sizes of C types,
# identical on x86-64 and aarch64 Linux, LP64 both).
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
CXX_X86=${CXX_X86:-g++}
CXX_AARCH64=${CXX_AARCH64:-aarch64-linux-gnu-g++}
JOBS=${JOBS:-1}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

INCLUDES=$("$PYTHON" -c "
import sysconfig
from torch.utils.cpp_extension import include_paths
print(' '.join('-I' + p for p in [*include_paths(), sysconfig.get_paths()['include']]))") || {
  echo "cross_build_check: could not get torch's include paths from $PYTHON" >&2; exit 2; }
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__)")
# What torch.utils.cpp_extension adds to every extension build (-D_GLIBCXX_USE_CXX11_ABI from the
# wheel), and what _library.py adds, less -fopenmp's link step.
ABI=$("$PYTHON" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
COMMON="-c -std=c++17 -O2 -fPIC -fopenmp -fno-math-errno -DTORCH_EXTENSION_NAME=rlhf_fast_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=$ABI"

LEVELS=(
  "x86-avx512|$CXX_X86|-march=x86-64-v4 -mtune=generic -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512"
  "x86-avx2|$CXX_X86|-march=x86-64-v3 -mtune=generic -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
  "x86-default|$CXX_X86|-march=x86-64 -mtune=generic -DCPU_CAPABILITY=DEFAULT"
  "aarch64-neon|$CXX_AARCH64|-march=armv8-a -DCPU_CAPABILITY=DEFAULT"
  "aarch64-sve256|$CXX_AARCH64|-march=armv8.2-a+sve -msve-vector-bits=256 -DCPU_CAPABILITY=SVE256 -DCPU_CAPABILITY_SVE -DCPU_CAPABILITY_SVE256"
)

echo "torch $TORCH_VERSION, sources: $(ls csrc/*.cpp | tr '\n' ' ')"
fail=0
skip=0
for level in "${LEVELS[@]}"; do
  IFS='|' read -r name cxx flags <<<"$level"
  if ! command -v "$cxx" >/dev/null 2>&1; then
    echo "SKIP  $name: no compiler $cxx (apt-get install g++-aarch64-linux-gnu)"
    skip=1
    continue
  fi
  for src in csrc/*.cpp; do
    obj="$OUT/$name-$(basename "$src" .cpp).o"
    # shellcheck disable=SC2086  # the flag strings are word lists
    if "$cxx" $COMMON $flags $INCLUDES "$src" -o "$obj" 2>"$obj.log"; then
      echo "OK    $name $src"
    else
      echo "FAIL  $name $src:"
      grep -E "error|Error" "$obj.log" | head -20
      fail=1
    fi
  done
done
if [ "$fail" -ne 0 ]; then
  echo "cross_build_check: FAILED"
  exit 1
fi
if [ "$skip" -ne 0 ] && [ "${ALLOW_SKIP:-0}" != "1" ]; then
  echo "cross_build_check: some levels were skipped (ALLOW_SKIP=1 accepts that)"
  exit 1
fi
echo "cross_build_check: all levels compile"
