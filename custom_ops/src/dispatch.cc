#include "dispatch.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <utility>

#include <cpuid.h>

namespace sherry {
namespace {

struct Feature {
  const char* name;
  bool present;
};

std::string missing(std::initializer_list<Feature> features) {
  std::string out;
  for (const Feature& f : features)
    if (!f.present) out += (out.empty() ? "" : ", ") + std::string(f.name);
  return out;
}

// XCR0: which register states the OS saves. Only valid to read when CPUID reports OSXSAVE.
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return static_cast<uint64_t>(edx) << 32 | eax;
}

struct CpuReport {
  std::string avx2;    // missing features of the AVX2 path
  std::string avx512;  // missing features of the AVX-512 path
};

CpuReport probe_cpu() {
  unsigned a = 0, b = 0, c1 = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c1, &d)) return {"cpuid leaf 1", "cpuid leaf 1"};
  unsigned b7 = 0, c7 = 0;
  if (__get_cpuid_max(0, nullptr) >= 7) __cpuid_count(7, 0, a, b7, c7, d);
  const bool osxsave = c1 & bit_OSXSAVE;
  const uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  const Feature fma{"fma", (c1 & bit_FMA) != 0}, f16c{"f16c", (c1 & bit_F16C) != 0};
  const Feature avx2{"avx2", (b7 & bit_AVX2) != 0}, ymm{"OS support for AVX state (xgetbv)", os_ymm};
  CpuReport report;
  report.avx2 = missing({avx2, fma, f16c, ymm});
  // The AVX-512 sources are compiled with -mfma -mf16c -mavx512dq too, so those are required as well.
  report.avx512 = missing({{"avx512f", (b7 & bit_AVX512F) != 0}, {"avx512bw", (b7 & bit_AVX512BW) != 0},
                           {"avx512vl", (b7 & bit_AVX512VL) != 0}, {"avx512dq", (b7 & bit_AVX512DQ) != 0},
                           {"avx512vnni", (c7 & bit_AVX512VNNI) != 0}, {"avx512vbmi", (c7 & bit_AVX512VBMI) != 0},
                           fma, f16c, {"OS support for AVX-512 state (xgetbv)", os_zmm}});
  return report;
}

struct CpuModel {
  std::string id;    // "<vendor> family <f> model <m>"
  std::string name;  // the brand string, e.g. "AMD EPYC 9654 96-Core Processor"
};

// Family and model as Linux computes them for /proc/cpuinfo: the extended family counts from base
// family 15, the extended model from base family 6.
CpuModel probe_model() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return {"unknown", "unknown"};
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  __get_cpuid(1, &a, &b, &c, &d);
  unsigned family = (a >> 8) & 0xF, model = (a >> 4) & 0xF;
  if (family == 0xF) family += (a >> 20) & 0xFF;
  if (family >= 6) model += ((a >> 16) & 0xF) << 4;
  CpuModel out{std::string(vendor) + " family " + std::to_string(family) + " model " + std::to_string(model), ""};
  if (__get_cpuid_max(0x80000000, nullptr) >= 0x80000004) {
    unsigned brand[12] = {};
    for (unsigned leaf = 0; leaf < 3; ++leaf)
      __get_cpuid(0x80000002 + leaf, &brand[4 * leaf], &brand[4 * leaf + 1], &brand[4 * leaf + 2],
                  &brand[4 * leaf + 3]);
    char text[49] = {};
    std::memcpy(text, brand, 48);
    out.name = text;
    const size_t first = out.name.find_first_not_of(' '), last = out.name.find_last_not_of(' ');
    out.name = first == std::string::npos ? "" : out.name.substr(first, last - first + 1);
  }
  if (out.name.empty()) out.name = out.id;
  return out;
}

const CpuModel& this_cpu() {
  static const CpuModel model = probe_model();
  return model;
}

using Factory = std::unique_ptr<MatMulKernel> (*)(const PackedWeights&, std::string* declined);

Factory factory(KernelPath path) {
  switch (path) {
    case KernelPath::kAVX512: return make_avx512_kernel;
    case KernelPath::kAVX2: return make_avx2_path_kernel;
    case KernelPath::kTVM: return make_tvm_kernel;
    case KernelPath::kScalar: break;
  }
  return [](const PackedWeights& w, std::string*) { return make_scalar_kernel(w); };
}

std::string describe(const PackedWeights& w) {
  return std::string(format_name(w.format)) + " weights with N=" + std::to_string(w.geometry.n) +
         ", K=" + std::to_string(w.geometry.k) + ", group_size=" + std::to_string(w.geometry.group_size);
}

}  // namespace

const std::string& missing_cpu_features(KernelPath path) {
  static const CpuReport report = probe_cpu();
  static const std::string none;
  switch (path) {
    case KernelPath::kAVX512: return report.avx512;
    case KernelPath::kAVX2: return report.avx2;
    case KernelPath::kTVM:  // each tuned kernel checks the ISA its object needs
    case KernelPath::kScalar: break;
  }
  return none;
}

const std::string& cpu_model_id() { return this_cpu().id; }
const std::string& cpu_model_name() { return this_cpu().name; }

int64_t hardware_threads() {
  static const int64_t count = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return count;
}

int64_t superblock_blocks(int64_t blocks) {
  int64_t sb = 1;
  while (sb < 16 && sb * 2 * 4 <= blocks) sb *= 2;
  return std::max(sb, ceil_div(blocks, hardware_threads()));
}

KernelRequest parse_kernel_request(const std::string& value, const std::string& origin) {
  if (value == "auto") return {std::nullopt, origin};
  for (KernelPath p : {KernelPath::kScalar, KernelPath::kAVX2, KernelPath::kAVX512, KernelPath::kTVM})
    if (value == path_name(p)) return {p, origin};
  throw std::runtime_error("unknown kernel path '" + value + "' (" + origin +
                           "); choose one of auto, scalar, avx2, avx512, tvm");
}

KernelChoice make_kernel(const PackedWeights& w, const KernelRequest& request) {
  if (request.forced) {
    const KernelPath path = *request.forced;
    const std::string& lacking = missing_cpu_features(path);
    if (!lacking.empty())
      throw std::runtime_error(std::string("the ") + path_name(path) + " kernel was requested (" + request.origin +
                               ") but this CPU lacks " + lacking);
    std::string declined;
    std::unique_ptr<MatMulKernel> kernel = factory(path)(w, &declined);
    if (!kernel)
      throw std::runtime_error(std::string("the ") + path_name(path) + " kernel was requested (" + request.origin +
                               ") but it does not support " + describe(w) +
                               (declined.empty() ? "" : " (" + declined + ")") + "; use auto to fall back to scalar");
    return {std::move(kernel), "", nullptr, 0};  // the report names the request
  }
  // Auto. The hand-written kernel auto runs unless TVM wins: the best ISA this CPU has.
  const std::initializer_list<KernelPath> simd = {KernelPath::kAVX512, KernelPath::kAVX2};
  KernelPath hand = KernelPath::kScalar;
  for (KernelPath path : simd)
    if (missing_cpu_features(path).empty()) {
      hand = path;
      break;
    }
  TvmAutoChoice tvm = make_tvm_kernel_if_faster(w, hand);
  // One reason when there is no tuned kernel to decide on, else one per regime.
  const std::string batch = "M >= " + std::to_string(tvm.batch_min_rows);
  std::string reason = tvm.batch_min_rows > 0 ? "M < " + std::to_string(tvm.batch_min_rows) + ": " + tvm.single_reason +
                                                    "; " + batch + ": " + tvm.batch_reason
                                              : tvm.single_reason;
  if (tvm.single && tvm.batch) return {std::move(tvm.kernel), reason, nullptr, 0};
  // Why each faster path was passed over, after the TVM verdict.
  std::unique_ptr<MatMulKernel> kernel;
  for (KernelPath path : simd) {
    if (const std::string& lacking = missing_cpu_features(path); !lacking.empty()) {
      reason += std::string("; ") + path_name(path) + ": this CPU lacks " + lacking;
      continue;
    }
    std::string declined;
    if ((kernel = factory(path)(w, &declined))) break;
    reason += std::string("; ") + path_name(path) + " declined these weights (" + declined + ")";
  }
  if (!kernel) kernel = make_scalar_kernel(w);
  if (tvm.batch) return {std::move(kernel), reason, std::move(tvm.kernel), tvm.batch_min_rows};
  if (tvm.single) return {std::move(tvm.kernel), reason, std::move(kernel), tvm.batch_min_rows};
  return {std::move(kernel), reason, nullptr, 0};
}

}  // namespace sherry
