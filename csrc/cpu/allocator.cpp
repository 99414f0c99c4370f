// The CPU output cache (interface and reasons: cpu/allocator.h).
#include "cpu/allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

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
        ptr = it->second;
        cached_ -= static_cast<int64_t>(it->first);
        const size_t got = it->first;
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
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_ = 0;
    }
    for (auto& [bytes, ptr] : blocks) c10::free_cpu(ptr);
  }

 private:
  c10::DataPtr wrap(void* ptr, size_t bytes) {
    return {ptr, new Block{ptr, bytes}, &CachingAllocator::release, c10::Device(c10::kCPU)};
  }

  static void release(void* ctx);

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // bytes -> block
  int64_t cached_ = 0;
  const int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

CachingAllocator& allocator() {
  // Never destroyed: tensors may be freed during interpreter shutdown, after statics would be.
  static CachingAllocator* a = new CachingAllocator();
  return *a;
}

void CachingAllocator::release(void* ctx) {
  Block* b = static_cast<Block*>(ctx);
  CachingAllocator& a = allocator();
  {
    std::lock_guard<std::mutex> lock(a.mutex_);
    if (a.cached_ + static_cast<int64_t>(b->bytes) <= a.limit_) {
      a.free_.emplace(b->bytes, b->ptr);
      a.cached_ += static_cast<int64_t>(b->bytes);
      delete b;
      return;
    }
  }
  c10::free_cpu(b->ptr);
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
