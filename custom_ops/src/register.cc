// The library's entry point: onnxruntime calls RegisterCustomOps for every SessionOptions that loads
// the library.
#include <array>
#include <cstddef>
#include <mutex>
#include <string>
#include <utility>

#include "matmul_op.h"

namespace {

// One op per entry of the format table, in its order.
template <size_t... I>
std::array<sherry::MatMulOp, sizeof...(I)> make_ops(std::index_sequence<I...>) {
  return {sherry::MatMulOp{sherry::kFormats[I].id}...};
}

// Trivially destructible, so they stay valid for sessions still alive while the process exits.
const std::array<sherry::MatMulOp, sherry::kFormatCount> kOps =
    make_ops(std::make_index_sequence<sherry::kFormatCount>());

// The domain is built once per process and deliberately never freed: every SessionOptions that
// loads the library shares it, and a session may outlive the options (and the Python objects) that
// created it. Rebuilding or freeing it per call frees ops that a live session still uses.
OrtCustomOpDomain* shared_domain() {
  static std::once_flag once;
  static OrtCustomOpDomain* domain = nullptr;
  std::call_once(once, [] {
    Ort::CustomOpDomain owned(sherry::kDomain);
    for (const sherry::MatMulOp& op : kOps) owned.Add(&op);
    domain = owned.release();
  });
  return domain;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than the headers; API version 1 is always there to say so
    const std::string message = "libsherry_ops was built against the onnxruntime API version " +
                                std::to_string(ORT_API_VERSION) + ", which this onnxruntime (" +
                                api_base->GetVersionString() + ") does not provide; use a newer onnxruntime";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  Ort::InitApi(api);
  try {
    return api->AddCustomOpDomain(options, shared_domain());
  } catch (const std::exception& e) {
    const std::string message = std::string("libsherry_ops: cannot register the ai.sherry ops: ") + e.what();
    return api->CreateStatus(ORT_FAIL, message.c_str());
  }
}
