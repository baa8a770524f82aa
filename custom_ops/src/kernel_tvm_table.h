// The table of TVM-compiled kernels that tvm_schedules/build.py generates (tvm_table.cc) from the
// tuning database: one entry per (format, K, N, group_size, target), each with an M = 1 function, the
// block function (`chunk_rows` rows of A in blocks of `block_rows` that share each weight decode) and
// one block of it, exported by the TVM objects as __tvm_ffi_<name>.
#pragma once

#include <cstddef>
#include <cstdint>

#include <tvm/ffi/c_api.h>

namespace sherry {

using TvmFunction = int32_t (*)(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

struct TvmEntry {
  int format;          // Format
  int64_t k, n, group_size;
  int isa;                   // KernelPath of the ISA the object needs: 1 avx2, 2 avx512
  int64_t lane_block;        // rows of N of one parallel task of `m1` (layout.py)
  int64_t block_lane_block;  // the same for `mx` and `mb` (the block function's own tiles per step)
  int64_t chunk_rows;        // rows of A of one call of `mx`
  int64_t block_rows;        // rows of A of one call of `mb`, and of each block that shares a decode
  TvmFunction m1;            // M = 1
  TvmFunction mx;            // M = chunk_rows, in blocks of block_rows rows (the block function, tuned on its own)
  TvmFunction mb;            // M = block_rows: one block, with mx's decisions
  // `sherry tune --verify`: the hand-written kernel of the same ISA's time over this kernel's, both as
  // onnxruntime nodes (> 1: TVM is faster): at M = 1 with hot and cold weights, and at `batch` rows of A
  // hot, the verdict auto mode applies to calls of `batch_min_rows` rows or more; 0 when never timed.
  double hot_speedup, cold_speedup, batch_speedup;
  int64_t batch, batch_min_rows;
  const char* cpu;       // the CPU that timed them, as cpu_model_id() (dispatch.h) names it; "" if unknown
  const char* cpu_name;  // its model name, for the report
  const char* target;
  int formulation;  // 0: weight planes (kernels.py); 1: sherry activation lookup tables (lut.py)
};

// Auto mode takes a TVM kernel for a regime only where the database timed it at least this much faster
// than the hand-written kernel (every speed-up of the regime): one `sherry tune --verify` run moves by a
// few percent on a shared machine, and a node whose two regimes take different kernels holds its weights
// twice. tvm_schedules/tune.py AUTO_MIN_SPEEDUP mirrors it (tests/test_tvm_auto.py checks).
constexpr double kTvmMinSpeedup = 1.05;

extern const TvmEntry kTvmEntries[];
extern const size_t kTvmEntryCount;

}  // namespace sherry
