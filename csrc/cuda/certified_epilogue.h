// The epilogue of the certified tensor-core assignment (issue 12, step 3): what a wgmma kernel does with
// its fp32 accumulators once a tile of scores s = ||c~||^2 - 2 x~.c~ is in registers. Host and device
// functions alike, so the CPU tests run this very code (tests/cpp/test_certified_epilogue.cpp, driven
// by tests/test_certified_epilogue.py against xdc_fast/certified.py, the specification).
//
//  - round_significand: round-to-nearest-even of float32 to bf16/tf32, on the bits (the prologue rounds
//    x once per fit and c once per iteration with it, so the bound describes what the tensor core
//    multiplies).
//  - Top2 / fold / merge: per row the best score, its index (lowest on ties) and the second-best score,
//    folded over a thread's accumulator fragment, then merged across the threads that share a row
//    (merge is symmetric, so a butterfly of shuffles leaves every thread with the same result).
//  - score_bound / certify: the proven bound E_n(s) on the rounding error (certified.py's docstring) and
//    the test s2 - s1 > E(s1) + E(s2); a row that fails it is re-decided exactly afterwards.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define XDC_HD __host__ __device__ __forceinline__
#else
#define XDC_HD inline
#endif

namespace xdc_fast {
namespace certified {

constexpr int kDroppedBitsBf16 = 16;  // float32 keeps 23 stored significand bits, bf16 7, tf32 10
constexpr int kDroppedBitsTf32 = 13;
constexpr double kFp32UnitRoundoff = 0x1p-24;
constexpr double kHardwareAccumulationUnit = 0x1p-22;  // truncating multi-term adders (certified.py)
constexpr double kSubnormalSlackPerTerm = 0x1p-147;
constexpr double kFloat64Pad = 1.0 + 0x1p-40;

XDC_HD float round_significand(float x, int dropped_bits) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) return x;  // inf and NaN pass through
  const uint32_t half_ulp_minus_one = (1u << (dropped_bits - 1)) - 1u;
  const uint32_t kept_lsb = (magnitude >> dropped_bits) & 1u;
  // A carry out of the significand bumps the exponent, or reaches inf: both correct.
  const uint32_t rounded = ((magnitude + half_ulp_minus_one + kept_lsb) & ~((1u << dropped_bits) - 1u)) |
                           (bits & 0x80000000u);
  float out;
  std::memcpy(&out, &rounded, sizeof out);
  return out;
}

struct Top2 {
  float best;
  int index;
  float second;
  bool finite;
};

XDC_HD Top2 top2_empty() { return Top2{INFINITY, INT_MAX, INFINITY, true}; }

XDC_HD bool beats(float score, int index, const Top2& t) {
  return score < t.best || (score == t.best && index < t.index);
}

// One more score of the row, its columns in any order.
XDC_HD void fold(Top2& t, float score, int index) {
  t.finite = t.finite && std::isfinite(score);
  if (beats(score, index, t)) {
    t.second = t.best;
    t.best = score;
    t.index = index;
  } else {
    t.second = fminf(t.second, score);
  }
}

// Two partial results of one row over disjoint columns; merge(a, b) == merge(b, a).
XDC_HD Top2 merge(const Top2& a, const Top2& b) {
  const bool b_wins = beats(b.best, b.index, a);
  Top2 winner = b_wins ? b : a;
  const Top2& loser = b_wins ? a : b;
  winner.second = fminf(winner.second, loser.best);
  winner.finite = a.finite && b.finite;
  return winner;
}

// What the bound needs of a row (alpha_n >= ||x~_n - (x_n - m)||, row_sq_norm >= ||x~_n||^2) and of its
// problem (beta, max_centroid_norm = C, D and the accumulation unit u'), all rounded upward beforehand.
struct RowTerms {
  double alpha;
  double row_sq_norm;
};

struct ProblemTerms {
  double beta;
  double max_centroid_norm;
  int d;
  double accumulation_unit;
};

XDC_HD double gamma(int n, double unit) {
  const double nu = static_cast<double>(n) * unit;
  return nu >= 1.0 ? INFINITY : nu / (1.0 - nu);
}

// E_n(s): |s + ||x~_n||^2 - ||x_n - c_k||^2| <= E_n(s) for the score s of any centroid of row n.
// The same float64 operations in the same order as certified.score_error_bound.
XDC_HD double score_bound(double s, const RowTerms& row, const ProblemTerms& problem) {
  const double g = gamma(problem.d, problem.accumulation_unit);
  const double c = problem.max_centroid_norm;
  const double products = c * c + 2.0 * std::sqrt(row.row_sq_norm) * c;
  const double accumulation = (g + kFp32UnitRoundoff * (1.0 + g)) * products +
                              static_cast<double>(problem.d) * kSubnormalSlackPerTerm;
  const double eta = row.alpha + problem.beta;
  const double estimate = ((0.0 + s) + row.row_sq_norm + accumulation) +
                          0x1p-50 * ((0.0 + std::fabs(s)) + std::fabs(row.row_sq_norm) + std::fabs(accumulation));
  const double root = std::sqrt(fmax(estimate, 4.0 * (eta * eta)));
  return (2.0 * eta * root + eta * eta + accumulation) * kFloat64Pad;
}

// Whether the tensor core's winner of the row is provably the exact one; *bound gets E(s1) + E(s2)
// (E(s1) when k == 1), what s2 - s1 had to exceed.
XDC_HD bool certify(const Top2& t, const RowTerms& row, const ProblemTerms& problem, int k, double* bound) {
  const double bound_best = score_bound(t.best, row, problem);
  if (k == 1) {
    *bound = bound_best;
    return t.finite;
  }
  *bound = bound_best + score_bound(t.second, row, problem);
  return t.finite && (static_cast<double>(t.second) - static_cast<double>(t.best)) > *bound;
}

}  // namespace certified
}  // namespace xdc_fast
