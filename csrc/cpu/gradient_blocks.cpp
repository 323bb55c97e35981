// Memory for large CPU gradients, kept mapped between calls (see gradient_blocks.h).
#include "gradient_blocks.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace aepg::cpu::gradient_blocks {
namespace {

struct Block {
  void* data;
  size_t bytes;
};

// Fresh memory from the OS. Where transparent huge pages are enabled on request ("madvise"), ask
// for them before the first touch: 2 MiB pages fault 512 times less often than 4 KiB ones.
void* map_block(size_t bytes) {
  void* data = c10::alloc_cpu(bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return data;
}

class BlockAllocator final : public c10::Allocator {
 public:
  // A block of `bytes`, and whether it is a kept one.
  std::pair<c10::DataPtr, bool> take(size_t bytes) {
    std::vector<Block> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ += bytes;
      // The most recently kept block of this size: the previous step's gradient.
      for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
        if (it->bytes != bytes) continue;
        const Block block = *it;
        kept_.erase(std::next(it).base());
        kept_bytes_ -= bytes;
        return {wrap(block), true};
      }
      peak_bytes_ = std::max(peak_bytes_, live_bytes_);
      while (!kept_.empty() && kept_bytes_ + live_bytes_ > peak_bytes_) {  // the oldest go first
        released.push_back(kept_.front());
        kept_bytes_ -= kept_.front().bytes;
        kept_.erase(kept_.begin());
      }
    }
    for (const Block& block : released) c10::free_cpu(block.data);  // unmapping outside the lock
    return {wrap({fresh_block(bytes), bytes}), false};
  }

  c10::DataPtr allocate(size_t bytes) override { return take(bytes).first; }  // a resize

  // A new block; out of memory, once more after giving every kept block back to the OS.
  void* fresh_block(size_t bytes) {
    try {
      return map_block(bytes);
    } catch (const c10::Error&) {
      release();
    }
    try {
      return map_block(bytes);
    } catch (const c10::Error&) {
      std::lock_guard<std::mutex> lock(mutex_);
      live_bytes_ -= bytes;
      throw;
    }
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  int64_t release() {
    std::vector<Block> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(kept_);
      kept_bytes_ = 0;
      peak_bytes_ = live_bytes_;
    }
    int64_t bytes = 0;
    for (const Block& block : released) c10::free_cpu(block.data), bytes += static_cast<int64_t>(block.bytes);
    return bytes;
  }

  Usage usage() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(kept_bytes_), static_cast<int64_t>(live_bytes_), static_cast<int64_t>(peak_bytes_)};
  }

 private:
  static void give_back(void* context);

  c10::DataPtr wrap(const Block& block) {
    return {block.data, new Block(block), &BlockAllocator::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void keep(const Block& block) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_bytes_ -= block.bytes;
    kept_bytes_ += block.bytes;
    kept_.push_back(block);
  }

  std::mutex mutex_;
  std::vector<Block> kept_;  // oldest first
  size_t kept_bytes_ = 0, live_bytes_ = 0, peak_bytes_ = 0;
};

// Never destroyed: a tensor freed while the process exits may still give its block back.
BlockAllocator& allocator() {
  static BlockAllocator* const instance = new BlockAllocator();
  return *instance;
}

void BlockAllocator::give_back(void* context) {
  Block* block = static_cast<Block*>(context);
  allocator().keep(*block);
  delete block;
}

}  // namespace

Gradient empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const caffe2::TypeMeta dtype = options.dtype();
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(dtype.itemsize());
  if (bytes < kMinBlockBytes) return {at::detail::empty_cpu(sizes, options), false};
  auto [data, recycled] = allocator().take(static_cast<size_t>(bytes));
  auto storage = c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(), bytes, std::move(data),
                                                       &allocator(), /*resizable=*/true);
  at::Tensor tensor =
      at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
  tensor.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return {std::move(tensor), recycled};
}

int64_t release() { return allocator().release(); }

Usage usage() { return allocator().usage(); }

}  // namespace aepg::cpu::gradient_blocks
