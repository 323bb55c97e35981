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
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__unix__)
#include <pthread.h>
#endif
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
  BlockAllocator() {
#if defined(__unix__)
    // A fork while another thread holds the lock would leave the child's copy locked: the forking
    // thread takes it first, and both sides release it.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
  }

  // Never destroyed: a tensor freed while the process exits may still give its block back.
  static BlockAllocator& instance() {
    static BlockAllocator* const allocator = new BlockAllocator();
    return *allocator;
  }

  // A block of `bytes`, and whether it is a kept one.
  std::pair<c10::DataPtr, bool> take(size_t bytes) {
    std::vector<Block> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The most recently kept block of this size: the previous step's gradient.
      for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
        if (it->bytes != bytes) continue;
        const Block block = *it;
        kept_.erase(std::next(it).base());
        kept_bytes_ -= bytes;
        return {lend(block), true};
      }
      live_bytes_ += bytes;
      peak_bytes_ = std::max(peak_bytes_, live_bytes_);
      while (!kept_.empty() && kept_bytes_ + live_bytes_ > peak_bytes_) {  // the oldest go first
        released.push_back(kept_.front());
        kept_bytes_ -= kept_.front().bytes;
        kept_.erase(kept_.begin());
      }
    }
    for (const Block& block : released) c10::free_cpu(block.data);  // unmapping outside the lock
    void* data = fresh_block(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    live_bytes_ -= bytes;  // counted again by lend
    return {lend({data, bytes}), false};
  }

  c10::DataPtr allocate(size_t bytes) override { return take(bytes).first; }  // a resize

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
  // A new block, counted in live_bytes_ by the caller; out of memory, once more after giving
  // every kept block back to the OS, and on a second failure the count is taken back.
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
      peak_bytes_ = kept_bytes_ + live_bytes_;  // not the block that never was
      throw;
    }
  }

  // The block as a tensor's memory; the context is the data pointer itself, as for the default
  // allocator (copy-on-write clones require it), and the size is looked up when it comes back.
  c10::DataPtr lend(const Block& block) {  // under the lock
    live_bytes_ += block.bytes;
    lent_[block.data] = block.bytes;
    return {block.data, block.data, &BlockAllocator::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  static void give_back(void* data) {
    BlockAllocator& self = instance();
    std::lock_guard<std::mutex> lock(self.mutex_);
    const auto it = self.lent_.find(data);
    TORCH_INTERNAL_ASSERT_DEBUG_ONLY(it != self.lent_.end());
    const Block block{data, it->second};
    self.lent_.erase(it);
    self.live_bytes_ -= block.bytes;
    self.kept_bytes_ += block.bytes;
    self.kept_.push_back(block);
  }

  std::mutex mutex_;
  std::vector<Block> kept_;                  // oldest first
  std::unordered_map<void*, size_t> lent_;  // the bytes of each block in use
  size_t kept_bytes_ = 0, live_bytes_ = 0, peak_bytes_ = 0;
};

}  // namespace

Gradient empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const caffe2::TypeMeta dtype = options.dtype();
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(dtype.itemsize());
  if (bytes < kMinBlockBytes) return {at::detail::empty_cpu(sizes, options), false};
  auto [data, recycled] = BlockAllocator::instance().take(static_cast<size_t>(bytes));
  auto storage = c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(), bytes, std::move(data),
                                                       &BlockAllocator::instance(), /*resizable=*/true);
  at::Tensor tensor =
      at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
  tensor.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return {std::move(tensor), recycled};
}

int64_t release() { return BlockAllocator::instance().release(); }

Usage usage() { return BlockAllocator::instance().usage(); }

}  // namespace aepg::cpu::gradient_blocks
