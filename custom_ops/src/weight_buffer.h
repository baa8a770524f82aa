// Private weight storage for the SIMD kernels: 64-byte aligned, carved in creation order from shared
// regions on transparent huge pages (weight_buffer.cc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace sherry {

// One cache line; vectors of these are 64-byte aligned storage for zmm data (std::vector<__m512i>
// would drop the vector type's attributes).
struct alignas(64) Line {
  uint8_t bytes[64];
};

// A run of bytes in one of the arena's regions; the region lives while any of its buffers does.
struct WeightRegion;

// The private weights of one kernel, `lines` cache lines, not initialized.
//
// Why an arena: a decode step streams every node's weights once, and most nodes of a model hold
// less than 2 MiB (LLaMA-3.2-1B's 2048x2048 Sherry projection: 0.66 MB). Allocated one by one, such
// weights sit on 4 KiB pages, where the hardware prefetchers stop at every page boundary and every
// page costs a TLB miss. Carved one after the other from regions of 2 MiB-aligned huge pages, the
// nodes of a layer are also neighbours in memory, in the order the model creates (and runs) them.
// A throwaway build of this idea made the cold graphs of `sherry bench kernels` 8 % (Sherry
// 2048->2048) to 24 % (I2S) faster (docs/benchmarks.md, the kernel driver section).
class WeightBuffer {
 public:
  WeightBuffer() = default;
  explicit WeightBuffer(size_t lines);

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  std::shared_ptr<WeightRegion> region_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace sherry
