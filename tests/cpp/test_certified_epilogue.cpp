// Runs csrc/cuda/certified_epilogue.h on the CPU the way a wgmma kernel would, for
// tests/test_certified_epilogue.py to compare with xdc_fast/certified.py. No torch: plain files in, out.
//
//   test_certified_epilogue round IN OUT   IN: int32 n, int32 dropped_bits, n uint32; OUT: n uint32
//   test_certified_epilogue tile IN OUT    IN: int32 rows, k, d, tile_n; float64 accumulation_unit, beta,
//                                          max_centroid_norm; rows*k float32 scores (row-major);
//                                          rows float64 alpha; rows float64 row_sq_norm
//                                          OUT per row, in the kernel's order: int32 row, int32 winner,
//                                          float32 best, float32 second, uint8 certified, float64 bound
//
// The tile mode partitions the scores as an m64nNk16 wgmma accumulator sits in a warpgroup's 128
// threads (the PTX ISA's fragment layout: thread t = 32 w + l holds rows 16 w + l/4 + 8 i, i = 0, 1, and
// columns 8 j + 2 (l % 4) + v, v = 0, 1, of every N-wide chunk of centroids); each thread folds its
// values chunk by chunk, then the four threads of a row merge in the order of shfl_xor 1 and 2.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <fstream>
#include <string>
#include <vector>

#include "cuda/certified_epilogue.h"
#include "certified_epilogue_io.h"

using namespace xdc_fast::certified;

namespace {

void round_mode(std::ifstream& in, std::ofstream& out) {
  int32_t n, dropped;
  read(in, &n);
  read(in, &dropped);
  std::vector<uint32_t> bits(n);
  read(in, bits.data(), bits.size());
  for (uint32_t b : bits) {
    float x;
    std::memcpy(&x, &b, sizeof x);
    const float r = round_significand(x, dropped);
    uint32_t rb;
    std::memcpy(&rb, &r, sizeof rb);
    write(out, rb);
  }
}

void tile_mode(std::ifstream& in, std::ofstream& out) {
  const TileInput input = read_tile_input(in);
  const int rows = input.rows, k = input.k, tile_n = input.tile_n;
  const std::vector<float>& scores = input.scores;
  const std::vector<double>&alpha = input.alpha, &row_sq = input.row_sq;
  const ProblemTerms problem = input.problem();

  constexpr int kThreads = 128, kRowsPerTile = 64;
  for (int base = 0; base < rows; base += kRowsPerTile) {
    Top2 partial[kThreads][2];
    for (int t = 0; t < kThreads; ++t) {
      const int warp = t / 32, lane = t % 32;
      for (int i = 0; i < 2; ++i) {
        partial[t][i] = top2_empty();
        const int row = base + 16 * warp + lane / 4 + 8 * i;
        if (row >= rows) continue;  // the kernel masks rows past N
        for (int chunk = 0; chunk < k; chunk += tile_n)
          for (int j = 0; j < tile_n / 8; ++j)
            for (int v = 0; v < 2; ++v) {
              const int col = chunk + 8 * j + 2 * (lane % 4) + v;
              if (col < k) fold(partial[t][i], scores[static_cast<size_t>(row) * k + col], col);
            }
      }
    }
    for (int mask : {1, 2}) {  // __shfl_xor_sync within each quad of lanes
      Top2 next[kThreads][2];
      for (int t = 0; t < kThreads; ++t)
        for (int i = 0; i < 2; ++i) next[t][i] = merge(partial[t][i], partial[t ^ mask][i]);
      std::memcpy(partial, next, sizeof partial);
    }
    for (int t = 0; t < kThreads; ++t) {
      const int warp = t / 32, lane = t % 32;
      for (int i = 0; i < 2; ++i) {
        const int row = base + 16 * warp + lane / 4 + 8 * i;
        if (row >= rows) continue;
        const Top2& mine = partial[t][i];
        const Top2& first = partial[t - lane % 4][i];  // every lane of the quad must agree
        if (mine.best != first.best || mine.index != first.index || mine.second != first.second) {
          std::fprintf(stderr, "quad disagrees on row %d\n", row);
          std::exit(3);
        }
        if (lane % 4 != 0) continue;
        double bound = 0.0;
        const bool ok = certify(mine, RowTerms{alpha[row], row_sq[row]}, problem, k, &bound);
        // Rows come out in the kernel's order; the header says which row each record is.
        write_record(out, row, mine, ok, bound);
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s round|tile IN OUT\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  std::ofstream out(argv[3], std::ios::binary);
  const std::string mode = argv[1];
  if (mode == "round") {
    round_mode(in, out);
  } else if (mode == "tile") {
    tile_mode(in, out);
  } else {
    return 2;
  }
  return 0;
}
