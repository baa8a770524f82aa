// Standalone check and benchmark of the AVX2 kernels against the scalar kernel.
//
//   (kernel_scalar.cc is compiled without -mfma, as in the op library: otherwise GCC fuses its
//   multiply-adds and the reference itself changes)
//   g++-12 -std=c++17 -O3 -Icustom_ops/src -c custom_ops/src/kernel_scalar.cc -o build/kernel_scalar.o
//   g++-12 -std=c++17 -O3 -mavx2 -mfma -mf16c -Icustom_ops/src custom_ops/tests/kernel_check_avx2.cc
//       custom_ops/src/kernel_avx2.cc build/kernel_scalar.o -o build/kernel_check_avx2
//   build/kernel_check_avx2 check            # correctness over many geometries (exit 1 on failure)
//   build/kernel_check_avx2 bench [reps]     # LLaMA-3.2-1B shapes, M = 1 and 128, hot and cold
//   build/kernel_check_avx2 bench-m K N      # crossover of the GEMV and GEMM paths over M
//
// The AVX2 kernels sum the groups of a row in the same order as the scalar kernel and round every
// (alpha*s)*dot product on its own, so the check demands bit-identical outputs.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel.h"

namespace {

using sherry::Format;

// 64-byte aligned workspace, as the op provides it.
struct Workspace {
  explicit Workspace(size_t bytes) : data(static_cast<uint8_t*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64))) {}
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data;
};

// A random canonical weight: valid codes, with the bits the format ignores set to garbage.
struct Weight {
  Format format;
  sherry::Geometry geometry;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
  sherry::PackedWeights packed() const { return {format, geometry, data.data(), scales.data()}; }
};

uint16_t random_half(std::mt19937& rng) {
  // Mostly normal positive halves around 0.01-1, sometimes zero or subnormal.
  const int kind = rng() % 50;
  if (kind == 0) return 0;
  if (kind == 1) return static_cast<uint16_t>(1 + rng() % 0x3FF);
  return static_cast<uint16_t>((8 + rng() % 8) << 10 | (rng() & 0x3FF));
}

Weight random_weight(Format f, int64_t n, int64_t k, int64_t group_size, std::mt19937& rng) {
  Weight w{f, {n, k, group_size}, {}, {}};
  const int64_t stride = sherry::row_bytes(f, k, group_size);
  w.data.assign(static_cast<size_t>(n * stride), 0);
  w.scales.resize(static_cast<size_t>(n * w.geometry.groups()));
  for (auto& s : w.scales) s = random_half(rng);
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* row = w.data.data() + r * stride;
    if (f == Format::kI2S) {
      for (int64_t i = 0; i < stride * 4; ++i) {
        const int code = i < k ? static_cast<int>(rng() % 3) : static_cast<int>(rng() % 4);  // pad lanes: anything
        row[i >> 2] |= static_cast<uint8_t>(code << ((i & 3) * 2));
      }
      continue;
    }
    std::vector<uint8_t> codes;
    if (f == Format::kSherry) {
      for (int64_t b = 0; b < k / 4; ++b) codes.push_back(static_cast<uint8_t>(rng() % 32));
    } else {
      for (int64_t start = 0; start < k; start += group_size) {
        const int64_t length = std::min(group_size, k - start);
        for (int64_t i = 0; i < length; i += 3) {
          int v = 0;
          for (int p = 0; p < 3; ++p) v = 3 * v + (i + p < length ? static_cast<int>(rng() % 3) - 1 : 0);
          codes.push_back(static_cast<uint8_t>(std::abs(v) | (v < 0) << 4));
        }
      }
    }
    const int64_t c = static_cast<int64_t>(codes.size()), half = (c + 1) / 2;
    for (int64_t i = 0; i < stride; ++i) row[i] = static_cast<uint8_t>(rng());  // garbage in unused bits
    for (int64_t i = 0; i < c; ++i) {
      row[i / 2] = static_cast<uint8_t>((row[i / 2] & ~(0x0F << (4 * (i & 1)))) | (codes[i] & 0x0F) << (4 * (i & 1)));
      row[half + i / 8] = static_cast<uint8_t>((row[half + i / 8] & ~(1 << (i % 8))) | (codes[i] >> 4) << (i % 8));
    }
  }
  return w;
}

std::vector<float> random_activations(int64_t m, int64_t k, int64_t group_size, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> a(static_cast<size_t>(m * k));
  for (auto& v : a) v = normal(rng);
  for (int64_t r = 0; r < m; ++r) {
    float* row = a.data() + r * k;
    switch (r % 6) {
      case 1:  // one all-zero group
        std::fill(row, row + std::min(group_size, k), 0.f);
        break;
      case 2:  // saturating: every |x| equal, so table sums reach +-381
        for (int64_t i = 0; i < k; ++i) row[i] = (rng() & 1) ? 3.f : -3.f;
        break;
      case 3:  // exact rounding ties: amax 127 makes x*127/amax = x
        for (int64_t i = 0; i < k; ++i) row[i] = static_cast<float>(static_cast<int>(rng() % 255) - 127) + 0.5f;
        row[0] = 127.f;
        break;
      case 4:  // an outlier
        row[rng() % k] = 1000.f;
        break;
      default: break;
    }
  }
  return a;
}

// Y for rows [0, m) through the op's call pattern: prepare every row, then compute row tiles
// [i*tile, (i+1)*tile), or the given uneven cuts.
std::vector<float> run(const sherry::MatMulKernel& kernel, const std::vector<float>& a, int64_t m, int64_t n,
                       int64_t k, const float* bias, const std::vector<int64_t>& cuts = {}) {
  const size_t stride = kernel.activation_row_bytes();
  Workspace ws(stride * static_cast<size_t>(m));
  for (int64_t r = 0; r < m; ++r) kernel.prepare_row(a.data() + r * k, ws.data.get() + r * stride);
  std::vector<float> y(static_cast<size_t>(m * n), std::nanf(""));
  std::vector<int64_t> bounds = cuts;
  if (bounds.empty())
    for (int64_t b = 0; b < n; b += kernel.row_tile()) bounds.push_back(b);
  bounds.push_back(n);
  for (size_t i = 0; i + 1 < bounds.size(); ++i)
    kernel.compute(ws.data.get(), m, bounds[i], bounds[i + 1], bias, y.data());
  return y;
}

int failures = 0;

void check_case(Format f, int64_t n, int64_t k, int64_t group_size, const std::vector<int64_t>& ms, std::mt19937& rng) {
  const Weight w = random_weight(f, n, k, group_size, rng);
  const auto scalar = sherry::make_scalar_kernel(w.packed());
  const auto avx2 = sherry::make_avx2_kernel(w.packed());
  if (!avx2) {
    std::printf("FAIL %s N=%ld K=%ld gs=%ld: no avx2 kernel\n", sherry::format_name(f), n, k, group_size);
    ++failures;
    return;
  }
  std::vector<float> bias(static_cast<size_t>(n));
  for (auto& b : bias) b = static_cast<float>(rng() % 1000) / 100.f - 5.f;
  for (int64_t m : ms) {
    const std::vector<float> a = random_activations(m, k, group_size, rng);
    const float* b = (m % 2) ? bias.data() : nullptr;
    const std::vector<float> want = run(*scalar, a, m, n, k, b);
    std::vector<std::vector<float>> gots = {run(*avx2, a, m, n, k, b)};
    // Uneven cuts too: the kernel must honour any [n_begin, n_end).
    gots.push_back(run(*avx2, a, m, n, k, b, {0, std::min<int64_t>(n, 5), std::min<int64_t>(n, 37)}));
    for (const auto& got : gots) {
      size_t bad = 0, first = 0;
      for (size_t i = 0; i < want.size(); ++i)
        if (std::memcmp(&want[i], &got[i], sizeof(float)) != 0 && !(std::isnan(want[i]) && std::isnan(got[i])))
          if (bad++ == 0) first = i;
      if (bad) {
        std::printf("FAIL %s N=%ld K=%ld gs=%ld M=%ld: %zu of %zu differ, first [%zu] %.9g vs %.9g\n",
                    sherry::format_name(f), n, k, group_size, m, bad, want.size(), first, want[first], got[first]);
        ++failures;
      }
    }
  }
}

void expect_throw(const char* what, const Weight& w) {
  try {
    sherry::make_avx2_kernel(w.packed());
    std::printf("FAIL %s: accepted\n", what);
    ++failures;
  } catch (const std::runtime_error&) {
  }
}

void check_corrupt(std::mt19937& rng) {
  for (uint8_t code : {14, 15, 16, 30, 31}) {  // tl2: index > 13, or a negative zero
    Weight w = random_weight(Format::kTL2, 3, 30, 10, rng);
    const int64_t stride = sherry::row_bytes(Format::kTL2, 30, 10), half = (12 + 1) / 2;
    uint8_t* row = w.data.data() + 2 * stride;
    row[2] = static_cast<uint8_t>((row[2] & 0xF0) | (code & 0x0F));  // code 4
    row[half] = static_cast<uint8_t>((row[half] & ~(1 << 4)) | (code >> 4) << 4);
    expect_throw("tl2 invalid code", w);
  }
  {  // tl2: a group of 10 ends in a triple with 2 padding lanes that must be zero: v = 1 puts -/+1 in lane 2
    Weight w = random_weight(Format::kTL2, 2, 10, 10, rng);
    uint8_t* row = w.data.data() + sherry::row_bytes(Format::kTL2, 10, 10);
    row[1] = static_cast<uint8_t>((row[1] & 0x0F) | 1 << 4);  // code 3 = the padded triple
    row[2] &= static_cast<uint8_t>(~(1 << 3));
    expect_throw("tl2 non-zero padding lane", w);
  }
  {
    Weight w = random_weight(Format::kI2S, 4, 20, 20, rng);
    w.data[3 * sherry::row_bytes(Format::kI2S, 20, 20) + 2] |= 0x30;  // code 3
    expect_throw("i2s code 3", w);
  }
}

int check() {
  std::mt19937 rng(1234);
  const std::vector<int64_t> ms = {1, 2, 3, 5, 6, 7, 8, 13, 37, 64, 128};
  struct Shape {
    int64_t n, k, gs;
  };
  const std::vector<Shape> sherry_shapes = {
      {1, 4, 4},       {5, 12, 12},    {31, 36, 12},   {33, 128, 32},  {64, 256, 64},   {100, 384, 128},
      {97, 1000, 100}, {65, 520, 520}, {40, 2048, 2048}, {33, 3000, 128}, {70, 1040, 1040}, {32, 20, 8},
      {129, 2048, 128}, {3, 1028, 256}, {17, 8, 4}};
  const std::vector<Shape> dense_shapes = {
      {1, 1, 1},       {5, 7, 3},       {31, 30, 10},   {33, 128, 32},  {64, 256, 64},  {100, 384, 128},
      {97, 1000, 100}, {65, 517, 517},  {40, 2048, 2048}, {33, 3001, 128}, {70, 1043, 1043}, {9, 50, 17},
      {129, 2048, 128}, {3, 1030, 256}, {17, 45, 45},   {6, 100, 1},    {11, 64, 5}};
  for (const Shape& s : sherry_shapes) check_case(Format::kSherry, s.n, s.k, s.gs, ms, rng);
  for (Format f : {Format::kTL2, Format::kI2S})
    for (const Shape& s : dense_shapes) check_case(f, s.n, s.k, s.gs, ms, rng);
  check_corrupt(rng);
  // Non-finite activations: a NaN or an infinity makes its group's s NaN, so its row's outputs NaN.
  for (const float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
    const Weight w = random_weight(Format::kSherry, 40, 256, 64, rng);
    auto a = random_activations(2, 256, 64, rng);
    a[5] = bad;
    a[256 + 130] = -bad;
    const auto scalar = sherry::make_scalar_kernel(w.packed());
    const auto avx2 = sherry::make_avx2_kernel(w.packed());
    const auto want = run(*scalar, a, 2, 40, 256, nullptr), got = run(*avx2, a, 2, 40, 256, nullptr);
    for (size_t i = 0; i < want.size(); ++i)
      if (std::memcmp(&want[i], &got[i], sizeof(float)) != 0 && !(std::isnan(want[i]) && std::isnan(got[i]))) {
        std::printf("FAIL activation %g: [%zu] %g vs %g\n", bad, i, want[i], got[i]);
        ++failures;
        break;
      }
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}

// ---- benchmark ----------------------------------------------------------------------------------------

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU time of this thread: the machine is shared, and wall time counts the time other processes
// hold the core. Memory stalls still count as CPU time, so cold timings stay honest.
double thread_us() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e6 + static_cast<double>(t.tv_nsec) * 1e-3;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Single-thread streaming read bandwidth over `bytes`, GB/s: the ceiling for cold GEMVs. (Plain
// loads: the hardware prefetchers alone stream at full speed, software prefetch adds nothing here.)
double bandwidth_probe(size_t bytes) {
  Workspace buf(bytes);
  std::memset(buf.data.get(), 1, bytes);
  std::vector<double> t;
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = thread_us();
    for (size_t i = 0; i < bytes; i += 64) {
      acc0 = _mm256_add_epi8(acc0, _mm256_load_si256(reinterpret_cast<const __m256i*>(buf.data.get() + i)));
      acc1 = _mm256_add_epi8(acc1, _mm256_load_si256(reinterpret_cast<const __m256i*>(buf.data.get() + i + 32)));
    }
    t.push_back(thread_us() - t0);
  }
  volatile int sink = _mm256_extract_epi32(_mm256_add_epi8(acc0, acc1), 0);
  (void)sink;
  return static_cast<double>(bytes) / median(t) / 1e3;
}

struct Timing {
  double us;       // median thread CPU time per call
  double wall_us;  // median wall time per call
  double bytes;    // canonical weight bytes (codes + fp16 scales) per call
};

// One call = prepare M rows + compute all row tiles on one thread, as the op would with 1 thread.
// Cold: cycle through copies whose weights total > 1.5 GB, so every call streams from DRAM.
Timing time_kernel(Format f, int64_t n, int64_t k, int64_t m, bool cold, int reps, std::mt19937& rng,
                   bool avx2 = true) {
  const int64_t gs = 128;
  const Weight w = random_weight(f, n, k, gs, rng);
  std::vector<std::unique_ptr<sherry::MatMulKernel>> kernels;
  kernels.push_back(avx2 ? sherry::make_avx2_kernel(w.packed()) : sherry::make_scalar_kernel(w.packed()));
  // Private bytes: the tile stream (codes + fp16 scales), estimated from the canonical sizes.
  const double canonical = static_cast<double>(w.data.size() + w.scales.size() * 2);
  if (cold)
    while (kernels.size() * canonical < 1.6e9) kernels.push_back(sherry::make_avx2_kernel(w.packed()));
  const auto& k0 = *kernels[0];
  const std::vector<float> a = random_activations(m, k, gs, rng);
  const size_t stride = k0.activation_row_bytes();
  Workspace ws(stride * static_cast<size_t>(m));
  std::vector<float> y(static_cast<size_t>(m * n));
  const int64_t tile = k0.row_tile();
  std::vector<double> times, walls;
  size_t next = 0;
  const int calls = cold ? std::max<int>(reps, static_cast<int>(kernels.size())) : reps;
  for (int i = 0; i < calls + 3; ++i) {
    const auto& kern = *kernels[next];
    next = (next + 1) % kernels.size();
    const double t0 = thread_us(), w0 = now_us();
    for (int64_t r = 0; r < m; ++r) kern.prepare_row(a.data() + r * k, ws.data.get() + r * stride);
    for (int64_t b = 0; b < n; b += tile) kern.compute(ws.data.get(), m, b, std::min(n, b + tile), nullptr, y.data());
    if (i >= 3) {
      times.push_back(thread_us() - t0);
      walls.push_back(now_us() - w0);
    }
  }
  return {median(times), median(walls), canonical};
}

void bench(int reps) {
  std::mt19937 rng(7);
  std::printf("single-thread streaming read: %.1f GB/s\n", bandwidth_probe(size_t{1} << 31));
  struct Shape {
    int64_t k, n;
  };
  const Shape shapes[] = {{2048, 2048}, {2048, 512}, {2048, 8192}, {8192, 2048}};
  const Format formats[] = {Format::kSherry, Format::kTL2, Format::kI2S};
  std::printf("%-11s %4s %-5s %-7s %10s %8s %8s\n", "K->N", "M", "temp", "format", "median_us", "GB/s", "vs_sherry");
  for (int64_t m : {1, 128})
    for (bool cold : {false, true})
      for (const Shape& s : shapes) {
        double sherry_us = 0;
        for (Format f : formats) {
          const Timing t = time_kernel(f, s.n, s.k, m, cold, m == 1 ? reps : std::max(5, reps / 20), rng);
          if (f == Format::kSherry) sherry_us = t.us;
          std::printf("%5ld->%-5ld %4ld %-5s %-7s %10.1f %8.2f %8.2f\n", s.k, s.n, m, cold ? "cold" : "hot",
                      sherry::format_name(f), t.us, t.bytes / t.us / 1e3, t.us / sherry_us);
          std::fflush(stdout);
        }
      }
}

// GEMV vs GEMM crossover: time per row of A for growing M (hot), with the kernel's own choice.
void bench_m(int64_t k, int64_t n) {
  std::mt19937 rng(9);
  for (Format f : {Format::kSherry, Format::kTL2, Format::kI2S})
    for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32, 64, 128}) {
      const Timing t = time_kernel(f, n, k, m, false, m < 16 ? 200 : 20, rng);
      std::printf("%-7s K=%ld N=%ld M=%3ld: %9.1f us, %7.2f us/row\n", sherry::format_name(f), k, n, m, t.us, t.us / m);
      std::fflush(stdout);
    }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "check") return check();
  if (mode == "bench") {
    bench(argc > 2 ? std::atoi(argv[2]) : 200);
    return 0;
  }
  if (mode == "bench-one") {  // format(0..2) K N M cold reps
    std::mt19937 rng(5);
    const Timing t = time_kernel(static_cast<Format>(std::atoi(argv[2])), std::atol(argv[4]), std::atol(argv[3]),
                                 std::atol(argv[5]), std::atoi(argv[6]) != 0, std::atoi(argv[7]), rng);
    std::printf("%s K=%s N=%s M=%s %s: %.1f us cpu, %.1f us wall, %.2f GB/s\n", sherry::format_name(static_cast<Format>(std::atoi(argv[2]))),
                argv[3], argv[4], argv[5], std::atoi(argv[6]) ? "cold" : "hot", t.us, t.wall_us, t.bytes / t.us / 1e3);
    return 0;
  }
  if (mode == "bench-m") {
    bench_m(argc > 2 ? std::atol(argv[2]) : 2048, argc > 3 ? std::atol(argv[3]) : 2048);
    return 0;
  }
  std::fprintf(stderr, "usage: %s check | bench [reps] | bench-m K N\n", argv[0]);
  return 2;
}
