// CPU kernels of the k-means ops.
//
// Assignment: one pass over tiles of rows. Each thread multiplies its tile against a block of
// centroids with a single-threaded BLAS GEMM into a scratch buffer that stays in cache, takes the
// argmin while it is there and folds it into a running (min, index) per row before the next block,
// so the N x K distance matrix never exists in full. The distance
// of the winner is then recomputed directly as sum((x - c)^2): the GEMM expansion
// |x|^2 - 2 x.c + |c|^2 loses digits when a point sits close to its centroid, and the objective
// reported to users should not.
//
// Update: thread-local partial sums over chunks of rows, reduced in a fixed order: no atomics, and
// the result does not depend on scheduling.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <limits>
#include <vector>

#include "../kmeans.h"

namespace xdc_fast {
namespace {

// Tile of the assignment: 512 rows against blocks of 512 centroids, i.e. a 1 MiB scores buffer per
// thread. Measured on the 2-core EPYC dev machine (GFLOP/s at N x D x K = 400k x 256 x 1024 /
// 100k x 512 x 8192 / 200k x 64 x 256): 64 x 1024: 113 / 106 / 72; 256 x 1024: 117 / 126 / 96;
// 256 x 512: 148-156 / 135-156 / 91-99; 512 x 512: 145-154 / 155-158 / 102-118. Larger tiles
// amortise BLAS's packing of the centroid block; past ~1 MiB the argmin falls out of cache.
constexpr int64_t kRowsPerTile = 512;
constexpr int64_t kMinRowsPerTile = 16;
constexpr int64_t kCentroidsPerBlock = 512;

// The update's per-thread partial sums may take this much memory in all; a chunk smaller than this
// many rows is not worth a thread.
constexpr int64_t kMaxUpdatePartialBytes = int64_t(256) << 20;
constexpr int64_t kMinRowsPerUpdateChunk = 2048;

// --- row argmin -------------------------------------------------------------------------------
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

int64_t argmin_row_scalar(float* scores, const float* cnorm, int64_t K, bool spherical) {
  float m = std::numeric_limits<float>::infinity();
  int64_t best = 0;
  for (int64_t k = 0; k < K; ++k) {
    float v = spherical ? -scores[k] : std::fma(-2.0f, scores[k], cnorm[k]);
    if (v < m) {
      m = v;
      best = k;
    }
  }
  return best;
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

float squared_distance_scalar(const float* a, const float* b, int64_t D) {
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    double e = double(a[d]) - double(b[d]);
    sum += e * e;
  }
  return float(sum);
}

float dot_exact(const float* a, const float* b, int64_t D) {
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) sum += double(a[d]) * double(b[d]);
  return float(sum);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

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

void assign_fused_avx2(const at::Tensor& x, const at::Tensor& c, const at::Tensor& cnorm, bool spherical,
                       int64_t* labels, float* dist) {
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
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                                     bool spherical) {
  auto [x3, c3] = check_assign_inputs(x_in, centroids_in);
  at::Tensor x = float_rows(x3);
  at::Tensor c = c3.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = c.size(1);
  at::Tensor labels = at::empty({B, N}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (N == 0) return squeeze_if_2d(x_in, labels, dist);

  at::Tensor cnorm = c.to(at::kDouble).pow(2).sum(-1).to(at::kFloat).contiguous();
  // Our fused micro-kernel where the CPU has AVX2 and FMA (float lane indices are exact below 2^24);
  // XDC_FAST_CPU_ASSIGN=blas keeps the BLAS-tile path below, for comparison.
  static const bool use_blas = [] {
    const char* choice = std::getenv("XDC_FAST_CPU_ASSIGN");
    return choice != nullptr && std::string(choice) == "blas";
  }();
  if (cpu_has_avx2() && !use_blas && K < (int64_t(1) << 24)) {
    assign_fused_avx2(x, c, cnorm, spherical, labels.data_ptr<int64_t>(), dist.data_ptr<float>());
    return squeeze_if_2d(x_in, labels, dist);
  }
  // Smaller tiles only when large ones would leave threads without work.
  const int64_t threads = at::get_num_threads();
  const int64_t rows = std::clamp((B * N + 4 * threads - 1) / (4 * threads), kMinRowsPerTile, kRowsPerTile);
  const int64_t block = std::min(kCentroidsPerBlock, K);
  const int64_t tiles_per_batch = (N + rows - 1) / rows;
  const bool avx2 = cpu_has_avx2();

  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* np = cnorm.data_ptr<float>();
  int64_t* lp = labels.data_ptr<int64_t>();
  float* dp = dist.data_ptr<float>();
  const int64_t xsb = x.stride(0), xsn = x.stride(1);

  at::parallel_for(0, B * tiles_per_batch, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(rows * block);
    std::vector<float> best_value(rows);
    std::vector<int64_t> best_index(rows);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles_per_batch;
      const int64_t r0 = (t % tiles_per_batch) * rows;
      const int64_t nb = std::min(rows, N - r0);
      const float* xb = xp + b * xsb + r0 * xsn;
      const float* cb = cp + b * K * D;
      const at::Tensor x_tile = x[b].narrow(0, r0, nb);
      std::fill(best_value.begin(), best_value.end(), std::numeric_limits<float>::infinity());
      std::fill(best_index.begin(), best_index.end(), int64_t(0));
      for (int64_t k0 = 0; k0 < K; k0 += block) {
        const int64_t kn = std::min(block, K - k0);
        // A single-threaded BLAS call per tile (ATen runs no nested parallelism inside
        // parallel_for); the dispatcher's overhead is microseconds against a tile's GEMM.
        at::Tensor tile_scores = at::from_blob(scores.data(), {nb, kn}, x.options());
        at::mm_out(tile_scores, x_tile, c[b].narrow(0, k0, kn).t());
        for (int64_t i = 0; i < nb; ++i) {
          float* row = scores.data() + i * kn;
          const int64_t j = avx2 ? argmin_row_avx2(row, np + b * K + k0, kn, spherical)
                                 : argmin_row_scalar(row, np + b * K + k0, kn, spherical);
          // Blocks come in increasing centroid order: a strict comparison keeps the lowest index.
          if (row[j] < best_value[i]) {
            best_value[i] = row[j];
            best_index[i] = k0 + j;
          }
        }
      }
      for (int64_t i = 0; i < nb; ++i) {
        const float* xi = xb + i * xsn;
        const float* ci = cb + best_index[i] * D;
        lp[b * N + r0 + i] = best_index[i];
        dp[b * N + r0 + i] = spherical ? dot_exact(xi, ci, D)
                             : avx2    ? squared_distance_avx2(xi, ci, D)
                                       : squared_distance_scalar(xi, ci, D);
      }
    }
  });
  return squeeze_if_2d(x_in, labels, dist);
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cpu(const at::Tensor& x_in, const at::Tensor& labels_in, int64_t k) {
  auto [x3, l2] = check_update_inputs(x_in, labels_in, k);
  at::Tensor x = float_rows(x3);
  at::Tensor labels = l2.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = k;

  // One chunk of consecutive rows per thread, each with its own K x D float64 partial: rows are
  // read sequentially and whole, which the prefetcher streams, and no two threads share a partial.
  // The partials' memory is capped; past the cap fewer threads take part.
  const int64_t partial_bytes = K * D * int64_t(sizeof(double));
  const int64_t chunks = std::clamp<int64_t>(
      std::min<int64_t>(at::get_num_threads(), kMaxUpdatePartialBytes / std::max<int64_t>(partial_bytes, 1)), 1,
      std::max<int64_t>(1, N / kMinRowsPerUpdateChunk));

  at::Tensor partial = at::empty({chunks, K, D}, x.options().dtype(at::kDouble));
  at::Tensor partial_counts = at::empty({chunks, K}, labels.options());
  at::Tensor sums = at::empty({B, K, D}, x.options().dtype(at::kFloat));
  at::Tensor counts = at::empty({B, K}, labels.options());

  const int64_t xsb = x.stride(0), xsn = x.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x.data_ptr<float>() + b * xsb;
    const int64_t* lb = labels.data_ptr<int64_t>() + b * N;
    double* pp = partial.data_ptr<double>();
    int64_t* pc = partial_counts.data_ptr<int64_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t chunk = t0; chunk < t1; ++chunk) {
        double* psum = pp + chunk * K * D;
        int64_t* pcount = pc + chunk * K;
        std::fill(psum, psum + K * D, 0.0);
        std::fill(pcount, pcount + K, int64_t(0));
        const int64_t n0 = N * chunk / chunks, n1 = N * (chunk + 1) / chunks;
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t l = lb[n];
          TORCH_CHECK_VALUE(l >= 0 && l < K, "kmeans_update: labels should lie in [0, k) = [0, ", num(K), "), got ", num(l));
          double* dst = psum + l * D;
          const float* src = xb + n * xsn;
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
          pcount[l] += 1;
        }
      }
    });
    // Chunks are reduced in a fixed order, so the sums do not depend on thread timing.
    sums[b].copy_(chunks == 1 ? partial[0] : partial.sum(0));
    counts[b].copy_(chunks == 1 ? partial_counts[0] : partial_counts.sum(0));
  }
  return squeeze_if_2d(x_in, sums, counts);
}

}  // namespace

TORCH_LIBRARY_IMPL(xdc_fast, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_cpu);
  m.impl("kmeans_update", &kmeans_update_cpu);
}

}  // namespace xdc_fast
