// AVX-512 kernels (VBMI byte permutes + VNNI dot products) for sherry, tl2 and i2s.
//
// Shared scheme, "rows in lanes": a tile is 16 output rows, one per dword lane of a zmm register,
// and a *piece* is a run of columns of one scale group: 4 blocks of 4 (sherry, i2s; 16 columns)
// or 4 triples (tl2; 12 columns). For one piece and tile the kernels hold a 64-byte vector whose
// byte 4r+j belongs to row r and block/triple j, so one vpdpbusd sums a row's 4 blocks into its
// own lane: no horizontal sums anywhere, and small scale groups stay cheap. Each group ends with
// y += float(dot)·(α·s) for 16 rows at once, in group order and without FMA contraction, exactly
// like the scalar kernel: outputs are bit-identical to it.
//
// sherry and tl2 (5-bit codes: 4-bit index + sign) multiply through activation lookup tables.
// prepare_row builds, per piece, the dot product of every code with the piece's activations, split
// into low nibbles xl = xq & 15 and high nibbles xh = xq >> 4 so that both fit int8 (|Σ w·xl| <=
// 45, |Σ w·xh| <= 24: at most 3 non-zero lanes): two 128-entry tables indexed by (sign, block j,
// 4-bit index). Per pair of pieces and tile the kernel then forms the indices (blend + ternlog),
// does 4 vpermi2b lookups, adds the two pieces' bytes (still int8) and needs 2 vpdpbusd (by 1 and
// by 16) for the exact Σ w·xq of 512 weights. Decoding the codes to weight planes instead (vpermb
// per lane, then vpdpbusd per lane, as i2s does) costs 8 such ops per piece instead of ~3.5; on
// the AMD Zen 4 this was tuned on, vpermb and vpdpbusd share execution pipes, and the plane decode
// left Sherry compute-bound at half the memory speed at batch 1.
//
// i2s (2-bit codes) decodes to weight planes by masking: plane p of a piece is the code byte &
// (3 << 2p), multiplied by the plane-p activation dword; one accumulator per plane, scaled back by
// 4^-p (exactly) at the group end, and the +1 offset removed via -Σxq.
//
// Prefill, every format ("weight planes" below): from 5 rows of A in a call (i2s) or kPlaneMinRows
// (sherry 32, tl2 16), the weights of two tiles are decoded, a block of groups at a time, into an
// L1 buffer of w + 1 planes (i2s by shift and mask; sherry and tl2 by one vpermb per lane on the
// 5-bit codes), and one 4 x 32 VNNI micro-kernel runs over all rows of A given: per row of A one
// vpdpbusd per 4 weights and 16 rows, the decode shared by all rows. Per row that is a little
// cheaper than the lookups (4 vpermi2b, 2 adds, 2 vpdpbusd per 512 weights), so the planes win from
// the row count where the decode is paid off. Such a call's prepare_row_for writes plane activations
// (i2s's layout; sherry and tl2 behind a head that marks the rows' layout) instead of tables, a
// sixteenth of their bytes; compute() follows the mark, since it may get a chunk of the call's rows,
// and min_row_chunk keeps those chunks long enough to amortize the decode.
//
// Private weight layouts (built once by the factory), ordered exactly as the kernels read them, so
// that a work item streams forward through memory:
//   sherry/tl2: superblocks of blocks of 8 tiles (a superblock is the op's work item, row_tile(),
//     one per hardware thread: superblock_blocks); in a superblock, K-chunks of about 16 pieces
//     (4 KiB of tables per row of A; a large group is split over chunks); in a chunk, block after
//     block; in a block, per group, per pair of pieces, its tiles one after the other, 80 bytes
//     each: 64 bytes of index nibbles (byte i = code i of piece A | code i of piece B << 4), then
//     the 64-bit sign masks of A and B.
//     A group with an odd number of pieces ends with a 40-byte half pair per tile (byte i = code i
//     | code i+32 << 4, then the sign mask); then the tiles' 16 float16 scales of the group. A
//     chunk's tables thus come from L2 once per superblock and from L1 for its other blocks: on
//     cold weights those L2 reads, not arithmetic, are what keeps Sherry from the memory speed, so
//     superblocks are as large as the threads allow.
//   i2s: tile after tile; per group, 64 bytes per piece (byte i = the canonical byte, 4 two-bit
//     codes, of row i/4, block i%4), then the tile's 16 float16 scales.
// Groups are padded to whole pieces and tiles to 16 rows; the padding meets zero activations, so
// it never contributes. There is no software prefetch: on Zen 4 it measured 10-25% slower on cold
// weights (4 KiB ahead, every line) or neutral (sparse); the hardware prefetchers keep up with
// these forward streams, helped by huge pages (see WeightBuffer).

// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves, which
// -Wmaybe-uninitialized reports at every inlined intrinsic.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "kernel.h"
#include "weight_buffer.h"

namespace sherry {
namespace {

constexpr int kTileRows = 16;            // output rows per tile: the dword lanes of a zmm
constexpr size_t kAlphaBytes = 32;       // 16 float16 scales per tile and group
constexpr int kSmallBatch = 4;           // up to this many rows of A, weights stream through once

inline size_t round_up_64(size_t bytes) { return (bytes + 63) / 64 * 64; }

inline float* as_floats(std::vector<Line>& v) { return reinterpret_cast<float*>(v.data()); }

inline __m512i broadcast_dword(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

inline __mmask64 load_mask64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return _cvtu64_mask64(v);
}

// Float multiply and add that the compiler may not contract into an FMA: the epilogue then rounds
// exactly like the scalar kernel (product α·s, times dot, added in group order). The all-ones
// masked forms compile to plain vmulps/vaddps (the unmasked _round forms trip
// -Wmaybe-uninitialized in GCC 12's headers).
inline __m512 mul_exact(__m512 a, __m512 b) {
  return _mm512_maskz_mul_round_ps(0xFFFF, a, b, _MM_FROUND_CUR_DIRECTION);
}
inline __m512 add_exact(__m512 a, __m512 b) {
  return _mm512_maskz_add_round_ps(0xFFFF, a, b, _MM_FROUND_CUR_DIRECTION);
}

// ysum[16] += float(dot) · (α · s), the scalar kernel's rounding order.
inline void accumulate_group(float* ysum, __m512i dot, __m512 alpha, float s) {
  const __m512 term = mul_exact(_mm512_cvtepi32_ps(dot), mul_exact(alpha, _mm512_set1_ps(s)));
  _mm512_store_ps(ysum, add_exact(_mm512_load_ps(ysum), term));
}

inline __m512 load_alpha(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Calls fn(std::integral_constant<int, r>) for a runtime r in [1, Max].
template <int Max, class Fn>
inline void dispatch(int r, Fn&& fn) {
  if constexpr (Max > 1) {
    if (r < Max) return dispatch<Max - 1>(r, fn);
  }
  fn(std::integral_constant<int, Max>{});
}

// --- activation quantization, exactly quantize_group --------------------------------------------

// max|x| over a group, or NaN when the group holds a NaN or an infinity (x·0 is NaN exactly then),
// which quantize_group turns into s = NaN and xq = 0.
inline float group_amax(const float* x, int64_t length) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 vmax = _mm512_setzero_ps(), probe = _mm512_setzero_ps();
  for (int64_t i = 0; i < length; i += 16) {
    const __mmask16 k = length - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (length - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + i);
    vmax = _mm512_max_ps(_mm512_and_ps(v, abs_mask), vmax);
    probe = _mm512_add_ps(probe, _mm512_mul_ps(v, _mm512_setzero_ps()));
  }
  if (_mm512_cmp_ps_mask(probe, probe, _CMP_UNORD_Q)) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(vmax);
}

// xq of the first min(left, 16) floats at x (zeros past them) as int32: rint(x·inv) (ties to even,
// fp32) clamped to ±127. A NaN product (x = 0 when 127/m overflows) stays NaN through the clamp
// and converts to 0x80000000, whose low byte is the 0 the scalar cast gives.
inline __m512i quantize16(const float* x, int64_t left, __m512 inv) {
  const __mmask16 k = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x), inv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 hi = _mm512_set1_ps(static_cast<float>(kActivationQmax));
  return _mm512_cvttps_epi32(_mm512_min_ps(hi, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), q)));
}

// --- geometry of the private layouts ------------------------------------------------------------

// Pieces per group, weight bytes per piece layout, activation bytes per piece: everything the
// kernels need to find a group of a tile or of a prepared row.
struct Plan {
  Geometry g;
  int64_t groups = 0, tiles = 0;
  int64_t pieces_full = 0, pieces_last = 0;  // pieces per group: every group but the last, the last
  size_t group_wbytes = 0;                   // weight bytes per tile of a full group, scales included
  size_t tile_wbytes = 0;
  size_t act_piece_bytes = 0;  // prepared activation bytes per piece
  size_t act_group_bytes = 0;  // ... per full group
  size_t act_corr_offset = 0, act_scale_offset = 0, act_row_bytes = 0;

  // piece_cols: columns per piece; group_weight_bytes(pieces): a group's code bytes per tile.
  template <class GroupBytes>
  // with_corr: an int32 -Σxq per group (the plane path's correction for weights stored as w + 1).
  Plan(const Geometry& geometry, int64_t piece_cols, size_t piece_act_bytes, bool with_corr,
       GroupBytes group_weight_bytes)
      : g(geometry) {
    groups = g.groups();
    tiles = ceil_div(g.n, kTileRows);
    pieces_full = ceil_div(g.group_size, piece_cols);
    pieces_last = ceil_div(g.group_length(groups - 1), piece_cols);
    group_wbytes = group_weight_bytes(pieces_full) + kAlphaBytes;
    tile_wbytes = static_cast<size_t>(groups - 1) * group_wbytes + group_weight_bytes(pieces_last) + kAlphaBytes;
    act_piece_bytes = piece_act_bytes;
    act_group_bytes = static_cast<size_t>(pieces_full) * act_piece_bytes;
    act_corr_offset = round_up_64(static_cast<size_t>(groups - 1) * act_group_bytes +
                                  static_cast<size_t>(pieces_last) * act_piece_bytes);
    act_scale_offset = act_corr_offset + (with_corr ? round_up_64(sizeof(int32_t) * static_cast<size_t>(groups)) : 0);
    act_row_bytes = act_scale_offset + round_up_64(sizeof(float) * static_cast<size_t>(groups));
  }
  int64_t pieces(int64_t group) const { return group + 1 == groups ? pieces_last : pieces_full; }
  const float* scales(const uint8_t* row) const { return reinterpret_cast<const float*>(row + act_scale_offset); }
  const int32_t* corrections(const uint8_t* row) const {
    return reinterpret_cast<const int32_t*>(row + act_corr_offset);
  }
  // Lanes of tile t inside [n_begin, n_end) (none when the tile is outside).
  static __mmask16 rows_of(int64_t t, int64_t n_begin, int64_t n_end) {
    const int64_t lo = std::clamp<int64_t>(n_begin - t * kTileRows, 0, kTileRows);
    const int64_t hi = std::clamp<int64_t>(n_end - t * kTileRows, 0, kTileRows);
    return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  }
};

// Cache lines for `weight_bytes` of private weights, once check_memory_budget has accepted them,
// the per-thread `scratch_bytes` and the (largest) prepared activation row, `row_bytes`.
inline size_t budgeted_lines(const PackedWeights& w, size_t row_bytes, size_t weight_bytes, size_t scratch_bytes) {
  check_memory_budget(w, static_cast<double>(weight_bytes) + static_cast<double>(scratch_bytes),
                      static_cast<double>(row_bytes));
  return (weight_bytes + sizeof(Line) - 1) / sizeof(Line);
}

// Writes y rows [0, rows) of tile t (masked lanes only) from running sums ysum[row][16] + bias.
inline void store_tile(const float* ysum, size_t ysum_stride, int64_t rows, int64_t t, __mmask16 mask,
                       const float* bias, float* y, int64_t n) {
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + t * kTileRows) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i)
    _mm512_mask_storeu_ps(y + i * n + t * kTileRows, mask, add_exact(_mm512_load_ps(ysum + i * ysum_stride), b));
}

// --- weight planes: the prefill path of every format ---------------------------------------------
//
// From some rows of A on (kSmallBatch for i2s, kPlaneMinRows for sherry and tl2), every format
// multiplies like a GEMM: the weights of kPlaneTiles tiles are decoded, a block of groups at a time,
// into an L1 buffer of w + 1 weight planes, and one VNNI micro-kernel (kPlaneRows rows of A x
// kPlaneTiles tiles) runs over all the rows of A it is given; a format brings only its decode.
// A *step* is 4 columns of a piece: lane p of its 4 blocks of 4 (sherry, i2s) or of its 4 triples
// (tl2); a piece has Lanes steps (4 or 3). A step's plane is one zmm per tile whose byte 4r + j holds
// w + 1 of row r at lane p of block or triple j; a prepared row holds per group one dword per step
// (byte j: xq of that column), -Σxq and s (PlaneRows). vpdpbusd multiplies the unsigned w + 1 by the
// signed xq, and the accumulators start at -Σxq, which takes the +1 back out.

constexpr int kPlaneTiles = 2;                   // tiles decoded together: one micro-kernel column each
constexpr int kPlaneRows = 4;                    // rows of A per micro-kernel call
constexpr size_t kPlaneBufferBytes = 24 * 1024;  // decoded weight block target (L1)
// The fewest rows of A a compute() call on the plane path should get (min_row_chunk): each call
// decodes its tiles once. Measured through onnxruntime at 128 rows, 1 thread (Zen 4): chunks of 128
// rows ran sherry and tl2 2-5% faster than chunks of 64 and 4-8% faster than 32 (i2s: 0-3%).
constexpr int64_t kPlaneMinChunk = 128;

// Per-thread scratch of compute(), reused across calls (no allocation once warm).
struct Scratch {
  std::vector<Line> planes;  // plane path: decoded weight block, [step][tile] zmm
  std::vector<Line> alpha;   // plane path: [group in block][tile] 16 float scales
  std::vector<Line> y;       // [row of A][tile] 16 float partial sums
  std::vector<Line> carry;   // code5 lookups: int32 sums of a group split over chunks
};

// Where the plane activations of a prepared row lie (the layout of a Plan with 4 x lanes activation
// bytes per piece and corrections): group g at g * group_bytes, a piece's Lanes step dwords after
// another; one int32 -Σxq and one float s per group. Rows lie row_bytes apart: the plan's, and the
// `head` bytes a kernel keeps before each (the layout starts after them).
struct PlaneRows {
  size_t row_bytes, group_bytes, piece_bytes, corr_offset, scale_offset;
  int64_t groups, pieces_full, pieces_last;
  // lanes: steps per piece (the plan's pieces are 4 x lanes columns).
  PlaneRows(const Plan& plan, int lanes, size_t head = 0)
      : row_bytes(head + plan.act_row_bytes),
        group_bytes(static_cast<size_t>(plan.pieces_full) * 4 * static_cast<size_t>(lanes)),
        piece_bytes(4 * static_cast<size_t>(lanes)),
        corr_offset(plan.act_corr_offset),
        scale_offset(plan.act_scale_offset),
        groups(plan.groups),
        pieces_full(plan.pieces_full),
        pieces_last(plan.pieces_last) {}
  int64_t pieces(int64_t g) const { return g + 1 == groups ? pieces_last : pieces_full; }
  int32_t correction(const uint8_t* row, int64_t g) const {
    return reinterpret_cast<const int32_t*>(row + corr_offset)[g];
  }
  float scale(const uint8_t* row, int64_t g) const { return reinterpret_cast<const float*>(row + scale_offset)[g]; }
};

// The per-thread scratch the plane path decodes into: kPlaneBufferBytes, or one group's planes.
inline size_t plane_scratch_bytes(const PlaneRows& a) {
  return std::max<size_t>(kPlaneBufferBytes,
                          static_cast<size_t>(a.pieces_full) * a.piece_bytes / 4 * kPlaneTiles * sizeof(Line));
}

// vpermb indices that turn 4 pieces of 4 x lanes quantized columns, piece v in bytes [16v, 16v + 4
// lanes) (column lanes j + p: lane p of block or triple j), into their step dwords, packed: byte
// 4 lanes v + 4p + j.
inline __m512i plane_order(int lanes) {
  alignas(64) uint8_t index[64] = {};
  for (int v = 0; v < 4; ++v)
    for (int p = 0; p < lanes; ++p)
      for (int j = 0; j < 4; ++j) index[4 * lanes * v + 4 * p + j] = static_cast<uint8_t>(16 * v + lanes * j + p);
  return _mm512_load_si512(index);
}

// The plane activations (layout `a`, Lanes = piece_bytes / 4), -Σxq and s of every group of one row;
// `order` is plane_order(Lanes).
inline void prepare_plane_row(const Plan& plan, const PlaneRows& a, __m512i order, const float* a_row,
                              uint8_t* ws) {
  const Geometry& g = plan.g;
  const int64_t piece_cols = static_cast<int64_t>(a.piece_bytes);  // one byte per column
  auto* corr = reinterpret_cast<int32_t*>(ws + a.corr_offset);
  auto* scale = reinterpret_cast<float*>(ws + a.scale_offset);
  for (int64_t gi = 0; gi < plan.groups; ++gi) {
    const float* x = a_row + g.group_begin(gi);
    const int64_t length = g.group_length(gi), pieces = plan.pieces(gi);
    uint8_t* out = ws + gi * a.group_bytes;
    const float amax = group_amax(x, length);
    if (!(amax > 0.f)) {
      std::memset(out, 0, static_cast<size_t>(pieces) * a.piece_bytes);
      corr[gi] = 0;
      scale[gi] = std::isnan(amax) ? amax : 0.f;  // a non-finite group makes the row NaN
      continue;
    }
    const __m512 inv = _mm512_set1_ps(static_cast<float>(kActivationQmax) / amax);
    // Σxq from the bytes themselves (offset-binary sums of 8), so a NaN product counts as its 0 byte.
    __m512i sum = _mm512_setzero_si512();
    int64_t summed = 0;
    for (int64_t piece = 0, c = 0; piece < pieces; piece += 4, c += 4 * piece_cols, summed += 64) {
      __m512i bytes = _mm512_setzero_si512();
      for (int v = 0; v < 4 && c + piece_cols * v < length; ++v) {
        const int64_t first = c + piece_cols * v;
        bytes = _mm512_mask_broadcast_i32x4(bytes, static_cast<__mmask16>(0xF << (4 * v)),  // 128-bit lane v
                                            _mm512_cvtepi32_epi8(quantize16(x + first,
                                                                            std::min(piece_cols, length - first), inv)));
      }
      sum = _mm512_add_epi64(sum, _mm512_sad_epu8(_mm512_xor_si512(bytes, _mm512_set1_epi8(-128)), _mm512_setzero_si512()));
      const int64_t stored = std::min<int64_t>(4, pieces - piece) * piece_cols;
      const __mmask64 store = stored == 64 ? ~0ull : (1ull << stored) - 1;
      _mm512_mask_storeu_epi8(out + piece * piece_cols, store, _mm512_permutexvar_epi8(order, bytes));
    }
    corr[gi] = static_cast<int32_t>(128 * summed - _mm512_reduce_add_epi64(sum));
    scale[gi] = amax / static_cast<float>(kActivationQmax);
  }
}

// Rows [0, MR) of A against the decoded block of groups [g_begin, g_end) of NT tiles in s; adds each
// group's contribution to ysum[row][tile][16], in group order.
template <int Lanes, int MR, int NT>
void plane_micro_kernel(const PlaneRows& a, const uint8_t* ws, int64_t g_begin, int64_t g_end, const Scratch& s,
                        float* ysum) {
  const auto* b = reinterpret_cast<const __m512i*>(s.planes.data());
  const auto* alpha = reinterpret_cast<const float*>(s.alpha.data());
  for (int64_t gi = g_begin; gi < g_end; ++gi) {
    __m512i acc[MR][NT];
    const uint8_t* act[MR];
    for (int i = 0; i < MR; ++i) {
      act[i] = ws + i * a.row_bytes + gi * a.group_bytes;
      const __m512i corr = _mm512_set1_epi32(a.correction(ws + i * a.row_bytes, gi));
      for (int t = 0; t < NT; ++t) acc[i][t] = corr;
    }
    for (int64_t piece = 0, pieces = a.pieces(gi); piece < pieces; ++piece) {
#pragma GCC unroll 4
      for (int p = 0; p < Lanes; ++p, b += NT) {
        __m512i bt[NT];
        for (int t = 0; t < NT; ++t) bt[t] = _mm512_load_si512(b + t);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const __m512i x = broadcast_dword(act[i] + piece * 4 * Lanes + 4 * p);
          for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], bt[t], x);
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      const __m512 al = _mm512_load_ps(alpha + ((gi - g_begin) * NT + t) * kTileRows);
      for (int i = 0; i < MR; ++i)
        accumulate_group(ysum + (i * NT + t) * kTileRows, acc[i][t], al, a.scale(ws + i * a.row_bytes, gi));
    }
  }
}

// Tiles [t, t + NT) against rows [0, m) of A, block of groups after block: decode(tile, g_begin,
// g_end, NT, planes, alpha) writes the tile's planes of the block's steps at planes[NT * step] and
// the 16 float scales of each group g at alpha[(g - g_begin) * NT * 16]; ysum[row][tile][16].
template <int Lanes, int NT, class Decode>
void plane_tiles(const PlaneRows& a, const uint8_t* ws, int64_t m, int64_t t, float* ysum, Scratch& s,
                 const Decode& decode) {
  const size_t group_lines = static_cast<size_t>(a.pieces_full) * Lanes * NT;
  const int64_t block_groups = std::max<int64_t>(1, static_cast<int64_t>(kPlaneBufferBytes / (group_lines * sizeof(Line))));
  const int64_t max_groups = std::min(block_groups, a.groups);
  s.planes.resize(static_cast<size_t>(max_groups) * group_lines);
  s.alpha.resize(static_cast<size_t>(max_groups) * NT);
  for (int64_t g_begin = 0; g_begin < a.groups; g_begin += block_groups) {
    const int64_t g_end = std::min(a.groups, g_begin + block_groups);
    for (int tt = 0; tt < NT; ++tt)
      decode(t + tt, g_begin, g_end, NT, reinterpret_cast<__m512i*>(s.planes.data()) + tt,
             as_floats(s.alpha) + tt * kTileRows);
    for (int64_t m0 = 0; m0 < m; m0 += kPlaneRows) {
      dispatch<kPlaneRows>(static_cast<int>(std::min<int64_t>(kPlaneRows, m - m0)), [&](auto rows) {
        plane_micro_kernel<Lanes, decltype(rows)::value, NT>(a, ws + m0 * a.row_bytes, g_begin, g_end, s,
                                                             ysum + m0 * NT * kTileRows);
      });
    }
  }
}

// The plane path of compute(): rows [0, m) of A prepared at ws, output rows [n_begin, n_end) of N,
// kPlaneTiles tiles at a time (see plane_tiles for decode).
template <int Lanes, class Decode>
void plane_compute(const PlaneRows& a, const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, int64_t n,
                   const float* bias, float* y, Scratch& s, const Decode& decode) {
  const int64_t t_begin = n_begin / kTileRows, t_end = ceil_div(std::min(n_end, n), kTileRows);
  for (int64_t t = t_begin; t < t_end;) {
    const int nt = static_cast<int>(std::min<int64_t>(kPlaneTiles, t_end - t));
    s.y.assign(static_cast<size_t>(m * nt), Line{});
    float* ysum = as_floats(s.y);
    dispatch<kPlaneTiles>(nt, [&](auto tiles) {
      plane_tiles<Lanes, decltype(tiles)::value>(a, ws, m, t, ysum, s, decode);
    });
    for (int tt = 0; tt < nt; ++tt)
      store_tile(ysum + tt * kTileRows, static_cast<size_t>(nt) * kTileRows, m, t + tt,
                 Plan::rows_of(t + tt, n_begin, n_end), bias, y, n);
    t += nt;
  }
}

// --- sherry and tl2: 5-bit codes, activation lookup tables ---------------------------------------

struct SherryCodes {
  static constexpr Format kFormat = Format::kSherry;
  static constexpr int kLanes = 4;      // weights per code
  static constexpr int kPieceCols = 16;
  // Lanes of the positive code with index idx.
  static void lanes(int idx, int8_t out[4]) { sherry_lanes(static_cast<uint8_t>(idx), out); }
  static int64_t codes_in_group(int64_t length) { return length / kSherryBlock; }
  // From this many rows of A in a call on, the plane path. Crossover measured on Zen 4, 1 thread,
  // group 128 (lookups / planes): 0.87-0.94 at 16 rows, 0.95-1.05 at 24, 0.97-1.09 at 32 and
  // 1.02-1.11 at 48 over the four LLaMA-3.2-1B shapes.
  static constexpr int64_t kPlaneMinRows = 32;
};

struct TL2Codes {
  static constexpr Format kFormat = Format::kTL2;
  static constexpr int kLanes = 3;
  static constexpr int kPieceCols = 12;
  static void lanes(int idx, int8_t out[3]) {
    if (!tl2_lanes(static_cast<uint8_t>(idx), out)) std::fill(out, out + 3, int8_t{0});  // 14, 15: never used
  }
  static int64_t codes_in_group(int64_t length) { return ceil_div(length, 3); }
  // Crossover (lookups / planes; 2048->2048, 2048->512, 8192->2048): 0.66-1.03 at 8 rows, 0.82-1.09
  // at 12, 1.00-1.19 at 16, 1.06-1.28 at 24.
  static constexpr int64_t kPlaneMinRows = 16;
};

constexpr int kBlockTiles = 8;         // tiles (128 rows) interleaved in one weight stream
constexpr size_t kPairBytes = 80;      // two pieces of 64 codes
constexpr size_t kHalfBytes = 40;      // a group's last odd piece
constexpr size_t kTableBytes = 256;    // per piece: xl tables (2 x 64), then xh tables (2 x 64)

inline size_t code5_group_bytes(int64_t pieces) {
  return static_cast<size_t>(pieces / 2) * kPairBytes + static_cast<size_t>(pieces % 2) * kHalfBytes;
}

// The constants of table building and lookups, and of the plane path's decode.
struct LutConstants {
  // Entry 16j + idx of the positive sums: Σ_p (x[col(j, p)] ^ flip[p]) + negatives, where
  // shuffle[p] selects that column (or zero, 0x80, where lane p of idx is 0) and flip[p] is -1 where
  // it is -1 (x ^ -1 = -x - 1; `negatives` adds the 1s back).
  __m512i shuffle[4], flip[4];
  __m512i negatives = _mm512_setzero_si512();
  __m512i low_nibble = _mm512_set1_epi8(0x0F);
  __m512i block_bits[2];        // byte i: (i % 4) << 4 (block slot of code i), without / with the sign bit 6
  __m512i ones = _mm512_set1_epi8(1);
  __m512i sixteens = _mm512_set1_epi8(16);
  // The plane path: entry `code` (5 bits: index | sign << 4) of plane[p] is w + 1 of lane p of the
  // code; code_sign is the code's sign bit, plane_order the activations' (plane_order).
  __m512i plane[4];
  __m512i code_sign = _mm512_set1_epi8(0x10);
  __m512i plane_order;
};

template <class F>
LutConstants make_lut_constants() {
  LutConstants c;
  alignas(64) uint8_t bytes[64];
  alignas(64) uint8_t flips[64], negatives[64] = {};
  for (int p = 0; p < F::kLanes; ++p) {
    for (int e = 0; e < 64; ++e) {
      const int j = e / 16;
      int8_t lanes[4] = {0, 0, 0, 0};
      F::lanes(e % 16, lanes);
      bytes[e] = static_cast<uint8_t>(lanes[p] == 0 ? 0x80 : F::kLanes == 4 ? 4 * j + p : 3 * j + p);
      flips[e] = lanes[p] < 0 ? 0xFF : 0;
      negatives[e] = static_cast<uint8_t>(negatives[e] + (lanes[p] < 0));
    }
    c.shuffle[p] = _mm512_load_si512(bytes);
    c.flip[p] = _mm512_load_si512(flips);
  }
  c.negatives = _mm512_load_si512(negatives);
  for (int sign = 0; sign < 2; ++sign) {
    for (int i = 0; i < 64; ++i) bytes[i] = static_cast<uint8_t>(sign << 6 | (i % 4) << 4);
    c.block_bits[sign] = _mm512_load_si512(bytes);
  }
  for (int p = 0; p < 4; ++p) {
    for (int e = 0; e < 64; ++e) {
      int8_t lanes[4] = {0, 0, 0, 0};
      F::lanes(e & 0x0F, lanes);
      bytes[e] = static_cast<uint8_t>(p < F::kLanes ? ((e & 0x10) ? -lanes[p] : lanes[p]) + 1 : 0);
    }
    c.plane[p] = _mm512_load_si512(bytes);
  }
  c.plane_order = plane_order(F::kLanes);
  return c;
}

// The 256 table bytes of one piece from its activation nibbles (natural column order; `xl`, `xh`
// readable for 16 bytes). Entry (sign << 6 | j << 4 | idx) = ±Σ_p lanes(idx)[p] · x[col(j, p)]:
// the positive sums, then their negations.
template <class F>
inline void build_tables(const int8_t* xl, const int8_t* xh, uint8_t* out, const LutConstants& c) {
  const int8_t* src[2] = {xl, xh};
  for (int h = 0; h < 2; ++h) {
    const __m512i x = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src[h])));
    __m512i pos = c.negatives;
    for (int p = 0; p < F::kLanes; ++p)
      pos = _mm512_add_epi8(pos, _mm512_xor_si512(_mm512_shuffle_epi8(x, c.shuffle[p]), c.flip[p]));
    _mm512_store_si512(out + 128 * h, pos);
    _mm512_store_si512(out + 128 * h + 64, _mm512_sub_epi8(_mm512_setzero_si512(), pos));
  }
}

// One scale group's tables: quantizes its `length` activations (AVX-512, the shared numerics of
// formats.h) and writes the 256 table bytes of each of its `pieces` pieces at `out`; returns the
// group's scale (0 for an all-zero group, NaN for a non-finite one, whose tables are all zero).
template <class F>
float group_tables(const float* x, int64_t length, int64_t pieces, uint8_t* out, const LutConstants& c) {
  constexpr int64_t kUnitCols = 4 * F::kPieceCols;  // columns quantized at a time: 4 pieces
  const float amax = group_amax(x, length);
  if (!(amax > 0.f)) {  // xq = 0: all-zero tables
    std::memset(out, 0, static_cast<size_t>(pieces) * kTableBytes);
    return std::isnan(amax) ? amax : 0.f;  // a non-finite group makes the row NaN
  }
  const __m512 inv = _mm512_set1_ps(static_cast<float>(kActivationQmax) / amax);
  for (int64_t piece = 0, col = 0; piece < pieces; piece += 4, col += kUnitCols) {
    // Natural-order nibbles of 4 pieces; 16 bytes of slack for tl2's last 16-byte read.
    alignas(64) int8_t xl[80] = {}, xh[80] = {};
    for (int v = 0; v < 4; ++v) {
      const int64_t left = std::min<int64_t>(length, col + kUnitCols) - (col + 16 * v);
      if (left <= 0) break;
      const __m512i q = quantize16(x + col + 16 * v, left, inv);
      _mm_store_si128(reinterpret_cast<__m128i*>(xl + 16 * v),
                      _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(15))));
      _mm_store_si128(reinterpret_cast<__m128i*>(xh + 16 * v), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 4)));
    }
    for (int64_t p = 0; p < std::min<int64_t>(4, pieces - piece); ++p)
      build_tables<F>(xl + p * F::kPieceCols, xh + p * F::kPieceCols, out + (piece + p) * kTableBytes, c);
  }
  return amax / static_cast<float>(kActivationQmax);
}

// (nibbles & 0x0F) | (sign ? set : clear) per byte: an index from a code's nibble (index in bits
// 0-3, anything above) and its sign mask. Blend + ternlog: two cheap ops, no register copies.
inline __m512i nibble_index(__m512i nibbles, __mmask64 sign, __m512i low_nibble, __m512i clear, __m512i set) {
  return _mm512_ternarylogic_epi32(nibbles, low_nibble, _mm512_mask_blend_epi8(sign, clear, set), 0xEA);
}

// Table index (sign << 6 | j << 4 | idx) of each code of a piece.
inline __m512i table_index(__m512i nibbles, __mmask64 sign, const LutConstants& c) {
  return nibble_index(nibbles, sign, c.low_nibble, c.block_bits[0], c.block_bits[1]);
}

// The 5-bit code (idx | sign << 4) of each code of a piece: the plane tables' index.
inline __m512i code_index(__m512i nibbles, __mmask64 sign, const LutConstants& c) {
  return nibble_index(nibbles, sign, c.low_nibble, _mm512_setzero_si512(), c.code_sign);
}

// A K-chunk of the code5 layout: whole groups [g_begin, g_end), or the pairs [pair_begin,
// pair_end) of one large group (g_end = g_begin + 1), so that the chunk's activation tables fit L1.
struct Chunk {
  int64_t g_begin, g_end;
  int64_t pair_begin, pair_end;  // for a split group; whole groups: 0 and -1
  size_t tile_bytes;             // weight bytes per tile
  bool split() const { return pair_end >= 0; }
};

// Tiles of a pass of `rows` rows of A over a block: as many as the accumulators (one zmm per row
// and tile) and the tables or indices (see lookup_pair) leave registers for.
constexpr int pass_tiles(int rows) { return rows == 1 ? 8 : 4; }

// Calls fn(std::integral_constant<int, n>) for a runtime power of two n in [1, Max].
template <int Max, class Fn>
inline void dispatch_pow2(int n, Fn&& fn) {
  if constexpr (Max > 1) {
    if (n < Max) return dispatch_pow2<Max / 2>(n, fn);
  }
  fn(std::integral_constant<int, Max>{});
}

// Sets code (index | sign << 4) at position i (= 4 r + j) of piece A or B of a pair, or of a half.
inline void put_pair_code(uint8_t* pair, int piece, int i, uint8_t code) {
  pair[i] |= static_cast<uint8_t>((code & 0x0F) << (4 * piece));
  pair[64 + 8 * piece + i / 8] |= static_cast<uint8_t>((code >> 4) << (i % 8));
}
inline void put_half_code(uint8_t* half, int i, uint8_t code) {
  half[i % 32] |= static_cast<uint8_t>((code & 0x0F) << (4 * (i / 32)));
  half[32 + i / 8] |= static_cast<uint8_t>((code >> 4) << (i % 8));
}

template <class F>
class Code5Kernel final : public MatMulKernel {
 public:
  explicit Code5Kernel(const PackedWeights& w);

  KernelPath path() const override { return KernelPath::kAVX512; }
  int64_t row_tile() const override { return superblock_ * kBlockTiles * kTileRows; }
  // A prepared row: kRowHead bytes whose first dword marks the layout (compute() may get a chunk of
  // fewer rows than the call has, and follows the mark), then the lookup tables (plan_) for a call
  // of fewer than F::kPlaneMinRows rows, else the plane activations (plane_plan_), 16x smaller.
  size_t activation_row_bytes() const override { return table_stride(); }
  size_t activation_row_bytes_for(int64_t call_rows) const override {
    return plane_path(call_rows) ? planes_.row_bytes : table_stride();
  }
  void prepare_row(const float* a_row, uint8_t* ws) const override { prepare_row_for(a_row, 1, ws); }
  void prepare_row_for(const float* a_row, int64_t call_rows, uint8_t* ws) const override;
  int64_t min_row_chunk(int64_t call_rows) const override {
    return plane_path(call_rows) ? kPlaneMinChunk : 1;
  }
  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override;

 private:
  static constexpr size_t kRowHead = 64;
  static bool plane_path(int64_t call_rows) { return call_rows >= F::kPlaneMinRows; }
  size_t table_stride() const { return kRowHead + plan_.act_row_bytes; }
  // Block b holds tiles [8b, 8b + block_tiles(b)); a short last block is laid out as a power of
  // two of tiles (block_alloc), so that passes of 2^k tiles cover it.
  int block_tiles(int64_t b) const {
    return static_cast<int>(std::min<int64_t>(kBlockTiles, plan_.tiles - b * kBlockTiles));
  }
  int block_alloc(int64_t b) const {
    int alloc = 1;
    while (alloc < block_tiles(b)) alloc *= 2;
    return alloc;
  }
  // Byte offset of chunk c of block b: superblocks, then chunks, then blocks (see the top).
  size_t chunk_offset(int64_t b, size_t c) const;
  void repack(const PackedWeights& w);
  void prepare_tables(const float* a_row, uint8_t* ws) const;
  // The plane path's decode of tile t (plane_tiles): planes and scales of groups [g_begin, g_end).
  void decode_planes(int64_t t, int64_t g_begin, int64_t g_end, int nt, __m512i* out, float* alpha) const;
  template <int MB, int NT>
  void lut_pass(const uint8_t* ws, int64_t block, int t_first, const Chunk& chunk, float* ysum, size_t ysum_row,
                __m512i* carry) const;
  template <int MB, int NT>
  void lookup_pair(__m512i (&acc)[MB][NT], const uint8_t* const (&entries)[NT],
                   const uint8_t* const (&tables)[MB]) const;
  template <int MB, int NT>
  void lookup_half(__m512i (&acc)[MB][NT], const uint8_t* const (&halves)[NT],
                   const uint8_t* const (&tables)[MB]) const;

  Plan plan_;         // the weights, and the lookup tables of a prepared row
  Plan plane_plan_;   // the plane activations of a prepared row
  PlaneRows planes_;  // ... as the plane path reads them
  int64_t blocks_;
  int64_t superblock_;  // blocks per superblock
  std::vector<Chunk> chunks_;
  std::vector<size_t> chunk_prefix_;  // weight bytes per tile of the chunks before each
  // Per group: its (first) chunk, and the weight bytes per tile of the chunk's groups before it.
  std::vector<size_t> group_chunk_, group_offset_;
  LutConstants lut_;
  WeightBuffer weights_;
};

template <class F>
Code5Kernel<F>::Code5Kernel(const PackedWeights& w)
    : plan_(w.geometry, F::kPieceCols, kTableBytes, false, code5_group_bytes),
      plane_plan_(w.geometry, F::kPieceCols, 4 * F::kLanes, true, code5_group_bytes),
      planes_(plane_plan_, F::kLanes, kRowHead),
      blocks_(ceil_div(plan_.tiles, kBlockTiles)),
      superblock_(superblock_blocks(blocks_)),
      lut_(make_lut_constants<F>()),
      weights_(budgeted_lines(w, std::max(table_stride(), planes_.row_bytes),
                              plan_.tile_wbytes * static_cast<size_t>((blocks_ - 1) * kBlockTiles +
                                                                      block_alloc(blocks_ - 1)),
                              plane_scratch_bytes(planes_))) {
  // Chunks of about 16 pieces (4 KiB of tables per row of A); a lone block reuses no tables, so
  // it takes K in one chunk.
  const int64_t kChunkPieces = superblock_ > 1 ? 16 : std::numeric_limits<int64_t>::max();
  for (int64_t g = 0; g < plan_.groups;) {
    const int64_t pieces = plan_.pieces(g);
    if (pieces > kChunkPieces) {  // split a large group into runs of pairs
      const int64_t pairs = pieces / 2;
      for (int64_t p = 0; p < pairs || (p == 0 && pairs == 0);) {
        const int64_t end = std::min(pairs, p + kChunkPieces / 2);
        const bool last = end == pairs;
        const size_t bytes = static_cast<size_t>(end - p) * kPairBytes +
                             (last ? static_cast<size_t>(pieces % 2) * kHalfBytes + kAlphaBytes : 0);
        chunks_.push_back({g, g + 1, p, end, bytes});
        p = end;
      }
      ++g;
      continue;
    }
    int64_t end = g, total = 0;
    size_t bytes = 0;
    while (end < plan_.groups && (end == g || total + plan_.pieces(end) <= kChunkPieces)) {
      total += plan_.pieces(end);
      bytes += code5_group_bytes(plan_.pieces(end)) + kAlphaBytes;
      ++end;
    }
    chunks_.push_back({g, end, 0, -1, bytes});
    g = end;
  }
  chunk_prefix_.push_back(0);
  for (const Chunk& c : chunks_) chunk_prefix_.push_back(chunk_prefix_.back() + c.tile_bytes);
  group_chunk_.resize(static_cast<size_t>(plan_.groups));
  group_offset_.resize(static_cast<size_t>(plan_.groups));
  for (size_t c = chunks_.size(); c-- > 0;) {  // backwards: a split group keeps its first chunk
    size_t offset = 0;
    for (int64_t gi = chunks_[c].g_begin; gi < chunks_[c].g_end; ++gi) {
      group_chunk_[gi] = c;
      group_offset_[gi] = offset;
      offset += code5_group_bytes(plan_.pieces(gi)) + kAlphaBytes;
    }
  }
  repack(w);
}

template <class F>
size_t Code5Kernel<F>::chunk_offset(int64_t b, size_t c) const {
  const int64_t sb = b / superblock_, first = sb * superblock_;
  const int64_t last = std::min(blocks_, first + superblock_);
  // Tiles laid out in this superblock: all blocks full but possibly the very last one.
  const int64_t tiles = (last - 1 - first) * kBlockTiles + block_alloc(last - 1);
  return static_cast<size_t>(first) * kBlockTiles * plan_.tile_wbytes + chunk_prefix_[c] * tiles +
         chunks_[c].tile_bytes * static_cast<size_t>((b - first) * kBlockTiles);
}

template <class F>
void Code5Kernel<F>::repack(const PackedWeights& w) {
  const Geometry& g = plan_.g;
  uint8_t* out = weights_.data();
  std::memset(out, 0, weights_.size());  // code 0 pads (sherry: any code would do)
  const int64_t stride = row_bytes(F::kFormat, g.k, g.group_size);
  const int64_t row_codes = codes_per_row(F::kFormat, g.k, g.group_size);
  std::vector<int8_t> values(static_cast<size_t>(g.k));
  // Every sherry code is valid; tl2 rows go through the reference decoder's validation.
  if (F::kFormat == Format::kTL2) {
    for (int64_t n = 0; n < g.n; ++n)
      if (!decode_row(F::kFormat, w.data + n * stride, g.k, g.group_size, values.data()))
        throw std::runtime_error("corrupt tl2 weights: row " + std::to_string(n) + " holds an invalid code");
  }
  std::vector<int64_t> first_code(static_cast<size_t>(plan_.groups) + 1, 0);
  for (int64_t gi = 0; gi < plan_.groups; ++gi)
    first_code[gi + 1] = first_code[gi] + F::codes_in_group(g.group_length(gi));
  // Walk the layout exactly as lut_pass reads it.
  for (int64_t b = 0; b < blocks_; ++b) {
    const int alloc = block_alloc(b);
    for (size_t c = 0; c < chunks_.size(); ++c) {
      const Chunk& chunk = chunks_[c];
      uint8_t* p = out + chunk_offset(b, c);
      for (int64_t gi = chunk.g_begin; gi < chunk.g_end; ++gi) {
        const int64_t pieces = plan_.pieces(gi), codes = first_code[gi + 1] - first_code[gi];
        const int64_t pair_begin = chunk.split() ? chunk.pair_begin : 0;
        const int64_t pair_end = chunk.split() ? chunk.pair_end : pieces / 2;
        const bool last = !chunk.split() || pair_end == pieces / 2;
        for (int t = 0; t < block_tiles(b); ++t) {
          for (int r = 0; r < kTileRows; ++r) {
            const int64_t n = (b * kBlockTiles + t) * kTileRows + r;
            if (n >= g.n) break;
            const uint8_t* row = w.data + n * stride;
            auto code = [&](int64_t c) { return code5_at(row, row_codes, first_code[gi] + c); };
            for (int64_t c = pair_begin * 8; c < std::min(codes, pair_end * 8); ++c)
              put_pair_code(p + ((c / 8 - pair_begin) * alloc + t) * kPairBytes, static_cast<int>(c / 4 % 2),
                            4 * r + static_cast<int>(c % 4), code(c));
            if (!last) continue;
            uint8_t* tail = p + (pair_end - pair_begin) * alloc * kPairBytes;
            for (int64_t c = pair_end * 8; c < codes; ++c)  // the half pair
              put_half_code(tail + t * kHalfBytes, 4 * r + static_cast<int>(c % 4), code(c));
            std::memcpy(tail + (pieces % 2) * alloc * kHalfBytes + t * kAlphaBytes + 2 * r,
                        &w.scales[n * plan_.groups + gi], 2);
          }
        }
        p += (pair_end - pair_begin) * alloc * kPairBytes;
        if (last) p += (pieces % 2) * alloc * kHalfBytes + alloc * kAlphaBytes;
      }
    }
  }
}

template <class F>
void Code5Kernel<F>::prepare_row_for(const float* a_row, int64_t call_rows, uint8_t* ws) const {
  const int32_t planes = plane_path(call_rows);
  std::memcpy(ws, &planes, sizeof planes);
  if (planes) prepare_plane_row(plane_plan_, planes_, lut_.plane_order, a_row, ws + kRowHead);
  else prepare_tables(a_row, ws + kRowHead);
}

template <class F>
void Code5Kernel<F>::prepare_tables(const float* a_row, uint8_t* ws) const {
  const Geometry& g = plan_.g;
  auto* scale = reinterpret_cast<float*>(ws + plan_.act_scale_offset);
  for (int64_t gi = 0; gi < plan_.groups; ++gi)
    scale[gi] = group_tables<F>(a_row + g.group_begin(gi), g.group_length(gi), plan_.pieces(gi),
                                ws + gi * plan_.act_group_bytes, lut_);
}

// A whole pair of pieces of NT tiles for MB rows of A: the xl sums of the two pieces are added in
// int8 first (|sum| <= 90), and so are the xh sums (|sum| <= 48), so that one vpdpbusd each covers
// both pieces. tables[i]: row i's tables of piece A (piece B's follow). One row keeps its 8 table
// vectors in registers over all tiles; more rows keep every tile's two indices instead.
template <class F>
template <int MB, int NT>
inline void Code5Kernel<F>::lookup_pair(__m512i (&acc)[MB][NT], const uint8_t* const (&entries)[NT],
                                        const uint8_t* const (&tables)[MB]) const {
  const LutConstants& c = lut_;
  auto indices = [&](int t, __m512i& a, __m512i& b) {
    const uint8_t* e = entries[t];
    a = table_index(_mm512_loadu_si512(e), load_mask64(e + 64), c);
    b = table_index(_mm512_srli_epi16(_mm512_loadu_si512(e), 4), load_mask64(e + 72), c);
  };
  auto add = [&](__m512i& acc, __m512i a, __m512i b, const __m512i (&table)[8]) {
    const __m512i lo = _mm512_add_epi8(_mm512_permutex2var_epi8(table[0], a, table[1]),
                                       _mm512_permutex2var_epi8(table[4], b, table[5]));
    const __m512i hi = _mm512_add_epi8(_mm512_permutex2var_epi8(table[2], a, table[3]),
                                       _mm512_permutex2var_epi8(table[6], b, table[7]));
    acc = _mm512_dpbusd_epi32(acc, c.ones, lo);
    acc = _mm512_dpbusd_epi32(acc, c.sixteens, hi);
  };
  if constexpr (MB == 1) {
    __m512i table[8];
    for (int q = 0; q < 8; ++q) table[q] = _mm512_load_si512(tables[0] + 64 * q);
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) {
      __m512i a, b;
      indices(t, a, b);
      add(acc[0][t], a, b, table);
    }
  } else {
    __m512i a[NT], b[NT];
#pragma GCC unroll 16
    for (int t = 0; t < NT; ++t) indices(t, a[t], b[t]);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      __m512i table[8];
      for (int q = 0; q < 8; ++q) table[q] = _mm512_load_si512(tables[i] + 64 * q);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) add(acc[i][t], a[t], b[t], table);
    }
  }
}

// The half pair ending a group with an odd number of pieces, NT tiles, MB rows of A. halves[t]:
// the tile's half pair; tables[i]: row i's tables of the piece. Runs once per group, so it simply
// reloads the tables per tile.
template <class F>
template <int MB, int NT>
inline void Code5Kernel<F>::lookup_half(__m512i (&acc)[MB][NT], const uint8_t* const (&halves)[NT],
                                        const uint8_t* const (&tables)[MB]) const {
  const LutConstants& c = lut_;
  for (int t = 0; t < NT; ++t) {
    // Codes 0-31 in the low nibbles of 32 bytes, 32-63 in the high nibbles.
    const __m512i both =
        _mm512_maskz_broadcast_i64x4(0xFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(halves[t])));
    const __m512i idx = table_index(_mm512_mask_srli_epi16(both, 0xFFFF0000u, both, 4), load_mask64(halves[t] + 32), c);
    for (int i = 0; i < MB; ++i) {
      const uint8_t* tb = tables[i];
      acc[i][t] = _mm512_dpbusd_epi32(
          acc[i][t], c.ones, _mm512_permutex2var_epi8(_mm512_load_si512(tb), idx, _mm512_load_si512(tb + 64)));
      acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], c.sixteens,
                                      _mm512_permutex2var_epi8(_mm512_load_si512(tb + 128), idx,
                                                               _mm512_load_si512(tb + 192)));
    }
  }
}

// Rows [0, MB) of A (prepared at `ws`) against tiles [t_first, t_first + NT) of block `block`
// over one chunk: adds each completed group's contribution, in group order, to
// ysum[i * ysum_row + t] (16 floats each, t counted from t_first). A group split over chunks
// keeps its int32 sums in carry[i * ysum_row + t] between them.
template <class F>
template <int MB, int NT>
void Code5Kernel<F>::lut_pass(const uint8_t* ws, int64_t block, int t_first, const Chunk& chunk, float* ysum,
                              size_t ysum_row, __m512i* carry) const {
  const int alloc = block_alloc(block);
  const uint8_t* w = weights_.data() + chunk_offset(block, &chunk - chunks_.data());
  for (int64_t gi = chunk.g_begin; gi < chunk.g_end; ++gi) {
    const int64_t pieces = plan_.pieces(gi);
    const int64_t pair_begin = chunk.split() ? chunk.pair_begin : 0;
    const int64_t pair_end = chunk.split() ? chunk.pair_end : pieces / 2;
    const bool last = !chunk.split() || pair_end == pieces / 2;
    const uint8_t* tables[MB];
    for (int i = 0; i < MB; ++i)
      tables[i] = ws + i * table_stride() + gi * plan_.act_group_bytes + 2 * pair_begin * kTableBytes;
    __m512i acc[MB][NT];
    for (int i = 0; i < MB; ++i)
      for (int t = 0; t < NT; ++t) acc[i][t] = pair_begin > 0 ? carry[i * ysum_row + t] : _mm512_setzero_si512();
    const uint8_t* entries[NT];
    for (int64_t pair = pair_begin; pair < pair_end; ++pair, w += alloc * kPairBytes) {
      for (int t = 0; t < NT; ++t) entries[t] = w + (t_first + t) * kPairBytes;
      lookup_pair<MB, NT>(acc, entries, tables);
      for (int i = 0; i < MB; ++i) tables[i] += 2 * kTableBytes;
    }
    if (!last) {
      for (int i = 0; i < MB; ++i)
        for (int t = 0; t < NT; ++t) carry[i * ysum_row + t] = acc[i][t];
      continue;
    }
    if (pieces % 2) {
      for (int t = 0; t < NT; ++t) entries[t] = w + (t_first + t) * kHalfBytes;
      lookup_half<MB, NT>(acc, entries, tables);
      w += alloc * kHalfBytes;
    }
    for (int t = 0; t < NT; ++t) {
      const __m512 alpha = load_alpha(w + (t_first + t) * kAlphaBytes);
      for (int i = 0; i < MB; ++i)
        accumulate_group(ysum + (i * ysum_row + t) * kTileRows, acc[i][t], alpha,
                         plan_.scales(ws + i * table_stride())[gi]);
    }
    w += alloc * kAlphaBytes;
  }
}

// Walks the layout as lut_pass does, for one tile: per pair of pieces, the two pieces' 5-bit codes
// (nibble + sign mask, as table_index) and one vpermb per lane into w + 1 planes; the half pair of
// an odd group likewise; then the group's 16 scales.
template <class F>
void Code5Kernel<F>::decode_planes(int64_t t, int64_t g_begin, int64_t g_end, int nt, __m512i* out,
                                   float* alpha) const {
  const LutConstants& c = lut_;
  const int64_t block = t / kBlockTiles;
  const int64_t tile = t % kBlockTiles;
  const int alloc = block_alloc(block);
  auto planes = [&](__m512i code) {
    for (int p = 0; p < F::kLanes; ++p, out += nt) _mm512_store_si512(out, _mm512_permutexvar_epi8(code, c.plane[p]));
  };
  for (int64_t gi = g_begin; gi < g_end; ++gi) {
    const int64_t pieces = plan_.pieces(gi);
    for (size_t ci = group_chunk_[gi];; ++ci) {  // the chunks of a split group follow each other
      const Chunk& chunk = chunks_[ci];
      const uint8_t* w = weights_.data() + chunk_offset(block, ci) + alloc * group_offset_[gi];
      const int64_t pair_begin = chunk.split() ? chunk.pair_begin : 0;
      const int64_t pair_end = chunk.split() ? chunk.pair_end : pieces / 2;
      for (int64_t pair = pair_begin; pair < pair_end; ++pair, w += alloc * kPairBytes) {
        const uint8_t* e = w + tile * kPairBytes;
        const __m512i nibbles = _mm512_loadu_si512(e);
        planes(code_index(nibbles, load_mask64(e + 64), c));
        planes(code_index(_mm512_srli_epi16(nibbles, 4), load_mask64(e + 72), c));
      }
      if (chunk.split() && pair_end != pieces / 2) continue;
      if (pieces % 2) {  // codes 0-31 in the low nibbles of 32 bytes, 32-63 in the high nibbles
        const uint8_t* h = w + tile * kHalfBytes;
        const __m512i both = _mm512_maskz_broadcast_i64x4(0xFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
        planes(code_index(_mm512_mask_srli_epi16(both, 0xFFFF0000u, both, 4), load_mask64(h + 32), c));
        w += alloc * kHalfBytes;
      }
      _mm512_store_ps(alpha, load_alpha(w + tile * kAlphaBytes));
      alpha += nt * kTileRows;
      break;
    }
  }
}

// The rows' mark picks the path. Plane path (F::kPlaneMinRows rows of A or more in the call): see
// plane_compute. Lookups, superblock after superblock of the range, chunk after chunk along K.
// Decode (M <= 4): in a chunk, block after block, all rows of A in each pass (the chunk's tables stay
// in L1 while every block of the superblock runs over them): the weights stream through once.
// Larger M: in a chunk, 3 rows of A at a time, and for each, block after block: like a GEMM with the
// chunk's slice of the superblock's weights (a superblock's K / 16 pieces: 180 KiB for 8192 rows)
// held in L2, the rows' chunk tables in L1, and only their partial sums live.
template <class F>
void Code5Kernel<F>::compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
                             float* y) const {
  if (m <= 0 || n_begin >= n_end) return;
  const int64_t n = plan_.g.n, rows_per_sb = superblock_ * kBlockTiles * kTileRows;
  thread_local Scratch scratch;
  int32_t planes = 0;
  std::memcpy(&planes, ws, sizeof planes);
  ws += kRowHead;  // both layouts start after the head
  if (planes) {
    plane_compute<F::kLanes>(planes_, ws, m, n_begin, n_end, n, bias, y, scratch,
                             [this](int64_t t, int64_t g_begin, int64_t g_end, int nt, __m512i* out, float* alpha) {
                               decode_planes(t, g_begin, g_end, nt, out, alpha);
                             });
    return;
  }
  constexpr int kPrefillRows = 3;
  const int64_t rows_per_step = m <= kSmallBatch ? m : kPrefillRows;
  for (int64_t sb = n_begin / rows_per_sb, sb_end = ceil_div(std::min(n_end, n), rows_per_sb); sb < sb_end; ++sb) {
    const int64_t b_begin = sb * superblock_, b_end = std::min(blocks_, b_begin + superblock_);
    const int64_t tiles = (b_end - b_begin) * kBlockTiles;  // ysum columns (padding tiles unused)
    scratch.y.assign(static_cast<size_t>(m * tiles), Line{});
    scratch.carry.resize(static_cast<size_t>(m * tiles));
    float* ysum = as_floats(scratch.y);
    auto* carry = reinterpret_cast<__m512i*>(scratch.carry.data());
    for (const Chunk& chunk : chunks_) {
      for (int64_t m0 = 0; m0 < m; m0 += rows_per_step) {
        const int rows = static_cast<int>(std::min(rows_per_step, m - m0));
        for (int64_t b = b_begin; b < b_end; ++b) {
          const int alloc = block_alloc(b);
          const int64_t tile0 = (b - b_begin) * kBlockTiles;
          dispatch<kSmallBatch>(rows, [&](auto r) {
            constexpr int MB = decltype(r)::value;
            dispatch_pow2<pass_tiles(MB)>(std::min(alloc, pass_tiles(MB)), [&](auto nt) {
              constexpr int NT = decltype(nt)::value;
              for (int t = 0; t < alloc; t += NT)
                lut_pass<MB, NT>(ws + m0 * table_stride(), b, t, chunk,
                                 ysum + (m0 * tiles + tile0 + t) * kTileRows, tiles,
                                 carry + m0 * tiles + tile0 + t);
            });
          });
        }
      }
    }
    for (int64_t tt = 0; tt < tiles; ++tt) {
      const int64_t t = b_begin * kBlockTiles + tt;
      if (t >= plan_.tiles) break;
      const __mmask16 mask = Plan::rows_of(t, n_begin, n_end);
      if (mask) store_tile(ysum + tt * kTileRows, static_cast<size_t>(tiles) * kTileRows, m, t, mask, bias, y, n);
    }
  }
}

// --- i2s: 2-bit codes, weight planes ------------------------------------------------------------

constexpr size_t kI2SPieceBytes = 64;
constexpr int kI2SLanes = 4;              // steps per piece: lanes of a block of 4
constexpr size_t kI2SActPieceBytes = 16;  // planes as dwords: dword p = xq of lane p of blocks 0..3
// Pieces after which the decode folds its plane accumulators: plane p holds sum(4^p (w+1) xq),
// up to 4 * 2 * 64 * 127 = 65,024 per piece for p = 3, which must not leave int32 before the shift
// by 2p scales it back (33,025 pieces would). Only groups longer than 262,144 columns fold more than
// once.
constexpr int64_t kI2SFoldPieces = 16384;

class I2SKernel final : public MatMulKernel {
 public:
  explicit I2SKernel(const PackedWeights& w)
      : plan_(w.geometry, 16, kI2SActPieceBytes, true,
              [](int64_t pieces) { return static_cast<size_t>(pieces) * kI2SPieceBytes; }),
        planes_(plan_, kI2SLanes),
        order_(plane_order(kI2SLanes)),
        weights_(budgeted_lines(w, plan_.act_row_bytes, plan_.tile_wbytes * static_cast<size_t>(plan_.tiles),
                                plane_scratch_bytes(planes_))) {
    repack(w);
  }

  KernelPath path() const override { return KernelPath::kAVX512; }
  int64_t row_tile() const override { return 4 * kTileRows; }
  size_t activation_row_bytes() const override { return plan_.act_row_bytes; }
  void prepare_row(const float* a_row, uint8_t* ws) const override {
    prepare_plane_row(plan_, planes_, order_, a_row, ws);
  }
  int64_t min_row_chunk(int64_t call_rows) const override { return call_rows > kSmallBatch ? kPlaneMinChunk : 1; }
  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override;

 private:
  void repack(const PackedWeights& w);
  const uint8_t* tile_weights(int64_t t) const { return weights_.data() + t * plan_.tile_wbytes; }
  template <int MB>
  void decode_tile(const uint8_t* ws, int64_t t, float* ysum) const;
  // The plane path's decode of tile t (plane_tiles): planes and scales of groups [g_begin, g_end).
  void decode_planes(int64_t t, int64_t g_begin, int64_t g_end, int nt, __m512i* out, float* alpha) const;

  Plan plan_;
  PlaneRows planes_;  // the prepared rows (the same layout for both paths)
  __m512i order_;     // plane_order(kI2SLanes)
  WeightBuffer weights_;
};

void I2SKernel::repack(const PackedWeights& w) {
  const Geometry& g = plan_.g;
  uint8_t* out = weights_.data();
  // Padding gets code 1 (weight 0), so that decoded prefill planes are zero there as well.
  std::memset(out, 0x55, weights_.size());
  const int64_t stride = row_bytes(Format::kI2S, g.k, g.group_size);
  std::vector<int8_t> values(static_cast<size_t>(g.k));
  for (int64_t n = 0; n < g.n; ++n) {
    if (!decode_row(Format::kI2S, w.data + n * stride, g.k, g.group_size, values.data()))
      throw std::runtime_error("corrupt i2s weights: row " + std::to_string(n) + " holds an invalid code");
    uint8_t* tile = out + (n / kTileRows) * plan_.tile_wbytes;
    const int r = static_cast<int>(n % kTileRows);
    for (int64_t gi = 0; gi < plan_.groups; ++gi) {
      uint8_t* group = tile + gi * plan_.group_wbytes;
      const int8_t* v = values.data() + g.group_begin(gi);
      const int64_t length = g.group_length(gi);
      for (int64_t c = 0; c < length; ++c) {
        uint8_t& byte = group[(c / 16) * kI2SPieceBytes + 4 * r + (c % 16) / 4];
        const int shift = 2 * static_cast<int>(c % 4);
        byte = static_cast<uint8_t>((byte & ~(3 << shift)) | (v[c] + 1) << shift);
      }
      std::memcpy(group + plan_.pieces(gi) * kI2SPieceBytes + 2 * r, &w.scales[n * plan_.groups + gi], 2);
    }
  }
}

// Batch 1..4: each piece decoded in registers (plane p = code & (3 << 2p), no shifts) and applied
// to MB rows of A; one accumulator per plane, scaled back by 4^-p into plane 0's at the group end
// (and every kI2SFoldPieces pieces).
template <int MB>
void I2SKernel::decode_tile(const uint8_t* ws, int64_t t, float* ysum) const {
  const size_t stride = plan_.act_row_bytes;
  const uint8_t* w = tile_weights(t);
  for (int64_t gi = 0; gi < plan_.groups; ++gi) {
    __m512i acc[MB][4];
    const uint8_t* act[MB];
    for (int i = 0; i < MB; ++i) {
      act[i] = ws + i * stride + gi * plan_.act_group_bytes;
      acc[i][0] = _mm512_set1_epi32(plan_.corrections(ws + i * stride)[gi]);
      for (int p = 1; p < 4; ++p) acc[i][p] = _mm512_setzero_si512();
    }
    for (int64_t piece = 0, pieces = plan_.pieces(gi); piece < pieces;) {
      for (const int64_t end = std::min(pieces, piece + kI2SFoldPieces); piece < end; ++piece, w += kI2SPieceBytes) {
        const __m512i codes = _mm512_loadu_si512(w);
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {
          const __m512i plane = _mm512_and_si512(codes, _mm512_set1_epi8(static_cast<char>(3 << (2 * p))));
          for (int i = 0; i < MB; ++i)
            acc[i][p] =
                _mm512_dpbusd_epi32(acc[i][p], plane, broadcast_dword(act[i] + piece * kI2SActPieceBytes + 4 * p));
        }
      }
      // Planes 1-3 go into plane 0's accumulator, exactly scaled back; plane 0 may wrap (the exact
      // group sum fits int32), a plane scaled by 4^p may not before its shift.
      for (int i = 0; i < MB; ++i)
        for (int p = 1; p < 4; ++p) {
          acc[i][0] = _mm512_add_epi32(acc[i][0], _mm512_srai_epi32(acc[i][p], 2 * p));
          acc[i][p] = _mm512_setzero_si512();
        }
    }
    const __m512 alpha = load_alpha(w);
    w += kAlphaBytes;
    for (int i = 0; i < MB; ++i) accumulate_group(ysum + i * kTileRows, acc[i][0], alpha, plan_.scales(ws + i * stride)[gi]);
  }
}

// Tile t's planes: plane p of a piece is (code byte >> 2p) & 3 = w + 1.
void I2SKernel::decode_planes(int64_t t, int64_t g_begin, int64_t g_end, int nt, __m512i* out, float* alpha) const {
  const __m512i two_bits = _mm512_set1_epi8(0x03);
  const uint8_t* w = tile_weights(t) + g_begin * plan_.group_wbytes;
  for (int64_t gi = g_begin; gi < g_end; ++gi) {
    for (int64_t piece = 0, pieces = plan_.pieces(gi); piece < pieces; ++piece, w += kI2SPieceBytes) {
      const __m512i v = _mm512_loadu_si512(w);
      for (int p = 0; p < kI2SLanes; ++p, out += nt)
        _mm512_store_si512(out, _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), two_bits));
    }
    _mm512_store_ps(alpha, load_alpha(w));
    alpha += nt * kTileRows;
    w += kAlphaBytes;
  }
}

void I2SKernel::compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
                        float* y) const {
  if (m <= 0 || n_begin >= n_end) return;
  const int64_t n = plan_.g.n, t_begin = n_begin / kTileRows, t_end = ceil_div(std::min(n_end, n), kTileRows);
  thread_local Scratch scratch;
  if (m <= kSmallBatch) {
    alignas(64) float ysum[kSmallBatch * kTileRows];
    for (int64_t t = t_begin; t < t_end; ++t) {
      std::fill(ysum, ysum + m * kTileRows, 0.f);
      dispatch<kSmallBatch>(static_cast<int>(m), [&](auto rows) { decode_tile<decltype(rows)::value>(ws, t, ysum); });
      store_tile(ysum, kTileRows, m, t, Plan::rows_of(t, n_begin, n_end), bias, y, n);
    }
    return;
  }
  plane_compute<kI2SLanes>(planes_, ws, m, n_begin, n_end, n, bias, y, scratch,
                           [this](int64_t t, int64_t g_begin, int64_t g_end, int nt, __m512i* out, float* alpha) {
                             decode_planes(t, g_begin, g_end, nt, out, alpha);
                           });
}

}  // namespace

void sherry_group_tables_avx512(const float* x, int64_t length, int64_t pieces, uint8_t* out, float* scale) {
  static const LutConstants constants = make_lut_constants<SherryCodes>();
  const int64_t used = ceil_div(length, SherryCodes::kPieceCols);
  *scale = group_tables<SherryCodes>(x, length, used, out, constants);
  std::memset(out + used * kTableBytes, 0, static_cast<size_t>(pieces - used) * kTableBytes);  // padding pieces
}

std::unique_ptr<MatMulKernel> make_avx512_kernel(const PackedWeights& w, std::string* declined) {
  if (const std::string bad = check_geometry(w.format, w.geometry.n, w.geometry.k, w.geometry.group_size);
      !bad.empty()) {
    if (declined) *declined = bad;
    return nullptr;
  }
  switch (w.format) {
    case Format::kSherry: return make_or_decline<Code5Kernel<SherryCodes>>(w, declined);
    case Format::kTL2: return make_or_decline<Code5Kernel<TL2Codes>>(w, declined);
    case Format::kI2S: return make_or_decline<I2SKernel>(w, declined);
    case Format::kInt8: return make_int8_avx512_kernel(w, declined);
  }
  return nullptr;
}

}  // namespace sherry
