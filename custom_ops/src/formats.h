// The packed weight formats, mirrored from docs/formats.md (the source of truth) and
// sherry_export/formats.py: one traits table (kFormats) that everything indexes, holding each
// format's names, geometry rules, canonical (stored) row layout and validating reference decoder;
// and the activation quantization every kernel uses.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace sherry {

// The formats, in the order of Format's values: kFormats (below) is indexed by them. The first three
// hold ternary weights (the projections); kInt8 holds signed 8-bit weights, for LM heads.
enum class Format : int { kSherry = 0, kTL2 = 1, kI2S = 2, kInt8 = 3 };

// ceil(a / b) for a >= 0, b > 0, without forming a + b - 1 (which overflows for a K near INT64_MAX).
inline constexpr int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

constexpr int kSherryBlock = 4;     // weights per Sherry block (exactly one zero)
constexpr int kActivationQmax = 127;

// The longest scale group a kernel may take (docs/formats.md, "Scale groups"): a group's exact dot
// product sum(w * xq) reaches 127 * max|w| * length in magnitude and must fit int32, because every
// kernel accumulates it there. For ternary weights (max|w| = 1) that is 16,909,320 columns; past it the
// dot product would wrap around silently. max_group_size(Format) gives each format's bound.
constexpr int64_t kMaxGroupSize = std::numeric_limits<int32_t>::max() / kActivationQmax;
constexpr int kInt8Max = 127;  // int8 weights lie in [-127, 127]: code 0 (-128) is invalid

// Shape of one packed weight [N, K] with scale groups of `group_size` along K (the last may be short).
struct Geometry {
  int64_t n = 0;
  int64_t k = 0;
  int64_t group_size = 0;
  int64_t groups() const { return ceil_div(k, group_size); }
  int64_t group_begin(int64_t g) const { return g * group_size; }
  int64_t group_length(int64_t g) const { return std::min(group_size, k - g * group_size); }
};

// A row of 5-bit codes: ceil(C/2) index nibbles (code c in byte c/2, low nibble when c is even),
// then ceil(C/8) sign bytes (code c's sign is bit c%8 of byte c/8).
inline int64_t code5_row_bytes(int64_t codes) { return ceil_div(codes, 2) + ceil_div(codes, 8); }

// Triples in a row: ceil(group_size / 3) per whole group, plus those of a short last group. O(1),
// so a huge K in a hostile model costs nothing before the tensor shapes rule it out.
inline int64_t tl2_triples(int64_t k, int64_t group_size) {
  return (k / group_size) * ceil_div(group_size, 3) + ceil_div(k % group_size, 3);
}

inline uint8_t code5_at(const uint8_t* row, int64_t codes_per_row, int64_t c) {
  const uint8_t index = (row[c >> 1] >> ((c & 1) * 4)) & 0x0F;
  const uint8_t sign = (row[ceil_div(codes_per_row, 2) + (c >> 3)] >> (c & 7)) & 1;
  return static_cast<uint8_t>(index | sign << 4);
}

// Lanes of a 5-bit Sherry code: bits 3-2 zero position, bit 1 / bit 0 = 2nd / 3rd non-zero differs
// in sign from the 1st, bit 4 = the 1st non-zero is negative.
inline void sherry_lanes(uint8_t code, int8_t out[4]) {
  const int zero = (code >> 2) & 3;
  const int8_t first = (code >> 4) ? -1 : 1;
  const int8_t nonzero[3] = {first, static_cast<int8_t>((code & 2) ? -first : first),
                             static_cast<int8_t>((code & 1) ? -first : first)};
  for (int p = 0, j = 0; p < 4; ++p) out[p] = (p == zero) ? 0 : nonzero[j++];
}

// Lanes of a 5-bit TL2 code: v = ±index with v = 9*w0 + 3*w1 + w2. False for an invalid code
// (index > 13, or a negative zero).
inline bool tl2_lanes(uint8_t code, int8_t out[3]) {
  const int index = code & 0x0F;
  if (index > 13 || code == 16) return false;
  int v = (code >> 4) ? -index : index;
  for (int p = 2; p >= 0; --p) {  // balanced ternary digits, least significant last lane
    int digit = ((v % 3) + 3) % 3;
    if (digit == 2) digit = -1;
    out[p] = static_cast<int8_t>(digit);
    v = (v - digit) / 3;
  }
  return true;
}

// Each format's codes, row bytes and reference decoder (docs/formats.md, "Packed data"). A decoder
// turns one canonical packed row into K int8 values and returns false if the row holds an invalid code.

inline int64_t sherry_codes(int64_t k, int64_t /*group_size*/) { return k / kSherryBlock; }
inline int64_t sherry_row_bytes(int64_t k, int64_t group_size) {
  return code5_row_bytes(sherry_codes(k, group_size));
}
inline bool sherry_decode_row(const uint8_t* row, int64_t k, int64_t /*group_size*/, int8_t* out) {
  const int64_t blocks = k / kSherryBlock;
  for (int64_t b = 0; b < blocks; ++b) sherry_lanes(code5_at(row, blocks, b), out + 4 * b);
  return true;
}

inline int64_t tl2_row_bytes(int64_t k, int64_t group_size) { return code5_row_bytes(tl2_triples(k, group_size)); }
inline bool tl2_decode_row(const uint8_t* row, int64_t k, int64_t group_size, int8_t* out) {
  const int64_t triples = tl2_triples(k, group_size);
  int64_t t = 0;
  for (int64_t start = 0; start < k; start += group_size) {
    const int64_t length = std::min(group_size, k - start);
    for (int64_t i = 0; i < length; i += 3, ++t) {
      int8_t lanes[3];
      if (!tl2_lanes(code5_at(row, triples, t), lanes)) return false;
      for (int64_t p = 0; p < 3; ++p) {
        if (i + p < length) out[start + i + p] = lanes[p];
        else if (lanes[p] != 0) return false;  // padding lanes must be zero
      }
    }
  }
  return true;
}

inline int64_t i2s_codes(int64_t k, int64_t /*group_size*/) { return k; }
inline int64_t i2s_row_bytes(int64_t k, int64_t /*group_size*/) { return ceil_div(k, 4); }
inline bool i2s_decode_row(const uint8_t* row, int64_t k, int64_t /*group_size*/, int8_t* out) {
  for (int64_t i = 0; i < k; ++i) {
    const int code = (row[i >> 2] >> ((i & 3) * 2)) & 3;
    if (code == 3) return false;
    out[i] = static_cast<int8_t>(code - 1);
  }
  return true;
}

// int8: one byte per weight, the code w + 128 (MatMulNBits' 8-bit layout with its default zero point,
// so GatherBlockQuantized reads the same bytes); w in [-127, 127], code 0 is invalid.
inline int64_t int8_codes(int64_t k, int64_t /*group_size*/) { return k; }
inline int64_t int8_row_bytes(int64_t k, int64_t /*group_size*/) { return k; }
inline bool int8_decode_row(const uint8_t* row, int64_t k, int64_t /*group_size*/, int8_t* out) {
  for (int64_t i = 0; i < k; ++i) {
    if (row[i] == 0) return false;
    out[i] = static_cast<int8_t>(static_cast<int>(row[i]) - 128);
  }
  return true;
}

// Everything the op library knows about one format. Adding a format is one entry in kFormats (and
// its kernels); sherry_export/formats.py's FORMATS holds the same facts for Python, and
// tests/test_format_table.py checks the two against each other through SherryFormatTable().
struct FormatTraits {
  Format id;
  const char* name;     // as in formats.py and docs/formats.md
  const char* op_type;  // the onnxruntime op of domain ai.sherry
  int k_multiple;       // K must be a multiple of this
  int group_multiple;   // group_size must be a multiple of this
  int lanes_per_code;   // weights per code of the canonical row
  int max_weight;       // the largest |w| a code stands for: 1 for ternary, 127 for int8
  int64_t (*codes_per_row)(int64_t k, int64_t group_size);
  int64_t (*row_bytes)(int64_t k, int64_t group_size);
  bool (*decode_row)(const uint8_t* row, int64_t k, int64_t group_size, int8_t* out);
};

inline constexpr FormatTraits kFormats[] = {
    {Format::kSherry, "sherry", "SherryMatMul", kSherryBlock, kSherryBlock, kSherryBlock, 1, sherry_codes,
     sherry_row_bytes, sherry_decode_row},
    {Format::kTL2, "tl2", "TL2MatMul", 1, 1, 3, 1, tl2_triples, tl2_row_bytes, tl2_decode_row},
    {Format::kI2S, "i2s", "I2SMatMul", 1, 1, 1, 1, i2s_codes, i2s_row_bytes, i2s_decode_row},
    {Format::kInt8, "int8", "Int8MatMul", 1, 1, 1, kInt8Max, int8_codes, int8_row_bytes, int8_decode_row},
};
inline constexpr int kFormatCount = static_cast<int>(sizeof kFormats / sizeof kFormats[0]);

constexpr bool formats_indexed_by_id() {
  for (int i = 0; i < kFormatCount; ++i)
    if (static_cast<int>(kFormats[i].id) != i) return false;
  return true;
}
static_assert(formats_indexed_by_id(), "kFormats[i] must describe the Format whose value is i");

inline const FormatTraits& traits(Format f) { return kFormats[static_cast<int>(f)]; }
inline const char* format_name(Format f) { return traits(f).name; }
inline int64_t codes_per_row(Format f, int64_t k, int64_t group_size) { return traits(f).codes_per_row(k, group_size); }
inline int64_t row_bytes(Format f, int64_t k, int64_t group_size) { return traits(f).row_bytes(k, group_size); }
// Decode one canonical packed row into K int8 values. False if the row holds an invalid code.
inline bool decode_row(Format f, const uint8_t* row, int64_t k, int64_t group_size, int8_t* out) {
  return traits(f).decode_row(row, k, group_size, out);
}

// The longest scale group of format f: 127 x max|w| x group_size must fit int32.
inline int64_t max_group_size(Format f) {
  return std::numeric_limits<int32_t>::max() / (int64_t{kActivationQmax} * traits(f).max_weight);
}

// Empty string if (format, K, group_size) is a valid geometry, else what is wrong.
inline std::string check_geometry(Format f, int64_t n, int64_t k, int64_t group_size) {
  if (n <= 0) return "N must be positive, got " + std::to_string(n);
  if (k <= 0) return "K must be positive, got " + std::to_string(k);
  if (group_size <= 0 || group_size > k)
    return "group_size must be in [1, K=" + std::to_string(k) + "], got " + std::to_string(group_size);
  const FormatTraits& t = traits(f);
  if (group_size > max_group_size(f))
    return "group_size must be at most " + std::to_string(max_group_size(f)) + " (127 x " +
           (t.max_weight == 1 ? std::string() : std::to_string(t.max_weight) + " x ") +
           "group_size must fit the int32 dot product of a scale group), got " + std::to_string(group_size) +
           "; use smaller scale groups";
  if (k % t.k_multiple || group_size % t.group_multiple) {
    const std::string rule = t.k_multiple == t.group_multiple
                                 ? "K and group_size divisible by " + std::to_string(t.k_multiple)
                                 : "K divisible by " + std::to_string(t.k_multiple) + " and group_size divisible by " +
                                       std::to_string(t.group_multiple);
    return std::string(t.name) + " needs " + rule + ", got K=" + std::to_string(k) +
           ", group_size=" + std::to_string(group_size);
  }
  return "";
}

// IEEE half to float, without relying on compiler extensions.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F;
  uint32_t mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { ++e; mantissa <<= 1; } while (!(mantissa & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mantissa & 0x3FF) << 13;
    }
  } else if (exponent == 31) {
    bits = sign | 0x7F800000u | mantissa << 13;
  } else {
    bits = sign | (exponent + 127 - 15) << 23 | mantissa << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The activation numerics (docs/formats.md, "Activations"): per row and per scale group,
// m = max|x|, xq = rint(x * (127/m)) clamped to ±127, s = m/127; a group of zeros gets s = 0, xq = 0;
// a group holding NaN or ±Inf gets s = NaN, xq = 0, so that row's outputs are NaN as in a float matmul.
// Writes xq[0..length) and returns s.
inline float quantize_group(const float* x, int64_t length, int8_t* xq) {
  float amax = 0.f;
  float probe = 0.f;  // x * 0 is NaN exactly when x is NaN or infinite
  for (int64_t i = 0; i < length; ++i) {
    amax = std::max(amax, std::fabs(x[i]));
    probe += x[i] * 0.f;
  }
  if (!(amax > 0.f) || probe != 0.f) {
    if (length > 0) std::memset(xq, 0, static_cast<size_t>(length));  // the guard also quiets GCC's size warning
    return probe != 0.f ? std::numeric_limits<float>::quiet_NaN() : 0.f;
  }
  const float inv = static_cast<float>(kActivationQmax) / amax;
  for (int64_t i = 0; i < length; ++i) {
    float q = std::nearbyint(x[i] * inv);
    q = std::min(std::max(q, -static_cast<float>(kActivationQmax)), static_cast<float>(kActivationQmax));
    xq[i] = static_cast<int8_t>(q);
  }
  return amax / static_cast<float>(kActivationQmax);
}

}  // namespace sherry
