// The AVX2 engine of the CPU assignment: a fused GEMM micro-kernel with an argmin epilogue, and the
// AVX2 row argmin and distance that the BLAS-tile path in kmeans_kernel.cpp uses on x86. Each
// function is compiled for AVX2 + FMA by its own target attribute, not by a file-wide -mavx2, so the
// rest of the extension still runs on any x86-64 and the dispatcher checks the CPU at run time.
// On other CPUs, or with XDC_FAST_PORTABLE_CPU, the header sets XDC_FAST_X86_ASSIGN to 0 and this
// file compiles to nothing.
#include "kmeans_assign_x86.h"

#if XDC_FAST_X86_ASSIGN

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../kmeans.h"

namespace xdc_fast {
namespace cpu {

bool avx2_assign_available() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// Ten independent chains cover the FMA latency (4 cycles) times two pipes of current cores; the
// values converge to 1, so no denormal or overflow slows them down.
__attribute__((target("avx2,fma"))) double fma_rate_avx2() {
  const __m256 m = _mm256_set1_ps(0.999f), a = _mm256_set1_ps(0.001f);
  __m256 v0 = m, v1 = m, v2 = m, v3 = m, v4 = m, v5 = m, v6 = m, v7 = m, v8 = m, v9 = m;
  constexpr int64_t kIterations = 4'000'000;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kIterations; ++i) {
    v0 = _mm256_fmadd_ps(v0, m, a); v1 = _mm256_fmadd_ps(v1, m, a); v2 = _mm256_fmadd_ps(v2, m, a);
    v3 = _mm256_fmadd_ps(v3, m, a); v4 = _mm256_fmadd_ps(v4, m, a); v5 = _mm256_fmadd_ps(v5, m, a);
    v6 = _mm256_fmadd_ps(v6, m, a); v7 = _mm256_fmadd_ps(v7, m, a); v8 = _mm256_fmadd_ps(v8, m, a);
    v9 = _mm256_fmadd_ps(v9, m, a);
    __asm__ volatile("" : "+x"(v0), "+x"(v1), "+x"(v2), "+x"(v3), "+x"(v4), "+x"(v5), "+x"(v6), "+x"(v7),
                     "+x"(v8), "+x"(v9));  // keeps the chains from being folded away
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return double(kIterations) * 10 * 8 / seconds;
}

// scores[k] holds x.c_k on entry. We overwrite it with the value to minimise (|c_k|^2 - 2 x.c_k, or
// -x.c_k for the spherical case), find the minimum, then the first index holding it: two passes
// over an L1/L2-resident row that keep "lowest index wins" exact.
__attribute__((target("avx2,fma"))) int64_t argmin_row_avx2(float* scores, const float* cnorm, int64_t K,
                                                            bool spherical) {
  int64_t k = 0;
  __m256 best = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 minus_two = _mm256_set1_ps(-2.0f);
  const __m256 zero = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 s = _mm256_loadu_ps(scores + k);
    __m256 v = spherical ? _mm256_sub_ps(zero, s) : _mm256_fmadd_ps(minus_two, s, _mm256_loadu_ps(cnorm + k));
    _mm256_storeu_ps(scores + k, v);
    best = _mm256_min_ps(best, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  float m = lanes[0];
  for (int i = 1; i < 8; ++i) m = std::min(m, lanes[i]);
  for (; k < K; ++k) {
    float v = spherical ? -scores[k] : std::fma(-2.0f, scores[k], cnorm[k]);
    scores[k] = v;
    m = std::min(m, v);
  }
  const __m256 target = _mm256_set1_ps(m);
  for (k = 0; k + 8 <= K; k += 8) {
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(scores + k), target, _CMP_EQ_OQ));
    if (mask) return k + __builtin_ctz(mask);
  }
  for (; k < K; ++k)
    if (scores[k] == m) return k;
  return 0;  // only reached when the row holds NaN: the label is then arbitrary but in range
}

__attribute__((target("avx2,fma"))) float squared_distance_avx2(const float* a, const float* b, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m256 e0 = _mm256_sub_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d));
    __m256 e1 = _mm256_sub_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8));
    acc0 = _mm256_fmadd_ps(e0, e0, acc0);
    acc1 = _mm256_fmadd_ps(e1, e1, acc1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  double sum = 0.0;
  for (float v : lanes) sum += v;
  for (; d < D; ++d) {
    double e = double(a[d]) - double(b[d]);
    sum += e * e;
  }
  return float(sum);
}

// Lanes are partial sums of squares, never above the total, so none overflows before the norm is
// over the limit; the total is taken in double, where the limit itself is exact.
__attribute__((target("avx2,fma"))) bool squared_norm_fits_avx2(const float* a, int64_t D) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const __m256 a0 = _mm256_loadu_ps(a + d), a1 = _mm256_loadu_ps(a + d + 8);
    acc0 = _mm256_fmadd_ps(a0, a0, acc0);
    acc1 = _mm256_fmadd_ps(a1, a1, acc1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(acc0, acc1));
  double sum = 0.0;
  for (float v : lanes) sum += v;
  for (; d < D; ++d) sum += double(a[d]) * double(a[d]);
  return sum <= kMaxSquaredNorm;  // false for NaN too
}

namespace {

// --- fused AVX2 assignment -----------------------------------------------------------------------
// Our own GEMM micro-kernel (5 rows x 16 centroids in 10 ymm accumulators, the centroids packed once
// per call in panels of 16) whose epilogue folds each 16-centroid panel straight into a running
// per-row, per-lane (min, index): no distance ever goes to memory and the centroids are packed once,
// not once per tile as a BLAS call must.
constexpr int kMicroRows = 5;
constexpr int kPanel = 16;
constexpr int64_t kRowsPerChunk = 160;  // rows that stream past each panel: 160 KiB at D = 256, in L2

// centroids [K, D] -> [panel][d][16], zero-padded; padded norms are +inf so padding never wins.
void pack_centroids(const float* c, const float* cnorm, int64_t K, int64_t D, bool spherical, float* packed,
                    float* norms) {
  const int64_t panels = (K + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t d = 0; d < D; ++d)
      for (int j = 0; j < kPanel; ++j) {
        const int64_t k = p * kPanel + j;
        packed[(p * D + d) * kPanel + j] = k < K ? c[k * D + d] : 0.0f;
      }
    for (int j = 0; j < kPanel; ++j) {
      const int64_t k = p * kPanel + j;
      norms[p * kPanel + j] = k < K ? (spherical ? 0.0f : cnorm[k]) : std::numeric_limits<float>::infinity();
    }
  }
}

__attribute__((target("avx2,fma"), always_inline)) inline void fold_row(__m256 acc0, __m256 acc1, __m256 scale,
                                                                          __m256 n0, __m256 n1, __m256 i0, __m256 i1,
                                                                          float* bv, float* bi) {
  const __m256 v0 = _mm256_fmadd_ps(scale, acc0, n0), v1 = _mm256_fmadd_ps(scale, acc1, n1);
  const __m256 old0 = _mm256_load_ps(bv), old1 = _mm256_load_ps(bv + 8);
  const __m256 m0 = _mm256_cmp_ps(v0, old0, _CMP_LT_OQ), m1 = _mm256_cmp_ps(v1, old1, _CMP_LT_OQ);
  _mm256_store_ps(bv, _mm256_blendv_ps(old0, v0, m0));
  _mm256_store_ps(bv + 8, _mm256_blendv_ps(old1, v1, m1));
  _mm256_store_ps(bi, _mm256_blendv_ps(_mm256_load_ps(bi), i0, m0));
  _mm256_store_ps(bi + 8, _mm256_blendv_ps(_mm256_load_ps(bi + 8), i1, m1));
}

// rows x 16 dot products over D, then value = norm + alpha * dot (alpha -2 for L2, -1 spherical)
// folded into best_value/best_index [row][16]; a lane keeps its earliest (lowest) centroid on ties.
// The ten accumulators are named variables: as an array, GCC stored them to the stack on every step
// of the D loop (seen in the disassembly), which halved the speed; with six rows (twelve
// accumulators, two centroid vectors and a broadcast) one still spilled. Five rows fit the 16 ymm
// registers of AVX2.
__attribute__((target("avx2,fma"))) void micro_fold(const float* x, int64_t ldx, int rows, const float* panel,
                                                    const float* norm, float alpha, float first_index,
                                                    int64_t D, float* best_value, float* best_index) {
  const float* x0 = x;
  const float* x1 = x + std::min(1, rows - 1) * ldx;  // short groups repeat their last row; unused
  const float* x2 = x + std::min(2, rows - 1) * ldx;
  const float* x3 = x + std::min(3, rows - 1) * ldx;
  const float* x4 = x + std::min(4, rows - 1) * ldx;
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const __m256 b0 = _mm256_load_ps(panel + d * kPanel);
    const __m256 b1 = _mm256_load_ps(panel + d * kPanel + 8);
    __m256 a = _mm256_broadcast_ss(x0 + d);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(x1 + d);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(x2 + d);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(x3 + d);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(x4 + d);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
  }
  const __m256 scale = _mm256_set1_ps(alpha);
  const __m256 n0 = _mm256_loadu_ps(norm), n1 = _mm256_loadu_ps(norm + 8);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 i0 = _mm256_add_ps(_mm256_set1_ps(first_index), lane);
  const __m256 i1 = _mm256_add_ps(_mm256_set1_ps(first_index + 8), lane);
  fold_row(c00, c01, scale, n0, n1, i0, i1, best_value, best_index);
  if (rows > 1) fold_row(c10, c11, scale, n0, n1, i0, i1, best_value + kPanel, best_index + kPanel);
  if (rows > 2) fold_row(c20, c21, scale, n0, n1, i0, i1, best_value + 2 * kPanel, best_index + 2 * kPanel);
  if (rows > 3) fold_row(c30, c31, scale, n0, n1, i0, i1, best_value + 3 * kPanel, best_index + 3 * kPanel);
  if (rows > 4) fold_row(c40, c41, scale, n0, n1, i0, i1, best_value + 4 * kPanel, best_index + 4 * kPanel);
}

// The 16 lanes of one row: the smallest value, and among lanes holding it the lowest centroid.
int64_t reduce_lanes(const float* value, const float* index) {
  float best = std::numeric_limits<float>::infinity();
  float best_index = 0.0f;
  for (int j = 0; j < kPanel; ++j) {
    if (value[j] < best || (value[j] == best && index[j] < best_index)) {
      best = value[j];
      best_index = index[j];
    }
  }
  return int64_t(best_index);
}

}  // namespace

void assign_fused_avx2(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cnorm, bool spherical,
                       int64_t* labels, float* dist, std::atomic<int64_t>* bad_rows) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = c.size(1);
  const int64_t panels = (K + kPanel - 1) / kPanel;
  at::Tensor packed = at::empty({B, panels * D * kPanel + 8}, c.options());  // +8: room to align
  at::Tensor norms = at::empty({B, panels * kPanel}, c.options());
  auto aligned = [](float* p) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 31) & ~uintptr_t(31));
  };
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      pack_centroids(c.data_ptr<float>() + b * K * D, cnorm.data_ptr<float>() + b * K, K, D, spherical,
                     aligned(packed.data_ptr<float>() + b * packed.size(1)), norms.data_ptr<float>() + b * panels * kPanel);
  });
  const float alpha = spherical ? -1.0f : -2.0f;
  const int64_t chunks_per_batch = (N + kRowsPerChunk - 1) / kRowsPerChunk;
  const float* xp = x.data_ptr<float>();
  const int64_t xsb = x.stride(0), xsn = x.stride(1);
  const float* cp = c.data_ptr<float>();

  at::parallel_for(0, B * chunks_per_batch, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) float best_value[kRowsPerChunk * kPanel];
    alignas(32) float best_index[kRowsPerChunk * kPanel];
    int64_t bad = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks_per_batch;
      const int64_t r0 = (t % chunks_per_batch) * kRowsPerChunk;
      const int64_t rows = std::min(kRowsPerChunk, N - r0);
      const float* xb = xp + b * xsb + r0 * xsn;
      const float* pb = aligned(packed.data_ptr<float>() + b * packed.size(1));
      const float* nb = norms.data_ptr<float>() + b * panels * kPanel;
      std::fill(best_value, best_value + rows * kPanel, std::numeric_limits<float>::infinity());
      std::fill(best_index, best_index + rows * kPanel, 0.0f);
      // Panel outside, rows inside: the 16 x D panel stays in L1 while the chunk's rows stream past
      // it from L2; a row still meets the panels in increasing order, as the tie rule needs.
      for (int64_t p = 0; p < panels; ++p)
        for (int64_t g = 0; g < rows; g += kMicroRows)
          micro_fold(xb + g * xsn, xsn, int(std::min<int64_t>(kMicroRows, rows - g)), pb + p * D * kPanel,
                     nb + p * kPanel, alpha, float(p * kPanel), D, best_value + g * kPanel, best_index + g * kPanel);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t best = reduce_lanes(best_value + i * kPanel, best_index + i * kPanel);
        const float* xi = xb + i * xsn;
        const float* ci = cp + (b * K + best) * D;
        labels[b * N + r0 + i] = best;
        dist[b * N + r0 + i] = spherical ? dot_exact(xi, ci, D) : squared_distance_avx2(xi, ci, D);
        if (bad_rows != nullptr && !squared_norm_fits_avx2(xi, D)) ++bad;
      }
    }
    if (bad) bad_rows->fetch_add(bad);
  });
}

}  // namespace cpu
}  // namespace xdc_fast

#endif  // XDC_FAST_X86_ASSIGN
