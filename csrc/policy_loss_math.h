// Per-row math of the policy-loss family, shared by the CPU and the CUDA kernels: the one C++
// source of truth, mirroring aepg_kernels/backends/triton/_row_math.py (docs/math.md sections 1 and 2).
//
//   RowSums / add_element / merge:  the running row statistics relative to the row max m,
//   row_results:                    loss, log S, entropy, p_target, sample weight, aux, log p_y,
//   grad_coefficients / grad_element: dL/dz from p, log p and those results.
//
// Element-wise functions are templates over V, a scalar (T = float or double) or, on the CPU, an
// at::vec::Vectorized<T> (define AEPG_VECTORIZED before including), so the vector body and the
// scalar tail of the CPU kernel and every CUDA thread evaluate the same expressions.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define AEPG_HD __host__ __device__ __forceinline__
#else
#define AEPG_HD inline
#endif

#include "contract.h"

#ifdef AEPG_VECTORIZED
#include <ATen/cpu/vec/vec.h>
#endif

namespace aepg {

constexpr double kLog2e = 1.4426950408889634;

// ---- scalar helpers with the same spelling on host and device --------------------------------
AEPG_HD float log_of(float x) { return logf(x); }
AEPG_HD double log_of(double x) { return log(x); }
AEPG_HD float exp2_of(float x) { return exp2f(x); }
AEPG_HD double exp2_of(double x) { return exp2(x); }
AEPG_HD float log1p_of(float x) { return log1pf(x); }
AEPG_HD double log1p_of(double x) { return log1p(x); }
AEPG_HD float log2_of(float x) { return log2f(x); }
AEPG_HD double log2_of(double x) { return log2(x); }

// exp(x) for x <= 0 (x = z - m): an exp2 with log2(e) folded in on the GPU (one multiply and
// the special-function unit); the libm/Sleef exp on the CPU, correctly rounded to 1 ulp.
AEPG_HD float exp_of(float x) {
#ifdef __CUDA_ARCH__
  return exp2f(x * static_cast<float>(kLog2e));
#else
  return std::exp(x);
#endif
}
AEPG_HD double exp_of(double x) {
#ifdef __CUDA_ARCH__
  return exp2(x * kLog2e);
#else
  return std::exp(x);
#endif
}

template <class T>
AEPG_HD T select(bool condition, T if_true, T if_false) {
  return condition ? if_true : if_false;
}

#ifdef AEPG_VECTORIZED
inline at::vec::Vectorized<double> exp_of(const at::vec::Vectorized<double>& x) {
  return x.exp();  // Sleef, 1 ulp: fp64 is for gradcheck
}
#if defined(CPU_CAPABILITY_AVX512)
// exp(x) for x <= 0 or NaN in 12 instructions (half of exp_u20 and its NaN blend): 2^n exp(r) with
// n = round(x log2 e), r = x - n ln 2 (Cody-Waite), Cephes' expf polynomial and vscalefps for 2^n.
// Measured against exp in double: at most 0.89 ulp for every float in [-87.34, 0]; 0 below
// log(FLT_MIN), as exp_u20 (no subnormals, which would slow later arithmetic), exactly 0 for -inf
// (r is NaN there, but the lane is masked), NaN for NaN.
inline at::vec::Vectorized<float> exp_of(const at::vec::Vectorized<float>& v) {
  const __m512 x = v;
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365478515625f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}
#else
// ATen's inline polynomial exp (measured: at most 6 ulp on [-80, 0], 0 below log(FLT_MIN)), not
// the Sleef call, which would spill every accumulator register at each vector. It turns NaN into
// inf: NaN lanes are kept NaN.
inline at::vec::Vectorized<float> exp_of(const at::vec::Vectorized<float>& x) {
  return at::vec::Vectorized<float>::blendv(x, x.exp_u20(), x == x);
}
#endif
template <class T>
inline at::vec::Vectorized<T> select(const at::vec::Vectorized<T>& condition, const at::vec::Vectorized<T>& if_true,
                                     const at::vec::Vectorized<T>& if_false) {
  return at::vec::Vectorized<T>::blendv(if_false, if_true, condition);
}
// The per-row results of several rows at once (one row a lane): Sleef, 1 ulp, as libm.
template <class T>
inline at::vec::Vectorized<T> log_of(const at::vec::Vectorized<T>& x) {
  return x.log();
}
template <class T>
inline at::vec::Vectorized<T> log1p_of(const at::vec::Vectorized<T>& x) {
  return x.log1p();
}
template <class T>
inline at::vec::Vectorized<T> log2_of(const at::vec::Vectorized<T>& x) {
  return x.log2();
}
template <class T>
inline at::vec::Vectorized<T> exp2_of(const at::vec::Vectorized<T>& x) {
  return x.exp2();
}
#endif

// select(condition, if_true(), if_false()) that evaluates one side only where the condition is a
// scalar bool (a libm call that a row does not need is not made); vectors evaluate both.
template <class F, class G>
AEPG_HD auto choose(bool condition, const F& if_true, const G& if_false) {
  return condition ? if_true() : if_false();
}
template <class M, class F, class G>
AEPG_HD auto choose(const M& condition, const F& if_true, const G& if_false) {
  return select(condition, if_true(), if_false());
}

template <class T>
AEPG_HD T nan_of() {
  return std::numeric_limits<T>::quiet_NaN();
}

// A finite reference to subtract: the row max, or 0 for a row that holds only -inf.
template <class T>
AEPG_HD T safe_ref(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// ---- per-call parameters ---------------------------------------------------------------------
template <class T>
struct LossParams {
  T a, b;         // weights of the CE and EPG terms
  T beta;         // entropy weight
  T eps;          // label smoothing
  T gamma;        // focal exponent
  T n_cols;       // C
  T w_total;      // sum_k w_k (C without class weights)
  bool prob_target, smoothing, focal;
  bool entropy;       // compute H (asked for, or needed by the entropy term)
  bool entropy_term;  // beta != 0
};

// ---- running row statistics ------------------------------------------------------------------
// Sums relative to the row max m: S = sum e_k, T = sum (z_k - m) e_k, e_k = exp(z_k - m).
// V is a scalar or a vector of lanes (summed with `horizontal` once per row).
template <class V>
struct RowSums {
  V s, t;
  V s_other;  // index targets: sum over k != y, so that 1 - p_y = s_other / S is exact
  V u;        // probability targets: sum_k w_k q_k e_k
  V pq;       // probability targets: sum_k q_k e_k
  V zs;       // sum_k wq'_k (z_k - m), with 0 * log 0 = 0 (smoothing and probability targets)
  V wq;       // probability targets: sum_k w_k q_k
  V wq_smooth;  // sum_k wq'_k: moves zs when the reference max moves (merge)

  AEPG_HD static RowSums zero() {
    const V z(0.0f);
    return RowSums{z, z, z, z, z, z, z, z};
  }
};

// One element's (or one vector's) contribution: zm = z - m, e = exp(zm); q the target
// probability, wq = w q, wq_smooth = w q' (q' = (1 - eps) q + eps / C; w for index targets with
// smoothing). Masked classes (z = -inf, e = 0) add 0. `other` is false for the target column y.
template <class T, class V>
AEPG_HD void add_element(RowSums<V>& acc, V zm, V e, V q, V wq, V wq_smooth, bool other, const LossParams<T>& p) {
  const V zero(T(0));
  acc.s += e;
  if (other) acc.s_other += e;
  if (p.entropy) acc.t += select(e > zero, zm * e, zero);
  if (p.prob_target) {
    acc.u += wq * e;
    acc.pq += q * e;
    acc.wq += wq;
  }
  if (p.smoothing || p.prob_target) {
    acc.zs += select(wq_smooth != zero, wq_smooth * zm, zero);
    acc.wq_smooth += wq_smooth;
  }
}

// Sums of two parts of a row relative to their own maxima -> relative to the common max
// (docs/math.md section 2: S <- e^d S, T <- e^d (T + d S), zs <- zs + d sum wq', d = m_old - m_new).
// A part whose max is still -inf saw only -inf or NaN (the max skips NaN): its sums are 0, or NaN,
// which must survive (multiplied by 0, as Triton's merge does, never reset).
template <class T>
AEPG_HD void rescale(RowSums<T>& sums, T m_old, T m_new) {
  const T inf = std::numeric_limits<T>::infinity();
  if (m_old == -inf) {
    const T zero(0);
    sums.t *= zero, sums.s *= zero, sums.s_other *= zero, sums.u *= zero, sums.pq *= zero;
    return;  // zs (0, -inf or NaN) is relative to no max; wq, wq_smooth are plain sums
  }
  const T d = m_old - safe_ref(m_new);
  const T f = exp_of(d);
  sums.t = f * (sums.t + d * sums.s);
  sums.s *= f, sums.s_other *= f, sums.u *= f, sums.pq *= f;
  sums.zs += d * sums.wq_smooth;
}

template <class T>
AEPG_HD void add(RowSums<T>& acc, const RowSums<T>& other) {
  acc.s += other.s, acc.t += other.t, acc.s_other += other.s_other, acc.u += other.u;
  acc.pq += other.pq, acc.zs += other.zs, acc.wq += other.wq, acc.wq_smooth += other.wq_smooth;
}

// ---- per-row results -------------------------------------------------------------------------
// Templates over V like add_element: a scalar (one row), or on the CPU a vector whose lanes are
// rows, so that the kernels evaluate these expressions once for a block of rows. Conditions on
// values are `select`s (both sides are evaluated); the flags of LossParams stay branches.
template <class T>
struct RowResults {
  T loss;           // before the ignore/out-of-range masking
  T log_s;          // log S
  T entropy;        // H(p) or NaN
  T p_target;       // p_y or sum_k q_k p_k
  T sample_weight;  // a (1-eps) w_focal + b p_y
  T aux;            // 1 - p_y, or sum_k w_k q_k p_k
  T logp_y;         // log p_y (index targets)
  T row_weight;     // w_y, or sum_k w_k q_k
};

// (1 - p)^g and the focal sample weight (1-p)^g (1 - g p log p / (1 - p)); gamma > 0.
template <class T, class V>
AEPG_HD void focal_factors(V om, V p_y, V logp_y, T gamma, V& om_pow, V& w_focal) {
  om_pow = exp2_of(V(gamma) * log2_of(om));  // om = 0 gives exp2(-inf) = 0
  const V ratio = select(om > V(T(0)), logp_y / om, V(T(-1)));
  w_focal = om_pow * (V(T(1)) - V(gamma) * p_y * ratio);
}

// log p_y from 1 - p_y (om) when p_y > 1/2: for confident rows (z_y - m) - log S would lose the
// digits of a log S close to 0; otherwise directly. zm_y = z_y - m.
template <class V>
AEPG_HD V log_p_target(V zm_y, V log_s, V om) {
  return choose(om < V(0.5f), [&] { return log1p_of(-om); }, [&] { return zm_y - log_s; });
}

// zm_y = z_y - m from the full-precision target logit, w_y the target's class weight.
// Logs are relative to m, so shifted rows (z ~ 1e4) lose nothing.
template <class T, class V>
AEPG_HD RowResults<V> row_results(const RowSums<V>& sums, V zm_y, V w_y, const LossParams<T>& p) {
  RowResults<V> r;
  r.log_s = log_of(sums.s);
  r.entropy = p.entropy ? V(r.log_s - sums.t / sums.s) : V(nan_of<T>());
  const V inv_s = V(T(1)) / sums.s;
  if (p.prob_target) {
    const V wq_total = sums.wq;
    const V ce = (V(T(1) - p.eps) * wq_total + V(p.eps / p.n_cols * p.w_total)) * r.log_s - sums.zs;
    r.aux = sums.u * inv_s;  // sum_k w_k q_k p_k
    r.p_target = sums.pq * inv_s;
    r.loss = V(p.a) * ce + V(p.b) * (wq_total - r.aux);
    if (p.entropy) r.loss = r.loss + V(p.beta) * wq_total * r.entropy;
    r.sample_weight = V(p.a * (T(1) - p.eps)) + V(p.b) * r.p_target;
    r.logp_y = V(T(0));
    r.row_weight = wq_total;
    return r;
  }
  r.aux = sums.s_other * inv_s;  // 1 - p_y, exact near p_y = 1
  r.logp_y = log_p_target(zm_y, r.log_s, r.aux);
  r.p_target = exp_of(r.logp_y);
  V ce = -r.logp_y;
  V w_focal(T(1));
  if (p.focal) {
    V om_pow;
    focal_factors(r.aux, r.p_target, r.logp_y, p.gamma, om_pow, w_focal);
    ce = om_pow * ce;
  }
  V loss = V(p.a * (T(1) - p.eps)) * ce + V(p.b) * r.aux;
  if (p.entropy) loss = loss + V(p.beta) * r.entropy;
  loss = w_y * loss;
  if (p.smoothing) loss = loss + V(p.a * p.eps / p.n_cols) * (V(p.w_total) * r.log_s - sums.zs);
  r.loss = loss;
  r.sample_weight = V(p.a * (T(1) - p.eps)) * w_focal + V(p.b) * r.p_target;
  r.row_weight = w_y;
  return r;
}

// ---- gradient --------------------------------------------------------------------------------
// index: G_k = c_p p_k - c_e p_k (log p_k + H) - c_w w_k, and G_y = g_y computed directly from
//        1 - p_y, so that the true-class term never cancels near p_y = 1.
// prob:  G_k = c_p p_k - c_e p_k (log p_k + H) - a w_k q'_k - b w_k q_k p_k.
// Every coefficient is already multiplied by the row's upstream gradient g_row.
template <class T>
struct GradCoefficients {
  T c_p, c_e, c_w, g_y, a, b, entropy;
};

// From the saved statistics: entropy, p_target, sample_weight, aux, row_weight (see RowResults).
template <class T, class V>
AEPG_HD GradCoefficients<V> grad_coefficients(V g_row, V entropy, V p_y, V logp_y, V aux, V sample_weight, V row_weight,
                                              const LossParams<T>& p) {
  GradCoefficients<V> c;
  c.entropy = entropy;
  c.a = g_row * V(p.a);
  c.b = g_row * V(p.b);
  const V zero(T(0));
  if (p.prob_target) {
    c.c_p = g_row * (V(p.a) * (V(T(1) - p.eps) * row_weight + V(p.eps / p.n_cols * p.w_total)) + V(p.b) * aux);
    c.c_e = g_row * V(p.beta) * row_weight;
    c.c_w = zero;
    c.g_y = zero;
    return c;
  }
  const V w_y = row_weight;
  const V c_w(p.a * p.eps / p.n_cols);
  const V c_e = w_y * V(p.beta);
  V g_y = -w_y * sample_weight * aux + c_w * (V(p.w_total) * p_y - w_y);
  if (p.entropy_term) g_y = g_y - c_e * select(p_y > zero, p_y * (logp_y + entropy), zero);
  c.c_p = g_row * (w_y * sample_weight + c_w * V(p.w_total));
  c.c_e = g_row * c_e;
  c.c_w = g_row * c_w;
  c.g_y = g_row * g_y;
  return c;
}

// g_row * dL/dz_k for k != y (the caller writes g_y at the target column), from p_k, log p_k,
// the class weight w_k and, for probability targets, w_k q_k and w_k q'_k.
template <class T, class V>
AEPG_HD V grad_element(V prob, V logp, V w, V wq, V wq_smooth, const GradCoefficients<T>& c, const LossParams<T>& p) {
  const V zero(T(0));
  V grad = V(c.c_p) * prob;
  if (p.entropy_term) grad = grad - V(c.c_e) * select(prob > zero, prob * (logp + V(c.entropy)), zero);
  if (p.prob_target) {
    grad = grad - (V(c.a) * wq_smooth + V(c.b) * wq * prob);
  } else if (p.smoothing) {
    grad = grad - V(c.c_w) * w;
  }
  return grad;
}

}  // namespace aepg
