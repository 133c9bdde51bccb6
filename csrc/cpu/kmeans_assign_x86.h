// The x86 engines of the CPU k-means assignment as the dispatcher in kmeans_kernel.cpp sees them: the
// AVX2 + FMA engine (kmeans_assign_avx2.cpp) and the AVX-512 one (kmeans_assign_avx512.cpp). Each is
// compiled function by function for its own instruction set, so one build serves every x86-64 CPU and
// the dispatcher picks by what the running CPU has. Other CPUs (Grace, Graviton) have no
// <immintrin.h>, and a build with XDC_FAST_PORTABLE_CPU defined shows on x86 that the portable engine
// compiles alone: in both cases the engines' files compile to nothing and neither is available.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(XDC_FAST_PORTABLE_CPU)
#define XDC_FAST_X86_ASSIGN 1
#else
#define XDC_FAST_X86_ASSIGN 0
#endif

#include <atomic>
#include <cstdint>

#if XDC_FAST_X86_ASSIGN
#include <ATen/core/Tensor.h>
#endif

namespace xdc_fast {
namespace cpu {

// The spherical "distance" reported is the dot product itself, summed in float64 so that it does not
// depend on which engine found the label.
inline float dot_exact(const float* a, const float* b, int64_t D) {
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) sum += double(a[d]) * double(b[d]);
  return float(sum);
}

#if XDC_FAST_X86_ASSIGN

// Whether the running CPU has AVX2 and FMA / AVX-512F (each checked once).
bool avx2_assign_available();
bool avx512_assign_available();

// Labels and distances of every row of x [B, N, D] (float32, unit stride inside a row) against the
// centroids c [B, K, D] (float32, contiguous) with their squared norms cnorm [B, K]; K < 2^24,
// because lane indices are carried as floats. Lowest index wins on exact ties. Unless bad_rows is
// null, the rows whose squared norm is not a finite float32 are counted into it (see kmeans.h).
// Both engines sum each dot product in the same order with the same fused multiply-adds, so they
// return the same labels and distances bit for bit.
void assign_fused_avx2(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cnorm, bool spherical,
                       int64_t* labels, float* dist, std::atomic<int64_t>* bad_rows);
void assign_fused_avx512(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cnorm, bool spherical,
                         int64_t* labels, float* dist, std::atomic<int64_t>* bad_rows);

// The BLAS path's per-row helpers; same contract as their scalar twins in kmeans_kernel.cpp. The
// AVX-512 engine uses them too: every CPU with AVX-512 has AVX2.
int64_t argmin_row_avx2(float* scores, const float* cnorm, int64_t K, bool spherical);
float squared_distance_avx2(const float* a, const float* b, int64_t D);
bool squared_norm_fits_avx2(const float* a, int64_t D);

// Fused multiply-adds per second that one thread sustains in registers with this engine's vectors:
// the ceiling its micro-kernel can approach (a few milliseconds of work).
double fma_rate_avx2();
double fma_rate_avx512();

#else

inline bool avx2_assign_available() { return false; }
inline bool avx512_assign_available() { return false; }

#endif

}  // namespace cpu
}  // namespace xdc_fast
