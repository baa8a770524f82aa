// AVX2 kernel for int8 weights (the LM head format), for CPUs without AVX-512 VNNI.
//
// A tile is 8 output rows, one per dword lane of a ymm; a quad is 4 columns of one scale group
// (int8_layout.h). The tile's 32 bytes for one quad hold, in lane r, row r's 4 weights as signed
// bytes. Without VNNI the product runs through vpmaddubsw, which takes one unsigned operand: the
// weights' signs move onto the activations (vpsignb) and their magnitudes become the unsigned side,
// so every pair sum is at most 2·127·127 = 32258 and the int16 step cannot saturate; vpmaddwd by 1
// then widens to int32. Exact per group; y += (α·s)·float(dot) in group order without FMA
// contraction, bit-identical to the scalar kernel.
//
// Private layout: tile after tile, each one forward stream of segments (Int8TileLayout: a few groups'
// float16 scales, 8 per group, then their quads of 32 bytes). Rows past N are padded with zero weights.
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
constexpr int kRowBlock = 4;  // rows of A that share one pass over a tile's weights

inline __m256i broadcast_dword(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// Keeps the product a rounded fp32 value of its own, so the compiler cannot fuse it with the add
// that follows into an FMA (the scalar kernel's rounding).
inline __m256 rounded(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// Σ w·x of 4 columns in each row's lane, added to `dot`.
inline __m256i dot_quad(__m256i dot, __m256i w, __m256i x) {
  const __m256i products = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(dot, _mm256_madd_epi16(products, _mm256_set1_epi16(1)));
}

class Int8Avx2Kernel final : public MatMulKernel {
 public:
  explicit Int8Avx2Kernel(const PackedWeights& w)
      : layout_(w.geometry),
        tiles_(ceil_div(w.geometry.n, kTileRows)),
        tile_layout_(layout_, kTileRows, 32),
        weights_(budgeted_lines(w)) {
    const Geometry& g = w.geometry;
    std::memset(weights_.data(), 0, weights_.size());
    const int64_t stride = row_bytes(w.format, g.k, g.group_size);
    std::vector<int8_t> values(static_cast<size_t>(g.k));
    for (int64_t n = 0; n < g.n; ++n) {  // padding rows stay zero: weight 0, scale 0
      uint8_t* tile = weights_.data() + static_cast<size_t>(n / kTileRows) * tile_layout_.tile_bytes();
      const int lane = static_cast<int>(n % kTileRows);
      if (!decode_row(w.format, w.data + n * stride, g.k, g.group_size, values.data()))
        throw std::runtime_error("corrupt int8 weights: row " + std::to_string(n) + " holds code 0 (-128)");
      for (int64_t group = 0; group < g.groups(); ++group) {
        for (int64_t q = 0; q < layout_.group_quads(group); ++q)
          for (int j = 0; j < 4; ++j)
            tile[tile_layout_.quad_offset(group, q) + 4 * lane + j] =
                static_cast<uint8_t>(layout_.weight(values.data(), group, q, j));
        const uint16_t scale = w.scales[n * g.groups() + group];
        std::memcpy(tile + tile_layout_.scales_offset(group) + 2 * lane, &scale, sizeof scale);
      }
    }
  }

  KernelPath path() const override { return KernelPath::kAVX2; }
  int64_t row_tile() const override { return kTileRows; }
  size_t activation_row_bytes() const override { return layout_.row_bytes(); }
  void prepare_row(const float* a_row, uint8_t* ws) const override { layout_.prepare_row(a_row, ws); }

  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override {
    for (int64_t t = n_begin / kTileRows; t * kTileRows < n_end; ++t) {
      int64_t r = 0;
      for (; r + kRowBlock <= m; r += kRowBlock) tile<kRowBlock>(ws, r, t, n_begin, n_end, bias, y);
      for (; r < m; ++r) tile<1>(ws, r, t, n_begin, n_end, bias, y);
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
  void tile(const uint8_t* ws, int64_t r, int64_t t, int64_t n_begin, int64_t n_end, const float* bias,
            float* y) const {
    const Geometry& g = layout_.geometry();
    const size_t stride = layout_.row_bytes();
    const uint8_t* tile = weights_.data() + static_cast<size_t>(t) * tile_layout_.tile_bytes();
    const int8_t* xq[R];
    const float* scale[R];
    __m256 acc[R];
    for (int i = 0; i < R; ++i) {
      const uint8_t* row = ws + (r + i) * stride;
      xq[i] = reinterpret_cast<const int8_t*>(row);
      scale[i] = reinterpret_cast<const float*>(row + layout_.scales_offset());
      acc[i] = _mm256_setzero_ps();
    }
    for (const Int8TileLayout::Segment& segment : tile_layout_.segments()) {
      Int8TileLayout::touch_scales(tile, segment);
      for (int64_t group = segment.first_group; group < segment.end_group; ++group) {
        const uint8_t* quads = tile + tile_layout_.quad_offset(group, 0);
        const int64_t q0 = layout_.first_quad(group), quads_in_group = layout_.group_quads(group);
        __m256i dot[R][2];
        for (int i = 0; i < R; ++i) dot[i][0] = dot[i][1] = _mm256_setzero_si256();
        int64_t q = 0;
        for (; q + 2 <= quads_in_group; q += 2) {
          const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(quads + q * 32));
          const __m256i w1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(quads + (q + 1) * 32));
          for (int i = 0; i < R; ++i) {
            dot[i][0] = dot_quad(dot[i][0], w0, broadcast_dword(xq[i] + 4 * (q0 + q)));
            dot[i][1] = dot_quad(dot[i][1], w1, broadcast_dword(xq[i] + 4 * (q0 + q + 1)));
          }
        }
        if (q < quads_in_group) {
          const __m256i w0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(quads + q * 32));
          for (int i = 0; i < R; ++i) dot[i][0] = dot_quad(dot[i][0], w0, broadcast_dword(xq[i] + 4 * (q0 + q)));
        }
        const __m256 a =
            _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tile + tile_layout_.scales_offset(group))));
        for (int i = 0; i < R; ++i) {
          const __m256 as = rounded(_mm256_mul_ps(a, _mm256_set1_ps(scale[i][group])));
          const __m256 term =
              rounded(_mm256_mul_ps(as, _mm256_cvtepi32_ps(_mm256_add_epi32(dot[i][0], dot[i][1]))));
          acc[i] = _mm256_add_ps(acc[i], term);
        }
      }
    }
    const int64_t lo = std::max(n_begin, t * kTileRows), hi = std::min(n_end, (t + 1) * kTileRows);
    for (int i = 0; i < R; ++i) {
      alignas(32) float out[kTileRows];
      _mm256_store_ps(out, acc[i]);
      float* y_row = y + (r + i) * g.n;
      for (int64_t n = lo; n < hi; ++n) y_row[n] = out[n - t * kTileRows] + (bias ? bias[n] : 0.f);
    }
  }

  Int8Layout layout_;
  int64_t tiles_;
  Int8TileLayout tile_layout_;
  WeightBuffer weights_;
};

}  // namespace

std::unique_ptr<MatMulKernel> make_int8_avx2_kernel(const PackedWeights& w, std::string* declined) {
  if (w.format != Format::kInt8) throw std::logic_error("make_int8_avx2_kernel takes int8 weights only");
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
    if (declined) *declined = "this CPU lacks avx2, fma or f16c";
    return nullptr;
  }
  return make_or_decline<Int8Avx2Kernel>(w, declined);
}

}  // namespace sherry
