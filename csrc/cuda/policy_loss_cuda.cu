// CUDA forward, backward and gradient scale. The per-row math is policy_loss_math.h (shared with
// the CPU kernels); this file holds only the layout of rows on threads, loads, reductions, launches.
//
// Forward, rows up to kMaxOnChipCols classes: a group of G threads per row (a sub-warp for short
// rows, several rows per block; a whole block for long rows), the row held in registers, kItems
// logits per thread, loaded as 16-byte vectors when every row is aligned. exp is computed once
// per element and reused for the gradient (1 read + 1 write).
// Forward, longer rows: a block per row streams it with online statistics (running max, the
// rescale/merge of policy_loss_math.h), statistics only.
// Backward: G threads per row, no reduction: every thread recomputes p from the saved stats.
// All offsets are int64; no host synchronisation; sums reduce in a fixed order (deterministic).
#include "../kernel_args.h"
#include "../policy_loss_math.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace aepg::cuda {
namespace {

constexpr int kItems = 16;          // logits per thread in the on-chip forward
constexpr int kSmallBlock = 256;    // threads per block when several rows share a block
constexpr int kStreamBlock = 512;   // threads per row in the streamed forward

template <class scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Reads VEC consecutive logits (VEC > 1: one 16-byte load; the caller checked alignment).
template <class scalar_t, int VEC, class T>
__device__ __forceinline__ void load_pack(const scalar_t* ptr, int64_t col, int64_t n, T* out) {
  if constexpr (VEC > 1) {
    const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(ptr + col);
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[v] = static_cast<T>(pack.v[v]);
  } else {
    out[0] = col < n ? static_cast<T>(ptr[col]) : -std::numeric_limits<T>::infinity();
  }
}

template <class scalar_t, int VEC, class T>
__device__ __forceinline__ void store_pack(scalar_t* ptr, int64_t col, const T* values) {
  if constexpr (VEC > 1) {
    Pack<scalar_t, VEC> pack;
#pragma unroll
    for (int v = 0; v < VEC; ++v) pack.v[v] = static_cast<scalar_t>(values[v]);
    *reinterpret_cast<Pack<scalar_t, VEC>*>(ptr + col) = pack;
  } else {
    ptr[col] = static_cast<scalar_t>(values[0]);
  }
}

struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// All-reduce over a group of G threads: shuffles within the group (G <= 32), then, for a group
// that is the whole block (G > 32), one value per warp through shared memory.
template <int G, class T, class Op>
__device__ T group_allreduce(T value, Op op, T* shared) {
  constexpr int kWidth = G < 32 ? G : 32;
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset, kWidth));
  }
  if constexpr (G > 32) {
    __syncthreads();  // the previous reduction has read `shared`
    if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = value;
    __syncthreads();
    value = shared[0];
    for (int w = 1; w < G / 32; ++w) value = op(value, shared[w]);
  }
  return value;
}

template <int G, class T>
__device__ void group_allreduce(RowSums<T>& s, T* shared) {
  const SumOp sum;
  s.s = group_allreduce<G>(s.s, sum, shared);
  s.t = group_allreduce<G>(s.t, sum, shared);
  s.s_other = group_allreduce<G>(s.s_other, sum, shared);
  s.u = group_allreduce<G>(s.u, sum, shared);
  s.pq = group_allreduce<G>(s.pq, sum, shared);
  s.zs = group_allreduce<G>(s.zs, sum, shared);
  s.wq = group_allreduce<G>(s.wq, sum, shared);
  s.wq_smooth = group_allreduce<G>(s.wq_smooth, sum, shared);
}

// Class weight w, and q, w q, w q' (probability targets) of column col; 0 outside the row.
template <class T>
struct ElementTargets {
  T w, q, wq, wq_smooth;
};

template <class T>
__device__ __forceinline__ ElementTargets<T> element_targets(const KernelArgs& args, const T* q_row, int64_t col,
                                                             const LossParams<T>& p) {
  if (col >= args.n_cols) return {T(0), T(0), T(0), T(0)};
  const T w = args.weight ? static_cast<const T*>(args.weight)[col] : T(1);
  if (!p.prob_target) return {w, w, w, w};
  const T q = q_row[col];
  const T wq = w * q;
  return {w, q, wq, (T(1) - p.eps) * wq + p.eps / p.n_cols * w};
}

// g_row * dL/dz of column col from p, log p; NaN / 0 for out-of-range / ignored rows.
template <class T>
__device__ __forceinline__ T grad_value(const KernelArgs& args, const T* q_row, int64_t col, const RowTarget& target,
                                        T prob, T logp, const GradCoefficients<T>& c, const LossParams<T>& p) {
  if (target.bad) return nan_of<T>();
  if (!target.counted) return T(0);
  if (col == target.y) return c.g_y;
  const ElementTargets<T> t = element_targets(args, q_row, col, p);
  return grad_element(prob, logp, t.w, t.wq, t.wq_smooth, c, p);
}

template <class T>
__device__ __forceinline__ const T* q_row_of(const KernelArgs& args, int64_t row) {
  return args.prob_target ? static_cast<const T*>(args.target) + row * args.q_stride : nullptr;
}

// ---- forward, row on chip --------------------------------------------------------------------
template <class scalar_t, class T, int G, int VEC>
__global__ void __launch_bounds__(G > 32 ? G : kSmallBlock) forward_on_chip_kernel(KernelArgs args) {
  constexpr int kVectors = kItems / VEC;
  constexpr int kRowsPerBlock = G > 32 ? 1 : kSmallBlock / G;
  __shared__ T shared[32];
  const int lane = threadIdx.x % G;
  const int64_t n = args.n_cols;
  const LossParams<T> p = loss_params<T>(args);
  const T g_scale = mean_scale<T>(args);
  const int64_t n_tiles = (args.n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {  // uniform per block
    const int64_t row = tile * kRowsPerBlock + threadIdx.x / G;
    const bool row_ok = row < args.n_rows;
    const scalar_t* x = static_cast<const scalar_t*>(args.logits) + (row_ok ? row : 0) * args.logits_stride;
    T zm[kItems];  // z, then z - m
    T m = -std::numeric_limits<T>::infinity();
#pragma unroll
    for (int j = 0; j < kVectors; ++j) {
      const int64_t col = (int64_t(j) * G + lane) * VEC;
      if (row_ok && col < n) {
        load_pack<scalar_t, VEC>(x, col, n, zm + j * VEC);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) zm[j * VEC + v] = -std::numeric_limits<T>::infinity();
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) m = zm[j * VEC + v] > m ? zm[j * VEC + v] : m;
    }
    m = safe_ref(group_allreduce<G>(m, MaxOp(), shared));

    const RowTarget target = row_ok ? row_target(args, row) : RowTarget{-1, false, false};
    const T* q_row = q_row_of<T>(args, row_ok ? row : 0);
    T e[kItems];
    auto sums = RowSums<T>::zero();
#pragma unroll
    for (int j = 0; j < kVectors; ++j) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int k = j * VEC + v;
        const int64_t col = (int64_t(j) * G + lane) * VEC + v;
        zm[k] -= m;
        e[k] = exp_of(zm[k]);
        if (row_ok && col < n) {
          const ElementTargets<T> t = element_targets(args, q_row, col, p);
          add_element(sums, zm[k], e[k], t.q, t.wq, t.wq_smooth, col != target.y, p);
        }
      }
    }
    group_allreduce<G>(sums, shared);

    const T zm_y = target.y >= 0 ? static_cast<T>(x[target.y]) - m : -m;  // full-precision target logit
    const RowResults<T> r = row_results(sums, zm_y, target_weight<T>(args, target), p);
    if (row_ok && lane == 0) store_row_stats(args, row, target, m, r);
    if (!args.grad || !row_ok) continue;

    const GradCoefficients<T> c =
        grad_coefficients(g_scale, r.entropy, r.p_target, r.logp_y, r.aux, r.sample_weight, r.row_weight, p);
    const T inv_s = T(1) / sums.s;  // one reciprocal per row
    scalar_t* out = static_cast<scalar_t*>(args.grad) + row * n;
#pragma unroll
    for (int j = 0; j < kVectors; ++j) {
      const int64_t col0 = (int64_t(j) * G + lane) * VEC;
      if (col0 >= n) continue;
      T values[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int k = j * VEC + v;
        values[v] = grad_value(args, q_row, col0 + v, target, e[k] * inv_s, zm[k] - r.log_s, c, p);
      }
      store_pack<scalar_t, VEC>(out, col0, values);
    }
  }
}

// ---- forward, streamed rows (statistics only) ------------------------------------------------
template <class scalar_t, class T, int VEC>
__global__ void __launch_bounds__(kStreamBlock) forward_streamed_kernel(KernelArgs args) {
  __shared__ T shared[32];
  const int64_t n = args.n_cols;
  const LossParams<T> p = loss_params<T>(args);
  for (int64_t row = blockIdx.x; row < args.n_rows; row += gridDim.x) {
    const scalar_t* x = static_cast<const scalar_t*>(args.logits) + row * args.logits_stride;
    const RowTarget target = row_target(args, row);
    const T* q_row = q_row_of<T>(args, row);
    T m = -std::numeric_limits<T>::infinity();  // this thread's running max
    auto sums = RowSums<T>::zero();
    for (int64_t col0 = int64_t(threadIdx.x) * VEC; col0 < n; col0 += int64_t(kStreamBlock) * VEC) {
      T z[VEC];
      load_pack<scalar_t, VEC>(x, col0, n, z);
      T m_new = m;
#pragma unroll
      for (int v = 0; v < VEC; ++v) m_new = z[v] > m_new ? z[v] : m_new;
      if (m_new > m) {  // the online rescale of docs/math.md section 2
        rescale(sums, m, m_new);
        m = m_new;
      }
      const T ref = safe_ref(m);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const int64_t col = col0 + v;
        if (col >= n) continue;
        const T zm = z[v] - ref;
        const ElementTargets<T> t = element_targets(args, q_row, col, p);
        add_element(sums, zm, exp_of(zm), t.q, t.wq, t.wq_smooth, col != target.y, p);
      }
    }
    // Merge the threads' partial statistics at the row max.
    const T m_row = group_allreduce<kStreamBlock>(m, MaxOp(), shared);
    rescale(sums, m, m_row);
    group_allreduce<kStreamBlock>(sums, shared);
    const T m_safe = safe_ref(m_row);
    const T zm_y = target.y >= 0 ? static_cast<T>(x[target.y]) - m_safe : -m_safe;
    const RowResults<T> r = row_results(sums, zm_y, target_weight<T>(args, target), p);
    if (threadIdx.x == 0) store_row_stats(args, row, target, m_safe, r);
  }
}

// ---- backward: recompute from the saved statistics -------------------------------------------
template <class scalar_t, class T, int VEC>
__global__ void __launch_bounds__(kSmallBlock) backward_kernel(KernelArgs args, int group) {
  const int64_t n = args.n_cols, n_rows = args.n_rows;
  const int lane = threadIdx.x % group;
  const int rows_per_block = kSmallBlock / group;
  const LossParams<T> p = loss_params<T>(args);
  const T g_scale = mean_scale<T>(args);
  const T* stats = static_cast<const T*>(args.saved_stats);
  const T* grad_loss = static_cast<const T*>(args.grad_loss);
  for (int64_t row = int64_t(blockIdx.x) * rows_per_block + threadIdx.x / group; row < n_rows;
       row += int64_t(gridDim.x) * rows_per_block) {
    const scalar_t* x = static_cast<const scalar_t*>(args.logits) + row * args.logits_stride;
    scalar_t* out = static_cast<scalar_t*>(args.grad) + row * n;
    const RowTarget target = row_target(args, row);
    const T* q_row = q_row_of<T>(args, row);
    const T m = stats[kRowMax * n_rows + row], log_s = stats[kLogSum * n_rows + row];
    const T aux = stats[kAux * n_rows + row];  // 1 - p_y for index targets
    const T logp_y = target.y >= 0 ? log_p_target(static_cast<T>(x[target.y]) - m, log_s, aux) : T(0);
    const T g_row = grad_loss[row * args.grad_loss_stride] * g_scale;
    const GradCoefficients<T> c =
        grad_coefficients(g_row, stats[kEntropy * n_rows + row], stats[kPTarget * n_rows + row], logp_y, aux,
                          stats[kSampleWeight * n_rows + row], stats[kRowWeight * n_rows + row], p);
    for (int64_t col0 = int64_t(lane) * VEC; col0 < n; col0 += int64_t(group) * VEC) {
      T z[VEC], values[VEC];
      load_pack<scalar_t, VEC>(x, col0, n, z);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const T logp = (z[v] - m) - log_s;
        values[v] = grad_value(args, q_row, col0 + v, target, exp_of(logp), logp, c, p);
      }
      store_pack<scalar_t, VEC>(out, col0, values);
    }
  }
}

template <class scalar_t, class T>
__global__ void scale_kernel(scalar_t* grad, int64_t numel, const T* g_ptr) {
  const T g = *g_ptr;
  if (g == T(1)) return;  // loss.backward(): decided on the device, no synchronisation
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    grad[i] = static_cast<scalar_t>(static_cast<T>(grad[i]) * g);
  }
}

// ---- launches --------------------------------------------------------------------------------
int sm_count(int device) {
  static int counts[64] = {0};
  int& count = counts[device & 63];
  if (count == 0) C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Blocks for `units` units of work: enough to fill the GPU, then grid-stride.
unsigned grid_for(int64_t units, int device, int blocks_per_sm = 8) {
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min<int64_t>(units, int64_t(sm_count(device)) * blocks_per_sm)));
}

template <class scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

// 16-byte vectors need every row start (input and gradient) on a 16-byte boundary.
template <class scalar_t>
bool vectorizable(const KernelArgs& args) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t bytes = sizeof(scalar_t);
  return aligned(args.logits) && (args.logits_stride * bytes) % 16 == 0 && (args.n_cols * bytes) % 16 == 0 &&
         (!args.grad || aligned(args.grad));
}

template <class scalar_t, class T, int G, int VEC>
void launch_on_chip(const KernelArgs& args, cudaStream_t stream) {
  constexpr int kRowsPerBlock = G > 32 ? 1 : kSmallBlock / G;
  constexpr int kThreads = G > 32 ? G : kSmallBlock;
  const int64_t tiles = (args.n_rows + kRowsPerBlock - 1) / kRowsPerBlock;
  forward_on_chip_kernel<scalar_t, T, G, VEC>
      <<<grid_for(tiles, args.device_index, 2048 / kThreads), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class scalar_t, class T, int VEC>
void forward_vec(const KernelArgs& args, cudaStream_t stream) {
  const int64_t n = args.n_cols;
  if (n <= 8 * kItems) return launch_on_chip<scalar_t, T, 8, VEC>(args, stream);
  if (n <= 32 * kItems) return launch_on_chip<scalar_t, T, 32, VEC>(args, stream);
  if (n <= 128 * kItems) return launch_on_chip<scalar_t, T, 128, VEC>(args, stream);
  if (n <= 512 * kItems) return launch_on_chip<scalar_t, T, 512, VEC>(args, stream);
  if (n <= 1024 * kItems) return launch_on_chip<scalar_t, T, 1024, VEC>(args, stream);
  forward_streamed_kernel<scalar_t, T, VEC>
      <<<grid_for(args.n_rows, args.device_index, 4), kStreamBlock, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class scalar_t, class T, int VEC>
void backward_vec(const KernelArgs& args, cudaStream_t stream) {
  // Threads per row: about 8 vectors each, between 4 and a whole block.
  const int64_t vectors = (args.n_cols + VEC - 1) / VEC;
  int group = 4;
  while (group < kSmallBlock && int64_t(group) * 8 < vectors) group *= 2;
  const int64_t rows_per_block = kSmallBlock / group;
  const int64_t blocks = (args.n_rows + rows_per_block - 1) / rows_per_block;
  backward_kernel<scalar_t, T, VEC><<<grid_for(blocks, args.device_index), kSmallBlock, 0, stream>>>(args, group);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class Fn>
void dispatch_dtype(c10::ScalarType dtype, const Fn& fn) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return fn(float(), float());
    case c10::ScalarType::Double:
      return fn(double(), double());
    case c10::ScalarType::Half:
      return fn(c10::Half(), float());
    case c10::ScalarType::BFloat16:
      return fn(c10::BFloat16(), float());
    default:
      TORCH_CHECK(false, "aepg: unsupported dtype ", dtype);
  }
}

// Runs launch(input_tag, acc_tag, vec_width, stream) on the arguments' device and current stream,
// with 16-byte vectors when every row is aligned for them.
template <class Launch>
void launch_rows(const KernelArgs& args, const Launch& launch) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(args.device_index));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.device_index);
  dispatch_dtype(args.dtype, [&](auto input_tag, auto acc_tag) {
    using scalar_t = decltype(input_tag);
    if (vectorizable<scalar_t>(args)) {
      launch(input_tag, acc_tag, std::integral_constant<int, kVec<scalar_t>>(), stream);
    } else {
      launch(input_tag, acc_tag, std::integral_constant<int, 1>(), stream);
    }
  });
}

}  // namespace

void forward(const KernelArgs& args) {
  launch_rows(args, [&](auto input_tag, auto acc_tag, auto vec, cudaStream_t stream) {
    forward_vec<decltype(input_tag), decltype(acc_tag), decltype(vec)::value>(args, stream);
  });
}

void backward(const KernelArgs& args) {
  launch_rows(args, [&](auto input_tag, auto acc_tag, auto vec, cudaStream_t stream) {
    backward_vec<decltype(input_tag), decltype(acc_tag), decltype(vec)::value>(args, stream);
  });
}

void scale(void* grad, c10::ScalarType dtype, int64_t numel, const void* g, c10::ScalarType g_dtype, int device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);
  dispatch_dtype(dtype, [&](auto input_tag, auto acc_tag) {
    using scalar_t = decltype(input_tag);
    using T = decltype(acc_tag);
    TORCH_CHECK(g_dtype == c10::CppTypeToScalarType<T>::value, "aepg: grad_loss must be in the accumulation dtype");
    scale_kernel<scalar_t, T><<<grid_for((numel + 255) / 256, device), 256, 0, stream>>>(
        static_cast<scalar_t*>(grad), numel, static_cast<const T*>(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace aepg::cuda
