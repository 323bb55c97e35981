// Memory for large CPU gradients, kept mapped between calls.
//
// A gradient of the op is a new tensor on every call. Above glibc's largest heap block (32 MiB)
// malloc maps it fresh from the OS and unmaps it when it is freed, so every call pays the first
// touch of every page, which the OS zeroes: at 8192 x 32000 fp32 (1 GiB) that costs as much as the
// kernel itself (docs/design.md section 6). Blocks of at least kMinBlockBytes come from here
// instead: a freed block is kept and handed out again for a gradient of exactly its size (the
// same shape and dtype: the next step of a training loop), whose lines are then written with
// streaming stores.
//
// Kept plus live bytes stay at most the most gradient bytes that were ever live at once (a block
// of another size first releases older kept blocks), so the blocks never raise the peak of the
// gradients' own memory. They do stay mapped while other work runs (the optimizer step, an
// evaluation), up to that peak: release() (ak.empty_cache()) gives every kept block back to the OS.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace aepg::cpu::gradient_blocks {

// Smaller gradients come from the default CPU allocator (glibc recycles them itself).
constexpr int64_t kMinBlockBytes = int64_t(8) << 20;

struct Gradient {
  at::Tensor tensor;
  bool recycled;  // its memory held an earlier gradient (not in cache), rather than fresh pages
};

// A contiguous CPU tensor of `sizes` and the dtype of `options`.
Gradient empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the kept blocks; returns their bytes.
int64_t release();

struct Usage {
  int64_t kept_bytes, live_bytes, peak_bytes;
};
Usage usage();

}  // namespace aepg::cpu::gradient_blocks
