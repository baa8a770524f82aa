// AVX-512 VNNI kernel for int8 weights (the LM head format): memory-bound at batch 1, so the layout
// is one forward stream per work item and the arithmetic is one vpdpbusd per 64 weight bytes.
//
// "Rows in lanes", as the ternary kernels: a tile is 16 output rows, one per dword lane of a zmm; a
// quad is 4 columns of one scale group (int8_layout.h). The tile's 64 bytes for one quad hold, in
// lane r, row r's 4 codes as unsigned bytes w + 128 (the canonical code itself), so one vpdpbusd by
// the quad's 4 activation bytes broadcast adds Σ (w + 128)·xq to every row's lane, and the group's
// end takes 128·Σxq (from the prepared row) back out: exact int32, modulo 2^32 like the correction.
// Then y += (α·s)·float(dot) in group order without FMA contraction, bit-identical to the scalar kernel.
//
// Private layout: tile after tile, each one forward stream of segments (Int8TileLayout: a few groups'
// float16 scales, 16 per group, then their quads of 64 bytes). Rows past N are padded with zero weights.
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

constexpr int kTileRows = 16;
constexpr int kRowBlock = 4;  // rows of A that share one pass over a tile's weights

inline __m512i broadcast_dword(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// Multiply and add that the compiler may not contract into an FMA (the scalar kernel's rounding).
inline __m512 mul_exact(__m512 a, __m512 b) { return _mm512_maskz_mul_round_ps(0xFFFF, a, b, _MM_FROUND_CUR_DIRECTION); }
inline __m512 add_exact(__m512 a, __m512 b) { return _mm512_maskz_add_round_ps(0xFFFF, a, b, _MM_FROUND_CUR_DIRECTION); }

class Int8Avx512Kernel final : public MatMulKernel {
 public:
  explicit Int8Avx512Kernel(const PackedWeights& w)
      : layout_(w.geometry),
        tiles_(ceil_div(w.geometry.n, kTileRows)),
        tile_layout_(layout_, kTileRows, 64),
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
  int64_t row_tile() const override { return kTileRows; }
  size_t activation_row_bytes() const override { return layout_.row_bytes(); }
  void prepare_row(const float* a_row, uint8_t* ws) const override { layout_.prepare_row(a_row, ws); }

  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override {
    const int64_t n = layout_.geometry().n;
    for (int64_t t = n_begin / kTileRows; t * kTileRows < n_end; ++t) {
      int64_t r = 0;
      for (; r + kRowBlock <= m; r += kRowBlock) tile<kRowBlock>(ws, r, t, n_begin, n_end, bias, y, n);
      for (; r < m; ++r) tile<1>(ws, r, t, n_begin, n_end, bias, y, n);
    }
  }

 private:
  // The private weights' size in cache lines, after checking it against the memory budget (kernel.h).
  size_t budgeted_lines(const PackedWeights& w) const {
    const size_t bytes = static_cast<size_t>(tiles_) * tile_layout_.tile_bytes();
    check_memory_budget(w, static_cast<double>(bytes), static_cast<double>(layout_.row_bytes()));
    return bytes / sizeof(Line);
  }

  // Rows [r, r + R) of A against tile t, stored into y for the tile's rows inside [n_begin, n_end).
  template <int R>
  void tile(const uint8_t* ws, int64_t r, int64_t t, int64_t n_begin, int64_t n_end, const float* bias, float* y,
            int64_t n) const {
    const size_t stride = layout_.row_bytes();
    const uint8_t* tile = weights_.data() + static_cast<size_t>(t) * tile_layout_.tile_bytes();
    const int8_t* xq[R];
    const float* scale[R];
    const int32_t* correction[R];
    __m512 acc[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* row = ws + (r + i) * stride;
      xq[i] = reinterpret_cast<const int8_t*>(row);
      scale[i] = reinterpret_cast<const float*>(row + layout_.scales_offset());
      correction[i] = reinterpret_cast<const int32_t*>(row + layout_.corrections_offset());
      acc[i] = _mm512_setzero_ps();
    }
    for (const Int8TileLayout::Segment& segment : tile_layout_.segments()) {
      Int8TileLayout::touch_scales(tile, segment);
      for (int64_t group = segment.first_group; group < segment.end_group; ++group) {
        const uint8_t* quads = tile + tile_layout_.quad_offset(group, 0);
        const int64_t q0 = layout_.first_quad(group), quads_in_group = layout_.group_quads(group);
        __m512i dot[R][2];
        for (int i = 0; i < R; ++i) dot[i][0] = dot[i][1] = _mm512_setzero_si512();
        int64_t q = 0;
        for (; q + 2 <= quads_in_group; q += 2) {  // two chains per row: vpdpbusd's latency
          const __m512i w0 = _mm512_load_si512(quads + q * 64), w1 = _mm512_load_si512(quads + (q + 1) * 64);
          for (int i = 0; i < R; ++i) {
            dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], w0, broadcast_dword(xq[i] + 4 * (q0 + q)));
            dot[i][1] = _mm512_dpbusd_epi32(dot[i][1], w1, broadcast_dword(xq[i] + 4 * (q0 + q + 1)));
          }
        }
        if (q < quads_in_group) {
          const __m512i w0 = _mm512_load_si512(quads + q * 64);
          for (int i = 0; i < R; ++i)
            dot[i][0] = _mm512_dpbusd_epi32(dot[i][0], w0, broadcast_dword(xq[i] + 4 * (q0 + q)));
        }
        const __m512 a = _mm512_cvtph_ps(
            _mm256_load_si256(reinterpret_cast<const __m256i*>(tile + tile_layout_.scales_offset(group))));
        for (int i = 0; i < R; ++i) {
          const __m512i exact = _mm512_sub_epi32(_mm512_add_epi32(dot[i][0], dot[i][1]),
                                                 _mm512_set1_epi32(correction[i][group]));
          const __m512 as = mul_exact(a, _mm512_set1_ps(scale[i][group]));
          acc[i] = add_exact(acc[i], mul_exact(as, _mm512_cvtepi32_ps(exact)));
        }
      }
    }
    const int64_t lo = std::max(n_begin, t * kTileRows), hi = std::min(n_end, (t + 1) * kTileRows);
    const __mmask16 keep = static_cast<__mmask16>(((1u << (hi - lo)) - 1) << (lo - t * kTileRows));
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + t * kTileRows) : _mm512_setzero_ps();
    for (int i = 0; i < R; ++i)
      _mm512_mask_storeu_ps(y + (r + i) * n + t * kTileRows, keep, add_exact(acc[i], b));
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
