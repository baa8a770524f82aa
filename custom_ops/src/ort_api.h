// The one way this library includes the onnxruntime C++ API. The library does not link against
// onnxruntime: RegisterCustomOps hands the API table of the runtime that loads it to Ort::InitApi,
// so every translation unit must see ORT_API_MANUAL_INIT (else the header would call
// OrtGetApiBase, a symbol of libonnxruntime).
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

// KernelInfo_GetConfigEntries (the session's sherry.kernel setting) arrived in API version 24.
static_assert(ORT_API_VERSION >= 24, "libsherry_ops needs onnxruntime headers of API version 24 (1.24) or newer");
