// The layout the SIMD int8 kernels (kernel_int8_avx2.cc, kernel_int8_avx512.cc) share: weights and
// activations cut into "quads" of 4 consecutive columns of one scale group, so that one 32-bit lane of
// a vector holds the 4 weights of one output row that a VNNI / maddubs instruction multiplies by 4
// activation bytes broadcast to every lane. Each scale group starts on a new quad; the lanes past a
// group's end are padding, with weight 0 and activation 0.
//
// A prepared activation row: the int8 activations of every quad (4 bytes each), then one float scale
// per group, then one int32 per group holding 128 x the sum of the group's activations (the AVX-512
// kernel multiplies the unsigned codes w + 128 and takes that back out). Scalar code, once per row:
// the head's matmul reads N x K weight bytes per row, against K floats here.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "formats.h"

namespace sherry {

// The int8 kernels stream their weights with software prefetches this many bytes ahead, into L2 (T1;
// the activations stay in L1). At batch 1 the kernel is a pure stream with little arithmetic per line,
// and the hardware prefetchers alone left it at about 60 % of the read-bandwidth probe on one Zen 4 core
// (LLaMA-3.2's 128256 x 2048 head, `sherry bench head --threads 1`, 3 interleaved runs each: 13.8-14.3 ms
// without, 12.2-12.4 ms with 2 KiB T1; 1 and 4 KiB T1, 2 KiB T0 and NTA, 4 KiB T2 and 8 KiB T1 were slower).
constexpr size_t kInt8PrefetchAhead = 2048;

inline void prefetch_int8_weights(const uint8_t* line) {
  _mm_prefetch(reinterpret_cast<const char*>(line + kInt8PrefetchAhead), _MM_HINT_T1);
}

class Int8Layout {
 public:
  explicit Int8Layout(const Geometry& g) : g_(g), first_quad_(static_cast<size_t>(g.groups()) + 1) {
    for (int64_t group = 0; group < g.groups(); ++group)
      first_quad_[group + 1] = first_quad_[group] + ceil_div(g.group_length(group), 4);
  }

  const Geometry& geometry() const { return g_; }
  int64_t quads() const { return first_quad_.back(); }
  int64_t first_quad(int64_t group) const { return first_quad_[group]; }
  int64_t group_quads(int64_t group) const { return first_quad_[group + 1] - first_quad_[group]; }

  size_t scales_offset() const { return round_up_64(4 * static_cast<size_t>(quads())); }
  size_t corrections_offset() const { return scales_offset() + round_up_64(4 * static_cast<size_t>(g_.groups())); }
  size_t row_bytes() const { return corrections_offset() + round_up_64(4 * static_cast<size_t>(g_.groups())); }

  // Quantize one row of A (docs/formats.md, "Activations") into `ws`, writing every byte compute reads.
  void prepare_row(const float* a_row, uint8_t* ws) const {
    auto* xq = reinterpret_cast<int8_t*>(ws);
    auto* scale = reinterpret_cast<float*>(ws + scales_offset());
    auto* correction = reinterpret_cast<int32_t*>(ws + corrections_offset());
    for (int64_t group = 0; group < g_.groups(); ++group) {
      int8_t* out = xq + 4 * first_quad_[group];
      const int64_t length = g_.group_length(group);
      scale[group] = quantize_group(a_row + g_.group_begin(group), length, out);
      std::memset(out + length, 0, static_cast<size_t>(4 * group_quads(group) - length));
      // 128 x sum(xq) reaches 128 x 127 x max_group_size(kInt8) = 2.16e9, past int32: the sum is formed
      // modulo 2^32 (unsigned), as the kernels' int32 dot products are, so the difference is exact.
      uint32_t sum = 0;
      for (int64_t i = 0; i < length; ++i) sum += static_cast<uint32_t>(static_cast<int32_t>(out[i]));
      const uint32_t scaled = sum << 7;
      std::memcpy(correction + group, &scaled, sizeof scaled);
    }
  }

  // The weight of row n at quad q, lane j (0 for padding lanes), from the decoded row `values` (K int8).
  int8_t weight(const int8_t* values, int64_t group, int64_t quad_in_group, int lane) const {
    const int64_t column = 4 * quad_in_group + lane;
    return column < g_.group_length(group) ? values[g_.group_begin(group) + column] : 0;
  }

  static size_t round_up_64(size_t bytes) { return (bytes + 63) / 64 * 64; }

 private:
  Geometry g_;
  std::vector<int64_t> first_quad_;  // quads before each group; the last entry is the total
};

}  // namespace sherry
