// Standalone check and benchmark of the AVX-512 kernels against the scalar reference kernel.
//
//   check:  random canonical weights (random valid codes) and scales for many geometries, rows of
//           A split and n ranges tiled like the op does; the AVX-512 outputs must equal the
//           scalar ones bit for bit (both add the groups in order without FMA contraction; NaN
//           outputs, from NaN/Inf activations, only need to be NaN in both).
//           Corrupt codes must throw.
//   bench:  LLaMA-3.2-1B shapes at M=1 and M=128, one thread, hot (one matrix) and cold (cycling
//           through > 1.6 GB of distinct weights per format); prepare_row + compute per call; the
//           formats take turns call by call, every call timed, medians over all calls. GB/s
//           counts the canonical bytes (codes + float16 scales) of one matrix per call.
//
// Build and run with custom_ops/tests/run_check_avx512.sh (it compiles kernel_avx512.cc with the
// library's AVX-512 flags and the scalar kernel without any); driver arguments:
//   [check] [bench] [--cold-bytes N] [--rounds N] [--gs N] [--m M] [--k K] [--n N] [--format F]
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel.h"

namespace sherry {
namespace {

struct Aligned {
  void operator()(uint8_t* p) const noexcept { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, Aligned>;

Buffer zeroed(size_t bytes) {
  const size_t rounded = std::max<size_t>((bytes + 63) / 64 * 64, 64);
  Buffer b(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
  if (!b) throw std::bad_alloc();
  std::memset(b.get(), 0, rounded);
  return b;
}

// A canonical packed weight with its storage.
struct Weights {
  Format format;
  Geometry g;
  std::vector<uint8_t> data;
  std::vector<uint16_t> scales;
  PackedWeights view() const { return {format, g, data.data(), scales.data()}; }
};

void put_code5(uint8_t* row, int64_t codes, int64_t c, uint8_t code) {
  row[c / 2] |= static_cast<uint8_t>((code & 0x0F) << (4 * (c % 2)));
  row[ceil_div(codes, 2) + c / 8] |= static_cast<uint8_t>((code >> 4) << (c % 8));
}

// TL2 code of a ternary triple: |v| | (v < 0) << 4 with v = 9 w0 + 3 w1 + w2.
uint8_t tl2_code(int w0, int w1, int w2) {
  const int v = 9 * w0 + 3 * w1 + w2;
  return static_cast<uint8_t>(std::abs(v) | (v < 0 ? 0x10 : 0));
}

Weights random_weights(Format f, int64_t n, int64_t k, int64_t gs, std::mt19937_64& rng) {
  Weights w{f, {n, k, gs}, {}, {}};
  const int64_t stride = row_bytes(f, k, gs);
  w.data.assign(static_cast<size_t>(n * stride), 0);
  std::uniform_int_distribution<int> trit(-1, 1), code32(0, 31);
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* row = w.data.data() + r * stride;
    switch (f) {
      case Format::kSherry:
        for (int64_t c = 0; c < k / 4; ++c) put_code5(row, k / 4, c, static_cast<uint8_t>(code32(rng)));
        break;
      case Format::kTL2: {
        const int64_t codes = tl2_triples(k, gs);
        int64_t c = 0;
        for (int64_t start = 0; start < k; start += gs) {
          const int64_t length = std::min(gs, k - start);
          for (int64_t i = 0; i < length; i += 3, ++c) {
            int lanes[3];
            for (int p = 0; p < 3; ++p) lanes[p] = i + p < length ? trit(rng) : 0;
            put_code5(row, codes, c, tl2_code(lanes[0], lanes[1], lanes[2]));
          }
        }
        break;
      }
      case Format::kI2S:
        for (int64_t i = 0; i < 4 * stride; ++i) {
          const int code = i < k ? trit(rng) + 1 : 1;
          row[i / 4] |= static_cast<uint8_t>(code << (2 * (i % 4)));
        }
        break;
    }
  }
  // Positive normal halves over a wide range, and some zero scales.
  std::uniform_int_distribution<int> half(0x1000, 0x4C00), zero(0, 40);
  w.scales.resize(static_cast<size_t>(n * w.g.groups()));
  for (auto& s : w.scales) s = zero(rng) == 0 ? 0 : static_cast<uint16_t>(half(rng));
  return w;
}

// Activations: mostly gaussian, with the awkward cases quantize_group must match byte for byte:
// an all-zero group, exact .5 ties after scaling, a single huge value, denormals, and (rarely) a
// NaN or an infinity, which must make the whole output row NaN.
std::vector<float> random_activations(int64_t m, int64_t k, int64_t gs, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(m * k));
  for (auto& v : x) v = normal(rng);
  std::uniform_int_distribution<int> pick(0, 9), rare(0, 199);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t start = 0; start < k; start += gs) {
      float* g = x.data() + r * k + start;
      const int64_t length = std::min(gs, k - start);
      switch (pick(rng)) {
        case 0: std::fill(g, g + length, 0.f); break;
        case 1:  // max 127: every half-integer is a tie
          for (int64_t i = 0; i < length; ++i) g[i] = std::round(g[i] * 40.f) / 2.f;
          g[0] = 127.f;
          break;
        case 2: g[length / 2] = 1e30f; break;
        case 3:  // tiny (down to denormal) values; m stays above 127/FLT_MAX, where the scalar
                 // reference's own cast of NaN (0 * inf) to int8 would be undefined
          for (int64_t i = 0; i < length; ++i) g[i] *= 1e-36f;
          g[0] = 1e-36f;
          break;
        default: break;
      }
      switch (rare(rng)) {
        case 0: g[length - 1] = NAN; break;
        case 1: g[0] = -INFINITY; break;
        default: break;
      }
    }
  }
  return x;
}

// Runs the op's two phases on one thread: prepare every row, then compute on [n_begin, n_end)
// tiles of `tiles_per_item` row tiles, optionally over chunks of A's rows.
void run_op(const MatMulKernel& kernel, const Geometry& g, const float* x, int64_t m, const float* bias, float* y,
            int64_t tiles_per_item, int64_t row_chunk) {
  const size_t stride = kernel.activation_row_bytes();
  Buffer ws = zeroed(static_cast<size_t>(m) * stride);
  for (int64_t r = 0; r < m; ++r) kernel.prepare_row(x + r * g.k, ws.get() + r * stride);
  const int64_t item = kernel.row_tile() * tiles_per_item;
  for (int64_t m0 = 0; m0 < m; m0 += row_chunk)
    for (int64_t n0 = 0; n0 < g.n; n0 += item)
      kernel.compute(ws.get() + m0 * stride, std::min(row_chunk, m - m0), n0, std::min(g.n, n0 + item), bias,
                     y + m0 * g.n);
}

int failures = 0;

// Bit-identical, except that any NaN matches any NaN (payloads are not part of the numerics).
bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0; }

bool same(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < a.size(); ++i)
    if (!same(a[i], b[i])) return false;
  return true;
}

void check_case(Format f, int64_t n, int64_t k, int64_t gs, int64_t m, std::mt19937_64& rng) {
  const Weights w = random_weights(f, n, k, gs, rng);
  const std::unique_ptr<MatMulKernel> ref = make_scalar_kernel(w.view());
  const std::unique_ptr<MatMulKernel> fast = make_avx512_kernel(w.view());
  char what[160];
  std::snprintf(what, sizeof what, "%s N=%lld K=%lld gs=%lld M=%lld", format_name(f), (long long)n, (long long)k,
                (long long)gs, (long long)m);
  if (!fast) {
    std::printf("FAIL %s: no avx512 kernel\n", what);
    ++failures;
    return;
  }
  const std::vector<float> x = random_activations(m, k, gs, rng);
  std::vector<float> bias(static_cast<size_t>(n));
  for (auto& b : bias) b = std::normal_distribution<float>(0.f, 1.f)(rng);
  const bool with_bias = rng() % 2;
  std::vector<float> expect(static_cast<size_t>(m * n), NAN);
  run_op(*ref, w.g, x.data(), m, with_bias ? bias.data() : nullptr, expect.data(), 1 << 20, m);
  // The op's splits: whole ranges, one row tile per item, several tiles per item, rows of A in
  // chunks; and a range cut mid-tile, which the op never makes but compute must honour.
  struct Split {
    int64_t tiles, rows;
  };
  for (const Split s : {Split{1 << 20, m}, Split{1, m}, Split{3, std::max<int64_t>(1, m / 3)}, Split{2, 1}}) {
    std::vector<float> got(static_cast<size_t>(m * n), NAN);
    run_op(*fast, w.g, x.data(), m, with_bias ? bias.data() : nullptr, got.data(), s.tiles, s.rows);
    if (!same(got, expect)) {
      double worst = 0;
      int64_t at = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double d = std::fabs(double(got[i]) - expect[i]) / std::max(1e-30, std::fabs(double(expect[i])));
        if (!(d <= worst)) worst = d, at = static_cast<int64_t>(i);
      }
      std::printf("FAIL %s split(tiles=%lld rows=%lld): y[%lld] = %.9g, scalar %.9g (rel %.3g)\n", what,
                  (long long)s.tiles, (long long)s.rows, (long long)at, got[at], expect[at], worst);
      ++failures;
      return;
    }
  }
  // A range that starts and ends inside tiles: rows outside it must stay untouched.
  if (n > 20) {
    const int64_t lo = 5, hi = n - 3;
    const size_t stride = fast->activation_row_bytes();
    Buffer ws = zeroed(static_cast<size_t>(m) * stride);
    for (int64_t r = 0; r < m; ++r) fast->prepare_row(x.data() + r * k, ws.get() + r * stride);
    std::vector<float> got(static_cast<size_t>(m * n), -7.f);
    fast->compute(ws.get(), m, lo, hi, with_bias ? bias.data() : nullptr, got.data());
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < n; ++c) {
        const float want = c >= lo && c < hi ? expect[r * n + c] : -7.f;
        if (!same(got[r * n + c], want)) {
          std::printf("FAIL %s: range [%lld, %lld) wrote y[%lld,%lld] = %g, want %g\n", what, (long long)lo,
                      (long long)hi, (long long)r, (long long)c, got[r * n + c], want);
          ++failures;
          return;
        }
      }
  }
}

void expect_throw(const char* what, const Weights& w) {
  try {
    make_avx512_kernel(w.view());
    std::printf("FAIL %s: no exception\n", what);
    ++failures;
  } catch (const std::runtime_error&) {
  }
}

void check_corrupt(std::mt19937_64& rng) {
  Weights tl2 = random_weights(Format::kTL2, 5, 70, 35, rng);  // 12 triples per group, last padded
  Weights bad = tl2;
  bad.data[row_bytes(Format::kTL2, 70, 35) * 3 + 2] = 0xE0;  // index 14
  expect_throw("tl2 index 14", bad);
  bad = tl2;
  const int64_t codes = tl2_triples(70, 35), sign_byte = ceil_div(codes, 2);
  bad.data[0] &= 0xF0;  // code 0 -> negative zero
  bad.data[sign_byte] |= 1;
  expect_throw("tl2 negative zero", bad);
  bad = tl2;
  bad.data[5] = static_cast<uint8_t>((bad.data[5] & 0x0F) | 1 << 4);  // triple 11 = cols 33, 34, pad: +1 in the pad
  expect_throw("tl2 nonzero padding lane", bad);
  Weights i2s = random_weights(Format::kI2S, 3, 33, 33, rng);
  i2s.data[row_bytes(Format::kI2S, 33, 33) + 4] |= 0x30;  // code 3
  expect_throw("i2s code 3", i2s);
}

void run_checks() {
  std::mt19937_64 rng(12345);
  int cases = 0;
  struct Shape {
    int64_t n, k, gs;
  };
  const std::vector<Shape> shapes = {
      {64, 256, 128},  {48, 512, 32},   {37, 2048, 128}, {100, 1024, 64},  {33, 576, 128},  {17, 256, 256},
      {70, 300, 300},  {16, 4, 4},      {21, 60, 12},    {40, 520, 40},    {1, 128, 128},   {130, 4096, 128},
      {31, 8192, 8192}, {64, 48, 16},   {9, 2052, 128},  {80, 1000, 200},
  };
  const std::vector<int64_t> ms = {1, 2, 3, 4, 5, 8, 13, 64, 128};
  for (const Format f : {Format::kSherry, Format::kTL2, Format::kI2S}) {
    for (const Shape& s : shapes)
      for (const int64_t m : ms) {
        if (s.k * s.n * m > (int64_t)80e6) continue;
        check_case(f, s.n, s.k, s.gs, m, rng), ++cases;
      }
    // Large N: the superblock and K-chunk layouts (chunks of whole groups, groups split across
    // chunks, short last superblock and block), few rows of A to keep the reference affordable.
    const std::vector<Shape> large = {{2048 + 37, 1024, 1024}, {4096 + 16, 512, 128}, {8192 + 80, 256, 64},
                                      {2100, 2048, 2048}, {8192, 576, 192}, {4100, 1100, 1100}};
    for (const Shape& s : large)
      for (const int64_t m : {int64_t{1}, int64_t{2}, int64_t{5}}) check_case(f, s.n, s.k, s.gs, m, rng), ++cases;
    if (f != Format::kSherry) {  // geometries only tl2/i2s allow: odd K, odd and tiny groups
      const std::vector<Shape> odd = {{19, 1, 1}, {23, 7, 3}, {50, 333, 100}, {18, 99, 5}, {33, 577, 128},
                                      {20, 130, 1}, {65, 1001, 1001}, {16, 250, 31}};
      for (const Shape& s : odd)
        for (const int64_t m : {int64_t{1}, int64_t{3}, int64_t{7}, int64_t{40}}) check_case(f, s.n, s.k, s.gs, m, rng), ++cases;
    }
  }
  check_corrupt(rng);
  std::printf("check: %d cases, %d failure(s)\n", cases, failures);
}

// --- benchmark ----------------------------------------------------------------------------------

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Single-thread read bandwidth over `bytes` (cold: larger than every cache).
double probe_bandwidth(size_t bytes) {
  Buffer b = zeroed(bytes);
  std::memset(b.get(), 1, bytes);
  std::vector<double> gbps;
  for (int rep = 0; rep < 5; ++rep) {
    const double t0 = now_us();
    __m256i acc = _mm256_setzero_si256();
    for (size_t i = 0; i < bytes; i += 128) {
      acc = _mm256_add_epi64(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(b.get() + i)));
      acc = _mm256_add_epi64(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(b.get() + i + 32)));
      acc = _mm256_add_epi64(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(b.get() + i + 64)));
      acc = _mm256_add_epi64(acc, _mm256_load_si256(reinterpret_cast<const __m256i*>(b.get() + i + 96)));
    }
    const double t = now_us() - t0;
    volatile long long sink = _mm256_extract_epi64(acc, 0);
    (void)sink;
    gbps.push_back(bytes / t / 1e3);
  }
  return median(gbps);
}

// Bytes of weights (private layout: codes + scales) the kernel streams per call.
double weight_bytes(Format f, const Geometry& g) {
  return static_cast<double>(g.n) * (row_bytes(f, g.k, g.group_size) + 2 * g.groups());
}

// All kernels of one format and shape: copies[0] is the hot one; cold calls cycle through all.
struct Contender {
  Format format;
  Geometry g;
  std::vector<std::unique_ptr<MatMulKernel>> copies;
  size_t next = 0;
  std::vector<double> hot, cold;
};

// Per call: prepare every row of A, then compute all of N on this thread.
void call(const MatMulKernel& kernel, const Geometry& g, const float* x, int64_t m, uint8_t* ws, float* y) {
  const size_t stride = kernel.activation_row_bytes();
  for (int64_t r = 0; r < m; ++r) kernel.prepare_row(x + r * g.k, ws + r * stride);
  kernel.compute(ws, m, 0, g.n, nullptr, y);
}

std::vector<Format> bench_formats = {Format::kSherry, Format::kTL2, Format::kI2S};

void bench_shape(int64_t k, int64_t n, int64_t gs, int64_t m, double cold_bytes, int rounds, int hot_calls,
                 std::mt19937_64& rng) {
  std::vector<Contender> all;
  const std::vector<float> x = random_activations(m, k, k, rng);
  std::vector<float> y(static_cast<size_t>(m * n));
  size_t ws_bytes = 0;
  for (const Format f : bench_formats) {
    const Weights w = random_weights(f, n, k, gs, rng);
    Contender c{f, w.g, {}, 0, {}, {}};
    const int copies = std::max(2, static_cast<int>(cold_bytes / weight_bytes(f, w.g)));
    for (int i = 0; i < copies; ++i) c.copies.push_back(make_avx512_kernel(w.view()));
    ws_bytes = std::max(ws_bytes, c.copies[0]->activation_row_bytes() * static_cast<size_t>(m));
    all.push_back(std::move(c));
  }
  Buffer ws = zeroed(ws_bytes);
  // Calls alternate between the formats one by one: the machine is shared, and its load (CPU and
  // memory bandwidth) changes within milliseconds. Each call is timed on its own, so a call
  // preempted by another process is an outlier for the median, not a bias.
  auto timed = [&](const MatMulKernel& kernel, const Geometry& g) {
    const double t0 = now_us();
    call(kernel, g, x.data(), m, ws.get(), y.data());
    return now_us() - t0;
  };
  for (Contender& c : all) timed(*c.copies[0], c.g);
  for (int round = 0; round < rounds; ++round) {
    for (int i = 0; i < hot_calls; ++i)
      for (Contender& c : all) c.hot.push_back(timed(*c.copies[0], c.g));
    // Cold: each call reads a matrix last touched a whole sweep (> cold_bytes) ago.
    for (size_t i = 0; i < std::max<size_t>(all[0].copies.size() / 4, 2); ++i)
      for (Contender& c : all) {
        c.cold.push_back(timed(*c.copies[c.next], c.g));
        c.next = (c.next + 1) % c.copies.size();
      }
  }
  for (const Contender& c : all) {
    const double bytes = weight_bytes(c.format, c.g), hot = median(c.hot), cold = median(c.cold);
    const double hot_min = *std::min_element(c.hot.begin(), c.hot.end());
    std::printf("%-7s %5lld %5lld %4lld %4lld %10.1f %10.1f %9.2f %10.1f %9.2f\n", format_name(c.format), (long long)k,
                (long long)n, (long long)m, (long long)gs, hot, hot_min, bytes / hot / 1e3, cold, bytes / cold / 1e3);
  }
  std::fflush(stdout);
}

void run_bench(double cold_bytes, int rounds, int64_t gs, const std::vector<int64_t>& ms, int64_t only_k,
               int64_t only_n) {
  std::mt19937_64 rng(7);
  std::printf("read bandwidth probe (1 thread, %.1f GB): %.2f GB/s\n", cold_bytes / 1e9, probe_bandwidth(size_t(cold_bytes)));
  // Medians; the minimum of the hot calls too, since long calls on a busy machine are often
  // preempted (it is the better estimate of the uncontended time).
  std::printf("%-7s %5s %5s %4s %4s %10s %10s %9s %10s %9s\n", "format", "K", "N", "M", "gs", "hot us", "hot min",
              "hot GB/s", "cold us", "cold GB/s");
  std::vector<std::array<int64_t, 2>> shapes = {{2048, 2048}, {2048, 512}, {2048, 8192}, {8192, 2048}};
  if (only_k && only_n) shapes = {{only_k, only_n}};
  for (const int64_t m : ms)
    for (const auto& s : shapes) {
      if ((only_k && s[0] != only_k) || (only_n && s[1] != only_n)) continue;
      // Prefill is compute-bound: fewer calls, and the cold set only needs to exceed the caches.
      if (m == 1) bench_shape(s[0], s[1], gs, m, cold_bytes, rounds, 50, rng);
      else bench_shape(s[0], s[1], gs, m, std::min(cold_bytes, 2e8), std::max(3, rounds / 4), 5, rng);
    }
  std::printf("read bandwidth probe again: %.2f GB/s\n", probe_bandwidth(size_t(cold_bytes)));
}

}  // namespace
}  // namespace sherry

int main(int argc, char** argv) {
  bool check = false, bench = false;
  double cold_bytes = 1.6e9;
  int rounds = 20;
  int64_t gs = 128, only_k = 0, only_n = 0;
  std::vector<int64_t> ms = {1, 128};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "check") check = true;
    else if (a == "bench") bench = true;
    else if (a == "--cold-bytes" && i + 1 < argc) cold_bytes = std::atof(argv[++i]);
    else if (a == "--rounds" && i + 1 < argc) rounds = std::atoi(argv[++i]);
    else if (a == "--gs" && i + 1 < argc) gs = std::atoll(argv[++i]);
    else if (a == "--m" && i + 1 < argc) ms = {std::atoll(argv[++i])};
    else if (a == "--k" && i + 1 < argc) only_k = std::atoll(argv[++i]);
    else if (a == "--n" && i + 1 < argc) only_n = std::atoll(argv[++i]);
    else if (a == "--format" && i + 1 < argc) {
      const std::string f = argv[++i];
      sherry::bench_formats = {f == "sherry" ? sherry::Format::kSherry : f == "tl2" ? sherry::Format::kTL2 : sherry::Format::kI2S};
    }
    else {
      std::fprintf(stderr, "usage: %s [check] [bench] [--cold-bytes N] [--rounds N] [--gs N] [--m M] [--k K] [--n N] [--format F]\n", argv[0]);
      return 2;
    }
  }
  if (!check && !bench) check = true;
  if (check) sherry::run_checks();
  if (bench) sherry::run_bench(cold_bytes, std::max(rounds, 1), gs, ms, only_k, only_n);
  return sherry::failures ? 1 : 0;
}
