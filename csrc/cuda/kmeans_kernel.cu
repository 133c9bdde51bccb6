// CUDA kernels of the k-means ops.
//
// Assignment: a tiled fp32 GEMM (128 rows x 128 centroids per step, 8 x 8 per thread) whose epilogue
// folds each centroid tile into a running (min, index) per row held in registers; the N x K matrix
// never leaves the chip. The 16 threads sharing a row reduce with warp shuffles at the end, lowest
// index winning exact ties, and a second small kernel recomputes the winner's distance directly.
//
// Update: labels are sorted once per call, so each cluster's rows are contiguous; a warp walks 32
// sorted rows with one lane per column and adds into global memory once per run of equal labels.
// A hot cluster is thereby spread over many warps (no serialisation on it), and atomics happen only
// at run boundaries: at most one per 32 rows and column.
// ATen/cuda/CUDAContext.h is avoided on purpose: it pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit lacks, and minutes of compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <climits>

#include "../kmeans.h"

namespace xdc_fast {
namespace {

// Assignment tile: 128 rows x 128 centroids per step, 8 feature dimensions per shared-memory
// stage (double-buffered), 256 threads each owning 8 rows x 8 centroids, split in two groups of 4
// 64 apart so that every shared-memory read is a float4 and no bank is shared.
constexpr int kTileRows = 128;
constexpr int kTileCentroids = 128;
constexpr int kTileDepth = 8;
constexpr int kThreads = 256;

__device__ __forceinline__ void keep_better(float& best, int& index, float other, int other_index) {
  if (other < best || (other == best && other_index < index)) {
    best = other;
    index = other_index;
  }
}

// Four consecutive dimensions [d, d + 4) of one row of a row-major operand, zero outside the
// operand. kVector: the row stride and D are multiples of 4 and the base is 16-byte aligned, so the
// four values are one aligned float4 that lies either wholly inside or wholly past D.
template <bool kVector>
__device__ __forceinline__ float4 load_four(const float* __restrict__ base, int64_t rows_left, int64_t row_stride,
                                            int row, int d, int D) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  if (row < rows_left) {
    const float* p = base + row * row_stride + d;
    if (kVector) {
      if (d < D) v = __ldg(reinterpret_cast<const float4*>(p));
    } else {
      if (d < D) v.x = __ldg(p);
      if (d + 1 < D) v.y = __ldg(p + 1);
      if (d + 2 < D) v.z = __ldg(p + 2);
      if (d + 3 < D) v.w = __ldg(p + 3);
    }
  }
  return v;
}

__device__ __forceinline__ void store_transposed(float (*tile)[kTileRows], int row, int d, float4 v) {
  tile[d][row] = v.x;
  tile[d + 1][row] = v.y;
  tile[d + 2][row] = v.z;
  tile[d + 3][row] = v.w;
}

template <bool kSpherical, bool kVector>
__global__ void __launch_bounds__(kThreads, 1)
    assign_kernel(const float* __restrict__ x, const float* __restrict__ c, const float* __restrict__ cnorm,
                  int64_t* __restrict__ labels, int64_t N, int D, int K, int64_t x_batch_stride,
                  int64_t x_row_stride) {
  __shared__ __align__(16) float xs[2][kTileDepth][kTileRows];
  __shared__ __align__(16) float cs[2][kTileDepth][kTileCentroids];

  const int b = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kTileRows;
  const int64_t rows_left = N - row0;
  const float* xb = x + b * x_batch_stride + row0 * x_row_stride;
  const float* cb = c + int64_t(b) * K * D;
  const float* nb = cnorm + int64_t(b) * K;
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;
  // Each thread stages four dimensions of one row of each operand per stage.
  const int load_row = tid / 2, load_d = (tid % 2) * 4;

  float best[8];
  int best_index[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    best[i] = FLT_MAX;
    best_index[i] = INT_MAX;
  }

  for (int k0 = 0; k0 < K; k0 += kTileCentroids) {
    const float* ck = cb + int64_t(k0) * D;
    const int64_t centroids_left = K - k0;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    float4 x_next = load_four<kVector>(xb, rows_left, x_row_stride, load_row, load_d, D);
    float4 c_next = load_four<kVector>(ck, centroids_left, D, load_row, load_d, D);
    store_transposed(xs[0], load_row, load_d, x_next);
    store_transposed(cs[0], load_row, load_d, c_next);
    __syncthreads();

    int stage = 0;
    for (int d0 = 0; d0 < D; d0 += kTileDepth) {
      const bool more = d0 + kTileDepth < D;
      if (more) {  // the next stage's global loads fly while this stage computes
        x_next = load_four<kVector>(xb, rows_left, x_row_stride, load_row, d0 + kTileDepth + load_d, D);
        c_next = load_four<kVector>(ck, centroids_left, D, load_row, d0 + kTileDepth + load_d, D);
      }
#pragma unroll
      for (int dd = 0; dd < kTileDepth; ++dd) {
        const float4 a0 = *reinterpret_cast<const float4*>(&xs[stage][dd][ty * 4]);
        const float4 a1 = *reinterpret_cast<const float4*>(&xs[stage][dd][64 + ty * 4]);
        const float4 w0 = *reinterpret_cast<const float4*>(&cs[stage][dd][tx * 4]);
        const float4 w1 = *reinterpret_cast<const float4*>(&cs[stage][dd][64 + tx * 4]);
        const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float wv[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
      }
      if (more) {
        // The other buffer was last read before the previous barrier: safe to overwrite.
        store_transposed(xs[stage ^ 1], load_row, load_d, x_next);
        store_transposed(cs[stage ^ 1], load_row, load_d, c_next);
      }
      __syncthreads();
      stage ^= 1;
    }

    // Epilogue: fold this centroid tile into the running argmin. A thread meets its centroids in
    // increasing order (j < 4 below 64 + ...), so a strict comparison keeps the lowest index.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int centroid = k0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
      if (centroid < K) {
        const float norm = kSpherical ? 0.0f : __ldg(nb + centroid);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float value = kSpherical ? -acc[i][j] : fmaf(-2.0f, acc[i][j], norm);
          if (value < best[i]) {
            best[i] = value;
            best_index[i] = centroid;
          }
        }
      }
    }
  }

  // The 16 threads sharing rows (same ty) are 16 consecutive lanes of one warp.
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int offset = 8; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best[i], offset, 16);
      const int other_index = __shfl_xor_sync(0xffffffffu, best_index[i], offset, 16);
      keep_better(best[i], best_index[i], other, other_index);
    }
    const int64_t row = row0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
    if (tx == 0 && row < N) {
      // INT_MAX survives only when every value was NaN: any in-range label will do then.
      labels[int64_t(b) * N + row] = best_index[i] == INT_MAX ? 0 : best_index[i];
    }
  }
}

// One warp per row: the distance (or inner product) to the chosen centroid, computed directly. Unless
// bad_rows is null, the rows whose squared norm is not a finite float32 are counted into it (the
// check_finite of kmeans.h), from the row as it streams past: no pass of its own over x. Partial sums
// of squares never exceed the total, so the float sum reaches the limit only when the norm does.
template <bool kSpherical>
__global__ void winner_distance_kernel(const float* __restrict__ x, const float* __restrict__ c,
                                       const int64_t* __restrict__ labels, float* __restrict__ dist, int64_t B,
                                       int64_t N, int D, int K, int64_t x_batch_stride, int64_t x_row_stride,
                                       unsigned long long* __restrict__ bad_rows) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t item = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; item < B * N; item += warps) {
    const int64_t b = item / N, n = item % N;
    const float* xr = x + b * x_batch_stride + n * x_row_stride;
    const float* cr = c + (b * K + labels[item]) * D;
    float sum = 0.0f;
    float norm = 0.0f;
    for (int d = lane; d < D; d += 32) {
      if (kSpherical) {
        sum = fmaf(xr[d], cr[d], sum);
      } else {
        const float e = xr[d] - cr[d];
        sum = fmaf(e, e, sum);
      }
      norm = fmaf(xr[d], xr[d], norm);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      norm += __shfl_xor_sync(0xffffffffu, norm, offset);
    }
    if (lane == 0) {
      dist[item] = sum;
      if (bad_rows != nullptr && !(norm <= float(kMaxSquaredNorm))) atomicAdd(bad_rows, 1ull);  // NaN too
    }
  }
}

constexpr int kUpdateRowsPerWarp = 32;
constexpr int kUpdateWarps = 8;

__global__ void __launch_bounds__(32 * kUpdateWarps)
    update_kernel(const float* __restrict__ x, const int64_t* __restrict__ sorted_labels,
                  const int64_t* __restrict__ order, float* __restrict__ sums, int64_t* __restrict__ counts, int64_t N,
                  int D, int64_t K, int64_t x_batch_stride, int64_t x_row_stride) {
  const int b = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int d = blockIdx.y * 32 + lane;
  const int64_t begin = (int64_t(blockIdx.x) * kUpdateWarps + warp) * kUpdateRowsPerWarp;
  if (begin >= N) return;
  const int64_t end = min(begin + kUpdateRowsPerWarp, N);
  const int64_t* lb = sorted_labels + int64_t(b) * N;
  const int64_t* ob = order + int64_t(b) * N;
  const float* xb = x + b * x_batch_stride;
  float* sb = sums + int64_t(b) * K * D;
  const bool counts_here = blockIdx.y == 0 && lane == 0;

  int64_t current = lb[begin];
  int64_t run_start = begin;
  float acc = 0.0f;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t label = lb[r];
    if (label != current) {
      if (d < D) atomicAdd(&sb[current * D + d], acc);
      if (counts_here) atomicAdd(reinterpret_cast<unsigned long long*>(&counts[int64_t(b) * K + current]),
                                 static_cast<unsigned long long>(r - run_start));
      acc = 0.0f;
      current = label;
      run_start = r;
    }
    if (d < D) acc += xb[ob[r] * x_row_stride + d];
  }
  if (d < D) atomicAdd(&sb[current * D + d], acc);
  if (counts_here) atomicAdd(reinterpret_cast<unsigned long long*>(&counts[int64_t(b) * K + current]),
                             static_cast<unsigned long long>(end - run_start));
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cuda(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                                      bool spherical, bool check_finite) {
  auto [x3, c3] = check_assign_inputs(x_in, centroids_in);
  c10::cuda::CUDAGuard guard(x3.device());
  at::Tensor x = float_rows(x3);
  at::Tensor c = c3.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = c.size(1);
  TORCH_CHECK_VALUE(K < INT_MAX && D < INT_MAX, "kmeans_assign: K and D should be below 2^31, got K = ", num(K),
                    " and D = ", num(D));
  TORCH_CHECK_VALUE(B <= 65535, "kmeans_assign: the CUDA kernel handles at most 65535 problems per call, got B = ", num(B));
  at::Tensor labels = at::empty({B, N}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (N == 0) return squeeze_if_2d(x_in, labels, dist);

  at::Tensor cnorm64 = c.to(at::kDouble).pow(2).sum(-1);
  if (check_finite && !cnorm64.le(kMaxSquaredNorm).all().item<bool>())
    throw_not_finite("kmeans_assign", x_in, centroids_in);
  at::Tensor cnorm = cnorm64.to(at::kFloat).contiguous();
  at::Tensor bad_rows = check_finite ? at::zeros({1}, x.options().dtype(at::kLong)) : at::Tensor();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid((N + kTileRows - 1) / kTileRows, B);
  const bool vector = D % 4 == 0 && x.stride(1) % 4 == 0 && x.stride(0) % 4 == 0 &&
                      reinterpret_cast<uintptr_t>(x.data_ptr<float>()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(c.data_ptr<float>()) % 16 == 0;
  auto launch_assign = spherical ? (vector ? assign_kernel<true, true> : assign_kernel<true, false>)
                                 : (vector ? assign_kernel<false, true> : assign_kernel<false, false>);
  launch_assign<<<grid, kThreads, 0, stream>>>(x.data_ptr<float>(), c.data_ptr<float>(), cnorm.data_ptr<float>(),
                                               labels.data_ptr<int64_t>(), N, int(D), int(K), x.stride(0),
                                               x.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t warps_needed = B * N;
  const int blocks = int(std::min<int64_t>((warps_needed + 7) / 8, 65535 * 8));
  auto launch_distance = spherical ? winner_distance_kernel<true> : winner_distance_kernel<false>;
  launch_distance<<<blocks, 256, 0, stream>>>(
      x.data_ptr<float>(), c.data_ptr<float>(), labels.data_ptr<int64_t>(), dist.data_ptr<float>(), B, N, int(D),
      int(K), x.stride(0), x.stride(1),
      check_finite ? reinterpret_cast<unsigned long long*>(bad_rows.data_ptr<int64_t>()) : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The read-back waits for the kernels, as the separate check's reduction did before.
  if (check_finite && bad_rows.item<int64_t>() > 0) throw_not_finite("kmeans_assign", x_in, centroids_in);
  return squeeze_if_2d(x_in, labels, dist);
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cuda(const at::Tensor& x_in, const at::Tensor& labels_in,
                                                      int64_t k) {
  auto [x3, l2] = check_update_inputs(x_in, labels_in, k);
  c10::cuda::CUDAGuard guard(x3.device());
  at::Tensor x = float_rows(x3);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = k;
  TORCH_CHECK_VALUE(D < INT_MAX, "kmeans_update: D should be below 2^31, got ", num(D));
  TORCH_CHECK_VALUE(B <= 65535, "kmeans_update: the CUDA kernel handles at most 65535 problems per call, got B = ", num(B));
  at::Tensor sums = at::zeros({B, K, D}, x.options().dtype(at::kFloat));
  at::Tensor counts = at::zeros({B, K}, l2.options());
  if (N == 0) return squeeze_if_2d(x_in, sums, counts);

  auto [sorted, order] = at::sort(l2.contiguous(), /*stable=*/true, /*dim=*/1, /*descending=*/false);
  // Sorted, so each problem's extremes are its first and last labels: one small read-back.
  at::Tensor ends = at::stack({sorted.select(1, 0).min(), sorted.select(1, N - 1).max()}).cpu();
  const int64_t lowest = ends[0].item<int64_t>(), highest = ends[1].item<int64_t>();
  TORCH_CHECK_VALUE(lowest >= 0 && highest < K, "kmeans_update: labels should lie in [0, k) = [0, ", num(K),
                    "), got ", num(lowest < 0 ? lowest : highest));

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows_per_block = int64_t(kUpdateWarps) * kUpdateRowsPerWarp;
  const dim3 grid((N + rows_per_block - 1) / rows_per_block, (D + 31) / 32, B);
  TORCH_CHECK_VALUE(grid.y <= 65535, "kmeans_update: D should be at most ", num(65535 * 32), ", got ", num(D));
  update_kernel<<<grid, 32 * kUpdateWarps, 0, stream>>>(x.data_ptr<float>(), sorted.data_ptr<int64_t>(),
                                                          order.data_ptr<int64_t>(), sums.data_ptr<float>(),
                                                          counts.data_ptr<int64_t>(), N, int(D), K, x.stride(0),
                                                          x.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return squeeze_if_2d(x_in, sums, counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(xdc_fast, CUDA, m) {
  m.impl("kmeans_assign", &kmeans_assign_cuda);
  m.impl("kmeans_update", &kmeans_update_cuda);
}

}  // namespace xdc_fast
