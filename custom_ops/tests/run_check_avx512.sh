#!/bin/sh
# Builds and runs the AVX-512 kernel check (and, with "bench", the benchmark) without the op
# library: the kernels and the scalar reference linked into one driver. Second build: ASan+UBSan.
#   custom_ops/tests/run_check_avx512.sh [check] [bench] [asan] [driver args...]
set -e
cd "$(dirname "$0")/../.."
out=${BUILD_DIR:-build/kernel_check_avx512}
mkdir -p "$out"
avx512="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx512vbmi -mfma -mf16c"
build() {  # $1 = output, $2 = extra flags
  g++ -std=c++17 $2 -Wall -Wextra -Icustom_ops/src -c custom_ops/src/kernel_avx512.cc $avx512 -o "$1.avx512.o"
  g++ -std=c++17 $2 -Wall -Wextra -Icustom_ops/src -c custom_ops/src/kernel_scalar.cc -o "$1.scalar.o"
  g++ -std=c++17 $2 -Wall -Wextra -Icustom_ops/src -mavx2 custom_ops/tests/kernel_check_avx512.cc \
      "$1.avx512.o" "$1.scalar.o" -o "$1"
}
mode=${1:-check}
case "$mode" in
  asan)
    shift
    build "$out/check_asan" "-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
    "$out/check_asan" check "$@" ;;
  *)
    build "$out/check" "-O3"
    "$out/check" "$@" ;;
esac
