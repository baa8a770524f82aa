// AVX-512 kernels (VBMI byte permutes + VNNI dot products) for sherry, tl2 and i2s.
//
// Shared scheme, "rows in lanes": a tile is 16 output rows, one per dword lane of a zmm register,
// and a *piece* is a run of columns of one scale group: 4 blocks of 4 (sherry, i2s; 16 columns)
// or 4 triples (tl2; 12 columns). For one piece and tile the kernel holds a 64-byte vector whose
// byte 4r+j belongs to row r and block/triple j, so one vpdpbusd sums a row's 4 blocks into its
// own lane: no horizontal sums anywhere, and small scale groups stay cheap. Each group ends with
// y += float(dot)·(α·s) for 16 rows at once, in group order and without FMA contraction, exactly
// like the scalar kernel: outputs are bit-identical to it.
//
// sherry and tl2 (5-bit codes: 4-bit index + sign) use activation lookup tables. For each piece,
// prepare_row builds two 128-entry tables indexed by (block j, 5-bit code): the block's dot product
// with the low nibbles xl = xq & 15 and with the high nibbles xh = xq >> 4 of the activations. Both
// fit int8 (|Σ w·xl| <= 45, |Σ w·xh| <= 24, at most 3 non-zero lanes), so per piece and tile the
// kernel does 2 vpermi2b lookups and 2 vpdpbusd (by 1 and by 16): the exact Σ w·xq, 4 weights per
// byte. That is half the permute/dot work of decoding the codes to weight planes (which is what
// the prefill path of i2s does) and keeps Sherry's decode well under the memory time.
//
// i2s (2-bit codes) decodes to weight planes by masking: plane p of a piece is the code byte & (3
// << 2p), multiplied by the plane-p activation dword; one accumulator per plane, scaled back by
// 4^-p (exactly) at the group end, and the +1 offset removed via -Σxq. Prefill (batch > 4) decodes
// each pair of tiles once per block of groups into an L1 buffer of w+1 planes and runs a 12 x 32
// VNNI micro-kernel over all rows of A.
//
// Private weight layout (built once by the factory): tile-major, so that a tile is one forward
// stream; for each scale group, its pieces, then the tile's 16 float16 scales of the group.
//   sherry/tl2: pieces go in pairs of 80 bytes: 64 bytes of index nibbles (byte i = code i of
//     piece A | code i of piece B << 4), then the 64-bit sign masks of A and B. A group with an odd
//     number of pieces ends with a 40-byte half pair (byte i = code i | code i+32 << 4, then the
//     sign mask).
//   i2s: 64 bytes per piece; byte i = the canonical byte (4 two-bit codes) of row i/4, block i%4.
// Groups are padded to whole pieces (and tiles to 16 rows); the padding meets zero activations,
// so it never contributes.

// GCC 12's AVX-512 headers initialise their "undefined" vectors from themselves, which
// -Wmaybe-uninitialized reports at every inlined intrinsic.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <array>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel.h"

namespace sherry {
namespace {

constexpr int kTileRows = 16;            // output rows per tile: the dword lanes of a zmm
constexpr size_t kAlphaBytes = 32;       // 16 float16 scales per tile and group
static const size_t kPrefetchBytes = getenv("PFD") ? atoi(getenv("PFD")) : 2048; static const int kDT = getenv("DT") ? atoi(getenv("DT")) : 4;
constexpr int kSmallBatch = 4;           // up to this many rows of A, weights stream through once

inline size_t round_up_64(size_t bytes) { return (bytes + 63) / 64 * 64; }

// One cache line; vectors of these are 64-byte aligned storage for zmm data (std::vector<__m512i>
// would drop the vector type's attributes).
struct alignas(64) Line {
  uint8_t bytes[64];
};
inline uint8_t* as_bytes(std::vector<Line>& v) { return reinterpret_cast<uint8_t*>(v.data()); }
inline const uint8_t* as_bytes(const std::vector<Line>& v) { return reinterpret_cast<const uint8_t*>(v.data()); }
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

inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

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

// max|x| over a group; max_ps returns its second operand when either is NaN, so NaNs are skipped
// like in the scalar std::max(amax, |x|).
inline float group_amax(const float* x, int64_t length) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t i = 0; i < length; i += 16) {
    const __mmask16 k = length - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (length - i)) - 1);
    vmax = _mm512_max_ps(_mm512_and_ps(_mm512_maskz_loadu_ps(k, x + i), abs_mask), vmax);
  }
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
  // Lanes of tile t inside [n_begin, n_end).
  static __mmask16 rows_of(int64_t t, int64_t n_begin, int64_t n_end) {
    const int64_t lo = std::max<int64_t>(n_begin - t * kTileRows, 0);
    const int64_t hi = std::min<int64_t>(n_end - t * kTileRows, kTileRows);
    return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  }
};

// Writes y rows [0, rows) of tile t (masked lanes only) from running sums ysum[row][16] + bias.
inline void store_tile(const float* ysum, size_t ysum_stride, int64_t rows, int64_t t, __mmask16 mask,
                       const float* bias, float* y, int64_t n) {
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + t * kTileRows) : _mm512_setzero_ps();
  for (int64_t i = 0; i < rows; ++i)
    _mm512_mask_storeu_ps(y + i * n + t * kTileRows, mask, add_exact(_mm512_load_ps(ysum + i * ysum_stride), b));
}

// --- sherry and tl2: 5-bit codes, activation lookup tables ---------------------------------------

struct SherryCodes {
  static constexpr Format kFormat = Format::kSherry;
  static constexpr int kLanes = 4;      // weights per code
  static constexpr int kPieceCols = 16;
  // Lanes of the positive code with index idx.
  static void lanes(int idx, int8_t out[4]) { sherry_lanes(static_cast<uint8_t>(idx), out); }
  static int64_t codes_in_group(int64_t length) { return length / kSherryBlock; }
};

struct TL2Codes {
  static constexpr Format kFormat = Format::kTL2;
  static constexpr int kLanes = 3;
  static constexpr int kPieceCols = 12;
  static void lanes(int idx, int8_t out[3]) {
    if (!tl2_lanes(static_cast<uint8_t>(idx), out)) std::fill(out, out + 3, int8_t{0});  // 14, 15: never used
  }
  static int64_t codes_in_group(int64_t length) { return ceil_div(length, 3); }
};

constexpr size_t kPairBytes = 80;      // two pieces of 64 codes
constexpr size_t kHalfBytes = 40;      // a group's last odd piece
constexpr size_t kTableBytes = 256;    // per piece: xl tables (2 x 64), then xh tables (2 x 64)

inline size_t code5_group_bytes(int64_t pieces) {
  return static_cast<size_t>(pieces / 2) * kPairBytes + static_cast<size_t>(pieces % 2) * kHalfBytes;
}

// The constants of table building and lookups.
struct LutConstants {
  __m512i shuffle[4];     // per lane p: every byte of 128-bit lane j selects column (j, p) of a piece
  __mmask64 plus[4], minus[4];  // per lane p: entries 16j + idx whose code idx has +1 / -1 there
  __m512i to_table[2];    // (positive sums P, negated N) -> entries (j, sign, idx) of blocks 0-1 / 2-3
  __m512i low_nibble = _mm512_set1_epi8(0x0F);
  __m512i block_bits;     // byte i: (i % 4) << 5, the block slot of code i in the table index
  __m512i sign_bit = _mm512_set1_epi8(0x10);
  __m512i ones = _mm512_set1_epi8(1);
  __m512i sixteens = _mm512_set1_epi8(16);
};

template <class F>
LutConstants make_lut_constants() {
  LutConstants c;
  alignas(64) uint8_t bytes[64];
  for (int p = 0; p < 4; ++p) {
    for (int e = 0; e < 64; ++e) {
      const int j = e / 16;
      bytes[e] = static_cast<uint8_t>(p < F::kLanes ? (F::kLanes == 4 ? 4 * j + p : 3 * j + p) : 0);
    }
    c.shuffle[p] = _mm512_load_si512(bytes);
    uint64_t plus = 0, minus = 0;
    for (int e = 0; e < 64 && p < F::kLanes; ++e) {
      int8_t lanes[4] = {0, 0, 0, 0};
      F::lanes(e % 16, lanes);
      if (lanes[p] > 0) plus |= 1ull << e;
      if (lanes[p] < 0) minus |= 1ull << e;
    }
    c.plus[p] = _cvtu64_mask64(plus);
    c.minus[p] = _cvtu64_mask64(minus);
  }
  for (int half = 0; half < 2; ++half) {
    for (int e = 0; e < 64; ++e) {
      const int j = 2 * half + e / 32, sign = (e / 16) % 2, idx = e % 16;
      bytes[e] = static_cast<uint8_t>(64 * sign + 16 * j + idx);
    }
    c.to_table[half] = _mm512_load_si512(bytes);
  }
  for (int i = 0; i < 64; ++i) bytes[i] = static_cast<uint8_t>((i % 4) << 5);
  c.block_bits = _mm512_load_si512(bytes);
  return c;
}

// The 256 table bytes of one piece from its activation nibbles (natural column order; `xl`, `xh`
// readable for 16 bytes). Entry (j << 5 | sign << 4 | idx) = ±Σ_p lanes(idx)[p] · x[col(j, p)].
template <class F>
inline void build_tables(const int8_t* xl, const int8_t* xh, uint8_t* out, const LutConstants& c) {
  const int8_t* src[2] = {xl, xh};
  for (int h = 0; h < 2; ++h) {
    const __m512i x = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src[h])));
    __m512i pos = _mm512_setzero_si512();
    for (int p = 0; p < F::kLanes; ++p) {
      const __m512i lane = _mm512_shuffle_epi8(x, c.shuffle[p]);
      pos = _mm512_mask_add_epi8(pos, c.plus[p], pos, lane);
      pos = _mm512_mask_sub_epi8(pos, c.minus[p], pos, lane);
    }
    const __m512i neg = _mm512_sub_epi8(_mm512_setzero_si512(), pos);
    _mm512_store_si512(out + 128 * h, _mm512_permutex2var_epi8(pos, c.to_table[0], neg));
    _mm512_store_si512(out + 128 * h + 64, _mm512_permutex2var_epi8(pos, c.to_table[1], neg));
  }
}

// Table index of each code of a piece: nibbles (index in bits 0-3, garbage above), sign mask.
inline __m512i table_index(__m512i nibbles, __mmask64 sign, const LutConstants& c) {
  const __m512i idx = _mm512_ternarylogic_epi32(nibbles, c.low_nibble, c.block_bits, 0xEA);  // (a & b) | c
  return _mm512_mask_add_epi8(idx, sign, idx, c.sign_bit);  // bit 4 is clear: add == or
}

// Sets 5-bit code `code` at position i (= 4 r + j) of piece `piece` of a group's code bytes.
inline void put_code5(uint8_t* group, int64_t pieces, int64_t piece, int i, uint8_t code) {
  const uint8_t index = code & 0x0F, sign = code >> 4;
  if (piece / 2 < pieces / 2) {  // in a full pair
    uint8_t* pair = group + (piece / 2) * kPairBytes;
    pair[i] |= static_cast<uint8_t>(index << (4 * (piece % 2)));
    pair[64 + 8 * (piece % 2) + i / 8] |= static_cast<uint8_t>(sign << (i % 8));
  } else {  // the half pair
    uint8_t* half = group + (pieces / 2) * kPairBytes;
    half[i % 32] |= static_cast<uint8_t>(index << (4 * (i / 32)));
    half[32 + i / 8] |= static_cast<uint8_t>(sign << (i % 8));
  }
}

template <class F>
class Code5Kernel final : public MatMulKernel {
 public:
  explicit Code5Kernel(const PackedWeights& w)
      : plan_(w.geometry, F::kPieceCols, kTableBytes, false, code5_group_bytes),
        lut_(make_lut_constants<F>()),
        weights_(ceil_div(static_cast<int64_t>(plan_.tile_wbytes * plan_.tiles), 64)) {
    repack(w);
  }

  KernelPath path() const override { return KernelPath::kAVX512; }
  int64_t row_tile() const override { return 4 * kTileRows; }
  size_t activation_row_bytes() const override { return plan_.act_row_bytes; }
  void prepare_row(const float* a_row, uint8_t* ws) const override;
  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override;

 private:
  void repack(const PackedWeights& w);
  const uint8_t* tile_weights(int64_t t) const { return as_bytes(weights_) + t * plan_.tile_wbytes; }
  template <int MB, int NT>
  void lut_block(const uint8_t* ws, int64_t t0, int64_t g_begin, int64_t g_end, float* ysum, bool stream) const;
  template <int MB, int NT>
  void lookup_piece(__m512i (&acc)[MB][NT], const __m512i (&idx)[NT], const uint8_t* const (&tables)[MB]) const;

  Plan plan_;
  LutConstants lut_;
  std::vector<Line> weights_;
};

template <class F>
void Code5Kernel<F>::repack(const PackedWeights& w) {
  const Geometry& g = plan_.g;
  uint8_t* out = as_bytes(weights_);
  std::memset(out, 0, weights_.size() * sizeof(Line));  // code 0 pads (sherry: any code would do)
  const int64_t stride = row_bytes(F::kFormat, g.k, g.group_size);
  const int64_t codes_per_row = F::kFormat == Format::kSherry ? g.k / kSherryBlock : tl2_triples(g.k, g.group_size);
  std::vector<int8_t> values(F::kFormat == Format::kTL2 ? static_cast<size_t>(g.k) : 0);
  for (int64_t n = 0; n < g.n; ++n) {
    const uint8_t* row = w.data + n * stride;
    // Every sherry code is valid; tl2 rows go through the reference decoder's validation.
    if (F::kFormat == Format::kTL2 && !decode_row(F::kFormat, row, g.k, g.group_size, values.data()))
      throw std::runtime_error(std::string("corrupt tl2 weights: row ") + std::to_string(n) +
                               " holds an invalid code");
    uint8_t* tile = out + (n / kTileRows) * plan_.tile_wbytes;
    const int r = static_cast<int>(n % kTileRows);
    int64_t first = 0;  // the group's first canonical code
    for (int64_t gi = 0; gi < plan_.groups; ++gi) {
      uint8_t* group = tile + gi * plan_.group_wbytes;
      const int64_t pieces = plan_.pieces(gi), codes = F::codes_in_group(g.group_length(gi));
      for (int64_t c = 0; c < codes; ++c)
        put_code5(group, pieces, c / 4, 4 * r + static_cast<int>(c % 4), code5_at(row, codes_per_row, first + c));
      first += codes;
      std::memcpy(group + code5_group_bytes(pieces) + 2 * r, &w.scales[n * plan_.groups + gi], 2);
    }
  }
}

template <class F>
void Code5Kernel<F>::prepare_row(const float* a_row, uint8_t* ws) const {
  const Geometry& g = plan_.g;
  constexpr int64_t kUnitCols = 4 * F::kPieceCols;  // columns quantized at a time: 4 pieces
  auto* scale = reinterpret_cast<float*>(ws + plan_.act_scale_offset);
  for (int64_t gi = 0; gi < plan_.groups; ++gi) {
    const float* x = a_row + g.group_begin(gi);
    const int64_t length = g.group_length(gi), pieces = plan_.pieces(gi);
    uint8_t* out = ws + gi * plan_.act_group_bytes;
    const float amax = group_amax(x, length);
    if (!(amax > 0.f)) {  // xq = 0: all-zero tables
      std::memset(out, 0, static_cast<size_t>(pieces) * kTableBytes);
      scale[gi] = 0.f;
      continue;
    }
    const __m512 inv = _mm512_set1_ps(static_cast<float>(kActivationQmax) / amax);
    for (int64_t piece = 0, c = 0; piece < pieces; piece += 4, c += kUnitCols) {
      // Natural-order nibbles of 4 pieces; 16 bytes of slack for tl2's last 16-byte read.
      alignas(64) int8_t xl[80] = {}, xh[80] = {};
      for (int v = 0; v < 4; ++v) {
        const int64_t left = std::min<int64_t>(length, c + kUnitCols) - (c + 16 * v);
        if (left <= 0) break;
        const __m512i q = quantize16(x + c + 16 * v, left, inv);
        _mm_store_si128(reinterpret_cast<__m128i*>(xl + 16 * v),
                        _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(15))));
        _mm_store_si128(reinterpret_cast<__m128i*>(xh + 16 * v), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 4)));
      }
      for (int64_t p = 0; p < std::min<int64_t>(4, pieces - piece); ++p)
        build_tables<F>(xl + p * F::kPieceCols, xh + p * F::kPieceCols, out + (piece + p) * kTableBytes, lut_);
    }
    scale[gi] = amax / static_cast<float>(kActivationQmax);
  }
}

// Adds one piece of NT tiles (table indices idx[t]) for MB rows of A (their tables for this piece).
template <class F>
template <int MB, int NT>
inline void Code5Kernel<F>::lookup_piece(__m512i (&acc)[MB][NT], const __m512i (&idx)[NT],
                                         const uint8_t* const (&tables)[MB]) const {
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) {
    const __m512i lo0 = _mm512_load_si512(tables[i]), lo1 = _mm512_load_si512(tables[i] + 64);
    const __m512i hi0 = _mm512_load_si512(tables[i] + 128), hi1 = _mm512_load_si512(tables[i] + 192);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) {
      acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], lut_.ones, _mm512_permutex2var_epi8(lo0, idx[t], lo1));
      acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], lut_.sixteens, _mm512_permutex2var_epi8(hi0, idx[t], hi1));
    }
  }
}

// Rows [0, MB) of A (prepared at `ws`) against tiles [t0, t0 + NT) over groups [g_begin, g_end):
// adds each group's contribution to ysum[row][tile][16] in group order. `stream`: the weights come
// from memory (decode), so prefetch ahead; in prefill they are cache-resident.
template <class F>
template <int MB, int NT>
void Code5Kernel<F>::lut_block(const uint8_t* ws, int64_t t0, int64_t g_begin, int64_t g_end, float* ysum,
                               bool stream) const {
  const LutConstants& c = lut_;
  const uint8_t* w[NT];
  for (int t = 0; t < NT; ++t) w[t] = tile_weights(t0 + t) + g_begin * plan_.group_wbytes;
  for (int64_t gi = g_begin; gi < g_end; ++gi) {
    const int64_t pieces = plan_.pieces(gi);
    const uint8_t* tables[MB];
    for (int i = 0; i < MB; ++i) tables[i] = ws + i * plan_.act_row_bytes + gi * plan_.act_group_bytes;
    __m512i acc[MB][NT];
    for (auto& row : acc)
      for (auto& a : row) a = _mm512_setzero_si512();
    for (int64_t pair = 0; pair < pieces / 2; ++pair) {
      __m512i nibbles[NT], idx[NT];
      for (int t = 0; t < NT; ++t) {
        if (stream) {  // cold weights: hardware prefetch alone keeps too few misses in flight
          prefetch(w[t] + kPrefetchBytes);
          prefetch(w[t] + kPrefetchBytes + 64);
        }
        nibbles[t] = _mm512_loadu_si512(w[t]);
        idx[t] = table_index(nibbles[t], load_mask64(w[t] + 64), c);
      }
      lookup_piece<MB, NT>(acc, idx, tables);
      for (int i = 0; i < MB; ++i) tables[i] += kTableBytes;
      for (int t = 0; t < NT; ++t) {
        idx[t] = table_index(_mm512_srli_epi16(nibbles[t], 4), load_mask64(w[t] + 72), c);
        w[t] += kPairBytes;
      }
      lookup_piece<MB, NT>(acc, idx, tables);
      for (int i = 0; i < MB; ++i) tables[i] += kTableBytes;
    }
    if (pieces % 2) {
      __m512i idx[NT];
      for (int t = 0; t < NT; ++t) {
        const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[t])));
        idx[t] = table_index(_mm512_mask_srli_epi16(both, 0xFFFF0000u, both, 4), load_mask64(w[t] + 32), c);
        w[t] += kHalfBytes;
      }
      lookup_piece<MB, NT>(acc, idx, tables);
    }
    for (int t = 0; t < NT; ++t) {
      const __m512 alpha = load_alpha(w[t]);
      w[t] += kAlphaBytes;
      for (int i = 0; i < MB; ++i)
        accumulate_group(ysum + (i * NT + t) * kTileRows, acc[i][t], alpha,
                         plan_.scales(ws + i * plan_.act_row_bytes)[gi]);
    }
  }
}

// Per-thread scratch of compute(), reused across calls (no allocation once warm).
struct Scratch {
  std::vector<Line> planes;  // i2s prefill: decoded weight block, [piece][plane][tile] zmm
  std::vector<Line> alpha;   // i2s prefill: [group in block][tile] 16 float scales
  std::vector<Line> y;       // [row of A][tile] 16 float partial sums
};

template <class F>
void Code5Kernel<F>::compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
                             float* y) const {
  if (m <= 0 || n_begin >= n_end) return;
  const int64_t n = plan_.g.n, t_begin = n_begin / kTileRows, t_end = ceil_div(std::min(n_end, n), kTileRows);
  thread_local Scratch scratch;
  // Decode: tiles 4 at a time (sharing each table load), all groups in one pass. Prefill: 3 tiles
  // x 4 rows of A per block (registers), groups in blocks whose tables for all rows stay in L2,
  // the tiles' weights in L1.
  constexpr int kDecodeTiles = 4, kPrefillTiles = 3, kPrefillRows = 4;
  const int64_t tiles_per_pass = m <= kSmallBatch ? kDT : kPrefillTiles;
  const int64_t block_groups =
      m <= kSmallBatch ? plan_.groups
                       : std::max<int64_t>(1, static_cast<int64_t>((512 * 1024) / (static_cast<size_t>(m) * plan_.act_group_bytes)));
  for (int64_t t = t_begin; t < t_end; t += tiles_per_pass) {
    const int nt = static_cast<int>(std::min(tiles_per_pass, t_end - t));
    scratch.y.assign(static_cast<size_t>(m * nt), Line{});
    float* ysum = as_floats(scratch.y);
    for (int64_t g0 = 0; g0 < plan_.groups; g0 += block_groups) {
      const int64_t g1 = std::min(plan_.groups, g0 + block_groups);
      if (m <= kSmallBatch) {
        dispatch<kSmallBatch>(static_cast<int>(m), [&](auto rows) {
          dispatch<kDecodeTiles>(nt, [&](auto tiles) {
            lut_block<decltype(rows)::value, decltype(tiles)::value>(ws, t, g0, g1, ysum, true);
          });
        });
        continue;
      }
      for (int64_t m0 = 0; m0 < m; m0 += kPrefillRows) {
        dispatch<kPrefillRows>(static_cast<int>(std::min<int64_t>(kPrefillRows, m - m0)), [&](auto rows) {
          dispatch<kPrefillTiles>(nt, [&](auto tiles) {
            lut_block<decltype(rows)::value, decltype(tiles)::value>(
                ws + m0 * plan_.act_row_bytes, t, g0, g1, ysum + m0 * nt * kTileRows, false);
          });
        });
      }
    }
    for (int tt = 0; tt < nt; ++tt)
      store_tile(ysum + tt * kTileRows, static_cast<size_t>(nt) * kTileRows, m, t + tt,
                 Plan::rows_of(t + tt, n_begin, n_end), bias, y, n);
  }
}

// --- i2s: 2-bit codes, weight planes ------------------------------------------------------------

constexpr size_t kI2SPieceBytes = 64;
constexpr size_t kI2SActPieceBytes = 16;  // planes as dwords: dword p = xq of lane p of blocks 0..3

class I2SKernel final : public MatMulKernel {
 public:
  explicit I2SKernel(const PackedWeights& w)
      : plan_(w.geometry, 16, kI2SActPieceBytes, true,
              [](int64_t pieces) { return static_cast<size_t>(pieces) * kI2SPieceBytes; }),
        weights_(ceil_div(static_cast<int64_t>(plan_.tile_wbytes * plan_.tiles), 64)) {
    repack(w);
  }

  KernelPath path() const override { return KernelPath::kAVX512; }
  int64_t row_tile() const override { return 4 * kTileRows; }
  size_t activation_row_bytes() const override { return plan_.act_row_bytes; }
  void prepare_row(const float* a_row, uint8_t* ws) const override;
  void compute(const uint8_t* ws, int64_t m, int64_t n_begin, int64_t n_end, const float* bias,
               float* y) const override;

 private:
  void repack(const PackedWeights& w);
  const uint8_t* tile_weights(int64_t t) const { return as_bytes(weights_) + t * plan_.tile_wbytes; }
  template <int MB>
  void decode_tile(const uint8_t* ws, int64_t t, float* ysum) const;
  template <int NT>
  void prefill_tiles(const uint8_t* ws, int64_t m, int64_t t, float* ysum, Scratch& s) const;
  template <int MR, int NT>
  void micro_kernel(const uint8_t* ws, int64_t g_begin, int64_t g_end, const Scratch& s, float* ysum) const;

  Plan plan_;
  std::vector<Line> weights_;
};

void I2SKernel::repack(const PackedWeights& w) {
  const Geometry& g = plan_.g;
  uint8_t* out = as_bytes(weights_);
  // Padding gets code 1 (weight 0), so that decoded prefill planes are zero there as well.
  std::memset(out, 0x55, weights_.size() * sizeof(Line));
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

void I2SKernel::prepare_row(const float* a_row, uint8_t* ws) const {
  const Geometry& g = plan_.g;
  auto* corr = reinterpret_cast<int32_t*>(ws + plan_.act_corr_offset);
  auto* scale = reinterpret_cast<float*>(ws + plan_.act_scale_offset);
  // Within each 16-column piece, column 4j + p goes to byte 4p + j (a 4x4 byte transpose).
  const __m512i transpose = _mm512_set4_epi32(0x0F0B0703, 0x0E0A0602, 0x0D090501, 0x0C080400);
  for (int64_t gi = 0; gi < plan_.groups; ++gi) {
    const float* x = a_row + g.group_begin(gi);
    const int64_t length = g.group_length(gi), pieces = plan_.pieces(gi);
    uint8_t* out = ws + gi * plan_.act_group_bytes;
    const float amax = group_amax(x, length);
    if (!(amax > 0.f)) {
      std::memset(out, 0, static_cast<size_t>(pieces) * kI2SActPieceBytes);
      corr[gi] = 0;
      scale[gi] = 0.f;
      continue;
    }
    const __m512 inv = _mm512_set1_ps(static_cast<float>(kActivationQmax) / amax);
    // Σxq from the bytes themselves (offset-binary sums of 8), so a NaN product counts as its 0 byte.
    __m512i sum = _mm512_setzero_si512();
    int64_t summed = 0;
    for (int64_t piece = 0, c = 0; piece < pieces; piece += 4, c += 64, summed += 64) {
      __m512i bytes = _mm512_setzero_si512();
      for (int v = 0; v < 4 && c + 16 * v < length; ++v)
        bytes = _mm512_inserti32x4(bytes, _mm512_cvtepi32_epi8(quantize16(x + c + 16 * v, length - c - 16 * v, inv)), v);
      sum = _mm512_add_epi64(sum, _mm512_sad_epu8(_mm512_xor_si512(bytes, _mm512_set1_epi8(-128)), _mm512_setzero_si512()));
      const int64_t left = std::min<int64_t>(4, pieces - piece);
      const __mmask64 store = left == 4 ? ~0ull : (1ull << (16 * left)) - 1;
      _mm512_mask_storeu_epi8(out + piece * kI2SActPieceBytes, store, _mm512_shuffle_epi8(bytes, transpose));
    }
    corr[gi] = static_cast<int32_t>(128 * summed - _mm512_reduce_add_epi64(sum));
    scale[gi] = amax / static_cast<float>(kActivationQmax);
  }
}

// Batch 1..4: each piece decoded in registers (plane p = code & (3 << 2p), no shifts) and applied
// to MB rows of A; one accumulator per plane, scaled back by 4^-p at the group end.
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
    for (int64_t piece = 0, pieces = plan_.pieces(gi); piece < pieces; ++piece, w += kI2SPieceBytes) {
      prefetch(w + kPrefetchBytes);  // cold weights: see Code5Kernel::lut_block
      const __m512i codes = _mm512_loadu_si512(w);
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const __m512i plane = _mm512_and_si512(codes, _mm512_set1_epi8(static_cast<char>(3 << (2 * p))));
        for (int i = 0; i < MB; ++i)
          acc[i][p] = _mm512_dpbusd_epi32(acc[i][p], plane, broadcast_dword(act[i] + piece * kI2SActPieceBytes + 4 * p));
      }
    }
    const __m512 alpha = load_alpha(w);
    w += kAlphaBytes;
    for (int i = 0; i < MB; ++i) {
      __m512i dot = acc[i][0];
      for (int p = 1; p < 4; ++p) dot = _mm512_add_epi32(dot, _mm512_srai_epi32(acc[i][p], 2 * p));
      accumulate_group(ysum + i * kTileRows, dot, alpha, plan_.scales(ws + i * stride)[gi]);
    }
  }
}

// Prefill micro-kernel: rows [0, MR) of A against the decoded block of groups [g_begin, g_end) of
// NT tiles; adds each group's contribution to ysum[row][tile][16].
template <int MR, int NT>
void I2SKernel::micro_kernel(const uint8_t* ws, int64_t g_begin, int64_t g_end, const Scratch& s,
                             float* ysum) const {
  const size_t stride = plan_.act_row_bytes;
  const auto* b = reinterpret_cast<const __m512i*>(s.planes.data());
  const auto* alpha = reinterpret_cast<const float*>(s.alpha.data());
  for (int64_t gi = g_begin; gi < g_end; ++gi) {
    __m512i acc[MR][NT];
    const uint8_t* act[MR];
    for (int i = 0; i < MR; ++i) {
      act[i] = ws + i * stride + gi * plan_.act_group_bytes;
      const __m512i corr = _mm512_set1_epi32(plan_.corrections(ws + i * stride)[gi]);
      for (int t = 0; t < NT; ++t) acc[i][t] = corr;
    }
    for (int64_t piece = 0, pieces = plan_.pieces(gi); piece < pieces; ++piece) {
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p, b += NT) {
        __m512i bt[NT];
        for (int t = 0; t < NT; ++t) bt[t] = _mm512_load_si512(b + t);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const __m512i a = broadcast_dword(act[i] + piece * kI2SActPieceBytes + 4 * p);
          for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], bt[t], a);
        }
      }
    }
    for (int t = 0; t < NT; ++t) {
      const __m512 al = _mm512_load_ps(alpha + ((gi - g_begin) * NT + t) * kTileRows);
      for (int i = 0; i < MR; ++i)
        accumulate_group(ysum + (i * NT + t) * kTileRows, acc[i][t], al, plan_.scales(ws + i * stride)[gi]);
    }
  }
}

template <int NT>
void I2SKernel::prefill_tiles(const uint8_t* ws, int64_t m, int64_t t, float* ysum, Scratch& s) const {
  constexpr int kRows = 12;                         // rows of A per micro-kernel call
  constexpr size_t kBufferBytes = 24 * 1024;        // decoded weight block target (L1)
  const size_t piece_bytes = 4 * NT * sizeof(Line);
  const int64_t block_groups = std::max<int64_t>(1, static_cast<int64_t>(kBufferBytes / (plan_.pieces_full * piece_bytes)));
  const int64_t max_groups = std::min(block_groups, plan_.groups);
  s.planes.resize(static_cast<size_t>(max_groups * plan_.pieces_full) * 4 * NT);
  s.alpha.resize(static_cast<size_t>(max_groups) * NT);
  const __m512i two_bits = _mm512_set1_epi8(0x03);
  for (int64_t g_begin = 0; g_begin < plan_.groups; g_begin += block_groups) {
    const int64_t g_end = std::min(plan_.groups, g_begin + block_groups);
    for (int tt = 0; tt < NT; ++tt) {
      const uint8_t* w = tile_weights(t + tt) + g_begin * plan_.group_wbytes;
      auto* out = reinterpret_cast<__m512i*>(s.planes.data()) + tt;
      for (int64_t gi = g_begin; gi < g_end; ++gi) {
        for (int64_t piece = 0, pieces = plan_.pieces(gi); piece < pieces; ++piece, w += kI2SPieceBytes) {
          const __m512i v = _mm512_loadu_si512(w);
          for (int p = 0; p < 4; ++p, out += NT)
            _mm512_store_si512(out, _mm512_and_si512(_mm512_srli_epi16(v, 2 * p), two_bits));
        }
        _mm512_store_ps(as_floats(s.alpha) + ((gi - g_begin) * NT + tt) * kTileRows, load_alpha(w));
        w += kAlphaBytes;
      }
    }
    for (int64_t m0 = 0; m0 < m; m0 += kRows) {
      dispatch<kRows>(static_cast<int>(std::min<int64_t>(kRows, m - m0)), [&](auto rows) {
        micro_kernel<decltype(rows)::value, NT>(ws + m0 * plan_.act_row_bytes, g_begin, g_end, s,
                                                ysum + m0 * NT * kTileRows);
      });
    }
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
  for (int64_t t = t_begin; t < t_end;) {
    const int nt = t + 1 < t_end ? 2 : 1;  // tiles go in pairs (32 rows), an odd last one alone
    scratch.y.assign(static_cast<size_t>(m * nt), Line{});
    float* ysum = as_floats(scratch.y);
    if (nt == 2) prefill_tiles<2>(ws, m, t, ysum, scratch);
    else prefill_tiles<1>(ws, m, t, ysum, scratch);
    for (int tt = 0; tt < nt; ++tt)
      store_tile(ysum + tt * kTileRows, static_cast<size_t>(nt) * kTileRows, m, t + tt,
                 Plan::rows_of(t + tt, n_begin, n_end), bias, y, n);
    t += nt;
  }
}

}  // namespace

std::unique_ptr<MatMulKernel> make_avx512_kernel(const PackedWeights& w) {
  if (!check_geometry(w.format, w.geometry.n, w.geometry.k, w.geometry.group_size).empty()) return nullptr;
  switch (w.format) {
    case Format::kSherry: return std::make_unique<Code5Kernel<SherryCodes>>(w);
    case Format::kTL2: return std::make_unique<Code5Kernel<TL2Codes>>(w);
    case Format::kI2S: return std::make_unique<I2SKernel>(w);
  }
  return nullptr;
}

}  // namespace sherry
