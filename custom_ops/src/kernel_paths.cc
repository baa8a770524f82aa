// The AVX2 path's factory for every format: the int8 format has a kernel file of its own
// (kernel_int8_avx2.cc), the ternary formats share kernel_avx2.cc. Built without ISA flags: it only
// chooses; each factory checks the CPU itself. (AVX-512 chooses inside make_avx512_kernel.)
#include "kernel.h"

namespace sherry {

std::unique_ptr<MatMulKernel> make_avx2_path_kernel(const PackedWeights& w, std::string* declined) {
  return w.format == Format::kInt8 ? make_int8_avx2_kernel(w, declined) : make_avx2_kernel(w, declined);
}

}  // namespace sherry
