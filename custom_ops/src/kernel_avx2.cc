// Placeholder until the avx2 kernels land: the dispatcher falls back to the scalar kernel.
#include "kernel.h"

namespace sherry {
std::unique_ptr<MatMulKernel> make_avx2_kernel(const PackedWeights&) { return nullptr; }
}  // namespace sherry
