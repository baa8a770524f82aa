// The weight arena behind WeightBuffer (weight_buffer.h). Compiled with the baseline flags: every
// kernel source, whatever its ISA flags, shares this one instance.
#include "weight_buffer.h"

#if __has_include(<sys/mman.h>)
#include <sys/mman.h>  // madvise
#endif

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <new>

namespace sherry {

namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Buffers up to a quarter of a region share regions; larger ones (an LM head) get a region of their
// own, so that no region wastes more than a quarter of itself at its end.
constexpr size_t kRegionBytes = size_t{64} << 20;

size_t round_up(size_t bytes, size_t to) { return (bytes + to - 1) / to * to; }

}  // namespace

struct WeightRegion {
  explicit WeightRegion(size_t bytes) : size(round_up(bytes, kHugePage)) {
    data.reset(static_cast<uint8_t*>(std::aligned_alloc(kHugePage, size)));
    if (!data) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(data.get(), size, MADV_HUGEPAGE);  // a hint: failure (no THP) leaves 4 KiB pages
#endif
  }
  struct Free {
    void operator()(uint8_t* p) const noexcept { std::free(p); }
  };
  size_t size;
  size_t used = 0;
  std::unique_ptr<uint8_t, Free> data;
};

WeightBuffer::WeightBuffer(size_t lines) : size_(lines * sizeof(Line)) {
  const size_t bytes = round_up(std::max(size_, sizeof(Line)), sizeof(Line));
  if (bytes > kRegionBytes / 4) {
    region_ = std::make_shared<WeightRegion>(bytes);
  } else {
    // The open region: weak, so that it goes once its last buffer does and a new one starts.
    static std::mutex mutex;
    static std::weak_ptr<WeightRegion> open;
    const std::lock_guard<std::mutex> lock(mutex);
    region_ = open.lock();
    if (!region_ || region_->used + bytes > region_->size) {
      region_ = std::make_shared<WeightRegion>(kRegionBytes);
      open = region_;
    }
  }
  data_ = region_->data.get() + region_->used;
  region_->used += bytes;
}

}  // namespace sherry
