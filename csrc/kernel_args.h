// Raw arguments of one forward or backward call, filled once by the operator glue (ops.cpp) from
// tensors and handed to the CPU or the CUDA kernels, which read nothing else.
#pragma once

#include "policy_loss_math.h"

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace aepg {

struct KernelArgs {
  int64_t n_rows = 0, n_cols = 0;
  int device_index = -1;                           // CUDA device of the tensors
  c10::ScalarType dtype = c10::ScalarType::Float;  // of the logits and of the gradient
  bool fp64 = false;                               // accumulation in double (else float)

  // Inputs. Every tensor below except the logits and the targets is in the accumulation dtype.
  const void* logits = nullptr;  // (n_rows, n_cols), unit column stride
  int64_t logits_stride = 0;
  const void* target = nullptr;  // (n_rows,) int32/int64 indices, or (n_rows, n_cols) probabilities
  bool target_int32 = false;
  int64_t q_stride = 0;          // row stride of probability targets
  const void* weight = nullptr;  // (n_cols,) class weights, or null
  const void* w_total = nullptr; // 0-d sum of the weights (smoothing / probability targets with weights)
  const void* a_ptr = nullptr;   // 0-d CE weight when given as a tensor, else a
  const void* b_ptr = nullptr;   // 0-d EPG weight when given as a tensor, else b
  bool b_one_minus_a = false;    // b = 1 - a (aEPG with a tensor alpha)
  double a = 1, b = 0, beta = 0, eps = 0, gamma = 0;
  int64_t ignore_index = -100;
  bool prob_target = false, focal = false, entropy = false;
  bool mean = false;             // the loss is divided by *denom
  const void* denom = nullptr;   // 0-d "mean" denominator

  // Forward outputs.
  void* loss = nullptr;          // (n_rows,) per-row loss
  void* stats = nullptr;         // (kNumStats, n_rows)
  void* grad = nullptr;          // (n_rows, n_cols) contiguous, in dtype; null: no gradient
  bool stream_grad = false;      // CPU, fp32: write the gradient with streaming stores (ops.cpp)

  // Backward inputs.
  const void* grad_loss = nullptr;  // 0-d (stride 0) or (n_rows,) upstream gradient
  int64_t grad_loss_stride = 0;
  const void* saved_stats = nullptr;
};

// Per-call parameters in the accumulation dtype; tensor coefficients are read through their
// pointer (host memory for the CPU kernels, device memory inside a CUDA kernel).
template <class T>
AEPG_HD LossParams<T> loss_params(const KernelArgs& args) {
  LossParams<T> p;
  p.a = args.a_ptr ? *static_cast<const T*>(args.a_ptr) : static_cast<T>(args.a);
  p.b = args.b_one_minus_a ? T(1) - p.a : args.b_ptr ? *static_cast<const T*>(args.b_ptr) : static_cast<T>(args.b);
  p.beta = static_cast<T>(args.beta);
  p.eps = static_cast<T>(args.eps);
  p.gamma = static_cast<T>(args.gamma);
  p.n_cols = static_cast<T>(args.n_cols);
  p.w_total = args.w_total ? *static_cast<const T*>(args.w_total) : p.n_cols;
  p.prob_target = args.prob_target;
  p.smoothing = args.eps > 0;
  p.focal = args.focal;
  p.entropy = args.entropy || args.beta != 0;
  p.entropy_term = args.beta != 0;
  return p;
}

// Which column is the target, and whether the row counts / is out of range (its results NaN).
struct RowTarget {
  int64_t y;  // the target column, -1 when none (probability targets, ignored, out of range)
  bool counted, bad;
};

AEPG_HD RowTarget row_target(const KernelArgs& args, int64_t i) {
  if (args.prob_target) return {-1, true, false};
  const int64_t y =
      args.target_int32 ? static_cast<const int32_t*>(args.target)[i] : static_cast<const int64_t*>(args.target)[i];
  const bool counted = y != args.ignore_index;
  const bool in_range = y >= 0 && y < args.n_cols;
  return {counted && in_range ? y : -1, counted, counted && !in_range};
}

// Every per-row output of a row (or of a vector of rows, V as in row_results): ignored rows get
// 0 loss and weights, out-of-range targets NaN (as backends/triton/_tiles.py store_row_stats).
// M is bool, or a vector mask of V.
template <class V>
struct RowStats {
  V loss, lse, entropy, p_target, sample_weight, row_weight, aux, row_max, log_sum;
};

template <class T, class V, class M>
AEPG_HD RowStats<V> row_stats(M counted, M bad, V m, const RowResults<V>& r) {
  const V nan(nan_of<T>()), zero(T(0));
  auto masked = [&](V value) { return select(bad, nan, select(counted, value, zero)); };
  return {masked(r.loss),
          m + r.log_s,
          r.entropy,
          masked(r.p_target),
          masked(r.sample_weight),
          select(counted, r.row_weight, zero),
          select(counted, r.aux, zero),
          m,
          r.log_s};
}

// Calls store(stat, value) for each of the (kNumStats, n_rows) statistics (not the loss).
template <class V, class Store>
AEPG_HD void for_each_stat(const RowStats<V>& s, const Store& store) {
  store(kLse, s.lse);
  store(kEntropy, s.entropy);
  store(kPTarget, s.p_target);
  store(kSampleWeight, s.sample_weight);
  store(kRowWeight, s.row_weight);
  store(kAux, s.aux);
  store(kRowMax, s.row_max);
  store(kLogSum, s.log_sum);
}

// Writes every per-row output of row i.
template <class T>
AEPG_HD void store_row_stats(const KernelArgs& args, int64_t i, const RowTarget& target, T m, const RowResults<T>& r) {
  const RowStats<T> s = row_stats<T>(target.counted, target.bad, m, r);
  static_cast<T*>(args.loss)[i] = s.loss;
  T* stats = static_cast<T*>(args.stats);
  const int64_t n_rows = args.n_rows;
  for_each_stat(s, [&](int stat, T value) { stats[stat * n_rows + i] = value; });
}

// The target's class weight (1 for probability targets, 0 without an in-range target).
template <class T>
AEPG_HD T target_weight(const KernelArgs& args, const RowTarget& target) {
  if (args.prob_target) return T(1);
  if (target.y < 0) return T(0);
  return args.weight ? static_cast<const T*>(args.weight)[target.y] : T(1);
}

// The upstream scale of the "mean" loss: 1 / denominator (1 for "sum").
template <class T>
AEPG_HD T mean_scale(const KernelArgs& args) {
  return args.mean ? T(1) / *static_cast<const T*>(args.denom) : T(1);
}

namespace cpu {
void forward(const KernelArgs& args);
void backward(const KernelArgs& args);
const char* capability();  // the instruction set the kernels run with: "AVX512", "AVX2" or "DEFAULT"
}  // namespace cpu

namespace cuda {
void forward(const KernelArgs& args);
void backward(const KernelArgs& args);
// grad *= *g (g: 0-d, in the accumulation dtype), skipped on the device when *g == 1.
void scale(void* grad, c10::ScalarType dtype, int64_t numel, const void* g, c10::ScalarType g_dtype, int device);
// Largest C for which the forward keeps a row on chip and writes the gradient.
constexpr int64_t kMaxOnChipCols = 16384;
}  // namespace cuda

}  // namespace aepg
