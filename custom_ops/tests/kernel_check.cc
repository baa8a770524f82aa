// Kernel check and benchmark: every SIMD path (avx2, avx512) x format (sherry, tl2, i2s) against
// the scalar kernel, which is itself checked against decode_row + quantize_group (formats.h), and,
// in a build with the TVM kernels (SHERRY_WITH_TVM), every linked TVM kernel on its own geometry.
// Built by CMake with -DSHERRY_BUILD_TESTS=ON (target sherry_kernel_check, ctest test
// kernel_check); `make ctest` runs it under ASan + UBSan (the TVM objects themselves are not
// instrumented; their wrapper, kernel_tvm.cc, is).
//
//   sherry_kernel_check [check]                       correctness (exit 1 on any failure)
//   sherry_kernel_check bench [options]               one-thread timings, candidates interleaved
//     --paths avx512,avx2[,tvm]  --formats sherry,tl2,i2s  --shapes 2048x2048,2048x512,...  --m 1,128
//     --cold-bytes 4e8  --rounds 10
//
// check: random canonical weights and scales over many geometries; rows of A split and N ranges
// tiled like the op does (and cut mid-tile), outputs 64-byte aligned and not. Outputs must equal the
// scalar kernel's bit for bit (every kernel adds the groups in order, without FMA contraction; the TVM
// kernels, whose LLVM contracts the group sum into FMAs, to float32 rounding); NaN outputs (from NaN/Inf
// activations) only need to be NaN in both. The workspace is filled with garbage before
// prepare_row, so a kernel that reads bytes prepare_row did not write fails (the padding contract
// of kernel.h). Corrupt codes must throw.
//
// bench: per call, prepare_row of every row of A and compute of all N on this thread (the op
// without its threads). Hot: the same weights every call. Cold: every call reads a matrix last
// touched more than --cold-bytes ago (per candidate; all candidates' copies are cycled in turn).
// The candidates take turns call by call and each call is timed alone, so the machine's changing
// load biases no candidate; medians. "prep" is prepare_row alone (the per-call fixed cost).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel.h"

#ifdef SHERRY_WITH_TVM
#include "dispatch.h"
#include "kernel_tvm_table.h"
#endif

namespace sherry {
namespace {

struct FreeBytes {
  void operator()(uint8_t* p) const noexcept { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t, FreeBytes>;

// A 64-byte aligned buffer filled with `fill` (garbage for workspaces, as the op gives them).
Buffer aligned_buffer(size_t bytes, uint8_t fill) {
  const size_t rounded = std::max<size_t>((bytes + 63) / 64 * 64, 64);
  Buffer b(static_cast<uint8_t*>(std::aligned_alloc(64, rounded)));
  if (!b) throw std::bad_alloc();
  std::memset(b.get(), fill, rounded);
  return b;
}

struct Path {
  const char* name;
  KernelPath path;
  std::unique_ptr<MatMulKernel> (*make)(const PackedWeights&, std::string* declined);
  bool supported;
};

std::vector<Path> simd_paths() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return {{"avx512", KernelPath::kAVX512, make_avx512_kernel, avx512},
          {"avx2", KernelPath::kAVX2, make_avx2_path_kernel, avx2}};
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
      case Format::kInt8:  // every valid code, the extremes ±127 more often
        for (int64_t i = 0; i < k; ++i) {
          const int pick = code32(rng);
          row[i] = static_cast<uint8_t>(pick == 0 ? 1 : pick == 1 ? 255 : 1 + code32(rng) * 8 + code32(rng) % 7);
        }
        break;
    }
  }
  // Positive normal halves over a wide range, a few subnormals, and some zero scales.
  std::uniform_int_distribution<int> half(0x1000, 0x4C00), kind(0, 40);
  w.scales.resize(static_cast<size_t>(n * w.g.groups()));
  for (auto& s : w.scales) {
    const int pick = kind(rng);
    s = pick == 0 ? 0 : pick == 1 ? static_cast<uint16_t>(1 + half(rng) % 0x3FF) : static_cast<uint16_t>(half(rng));
  }
  return w;
}

// Activations: mostly gaussian, with the awkward cases quantize_group must match byte for byte:
// an all-zero group, exact .5 ties after scaling, saturating equal magnitudes (table sums at their
// bounds), a single huge value, denormals, and (rarely) a NaN or an infinity, which must make the
// whole output row NaN.
std::vector<float> random_activations(int64_t m, int64_t k, int64_t gs, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(static_cast<size_t>(m * k));
  for (auto& v : x) v = normal(rng);
  std::uniform_int_distribution<int> pick(0, 11), rare(0, 199);
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
        case 3:  // tiny (down to denormal) values; m stays above 127/FLT_MAX
          for (int64_t i = 0; i < length; ++i) g[i] *= 1e-36f;
          g[0] = 1e-36f;
          break;
        case 4:  // every |x| equal: xq = ±127 everywhere
          for (int64_t i = 0; i < length; ++i) g[i] = g[i] < 0 ? -3.f : 3.f;
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

// The numerics of docs/formats.md straight from decode_row and quantize_group: what the scalar
// kernel must give.
std::vector<float> reference(const Weights& w, const std::vector<float>& x, int64_t m, const float* bias) {
  const Geometry& g = w.g;
  const int64_t stride = row_bytes(w.format, g.k, g.group_size);
  std::vector<int8_t> t(static_cast<size_t>(g.k)), xq(static_cast<size_t>(g.k));
  std::vector<float> s(static_cast<size_t>(g.groups())), y(static_cast<size_t>(m * g.n));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t gi = 0; gi < g.groups(); ++gi)
      s[gi] = quantize_group(x.data() + r * g.k + g.group_begin(gi), g.group_length(gi), xq.data() + g.group_begin(gi));
    for (int64_t n = 0; n < g.n; ++n) {
      if (!decode_row(w.format, w.data.data() + n * stride, g.k, g.group_size, t.data()))
        throw std::runtime_error("reference: invalid code");
      float acc = 0.f;
      for (int64_t gi = 0; gi < g.groups(); ++gi) {
        int32_t dot = 0;
        for (int64_t i = g.group_begin(gi), e = i + g.group_length(gi); i < e; ++i) dot += t[i] * xq[i];
        acc += (half_to_float(w.scales[n * g.groups() + gi]) * s[gi]) * static_cast<float>(dot);
      }
      y[r * g.n + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
  return y;
}

// An output of `count` floats filled with `fill`, at `shift` floats past a 64-byte boundary (0: aligned).
struct Output {
  Buffer buffer;
  float* data;
  Output(size_t count, float fill, int64_t shift)
      : buffer(aligned_buffer((count + static_cast<size_t>(shift)) * sizeof(float), 0)),
        data(reinterpret_cast<float*>(buffer.get()) + shift) {
    std::fill(data, data + count, fill);
  }
  std::vector<float> values(size_t count) const { return std::vector<float>(data, data + count); }
};

// The op's two phases on one thread over a garbage-filled workspace: prepare every row, then
// compute on items of `tiles_per_item` row tiles, over chunks of `row_chunk` rows of A, into an output
// `shift` floats past a 64-byte boundary.
std::vector<float> run_op(const MatMulKernel& kernel, const Geometry& g, const std::vector<float>& x, int64_t m,
                          const float* bias, int64_t tiles_per_item, int64_t row_chunk, uint8_t garbage,
                          int64_t shift = 0) {
  const size_t stride = kernel.activation_row_bytes_for(m);
  const Buffer ws = aligned_buffer(static_cast<size_t>(m) * stride, garbage);
  for (int64_t r = 0; r < m; ++r) kernel.prepare_row_for(x.data() + r * g.k, m, ws.get() + r * stride);
  const size_t count = static_cast<size_t>(m * g.n);
  const Output y(count, NAN, shift);
  const int64_t item = kernel.row_tile_for(m) * tiles_per_item;
  for (int64_t m0 = 0; m0 < m; m0 += row_chunk)
    for (int64_t n0 = 0; n0 < g.n; n0 += item)
      kernel.compute(ws.get() + m0 * stride, std::min(row_chunk, m - m0), n0, std::min(g.n, n0 + item), bias,
                     y.data + m0 * g.n);
  return y.values(count);
}

int failures = 0;

// How close a kernel must come to the scalar one: bit for bit, or (rounding > 0) within rounding x the
// largest finite |y| of the output row (of `row` values), the scale its group sums round at.
struct Tolerance {
  double rounding = 0;
  int64_t row = 1;
};

// Bit-identical, except that any NaN matches any NaN (payloads are not part of the numerics), or
// within `bound` when that is positive.
bool same(float a, float b, double bound = 0) {
  if ((std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0) return true;
  return bound > 0 && std::isfinite(a) && std::isfinite(b) && std::fabs(static_cast<double>(a) - b) <= bound;
}

// Reports the first difference; true when equal (see Tolerance).
bool expect_same(const std::vector<float>& got, const std::vector<float>& want, const std::string& what,
                 Tolerance tolerance = {}) {
  std::vector<double> bound(want.size() / static_cast<size_t>(tolerance.row) + 1, 0.0);
  if (tolerance.rounding > 0)
    for (size_t i = 0; i < want.size(); ++i)
      if (std::isfinite(want[i]))
        bound[i / tolerance.row] =
            std::max(bound[i / tolerance.row], tolerance.rounding * std::fabs(static_cast<double>(want[i])));
  for (size_t i = 0; i < got.size(); ++i) {
    if (same(got[i], want[i], bound[i / tolerance.row])) continue;
    std::printf("FAIL %s: y[%zu] = %.9g, want %.9g\n", what.c_str(), i, got[i], want[i]);
    ++failures;
    return false;
  }
  return true;
}

std::string describe(const char* path, Format f, int64_t n, int64_t k, int64_t gs, int64_t m) {
  char what[160];
  std::snprintf(what, sizeof what, "%s %s N=%lld K=%lld gs=%lld M=%lld", path, format_name(f), (long long)n,
                (long long)k, (long long)gs, (long long)m);
  return what;
}

// One geometry and M: scalar against the reference, every path against scalar, under the op's
// splits (whole ranges, one tile per item, several tiles and row chunks; outputs aligned and not) and
// a range cut mid-tile.
void check_case(const std::vector<Path>& paths, Format f, int64_t n, int64_t k, int64_t gs, int64_t m,
                std::mt19937_64& rng, bool against_reference, double rounding = 0) {
  const Weights w = random_weights(f, n, k, gs, rng);
  const std::vector<float> x = random_activations(m, k, gs, rng);
  std::vector<float> bias(static_cast<size_t>(n));
  for (auto& b : bias) b = std::normal_distribution<float>(0.f, 1.f)(rng);
  const float* b = rng() % 2 ? bias.data() : nullptr;
  const std::unique_ptr<MatMulKernel> scalar = make_scalar_kernel(w.view());
  const std::vector<float> expect = run_op(*scalar, w.g, x, m, b, 1 << 20, m, 0xA5);
  if (against_reference && !expect_same(expect, reference(w, x, m, b), describe("scalar", f, n, k, gs, m))) return;
  for (const Path& p : paths) {
    const std::string what = describe(p.name, f, n, k, gs, m);
    const std::unique_ptr<MatMulKernel> fast = p.make(w.view(), nullptr);
    if (!fast || fast->path() != p.path) {
      std::printf("FAIL %s: no %s kernel\n", what.c_str(), p.name);
      ++failures;
      continue;
    }
    struct Split {
      int64_t tiles, rows;
      uint8_t garbage;
      int64_t shift;  // of the output, in floats past a 64-byte boundary
    };
    const Tolerance tolerance{rounding, n};
    bool ok = true;
    for (const Split s : {Split{1 << 20, m, 0xFF, 0}, Split{1, m, 0x7F, 1},
                          Split{3, std::max<int64_t>(1, m / 3), 0x80, 0}, Split{2, 1, 0x01, 3}})
      ok = ok && expect_same(run_op(*fast, w.g, x, m, b, s.tiles, s.rows, s.garbage, s.shift), expect,
                             what + " split(tiles=" + std::to_string(s.tiles) + " rows=" + std::to_string(s.rows) +
                                 " shift=" + std::to_string(s.shift) + ")",
                             tolerance);
    if (!ok || n <= 20) continue;
    // A range that starts and ends inside tiles: rows outside it must stay untouched.
    const int64_t lo = 5, hi = n - 3;
    const size_t stride = fast->activation_row_bytes_for(m);
    const Buffer ws = aligned_buffer(static_cast<size_t>(m) * stride, 0x5A);
    for (int64_t r = 0; r < m; ++r) fast->prepare_row_for(x.data() + r * k, m, ws.get() + r * stride);
    const size_t count = static_cast<size_t>(m * n);
    const Output got(count, -7.f, 0);
    std::vector<float> want = expect;
    fast->compute(ws.get(), m, lo, hi, b, got.data);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c = 0; c < n; ++c)
        if (c < lo || c >= hi) want[r * n + c] = -7.f;
    expect_same(got.values(count), want, what + " range [5, N-3)", tolerance);
  }
}

void expect_throw(const Path& p, const char* what, const Weights& w) {
  try {
    p.make(w.view(), nullptr);
    std::printf("FAIL %s %s: no exception\n", p.name, what);
    ++failures;
  } catch (const std::runtime_error&) {
  }
}

void check_corrupt(const std::vector<Path>& paths, std::mt19937_64& rng) {
  const Weights tl2 = random_weights(Format::kTL2, 5, 70, 35, rng);  // 12 triples per group, last padded
  const int64_t tl2_stride = row_bytes(Format::kTL2, 70, 35), sign_byte = ceil_div(tl2_triples(70, 35), 2);
  Weights index14 = tl2, negative_zero = tl2, padding = tl2;
  index14.data[tl2_stride * 3 + 2] = 0xE0;
  negative_zero.data[0] &= 0xF0;  // code 0 -> negative zero
  negative_zero.data[sign_byte] |= 1;
  padding.data[5] = static_cast<uint8_t>((padding.data[5] & 0x0F) | 1 << 4);  // triple 11 = cols 33, 34, pad: +1
  Weights i2s = random_weights(Format::kI2S, 3, 33, 33, rng);
  i2s.data[row_bytes(Format::kI2S, 33, 33) + 4] |= 0x30;  // code 3
  Weights int8 = random_weights(Format::kInt8, 20, 70, 32, rng);
  int8.data[70 * 17 + 69] = 0;  // code 0 = -128
  const Path scalar{"scalar", KernelPath::kScalar,
                    [](const PackedWeights& w, std::string*) { return make_scalar_kernel(w); }, true};
  std::vector<Path> all = {scalar};
  for (const Path& p : paths) all.push_back({p.name, p.path, p.make, p.supported});
  for (const Path& p : all) {
    expect_throw(p, "tl2 index 14", index14);
    expect_throw(p, "tl2 negative zero", negative_zero);
    expect_throw(p, "tl2 nonzero padding lane", padding);
    expect_throw(p, "i2s code 3", i2s);
    expect_throw(p, "int8 code 0", int8);
  }
}

// N rows of K weights, all +max_weight (sherry: lane 3 of every block is the zero), one scale group
// of scale 1: with all activations equal, a row's dot product is 127 x max_weight x its non-zero
// weights, the largest a group of that length can give. K a multiple of 12.
Weights extreme_weights(Format f, int64_t n, int64_t k) {
  Weights w{f, {n, k, k}, {}, {}};
  const int64_t stride = row_bytes(f, k, k), codes = codes_per_row(f, k, k);
  // i2s code 2 = +1, int8 code 255 = +127
  w.data.assign(static_cast<size_t>(n * stride), f == Format::kI2S ? 0xAA : f == Format::kInt8 ? 0xFF : 0);
  if (f == Format::kSherry || f == Format::kTL2)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < codes; ++c)  // sherry index 12: zero at lane 3, no sign flips; tl2 v = 13
        put_code5(w.data.data() + r * stride, codes, c, f == Format::kSherry ? 12 : 13);
  w.scales.assign(static_cast<size_t>(n), 0x3C00);  // 1.0
  return w;
}

// The longest scale groups at their extremes. At max_group_size (the spec's bound) the exact dot
// product is within 127 x max_weight of INT32_MAX: the scalar kernel and every SIMD path that takes
// the weights (their memory budget may send one row of it to scalar) must give it. At 540,000
// columns (ternary) every SIMD path must take them: past 528,416 columns the AVX-512 i2s planes
// would overflow int32 unless folded. int8's bound is 133,144 columns, where the AVX-512 kernel's
// unsigned codes w + 128 take its sums past 2^32 (they wrap, and the correction brings them back).
void check_extreme_groups(const std::vector<Path>& paths) {
  for (const FormatTraits& t : kFormats) {
    const Format f = t.id;
    const int64_t longest = max_group_size(f) / 12 * 12;
    for (const auto& [n, k] : {std::pair<int64_t, int64_t>{32, std::min<int64_t>(540'000, longest)}, {1, longest}}) {
      const Weights w = extreme_weights(f, n, k);
      const std::vector<float> x(static_cast<size_t>(k), 1.f);
      const int64_t nonzero = f == Format::kSherry ? k / 4 * 3 : k;
      const float s = 1.f / static_cast<float>(kActivationQmax);
      const std::vector<float> want(static_cast<size_t>(n),
                                    (1.f * s) * static_cast<float>(nonzero * kActivationQmax * t.max_weight));
      const std::vector<float> scalar = run_op(*make_scalar_kernel(w.view()), w.g, x, 1, nullptr, 1 << 20, 1, 0x33);
      expect_same(scalar, want, describe("scalar", f, n, k, k, 1) + " extreme group");
      for (const Path& p : paths) {
        std::string declined;
        const std::unique_ptr<MatMulKernel> fast = p.make(w.view(), &declined);
        if (!fast && n == 1) continue;  // over its memory budget: auto runs scalar
        if (!fast) {
          std::printf("FAIL %s extreme group: declined (%s)\n", describe(p.name, f, n, k, k, 1).c_str(),
                      declined.c_str());
          ++failures;
          continue;
        }
        expect_same(run_op(*fast, w.g, x, 1, nullptr, 1 << 20, 1, 0x33), want,
                    describe(p.name, f, n, k, k, 1) + " extreme group");
        if (n == 1) continue;
        // The prefill paths (AVX-512 planes, AVX2 GEMM) on the same rows: their unsigned w + 1 sums
        // pass 2^31 and wrap, and the -Σxq correction brings them back.
        constexpr int64_t kRows = 33;
        std::vector<float> rows, want_rows;
        for (int64_t r = 0; r < kRows; ++r) {
          rows.insert(rows.end(), x.begin(), x.end());
          want_rows.insert(want_rows.end(), want.begin(), want.end());
        }
        expect_same(run_op(*fast, w.g, rows, kRows, nullptr, 1 << 20, kRows, 0x33), want_rows,
                    describe(p.name, f, n, k, k, kRows) + " extreme group");
      }
    }
  }
}

// Every TVM kernel the library links (tvm_table.cc, from tvm_schedules/databases) that this CPU can
// run, on its own geometry (the only one it takes), each target in turn (SHERRY_TVM_TARGET), bit-identical
// to the scalar kernel; block_rows + 1 rows of A take a single block and the M = 1 function, and
// chunk_rows + block_rows + 3 the block function, a single block and the M = 1 function.
int check_tvm(std::mt19937_64& rng) {
  int cases = 0;
#ifdef SHERRY_WITH_TVM
  const std::vector<Path> tvm = {{"tvm", KernelPath::kTVM, make_tvm_kernel, true}};
  for (size_t i = 0; i < kTvmEntryCount; ++i) {
    const TvmEntry& e = kTvmEntries[i];
    const KernelPath isa = static_cast<KernelPath>(e.isa);
    if (!missing_cpu_features(isa).empty()) {
      std::printf("skip tvm %s kernel %zu: this CPU lacks %s\n", e.target, i, path_name(isa));
      continue;
    }
    setenv("SHERRY_TVM_TARGET", e.target, 1);
    for (const int64_t m : {int64_t{1}, int64_t{3}, e.block_rows + 1, e.chunk_rows + e.block_rows + 3}) {
      check_case(tvm, static_cast<Format>(e.format), e.n, e.k, e.group_size, m, rng, false);
      ++cases;
    }
    unsetenv("SHERRY_TVM_TARGET");
  }
#else
  (void)rng;
  std::printf("skip tvm: built without the TVM kernels\n");
#endif
  return cases;
}

int run_checks() {
  std::vector<Path> paths;
  for (Path& p : simd_paths()) {
    if (p.supported) paths.push_back(std::move(p));
    else std::printf("skip %s: this CPU lacks it\n", p.name);
  }
  std::mt19937_64 rng(12345);
  int cases = 0;
  struct Shape {
    int64_t n, k, gs;
  };
  const std::vector<Shape> shapes = {
      {64, 256, 128}, {48, 512, 32}, {37, 2048, 128}, {100, 1024, 64}, {33, 576, 128}, {17, 256, 256},
      {70, 300, 300}, {16, 4, 4},    {21, 60, 12},    {40, 520, 40},   {1, 128, 128},  {130, 4096, 128},
      {31, 8192, 8192}, {64, 48, 16}, {9, 2052, 128}, {80, 1000, 200},
  };
  // Large N: the tiled and chunked weight layouts (chunks of whole groups, groups split across
  // chunks, short last tiles), few rows of A to keep the reference affordable.
  const std::vector<Shape> large = {{2048 + 37, 1024, 1024}, {4096 + 16, 512, 128}, {8192 + 80, 256, 64},
                                    {2100, 2048, 2048},      {8192, 576, 192},      {4100, 1100, 1100}};
  // Geometries only formats without a K or group multiple (tl2, i2s) allow: odd K, odd and tiny groups.
  const std::vector<Shape> odd = {{19, 1, 1},   {23, 7, 3},  {50, 333, 100},    {18, 99, 5},
                                  {33, 577, 128}, {20, 130, 1}, {65, 1001, 1001}, {16, 250, 31}};
  // Prefill row counts (the plane path of the AVX-512 kernels, the AVX2 GEMM) on the chunked layouts
  // and awkward geometries: K tails, tiny and split groups, N not a multiple of any tile; odd row
  // counts leave short micro-kernel calls.
  const std::vector<Shape> prefill = {{2048 + 37, 1024, 1024}, {4096 + 16, 512, 128}, {2100, 2048, 2048},
                                      {8192 + 80, 256, 64},    {200, 2052, 8},        {77, 4100, 100},
                                      {130, 1100, 1100}};
  const std::vector<Shape> odd_prefill = {{50, 333, 100}, {20, 130, 1}, {65, 1001, 1001}, {131, 577, 128}};
  const std::vector<int64_t> ms = {1, 2, 3, 4, 5, 8, 13, 64, 128}, few = {1, 2, 5}, odd_ms = {1, 3, 7, 9, 40},
                             prefill_ms = {17, 35}, odd_prefill_ms = {11, 66};
  for (const FormatTraits& t : kFormats) {
    const Format f = t.id;
    auto run = [&](const std::vector<Shape>& list, const std::vector<int64_t>& rows, int64_t max_cost = 40'000'000) {
      for (const Shape& s : list)
        for (const int64_t m : rows) {
          if (s.k * s.n * m > max_cost) continue;
          // The slow reference only on small cases: the scalar kernel is the same loop.
          check_case(paths, f, s.n, s.k, s.gs, m, rng, s.k * s.n * m <= int64_t{2'000'000}), ++cases;
        }
    };
    run(shapes, ms);
    run(large, few);
    run(prefill, prefill_ms, 80'000'000);
    if (t.k_multiple == 1 && t.group_multiple == 1) {
      run(odd, odd_ms);
      run(odd_prefill, odd_prefill_ms);
    }
  }
  check_corrupt(paths, rng);
  check_extreme_groups(paths);
  const int tvm_cases = check_tvm(rng);
  std::printf("check: %d cases x %zu SIMD path(s), %d TVM kernel cases, %d failure(s)\n", cases, paths.size(),
              tvm_cases, failures);
  return failures ? 1 : 0;
}

// --- benchmark ----------------------------------------------------------------------------------

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Single-thread read bandwidth over `bytes` (larger than every cache).
double probe_bandwidth(size_t bytes) {
  const Buffer b = aligned_buffer(bytes, 1);
  const auto* words = reinterpret_cast<const uint64_t*>(b.get());
  std::vector<double> gbps;
  for (int rep = 0; rep < 3; ++rep) {
    const double t0 = now_us();
    uint64_t acc[8] = {};
    for (size_t i = 0; i + 8 <= bytes / 8; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += words[i + j];
    const double t = now_us() - t0;
    volatile uint64_t sink = acc[0] + acc[7];
    (void)sink;
    gbps.push_back(static_cast<double>(bytes) / t / 1e3);
  }
  return median(gbps);
}

// Canonical bytes (codes + float16 scales) of one matrix: what a call must read at least.
double weight_bytes(Format f, const Geometry& g) {
  return static_cast<double>(g.n) * static_cast<double>(row_bytes(f, g.k, g.group_size) + 2 * g.groups());
}

// One path and format on one shape: copies[0] is the hot one; cold calls cycle through all.
struct Contender {
  std::string label;
  Format format;
  std::vector<std::unique_ptr<MatMulKernel>> copies;
  size_t next = 0;
  std::vector<double> hot, cold, prep;
};

std::vector<Format> all_formats() {
  std::vector<Format> out;
  for (const FormatTraits& t : kFormats) out.push_back(t.id);
  return out;
}

struct BenchOptions {
  std::vector<std::string> paths = {"avx512", "avx2"};
  std::vector<Format> formats = all_formats();
  std::vector<std::pair<int64_t, int64_t>> shapes = {{2048, 2048}, {2048, 512}, {2048, 8192}, {8192, 2048}};
  std::vector<int64_t> ms = {1, 128};
  double cold_bytes = 4e8;
  int rounds = 10;
  int64_t gs = 128;
};

void bench_shape(const BenchOptions& o, const std::vector<Path>& paths, int64_t k, int64_t n, int64_t m,
                 std::mt19937_64& rng) {
  const bool prefill = m > 4;  // compute-bound: hot only, fewer calls
  std::vector<Contender> all;
  const std::vector<float> x = random_activations(m, k, k, rng);
  const Output y(static_cast<size_t>(m * n), 0.f, 0);  // 64-byte aligned, as onnxruntime's outputs
  size_t ws_bytes = 0;
  for (const Format f : o.formats) {
    const Weights w = random_weights(f, n, k, o.gs, rng);
    const int copies = prefill ? 1 : std::max(2, static_cast<int>(o.cold_bytes / weight_bytes(f, w.g)));
    for (const Path& p : paths) {
      Contender c{std::string(format_name(f)) + "[" + p.name + "]", f, {}, 0, {}, {}, {}};
      for (int i = 0; i < copies; ++i) c.copies.push_back(p.make(w.view(), nullptr));
      if (!c.copies[0]) {
        std::printf("skip %s: the %s path declines K=%lld N=%lld\n", c.label.c_str(), p.name, static_cast<long long>(k),
                    static_cast<long long>(n));
        continue;
      }
      ws_bytes = std::max(ws_bytes, c.copies[0]->activation_row_bytes_for(m) * static_cast<size_t>(m));
      all.push_back(std::move(c));
    }
  }
  const Buffer ws = aligned_buffer(ws_bytes, 0xA5);
  auto prepare = [&](const MatMulKernel& kernel) {
    const size_t stride = kernel.activation_row_bytes_for(m);
    for (int64_t r = 0; r < m; ++r) kernel.prepare_row_for(x.data() + r * k, m, ws.get() + r * stride);
  };
  auto timed = [&](const MatMulKernel& kernel) {
    const double t0 = now_us();
    prepare(kernel);
    kernel.compute(ws.get(), m, 0, n, nullptr, y.data);
    return now_us() - t0;
  };
  for (Contender& c : all) timed(*c.copies[0]);
  const int hot_calls = prefill ? 2 : 20;
  for (int round = 0; round < o.rounds; ++round) {
    for (int i = 0; i < hot_calls; ++i)
      for (Contender& c : all) {
        c.hot.push_back(timed(*c.copies[0]));
        const double t0 = now_us();
        prepare(*c.copies[0]);
        c.prep.push_back(now_us() - t0);
      }
    if (prefill) continue;
    for (size_t i = 0; i < std::max<size_t>(all[0].copies.size() / 8, 2); ++i)
      for (Contender& c : all) {
        c.cold.push_back(timed(*c.copies[c.next]));
        c.next = (c.next + 1) % c.copies.size();
      }
  }
  auto find = [&](const std::string& label) -> const Contender* {
    for (const Contender& c : all)
      if (c.label == label) return &c;
    return nullptr;
  };
  for (const Contender& c : all) {
    const double bytes = weight_bytes(c.format, Geometry{n, k, o.gs}), hot = median(c.hot), cold = median(c.cold);
    std::printf("%-15s %5lld %5lld %4lld %9.1f %9.1f %9.2f %7.2f %9.1f %7.2f", c.label.c_str(), (long long)k,
                (long long)n, (long long)m, hot, *std::min_element(c.hot.begin(), c.hot.end()), median(c.prep),
                bytes / hot / 1e3, cold, bytes / cold / 1e3);
    // Speed-ups of sherry over the other formats on the same path, hot / cold.
    if (c.format == Format::kSherry) {
      const std::string path = c.label.substr(c.label.find('['));
      for (const char* other : {"i2s", "tl2"})
        if (const Contender* d = find(other + path))
          std::printf("  %s/sherry %.3f/%.3f", other, median(d->hot) / hot, median(d->cold) / cold);
    }
    std::printf("\n");
  }
  std::fflush(stdout);
}

template <class T>
std::vector<T> parse_list(const std::string& text, const std::function<T(const std::string&)>& parse) {
  std::vector<T> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) out.push_back(parse(item));
  return out;
}

int run_bench(const BenchOptions& o) {
  std::vector<Path> paths;
  for (const std::string& name : o.paths) {
    for (Path& p : simd_paths())
      if (name == p.name && p.supported) paths.push_back(std::move(p));
#ifdef SHERRY_WITH_TVM
    if (name == "tvm") paths.push_back({"tvm", KernelPath::kTVM, make_tvm_kernel, true});  // linked shapes only
#endif
  }
  if (paths.empty()) {
    std::printf("bench: none of the requested paths runs on this CPU\n");
    return 1;
  }
  std::mt19937_64 rng(7);
  std::printf("read bandwidth probe (1 thread, %.2f GB): %.2f GB/s\n", o.cold_bytes / 1e9,
              probe_bandwidth(static_cast<size_t>(o.cold_bytes)));
  std::printf("%-15s %5s %5s %4s %9s %9s %9s %7s %9s %7s  (µs per call; GB/s of canonical weight bytes)\n", "kernel",
              "K", "N", "M", "hot", "hot min", "prep", "GB/s", "cold", "GB/s");
  for (const int64_t m : o.ms)
    for (const auto& [k, n] : o.shapes) bench_shape(o, paths, k, n, m, rng);
  return 0;
}

}  // namespace
}  // namespace sherry

int main(int argc, char** argv) {
  using namespace sherry;
  const std::string usage = std::string("usage: ") + argv[0] +
                            " [check] | bench [--paths avx512,avx2] [--formats sherry,tl2,i2s] [--shapes KxN,...]"
                            " [--m 1,128] [--cold-bytes 4e8] [--rounds 10] [--gs 128]\n";
  const std::string mode = argc > 1 ? argv[1] : "check";
  if (mode == "check" && argc <= 2) return run_checks();
  if (mode != "bench") {
    std::fputs(usage.c_str(), stderr);
    return 2;
  }
  BenchOptions o;
  try {
    for (int i = 2; i < argc; ++i) {
      const std::string a = argv[i];
      if (i + 1 >= argc) throw std::invalid_argument(a);
      const std::string v = argv[++i];
      if (a == "--paths") o.paths = parse_list<std::string>(v, [](const std::string& s) { return s; });
      else if (a == "--formats")
        o.formats = parse_list<Format>(v, [](const std::string& s) {
          for (const FormatTraits& t : kFormats)
            if (s == t.name) return t.id;
          throw std::invalid_argument(s);
        });
      else if (a == "--shapes")
        o.shapes = parse_list<std::pair<int64_t, int64_t>>(v, [](const std::string& s) {
          const size_t x = s.find('x');
          if (x == std::string::npos) throw std::invalid_argument(s);
          return std::pair<int64_t, int64_t>{std::stoll(s.substr(0, x)), std::stoll(s.substr(x + 1))};
        });
      else if (a == "--m") o.ms = parse_list<int64_t>(v, [](const std::string& s) { return std::stoll(s); });
      else if (a == "--cold-bytes") o.cold_bytes = std::stod(v);
      else if (a == "--rounds") o.rounds = std::max(1, std::stoi(v));
      else if (a == "--gs") o.gs = std::stoll(v);
      else throw std::invalid_argument(a);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bad argument %s\n%s", e.what(), usage.c_str());
    return 2;
  }
  return run_bench(o);
}
