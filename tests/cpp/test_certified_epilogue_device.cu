// The certified epilogue on a GPU: the "tile" mode of test_certified_epilogue.cpp, with the fold, the
// shuffles and the certification done by a warpgroup per 64 rows, as in the tensor-core kernel.
//   test_certified_epilogue_device tile IN OUT   (formats: certified_epilogue_io.h)
// Built here by tests/test_certified_epilogue.py as a compile gate (sm_90a, no register spills); run
// there only where a GPU is.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "certified_epilogue_io.h"
#include "cuda/certified_epilogue.h"

using namespace xdc_fast::certified;

namespace {

__device__ Top2 shuffle_xor(const Top2& t, int mask) {
  constexpr unsigned kAll = 0xFFFFFFFFu;
  Top2 other;
  other.best = __shfl_xor_sync(kAll, t.best, mask);
  other.index = __shfl_xor_sync(kAll, t.index, mask);
  other.second = __shfl_xor_sync(kAll, t.second, mask);
  other.finite = __shfl_xor_sync(kAll, static_cast<int>(t.finite), mask) != 0;
  return other;
}

// One block of 128 threads per 64 rows; the scores sit in global memory here, where the kernel will
// have them in its wgmma accumulators, in the same fragment positions.
__global__ void epilogue(const float* scores, int rows, int k, int tile_n, const double* alpha, const double* row_sq,
                         ProblemTerms problem, int* out_row, int* out_winner, float* out_best, float* out_second,
                         unsigned char* out_certified, double* out_bound) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = 0; i < 2; ++i) {
    const int row = blockIdx.x * 64 + 16 * warp + lane / 4 + 8 * i;
    Top2 acc = top2_empty();
    if (row < rows) {
      for (int chunk = 0; chunk < k; chunk += tile_n)
        for (int j = 0; j < tile_n / 8; ++j)
          for (int v = 0; v < 2; ++v) {
            const int col = chunk + 8 * j + 2 * (lane % 4) + v;
            if (col < k) fold(acc, scores[static_cast<size_t>(row) * k + col], col);
          }
    }
    acc = merge(acc, shuffle_xor(acc, 1));  // every lane of the quad takes part, rows past N included
    acc = merge(acc, shuffle_xor(acc, 2));
    if (row < rows && lane % 4 == 0) {
      double bound = 0.0;
      const bool ok = certify(acc, RowTerms{alpha[row], row_sq[row]}, problem, k, &bound);
      out_row[row] = row;
      out_winner[row] = acc.index;
      out_best[row] = acc.best;
      out_second[row] = acc.second;
      out_certified[row] = ok;
      out_bound[row] = bound;
    }
  }
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  cudaMalloc(&device, host.size() * sizeof(T));
  cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  return device;
}

template <typename T>
std::vector<T> to_host(const T* device, size_t n) {
  std::vector<T> host(n);
  cudaMemcpy(host.data(), device, n * sizeof(T), cudaMemcpyDeviceToHost);
  return host;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 || std::string(argv[1]) != "tile") {
    std::fprintf(stderr, "usage: %s tile IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  const TileInput input = read_tile_input(in);
  const size_t rows = input.rows;
  float* scores = to_device(input.scores);
  double* alpha = to_device(input.alpha);
  double* row_sq = to_device(input.row_sq);
  int *row, *winner;
  float *best, *second;
  unsigned char* certified;
  double* bound;
  cudaMalloc(&row, rows * sizeof(int));
  cudaMalloc(&winner, rows * sizeof(int));
  cudaMalloc(&best, rows * sizeof(float));
  cudaMalloc(&second, rows * sizeof(float));
  cudaMalloc(&certified, rows);
  cudaMalloc(&bound, rows * sizeof(double));
  epilogue<<<(input.rows + 63) / 64, 128>>>(scores, input.rows, input.k, input.tile_n, alpha, row_sq,
                                            input.problem(), row, winner, best, second, certified, bound);
  const cudaError_t status = cudaDeviceSynchronize();
  if (status != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(status));
    return 1;
  }
  const auto rows_h = to_host(row, rows);
  const auto winner_h = to_host(winner, rows);
  const auto best_h = to_host(best, rows);
  const auto second_h = to_host(second, rows);
  const auto certified_h = to_host(certified, rows);
  const auto bound_h = to_host(bound, rows);
  std::ofstream out(argv[3], std::ios::binary);
  for (size_t r = 0; r < rows; ++r)
    write_record(out, rows_h[r], Top2{best_h[r], winner_h[r], second_h[r], true}, certified_h[r] != 0, bound_h[r]);
  return 0;
}
