// CUDA kernels of the k-means ops.
//
// Assignment: a tiled fp32 GEMM (64 rows x 64 centroids per step, 4 x 4 per thread) whose epilogue
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

constexpr int kTileRows = 64;        // rows of x per block
constexpr int kTileCentroids = 64;   // centroids per inner step
constexpr int kTileDepth = 16;       // feature dimensions per shared-memory stage
constexpr int kThreads = 256;        // 16 x 16 threads, each owning 4 rows x 4 centroids
constexpr int kPad = 4;              // keeps the transposed tiles' rows 16-byte aligned and spreads banks

__device__ __forceinline__ void keep_better(float& best, int& index, float other, int other_index) {
  if (other < best || (other == best && other_index < index)) {
    best = other;
    index = other_index;
  }
}

template <bool kSpherical>
__global__ void __launch_bounds__(kThreads) assign_kernel(const float* __restrict__ x, const float* __restrict__ c,
                                                          const float* __restrict__ cnorm,
                                                          int64_t* __restrict__ labels, int64_t N, int D, int K,
                                                          int64_t x_batch_stride, int64_t x_row_stride) {
  __shared__ __align__(16) float xs[kTileDepth][kTileRows + kPad];
  __shared__ __align__(16) float cs[kTileDepth][kTileCentroids + kPad];

  const int b = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kTileRows;
  const float* xb = x + b * x_batch_stride;
  const float* cb = c + int64_t(b) * K * D;
  const float* nb = cnorm + int64_t(b) * K;
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;

  float best[4];
  int best_index[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = FLT_MAX;
    best_index[i] = INT_MAX;
  }

  for (int k0 = 0; k0 < K; k0 += kTileCentroids) {
    float acc[4][4] = {};
    for (int d0 = 0; d0 < D; d0 += kTileDepth) {
      // 64 x 16 elements of each operand, 4 per thread; consecutive threads read consecutive
      // dimensions of one row, so the global loads coalesce.
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int e = tid + i * kThreads;
        const int r = e / kTileDepth, dd = e % kTileDepth;
        const int64_t row = row0 + r;
        const int d = d0 + dd;
        xs[dd][r] = (row < N && d < D) ? xb[row * x_row_stride + d] : 0.0f;
        const int centroid = k0 + r;
        cs[dd][r] = (centroid < K && d < D) ? cb[int64_t(centroid) * D + d] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < kTileDepth; ++dd) {
        const float4 a = *reinterpret_cast<const float4*>(&xs[dd][ty * 4]);
        const float4 w = *reinterpret_cast<const float4*>(&cs[dd][tx * 4]);
        const float av[4] = {a.x, a.y, a.z, a.w};
        const float wv[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Epilogue: fold this centroid tile into the running argmin. Within a thread centroids come in
    // increasing order, so a strict comparison keeps the lowest index on ties.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int centroid = k0 + tx * 4 + j;
      if (centroid < K) {
        const float norm = kSpherical ? 0.0f : nb[centroid];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float value = kSpherical ? -acc[i][j] : fmaf(-2.0f, acc[i][j], norm);
          if (value < best[i]) {
            best[i] = value;
            best_index[i] = centroid;
          }
        }
      }
    }
  }

  // The 16 threads of a row group are 16 consecutive lanes of one warp.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int offset = 8; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best[i], offset, 16);
      const int other_index = __shfl_xor_sync(0xffffffffu, best_index[i], offset, 16);
      keep_better(best[i], best_index[i], other, other_index);
    }
    const int64_t row = row0 + ty * 4 + i;
    if (tx == 0 && row < N) {
      // INT_MAX survives only when every value was NaN: any in-range label will do then.
      labels[int64_t(b) * N + row] = best_index[i] == INT_MAX ? 0 : best_index[i];
    }
  }
}

// One warp per row: the distance (or inner product) to the chosen centroid, computed directly.
template <bool kSpherical>
__global__ void winner_distance_kernel(const float* __restrict__ x, const float* __restrict__ c,
                                       const int64_t* __restrict__ labels, float* __restrict__ dist, int64_t B,
                                       int64_t N, int D, int K, int64_t x_batch_stride, int64_t x_row_stride) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t item = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; item < B * N; item += warps) {
    const int64_t b = item / N, n = item % N;
    const float* xr = x + b * x_batch_stride + n * x_row_stride;
    const float* cr = c + (b * K + labels[item]) * D;
    float sum = 0.0f;
    for (int d = lane; d < D; d += 32) {
      if (kSpherical) {
        sum = fmaf(xr[d], cr[d], sum);
      } else {
        const float e = xr[d] - cr[d];
        sum = fmaf(e, e, sum);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) dist[item] = sum;
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

at::Tensor float_rows(const at::Tensor& t) {
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  return f.stride(-1) == 1 && f.stride(-2) >= f.size(-1) ? f : f.contiguous();
}

std::tuple<at::Tensor, at::Tensor> squeeze_if_2d(const at::Tensor& like, at::Tensor a, at::Tensor b) {
  if (like.dim() == 2) return {a.squeeze(0), b.squeeze(0)};
  return {a, b};
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cuda(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                                      bool spherical) {
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

  at::Tensor cnorm = c.to(at::kDouble).pow(2).sum(-1).to(at::kFloat).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid((N + kTileRows - 1) / kTileRows, B);
  auto launch_assign = spherical ? assign_kernel<true> : assign_kernel<false>;
  launch_assign<<<grid, kThreads, 0, stream>>>(x.data_ptr<float>(), c.data_ptr<float>(), cnorm.data_ptr<float>(),
                                               labels.data_ptr<int64_t>(), N, int(D), int(K), x.stride(0),
                                               x.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t warps_needed = B * N;
  const int blocks = int(std::min<int64_t>((warps_needed + 7) / 8, 65535 * 8));
  auto launch_distance = spherical ? winner_distance_kernel<true> : winner_distance_kernel<false>;
  launch_distance<<<blocks, 256, 0, stream>>>(x.data_ptr<float>(), c.data_ptr<float>(), labels.data_ptr<int64_t>(),
                                              dist.data_ptr<float>(), B, N, int(D), int(K), x.stride(0),
                                              x.stride(1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
