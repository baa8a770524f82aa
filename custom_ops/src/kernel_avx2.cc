// AVX2 kernels for sherry, tl2 and i2s (compiled with -mavx2 -mfma -mf16c, never AVX-512).
//
// Each factory repacks the canonical rows once into a private, tile-major stream: 32 weight rows
// per tile and, inside a tile, per scale group, the 32 fp16 scales followed by that group's codes.
// A tile is one contiguous run of bytes, so one software-prefetch pointer covers a work item.
//   * sherry, tl2: chunks of up to 16 units (blocks of 4, resp. triples), each two sign vectors and
//     one nibble vector per unit pair, laid out for the lookup (see lut_chunk): one 32-byte pshufb
//     looks up a unit pair for 16 rows (even unit in the low lane, odd in the high lane). 5 bits per
//     unit, as canonical.
//   * i2s: per 16 weights 4 vectors of 8 rows x 16 two-bit codes (w+1), arranged so that plane t
//     ((byte >> 2t) & 3) is 8 dwords of 4 consecutive weights.
//
// Activations live in a "lane space": every scale group is padded with zero lanes to a whole number
// of units (sherry: 2 blocks of 4, tl2: 4 triples, i2s: 16 weights). Padding units hold zero codes
// and meet zero activations, so K tails, short last groups and group_size = K run the same loops.
//
// Paths (chosen per call in compute()):
//   * GEMV, sherry and tl2: activation lookup tables with pshufb, as in the Sherry paper and
//     bitnet.cpp TL2. Per unit, prepare_row() builds the 16 sums S[index] = pattern[index] . x.
//     |S| <= 381 needs int16, so S is split exactly into two int8 tables, S = 31*U + V with
//     |U| <= 12 and |V| <= 15, stored per unit pair so that a plain 32-byte load holds a pair's
//     table (a 128-bit broadcast load would cost a shuffle uop on Zen 2/3). Per unit pair and
//     16-row half: one pshufb each for U and V, psignb applies the units' signs (operands made by
//     doubling the sign bytes, one byte add each), an add each into int8 accumulators that sum 8
//     units per byte; per 16-unit chunk one maddubs with (1, 31) per 8 rows widens V + 31*U to
//     int16 (int32 every 64 units). About 73 vector ops per 8 units x 32 rows (0.071 per weight):
//     6 per unit for the lookups, the rest for indices, signs and widening. Exact: no lossy int8
//     table anywhere.
//   * GEMV, i2s: 2-bit codes (w+1) with maddubs against broadcast activation dwords, 8 rows per
//     register (so a group ends with vertical ops, not horizontal sums), and the -sum(xq)
//     correction per group.
//   * GEMM (from kGemmMinRows* rows of A in the call), all formats: each group of a tile is decoded
//     once to int8 (w+1) dwords in L1, then a maddubs micro-kernel (6 rows of A x 16 rows of W,
//     int16 accumulation) runs over all rows of A. prepare_row_for() builds no lookup tables for a
//     call that takes it, and marks the rows so; compute() follows the mark, since the op may hand
//     it a chunk of fewer rows than the call has.
// Every path computes exact int32 dot products per group and y = sum_g (alpha_g * s_g) * dot_g in
// group order with each product rounded on its own, as the scalar kernel does, so the outputs are
// bit-identical to it.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernel.h"
#include "weight_buffer.h"

namespace sherry {
namespace {

constexpr int64_t kTileRows = 32;        // weight rows per tile: two 16-row halves of lookups
constexpr int64_t kRowTile = 64;         // rows per compute() work item: 2 tiles
constexpr int64_t kChunkUnits = 16;      // LUT units sharing two sign vectors and one int8 accumulation
constexpr int64_t kChunkSignBytes = 64;  // the two sign vectors of a chunk
constexpr int64_t kSegmentUnits = 64;    // LUT units per int16 accumulation: 64 * 381 < 32767
constexpr int64_t kI2SUnitLanes = 16;    // i2s unit: 16 weights x 8 rows in one 32-byte vector
constexpr int64_t kI2SSegmentUnits = 16;  // i2s int16 bound: 16 units * 4 planes * 508 <= 32512
constexpr int64_t kGemmSegmentSteps = 64;  // GEMM int16 bound: 64 * 508 <= 32512
// From this many rows of A on, decode + GEMM beats the lookup tables (crossovers measured at group
// 128, 1 thread, Zen 4). Sherry's lookups take 4 rows of A per pass (lut_rows_chunk: about 7.4
// vector ops per 32 rows x 4 weights and row of A, plus the tables of prepare_row, 0.6 us per row at
// K = 2048), the maddubs GEMM about 9 plus its per-group float work and the decode: at 16 rows of A
// the lookups were 10-12% faster on 2048x512, 2048x2048 and 8192x2048, at 64 and 128 rows within
// -2..+4% of the GEMM. tl2 (3 weights per lookup) gains from the GEMM from about 12 rows; i2s from 6.
constexpr int64_t kGemmMinRowsSherry = 64;
constexpr int64_t kGemmMinRowsTL2 = 12;
constexpr int64_t kGemmMinRowsI2S = 6;
// The fewest rows of A a GEMM compute() call should get (min_row_chunk): each call decodes its tiles
// once. Through onnxruntime at 128 rows, 1 thread (Zen 4): 2048->512 ran 5-8% faster in chunks of
// 64 or 128 rows than in chunks of 32; 8192->2048 3-4% slower in chunks of 128 (128 rows of xq at
// K = 8192 outgrow L2), the other shapes within the noise.
constexpr int64_t kGemmMinChunk = 64;
constexpr int kLutRows = 4;              // rows of A per lookup pass: 8 int8 accumulators + 6 shared
constexpr int kGemmRows = 6;             // rows of A per micro-kernel: 12 accumulators + 2 weights + 1 broadcast
constexpr int64_t kAlphaBytes = kTileRows * 2;  // 32 fp16 scales per tile and group
constexpr int64_t kPanelStepBytes = kTileRows * 4;  // one decoded k4 step of a tile: 32 rows x 4 lanes
constexpr size_t kPrefetchAhead = 4096;  // best of 2, 4, 8, 16 KB for cold GEMVs on this machine

// The LUT split S = 31*U + V: U = round(S/31) through mulhrs (1057 = round(32768/31); the error is far
// from any rounding tie for |S| <= 384), V = S - 31*U.
constexpr int kLutSplit = 31;
constexpr int kLutSplitRecip = 1057;

inline size_t round_up_64(size_t bytes) { return (bytes + 63) / 64 * 64; }

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void store256(void* p, __m256i v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
inline __m256i broadcast128(const void* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
inline __m256i broadcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}
inline __m256 halves_to_float(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Rounds the product to fp32 on its own, so the compiler cannot fuse it with the following add into
// an FMA: the documented numerics round (alpha*s)*dot before summing, as the scalar kernel does.
inline __m256 rounded(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// y += (alpha * s) * dot for 8 rows.
inline __m256 scaled_add(__m256 y, __m256 alpha, __m256 s, __m256i dot) {
  return _mm256_add_ps(y, rounded(_mm256_mul_ps(_mm256_mul_ps(alpha, s), _mm256_cvtepi32_ps(dot))));
}

// Keeps software prefetches kPrefetchAhead bytes ahead of a forward stream of weight bytes, with
// the cache-level hint kHint.
template <int kHint>
class Prefetcher {
 public:
  Prefetcher(const uint8_t* begin, const uint8_t* end)
      : next_(reinterpret_cast<uintptr_t>(begin) & ~uintptr_t{63}), end_(reinterpret_cast<uintptr_t>(end)) {}
  void ahead(const uint8_t* p) {
    const uintptr_t target = std::min(reinterpret_cast<uintptr_t>(p) + kPrefetchAhead, end_);
    uintptr_t next = next_;  // a local, so the loop does not store the member after every prefetch
    for (; next < target; next += 64)
      _mm_prefetch(reinterpret_cast<const char*>(next), static_cast<decltype(_MM_HINT_T0)>(kHint));
    next_ = next;
  }

 private:
  uintptr_t next_;
  uintptr_t end_;
};

// The lookup-table kernels prefetch into L2 only: their tables live in L1, and streaming the weights
// through L1 evicted them (measured: cold sherry 8192->2048 1.5x slower with T0). The i2s kernel,
// which has no table, is fastest with T0.
using LutPrefetcher = Prefetcher<_MM_HINT_T1>;
using I2SPrefetcher = Prefetcher<_MM_HINT_T0>;

// Interleaves 4 byte planes (byte r = row r of a tile) into 4 vectors of 8 rows x 4 lanes, each row
// as the dword (q0, q1, q2, q3). The rows come in "panel order" (vector s: rows 4s..4s+3 and
// 16+4s..16+4s+3), the unpacks' natural order; natural row order would cost 4 lane-crossing
// permutes per call, and the few vectors of scales and outputs are cheaper to permute instead.
inline void interleave_planes(__m256i q0, __m256i q1, __m256i q2, __m256i q3, uint8_t* out) {
  const __m256i a = _mm256_unpacklo_epi8(q0, q1), b = _mm256_unpackhi_epi8(q0, q1);
  const __m256i c = _mm256_unpacklo_epi8(q2, q3), d = _mm256_unpackhi_epi8(q2, q3);
  store256(out + 0, _mm256_unpacklo_epi16(a, c));   // rows 0-3 | 16-19
  store256(out + 32, _mm256_unpackhi_epi16(a, c));  // rows 4-7 | 20-23
  store256(out + 64, _mm256_unpacklo_epi16(b, d));  // rows 8-11 | 24-27
  store256(out + 96, _mm256_unpackhi_epi16(b, d));  // rows 12-15 | 28-31
}

// Natural row order <-> the panel order of interleave_planes, for 32 floats as 4 vectors: vector s
// of the panel order holds rows 4s..4s+3 and 16+4s..16+4s+3.
inline void to_panel_order(const __m256 (&natural)[4], __m256 (&panel)[4]) {
  panel[0] = _mm256_permute2f128_ps(natural[0], natural[2], 0x20);
  panel[1] = _mm256_permute2f128_ps(natural[0], natural[2], 0x31);
  panel[2] = _mm256_permute2f128_ps(natural[1], natural[3], 0x20);
  panel[3] = _mm256_permute2f128_ps(natural[1], natural[3], 0x31);
}
inline void to_natural_order(const __m256 (&panel)[4], __m256 (&natural)[4]) {
  natural[0] = _mm256_permute2f128_ps(panel[0], panel[1], 0x20);
  natural[1] = _mm256_permute2f128_ps(panel[2], panel[3], 0x20);
  natural[2] = _mm256_permute2f128_ps(panel[0], panel[1], 0x31);
  natural[3] = _mm256_permute2f128_ps(panel[2], panel[3], 0x31);
}

// ---- the LUT GEMV inner loop (sherry and tl2) ----------------------------------------------------

struct LutConstants {
  __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256i guard = _mm256_set1_epi8(1);                          // keeps psignb's operand non-zero
  __m256i combine = _mm256_set1_epi16(kLutSplit << 8 | 1);      // bytes (1, 31): V + 31*U
};

// A chunk holds up to 16 units (a unit pair p = units 2p, 2p+1) of 32 rows in two halves of 16 rows
// (h = 0: rows 0-15, h = 1: rows 16-31). Each 32-byte lookup serves one half of one pair: its low
// 128-bit lane the even unit, its high lane the odd unit, with the pair's tables side by side in the
// same lanes (build_lut), so the tables are plain 32-byte loads (a broadcast load costs a shuffle
// uop on Zen 2/3) and each pshufb still does 32 lookups.
//   * sign vector h (32 bytes): byte 16*parity + i, bit 7 - p: unit 2p + parity of row 16h + i is
//     negated;
//   * nibble vector p (32 bytes): byte 16*parity + i holds the index of unit 2p + parity for row i
//     (low nibble) and row 16 + i (high nibble).

// The psignb operand of pair P for one half: a byte per row, negative where the unit is negated,
// never zero. `doubled` starts as signs | 1 and doubles after every pair (a byte add: no bit crosses
// into the next row, unlike a shift), so for P < 7 it holds the sign in bit 7 and the guard 1 in
// bit P: one add per pair and half. Pair 7 has no room left for the guard and takes a shift and an or.
template <int P>
inline __m256i pair_sign(__m256i signs, __m256i& doubled, const LutConstants& c) {
  if constexpr (P == 7) {
    return _mm256_or_si256(_mm256_slli_epi16(signs, 7), c.guard);
  } else {
    const __m256i s = doubled;
    doubled = _mm256_add_epi8(doubled, doubled);
    return s;
  }
}

// One pair P of a chunk for both halves: look up U and V (S = 31*U + V), negate them where the sign
// is set, add them to the int8 accumulators of their half.
struct LutChunkState {
  __m256i signs[2], doubled[2];
  __m256i u[2], v[2];
};

template <int P>
inline void lut_pair(const uint8_t* nibbles, const uint8_t* lut, LutChunkState& st, const LutConstants& c) {
  const __m256i n = load256(nibbles + 32 * P);
  const __m256i tu = load256(lut + 64 * P), tv = load256(lut + 64 * P + 32);
  const __m256i idx[2] = {_mm256_and_si256(n, c.nibble), _mm256_and_si256(_mm256_srli_epi16(n, 4), c.nibble)};
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256i s = pair_sign<P>(st.signs[h], st.doubled[h], c);
    st.u[h] = _mm256_add_epi8(st.u[h], _mm256_sign_epi8(_mm256_shuffle_epi8(tu, idx[h]), s));
    st.v[h] = _mm256_add_epi8(st.v[h], _mm256_sign_epi8(_mm256_shuffle_epi8(tv, idx[h]), s));
  }
  // Keeps the sums sequential: GCC 12 otherwise reassociates them into a tree whose partial sums
  // spill to the stack.
  __asm__("" : "+x"(st.u[0]), "+x"(st.v[0]), "+x"(st.u[1]), "+x"(st.v[1]));
}

// A chunk of 2*sizeof...(P) units for 32 rows: int8 accumulation (|U| <= 12, |V| <= 15 per unit; a
// byte sums at most 8 units, the even or the odd ones), then one maddubs per 8 rows widens V + 31*U
// into the int16 accumulators. acc[q] holds rows 8q..8q+7, its low lane over the even units, its
// high lane over the odd ones (widen_rows adds them).
template <size_t... P>
inline void lut_chunk(const uint8_t* w, const uint8_t* lut, __m256i (&acc)[4], const LutConstants& c,
                      std::index_sequence<P...>) {
  LutChunkState st;
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    st.signs[h] = load256(w + 32 * h);
    st.doubled[h] = _mm256_or_si256(st.signs[h], c.guard);
    st.u[h] = st.v[h] = _mm256_setzero_si256();
  }
  (lut_pair<P>(w + 64, lut, st, c), ...);
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    acc[2 * h] = _mm256_add_epi16(acc[2 * h], _mm256_maddubs_epi16(c.combine, _mm256_unpacklo_epi8(st.v[h], st.u[h])));
    acc[2 * h + 1] =
        _mm256_add_epi16(acc[2 * h + 1], _mm256_maddubs_epi16(c.combine, _mm256_unpackhi_epi8(st.v[h], st.u[h])));
  }
}

// The same chunk for R rows of A (prefill), one half at a time: the index and sign work of each pair
// and half is shared by the R rows, whose tables come from their own prepared rows. Per unit pair,
// half and row of A: two table loads, two pshufb, two psignb, two adds; per pair and half, about 2.5
// ops of index and sign work for all R rows. With R = 4 (8 int8 accumulators in registers) that is
// about 7.4 vector ops per 128 weights per row of A, against about 9 for the maddubs GEMM.
template <int R, int P>
inline void lut_rows_pair(const uint8_t* nibbles, const uint8_t* const (&lut)[R], int half, __m256i signs,
                          __m256i& doubled, __m256i (&u)[R], __m256i (&v)[R], const LutConstants& c) {
  const __m256i n = load256(nibbles + 32 * P);
  const __m256i idx = _mm256_and_si256(half ? _mm256_srli_epi16(n, 4) : n, c.nibble);
  const __m256i s = pair_sign<P>(signs, doubled, c);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    u[r] = _mm256_add_epi8(u[r], _mm256_sign_epi8(_mm256_shuffle_epi8(load256(lut[r] + 64 * P), idx), s));
    v[r] = _mm256_add_epi8(v[r], _mm256_sign_epi8(_mm256_shuffle_epi8(load256(lut[r] + 64 * P + 32), idx), s));
    __asm__("" : "+x"(u[r]), "+x"(v[r]));  // sequential sums, as in lut_pair
  }
}

template <int R, size_t... P>
inline void lut_rows_chunk(const uint8_t* w, const uint8_t* const (&lut)[R], __m256i (&acc)[R][4],
                           const LutConstants& c, std::index_sequence<P...>) {
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256i signs = load256(w + 32 * h);
    __m256i doubled = _mm256_or_si256(signs, c.guard);
    __m256i u[R], v[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) u[r] = v[r] = _mm256_setzero_si256();
    (lut_rows_pair<R, P>(w + kChunkSignBytes, lut, h, signs, doubled, u, v, c), ...);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      acc[r][2 * h] = _mm256_add_epi16(acc[r][2 * h], _mm256_maddubs_epi16(c.combine, _mm256_unpacklo_epi8(v[r], u[r])));
      acc[r][2 * h + 1] =
          _mm256_add_epi16(acc[r][2 * h + 1], _mm256_maddubs_epi16(c.combine, _mm256_unpackhi_epi8(v[r], u[r])));
    }
  }
}

// One chunk of `units` units for R rows: the R = 1 GEMV loads each pair's tables once for both
// halves; the prefill shares the index and sign work instead.
template <int R, size_t... P>
inline void lut_rows_chunk_any(const uint8_t* w, const uint8_t* const (&lut)[R], __m256i (&acc)[R][4],
                               const LutConstants& c, std::index_sequence<P...> pairs) {
  if constexpr (R == 1) lut_chunk(w, lut[0], acc[0], c, pairs);
  else lut_rows_chunk<R>(w, lut, acc, c, pairs);
}

template <int R>
inline void lut_rows_chunk_of(int64_t units, const uint8_t* w, const uint8_t* const (&lut)[R], __m256i (&acc)[R][4],
                              const LutConstants& c) {
  switch (units / 2) {  // whole pairs: every group holds an even number of units
    case 8: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<8>()); break;
    case 7: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<7>()); break;
    case 6: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<6>()); break;
    case 5: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<5>()); break;
    case 4: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<4>()); break;
    case 3: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<3>()); break;
    case 2: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<2>()); break;
    default: lut_rows_chunk_any<R>(w, lut, acc, c, std::make_index_sequence<1>()); break;
  }
}

// The canonical pattern of a 4-bit index (sign bit clear) as int8 lanes; tl2 indices 14 and 15 are
// never stored (rejected at repack) and get all-zero patterns.
std::array<int8_t, 4> canonical_pattern(Format f, int index) {
  std::array<int8_t, 4> lanes{};
  if (f == Format::kSherry) {
    sherry_lanes(static_cast<uint8_t>(index), lanes.data());
  } else if (index <= 13) {
    tl2_lanes(static_cast<uint8_t>(index), lanes.data());
    lanes[3] = 0;
  }
  return lanes;
}

// The psignb patterns of build_lut for a format's 16 indices: its hadd puts entry e of the result at
// position e when pattern dword d of table 0 holds entry d (d < 4) or 8 + d - 4, and of table 1 entry
// 4 + d or 12 + d - 4.
struct LutPatterns {
  __m256i table[2];
};

LutPatterns lut_patterns(Format f) {
  alignas(32) int8_t pattern[2][32];
  for (int t = 0; t < 2; ++t)
    for (int d = 0; d < 8; ++d) {
      const int entry = (d < 4 ? d : d + 4) + 4 * t;
      const std::array<int8_t, 4> lanes = canonical_pattern(f, entry);
      for (int p = 0; p < 4; ++p) pattern[t][4 * d + p] = lanes[p];
    }
  return LutPatterns{{load256(pattern[0]), load256(pattern[1])}};
}

// Per unit: 16 table entries S[e] = pattern[e] . x, split as S = 31*U + V. One broadcast dword of
// activations, psignb with the patterns of 8 entries each, maddubs and hadd give S for all 16
// entries (a tl2 triple ignores its 4th byte: every pattern's lane 3 is zero). Per unit pair
// (`units` is even: every group holds whole pairs), 64 bytes: U of the even unit | U of the odd
// unit, then V likewise, so that one 32-byte load holds a pair's table for the two lanes of lut_pair.
// Unit u's activations are the dword at xq + u * unit_lanes. Each pair reads its activations before
// it writes its 64 bytes, so xq may lie in the last 4 * units bytes of lut (sherry_group_tables_avx2).
void build_lut(const int8_t* xq, int64_t units, int64_t unit_lanes, const LutPatterns& patterns, uint8_t* lut) {
  const __m256i ones = _mm256_set1_epi8(1);
  const __m256i recip = _mm256_set1_epi16(kLutSplitRecip), split = _mm256_set1_epi16(kLutSplit);
  const auto table = [&](int64_t u, __m256i& hi, __m256i& lo) {
    const __m256i x = broadcast32(xq + u * unit_lanes);
    const __m256i s = _mm256_hadd_epi16(_mm256_maddubs_epi16(ones, _mm256_sign_epi8(x, patterns.table[0])),
                                        _mm256_maddubs_epi16(ones, _mm256_sign_epi8(x, patterns.table[1])));
    hi = _mm256_mulhrs_epi16(s, recip);
    lo = _mm256_sub_epi16(s, _mm256_mullo_epi16(hi, split));
  };
  for (int64_t u = 0; u < units; u += 2) {
    __m256i hi0, lo0, hi1, lo1;
    table(u, hi0, lo0);
    table(u + 1, hi1, lo1);
    store256(lut + 32 * u, _mm256_permute4x64_epi64(_mm256_packs_epi16(hi0, hi1), 0xD8));
    store256(lut + 32 * u + 32, _mm256_permute4x64_epi64(_mm256_packs_epi16(lo0, lo1), 0xD8));
  }
}

class Avx2Kernel final : public MatMulKernel {
 public:
  explicit Avx2Kernel(const PackedWeights& w);

  KernelPath path() const override { return KernelPath::kAVX2; }
  int64_t row_tile() const override { return kRowTile; }
  size_t activation_row_bytes() const override { return row_bytes_; }
  // A call that builds no lookup tables (see prepare_row_for) leaves out their room.
  size_t activation_row_bytes_for(int64_t call_rows) const override {
    return lut_format() && gemv_for(call_rows) ? row_bytes_ : lut_offset_;
  }
  void prepare_row(const float* a_row, uint8_t* ws) const override { prepare_row_for(a_row, 1, ws); }
  void prepare_row_for(const float* a_row, int64_t call_rows, uint8_t* ws) const override;
  int64_t min_row_chunk(int64_t call_rows) const override { return gemv_for(call_rows) ? 1 : kGemmMinChunk; }
  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override;

 private:
  bool lut_format() const { return format_ != Format::kI2S; }
  // Whether a call of `rows` rows of A takes the GEMV (else the GEMM; the lookup-table formats
  // build their tables only for the GEMV).
  bool gemv_for(int64_t rows) const {
    return rows < (format_ == Format::kSherry ? kGemmMinRowsSherry
                   : format_ == Format::kTL2  ? kGemmMinRowsTL2
                                              : kGemmMinRowsI2S);
  }
  const uint8_t* tile(int64_t t) const { return weights_.data() + t * tile_bytes_; }

  void repack_lut(const PackedWeights& w);
  void repack_i2s(const PackedWeights& w);

  // One GEMV tile, one GEMM group decode: the lookup-table formats or i2s, by prefetcher type.
  // R rows of A (prepared rows ws[r], outputs out[r]) times one tile, by the lookup tables.
  template <int R>
  void lut_rows(const uint8_t* tile, const uint8_t* const (&ws)[R], LutPrefetcher& pf, float* const (&out)[R]) const;
  void gemv(const uint8_t* tile, const uint8_t* ws, I2SPrefetcher& pf, float* out) const;
  void decode_group(const uint8_t* tile, int64_t g, LutPrefetcher& pf, uint8_t* panel) const;
  void decode_group(const uint8_t* tile, int64_t g, I2SPrefetcher& pf, uint8_t* panel) const;
  template <class Prefetch>
  void compute_with(Prefetch pf, const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
                    float* y) const;

  Format format_;
  Geometry g_;
  int64_t groups_;
  int64_t unit_lanes_;                 // activation lanes per unit: 4 (sherry), 3 (tl2), 16 (i2s)
  std::vector<int64_t> units_;         // padded units per group
  std::vector<int64_t> lane_begin_;    // first lane of each group in lane space
  std::vector<int64_t> group_offset_;  // byte offset of each group inside a tile
  std::vector<int64_t> group_steps_;   // GEMM k4 steps (4 lanes each) per group
  int64_t lanes_ = 0;                  // lane-space length of a row
  int64_t units_total_ = 0;
  int64_t tile_bytes_ = 0;

  // Workspace row: xq in lane space | int32 sum(xq) per group, then the int32 "tables built" flag |
  // float s per group | LUT (32 B/unit, only when the flag is set: rows without lie lut_offset_ apart).
  size_t xsum_offset_ = 0, flag_offset_ = 0, scale_offset_ = 0, lut_offset_ = 0, row_bytes_ = 0;

  // psignb patterns that turn one broadcast dword of 4 activations into the 16 table sums (see
  // build_lut), and the byte tables index -> the 4 lanes' w+1 as 2-bit fields (lane p at bit 2p),
  // for the positive and the negative sign.
  LutPatterns lut_pattern_{};
  std::array<uint8_t, 16> decode_pos_{}, decode_neg_{};

  WeightBuffer weights_;  // on huge pages: a cold GEMV streams it
};

Avx2Kernel::Avx2Kernel(const PackedWeights& w)
    : format_(w.format),
      g_(w.geometry),
      groups_(w.geometry.groups()),
      unit_lanes_(w.format == Format::kSherry ? 4 : w.format == Format::kTL2 ? 3 : kI2SUnitLanes) {
  const std::string bad = check_geometry(format_, g_.n, g_.k, g_.group_size);
  if (!bad.empty()) throw std::runtime_error(std::string("avx2 ") + format_name(format_) + " kernel: " + bad);

  // Units per group, padded so a group is a whole number of LUT pairs (sherry), of 4 triples
  // (tl2: 12 lanes = 3 GEMM dwords) or of 16-weight i2s units, and their bytes in a tile.
  const auto units_of = [&](int64_t length) -> int64_t {
    switch (format_) {
      case Format::kSherry: return ceil_div(length / kSherryBlock, 2) * 2;
      case Format::kTL2: return ceil_div(ceil_div(length, 3), 4) * 4;
      default: return ceil_div(length, kI2SUnitLanes);
    }
  };
  const auto group_bytes = [&](int64_t units) {
    return kAlphaBytes + (lut_format() ? ceil_div(units, kChunkUnits) * kChunkSignBytes + units * 16 : units * 128);
  };
  // Every group but the last is full, so the sizes follow in closed form, and the memory budget is
  // checked before anything proportional to the number of groups is allocated.
  const int64_t full_units = units_of(g_.group_size), last_units = units_of(g_.group_length(groups_ - 1));
  units_total_ = (groups_ - 1) * full_units + last_units;
  lanes_ = units_total_ * unit_lanes_;
  tile_bytes_ = (groups_ - 1) * group_bytes(full_units) + group_bytes(last_units);

  // Workspace: 4 bytes of slack after xq, because a tl2 table build reads a dword at every triple.
  xsum_offset_ = round_up_64(static_cast<size_t>(lanes_) + 4);
  flag_offset_ = xsum_offset_ + sizeof(int32_t) * static_cast<size_t>(groups_);
  scale_offset_ = round_up_64(flag_offset_ + sizeof(int32_t));
  lut_offset_ = scale_offset_ + round_up_64(sizeof(float) * static_cast<size_t>(groups_));
  row_bytes_ = lut_offset_ + (lut_format() ? static_cast<size_t>(units_total_) * 32 : 0);

  // The tiles, the four per-group vectors below, and the GEMM's per-thread panel of a full group.
  const int64_t weight_bytes = ceil_div(g_.n, kTileRows) * tile_bytes_;
  const int64_t metadata_bytes = 4 * static_cast<int64_t>(sizeof(int64_t)) * groups_;
  const int64_t panel_bytes = full_units * unit_lanes_ / 4 * kPanelStepBytes;
  check_memory_budget(w, static_cast<double>(weight_bytes + metadata_bytes + panel_bytes),
                      static_cast<double>(row_bytes_));

  for (std::vector<int64_t>* v : {&units_, &group_steps_, &lane_begin_, &group_offset_})
    v->reserve(static_cast<size_t>(groups_));
  int64_t units_before = 0, offset = 0;
  for (int64_t g = 0; g < groups_; ++g) {
    const int64_t units = g + 1 < groups_ ? full_units : last_units;
    units_.push_back(units);
    group_steps_.push_back(units * unit_lanes_ / 4);
    lane_begin_.push_back(units_before * unit_lanes_);
    group_offset_.push_back(offset);
    units_before += units;
    offset += group_bytes(units);
  }

  if (lut_format()) {
    lut_pattern_ = lut_patterns(format_);
    for (int index = 0; index < 16; ++index) {
      const std::array<int8_t, 4> lanes = canonical_pattern(format_, index);
      for (int p = 0; p < 4; ++p) {
        decode_pos_[index] |= static_cast<uint8_t>((1 + lanes[p]) << (2 * p));
        decode_neg_[index] |= static_cast<uint8_t>((1 - lanes[p]) << (2 * p));
      }
    }
  }

  weights_ = WeightBuffer(static_cast<size_t>(ceil_div(weight_bytes, sizeof(Line))));
  std::memset(weights_.data(), 0, weights_.size());  // padding units and rows stay zero codes
  if (lut_format()) repack_lut(w);
  else repack_i2s(w);
}

// Tile layout (sherry, tl2), per group: 32 fp16 scales, then chunks of up to 16 units, each two sign
// vectors and one nibble vector per unit pair, as lut_chunk reads them (see above it). Padding units
// and rows past N stay zero: index 0 with sign 0 against a zero table, or a zero scale.
void Avx2Kernel::repack_lut(const PackedWeights& w) {
  const int64_t stride = row_bytes(format_, g_.k, g_.group_size);
  const int64_t codes = codes_per_row(format_, g_.k, g_.group_size);
  for (int64_t n = 0; n < g_.n; ++n) {
    const uint8_t* row = w.data + n * stride;
    uint8_t* base = weights_.data() + (n / kTileRows) * tile_bytes_;
    const int64_t r = n % kTileRows;
    int64_t c = 0;
    for (int64_t g = 0; g < groups_; ++g) {
      uint8_t* group = base + group_offset_[g];
      std::memcpy(group + 2 * r, &w.scales[n * groups_ + g], 2);
      const int64_t length = g_.group_length(g);
      const int64_t real_units = codes_per_row(format_, length, length);  // the codes of this group
      for (int64_t u = 0; u < real_units; ++u, ++c) {
        const uint8_t code = code5_at(row, codes, c);
        if (format_ == Format::kTL2) {
          int8_t lanes[3];
          const int64_t used = std::min<int64_t>(3, length - 3 * u);  // the rest are padding lanes
          bool valid = tl2_lanes(code, lanes);
          for (int64_t p = used; valid && p < 3; ++p) valid = lanes[p] == 0;
          if (!valid)
            throw std::runtime_error("corrupt tl2 weights: row " + std::to_string(n) + " holds an invalid code");
        }
        uint8_t* chunk = group + kAlphaBytes + (u / kChunkUnits) * (kChunkSignBytes + 16 * kChunkUnits);
        const int64_t pair = u % kChunkUnits / 2, lane = 16 * (u % 2) + r % 16, half = r / 16;
        chunk[32 * half + lane] |= static_cast<uint8_t>((code >> 4) << (7 - pair));
        chunk[kChunkSignBytes + 32 * pair + lane] |= static_cast<uint8_t>((code & 0x0F) << (4 * half));
      }
    }
  }
}

// Tile layout (i2s), per group: 32 fp16 scales, then per unit of 16 weights 4 vectors of 8 rows in
// the panel order of interleave_planes (vector s: rows 4s..4s+3, 16+4s..16+4s+3): byte 4*i + q of
// vector s holds, in bits 2t..2t+1, the code (w+1) of its row i at lane 4t + q of the unit. Plane
// t (shift 2t, mask 3) is then 8 dwords of 4 consecutive lanes, as the GEMM panel wants them.
void Avx2Kernel::repack_i2s(const PackedWeights& w) {
  const int64_t stride = row_bytes(format_, g_.k, g_.group_size);
  for (int64_t n = 0; n < g_.n; ++n) {
    const uint8_t* row = w.data + n * stride;
    uint8_t* base = weights_.data() + (n / kTileRows) * tile_bytes_;
    const int64_t r = n % kTileRows;
    for (int64_t g = 0; g < groups_; ++g) {
      uint8_t* group = base + group_offset_[g];
      std::memcpy(group + 2 * r, &w.scales[n * groups_ + g], 2);
      const int64_t begin = g_.group_begin(g), length = g_.group_length(g);
      for (int64_t i = 0; i < length; ++i) {
        const int64_t k = begin + i;
        const int code = (row[k >> 2] >> ((k & 3) * 2)) & 3;
        if (code == 3)
          throw std::runtime_error("corrupt i2s weights: row " + std::to_string(n) + " holds an invalid code");
        const int64_t lane = i % kI2SUnitLanes;
        group[kAlphaBytes + (i / kI2SUnitLanes) * 128 + 32 * (r % 16 / 4) + 4 * (r / 16 * 4 + r % 4) + lane % 4] |=
            static_cast<uint8_t>(code << (2 * (lane / 4)));
      }
    }
  }
}

// quantize_group, vectorized: the same float operations element by element (max |x| is exact in any
// order, x * (127/m) is one rounding, rint in the current mode, clamp), so the bytes are identical.
// A group holding a NaN or an infinity gets s = NaN and xq = 0 (its row's outputs are then NaN).
// Returns s and stores sum(xq).
float quantize_group_avx2(const float* x, int64_t length, int8_t* xq, int32_t* sum) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= length; i += 8) {
    const __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask);
    vmax = _mm256_max_ps(v, vmax);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // |x| = inf, or NaN (unordered)
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  bool non_finite = _mm256_movemask_ps(bad) != 0;
  for (; i < length; ++i) {
    amax = std::max(amax, std::fabs(x[i]));
    non_finite |= !std::isfinite(x[i]);
  }
  if (non_finite || !(amax > 0.f)) {
    std::memset(xq, 0, static_cast<size_t>(length));
    *sum = 0;
    return non_finite ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  }
  const float inv = static_cast<float>(kActivationQmax) / amax;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 lo = _mm256_set1_ps(-static_cast<float>(kActivationQmax));
  const __m256 hi = _mm256_set1_ps(static_cast<float>(kActivationQmax));
  const auto quantize8 = [&](const float* p) {
    const __m256 q = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(p), vinv), _MM_FROUND_CUR_DIRECTION);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(q, lo), hi));
  };
  __m256i vsum = _mm256_setzero_si256();
  i = 0;
  for (; i + 32 <= length; i += 32) {
    const __m256i a = quantize8(x + i), b = quantize8(x + i + 8), c = quantize8(x + i + 16), d = quantize8(x + i + 24);
    vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
    store256(xq + i, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  alignas(32) int32_t partial[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(partial), vsum);
  int32_t total = 0;
  for (int32_t v : partial) total += v;
  for (; i < length; ++i) {
    float q = std::nearbyint(x[i] * inv);
    q = std::min(std::max(q, -static_cast<float>(kActivationQmax)), static_cast<float>(kActivationQmax));
    xq[i] = static_cast<int8_t>(q);
    total += xq[i];
  }
  *sum = total;
  return amax / static_cast<float>(kActivationQmax);
}

// The tables only for a call that takes the GEMV: at prefill sizes they would cost as much as a
// tenth of the call (128 rows x 512 units at K = 2048) and the GEMM never reads them.
void Avx2Kernel::prepare_row_for(const float* a_row, int64_t call_rows, uint8_t* ws) const {
  auto* xq = reinterpret_cast<int8_t*>(ws);
  auto* xsum = reinterpret_cast<int32_t*>(ws + xsum_offset_);
  auto* scale = reinterpret_cast<float*>(ws + scale_offset_);
  for (int64_t g = 0; g < groups_; ++g) {
    const int64_t length = g_.group_length(g);
    int8_t* lanes = xq + lane_begin_[g];
    scale[g] = quantize_group_avx2(a_row + g_.group_begin(g), length, lanes, &xsum[g]);
    std::memset(lanes + length, 0, static_cast<size_t>(units_[g] * unit_lanes_ - length));
  }
  std::memset(xq + lanes_, 0, xsum_offset_ - static_cast<size_t>(lanes_));
  const int32_t tables = lut_format() && gemv_for(call_rows);
  std::memcpy(ws + flag_offset_, &tables, sizeof tables);
  if (tables) build_lut(xq, units_total_, unit_lanes_, lut_pattern_, ws + lut_offset_);
}

// ---- GEMV ---------------------------------------------------------------------------------------------

// The int32 dots of a segment's int16 accumulators (acc[q]: rows 8q..8q+7, even units in the low
// lane, odd units in the high lane; their sum is within the segment's int16 bound), plus `carry`
// from earlier segments of the group when it is given.
inline void widen_rows(const __m256i (&acc)[4], const int32_t* carry, __m256i (&dot)[4]) {
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q)
    dot[q] = _mm256_cvtepi16_epi32(
        _mm_add_epi16(_mm256_castsi256_si128(acc[q]), _mm256_extracti128_si256(acc[q], 1)));
  if (carry)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) dot[q] = _mm256_add_epi32(dot[q], load256(carry + 8 * q));
}

// The 32 fp16 scales of a tile and group as floats, in natural row order or in panel order.
inline void load_alpha(const uint8_t* alpha, bool panel_order, __m256 (&a)[4]) {
  __m256 natural[4];
  for (int q = 0; q < 4; ++q) natural[q] = halves_to_float(alpha + 16 * q);
  if (panel_order) to_panel_order(natural, a);
  else for (int q = 0; q < 4; ++q) a[q] = natural[q];
}

// y[0..32) += (alpha * s) * dot for one group; y lives in memory so that the chunk loop keeps the
// registers.
inline void scale_rows(const __m256 (&alpha)[4], float s, const __m256i (&dot)[4], float* y) {
  const __m256 vs = _mm256_set1_ps(s);
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q)
    _mm256_storeu_ps(y + 8 * q, scaled_add(_mm256_loadu_ps(y + 8 * q), alpha[q], vs, dot[q]));
}

// R prepared activation rows times one 32-row tile, out[r][i] = y of row r of A and tile row i
// (natural order). Out of line: inlined into compute(), its chunk loop lost registers to the caller.
template <int R>
__attribute__((noinline)) void Avx2Kernel::lut_rows(const uint8_t* tile, const uint8_t* const (&ws)[R],
                                                    LutPrefetcher& pf, float* const (&out)[R]) const {
  const LutConstants c;
  const uint8_t* lut[R];
  const float* scale[R];
  for (int r = 0; r < R; ++r) {
    lut[r] = ws[r] + lut_offset_;
    scale[r] = reinterpret_cast<const float*>(ws[r] + scale_offset_);
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out[r] + 8 * q, _mm256_setzero_ps());
  }
  alignas(32) int32_t carry[R][kTileRows];  // int32 dots of a group's earlier segments
  const uint8_t* p = tile;
  for (int64_t g = 0; g < groups_; ++g) {
    const uint8_t* alpha = p;
    p += kAlphaBytes;
    for (int64_t done = 0; done < units_[g];) {
      const int64_t start = done, end = std::min(units_[g], done + kSegmentUnits);
      __m256i acc[R][4];
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[r][q] = _mm256_setzero_si256();
      for (; done < end; done += kChunkUnits) {
        pf.ahead(p);
        const int64_t units = std::min(kChunkUnits, end - done);
        lut_rows_chunk_of<R>(units, p, lut, acc, c);
        p += kChunkSignBytes + 16 * units;
        for (int r = 0; r < R; ++r) lut[r] += 32 * units;
      }
      if (end < units_[g]) {
        for (int r = 0; r < R; ++r) {
          __m256i dot[4];
          widen_rows(acc[r], start > 0 ? carry[r] : nullptr, dot);
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) store256(carry[r] + 8 * q, dot[q]);
        }
      } else {
        __m256 a[4];
        load_alpha(alpha, false, a);
        for (int r = 0; r < R; ++r) {
          __m256i dot[4];
          widen_rows(acc[r], start > 0 ? carry[r] : nullptr, dot);
          scale_rows(a, scale[r][g], dot, out[r]);
        }
      }
    }
  }
}

// The i2s twin of the lookup-table gemv; its tile rows are in panel order, put back in natural order
// at the end.
__attribute__((noinline)) void Avx2Kernel::gemv(const uint8_t* tile, const uint8_t* ws, I2SPrefetcher& pf,
                                                float* out) const {
  const auto* xq = reinterpret_cast<const int8_t*>(ws);
  const auto* xsum = reinterpret_cast<const int32_t*>(ws + xsum_offset_);
  const auto* scale = reinterpret_cast<const float*>(ws + scale_offset_);
  const __m256i mask1 = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + 8 * q, _mm256_setzero_ps());
  alignas(32) int32_t carry[kTileRows];  // int32 dots of a group's earlier segments
  const uint8_t* p = tile;
  for (int64_t g = 0; g < groups_; ++g) {
    const uint8_t* alpha = p;
    p += kAlphaBytes;
    const int8_t* x = xq + lane_begin_[g];
    for (int64_t done = 0; done < units_[g];) {
      const int64_t start = done, end = std::min(units_[g], done + kI2SSegmentUnits);
      // One accumulator per 8 rows: plane t of byte b is (b >> 2t) & 3 = w+1 against the broadcast
      // activations of lanes 4t..4t+3. (A variant with planes 1 and 3 masked in place, 4(w+1), saves
      // 2 shifts but needs 8 accumulators, which spill: it measured slower.)
      __m256i acc[4];
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) acc[s] = _mm256_setzero_si256();
      for (const uint8_t* stop = p + 128 * (end - done); p < stop; p += 128, x += kI2SUnitLanes) {
        pf.ahead(p);
        const __m256i x0 = broadcast32(x), x1 = broadcast32(x + 4), x2 = broadcast32(x + 8), x3 = broadcast32(x + 12);
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
          const __m256i v = load256(p + 32 * s);
          const auto plane = [&](int t) { return _mm256_and_si256(_mm256_srli_epi16(v, 2 * t), mask1); };
          const __m256i m01 =
              _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, mask1), x0), _mm256_maddubs_epi16(plane(1), x1));
          const __m256i m23 = _mm256_add_epi16(_mm256_maddubs_epi16(plane(2), x2), _mm256_maddubs_epi16(plane(3), x3));
          acc[s] = _mm256_add_epi16(acc[s], _mm256_add_epi16(m01, m23));
        }
      }
      done = end;
      __m256i dot[4];
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) dot[s] = _mm256_madd_epi16(acc[s], ones);
      if (start > 0)
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) dot[s] = _mm256_add_epi32(dot[s], load256(carry + 8 * s));
      if (end < units_[g]) {
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) store256(carry + 8 * s, dot[s]);
      } else {
        const __m256i offset = _mm256_set1_epi32(xsum[g]);  // the w+1 offset's correction
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) dot[s] = _mm256_sub_epi32(dot[s], offset);
        __m256 a[4];
        load_alpha(alpha, true, a);
        scale_rows(a, scale[g], dot, out);
      }
    }
  }
  __m256 panel[4], natural[4];
  for (int q = 0; q < 4; ++q) panel[q] = _mm256_loadu_ps(out + 8 * q);
  to_natural_order(panel, natural);
  for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + 8 * q, natural[q]);
}

// ---- GEMM: decode a group of a tile to int8 (w+1) dwords, panel[k4][32 rows][4 lanes] ------------

// Lane planes p < kLanes (byte r: w_p + 1 of row r) of one unit of 32 rows from its packed 2-bit
// fields (lane p at bit 2p).
template <int kLanes>
inline void split_planes(__m256i packed, __m256i* planes) {
  const __m256i mask = _mm256_set1_epi8(0x03);
  planes[0] = _mm256_and_si256(packed, mask);
  planes[1] = _mm256_and_si256(_mm256_srli_epi16(packed, 2), mask);
  planes[2] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
  if (kLanes == 4) planes[3] = _mm256_and_si256(_mm256_srli_epi16(packed, 6), mask);
}

// Decodes one group of a tile (its codes start at w) to panel[k4][32 rows in panel order][4 lanes].
// Per pair and half (lut_chunk's layout), one pshufb per sign looks up the units' lanes as packed
// 2-bit fields (w+1) and blendv picks by the sign, moved to bit 7; two lane permutes then give each
// unit of the pair its 32 rows. A sherry unit is one k4 step; tl2 units go by 4 (12 lanes, 3
// steps), which the padding of every group to 4 triples allows.
template <int kLanes>
void decode_lut_group(const uint8_t* w, int64_t units, __m256i pos, __m256i neg, LutPrefetcher& pf, uint8_t* panel) {
  constexpr int kStep = kLanes == 4 ? 2 : 4;  // units decoded together
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  for (int64_t done = 0; done < units; done += kChunkUnits) {
    pf.ahead(w);
    const int64_t chunk = std::min(kChunkUnits, units - done);
    const __m256i signs[2] = {load256(w), load256(w + 32)};
    for (int j = 0; j < chunk; j += kStep) {
      __m256i planes[4 * kLanes];
#pragma GCC unroll 2
      for (int k = 0; k < kStep / 2; ++k) {
        const int pair = j / 2 + k;
        const __m256i v = load256(w + kChunkSignBytes + 32 * pair);
        const __m128i shift = _mm_cvtsi32_si128(pair);  // the pair's sign bit 7 - pair to bit 7
        __m256i packed[2];
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i idx = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, nibble);
          packed[h] = _mm256_blendv_epi8(_mm256_shuffle_epi8(pos, idx), _mm256_shuffle_epi8(neg, idx),
                                         _mm256_sll_epi16(signs[h], shift));
        }
        split_planes<kLanes>(_mm256_permute2x128_si256(packed[0], packed[1], 0x20), planes + 2 * k * kLanes);
        split_planes<kLanes>(_mm256_permute2x128_si256(packed[0], packed[1], 0x31), planes + (2 * k + 1) * kLanes);
      }
#pragma GCC unroll 3
      for (int q = 0; q < kStep * kLanes; q += 4, panel += kPanelStepBytes)
        interleave_planes(planes[q], planes[q + 1], planes[q + 2], planes[q + 3], panel);
    }
    w += kChunkSignBytes + 16 * chunk;
  }
}

void Avx2Kernel::decode_group(const uint8_t* tile, int64_t g, LutPrefetcher& pf, uint8_t* panel) const {
  const uint8_t* w = tile + group_offset_[g] + kAlphaBytes;
  const __m256i pos = broadcast128(decode_pos_.data()), neg = broadcast128(decode_neg_.data());
  if (format_ == Format::kSherry) decode_lut_group<4>(w, units_[g], pos, neg, pf, panel);
  else decode_lut_group<3>(w, units_[g], pos, neg, pf, panel);
}

// i2s: plane t of a code vector is already 8 dwords of 4 lanes (w+1), in panel order.
void Avx2Kernel::decode_group(const uint8_t* tile, int64_t g, I2SPrefetcher& pf, uint8_t* panel) const {
  const uint8_t* w = tile + group_offset_[g] + kAlphaBytes;
  const __m256i mask = _mm256_set1_epi8(0x03);
  for (int64_t u = 0; u < units_[g]; ++u, w += 128, panel += 4 * kPanelStepBytes) {
    pf.ahead(w);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m256i v = load256(w + 32 * s);
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t)
        store256(panel + t * kPanelStepBytes + 32 * s, _mm256_and_si256(_mm256_srli_epi16(v, 2 * t), mask));
    }
  }
}

// One segment (at most kGemmSegmentSteps k4 steps, inside one group) of MR rows of A times 16 rows
// of a decoded tile, stored into (or added to) the int32 dots[m][16]. Per step: two weight
// vectors, one broadcast dword per row of A and 2*MR maddubs into int16 accumulators (12
// accumulators + 2 weights + 1 broadcast fill the 16 registers). Integer work only and out of
// line, so that nothing else competes for the registers.
template <int MR>
__attribute__((noinline)) void gemm_segment(const uint8_t* w, const int8_t* const* xq, int64_t k4, int64_t steps,
                                            bool accumulate, int32_t* dots) {
  __m256i acc[MR][2];
  const int8_t* x[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    x[m] = xq[m] + 4 * k4;
  }
  w += k4 * kPanelStepBytes;
  for (; steps > 0; --steps, w += kPanelStepBytes) {
    const __m256i w0 = load256(w), w1 = load256(w + 32);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256i a = broadcast32(x[m]);
      x[m] += 4;
      acc[m][0] = _mm256_add_epi16(_mm256_maddubs_epi16(w0, a), acc[m][0]);
      acc[m][1] = _mm256_add_epi16(_mm256_maddubs_epi16(w1, a), acc[m][1]);
      // Pins the accumulators to registers here: without it GCC 12 copies every accumulator
      // through another register (or the stack) each step, which halves the throughput.
      __asm__("" : "+x"(acc[m][0]), "+x"(acc[m][1]));
    }
  }
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) {
      int32_t* out = dots + 16 * m + 8 * h;
      const __m256i d = _mm256_madd_epi16(acc[m][h], ones);
      store256(out, accumulate ? _mm256_add_epi32(load256(out), d) : d);
    }
}

// The int32 dots of MR rows of A with the 32 rows of one decoded group, as dots[half][m][16] (half 0:
// tile rows 0-15, half 1: rows 16-31); xq points at the group's first lane.
template <int MR>
void gemm_dots(const uint8_t* panel, const int8_t* const* xq, int64_t steps, int32_t* dots) {
  for (int half = 0; half < 2; ++half)
    for (int64_t k4 = 0; k4 < steps; k4 += kGemmSegmentSteps)
      gemm_segment<MR>(panel + 64 * half, xq, k4, std::min(steps - k4, kGemmSegmentSteps), k4 > 0,
                       dots + half * MR * 16);
}

void gemm_dots(int mr, const uint8_t* panel, const int8_t* const* xq, int64_t steps, int32_t* dots) {
  switch (mr) {
    case 6: gemm_dots<6>(panel, xq, steps, dots); break;
    case 5: gemm_dots<5>(panel, xq, steps, dots); break;
    case 4: gemm_dots<4>(panel, xq, steps, dots); break;
    case 3: gemm_dots<3>(panel, xq, steps, dots); break;
    case 2: gemm_dots<2>(panel, xq, steps, dots); break;
    default: gemm_dots<1>(panel, xq, steps, dots); break;
  }
}

// Writes the rows of a computed tile that fall in [n_begin, n_end), adding the bias.
void store_tile(const float* values, int64_t tile_first, int64_t n_begin, int64_t n_end, const float* bias,
                float* y_row) {
  if (tile_first >= n_begin && tile_first + kTileRows <= n_end) {
    for (int64_t i = 0; i < kTileRows; i += 8) {
      const __m256 b = bias ? _mm256_loadu_ps(bias + tile_first + i) : _mm256_setzero_ps();
      _mm256_storeu_ps(y_row + tile_first + i, _mm256_add_ps(_mm256_loadu_ps(values + i), b));
    }
    return;
  }
  const int64_t from = std::max(tile_first, n_begin), to = std::min(tile_first + kTileRows, n_end);
  for (int64_t n = from; n < to; ++n) y_row[n] = values[n - tile_first] + (bias ? bias[n] : 0.f);
}

void Avx2Kernel::compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
                         float* y) const {
  n_end = std::min(n_end, g_.n);
  if (m <= 0 || n_begin >= n_end) return;
  const uint8_t* first = tile(n_begin / kTileRows);
  const uint8_t* end = weights_.data() + weights_.size();
  if (lut_format()) compute_with(LutPrefetcher(first, end), ws, m, n_begin, n_end, bias, y);
  else compute_with(I2SPrefetcher(first, end), ws, m, n_begin, n_end, bias, y);
}

template <class Prefetch>
void Avx2Kernel::compute_with(Prefetch pf, const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end,
                              const float* bias, float* y) const {
  const int64_t t_begin = n_begin / kTileRows, t_end = ceil_div(n_end, kTileRows);
  alignas(32) float out[kTileRows];
  alignas(32) float outs[kLutRows][kTileRows];

  // The lookup-table formats follow the rows (all rows of a call hold the same flag), for the path
  // and the rows' stride: the op may hand over a chunk of fewer rows than the call had.
  int32_t tables = 0;
  std::memcpy(&tables, ws + flag_offset_, sizeof tables);
  const size_t stride = tables ? row_bytes_ : lut_offset_;
  if (lut_format() ? tables != 0 : gemv_for(m)) {
    if constexpr (std::is_same_v<Prefetch, LutPrefetcher>) {
      // Blocks of kLutRows rows of A outer, tiles inner: a block's tables (32 bytes per unit and
      // row) stay in L2 while it meets every tile of the item, whose weights come from DRAM once
      // (the first block), then from cache. Tiles outer would stream every row's tables once per
      // tile: more than L2 holds from about 64 rows of A at K = 2048.
      for (int64_t r = 0; r < m;) {
        const int64_t rows = std::min<int64_t>(kLutRows, m - r);
        for (int64_t t = t_begin; t < t_end; ++t) {
          const auto run = [&](auto count) {
            constexpr int kR = decltype(count)::value;
            const uint8_t* rows_ws[kR];
            float* rows_out[kR];
            for (int i = 0; i < kR; ++i) rows_ws[i] = ws + (r + i) * stride, rows_out[i] = outs[i];
            lut_rows<kR>(tile(t), rows_ws, pf, rows_out);
          };
          switch (rows) {
            case 4: run(std::integral_constant<int, 4>()); break;
            case 3: run(std::integral_constant<int, 3>()); break;
            case 2: run(std::integral_constant<int, 2>()); break;
            default: run(std::integral_constant<int, 1>()); break;
          }
          for (int64_t i = 0; i < rows; ++i)
            store_tile(outs[i], t * kTileRows, n_begin, n_end, bias, y + (r + i) * g_.n);
        }
        r += rows;
      }
    } else {
      // Tile outer, rows of A inner: a tile's weights come from DRAM once, then from cache.
      for (int64_t t = t_begin; t < t_end; ++t)
        for (int64_t r = 0; r < m; ++r) {
          gemv(tile(t), ws + r * stride, pf, out);
          store_tile(out, t * kTileRows, n_begin, n_end, bias, y + r * g_.n);
        }
    }
    return;
  }

  // Group by group, so that the decoded panel of a group stays in L1 while every row of A uses it;
  // each row's outputs add up in ytile in group order.
  thread_local std::vector<uint8_t> panel;
  thread_local std::vector<float> ytile;
  panel.resize(static_cast<size_t>(*std::max_element(group_steps_.begin(), group_steps_.end()) * kPanelStepBytes));
  ytile.resize(static_cast<size_t>(m * kTileRows));
  for (int64_t t = t_begin; t < t_end; ++t) {
    std::fill(ytile.begin(), ytile.end(), 0.f);
    for (int64_t g = 0; g < groups_; ++g) {
      decode_group(tile(t), g, pf, panel.data());
      __m256 a[4];
      load_alpha(tile(t) + group_offset_[g], true, a);
      // Blocks of near-equal size: a ragged last block of 1 or 2 rows runs far below peak.
      const int64_t blocks = ceil_div(m, kGemmRows);
      for (int64_t b = 0, r0 = 0; b < blocks; ++b) {
        const int mr = static_cast<int>((m - r0) / (blocks - b));
        const int8_t* xq[kGemmRows];
        for (int i = 0; i < mr; ++i) xq[i] = reinterpret_cast<const int8_t*>(ws + (r0 + i) * stride) + lane_begin_[g];
        alignas(32) int32_t dots[2 * kGemmRows * 16];  // [half][row][16]
        gemm_dots(mr, panel.data(), xq, group_steps_[g], dots);
        for (int i = 0; i < mr; ++i) {
          const uint8_t* row = ws + (r0 + i) * stride;
          const __m256 s = _mm256_set1_ps(reinterpret_cast<const float*>(row + scale_offset_)[g]);
          const __m256i offset = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(row + xsum_offset_)[g]);
          float* yrow = ytile.data() + (r0 + i) * kTileRows;
#pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) {
            const __m256i dot = _mm256_sub_epi32(load256(dots + (q / 2 * mr + i) * 16 + 8 * (q % 2)), offset);
            _mm256_storeu_ps(yrow + 8 * q, scaled_add(_mm256_loadu_ps(yrow + 8 * q), a[q], s, dot));
          }
        }
        r0 += mr;
      }
    }
    for (int64_t r = 0; r < m; ++r) {
      __m256 panel_order[4], natural[4];
      for (int q = 0; q < 4; ++q) panel_order[q] = _mm256_loadu_ps(ytile.data() + r * kTileRows + 8 * q);
      to_natural_order(panel_order, natural);
      for (int q = 0; q < 4; ++q) _mm256_storeu_ps(out + 8 * q, natural[q]);
      store_tile(out, t * kTileRows, n_begin, n_end, bias, y + r * g_.n);
    }
  }
}

}  // namespace

float quantize_group_simd(const float* x, int64_t length, int8_t* xq, int32_t* sum) {
  return quantize_group_avx2(x, length, xq, sum);
}

void sherry_group_tables_avx2(const float* x, int64_t length, int64_t units, uint8_t* out, float* scale) {
  static const LutPatterns patterns = lut_patterns(Format::kSherry);
  // the activations in the tables' last 4 * units bytes, which build_lut overwrites only once read
  auto* xq = reinterpret_cast<int8_t*>(out + 28 * units);
  int32_t sum = 0;
  *scale = quantize_group_avx2(x, length, xq, &sum);
  std::memset(xq + length, 0, static_cast<size_t>(4 * units - length));  // padding units: zero activations
  build_lut(xq, units, 4, patterns, out);
}

std::unique_ptr<MatMulKernel> make_avx2_kernel(const PackedWeights& w, std::string* declined) {
  // The dispatcher may run on any x86-64; without these instructions the scalar kernel takes over.
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
    if (declined) *declined = "this CPU lacks avx2, fma or f16c";
    return nullptr;
  }
  return make_or_decline<Avx2Kernel>(w, declined);
}

}  // namespace sherry
