// The op's contract, mirrored from aepg_kernels/_contract.py (the tests compare the values, which
// aepg_kernels._C exports): the rows of the statistics tensor, the positions in the `scalars`
// list of a call, and the bits of its `flags` word.
#pragma once

namespace aepg {

// Rows of the (kNumStats, n_rows) statistics tensor (_contract.Stat).
enum Stat : int {
  kLse = 0,           // log-sum-exp of the row
  kEntropy = 1,       // H(p), NaN when not asked for
  kPTarget = 2,       // p_y, or sum_k q_k p_k for probability targets
  kSampleWeight = 3,  // the per-row factor of (p - e_y) in the gradient
  kRowWeight = 4,     // w_y for a counted row (0 when ignored); sum_k w_k q_k for probabilities
  kAux = 5,           // 1 - p_y, accurate near p_y = 1; sum_k w_k q_k p_k for probabilities
  kRowMax = 6,        // the row max m (0 for a row of -inf)
  kLogSum = 7,        // log S = log sum_k exp(z_k - m)
  kNumStats = 8,
};

// Positions in the `scalars` list (_contract.Scalar).
enum Scalar : int {
  kCeWeight = 0,        // a, when not given as a 0-d tensor
  kEpgWeight = 1,       // b, when not given as a 0-d tensor
  kEntropyWeight = 2,   // beta
  kLabelSmoothing = 3,  // eps
  kFocalGamma = 4,      // gamma
  kNumScalars = 5,
};

// Bits of the `flags` word (_contract.Flag); the low two hold the reduction (at::Reduction).
enum Flag : int {
  kReductionMask = 3,
  kProbTarget = 4,
  kNeedEntropy = 8,
  kWriteGrad = 16,
  kEpgOneMinusCe = 32,  // b = 1 - a, a the CE weight tensor
};

enum ReductionKind : int { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

}  // namespace aepg
