// AVX-512 VNNI kernel for int8 weights (the LM head format): memory-bound at batch 1, so the layout
// is one forward stream per tile and the arithmetic is one vpdpbusd per quad of a tile.
//
// "Rows in lanes", as the ternary kernels: a tile is 8 output rows, one per dword lane of a ymm; a quad
// is 4 columns of one scale group (int8_layout.h). The tile's 32 bytes for one quad hold, in lane r,
// row r's 4 codes as unsigned bytes w + 128 (the canonical code itself), so one vpdpbusd by the quad's
// 4 activation bytes broadcast adds Σ (w + 128)·xq to every row's lane, and the group's end takes
// 128·Σxq (from the prepared row) back out: exact int32, modulo 2^32 like the correction. Then
// y += (α·s)·float(dot) in group order without FMA contraction, bit-identical to the scalar kernel.
//
// Two ways through the same bytes (tiles come in pairs: row_tile() is 16 rows):
//   * one row of A (decode): tile after tile in 256-bit vectors (AVX512-VL). On LLaMA-3.2's 128256 x
//     2048 head (`sherry_kernel_check bench --formats int8 --shapes 2048x128256 --gs 32 --m 1`, Zen 4,
//     3 runs) this read the memory in 9.2-9.6 ms where 16-row tiles of 64-byte quads in zmm took
//     10.8-10.9 ms (same layout otherwise), though a microbenchmark of the bare zmm loop kept pace:
//     why the real zmm kernel lost the stream is not understood.
//   * more rows of A (prefill, compute-bound): a pair of tiles at once in 512-bit vectors, each quad
//     joined from the two tiles' 32 bytes. The 256-bit loop took 1.35-1.4x as long at 128 rows.
//
// Private layout: pairs of tiles; each tile one forward stream of segments (Int8TileLayout: a few
// groups' float16 scales, 8 per group, then their quads of 32 bytes). Rows past N are padded with
// zero weights.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's AVX-512 headers (see kernel_avx512.cc)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "int8_layout.h"
#include "kernel.h"
#include "weight_buffer.h"

namespace sherry {
namespace {

constexpr int kTileRows = 8;
constexpr int kRowBlock = 4;  // rows of A that share one pass over a pair of tiles' weights

inline int32_t activation_dword(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One tile in 256-bit vectors. The product and sum are kept apart (no FMA contraction: the scalar
// kernel's rounding) by the empty asm that makes each a value of its own.
struct OneTile {
  using Ints = __m256i;
  using Floats = __m256;
  static constexpr int kRows = kTileRows;
  static Ints zero() { return _mm256_setzero_si256(); }
  static Ints add_ints(Ints a, Ints b) { return _mm256_add_epi32(a, b); }  // int32 modulo 2^32, as the correction
  static Ints quad(const uint8_t* tile, const uint8_t* /*next*/, size_t at) {
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + at));
  }
  static Ints dot(Ints acc, Ints w, const int8_t* x) { return _mm256_dpbusd_epi32(acc, w, _mm256_set1_epi32(activation_dword(x))); }
  static Floats scales(const uint8_t* tile, const uint8_t* /*next*/, size_t at) {
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tile + at)));
  }
  static Floats group_term(Floats alpha, float s, Ints dot, int32_t correction) {
    Floats as = _mm256_mul_ps(alpha, _mm256_set1_ps(s));
    __asm__("" : "+x"(as));
    Floats term = _mm256_mul_ps(as, _mm256_cvtepi32_ps(_mm256_sub_epi32(dot, _mm256_set1_epi32(correction))));
    __asm__("" : "+x"(term));
    return term;
  }
  static Floats zero_floats() { return _mm256_setzero_ps(); }
  static Floats add(Floats a, Floats b) { return _mm256_add_ps(a, b); }
  static void store(float* y, const float* bias, unsigned keep, Floats acc) {
    const __mmask8 mask = static_cast<__mmask8>(keep);
    const Floats b = bias ? _mm256_maskz_loadu_ps(mask, bias) : _mm256_setzero_ps();
    _mm256_mask_storeu_ps(y, mask, _mm256_add_ps(acc, b));
  }
};

// A pair of tiles in 512-bit vectors: lanes 0-7 the first tile's rows, 8-15 the next tile's.
struct TilePair {
  using Ints = __m512i;
  using Floats = __m512;
  static constexpr int kRows = 2 * kTileRows;
  static Ints zero() { return _mm512_setzero_si512(); }
  static Ints add_ints(Ints a, Ints b) { return _mm512_add_epi32(a, b); }
  static Ints quad(const uint8_t* tile, const uint8_t* next, size_t at) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(OneTile::quad(tile, nullptr, at)), OneTile::quad(next, nullptr, at), 1);
  }
  static Ints dot(Ints acc, Ints w, const int8_t* x) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(activation_dword(x))); }
  static Floats scales(const uint8_t* tile, const uint8_t* next, size_t at) {
    const __m128i first = _mm_load_si128(reinterpret_cast<const __m128i*>(tile + at));
    const __m128i second = _mm_load_si128(reinterpret_cast<const __m128i*>(next + at));
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(first), second, 1));
  }
  // Explicit rounding mode: the compiler cannot contract these into an FMA.
  static Floats group_term(Floats alpha, float s, Ints dot, int32_t correction) {
    const Floats as = _mm512_maskz_mul_round_ps(0xFFFF, alpha, _mm512_set1_ps(s), _MM_FROUND_CUR_DIRECTION);
    const Floats exact = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot, _mm512_set1_epi32(correction)));
    return _mm512_maskz_mul_round_ps(0xFFFF, as, exact, _MM_FROUND_CUR_DIRECTION);
  }
  static Floats zero_floats() { return _mm512_setzero_ps(); }
  static Floats add(Floats a, Floats b) { return _mm512_maskz_add_round_ps(0xFFFF, a, b, _MM_FROUND_CUR_DIRECTION); }
  static void store(float* y, const float* bias, unsigned keep, Floats acc) {
    const __mmask16 mask = static_cast<__mmask16>(keep);
    const Floats b = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(y, mask, add(acc, b));
  }
};

class Int8Avx512Kernel final : public MatMulKernel {
 public:
  explicit Int8Avx512Kernel(const PackedWeights& w)
      : layout_(w.geometry),
        tiles_(2 * ceil_div(w.geometry.n, 2 * kTileRows)),
        tile_layout_(layout_, kTileRows, 32),
        weights_(budgeted_lines(w)) {
    const Geometry& g = w.geometry;
    std::memset(weights_.data(), 0, weights_.size());
    const int64_t stride = row_bytes(w.format, g.k, g.group_size);
    std::vector<int8_t> values(static_cast<size_t>(g.k));
    for (int64_t n = 0; n < tiles_ * kTileRows; ++n) {
      uint8_t* tile = weights_.data() + static_cast<size_t>(n / kTileRows) * tile_layout_.tile_bytes();
      const int lane = static_cast<int>(n % kTileRows);
      if (n >= g.n) {  // padding rows: weight 0 (code 128), scale 0
        for (int64_t group = 0; group < g.groups(); ++group)
          for (int64_t q = 0; q < layout_.group_quads(group); ++q)
            std::memset(tile + tile_layout_.quad_offset(group, q) + 4 * lane, 128, 4);
        continue;
      }
      if (!decode_row(w.format, w.data + n * stride, g.k, g.group_size, values.data()))
        throw std::runtime_error("corrupt int8 weights: row " + std::to_string(n) + " holds code 0 (-128)");
      for (int64_t group = 0; group < g.groups(); ++group) {
        for (int64_t q = 0; q < layout_.group_quads(group); ++q)
          for (int j = 0; j < 4; ++j)
            tile[tile_layout_.quad_offset(group, q) + 4 * lane + j] =
                static_cast<uint8_t>(layout_.weight(values.data(), group, q, j) + 128);
        const uint16_t scale = w.scales[n * g.groups() + group];
        std::memcpy(tile + tile_layout_.scales_offset(group) + 2 * lane, &scale, sizeof scale);
      }
    }
  }

  KernelPath path() const override { return KernelPath::kAVX512; }
  int64_t row_tile() const override { return 2 * kTileRows; }
  size_t activation_row_bytes() const override { return layout_.row_bytes(); }
  void prepare_row(const float* a_row, uint8_t* ws) const override { layout_.prepare_row(a_row, ws); }

  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override {
    for (int64_t t = n_begin / kTileRows / 2 * 2; t * kTileRows < n_end; t += 2) {
      if (m == 1) {
        pass<OneTile, 1>(ws, 0, t, n_begin, n_end, bias, y);
        pass<OneTile, 1>(ws, 0, t + 1, n_begin, n_end, bias, y);
        continue;
      }
      int64_t r = 0;
      for (; r + kRowBlock <= m; r += kRowBlock) pass<TilePair, kRowBlock>(ws, r, t, n_begin, n_end, bias, y);
      for (; r < m; ++r) pass<TilePair, 1>(ws, r, t, n_begin, n_end, bias, y);
    }
  }

 private:
  // The private weights' size in cache lines, after checking it against the memory budget (kernel.h).
  size_t budgeted_lines(const PackedWeights& w) const {
    const size_t bytes = static_cast<size_t>(tiles_) * tile_layout_.tile_bytes();
    check_memory_budget(w, static_cast<double>(bytes), static_cast<double>(layout_.row_bytes()));
    return bytes / sizeof(Line);
  }

  // Rows [r, r + R) of A against the V::kRows rows from tile t on, stored into y for those inside
  // [n_begin, n_end).
  template <class V, int R>
  void pass(const uint8_t* ws, int64_t r, int64_t t, int64_t n_begin, int64_t n_end, const float* bias,
            float* y) const {
    const int64_t lo = std::max(n_begin, t * kTileRows), hi = std::min(n_end, t * kTileRows + V::kRows);
    if (hi <= lo) return;
    const size_t stride = layout_.row_bytes();
    const uint8_t* tile = weights_.data() + static_cast<size_t>(t) * tile_layout_.tile_bytes();
    const uint8_t* next = tile + tile_layout_.tile_bytes();  // read only by TilePair
    const int8_t* xq[R];
    const float* scale[R];
    const int32_t* correction[R];
    typename V::Floats acc[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* row = ws + (r + i) * stride;
      xq[i] = reinterpret_cast<const int8_t*>(row);
      scale[i] = reinterpret_cast<const float*>(row + layout_.scales_offset());
      correction[i] = reinterpret_cast<const int32_t*>(row + layout_.corrections_offset());
      acc[i] = V::zero_floats();
    }
    for (const Int8TileLayout::Segment& segment : tile_layout_.segments()) {
      Int8TileLayout::touch_scales(tile, segment);
      if (V::kRows > kTileRows) Int8TileLayout::touch_scales(next, segment);
      for (int64_t group = segment.first_group; group < segment.end_group; ++group) {
        const size_t quads = tile_layout_.quad_offset(group, 0);
        const int64_t q0 = layout_.first_quad(group), quads_in_group = layout_.group_quads(group);
        typename V::Ints dot[R][2];
        for (int i = 0; i < R; ++i) dot[i][0] = dot[i][1] = V::zero();
        int64_t q = 0;
        for (; q + 2 <= quads_in_group; q += 2) {  // two chains per row: vpdpbusd's latency
          const auto w0 = V::quad(tile, next, quads + 32 * q), w1 = V::quad(tile, next, quads + 32 * (q + 1));
          for (int i = 0; i < R; ++i) {
            dot[i][0] = V::dot(dot[i][0], w0, xq[i] + 4 * (q0 + q));
            dot[i][1] = V::dot(dot[i][1], w1, xq[i] + 4 * (q0 + q + 1));
          }
        }
        if (q < quads_in_group) {
          const auto w0 = V::quad(tile, next, quads + 32 * q);
          for (int i = 0; i < R; ++i) dot[i][0] = V::dot(dot[i][0], w0, xq[i] + 4 * (q0 + q));
        }
        const auto alpha = V::scales(tile, next, tile_layout_.scales_offset(group));
        for (int i = 0; i < R; ++i) {
          const auto sum = V::add_ints(dot[i][0], dot[i][1]);
          acc[i] = V::add(acc[i], V::group_term(alpha, scale[i][group], sum, correction[i][group]));
        }
      }
    }
    const unsigned keep = ((1u << (hi - lo)) - 1) << (lo - t * kTileRows);
    for (int i = 0; i < R; ++i)
      V::store(y + (r + i) * layout_.geometry().n + t * kTileRows, bias ? bias + t * kTileRows : nullptr, keep, acc[i]);
  }

  Int8Layout layout_;
  int64_t tiles_;
  Int8TileLayout tile_layout_;
  WeightBuffer weights_;
};

}  // namespace

std::unique_ptr<MatMulKernel> make_int8_avx512_kernel(const PackedWeights& w, std::string* declined) {
  if (w.format != Format::kInt8) throw std::logic_error("make_int8_avx512_kernel takes int8 weights only");
  return make_or_decline<Int8Avx512Kernel>(w, declined);
}

}  // namespace sherry
