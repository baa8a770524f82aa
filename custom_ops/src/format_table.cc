// SherryFormatTable: the format table (formats.h) as JSON, so that tests/test_format_table.py can check
// it against sherry_export/formats.py's FORMATS field by field without a second copy of either. Beside
// the names and geometry rules it evaluates the table's functions on probe shapes: row_bytes where
// check_geometry accepts (K, group_size), -1 where it refuses.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "formats.h"

namespace {

// K values around each format's multiples, the SmolLM2 shape, and a K whose row_bytes must not walk
// its groups; group sizes that divide or do not divide them, and the int32 bounds (kMaxGroupSize for
// ternary weights, a 127x shorter one for int8).
constexpr int64_t kProbeK[] = {0, 1, 3, 4, 8, 35, 70, 576, 2048, int64_t{1} << 40};
constexpr int64_t kInt8MaxGroup = std::numeric_limits<int32_t>::max() / (127 * 127);  // max_group_size(kInt8)
constexpr int64_t kProbeGroup[] = {0, 1, 3, 4, 32, 35, 128, kInt8MaxGroup, kInt8MaxGroup + 1, sherry::kMaxGroupSize - 4,
                                   sherry::kMaxGroupSize, sherry::kMaxGroupSize + 3};

std::vector<std::pair<int64_t, int64_t>> probes() {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (const int64_t k : kProbeK) {
    for (const int64_t gs : kProbeGroup) out.emplace_back(k, gs);
    out.emplace_back(k, k);      // one group per row
    out.emplace_back(k, k + 1);  // longer than the row
  }
  return out;
}

std::string table_json() {
  std::string json = "[";
  for (const sherry::FormatTraits& t : sherry::kFormats) {
    if (json.size() > 1) json += ", ";
    json += std::string("{\"name\": \"") + t.name + "\", \"op_type\": \"" + t.op_type +
            "\", \"k_multiple\": " + std::to_string(t.k_multiple) +
            ", \"group_multiple\": " + std::to_string(t.group_multiple) +
            ", \"lanes_per_code\": " + std::to_string(t.lanes_per_code) +
            ", \"max_weight\": " + std::to_string(t.max_weight) + ", \"row_bytes\": [";
    bool first = true;
    for (const auto& [k, gs] : probes()) {
      const bool valid = sherry::check_geometry(t.id, 1, k, gs).empty();
      json += std::string(first ? "" : ", ") + "[" + std::to_string(k) + ", " + std::to_string(gs) + ", " +
              std::to_string(valid ? t.row_bytes(k, gs) : -1) + "]";
      first = false;
    }
    json += "]}";
  }
  return json + "]";
}

}  // namespace

// Writes the table's JSON (NUL-terminated, cut to `size` bytes) into `buffer` and returns its full
// length without the NUL, as snprintf does: call it with size 0 to learn the length.
extern "C" __attribute__((visibility("default"))) size_t SherryFormatTable(char* buffer, size_t size) {
  try {
    const std::string json = table_json();
    if (size > 0) {
      const size_t n = std::min(size - 1, json.size());
      std::memcpy(buffer, json.data(), n);
      buffer[n] = '\0';
    }
    return json.size();
  } catch (...) {  // out of memory: nothing may unwind into a C caller
    if (size > 0) buffer[0] = '\0';
    return 0;
  }
}
