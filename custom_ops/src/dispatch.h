// Run-time choice of the matmul kernel path. The library is built for generic x86-64 with only the
// SIMD kernel files compiled for their ISA, so which path may run is decided here, from CPUID and
// what the OS saves on a context switch, and from the user's request. No onnxruntime types: the op
// code (matmul_op.cc) reads the request from the session config or the environment.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "kernel.h"

namespace sherry {

// Empty if this CPU and OS can run `path`, else the missing features (e.g. "avx512vbmi, xgetbv ZMM state").
const std::string& missing_cpu_features(KernelPath path);

// This CPU's model as the tuning database records it ("AuthenticAMD family 25 model 17": CPUID's vendor,
// family and model, the numbers Linux shows in /proc/cpuinfo; tvm_schedules/tune.py cpu_model_id), and
// its model name ("AMD EPYC 9654 96-Core Processor"). Kernel timings hold for one microarchitecture.
const std::string& cpu_model_id();
const std::string& cpu_model_name();

// The hardware threads (onnxruntime's intra-op pool has at most one per core by default): the most
// threads a parallel section can keep busy, which sizes the kernels' work items.
int64_t hardware_threads();

// Blocks per superblock of a lookup-table kernel's weight stream (the AVX-512 kernel's, and the TVM
// LUT kernel's, which rounds it to a divisor of the blocks), which is also the work item (row_tile).
// A chunk's tables come from L2 once per superblock and from L1 for its other blocks, and those L2
// reads decide the cold decode speed: with the weights streaming from memory, every chunk's switch of
// tables costs about 0.3 µs (Zen 4, 1 thread: sherry 2048x2048 cold 40 µs with 4 superblocks, 35
// with 2, 32 with 1, 30 if the tables never left L1; hot 26 µs in every case). So a superblock is as
// large as the hardware threads allow, one work item per thread, and never smaller than the old rule
// of at least 4 work items of at most 16 blocks, which machines with many threads keep.
int64_t superblock_blocks(int64_t blocks);

// What the user asked for: a specific path, or none (auto: the best that supports the weights).
struct KernelRequest {
  std::optional<KernelPath> forced;
  std::string origin;  // where the request came from, for error messages (e.g. "SHERRY_KERNEL=avx2")
};

// Parses "auto" | "scalar" | "avx2" | "avx512" | "tvm"; throws std::runtime_error naming `origin` otherwise.
KernelRequest parse_kernel_request(const std::string& value, const std::string& origin);

// The kernel for a node and why it was chosen (the kernel report prints the reason). With
// `batch_kernel`, calls of `batch_min_rows` rows of A or more run it instead of `kernel` (auto mode's
// regimes: the TVM kernel for one, the hand-written one for the other).
struct KernelChoice {
  std::unique_ptr<MatMulKernel> kernel;
  std::string reason;
  std::unique_ptr<MatMulKernel> batch_kernel;
  int64_t batch_min_rows = 0;
};

// Builds the kernel for `w`. Auto takes a linked TVM kernel for exactly these weights, per regime,
// where `sherry tune --verify` timed it at least kTvmMinSpeedup (kernel_tvm_table.h, 1.05x) faster
// than the hand-written kernel auto would otherwise run (the best ISA of this CPU) as onnxruntime
// nodes on this CPU model (make_tvm_kernel_if_faster): calls of fewer than its batch_min_rows rows of
// A where it was that much faster at M = 1 hot and cold, larger calls where it was at batch 128; else
// (and for the other regime) it tries avx512, then avx2 (each only if the CPU has it), then scalar.
// A forced path is used or it is an error: the CPU lacks it, or its factory declines these weights
// (for instance because its layout of them would be over the memory budget in kernel.h).
// Throws std::runtime_error with the reason; corrupt codes also surface as std::runtime_error.
KernelChoice make_kernel(const PackedWeights& w, const KernelRequest& request);

}  // namespace sherry
