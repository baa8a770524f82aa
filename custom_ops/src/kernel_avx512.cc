// Placeholder until the avx512 kernels land: the dispatcher falls back to the scalar kernel.
#include "kernel.h"

namespace sherry {
std::unique_ptr<MatMulKernel> make_avx512_kernel(const PackedWeights&) { return nullptr; }
}  // namespace sherry
