// The CPU kernels, compiled once per instruction set (CPU_CAPABILITY = DEFAULT, AVX2, AVX512): each
// translation unit that includes this defines them in its own namespace aepg::cpu::<capability>,
// as ATen does, and policy_loss_cpu.cpp picks one at run time.
//
// A row is processed while it is in cache: max, then one pass for exp(z - m) and every sum, then
// (forward with gradient) one pass that turns the stored exponentials into the gradient, so each
// exponential is computed once. Rows are split over threads with at::parallel_for.
//
// Throughput (4096 x 1000 fp32 and 8192 x 32000 on an AVX-512 core, aepg-bench --suite cpu):
// every pass runs in whole vectors (the target column's lane is masked out of s_other in the one
// vector that holds it, a row's partial last vector is masked), the element loops are inlined into
// one row function per Mode so they test no flag, the next row is prefetched while this one is
// computed (its reads overlap the exponentials), and a gradient that is not in cache is written
// with streaming stores (KernelArgs::stream_grad).
#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2, AVX512) before including policy_loss_cpu_kernels.h"
#endif

#define AEPG_VECTORIZED
#include "../kernel_args.h"
#include "../policy_loss_math.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

// The element loops must be inlined into the row functions of each mode, where the flags of the
// specialized LossParams are constants; GCC's heuristics do not inline them on their own.
#if defined(__GNUC__)
#define AEPG_ALWAYS_INLINE inline __attribute__((always_inline))
#define AEPG_LAMBDA_INLINE __attribute__((always_inline))
#define AEPG_NOINLINE __attribute__((noinline))
#else
#define AEPG_ALWAYS_INLINE inline
#define AEPG_LAMBDA_INLINE
#define AEPG_NOINLINE
#endif

namespace aepg::cpu::CPU_CAPABILITY {
namespace {  // internal linkage: no calls through the PLT, and inlining decided here

using at::vec::Vectorized;

// The lane-wise max and sum, as reduce_rows and vec_reduce_all take them.
struct LaneMax {
  template <class V>
  AEPG_ALWAYS_INLINE V operator()(const V& a, const V& b) const {
    return at::vec::maximum(a, b);
  }
};
struct LaneSum {
  template <class V>
  AEPG_ALWAYS_INLINE V operator()(const V& a, const V& b) const {
    return a + b;
  }
};

// Sum of the lanes (a shuffle tree where ATen has one).
template <class T>
AEPG_ALWAYS_INLINE T horizontal_sum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>(LaneSum(), v);
}

// The lane sums of the fields this call uses (p is specialized: the tests fold away).
template <class T>
AEPG_ALWAYS_INLINE RowSums<T> horizontal_sum(const RowSums<Vectorized<T>>& v, const LossParams<T>& p) {
  RowSums<T> r = RowSums<T>::zero();
  r.s = horizontal_sum(v.s);
  r.s_other = horizontal_sum(v.s_other);
  if (p.entropy) r.t = horizontal_sum(v.t);
  if (p.prob_target) r.u = horizontal_sum(v.u), r.pq = horizontal_sum(v.pq), r.wq = horizontal_sum(v.wq);
  if (p.smoothing || p.prob_target) r.zs = horizontal_sum(v.zs), r.wq_smooth = horizontal_sum(v.wq_smooth);
  return r;
}

// Which element loops a call runs, fixed at compile time so that they test no flag per vector.
// The fast modes are index targets without class weights or smoothing (CE, EPG, aEPG, with or
// without an entropy); everything else runs the generic loops, which read the flags.
enum class Mode { kGeneric, kPlain, kEntropy, kEntropyTerm };

template <class T, Mode M>
inline LossParams<T> specialize(LossParams<T> p) {
  if constexpr (M != Mode::kGeneric) {
    p.prob_target = false;
    p.smoothing = false;
    p.entropy = M != Mode::kPlain;
    p.entropy_term = M == Mode::kEntropyTerm;
  }
  return p;
}

// One row's inputs in the accumulation dtype T.
template <class T>
struct Row {
  const T* z;  // logits
  const T* w;  // class weights or null
  const T* q;  // target probabilities or null
};

// Class weight w, and q, w q, w q' for probability targets (w for index targets), as
// backends/triton/_tiles.py load_tile.
template <class V>
struct ElementTargets {
  V w, q, wq, wq_smooth;
};

// Of the W lanes at column k, the first `count` (W: all); lanes past the row read 0.
template <class T>
AEPG_ALWAYS_INLINE ElementTargets<Vectorized<T>> element_targets(const Row<T>& row, int64_t k, int count,
                                                                 const LossParams<T>& p) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  auto load = [&](const T* ptr) AEPG_LAMBDA_INLINE { return count == W ? V::loadu(ptr) : V::loadu(ptr, count); };
  const V w = row.w ? load(row.w + k) : V(T(1));
  if (!p.prob_target) return {w, w, w, w};
  const V q = load(row.q + k);
  const V wq = w * q;
  return {w, q, wq, V(T(1) - p.eps) * wq + V(p.eps / p.n_cols) * w};
}

// The row max in lanes: lane j is the max of the row's columns j mod W; NaN is skipped (a lane
// that saw one is -inf; a NaN row's results are NaN through its sums anyway). Four independent
// accumulators, so that the max's latency does not bound a pass that is in cache.
template <class T>
AEPG_ALWAYS_INLINE Vectorized<T> row_max_lanes(const T* z, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  Vec l0(neg_inf), l1(neg_inf), l2(neg_inf), l3(neg_inf);
  int64_t k = 0;
  for (; k + 4 * W <= n; k += 4 * W) {
    l0 = at::vec::maximum(l0, Vec::loadu(z + k));
    l1 = at::vec::maximum(l1, Vec::loadu(z + k + W));
    l2 = at::vec::maximum(l2, Vec::loadu(z + k + 2 * W));
    l3 = at::vec::maximum(l3, Vec::loadu(z + k + 3 * W));
  }
  for (; k + W <= n; k += W) l0 = at::vec::maximum(l0, Vec::loadu(z + k));
  if (k < n) {  // the partial last vector, its lanes past the row at -inf
    const Vec lane = Vec::arange(T(0), 1);
    l1 = at::vec::maximum(l1, Vec::blendv(Vec(neg_inf), Vec::loadu(z + k, n - k), lane < Vec(T(n - k))));
  }
  const Vec l = at::vec::maximum(at::vec::maximum(l0, l1), at::vec::maximum(l2, l3));
  return Vec::blendv(l, Vec(neg_inf), l != l);
}

// The row max: its lanes reduced by a shuffle tree (no branch on the data, which would mispredict
// at every level for random logits).
template <class T>
inline T row_max(const T* z, int64_t n) {
  return at::vec::vec_reduce_all<T>(LaneMax(), row_max_lanes(z, n));
}

// out[r] = the lanes of v[r] reduced by op, for the kBlockRows rows of a block (below). Per row,
// a horizontal reduction is a chain of dependent shuffles after the row's last vector; for 16-lane
// fp32 vectors and 16 rows one tree reduces all rows at once (45 instructions, none of them
// waiting for one row) and stores the rows' values as one vector. Elsewhere: row by row.
template <class T, int kRows, class Op>
AEPG_ALWAYS_INLINE void reduce_rows(const Vectorized<T>* v, T* out, const Op& op) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float> && kRows == 16) {
    // After the four levels, lane p holds the row whose index has p's bits 0, 1 and 2, 3 swapped;
    // reading the rows in that (self-inverse) order puts row r in lane r.
    auto row = [&](int i) AEPG_LAMBDA_INLINE {
      return __m512(v[((i & 1) << 1) | ((i >> 1) & 1) | ((i & 4) << 1) | ((i >> 1) & 4)]);
    };
    auto apply = [&](__m512 a, __m512 b) AEPG_LAMBDA_INLINE { return __m512(op(Vectorized<T>(a), Vectorized<T>(b))); };
    __m512 b[8], c[4], d[2];
    for (int r = 0; r < 8; ++r) {  // 256-bit halves: rows r and r + 8 in one vector
      const __m512 x = row(r), y = row(r + 8);
      b[r] = apply(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int r = 0; r < 4; ++r) {  // 128-bit quarters: four rows a vector
      c[r] = apply(_mm512_shuffle_f32x4(b[r], b[r + 4], 0x88), _mm512_shuffle_f32x4(b[r], b[r + 4], 0xDD));
    }
    for (int r = 0; r < 2; ++r) {  // pairs of lanes: eight rows a vector
      d[r] = apply(_mm512_shuffle_ps(c[r], c[r + 2], 0x44), _mm512_shuffle_ps(c[r], c[r + 2], 0xEE));
    }
    Vectorized<T>(apply(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD))).store(out);
    return;
  }
#endif
  for (int r = 0; r < kRows; ++r) out[r] = at::vec::vec_reduce_all<T>(op, v[r]);
}

// Visits a row of n columns in whole vectors: full(k, j) for each full vector at column k (j = 0, 1
// alternating, for two independent accumulators), part(k, count, y_lane) for the vector that holds
// the target column y (y_lane = y - k; count < W when it is also the row's last, partial vector)
// and for a partial last vector (y_lane = -1). No column is visited one at a time.
template <class T, class Full, class Part>
AEPG_ALWAYS_INLINE void for_each_vector(int64_t n, int64_t y, const Full& full, const Part& part) {
  constexpr int64_t W = Vectorized<T>::size();
  const int64_t n_full = n - n % W;
  auto run = [&](int64_t k, int64_t end) AEPG_LAMBDA_INLINE {
    for (; k + 2 * W <= end; k += 2 * W) {
      full(k, 0);
      full(k + W, 1);
    }
    if (k < end) full(k, 0);
  };
  int64_t k = 0;
  if (y >= 0) {
    const int64_t ky = y - y % W;
    run(0, ky);
    part(ky, static_cast<int>(std::min(W, n - ky)), static_cast<int>(y - ky));
    k = ky + W;
  }
  if (k < n_full) run(k, n_full);
  if (n_full < n && k <= n_full) part(n_full, static_cast<int>(n - n_full), -1);
}

// Prefetches the next row while this one is computed (one cache line per vector of this row), so
// that the next max pass reads from cache and the row's compute overlaps the next row's reads.
struct Prefetcher {
  const char* next = nullptr;
  const char* end = nullptr;
  bool to_l1 = true;  // short rows into L1, long ones (> 16 KiB) into L2
  AEPG_ALWAYS_INLINE void line() {
    if (next < end) {
#if defined(__GNUC__)
      if (to_l1) {
        __builtin_prefetch(next, 0, 3);
      } else {
        __builtin_prefetch(next, 0, 2);
      }
#endif
      next += 64;
    }
  }
};

template <class scalar_t>
inline Prefetcher prefetcher(const scalar_t* next_row, int64_t n) {
  if (!next_row) return {};
  const char* begin = reinterpret_cast<const char*>(next_row);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  return {begin, begin + bytes, bytes <= 16384};
}

// The row sums relative to the row max m, the target column y (or -1) apart in s_other (its
// lane masked in the one vector that holds it, so 1 - p_y = s_other / S stays exact), in lanes
// (row_sums: reduced). Stores exp(z - m) into e when e is not null.
template <class T>
AEPG_ALWAYS_INLINE RowSums<Vectorized<T>> row_sum_lanes(const Row<T>& row, T m, int64_t n, int64_t y, T* e,
                                                        Prefetcher& pf, const LossParams<T>& p) {
  using V = Vectorized<T>;
  // Local accumulators: stores through e could alias sums kept behind a reference.
  RowSums<V> acc[2] = {RowSums<V>::zero(), RowSums<V>::zero()};
  auto full = [&](int64_t k, int j) AEPG_LAMBDA_INLINE {
    pf.line();
    const V zm = V::loadu(row.z + k) - V(m);
    const V ek = exp_of(zm);
    if (e) ek.store(e + k);
    const ElementTargets<V> t = element_targets(row, k, V::size(), p);
    add_element(acc[j], zm, ek, t.q, t.wq, t.wq_smooth, true, p);
  };
  auto part = [&](int64_t k, int count, int y_lane) AEPG_LAMBDA_INLINE {
    const V zm = V::loadu(row.z + k, count) - V(m);
    const V ek = exp_of(zm);
    if (e) ek.store(e + k, count);
    const ElementTargets<V> t = element_targets(row, k, count, p);
    RowSums<V> d = RowSums<V>::zero();
    add_element(d, zm, ek, t.q, t.wq, t.wq_smooth, true, p);
    const V lane = V::arange(T(0), 1);
    const V keep = lane < V(T(count));
    const V zero(T(0));
    d.s = V::blendv(zero, d.s, keep);
    d.s_other = V::blendv(zero, d.s_other, keep & (lane != V(T(y_lane))));
    d.t = V::blendv(zero, d.t, keep);
    d.u = V::blendv(zero, d.u, keep);
    d.pq = V::blendv(zero, d.pq, keep);
    d.zs = V::blendv(zero, d.zs, keep);
    d.wq = V::blendv(zero, d.wq, keep);
    d.wq_smooth = V::blendv(zero, d.wq_smooth, keep);
    add(acc[0], d);
  };
  for_each_vector<T>(n, y, full, part);
  add(acc[0], acc[1]);
  return acc[0];
}

template <class T>
AEPG_ALWAYS_INLINE RowSums<T> row_sums(const Row<T>& row, T m, int64_t n, int64_t y, T* e, Prefetcher& pf,
                                       const LossParams<T>& p) {
  return horizontal_sum(row_sum_lanes(row, m, n, y, e, pf, p), p);
}

// The row in the accumulation dtype: the input itself, or converted into `buffer`.
template <class scalar_t, class T>
inline const T* row_in_acc(const scalar_t* x, int64_t n, T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return x;
  } else {
    at::vec::convert(x, buffer, n);
    return buffer;
  }
}

// Writes g_row * dL/dz of a counted, in-range row into `out` (the gradient row, or a T buffer,
// which may be e itself). prob_k comes from the stored exponentials e (forward) or is recomputed
// as exp(log p_k) (backward, e == nullptr).
template <class T>
AEPG_ALWAYS_INLINE void grad_row(const Row<T>& row, const T* e, T inv_s, T m, T log_s, int64_t y, int64_t n,
                                 const GradCoefficients<T>& c, const LossParams<T>& p, Prefetcher& pf, T* out) {
  using V = Vectorized<T>;
  auto chunk = [&](int64_t k, int count) AEPG_LAMBDA_INLINE {
    constexpr int W = V::size();
    auto load = [&](const T* ptr) AEPG_LAMBDA_INLINE { return count == W ? V::loadu(ptr) : V::loadu(ptr, count); };
    const V logp = (load(row.z + k) - V(m)) - V(log_s);
    const V prob = e ? load(e + k) * V(inv_s) : exp_of(logp);
    const ElementTargets<V> t = element_targets(row, k, count, p);
    const V g = grad_element(prob, logp, t.w, t.wq, t.wq_smooth, c, p);
    if (count == W) {
      g.store(out + k);
    } else {
      g.store(out + k, count);
    }
  };
  for_each_vector<T>(
      n, -1,
      [&](int64_t k, int) AEPG_LAMBDA_INLINE {
        pf.line();
        chunk(k, V::size());
      },
      [&](int64_t k, int count, int) AEPG_LAMBDA_INLINE { chunk(k, count); });
  if (y >= 0) out[y] = c.g_y;
}

// Copies a finished fp32 gradient row from cache to memory with streaming stores (no read for
// ownership of the destination lines, which are not read again here); partial lines at the row's
// ends get plain stores. Other types and builds: a plain copy.
template <class T>
inline void stream_row(const T* src, T* dst, int64_t n) {
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    constexpr int64_t W = 16;
#else
    constexpr int64_t W = 8;
#endif
    const int64_t misaligned = (reinterpret_cast<uintptr_t>(dst) / sizeof(float)) % W;
    const int64_t head = std::min<int64_t>(n, misaligned ? W - misaligned : 0);
    for (; k < head; ++k) dst[k] = src[k];
    for (; k + W <= n; k += W) {
#if defined(CPU_CAPABILITY_AVX512)
      _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
#else
      _mm256_stream_ps(dst + k, _mm256_loadu_ps(src + k));
#endif
    }
  }
#endif
  for (; k < n; ++k) dst[k] = src[k];
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Stores a gradient row: zeros for ignored rows, NaN for out-of-range targets, else `values`
// (converted when the gradient has a narrower dtype; streamed when `stream`).
template <class scalar_t, class T>
inline void store_grad_row(scalar_t* out, const T* values, const RowTarget& target, int64_t n, bool stream) {
  if (target.bad || !target.counted) {
    std::fill(out, out + n, static_cast<scalar_t>(target.bad ? nan_of<T>() : T(0)));
  } else if constexpr (!std::is_same_v<scalar_t, T>) {
    at::vec::convert(values, out, n);
  } else {
    if (stream) stream_row(values, out, n);
  }
}

// Rows of a block: their sums are computed one row after another (phase 1), their results
// together, one row a vector lane (phase 2), then their gradients (phase 3). Per row, the scalar
// tail of the max, the sums, the logs and the stores is a chain of dependent latencies; in a block
// the rows' chains are independent and the results cost a few vector instructions per row.
constexpr int kBlockRows = 16;

// With a gradient, phase 3 reads the block's exponentials (and converted logits) again: a block
// of long rows would leave L1 between the phases (measured at 4096 x 1000 fp32, 8 rows a block:
// 552 -> 676 ns a row), so rows longer than kMaxBlockCols go one at a time, results in scalars.
constexpr int64_t kMaxBlockCols = 256;

inline int block_rows(const KernelArgs& args) { return args.grad && args.n_cols > kMaxBlockCols ? 1 : kBlockRows; }

// Per-row values of a block, one array per field so that phase 2 loads a vector of rows.
template <class T>
struct Block {
  static constexpr int kRows = kBlockRows;
  // phase 1 -> 2: the row sums, m, z_y - m, w_y, and the target's flags as 0 / 1
  alignas(64) T s[kRows], t[kRows], s_other[kRows], u[kRows], pq[kRows], zs[kRows], wq[kRows], wq_smooth[kRows];
  alignas(64) T m[kRows], zm_y[kRows], w_y[kRows], counted[kRows], bad[kRows];
  // phase 2 -> 3: what a row's gradient needs
  alignas(64) T c_p[kRows], c_e[kRows], c_w[kRows], g_y[kRows], entropy[kRows], log_s[kRows], inv_s[kRows];
  RowTarget target[kRows];
};

// Row r's target and the values phase 2 needs besides its sums.
template <class T>
AEPG_ALWAYS_INLINE void put_target(Block<T>& b, int r, T m, T zm_y, T w_y, const RowTarget& target) {
  b.m[r] = m, b.zm_y[r] = zm_y, b.w_y[r] = w_y;
  b.counted[r] = target.counted ? T(1) : T(0);
  b.bad[r] = target.bad ? T(1) : T(0);
  b.target[r] = target;
}

template <class T>
AEPG_ALWAYS_INLINE void put_row(Block<T>& b, int r, const RowSums<T>& sums, T m, T zm_y, T w_y, const RowTarget& target,
                                const LossParams<T>& p) {
  b.s[r] = sums.s, b.s_other[r] = sums.s_other;
  if (p.entropy) b.t[r] = sums.t;
  if (p.prob_target) b.u[r] = sums.u, b.pq[r] = sums.pq, b.wq[r] = sums.wq;
  if (p.smoothing || p.prob_target) b.zs[r] = sums.zs, b.wq_smooth[r] = sums.wq_smooth;
  put_target(b, r, m, zm_y, w_y, target);
}

// Phase 1 of a block of short rows (n <= kMaxBlockCols; row_of(r) is row r of the block, e_of(r)
// its exponentials or null): every row's max in lanes, then every row's sums in lanes, each
// reduced for the whole block at once (reduce_rows): row by row, the reductions after the max and
// after the sums are chains of dependent latencies, one per row and field (measured at 256 x 100
// fp32, the forward op without gradient: CE 22.6 -> 21.6 us, aEPG + entropy 27.4 -> 23.4 us).
// Rows past `count` reduce zeros.
template <class T, Mode M, class RowOf, class EOf, class NextRow>
AEPG_NOINLINE void short_rows_sums(const KernelArgs& args, Block<T>& b, int64_t i0, int count, const RowOf& row_of,
                                   const EOf& e_of, const NextRow& next_row, Prefetcher& pf,
                                   const LossParams<T>& params) {
  const LossParams<T> p = specialize<T, M>(params);  // a function of its own (see forward_rows)
  using V = Vectorized<T>;
  constexpr int R = kBlockRows;
  const int64_t n = args.n_cols;
  V lanes[R];
  for (int r = 0; r < R; ++r) lanes[r] = r < count ? row_max_lanes(row_of(r).z, n) : V(T(0));
  reduce_rows<T, R>(lanes, b.m, LaneMax());
  V s[R], s_other[R], t[R], u[R], pq[R], zs[R], wq[R], wq_smooth[R];
  for (int r = 0; r < R; ++r) {
    RowSums<V> sums = RowSums<V>::zero();
    if (r < count) {
      const RowTarget target = row_target(args, i0 + r);
      const Row<T> row = row_of(r);
      const T m = safe_ref(b.m[r]);
      pf = prefetcher(next_row(r), n);
      sums = row_sum_lanes(row, m, n, target.y, e_of(r), pf, p);
      put_target(b, r, m, target.y >= 0 ? row.z[target.y] - m : -m, target_weight<T>(args, target), target);
    }
    s[r] = sums.s, s_other[r] = sums.s_other;
    if (p.entropy) t[r] = sums.t;
    if (p.prob_target) u[r] = sums.u, pq[r] = sums.pq, wq[r] = sums.wq;
    if (p.smoothing || p.prob_target) zs[r] = sums.zs, wq_smooth[r] = sums.wq_smooth;
  }
  reduce_rows<T, R>(s, b.s, LaneSum());
  reduce_rows<T, R>(s_other, b.s_other, LaneSum());
  if (p.entropy) reduce_rows<T, R>(t, b.t, LaneSum());
  if (p.prob_target) {
    reduce_rows<T, R>(u, b.u, LaneSum()), reduce_rows<T, R>(pq, b.pq, LaneSum());
    reduce_rows<T, R>(wq, b.wq, LaneSum());
  }
  if (p.smoothing || p.prob_target)
    reduce_rows<T, R>(zs, b.zs, LaneSum()), reduce_rows<T, R>(wq_smooth, b.wq_smooth, LaneSum());
}

// Rows j .. j + lanes of a block's array as V: a vector of rows, or one row's scalar (V = T).
template <class V, class T>
AEPG_ALWAYS_INLINE V lanes_at(const T* values) {
  if constexpr (std::is_same_v<V, T>) {
    return *values;
  } else {
    return V::loadu(values);
  }
}

template <class V, class T>
AEPG_ALWAYS_INLINE void store_lanes(const V& v, T* out, int lanes) {
  if constexpr (std::is_same_v<V, T>) {
    *out = v;
  } else {
    v.store(out, lanes);
  }
}

template <class V>
constexpr int lanes_of() {
  if constexpr (std::is_arithmetic_v<V>) {
    return 1;
  } else {
    return V::size();
  }
}

// The sums of the block's rows j .. j + lanes (the fields this call uses; the others 0).
template <class V, class T>
AEPG_ALWAYS_INLINE RowSums<V> block_sums(const Block<T>& b, int j, const LossParams<T>& p) {
  RowSums<V> sums = RowSums<V>::zero();
  sums.s = lanes_at<V>(b.s + j), sums.s_other = lanes_at<V>(b.s_other + j);
  if (p.entropy) sums.t = lanes_at<V>(b.t + j);
  if (p.prob_target) sums.u = lanes_at<V>(b.u + j), sums.pq = lanes_at<V>(b.pq + j), sums.wq = lanes_at<V>(b.wq + j);
  if (p.smoothing || p.prob_target) sums.zs = lanes_at<V>(b.zs + j), sums.wq_smooth = lanes_at<V>(b.wq_smooth + j);
  return sums;
}

// Phase 2: the results and statistics of rows i0 .. i0 + count, a vector of rows at a time (V =
// Vectorized<T>) or one row (V = T); with a gradient also the rows' gradient coefficients. Lanes
// past `count` hold earlier rows' values (never stored).
template <class V, class T>
AEPG_ALWAYS_INLINE void block_results(const KernelArgs& args, Block<T>& b, int64_t i0, int count, T g_scale,
                                      const LossParams<T>& p) {
  constexpr int W = lanes_of<V>();
  T* stats = static_cast<T*>(args.stats);
  T* loss = static_cast<T*>(args.loss);
  for (int j = 0; j < count; j += W) {
    const int lanes = std::min(W, count - j);
    auto store = [&](const V& v, T* out) AEPG_LAMBDA_INLINE { store_lanes(v, out, lanes); };
    const RowSums<V> sums = block_sums<V>(b, j, p);
    const V m = lanes_at<V>(b.m + j);
    const RowResults<V> r = row_results(sums, lanes_at<V>(b.zm_y + j), lanes_at<V>(b.w_y + j), p);
    const V zero(T(0));
    const RowStats<V> st = row_stats<T>(lanes_at<V>(b.counted + j) != zero, lanes_at<V>(b.bad + j) != zero, m, r);
    store(st.loss, loss + i0 + j);
    for_each_stat(st, [&](int stat, const V& v) AEPG_LAMBDA_INLINE { store(v, stats + stat * args.n_rows + i0 + j); });
    if (!args.grad) continue;
    const GradCoefficients<V> c =
        grad_coefficients(V(g_scale), r.entropy, r.p_target, r.logp_y, r.aux, r.sample_weight, r.row_weight, p);
    store(c.c_p, b.c_p + j), store(c.c_e, b.c_e + j), store(c.c_w, b.c_w + j), store(c.g_y, b.g_y + j);
    store(c.entropy, b.entropy + j), store(r.log_s, b.log_s + j), store(V(T(1)) / sums.s, b.inv_s + j);
  }
}

// Row r's gradient coefficients from phase 2 (a and b are uniform: g_scale * p.a, g_scale * p.b).
template <class T>
AEPG_ALWAYS_INLINE GradCoefficients<T> row_coefficients(const Block<T>& b, int r, T g_scale, const LossParams<T>& p) {
  return {b.c_p[r], b.c_e[r], b.c_w[r], b.g_y[r], g_scale * p.a, g_scale * p.b, b.entropy[r]};
}

template <class scalar_t, class T, Mode M>
void forward_rows(const KernelArgs& args, const LossParams<T>& params, int64_t begin, int64_t end) {
  const LossParams<T> p = specialize<T, M>(params);
  const int64_t n = args.n_cols;
  constexpr bool same = std::is_same_v<scalar_t, T>;
  const bool stream = same && args.grad && args.stream_grad;
  const int rows = block_rows(args);
  const bool short_rows = rows == kBlockRows && n <= kMaxBlockCols;
  // Phase 3 and the sums of short rows read the block's logits again: each row keeps its
  // converted copy.
  std::vector<T> z_buffer(same ? 0 : (args.grad || short_rows ? rows : 1) * n), e_buffer(args.grad ? rows * n : 0);
  const T* weight = M == Mode::kGeneric ? static_cast<const T*>(args.weight) : nullptr;
  const T g_scale = mean_scale<T>(args);
  Block<T> b{};  // lanes past a partial block read zeros or earlier rows, never garbage
  auto x_of = [&](int64_t i) { return static_cast<const scalar_t*>(args.logits) + i * args.logits_stride; };
  auto q_of = [&](int64_t i) {
    return args.prob_target ? static_cast<const T*>(args.target) + i * args.q_stride : nullptr;
  };
  auto z_of = [&](int r) { return same ? nullptr : z_buffer.data() + (args.grad || short_rows ? r * n : 0); };
  auto e_of = [&](int r) { return args.grad ? e_buffer.data() + r * n : nullptr; };

  // The next row's lines that phase 1 has not prefetched (a partial last vector) are prefetched
  // by the gradient pass.
  Prefetcher pf;
  for (int64_t i0 = begin; i0 < end; i0 += rows) {
    const int count = static_cast<int>(std::min<int64_t>(rows, end - i0));
    if (short_rows) {
      // A narrower dtype is converted once per row; the max and the sums read the copy.
      auto row_of = [&](int r) AEPG_LAMBDA_INLINE {
        return Row<T>{same ? reinterpret_cast<const T*>(x_of(i0 + r)) : z_of(r), weight, q_of(i0 + r)};
      };
      if constexpr (!same) {
        for (int r = 0; r < count; ++r) row_in_acc(x_of(i0 + r), n, z_of(r));
      }
      auto next_row = [&](int r) { return i0 + r + rows < end ? x_of(i0 + r + rows) : nullptr; };
      short_rows_sums<T, M>(args, b, i0, count, row_of, e_of, next_row, pf, p);
    }
    for (int r = 0; r < count && !short_rows; ++r) {
      const int64_t i = i0 + r;
      const RowTarget target = row_target(args, i);
      const Row<T> row{row_in_acc(x_of(i), n, z_of(r)), weight, q_of(i)};
      pf = prefetcher(i + 1 < end ? x_of(i + 1) : nullptr, n);
      const T m = safe_ref(row_max(row.z, n));
      const RowSums<T> sums = row_sums(row, m, n, target.y, e_of(r), pf, p);
      const T zm_y = target.y >= 0 ? row.z[target.y] - m : -m;
      put_row(b, r, sums, m, zm_y, target_weight<T>(args, target), target, p);
    }
    if (rows == 1) {
      block_results<T>(args, b, i0, count, g_scale, p);
    } else {
      block_results<Vectorized<T>>(args, b, i0, count, g_scale, p);
    }
    if (!args.grad) continue;
    for (int r = 0; r < count; ++r) {
      const int64_t i = i0 + r;
      const RowTarget& target = b.target[r];
      scalar_t* out = static_cast<scalar_t*>(args.grad) + i * n;
      if (!target.counted || target.bad) {
        store_grad_row(out, static_cast<const T*>(nullptr), target, n, false);
        continue;
      }
      const Row<T> row{same ? reinterpret_cast<const T*>(x_of(i)) : z_of(r), weight, q_of(i)};
      T* e = e_of(r);
      T* values = same && !stream ? reinterpret_cast<T*>(out) : e;  // e is read before it is overwritten
      grad_row(row, e, b.inv_s[r], b.m[r], b.log_s[r], target.y, n, row_coefficients(b, r, g_scale, p), p, pf, values);
      store_grad_row(out, values, target, n, stream);
    }
  }
  if (stream) stream_fence();
}

template <class scalar_t, class T, Mode M>
void backward_rows(const KernelArgs& args, const LossParams<T>& params, int64_t begin, int64_t end) {
  const LossParams<T> p = specialize<T, M>(params);
  const int64_t n = args.n_cols, n_rows = args.n_rows;
  constexpr bool same = std::is_same_v<scalar_t, T>;
  std::vector<T> z_buffer(same ? 0 : n), g_buffer(same ? 0 : n);
  const T* weight = M == Mode::kGeneric ? static_cast<const T*>(args.weight) : nullptr;
  const T* stats = static_cast<const T*>(args.saved_stats);
  const T* grad_loss = static_cast<const T*>(args.grad_loss);
  const T g_scale = mean_scale<T>(args);
  for (int64_t i = begin; i < end; ++i) {
    scalar_t* out = static_cast<scalar_t*>(args.grad) + i * n;
    const RowTarget target = row_target(args, i);
    if (!target.counted || target.bad) {
      store_grad_row(out, static_cast<const T*>(nullptr), target, n, false);
      continue;
    }
    const scalar_t* x = static_cast<const scalar_t*>(args.logits) + i * args.logits_stride;
    const T* q = args.prob_target ? static_cast<const T*>(args.target) + i * args.q_stride : nullptr;
    const Row<T> row{row_in_acc(x, n, z_buffer.data()), weight, q};
    Prefetcher pf = prefetcher(i + 1 < end ? x + args.logits_stride : nullptr, n);
    const T m = stats[kRowMax * n_rows + i], log_s = stats[kLogSum * n_rows + i];
    const T aux = stats[kAux * n_rows + i];  // 1 - p_y for index targets
    const T logp_y = target.y >= 0 ? log_p_target(row.z[target.y] - m, log_s, aux) : T(0);
    const T g_row = grad_loss[i * args.grad_loss_stride] * g_scale;
    const GradCoefficients<T> c =
        grad_coefficients(g_row, stats[kEntropy * n_rows + i], stats[kPTarget * n_rows + i], logp_y, aux,
                          stats[kSampleWeight * n_rows + i], stats[kRowWeight * n_rows + i], p);
    T* values = same ? reinterpret_cast<T*>(out) : g_buffer.data();
    grad_row(row, static_cast<const T*>(nullptr), T(0), m, log_s, target.y, n, c, p, pf, values);
    store_grad_row(out, values, target, n, false);
  }
}

// Rows per task: enough elements that a task outweighs its scheduling.
inline int64_t grain_rows(int64_t n_cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n_cols, 1)); }

// The mode of a call (see Mode); fp64 (gradcheck) always runs the generic loops.
template <class T>
inline Mode mode_of(const KernelArgs& args, const LossParams<T>& p) {
  if (std::is_same_v<T, double> || args.prob_target || p.smoothing || args.weight) return Mode::kGeneric;
  return !p.entropy ? Mode::kPlain : !p.entropy_term ? Mode::kEntropy : Mode::kEntropyTerm;
}

// Calls go(integral_constant<Mode, mode>) with the mode as a compile-time constant.
template <class T, class Go>
inline void template_mode(Mode mode, const Go& go) {
  if constexpr (!std::is_same_v<T, double>) {
    switch (mode) {
      case Mode::kPlain:
        return go(std::integral_constant<Mode, Mode::kPlain>());
      case Mode::kEntropy:
        return go(std::integral_constant<Mode, Mode::kEntropy>());
      case Mode::kEntropyTerm:
        return go(std::integral_constant<Mode, Mode::kEntropyTerm>());
      default:
        break;
    }
  }
  go(std::integral_constant<Mode, Mode::kGeneric>());
}

template <bool kForward>
void run_rows(const KernelArgs& args) {
  auto run = [&](auto input_tag, auto acc_tag) {
    using scalar_t = decltype(input_tag);
    using T = decltype(acc_tag);
    const LossParams<T> p = loss_params<T>(args);
    auto go = [&](auto mode_tag) {
      constexpr Mode M = decltype(mode_tag)::value;
      at::parallel_for(0, args.n_rows, grain_rows(args.n_cols), [&](int64_t begin, int64_t end) {
        if constexpr (kForward) {
          forward_rows<scalar_t, T, M>(args, p, begin, end);
        } else {
          backward_rows<scalar_t, T, M>(args, p, begin, end);
        }
      });
    };
    template_mode<T>(mode_of<T>(args, p), go);
  };
  switch (args.dtype) {
    case c10::ScalarType::Float:
      return run(float(), float());
    case c10::ScalarType::Double:
      return run(double(), double());
    case c10::ScalarType::Half:
      return run(c10::Half(), float());
    case c10::ScalarType::BFloat16:
      return run(c10::BFloat16(), float());
    default:
      TORCH_CHECK(false, "aepg: unsupported logits dtype ", args.dtype);
  }
}

}  // namespace

void forward(const KernelArgs& args) { run_rows<true>(args); }
void backward(const KernelArgs& args) { run_rows<false>(args); }

}  // namespace aepg::cpu::CPU_CAPABILITY
