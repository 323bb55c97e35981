// The CPU kernels, compiled once per instruction set (CPU_CAPABILITY = DEFAULT, AVX2, AVX512): each
// translation unit that includes this defines them in its own namespace aepg::cpu::<capability>,
// as ATen does, and policy_loss_cpu.cpp picks one at run time.
//
// A row is processed while it is in cache: max, then one pass for exp(z - m) and every sum, then
// (forward with gradient) one pass that turns the stored exponentials into the gradient, so each
// exponential is computed once. Rows are split over threads with at::parallel_for.
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including policy_loss_cpu_kernels.h"
#endif

#define AEPG_VECTORIZED
#include "../kernel_args.h"
#include "../policy_loss_math.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace aepg::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <class V, class T>
inline V load(const T* ptr) {
  if constexpr (std::is_same_v<V, T>) {
    return *ptr;
  } else {
    return V::loadu(ptr);
  }
}

template <class V, class T>
inline void store(const V& value, T* ptr) {
  if constexpr (std::is_same_v<V, T>) {
    *ptr = value;
  } else {
    value.store(ptr);
  }
}

// body(V(), k) for full vectors over [begin, end), then body(T(), k) for the scalar tail.
template <class T, class Body>
inline void for_each_chunk(int64_t begin, int64_t end, const Body& body) {
  using Vec = Vectorized<T>;
  int64_t k = begin;
  for (; k + Vec::size() <= end; k += Vec::size()) body(Vec(), k);
  for (; k < end; ++k) body(T(), k);
}

template <class T>
inline T horizontal_sum(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T sum = T(0);
  for (int i = 0; i < Vectorized<T>::size(); ++i) sum += lanes[i];
  return sum;
}

template <class T>
inline RowSums<T> horizontal_sum(const RowSums<Vectorized<T>>& v) {
  return RowSums<T>{horizontal_sum(v.s),  horizontal_sum(v.t),  horizontal_sum(v.s_other),
                    horizontal_sum(v.u),  horizontal_sum(v.pq), horizontal_sum(v.zs),
                    horizontal_sum(v.wq), horizontal_sum(v.wq_smooth)};
}

// One row's inputs in the accumulation dtype T.
template <class T>
struct Row {
  const T* z;  // logits
  const T* w;  // class weights or null
  const T* q;  // target probabilities or null
};

// Class weight w, and q, w q, w q' for probability targets (w for index targets), as
// triton/_tiles.py load_tile.
template <class V>
struct ElementTargets {
  V w, q, wq, wq_smooth;
};

template <class V, class T>
inline ElementTargets<V> element_targets(const Row<T>& row, int64_t k, const LossParams<T>& p) {
  const V w = row.w ? load<V>(row.w + k) : V(T(1));
  if (!p.prob_target) return {w, w, w, w};
  const V q = load<V>(row.q + k);
  const V wq = w * q;
  return {w, q, wq, V(T(1) - p.eps) * wq + V(p.eps / p.n_cols) * w};
}

template <class T>
inline T row_max(const T* z, int64_t n) {
  using Vec = Vectorized<T>;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec lanes(neg_inf);
  T m = neg_inf;
  for_each_chunk<T>(0, n, [&](auto tag, int64_t k) {
    using V = decltype(tag);
    if constexpr (std::is_same_v<V, T>) {
      m = std::max(m, z[k]);
    } else {
      lanes = at::vec::maximum(lanes, load<V>(z + k));
    }
  });
  __at_align__ T values[Vec::size()];
  lanes.store(values);
  for (int i = 0; i < Vec::size(); ++i) m = std::max(m, values[i]);
  return m;
}

// Adds the columns [begin, end) to the row sums (relative to the row max m); `other` is false
// only for the target column. Stores exp(z - m) into e when e is not null.
template <class T>
inline void accumulate(const Row<T>& row, T m, int64_t begin, int64_t end, bool other, T* e,
                       RowSums<Vectorized<T>>& lanes_out, RowSums<T>& tail_out, const LossParams<T>& p) {
  // Local accumulators: stores through e (float*) may alias a __m256 in memory, so sums kept
  // behind a reference would be reloaded and stored at every vector.
  RowSums<Vectorized<T>> lanes = lanes_out;
  RowSums<T> tail = tail_out;
  for_each_chunk<T>(begin, end, [&](auto tag, int64_t k) {
    using V = decltype(tag);
    const V zm = load<V>(row.z + k) - V(m);
    const V ek = exp_of(zm);
    if (e) store(ek, e + k);
    const ElementTargets<V> t = element_targets<V>(row, k, p);
    if constexpr (std::is_same_v<V, T>) {
      add_element(tail, zm, ek, t.q, t.wq, t.wq_smooth, other, p);
    } else {
      add_element(lanes, zm, ek, t.q, t.wq, t.wq_smooth, other, p);
    }
  });
  lanes_out = lanes;
  tail_out = tail;
}

// The row in the accumulation dtype: the input itself, or converted into `buffer`.
template <class scalar_t, class T>
inline const T* row_in_acc(const scalar_t* x, int64_t n, std::vector<T>& buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return x;
  } else {
    at::vec::convert(x, buffer.data(), n);
    return buffer.data();
  }
}

// Writes g_row * dL/dz of a counted, in-range row into `out` (the gradient row, or a T buffer
// when the gradient has a narrower dtype). prob_k comes from the stored exponentials e (forward)
// or is recomputed as exp(log p_k) (backward, e == nullptr).
template <class T>
inline void grad_row(const Row<T>& row, const T* e, T inv_s, T m, T log_s, int64_t y, int64_t n,
                     const GradCoefficients<T>& c, const LossParams<T>& p, T* out) {
  for_each_chunk<T>(0, n, [&](auto tag, int64_t k) {
    using V = decltype(tag);
    const V logp = (load<V>(row.z + k) - V(m)) - V(log_s);
    const V prob = e ? load<V>(e + k) * V(inv_s) : exp_of(logp);
    const ElementTargets<V> t = element_targets<V>(row, k, p);
    store(grad_element(prob, logp, t.w, t.wq, t.wq_smooth, c, p), out + k);
  });
  if (y >= 0) out[y] = c.g_y;
}

// Stores a gradient row: zeros for ignored rows, NaN for out-of-range targets, else `values`.
template <class scalar_t, class T>
inline void store_grad_row(scalar_t* out, const T* values, const RowTarget& target, int64_t n) {
  if (target.bad || !target.counted) {
    std::fill(out, out + n, static_cast<scalar_t>(target.bad ? nan_of<T>() : T(0)));
  } else if constexpr (!std::is_same_v<scalar_t, T>) {
    at::vec::convert(values, out, n);
  }
}

template <class scalar_t, class T>
void forward_rows(const KernelArgs& args, const LossParams<T>& p, int64_t begin, int64_t end) {
  const int64_t n = args.n_cols;
  constexpr bool same = std::is_same_v<scalar_t, T>;
  std::vector<T> z_buffer(same ? 0 : n), e_buffer(args.grad ? n : 0);
  const T* weight = static_cast<const T*>(args.weight);
  const T g_scale = mean_scale<T>(args);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* x = static_cast<const scalar_t*>(args.logits) + i * args.logits_stride;
    const RowTarget target = row_target(args, i);
    const T* q = args.prob_target ? static_cast<const T*>(args.target) + i * args.q_stride : nullptr;
    const Row<T> row{row_in_acc(x, n, z_buffer), weight, q};
    const T m = safe_ref(row_max(row.z, n));

    T* e = args.grad ? e_buffer.data() : nullptr;
    auto lanes = RowSums<Vectorized<T>>::zero();
    auto sums = RowSums<T>::zero();
    if (target.y >= 0) {  // the target column apart, for an exact 1 - p_y
      accumulate(row, m, 0, target.y, true, e, lanes, sums, p);
      accumulate(row, m, target.y, target.y + 1, false, e, lanes, sums, p);
      accumulate(row, m, target.y + 1, n, true, e, lanes, sums, p);
    } else {
      accumulate(row, m, 0, n, true, e, lanes, sums, p);
    }
    add(sums, horizontal_sum(lanes));

    const T zm_y = target.y >= 0 ? row.z[target.y] - m : -m;
    const RowResults<T> r = row_results(sums, zm_y, target_weight<T>(args, target), p);
    store_row_stats(args, i, target, m, r);

    if (!args.grad) continue;
    scalar_t* out = static_cast<scalar_t*>(args.grad) + i * n;
    if (target.counted && !target.bad) {
      const GradCoefficients<T> c = grad_coefficients(g_scale, r.entropy, r.p_target, r.logp_y, r.aux,
                                                      r.sample_weight, r.row_weight, p);
      T* values = same ? reinterpret_cast<T*>(out) : e;  // e is read before it is overwritten
      grad_row(row, e, T(1) / sums.s, m, r.log_s, target.y, n, c, p, values);
      store_grad_row(out, values, target, n);
    } else {
      store_grad_row(out, static_cast<const T*>(nullptr), target, n);
    }
  }
}

template <class scalar_t, class T>
void backward_rows(const KernelArgs& args, const LossParams<T>& p, int64_t begin, int64_t end) {
  const int64_t n = args.n_cols, n_rows = args.n_rows;
  constexpr bool same = std::is_same_v<scalar_t, T>;
  std::vector<T> z_buffer(same ? 0 : n), g_buffer(same ? 0 : n);
  const T* weight = static_cast<const T*>(args.weight);
  const T* stats = static_cast<const T*>(args.saved_stats);
  const T* grad_loss = static_cast<const T*>(args.grad_loss);
  const T g_scale = mean_scale<T>(args);
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* out = static_cast<scalar_t*>(args.grad) + i * n;
    const RowTarget target = row_target(args, i);
    if (!target.counted || target.bad) {
      store_grad_row(out, static_cast<const T*>(nullptr), target, n);
      continue;
    }
    const scalar_t* x = static_cast<const scalar_t*>(args.logits) + i * args.logits_stride;
    const T* q = args.prob_target ? static_cast<const T*>(args.target) + i * args.q_stride : nullptr;
    const Row<T> row{row_in_acc(x, n, z_buffer), weight, q};
    const T m = stats[kRowMax * n_rows + i], log_s = stats[kLogSum * n_rows + i];
    const T aux = stats[kAux * n_rows + i];  // 1 - p_y for index targets
    const T logp_y = target.y >= 0 ? log_p_target(row.z[target.y] - m, log_s, aux) : T(0);
    const T g_row = grad_loss[i * args.grad_loss_stride] * g_scale;
    const GradCoefficients<T> c = grad_coefficients(
        g_row, stats[kEntropy * n_rows + i], stats[kPTarget * n_rows + i], logp_y, aux,
        stats[kSampleWeight * n_rows + i], stats[kRowWeight * n_rows + i], p);
    T* values = same ? reinterpret_cast<T*>(out) : g_buffer.data();
    grad_row(row, static_cast<const T*>(nullptr), T(0), m, log_s, target.y, n, c, p, values);
    store_grad_row(out, values, target, n);
  }
}

// Rows per task: enough elements that a task outweighs its scheduling.
inline int64_t grain_rows(int64_t n_cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n_cols, 1)); }

template <template <class, class> class Rows>
void run_rows(const KernelArgs& args) {
  auto run = [&](auto input_tag, auto acc_tag) {
    using scalar_t = decltype(input_tag);
    using T = decltype(acc_tag);
    const LossParams<T> p = loss_params<T>(args);
    at::parallel_for(0, args.n_rows, grain_rows(args.n_cols),
                     [&](int64_t begin, int64_t end) { Rows<scalar_t, T>::run(args, p, begin, end); });
  };
  switch (args.dtype) {
    case c10::ScalarType::Float: return run(float(), float());
    case c10::ScalarType::Double: return run(double(), double());
    case c10::ScalarType::Half: return run(c10::Half(), float());
    case c10::ScalarType::BFloat16: return run(c10::BFloat16(), float());
    default: TORCH_CHECK(false, "aepg: unsupported logits dtype ", args.dtype);
  }
}

template <class scalar_t, class T>
struct ForwardRows {
  static void run(const KernelArgs& args, const LossParams<T>& p, int64_t begin, int64_t end) {
    forward_rows<scalar_t, T>(args, p, begin, end);
  }
};

template <class scalar_t, class T>
struct BackwardRows {
  static void run(const KernelArgs& args, const LossParams<T>& p, int64_t begin, int64_t end) {
    backward_rows<scalar_t, T>(args, p, begin, end);
  }
};

void forward(const KernelArgs& args) { run_rows<ForwardRows>(args); }
void backward(const KernelArgs& args) { run_rows<BackwardRows>(args); }

}  // namespace aepg::cpu::CPU_CAPABILITY
