// Checks the online statistics of policy_loss_math.h that only the CUDA streamed forward uses
// (rescale when the running max moves, merge of partial sums at the row max) against the direct
// one-pass sums the CPU kernels use, in double: every row split among "threads" that stream
// their columns in blocks, as forward_streamed_kernel does. Prints "ok" or the first mismatch.
#include "policy_loss_math.h"

#include <cstdio>
#include <vector>

using aepg::RowSums;

static unsigned long long state = 12345;
static double uniform() {  // deterministic, no <random> differences between libraries
  state = state * 6364136223846793005ULL + 1442695040888963407ULL;
  return double(state >> 11) / double(1ULL << 53);
}

static bool close(double a, double b) {
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= 1e-11 * (1 + std::fabs(b));
}

int main() {
  const double inf = std::numeric_limits<double>::infinity();
  for (int trial = 0; trial < 200; ++trial) {
    const int n = 1 + int(uniform() * 300), threads = 1 + int(uniform() * 7), block = 1 + int(uniform() * 5);
    const int y = int(uniform() * n);
    aepg::LossParams<double> p{};
    p.prob_target = trial % 3 == 1;
    p.smoothing = trial % 2 == 0;
    p.entropy = true;
    p.eps = p.smoothing ? 0.1 : 0.0;
    p.n_cols = n;
    const double shift = trial % 5 == 0 ? 1e4 : 0.0;
    std::vector<double> z(n), w(n), q(n);
    for (int k = 0; k < n; ++k) {
      z[k] = shift + 4 * (uniform() - 0.5) + (k == n / 2 && trial % 4 == 0 ? 9.0 : 0.0);
      if (trial % 7 == 3 && k % 5 == 1 && k != y) z[k] = -inf;  // masked classes
      if (trial % 11 == 5 && k < block) z[k] = std::numeric_limits<double>::quiet_NaN();  // a NaN-only block
      w[k] = 0.25 + uniform();
      q[k] = uniform() / n;
    }
    auto targets = [&](int k, double& qk, double& wq, double& wq_smooth) {
      qk = p.prob_target ? q[k] : w[k];
      wq = p.prob_target ? w[k] * q[k] : w[k];
      wq_smooth = p.prob_target ? (1 - p.eps) * wq + p.eps / n * w[k] : w[k];
      if (!p.prob_target && !p.smoothing) wq_smooth = 0;  // as the kernels: zs unused
    };
    // Direct: max first, then every element relative to it.
    double m = -inf;
    for (double v : z) m = v > m ? v : m;
    auto direct = RowSums<double>::zero();
    for (int k = 0; k < n; ++k) {
      double qk, wq, ws;
      targets(k, qk, wq, ws);
      const double zm = z[k] - m;
      aepg::add_element(direct, zm, aepg::exp_of(zm), qk, wq, ws, k != y, p);
    }
    // Streamed: thread t takes blocks t, t + threads, ... with a running max, then merge.
    std::vector<double> maxima(threads, -inf);
    std::vector<RowSums<double>> parts(threads, RowSums<double>::zero());
    for (int t = 0; t < threads; ++t) {
      for (int b0 = t * block; b0 < n; b0 += threads * block) {
        double m_new = maxima[t];
        for (int k = b0; k < b0 + block && k < n; ++k) m_new = z[k] > m_new ? z[k] : m_new;
        if (m_new > maxima[t]) {
          aepg::rescale(parts[t], maxima[t], m_new);
          maxima[t] = m_new;
        }
        const double ref = aepg::safe_ref(maxima[t]);
        for (int k = b0; k < b0 + block && k < n; ++k) {
          double qk, wq, ws;
          targets(k, qk, wq, ws);
          const double zm = z[k] - ref;
          aepg::add_element(parts[t], zm, aepg::exp_of(zm), qk, wq, ws, k != y, p);
        }
      }
    }
    double m_row = -inf;
    for (double v : maxima) m_row = v > m_row ? v : m_row;
    auto merged = RowSums<double>::zero();
    for (int t = 0; t < threads; ++t) {
      aepg::rescale(parts[t], maxima[t], m_row);
      aepg::add(merged, parts[t]);
    }
    const double got[] = {merged.s,  merged.t,  merged.s_other, merged.u,
                          merged.pq, merged.zs, merged.wq,      merged.wq_smooth};
    const double want[] = {direct.s,  direct.t,  direct.s_other, direct.u,
                           direct.pq, direct.zs, direct.wq,      direct.wq_smooth};
    if (std::isnan(direct.s)) {  // a NaN logit: S must stay NaN (T may or may not; H is NaN either way)
      if (!std::isnan(merged.s)) {
        std::printf("trial %d: a NaN logit was lost, S = %.17g (n=%d threads=%d block=%d)\n", trial, merged.s, n,
                    threads, block);
        return 1;
      }
      continue;
    }
    for (int f = 0; f < 8; ++f) {
      if (!close(got[f], want[f])) {
        std::printf("trial %d field %d: merged %.17g direct %.17g (n=%d threads=%d block=%d)\n", trial, f, got[f],
                    want[f], n, threads, block);
        return 1;
      }
    }
  }
  std::printf("ok\n");
  return 0;
}
