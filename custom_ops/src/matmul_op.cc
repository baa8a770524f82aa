#include "matmul_op.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <optional>
#include <stdexcept>
#include <utility>
#include <vector>

#include "dispatch.h"

namespace sherry {
namespace {

enum Input : size_t { kA = 0, kB = 1, kScales = 2, kBias = 3, kInputCount = 4 };
constexpr const char* kInputNames[kInputCount] = {"A", "B", "scales", "bias"};
constexpr ONNXTensorElementDataType kInputTypes[kInputCount] = {
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8,
    ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};

// A parallel work item should carry at least this many multiply-adds, so that handing it to the
// intra-op pool costs little next to it; more items than kMaxItems would not balance threads better.
constexpr int64_t kMinItemCost = 32768;
constexpr int64_t kMaxItems = 64;
constexpr size_t kWorkspaceAlignment = 64;

// A problem with the node or its inputs: reported as ORT_INVALID_ARGUMENT.
[[noreturn]] void fail(const std::string& problem) { throw std::invalid_argument(problem); }

std::string dtype_name(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    default: return "element type " + std::to_string(static_cast<int>(type));
  }
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

void check_dtype(Input input, ONNXTensorElementDataType got) {
  if (got != kInputTypes[input])
    fail(std::string("input ") + kInputNames[input] + " must be " + dtype_name(kInputTypes[input]) + ", got " +
         dtype_name(got));
}

void check_shape(Input input, const std::vector<int64_t>& got, const std::vector<int64_t>& want,
                 const std::string& meaning) {
  if (got != want)
    fail(std::string("input ") + kInputNames[input] + " must have shape " + meaning + " = " + shape_string(want) +
         ", got " + shape_string(got));
}

int64_t int_attribute(const OrtKernelInfo* info, const char* name) {
  int64_t value = 0;
  if (OrtStatus* status = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value)) {
    const Ort::Status owned(status);
    fail(std::string("attribute '") + name + "' is missing or not an int (" + owned.GetErrorMessage() + ")");
  }
  return value;
}

// Inputs the node actually has: 3, or 4 with a bias (an empty name means an omitted optional input).
size_t present_inputs(const Ort::ConstKernelInfo& info) {
  const size_t count = info.GetInputCount();
  if (count > kBias && info.GetInputName(kBias).empty()) return kBias;
  return count;
}

Ort::ConstValue constant_input(const Ort::ConstKernelInfo& info, Input input) {
  int is_constant = 0;
  Ort::ConstValue value = info.GetTensorConstantInput(input, &is_constant);
  if (!is_constant || value == nullptr)
    fail(std::string("input ") + kInputNames[input] +
         " must be a constant initializer (the kernel repacks the weights once, when the session is created), "
         "but it is a graph input or computed at run time");
  return value;
}

void check_packed_weights(Format format, const Geometry& g, const std::vector<int64_t>& shape) {
  const std::string meaning = std::string("[N, row_bytes] for ") + format_name(format) + " with K=" +
                              std::to_string(g.k) + ", group_size=" + std::to_string(g.group_size);
  // Every format spends at least one bit per weight, so a row shorter than K/8 bytes cannot match;
  // ruling that out first bounds K by the real tensor before row_bytes() walks K's scale groups.
  if (shape.size() != 2 || g.k > 8 * shape[1])
    fail("input B must have shape " + meaning + " (at least K/8 bytes per row), got " + shape_string(shape));
  check_shape(kB, shape, {g.n, row_bytes(format, g.k, g.group_size)}, meaning);
}

void check_bias_shape(const Geometry& g, const std::vector<int64_t>& shape) { check_shape(kBias, shape, {g.n}, "[N]"); }

// A string setting: the session config entry `key` wins over the environment variable `env`.
struct Setting {
  std::string value;
  std::string origin;  // e.g. "session config sherry.kernel=avx2"
};

std::optional<Setting> read_setting(const Ort::KeyValuePairs& config, const char* key, const char* env) {
  if (const char* value = config.GetValue(key))
    return Setting{value, std::string("session config ") + key + "=" + value};
  const char* value = std::getenv(env);
  if (value && *value) return Setting{value, std::string(env) + "=" + value + " in the environment"};
  return std::nullopt;
}

// Cuts `units` into about `chunks` contiguous chunks of `size` units (the last may be short).
struct Split {
  int64_t count;
  int64_t size;
};

Split split(int64_t units, int64_t chunks) {
  const int64_t size = ceil_div(units, std::clamp<int64_t>(chunks, 1, units));
  return {ceil_div(units, size), size};
}

int64_t work_items(int64_t cost) { return std::clamp<int64_t>(cost / kMinItemCost, 1, kMaxItems); }

// How many chunks to cut the `m` rows of A of a call into, when N gives `col_items` work items
// and the call's cost asks for `wanted` items in all. Enough for `wanted`, but a kernel that decodes
// its weights once per compute() call would repeat that decode for every chunk: chunks stay at
// least kernel.min_row_chunk(m) rows, unless the column items alone cannot feed the threads.
int64_t row_chunks_for(const MatMulKernel& kernel, int64_t m, int64_t col_items, int64_t wanted) {
  const int64_t min_rows = std::max<int64_t>(1, kernel.min_row_chunk(m));
  const int64_t worth = std::max(ceil_div(m, min_rows), ceil_div(hardware_threads(), col_items));
  return std::min(ceil_div(wanted, col_items), worth);
}

// The first exception of the items of a parallel section, kept to be rethrown after it.
class FirstError {
 public:
  void keep(std::exception_ptr error) noexcept {
    if (!taken_.exchange(true, std::memory_order_acq_rel)) error_ = std::move(error);
  }
  // Called after the section, which has joined every item.
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> taken_{false};
  std::exception_ptr error_;
};

// Runs body(i) for i in [0, count) on the session's intra-op threads (inline for a single item).
// No exception may cross onnxruntime's thread pool (its callback is a C function): an item that
// throws (a kernel's scratch allocation, a failing generated TVM function) is caught inside the
// body, the other items still run, and the first exception is rethrown here, after the section, to
// become the node's error status (guarded).
template <typename Body>
void parallel_for(const Ort::KernelContext& context, int64_t count, Body body) {
  if (count == 1) {
    body(0);
    return;
  }
  FirstError error;
  auto item = [&](int64_t i) noexcept {
    try {
      body(i);
    } catch (...) {
      error.keep(std::current_exception());
    }
  };
  context.ParallelFor([](void* data, size_t i) { (*static_cast<decltype(item)*>(data))(static_cast<int64_t>(i)); },
                      static_cast<size_t>(count), 0, &item);
  error.rethrow();
}

struct FreeBytes {
  void operator()(uint8_t* p) const noexcept { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t, FreeBytes>;

// A 64-byte aligned workspace of at least `bytes`, left as it is: prepare_row writes every byte a
// kernel reads (the padding contract in kernel.h), so no memset. Workspaces up to kCachedWorkspace
// (batch-1 decode, small prefill) are reused by the calling thread from call to call; larger ones
// are allocated per call, where the call's own work dwarfs the allocation.
constexpr size_t kCachedWorkspace = size_t{4} << 20;

// At least `bytes` (rounded up to whole alignment units), 64-byte aligned; null when out of memory.
AlignedBytes try_aligned_bytes(size_t bytes) noexcept {
  const size_t rounded = std::max<size_t>(ceil_div(static_cast<int64_t>(bytes), kWorkspaceAlignment), 1) *
                         kWorkspaceAlignment;
  return AlignedBytes(static_cast<uint8_t*>(std::aligned_alloc(kWorkspaceAlignment, rounded)));
}

AlignedBytes aligned_bytes(size_t bytes) {
  AlignedBytes buffer = try_aligned_bytes(bytes);
  if (!buffer) throw std::bad_alloc();
  return buffer;
}

// A buffer a thread keeps from call to call, grown (its contents dropped) when asked for more.
class ThreadBuffer {
 public:
  // At least `bytes`, 64-byte aligned; null when out of memory.
  uint8_t* reserve(size_t bytes) noexcept {
    if (bytes_ < bytes) {
      data_.reset();  // free the old one before asking for the new one
      data_ = try_aligned_bytes(bytes);
      bytes_ = data_ ? bytes : 0;
    }
    return data_.get();
  }

 private:
  AlignedBytes data_;
  size_t bytes_ = 0;
};

class Workspace {
 public:
  explicit Workspace(size_t bytes) {
    if (bytes > kCachedWorkspace) {
      own_ = aligned_bytes(bytes);
      data_ = own_.get();
      return;
    }
    thread_local ThreadBuffer cached;
    data_ = cached.reserve(bytes);
    if (data_ == nullptr) throw std::bad_alloc();
  }
  uint8_t* data() const { return data_; }

 private:
  AlignedBytes own_;
  uint8_t* data_ = nullptr;
};

// Decode (at most kLocalRows rows of A) on several threads: every thread prepares the rows itself,
// once per call, into a buffer of its own, instead of all threads reading rows one thread prepared.
// Sherry's and TL2's prepared rows are activation tables of 16 bytes per column (32 KB at K = 2048):
// pulling them into another core's cache cost more than building them there (a 576->960 Sherry node
// took 7 us on one thread and 9 us on two; the preparation itself is 1-2 us). The threads build in
// parallel, so the call's serial preparation step disappears as well.
constexpr int64_t kLocalRows = 4;
// ... and only while those rows are small enough to be worth keeping in a core's cache: every thread
// holds its own copy from call to call, so larger rows (a very long K, or tables for tiny scale
// groups) would multiply the memory by the thread count for no gain.
constexpr size_t kLocalRowsBytes = size_t{4} << 20;

// Each Compute call's number, process-wide: a thread's buffer holds the rows of the call it was
// prepared for, and a later call (of any node or session) prepares again.
std::atomic<uint64_t> g_call_counter{0};

// The rows of call `call` prepared in this thread's buffer, or nullptr if the buffer cannot be
// allocated (the caller then falls back to shared rows). Runs inside a parallel body: prepare_row's
// exceptions are parallel_for's to catch.
const uint8_t* thread_prepared_rows(const MatMulKernel& kernel, const float* x, int64_t m, int64_t k, size_t stride,
                                    uint64_t call) {
  // Its own buffer, not Workspace's: a thread that also runs some other node's Compute between two
  // items of this call would overwrite those rows without changing prepared_call.
  thread_local ThreadBuffer buffer;
  thread_local uint64_t prepared_call = 0;
  // <= kLocalRows rows: no overflow. A call's first item on a thread is the only one that can grow
  // the buffer, and it prepares the rows anyway.
  uint8_t* rows = buffer.reserve(static_cast<size_t>(m) * stride);
  if (rows != nullptr && prepared_call != call) {
    for (int64_t r = 0; r < m; ++r) kernel.prepare_row_for(x + r * k, m, rows + r * stride);
    prepared_call = call;
  }
  return rows;
}

// Runs `body`, turning any exception into an onnxruntime status whose message starts with `label`.
template <typename Body>
OrtStatusPtr guarded(const OrtApi& api, const std::string& label, Body body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), (label + ": " + e.what()).c_str());
  } catch (const std::invalid_argument& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, (label + ": " + e.what()).c_str());
  } catch (const std::bad_alloc&) {
    return api.CreateStatus(ORT_FAIL, (label + ": out of memory").c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_FAIL, (label + ": " + e.what()).c_str());
  }
}

std::string node_label(Format format, const OrtKernelInfo* info) {
  std::string name;
  try {
    name = Ort::ConstKernelInfo(info).GetNodeName();
  } catch (const Ort::Exception&) {
    // The label only decorates error messages; an op without a readable name is still reported.
  }
  return std::string(traits(format).op_type) + " node '" + name + "'";
}

}  // namespace

MatMulNode::MatMulNode(Format format, const OrtKernelInfo* raw_info, std::string label) : label_(std::move(label)) {
  const Ort::ConstKernelInfo info(raw_info);
  geometry_.n = int_attribute(raw_info, "N");
  geometry_.k = int_attribute(raw_info, "K");
  geometry_.group_size = int_attribute(raw_info, "group_size");
  if (const std::string problem = check_geometry(format, geometry_.n, geometry_.k, geometry_.group_size);
      !problem.empty())
    fail("invalid attributes: " + problem);

  const size_t inputs = present_inputs(info);
  for (size_t i = 0; i < inputs; ++i) {
    const Ort::TypeInfo type = info.GetInputTypeInfo(i);
    if (type.GetONNXType() != ONNX_TYPE_TENSOR) fail(std::string("input ") + kInputNames[i] + " must be a tensor");
    check_dtype(static_cast<Input>(i), type.GetTensorTypeAndShapeInfo().GetElementType());
  }

  const Ort::ConstValue packed = constant_input(info, kB);
  check_packed_weights(format, geometry_, packed.GetTensorTypeAndShapeInfo().GetShape());
  const Ort::ConstValue scales = constant_input(info, kScales);
  check_shape(kScales, scales.GetTensorTypeAndShapeInfo().GetShape(), {geometry_.n, geometry_.groups()},
              "[N, ceil(K/group_size)]");
  if (inputs > kBias) {  // a bias computed at run time is checked in compute()
    int is_constant = 0;
    const Ort::ConstValue bias = info.GetTensorConstantInput(kBias, &is_constant);
    if (is_constant && bias != nullptr) check_bias_shape(geometry_, bias.GetTensorTypeAndShapeInfo().GetShape());
  }

  const Ort::KeyValuePairs config = info.GetConfigEntries();
  const std::optional<Setting> path = read_setting(config, kKernelConfigKey, kKernelEnv);
  const KernelRequest request = path ? parse_kernel_request(path->value, path->origin)
                                     : parse_kernel_request("auto", "default");
  const PackedWeights weights{format, geometry_, packed.GetTensorData<uint8_t>(),
                              static_cast<const uint16_t*>(scales.GetTensorRawData())};
  KernelChoice choice = make_kernel(weights, request);
  kernel_ = std::move(choice.kernel);
  batch_kernel_ = std::move(choice.batch_kernel);
  batch_min_rows_ = choice.batch_min_rows;

  if (const std::optional<Setting> report = read_setting(config, kReportConfigKey, kReportEnv);
      report && report->value != "0") {
    std::string uses = std::string("the ") + path_name(kernel_->path()) + " kernel";
    if (batch_kernel_)
      uses += " for M < " + std::to_string(batch_min_rows_) + " and the " + path_name(batch_kernel_->path()) +
              " kernel for M >= " + std::to_string(batch_min_rows_);
    std::fprintf(stderr, "sherry_ops: %s (N=%lld, K=%lld, group_size=%lld) uses %s (requested: %s%s%s)\n",
                 label_.c_str(), static_cast<long long>(geometry_.n), static_cast<long long>(geometry_.k),
                 static_cast<long long>(geometry_.group_size), uses.c_str(),
                 path ? path->origin.c_str() : "auto by default", choice.reason.empty() ? "" : "; why: ",
                 choice.reason.c_str());
  }
}

OrtStatusPtr MatMulNode::ComputeV2(OrtKernelContext* context) const noexcept {
  return guarded(Ort::GetApi(), label_, [&] { compute(context); });
}

void MatMulNode::compute(OrtKernelContext* raw_context) const {
  const Ort::KernelContext context(raw_context);
  const Geometry& g = geometry_;
  const Ort::ConstValue a = context.GetInput(kA);
  const Ort::TensorTypeAndShapeInfo a_info = a.GetTensorTypeAndShapeInfo();
  check_dtype(kA, a_info.GetElementType());
  std::vector<int64_t> shape = a_info.GetShape();
  if (shape.empty() || shape.back() != g.k)
    fail("input A must have shape [..., K] with K=" + std::to_string(g.k) + ", got " + shape_string(shape));
  int64_t m = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) m *= shape[i];

  const float* bias = nullptr;
  if (context.GetInputCount() > kBias) {
    const Ort::ConstValue b = context.GetInput(kBias);
    if (b != nullptr) {
      const Ort::TensorTypeAndShapeInfo b_info = b.GetTensorTypeAndShapeInfo();
      check_dtype(kBias, b_info.GetElementType());
      check_bias_shape(g, b_info.GetShape());
      bias = b.GetTensorData<float>();
    }
  }

  shape.back() = g.n;
  float* y = context.GetOutput(0, shape).GetTensorMutableData<float>();
  if (m == 0) return;
  const float* x = a.GetTensorData<float>();
  // The regime's kernel, decided per call (auto mode may run another one for large calls).
  const MatMulKernel& kernel = batch_kernel_ && m >= batch_min_rows_ ? *batch_kernel_ : *kernel_;
  const size_t stride = kernel.activation_row_bytes_for(m);
  if (m > static_cast<int64_t>(std::numeric_limits<size_t>::max() / stride))
    fail("input A has too many rows (" + std::to_string(m) + ") for one workspace");
  const int64_t tile = kernel.row_tile_for(m);
  const int64_t wanted = work_items(m * g.n * g.k);
  const Split cols = split(ceil_div(g.n, tile), wanted);
  const Split row_chunks = split(m, row_chunks_for(kernel, m, cols.count, wanted));
  const int64_t items = cols.count * row_chunks.count;
  // Output tiles: groups of the kernel's row tiles along N, every row of A at once (each weight tile
  // is read once for all of them); when N has too few tiles for the call's work (small N, or a long
  // prefill), the rows of A are cut into chunks as well (row_chunks_for).
  auto compute_item = [&](int64_t item, const uint8_t* rows) {
    const int64_t n_begin = (item % cols.count) * cols.size * tile;
    const int64_t n_end = std::min(g.n, n_begin + cols.size * tile);
    const int64_t m_begin = (item / cols.count) * row_chunks.size;
    const int64_t m_end = std::min(m, m_begin + row_chunks.size);
    kernel.compute(rows + m_begin * stride, m_end - m_begin, n_begin, n_end, bias, y + m_begin * g.n);
  };

  if (m <= kLocalRows && items > 1 && static_cast<size_t>(m) * stride <= kLocalRowsBytes) {
    const uint64_t call = g_call_counter.fetch_add(1, std::memory_order_relaxed) + 1;
    std::atomic<bool> unprepared{false};
    parallel_for(context, items, [&](int64_t item) {
      const uint8_t* rows = thread_prepared_rows(kernel, x, m, g.k, stride, call);
      if (rows == nullptr) {
        unprepared.store(true, std::memory_order_relaxed);
        return;
      }
      compute_item(item, rows);
    });
    if (!unprepared.load()) return;  // else: out of memory in some thread; redo the call with shared rows
  }

  // 1. Quantize the rows of A into the workspace, shared by all threads.
  const Workspace workspace(static_cast<size_t>(m) * stride);
  uint8_t* ws = workspace.data();
  const Split rows = split(m, work_items(m * g.k));
  parallel_for(context, rows.count, [&](int64_t item) {
    for (int64_t r = item * rows.size, end = std::min(m, r + rows.size); r < end; ++r)
      kernel.prepare_row_for(x + r * g.k, m, ws + r * stride);
  });
  // 2. The output tiles.
  parallel_for(context, items, [&](int64_t item) { compute_item(item, ws); });
}

const char* MatMulOp::GetName() const { return traits(format_).op_type; }

OrtStatusPtr MatMulOp::CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const noexcept {
  const std::string label = node_label(format_, info);
  return guarded(api, label, [&] { *kernel = std::make_unique<MatMulNode>(format_, info, label).release(); });
}

OrtCustomOpInputOutputCharacteristic MatMulOp::GetInputCharacteristic(size_t index) const {
  return index == kBias ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}

}  // namespace sherry
