// The table of TVM-compiled kernels that tvm_schedules/build.py generates (tvm_table.cc) from the
// tuning database: one entry per (format, K, N, group_size, target), each with an M = 1 function and
// a function for a block of `block_rows` rows of A, exported by the TVM objects as __tvm_ffi_<name>.
#pragma once

#include <cstddef>
#include <cstdint>

#include <tvm/ffi/c_api.h>

namespace sherry {

using TvmFunction = int32_t (*)(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

struct TvmEntry {
  int format;          // Format
  int64_t k, n, group_size;
  int isa;             // KernelPath of the ISA the object needs: 1 avx2, 2 avx512
  int64_t lane_block;  // rows interleaved per weight block (layout.py)
  int64_t block_rows;  // rows of A of one call of `mx`
  TvmFunction m1;      // M = 1
  TvmFunction mx;      // M = block_rows: each decoded weight serves the block's rows
  // `sherry tune --verify`: the hand-written kernel of the same ISA's time over this kernel's, both as
  // onnxruntime nodes at M = 1 (> 1: TVM is faster), hot and cold weights; 0 when never timed.
  double hot_speedup, cold_speedup;
  const char* cpu;       // the CPU that timed them, as cpu_model_id() (dispatch.h) names it; "" if unknown
  const char* cpu_name;  // its model name, for the report
  const char* target;
  int formulation;  // 0: weight planes (kernels.py); 1: sherry activation lookup tables (lut.py)
};

extern const TvmEntry kTvmEntries[];
extern const size_t kTvmEntryCount;

}  // namespace sherry
