// The onnxruntime ops of domain ai.sherry, one per entry of the format table (kFormats in formats.h,
// which names them): one op class parametrized by the weight format. All of them take
//   A      float32 [..., K]            activations (any leading dims, dynamic)
//   B      uint8   [N, row_bytes]      packed weights, a constant initializer (docs/formats.md)
//   scales float16 [N, ceil(K/group)]  per-group weight scales, a constant initializer
//   bias   float32 [N]                 optional
// with int attributes K, N, group_size, and give Y float32 [..., N].
// This file is the onnxruntime glue only: validation, the activation workspace and threading;
// the arithmetic is a MatMulKernel (kernel.h) chosen by dispatch.h.
#pragma once

#include <memory>
#include <string>

#include "kernel.h"
#include "ort_api.h"

namespace sherry {

inline constexpr const char* kDomain = "ai.sherry";

// Settings a session config entry gives, or else the environment variable beside it.
inline constexpr const char* kKernelConfigKey = "sherry.kernel";  // auto | scalar | avx2 | avx512
inline constexpr const char* kKernelEnv = "SHERRY_KERNEL";
inline constexpr const char* kReportConfigKey = "sherry.kernel_report";  // "1": print each node's path
inline constexpr const char* kReportEnv = "SHERRY_KERNEL_REPORT";

// One graph node: the validated geometry and the kernel built (and its weights repacked) once,
// when the session is created.
class MatMulNode {
 public:
  // Throws std::exception with the problem (without the op/node prefix, which the caller adds).
  MatMulNode(Format format, const OrtKernelInfo* info, std::string label);
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const noexcept;

 private:
  void compute(OrtKernelContext* context) const;

  std::string label_;  // "<op type> node 'name'", the prefix of every error
  Geometry geometry_;
  std::unique_ptr<MatMulKernel> kernel_;
  // Auto mode's kernel for calls of batch_min_rows_ rows of A or more, when it is another one.
  std::unique_ptr<MatMulKernel> batch_kernel_;
  int64_t batch_min_rows_ = 0;
};

class MatMulOp : public Ort::CustomOpBase<MatMulOp, MatMulNode, /*WithStatus=*/true> {
 public:
  explicit MatMulOp(Format format) : format_(format) {}

  const char* GetName() const;
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept;

  // Inputs are declared untyped so that a wrong dtype reaches our validation and its error message.
  size_t GetInputTypeCount() const { return 4; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  Format format_;
};

}  // namespace sherry
