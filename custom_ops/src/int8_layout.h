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

// Where a kernel tile's bytes go: one forward stream of segments, each the float16 scales of a few
// groups (2 bytes per row of the tile and group, padded to whole lines) followed by those groups' quads
// (quad_bytes each). The kernel touches a segment's scale lines into L1 as it enters the segment
// (touch_scales) and then reads its quads in order, each group's scales from L1.
//
// Why: at batch 1 the kernel is a pure stream, and the hardware prefetchers keep it at the memory's
// pace only while its other accesses hit L1. With a whole tile's scales behind its weights, read one
// group at a time as the weights streamed past, a microbenchmark of the AVX2 loop over 256 MiB read
// 13.7 GB/s on one Zen 4 core, against 33.9 GB/s with the scales first and touched (a plain read:
// 35 GB/s); touching them into L2 only (prefetcht1) was as slow as not at all, and prefetching the
// weights 2 KiB ahead, the earlier remedy, no longer helps. On LLaMA-3.2's 128256 x 2048 head
// (`sherry_kernel_check bench --formats int8 --shapes 2048x128256 --gs 32 --m 1`, Zen 4, 3 runs) the
// AVX2 kernel went from 19.1-20.0 ms to 8.9-9.3 ms and the AVX-512 kernel from 11.7-12.3 ms to
// 11.0-11.3 ms. A segment holds about kSegmentWeightBytes of weights (2 and 32 KiB were slower), so its
// scales stay in L1 until its last group even where a whole tile would not fit (16 rows x K = 2048 at
// AVX-512 are 34 KiB).
class Int8TileLayout {
 public:
  static constexpr size_t kSegmentWeightBytes = 8192;

  Int8TileLayout(const Int8Layout& layout, int64_t tile_rows, size_t quad_bytes)
      : quad_bytes_(quad_bytes), scales_offset_(static_cast<size_t>(layout.geometry().groups())),
        quads_offset_(static_cast<size_t>(layout.geometry().groups())) {
    const int64_t groups = layout.geometry().groups();
    size_t at = 0;
    for (int64_t first = 0; first < groups;) {
      int64_t end = first;
      size_t weights = 0;
      while (end < groups && (end == first || weights + quad_bytes * layout.group_quads(end) <= kSegmentWeightBytes))
        weights += quad_bytes * static_cast<size_t>(layout.group_quads(end++));
      const size_t scales = Int8Layout::round_up_64(2 * static_cast<size_t>(tile_rows * (end - first)));
      segments_.push_back({first, end, at, scales});
      for (int64_t group = first; group < end; ++group) {
        scales_offset_[group] = at + 2 * static_cast<size_t>(tile_rows * (group - first));
        quads_offset_[group] = at + scales + quad_bytes * static_cast<size_t>(layout.first_quad(group) -
                                                                               layout.first_quad(first));
      }
      at += scales + Int8Layout::round_up_64(weights);
      first = end;
    }
    tile_bytes_ = at;
  }

  struct Segment {
    int64_t first_group, end_group;
    size_t offset, scales_bytes;  // from the tile's start; the scales come first
  };

  size_t tile_bytes() const { return tile_bytes_; }
  const std::vector<Segment>& segments() const { return segments_; }
  // From the tile's start: the group's float16 scales (one per tile row), and its first quad.
  size_t scales_offset(int64_t group) const { return scales_offset_[group]; }
  size_t quad_offset(int64_t group, int64_t quad_in_group) const {
    return quads_offset_[group] + quad_bytes_ * static_cast<size_t>(quad_in_group);
  }

  static void touch_scales(const uint8_t* tile, const Segment& segment) {
    for (size_t line = 0; line < segment.scales_bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(tile + segment.offset + line), _MM_HINT_T0);
  }

 private:
  size_t quad_bytes_;
  std::vector<size_t> scales_offset_, quads_offset_;
  std::vector<Segment> segments_;
  size_t tile_bytes_ = 0;
};

}  // namespace sherry
