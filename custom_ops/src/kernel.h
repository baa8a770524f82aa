// The interface every matmul kernel implements (scalar, AVX2, AVX-512, TVM), so the onnxruntime op
// code stays apart from the arithmetic. A kernel owns its private repacked copy of the weights,
// made once from the canonical layout in docs/formats.md.
//
// One Compute of the op runs:
//   1. prepare_row(A[m], workspace + m * activation_row_bytes())  for every row m of A (in parallel);
//   2. compute(workspace, M, n_begin, n_end, bias, Y)             for output-row tiles (in parallel),
//      each tile [i * row_tile(), min((i+1) * row_tile(), N)).
// At decode sizes (M <= 4) with several work items, each thread runs step 1 itself, once per call,
// into a workspace of its own (matmul_op.cc), so prepare_row must be callable from any thread.
// Every kernel must give exactly the numerics of docs/formats.md ("Activations"): int8 activations
// per row and scale group, exact int32 dot products per group, y = sum_g (alpha_g * s_g) * dot_g.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
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

  // Bytes of workspace one prepared activation row takes (a multiple of 64).
  virtual size_t activation_row_bytes() const = 0;

  // Quantize and lay out one row of A (K floats) into `workspace_row` (64-byte aligned).
  // Padding contract: the op hands over the workspace uninitialised (no memset per call), with
  // whatever earlier calls left in it. prepare_row must therefore write every byte that compute may
  // read, padding included: zero activations (or table entries) for columns past K and for the
  // padding of a group to whole SIMD pieces, zero correction terms, and a scale for every group.
  // Bytes compute never reads (alignment gaps between sections) may stay as they are.
  // tests/kernel_check.cc fills the workspace with garbage to hold every kernel to this.
  virtual void prepare_row(const float* a_row, uint8_t* workspace_row) const = 0;

  // Y[m, n] for m in [0, M), n in [n_begin, n_end), row stride N; bias (N floats) may be null.
  // `workspace` holds M prepared rows at stride activation_row_bytes().
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

// Each factory repacks the weights; it returns nullptr when this path cannot take the geometry
// (the dispatcher then falls back) and throws std::runtime_error on corrupt codes.
std::unique_ptr<MatMulKernel> make_scalar_kernel(const PackedWeights& w);
std::unique_ptr<MatMulKernel> make_avx2_kernel(const PackedWeights& w);
std::unique_ptr<MatMulKernel> make_avx512_kernel(const PackedWeights& w);
// The TVM-tuned kernel (kernel_tvm.cc) for these exact weights, if the library was built with one
// this CPU can run; with only_if_faster, only if the tuning database measured it faster than the
// hand-written kernel of its ISA.
std::unique_ptr<MatMulKernel> make_tvm_kernel(const PackedWeights& w, bool only_if_faster);

}  // namespace sherry
