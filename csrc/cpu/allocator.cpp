// The CPU output cache (interface and reasons: cpu/allocator.h).
#include "cpu/allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace pyengine {
namespace cpu {
namespace {

// Smaller blocks come from malloc's own free lists, which keep them.
constexpr size_t kMinCachedBytes = size_t(256) << 10;
constexpr size_t kPage = 4096;

int64_t limit_from_env() {
  const char* env = std::getenv("PYENGINE_CPU_CACHE_MB");
  if (!env || !*env) return int64_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end && *end == '\0' && mb >= 0 && mb <= (int64_t(1) << 30),
              "PYENGINE_CPU_CACHE_MB: expected a whole number of megabytes >= 0, got '", env,
              "'");
  return static_cast<int64_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class CachingAllocator final : public c10::Allocator {
 public:
  CachingAllocator() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes || limit_ == 0) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        ptr = it->second.ptr;
        const size_t got = it->first;
        cached_ -= static_cast<int64_t>(got);
        by_age_.erase(it->second.stamp);
        free_.erase(it);
        ++hits_;
        return wrap(ptr, got);
      }
      ++misses_;
    }
    ptr = c10::alloc_cpu(bytes);
    return wrap(ptr, bytes);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }

  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_, limit_, hits_, misses_};
  }

  void empty() {
    std::multimap<size_t, Cached> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      by_age_.clear();
      cached_ = 0;
    }
    for (auto& entry : blocks) c10::free_cpu(entry.second.ptr);
  }

 private:
  c10::DataPtr wrap(void* ptr, size_t bytes) {
    return {ptr, new Block{ptr, bytes}, &CachingAllocator::release, c10::Device(c10::kCPU)};
  }

  static void release(void* ctx);

  struct Cached {
    void* ptr;
    uint64_t stamp;  // when it was cached: its key in by_age_
  };
  // Caches a released block, making room by giving back the blocks cached longest ago: a
  // process's working set changes (another model, another batch size, a benchmark's next case),
  // and blocks of sizes no longer asked for must not keep the current ones out. Returns the
  // blocks to free (outside the lock): the evicted ones, or `b` itself if it alone exceeds the
  // limit.
  std::vector<void*> cache(const Block& b);

  std::mutex mutex_;
  std::multimap<size_t, Cached> free_;                        // bytes -> block
  std::map<uint64_t, std::multimap<size_t, Cached>::iterator> by_age_;  // oldest first
  uint64_t clock_ = 0;
  int64_t cached_ = 0;
  const int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

CachingAllocator& allocator() {
  // Never destroyed: tensors may be freed during interpreter shutdown, after statics would be.
  static CachingAllocator* a = new CachingAllocator();
  return *a;
}

std::vector<void*> CachingAllocator::cache(const Block& b) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t bytes = static_cast<int64_t>(b.bytes);
  if (bytes > limit_) return {b.ptr};
  std::vector<void*> evicted;
  while (cached_ + bytes > limit_) {
    auto oldest = by_age_.begin();
    evicted.push_back(oldest->second->second.ptr);
    cached_ -= static_cast<int64_t>(oldest->second->first);
    free_.erase(oldest->second);
    by_age_.erase(oldest);
  }
  const uint64_t stamp = clock_++;
  by_age_.emplace(stamp, free_.emplace(b.bytes, Cached{b.ptr, stamp}));
  cached_ += bytes;
  return evicted;
}

void CachingAllocator::release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  for (void* ptr : allocator().cache(*b)) c10::free_cpu(ptr);
  delete b;
}

constexpr c10::DispatchKeySet kCpuKeys{c10::DispatchKey::CPU};

}  // namespace

at::Tensor empty_cached(c10::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &allocator(), kCpuKeys,
                                   c10::typeMetaToScalarType(options.dtype()),
                                   options.memory_format_opt());
}

at::Tensor empty_strided_cached(c10::IntArrayRef sizes, c10::IntArrayRef strides,
                                const at::TensorOptions& options) {
  return at::detail::empty_strided_generic(sizes, strides, &allocator(), kCpuKeys,
                                           c10::typeMetaToScalarType(options.dtype()));
}

c10::DataPtr allocate_cached(size_t bytes) { return allocator().allocate(bytes); }

CacheStats cache_stats() { return allocator().stats(); }
void empty_cache() { allocator().empty(); }

}  // namespace cpu
}  // namespace pyengine
