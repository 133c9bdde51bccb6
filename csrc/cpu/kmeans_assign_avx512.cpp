// The AVX-512 engine of the CPU assignment: the fused GEMM micro-kernel of the AVX2 engine widened to
// 512-bit vectors and 32 registers. Compiled for AVX-512F by each function's target attribute, not
// by a file-wide -mavx512f, so the extension still loads on CPUs without it and the dispatcher in
// kmeans_kernel.cpp checks the CPU at run time. Where AVX-512 executes at full width (Intel Xeon
// since Skylake-SP) it doubles the multiply-adds per cycle over AVX2; where it is split into two
// 256-bit halves (AMD Zen 4) it issues half the instructions for the same work.
// On other CPUs, or with XDC_FAST_PORTABLE_CPU, this file compiles to nothing.
#include "kmeans_assign_x86.h"

#if XDC_FAST_X86_ASSIGN

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>

#include "../kmeans.h"

namespace xdc_fast {
namespace cpu {

bool avx512_assign_available() {
  static const bool has = __builtin_cpu_supports("avx512f") && avx2_assign_available();
  return has;
}

// As fma_rate_avx2, with 512-bit vectors: twelve chains, enough for two full-width pipes.
__attribute__((target("avx512f"))) double fma_rate_avx512() {
  const __m512 m = _mm512_set1_ps(0.999f), a = _mm512_set1_ps(0.001f);
  __m512 v0 = m, v1 = m, v2 = m, v3 = m, v4 = m, v5 = m, v6 = m, v7 = m, v8 = m, v9 = m, v10 = m, v11 = m;
  constexpr int64_t kIterations = 2'000'000;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < kIterations; ++i) {
    v0 = _mm512_fmadd_ps(v0, m, a); v1 = _mm512_fmadd_ps(v1, m, a); v2 = _mm512_fmadd_ps(v2, m, a);
    v3 = _mm512_fmadd_ps(v3, m, a); v4 = _mm512_fmadd_ps(v4, m, a); v5 = _mm512_fmadd_ps(v5, m, a);
    v6 = _mm512_fmadd_ps(v6, m, a); v7 = _mm512_fmadd_ps(v7, m, a); v8 = _mm512_fmadd_ps(v8, m, a);
    v9 = _mm512_fmadd_ps(v9, m, a); v10 = _mm512_fmadd_ps(v10, m, a); v11 = _mm512_fmadd_ps(v11, m, a);
    __asm__ volatile("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3), "+v"(v4), "+v"(v5), "+v"(v6), "+v"(v7),
                     "+v"(v8), "+v"(v9), "+v"(v10), "+v"(v11));  // keeps the chains from being folded away
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return double(kIterations) * 12 * 16 / seconds;
}

namespace {

// 12 rows x 32 centroids in 24 zmm accumulators; the two centroid vectors and a broadcast take
// three more of the 32 registers. The centroids are packed once per call in panels of 32.
constexpr int kMicroRows = 12;
constexpr int kPanel = 32;
constexpr int64_t kRowsPerChunk = 192;  // rows that stream past each panel: 192 KiB at D = 256, in L2

// centroids [K, D] -> [panel][d][32], zero-padded; padded norms are +inf so padding never wins.
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

// One row's 32 values folded into its running (min, index) per lane; a strict comparison keeps a
// lane's earliest centroid on ties.
__attribute__((target("avx512f"), always_inline)) inline void fold_row(__m512 acc0, __m512 acc1, __m512 scale,
                                                                        __m512 n0, __m512 n1, __m512 i0, __m512 i1,
                                                                        float* bv, float* bi) {
  const __m512 v0 = _mm512_fmadd_ps(scale, acc0, n0), v1 = _mm512_fmadd_ps(scale, acc1, n1);
  const __m512 old0 = _mm512_load_ps(bv), old1 = _mm512_load_ps(bv + 16);
  const __mmask16 m0 = _mm512_cmp_ps_mask(v0, old0, _CMP_LT_OQ), m1 = _mm512_cmp_ps_mask(v1, old1, _CMP_LT_OQ);
  _mm512_mask_store_ps(bv, m0, v0);
  _mm512_mask_store_ps(bv + 16, m1, v1);
  _mm512_mask_store_ps(bi, m0, i0);
  _mm512_mask_store_ps(bi + 16, m1, i1);
}

// The accumulators are named variables, not an array, so that the compiler keeps them in registers
// across the D loop (with an array GCC stored them to the stack at every step of the AVX2 kernel).
#define XDC_ROW_POINTER(r) const float* x##r = x + std::min(r, rows - 1) * ldx;
#define XDC_ROW_ZERO(r) __m512 c##r##_0 = _mm512_setzero_ps(), c##r##_1 = _mm512_setzero_ps();
#define XDC_ROW_FMA(r)                           \
  {                                              \
    const __m512 a = _mm512_set1_ps(x##r[d]);    \
    c##r##_0 = _mm512_fmadd_ps(a, b0, c##r##_0); \
    c##r##_1 = _mm512_fmadd_ps(a, b1, c##r##_1); \
  }
#define XDC_ROW_FOLD(r) \
  if (r < rows) fold_row(c##r##_0, c##r##_1, scale, n0, n1, i0, i1, best_value + r * kPanel, best_index + r * kPanel);
#define XDC_FOR_ROWS(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)

// rows x 32 dot products over D, then value = norm + alpha * dot (alpha -2 for L2, -1 spherical)
// folded into best_value/best_index [row][32]. Short groups repeat their last row, whose results
// are not folded.
__attribute__((target("avx512f"))) void micro_fold(const float* x, int64_t ldx, int rows, const float* panel,
                                                   const float* norm, float alpha, float first_index, int64_t D,
                                                   float* best_value, float* best_index) {
  XDC_FOR_ROWS(XDC_ROW_POINTER)
  XDC_FOR_ROWS(XDC_ROW_ZERO)
  for (int64_t d = 0; d < D; ++d) {
    const __m512 b0 = _mm512_load_ps(panel + d * kPanel);
    const __m512 b1 = _mm512_load_ps(panel + d * kPanel + 16);
    XDC_FOR_ROWS(XDC_ROW_FMA)
  }
  const __m512 scale = _mm512_set1_ps(alpha);
  const __m512 n0 = _mm512_loadu_ps(norm), n1 = _mm512_loadu_ps(norm + 16);
  const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 i0 = _mm512_add_ps(_mm512_set1_ps(first_index), lane);
  const __m512 i1 = _mm512_add_ps(_mm512_set1_ps(first_index + 16), lane);
  XDC_FOR_ROWS(XDC_ROW_FOLD)
}

#undef XDC_ROW_POINTER
#undef XDC_ROW_ZERO
#undef XDC_ROW_FMA
#undef XDC_ROW_FOLD
#undef XDC_FOR_ROWS

// The 32 lanes of one row: the smallest value, and among lanes holding it the lowest centroid.
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

void assign_fused_avx512(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cnorm, bool spherical,
                         int64_t* labels, float* dist, std::atomic<int64_t>* bad_rows) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = c.size(1);
  const int64_t panels = (K + kPanel - 1) / kPanel;
  at::Tensor packed = at::empty({B, panels * D * kPanel + 16}, c.options());  // +16: room to align
  at::Tensor norms = at::empty({B, panels * kPanel}, c.options());
  auto aligned = [](float* p) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
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
    alignas(64) float best_value[kRowsPerChunk * kPanel];
    alignas(64) float best_index[kRowsPerChunk * kPanel];
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
      // Panel outside, rows inside, as in the AVX2 engine: a row meets the panels in increasing
      // order, as the tie rule needs.
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
