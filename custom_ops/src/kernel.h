// The interface every matmul kernel implements (scalar, AVX2, AVX-512, TVM), so the onnxruntime op
// code stays apart from the arithmetic. A kernel owns its private repacked copy of the weights,
// made once from the canonical layout in docs/formats.md.
//
// One Compute of the op runs (stride = activation_row_bytes_for(M)):
//   1. prepare_row_for(A[m], M, workspace + m * stride)            for every row m of A (in parallel);
//   2. compute(workspace, M, n_begin, n_end, bias, Y)             for output-row tiles (in parallel),
//      each tile [i * row_tile_for(M), min((i+1) * row_tile_for(M), N)).
// The op cuts N into groups of row tiles first and the rows of A into chunks (of at least
// min_row_chunk() rows) only as far as the threads need.
// At decode sizes (M <= 4) with several work items, each thread runs step 1 itself, once per call,
// into a workspace of its own (matmul_op.cc), so prepare_row must be callable from any thread.
// Both steps run inside onnxruntime's parallel sections. A kernel should allocate what they need when
// it is created; if one still throws (out of memory for a thread's scratch, a generated TVM function
// that returns an error), the op catches the exception inside the parallel body and fails the call with
// it after the section (matmul_op.cc parallel_for): no exception crosses onnxruntime's thread pool.
// Every kernel must give exactly the numerics of docs/formats.md ("Activations"): int8 activations
// per row and scale group, exact int32 dot products per group, y = sum_g (alpha_g * s_g) * dot_g.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#include "formats.h"

namespace sherry {

enum class KernelPath : int { kScalar = 0, kAVX2 = 1, kAVX512 = 2, kTVM = 3 };

inline const char* path_name(KernelPath p) {
  switch (p) {
    case KernelPath::kScalar: return "scalar";
    case KernelPath::kAVX2: return "avx2";
    case KernelPath::kAVX512: return "avx512";
    case KernelPath::kTVM: return "tvm";
  }
  return "?";
}

class MatMulKernel {
 public:
  virtual ~MatMulKernel() = default;
  virtual KernelPath path() const = 0;

  // Output rows (of the weight, i.e. N) that one parallel work item covers.
  virtual int64_t row_tile() const = 0;

  // The same for a call of `call_rows` rows of A: a kernel whose functions for such calls run on other
  // row tiles says so (the TVM kernel's block function is tuned on its own). compute() must still
  // take any range, since it may get a chunk of the call's rows.
  virtual int64_t row_tile_for(int64_t call_rows) const {
    (void)call_rows;
    return row_tile();
  }

  // Bytes of workspace one prepared activation row takes (a multiple of 64).
  virtual size_t activation_row_bytes() const = 0;

  // The same for a call of `call_rows` rows of A, the rows' stride in such a call's workspace: a
  // kernel whose layout depends on the call (prepare_row_for) may need less for some calls, and then
  // finds the stride, as it finds its path, from what the rows hold. At most activation_row_bytes().
  virtual size_t activation_row_bytes_for(int64_t call_rows) const {
    (void)call_rows;
    return activation_row_bytes();
  }

  // Quantize and lay out one row of A (K floats) into `workspace_row` (64-byte aligned).
  // Padding contract: the op hands over the workspace uninitialised (no memset per call), with
  // whatever earlier calls left in it. prepare_row must therefore write every byte that compute may
  // read, padding included: zero activations (or table entries) for columns past K and for the
  // padding of a group to whole SIMD pieces, zero correction terms, and a scale for every group.
  // Bytes compute never reads (alignment gaps between sections) may stay as they are.
  // tests/kernel_check.cc fills the workspace with garbage to hold every kernel to this.
  virtual void prepare_row(const float* a_row, uint8_t* workspace_row) const = 0;

  // prepare_row for a call of `call_rows` rows of A (the op passes the same count for every row
  // of a call). A kernel whose path depends on the number of rows may leave out what that path
  // does not read (the AVX2 kernel builds its lookup tables only for its GEMV); compute() must then
  // choose its path from what the rows hold, not from its own `m`, which may be a chunk of them.
  virtual void prepare_row_for(const float* a_row, int64_t call_rows, uint8_t* workspace_row) const {
    (void)call_rows;
    prepare_row(a_row, workspace_row);
  }

  // The fewest rows of A worth one compute() call, for a call of `call_rows` rows. A kernel whose
  // path for such a call decodes its weights once per compute() (and then runs them over every row
  // it is given) says how many rows make that decode worth it; the op cuts the rows of A into chunks
  // no smaller than that, unless N has too few work items to feed the threads (matmul_op.cc).
  virtual int64_t min_row_chunk(int64_t call_rows) const {
    (void)call_rows;
    return 1;
  }

  // Y[m, n] for m in [0, M), n in [n_begin, n_end), row stride N; bias (N floats) may be null.
  // `workspace` holds M prepared rows at stride activation_row_bytes_for(the call's rows).
  virtual void compute(const uint8_t* workspace, int64_t m, int64_t n_begin, int64_t n_end,
                       const float* bias, float* y) const = 0;
};

// The weights as they arrive from the model, in the canonical layout of docs/formats.md.
struct PackedWeights {
  Format format;
  Geometry geometry;
  const uint8_t* data;     // [N, row_bytes(format, K, group_size)]
  const uint16_t* scales;  // [N, groups] IEEE half
};

// What a SIMD path may allocate for one node, relative to what the model and the input already
// hold: its private weights (plus the per-thread scratch its prefill decodes weights into) at most
// kMaxWeightExpansion x the canonical packed bytes and scales, plus kWeightSlack (small matrices are
// padded to whole tiles); a prepared activation row at most kMaxActivationExpansion x the row's
// float32 input, plus kActivationSlack. Tiny scale groups are what breaks these: every group is
// padded to whole SIMD pieces and gets its own tables and scales (tl2 with group_size 1 on AVX2
// took 37 bytes of workspace per input byte). The scalar kernel (one byte per weight, four per
// scale, about five bytes of workspace per column) is the fallback and always fits.
constexpr double kMaxWeightExpansion = 4;
constexpr double kWeightSlack = 16.0 * (1 << 20);
constexpr double kMaxActivationExpansion = 8;
constexpr double kActivationSlack = 64.0 * (1 << 10);

// Thrown by a SIMD kernel's constructor, before it allocates, when its layout is over the budget;
// its factory turns it into a decline (nullptr and the reason).
class KernelDeclined : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws KernelDeclined when `weight_bytes` (private weights and per-thread scratch) or
// `activation_row_bytes` exceed the budget above.
inline void check_memory_budget(const PackedWeights& w, double weight_bytes, double activation_row_bytes) {
  const Geometry& g = w.geometry;
  const double canonical = static_cast<double>(g.n) *
                           static_cast<double>(row_bytes(w.format, g.k, g.group_size) + 2 * g.groups());
  const double weight_limit = kMaxWeightExpansion * canonical + kWeightSlack;
  const double input_row = 4.0 * static_cast<double>(g.k);
  const double row_limit = kMaxActivationExpansion * input_row + kActivationSlack;
  char message[256];
  if (weight_bytes > weight_limit)
    std::snprintf(message, sizeof message,
                  "its layout would take %.1f MB of weights and scratch, over its budget of %.1f MB = %g x the "
                  "%.1f MB of packed weights and scales + %g MiB",
                  weight_bytes / 1e6, weight_limit / 1e6, kMaxWeightExpansion, canonical / 1e6,
                  kWeightSlack / (1 << 20));
  else if (activation_row_bytes > row_limit)
    std::snprintf(message, sizeof message,
                  "its layout would take %.1f MB of workspace per row of A, over its budget of %.1f MB = %g x the "
                  "%.1f MB float32 row + %g KiB",
                  activation_row_bytes / 1e6, row_limit / 1e6, kMaxActivationExpansion, input_row / 1e6,
                  kActivationSlack / (1 << 10));
  else
    return;
  throw KernelDeclined(message);
}

// Builds Kernel(w), or returns nullptr with the reason in *declined (when given) if it declines.
template <class Kernel>
std::unique_ptr<MatMulKernel> make_or_decline(const PackedWeights& w, std::string* declined) {
  try {
    return std::make_unique<Kernel>(w);
  } catch (const KernelDeclined& e) {
    if (declined) *declined = e.what();
    return nullptr;
  }
}

// quantize_group (formats.h) with AVX2 (kernel_avx2.cc): the same bytes and scale, and sum(xq) in *sum.
// Only on a CPU with AVX2 (the TVM kernels, whose objects need AVX2 or AVX-512, use it).
float quantize_group_simd(const float* x, int64_t length, int8_t* xq, int32_t* sum);

// Each factory repacks the weights; it returns nullptr when this path cannot take the geometry,
// with the reason in *declined when that is not null (the dispatcher then falls back), and throws
// std::runtime_error on corrupt codes.
std::unique_ptr<MatMulKernel> make_scalar_kernel(const PackedWeights& w);
std::unique_ptr<MatMulKernel> make_avx2_kernel(const PackedWeights& w, std::string* declined);
std::unique_ptr<MatMulKernel> make_avx512_kernel(const PackedWeights& w, std::string* declined);
// The sherry activation lookup tables of the AVX-512 kernel (kernel_avx512.cc group_tables) for one
// scale group of `length` activations `x`: quantized with the shared numerics (formats.h), then 256
// bytes per piece of 16 columns at `out`, entry (sign << 6 | j << 4 | idx) of the xl (then xh) table =
// ±Σ_p lanes(idx)[p] · x[4j + p] with xl = xq & 15, xh = xq >> 4; `pieces` (at least the group's)
// pieces are written, those past the group all zero. *scale: the group's activation scale. The TVM
// LUT kernel (kernel_tvm.cc) reads the same tables. Needs AVX-512 (BW).
void sherry_group_tables_avx512(const float* x, int64_t length, int64_t pieces, uint8_t* out, float* scale);
// The sherry activation lookup tables of the AVX2 kernel (kernel_avx2.cc build_lut) for one scale group of
// `length` activations `x`, quantized with the shared numerics, for `units` (even, at least
// ceil(length / 4)) blocks of 4 columns: 32 bytes per unit at `out`, per unit pair the U tables of its
// two units, then their V tables, S[idx] = Σ_p lanes(idx)[p] · xq[4u + p] = 31·U + V; units past the
// group have zero activations. *scale: the group's activation scale. The TVM LUT kernel's AVX2 form
// (kernel_tvm.cc) reads these tables. Needs AVX2.
void sherry_group_tables_avx2(const float* x, int64_t length, int64_t units, uint8_t* out, float* scale);
// The int8 format's SIMD kernels (kernel_int8_avx2.cc, kernel_int8_avx512.cc); make_avx512_kernel and
// make_avx2_path_kernel hand int8 weights to them.
std::unique_ptr<MatMulKernel> make_int8_avx2_kernel(const PackedWeights& w, std::string* declined);
std::unique_ptr<MatMulKernel> make_int8_avx512_kernel(const PackedWeights& w, std::string* declined);
// The AVX2 path for any format (kernel_paths.cc): make_int8_avx2_kernel or make_avx2_kernel.
std::unique_ptr<MatMulKernel> make_avx2_path_kernel(const PackedWeights& w, std::string* declined);
// The TVM-tuned kernel (kernel_tvm.cc) for these exact weights, if the library was built with one
// this CPU can run; else nullptr, with the reason in *declined when that is not null.
std::unique_ptr<MatMulKernel> make_tvm_kernel(const PackedWeights& w, std::string* declined);
// Auto mode's TVM kernel, per regime: calls of fewer than `batch_min_rows` rows of A (decode) take it
// only where `sherry tune --verify` timed it faster than `hand` (the hand-written path auto would run
// otherwise; the comparison must be with that ISA) as onnxruntime nodes at M = 1, hot and cold; calls
// of `batch_min_rows` rows or more (prefill) where it timed it faster at its batch (128 rows); both on
// this CPU model (cpu_model_id in dispatch.h). `kernel` is the TVM kernel when either regime takes it.
// The reasons say why either way, for the kernel report: "tvm: ..." for a regime that takes it,
// "<hand>: ..." for one that does not.
struct TvmAutoChoice {
  std::unique_ptr<MatMulKernel> kernel;
  bool single = false, batch = false;  // the regimes that take `kernel`
  int64_t batch_min_rows = 0;          // 0: no tuned kernel, so no regimes
  std::string single_reason, batch_reason;
};
TvmAutoChoice make_tvm_kernel_if_faster(const PackedWeights& w, KernelPath hand);

}  // namespace sherry
