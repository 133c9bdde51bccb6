// CPU kernels of the k-means ops.
//
// Assignment has three engines, chosen per call by what the CPU has, best first: the fused AVX-512
// micro-kernel (kmeans_assign_avx512.cpp), the fused AVX2 + FMA one (kmeans_assign_avx2.cpp), and
// the portable path here, which needs nothing but BLAS and is what ARM servers (Grace, Graviton),
// builds with XDC_FAST_PORTABLE_CPU and K >= 2^24 get. XDC_FAST_CPU_ISA=avx512|avx2|portable forces
// one, so that each is tested and timed on a machine that has it.
//
// The portable path makes one pass over tiles of rows. Each thread multiplies its tile against a
// block of centroids with a single-threaded BLAS GEMM into a scratch buffer that stays in cache,
// takes the argmin while it is there and folds it into a running (min, index) per row before the
// next block, so the N x K distance matrix never exists in full. The distance of the winner is then
// recomputed directly as sum((x - c)^2): the GEMM expansion |x|^2 - 2 x.c + |c|^2 loses digits when
// a point sits close to its centroid, and the objective reported to users should not.
//
// Update: thread-local partial sums over chunks of rows, reduced in a fixed order: no atomics, and
// the result does not depend on scheduling.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <limits>
#include <vector>

#include "../kmeans.h"
#include "kmeans_assign_x86.h"

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

// --- portable row helpers -------------------------------------------------------------------------
// scores[k] holds x.c_k on entry and leaves holding the value minimised (|c_k|^2 - 2 x.c_k, or
// -x.c_k for the spherical case), since the caller compares the winner's value across centroid
// blocks; the lowest index wins on exact ties. argmin_row_avx2 keeps the same contract with the
// same single-rounding fma, so both engines pick the same labels.
int64_t argmin_row_scalar(float* scores, const float* cnorm, int64_t K, bool spherical) {
  float m = std::numeric_limits<float>::infinity();
  int64_t best = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float v = spherical ? 0.0f - scores[k] : std::fma(-2.0f, scores[k], cnorm[k]);
    scores[k] = v;
    if (v < m) {
      m = v;
      best = k;
    }
  }
  return best;  // 0 when the row holds only NaN or +inf: the label is then arbitrary but in range
}

bool squared_norm_fits_scalar(const float* a, int64_t D) {
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) sum += double(a[d]) * double(a[d]);
  return sum <= kMaxSquaredNorm;  // false for NaN too
}

float squared_distance_scalar(const float* a, const float* b, int64_t D) {
  double sum = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    double e = double(a[d]) - double(b[d]);
    sum += e * e;
  }
  return float(sum);
}

// The AVX2 versions where the CPU has them; the portable engine forced on an x86 CPU (a comparison
// of engines, not a build for ARM) keeps the scalar ones, so it runs exactly what ARM runs.
int64_t argmin_row(float* scores, const float* cnorm, int64_t K, bool spherical, [[maybe_unused]] bool avx2) {
#if XDC_FAST_X86_ASSIGN
  if (avx2) return cpu::argmin_row_avx2(scores, cnorm, K, spherical);
#endif
  return argmin_row_scalar(scores, cnorm, K, spherical);
}

float squared_distance(const float* a, const float* b, int64_t D, [[maybe_unused]] bool avx2) {
#if XDC_FAST_X86_ASSIGN
  if (avx2) return cpu::squared_distance_avx2(a, b, D);
#endif
  return squared_distance_scalar(a, b, D);
}

bool squared_norm_fits(const float* a, int64_t D, [[maybe_unused]] bool avx2) {
#if XDC_FAST_X86_ASSIGN
  if (avx2) return cpu::squared_norm_fits_avx2(a, D);
#endif
  return squared_norm_fits_scalar(a, D);
}

// --- engine choice ---------------------------------------------------------------------------------
enum class CpuIsa { kAvx512, kAvx2, kPortable };

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "portable";
  }
}

// What this build can run on this CPU, best first (the CPU's features are read once, by the engines).
std::vector<CpuIsa> available_isas() {
  std::vector<CpuIsa> out;
  if (cpu::avx512_assign_available()) out.push_back(CpuIsa::kAvx512);
  if (cpu::avx2_assign_available()) out.push_back(CpuIsa::kAvx2);
  out.push_back(CpuIsa::kPortable);
  return out;
}

std::string joined(const std::vector<CpuIsa>& isas) {
  std::string out;
  for (CpuIsa isa : isas) out += (out.empty() ? "" : ", ") + std::string(isa_name(isa));
  return out;
}

// The best engine, or the one XDC_FAST_CPU_ISA names. The variable is read at every call (a getenv
// costs nothing next to an assignment), so a test or a benchmark can switch engines in one process.
CpuIsa chosen_cpu_isa() {
  static const std::vector<CpuIsa> available = available_isas();
  const char* forced = std::getenv("XDC_FAST_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return available.front();
  const std::string name(forced);
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kPortable}) {
    if (name != isa_name(isa)) continue;
    TORCH_CHECK_VALUE(std::find(available.begin(), available.end(), isa) != available.end(),
                      "XDC_FAST_CPU_ISA=", name, ": this CPU or this build has no ", name,
                      " engine; the engines here are ", joined(available));
    return isa;
  }
  TORCH_CHECK_VALUE(false, "XDC_FAST_CPU_ISA should be avx512, avx2 or portable (or unset: the best this CPU has), "
                    "got '", name, "'");
  return available.front();
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                                     bool spherical, bool check_finite) {
  auto [x3, c3] = check_assign_inputs(x_in, centroids_in);
  at::Tensor x = float_rows(x3);
  at::Tensor c = c3.to(at::kFloat).contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = c.size(1);
  at::Tensor labels = at::empty({B, N}, x.options().dtype(at::kLong));
  at::Tensor dist = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (N == 0) return squeeze_if_2d(x_in, labels, dist);

  at::Tensor cnorm64 = c.to(at::kDouble).pow(2).sum(-1);
  if (check_finite && !cnorm64.le(kMaxSquaredNorm).all().item<bool>())
    throw_not_finite("kmeans_assign", x_in, centroids_in);
  at::Tensor cnorm = cnorm64.to(at::kFloat).contiguous();
  std::atomic<int64_t> bad_rows{0};
  const CpuIsa isa = chosen_cpu_isa();
#if XDC_FAST_X86_ASSIGN
  // Float lane indices are exact below 2^24 centroids; past that only the portable engine is exact.
  if (isa != CpuIsa::kPortable && K < (int64_t(1) << 24)) {
    (isa == CpuIsa::kAvx512 ? cpu::assign_fused_avx512 : cpu::assign_fused_avx2)(
        x, c, cnorm, spherical, labels.data_ptr<int64_t>(), dist.data_ptr<float>(), check_finite ? &bad_rows : nullptr);
    if (bad_rows.load() > 0) throw_not_finite("kmeans_assign", x_in, centroids_in);
    return squeeze_if_2d(x_in, labels, dist);
  }
#endif
  const bool avx2 = isa != CpuIsa::kPortable;
  // Smaller tiles only when large ones would leave threads without work.
  const int64_t threads = at::get_num_threads();
  const int64_t rows = std::clamp((B * N + 4 * threads - 1) / (4 * threads), kMinRowsPerTile, kRowsPerTile);
  const int64_t block = std::min(kCentroidsPerBlock, K);
  const int64_t tiles_per_batch = (N + rows - 1) / rows;

  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* np = cnorm.data_ptr<float>();
  int64_t* lp = labels.data_ptr<int64_t>();
  float* dp = dist.data_ptr<float>();
  const int64_t xsb = x.stride(0), xsn = x.stride(1);

  at::parallel_for(0, B * tiles_per_batch, 1, [&](int64_t t0, int64_t t1) {
    // at::parallel_for does not carry the caller's thread-local dispatch state into its worker threads:
    // there the Autograd kernel's guard (kmeans.cpp) was gone, and mm_out raised "functions with out=...
    // arguments don't support automatic differentiation" for an x that requires grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<float> scores(rows * block);
    std::vector<float> best_value(rows);
    std::vector<int64_t> best_index(rows);
    int64_t bad = 0;
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
          const int64_t j = argmin_row(row, np + b * K + k0, kn, spherical, avx2);
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
        dp[b * N + r0 + i] = spherical ? cpu::dot_exact(xi, ci, D) : squared_distance(xi, ci, D, avx2);
        if (check_finite && !squared_norm_fits(xi, D, avx2)) ++bad;
      }
    }
    if (bad) bad_rows.fetch_add(bad);
  });
  if (bad_rows.load() > 0) throw_not_finite("kmeans_assign", x_in, centroids_in);
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

std::string cpu_assign_isa() { return isa_name(chosen_cpu_isa()); }

std::vector<std::string> cpu_assign_isas() {
  std::vector<std::string> out;
  for (CpuIsa isa : available_isas()) out.push_back(isa_name(isa));
  return out;
}

double cpu_fma_rate(const std::string& isa) {
#if XDC_FAST_X86_ASSIGN
  double (*rate)() = nullptr;
  if (isa == "avx512" && cpu::avx512_assign_available()) rate = cpu::fma_rate_avx512;
  if (isa == "avx2" && cpu::avx2_assign_available()) rate = cpu::fma_rate_avx2;
  if (rate == nullptr) return 0.0;
  // Every thread at once, as the engines run: the cores' rate together, at the clock they keep under
  // an all-core load.
  std::vector<double> rates(at::get_num_threads(), 0.0);
  at::parallel_for(0, int64_t(rates.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) rates[t] = rate();
  });
  double total = 0.0;
  for (double r : rates) total += r;
  return total;
#else
  return 0.0;
#endif
}

TORCH_LIBRARY_IMPL(xdc_fast, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_cpu);
  m.impl("kmeans_update", &kmeans_update_cpu);
}

}  // namespace xdc_fast
