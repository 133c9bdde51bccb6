// The x86 AVX2 engine of the CPU k-means assignment (kmeans_assign_avx2.cpp) as the dispatcher in
// kmeans_kernel.cpp sees it. Other CPUs (Grace, Graviton) have neither AVX2 nor <immintrin.h>, and a
// build with XDC_FAST_PORTABLE_CPU defined shows on x86 that the portable engine compiles alone: in
// both cases the engine's file compiles to nothing and avx2_assign_available() is false.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(XDC_FAST_PORTABLE_CPU)
#define XDC_FAST_AVX2_ASSIGN 1
#else
#define XDC_FAST_AVX2_ASSIGN 0
#endif

#include <atomic>
#include <cstdint>

#if XDC_FAST_AVX2_ASSIGN
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

#if XDC_FAST_AVX2_ASSIGN

// Whether the CPU running this build has AVX2 and FMA (checked once).
bool avx2_assign_available();

// Labels and distances of every row of x [B, N, D] (float32, unit stride inside a row) against the
// centroids c [B, K, D] (float32, contiguous) with their squared norms cnorm [B, K]; K < 2^24,
// because lane indices are carried as floats. Lowest index wins on exact ties. Unless bad_rows is
// null, the rows whose squared norm is not a finite float32 are counted into it (see kmeans.h).
void assign_fused_avx2(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cnorm, bool spherical,
                       int64_t* labels, float* dist, std::atomic<int64_t>* bad_rows);

// The BLAS path's per-row helpers; same contract as their scalar twins in kmeans_kernel.cpp.
int64_t argmin_row_avx2(float* scores, const float* cnorm, int64_t K, bool spherical);
float squared_distance_avx2(const float* a, const float* b, int64_t D);
bool squared_norm_fits_avx2(const float* a, int64_t D);

#else

inline bool avx2_assign_available() { return false; }

#endif

}  // namespace cpu
}  // namespace xdc_fast
