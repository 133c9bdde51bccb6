// Shared boundary checks and shape normalisation for the k-means ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace xdc_fast {

// The CPU assignment's engines (cpu/kmeans_kernel.cpp): the one the next call takes (the best this
// CPU has, or the one XDC_FAST_CPU_ISA forces), those available, best first, and the multiply-adds
// per second that all threads sustain in registers with an engine's vectors (0 when it is absent).
std::string cpu_assign_isa();
std::vector<std::string> cpu_assign_isas();
double cpu_fma_rate(const std::string& isa);

inline const char* rank_name(const at::Tensor& t) {
  switch (t.dim()) {
    case 0: return "0-D";
    case 1: return "1-D";
    case 2: return "2-D";
    case 3: return "3-D";
    default: return ">3-D";
  }
}

// Error messages stream only strings. An extension built by a newer g++ than torch's (g++ 13 on the
// GPU machine) crashed inside libstdc++ when a c10::str streamed an integer (seen there, not here),
// so numbers and shapes are formatted with std::to_string first.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string sci(double v) {
  char out[32];
  std::snprintf(out, sizeof out, "%.2g", v);
  return out;
}

inline std::string shape(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + "]";
}

inline std::string device_name(const at::Tensor& t) { return t.device().str(); }

inline const char* dtype_name(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

inline bool is_feature_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// x [B,N,D] or [N,D]; centroids [B,K,D] or [K,D]. Returns both as 3-D views (float features
// of other precisions are upcast by the caller, so only the shape and device are settled here).
inline std::tuple<at::Tensor, at::Tensor> check_assign_inputs(const at::Tensor& x, const at::Tensor& centroids) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3,
              "kmeans_assign: x should be a 2-D [N, D] or 3-D [B, N, D] tensor, got ", rank_name(x), " ", shape(x));
  TORCH_CHECK_VALUE(centroids.dim() == x.dim(), "kmeans_assign: centroids should be ", rank_name(x),
              " like x (", x.dim() == 3 ? "[B, K, D]" : "[K, D]", "), got ", rank_name(centroids), " ",
              shape(centroids));
  TORCH_CHECK_TYPE(is_feature_dtype(x.scalar_type()),
              "kmeans_assign: x should be float32, float16 or bfloat16, got ", dtype_name(x));
  TORCH_CHECK_TYPE(is_feature_dtype(centroids.scalar_type()),
              "kmeans_assign: centroids should be float32, float16 or bfloat16, got ", dtype_name(centroids));
  TORCH_CHECK_VALUE(x.device() == centroids.device(), "kmeans_assign: x and centroids should be on the same device, got ",
              device_name(x), " and ", device_name(centroids));
  auto x3 = x.dim() == 3 ? x : x.unsqueeze(0);
  auto c3 = centroids.dim() == 3 ? centroids : centroids.unsqueeze(0);
  TORCH_CHECK_VALUE(x3.size(0) == c3.size(0), "kmeans_assign: x and centroids should have the same batch size B, got ",
              num(x3.size(0)), " and ", num(c3.size(0)));
  TORCH_CHECK_VALUE(x3.size(2) == c3.size(2), "kmeans_assign: x and centroids should have the same dimension D, got ",
              num(x3.size(2)), " and ", num(c3.size(2)));
  TORCH_CHECK_VALUE(c3.size(1) >= 1, "kmeans_assign: centroids should hold at least one centroid (K >= 1), got K = 0");
  TORCH_CHECK_VALUE(x3.size(2) >= 1, "kmeans_assign: the dimension D should be at least 1, got 0");
  return {x3, c3};
}

inline std::tuple<at::Tensor, at::Tensor> check_update_inputs(const at::Tensor& x, const at::Tensor& labels,
                                                              int64_t k) {
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3,
              "kmeans_update: x should be a 2-D [N, D] or 3-D [B, N, D] tensor, got ", rank_name(x), " ", shape(x));
  TORCH_CHECK_VALUE(labels.dim() == x.dim() - 1, "kmeans_update: labels should be ", x.dim() == 3 ? "2-D [B, N]" : "1-D [N]",
              " to match x ", shape(x), ", got ", rank_name(labels), " ", shape(labels));
  TORCH_CHECK_TYPE(is_feature_dtype(x.scalar_type()),
              "kmeans_update: x should be float32, float16 or bfloat16, got ", dtype_name(x));
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "kmeans_update: labels should be int64, got ", dtype_name(labels));
  TORCH_CHECK_VALUE(x.device() == labels.device(), "kmeans_update: x and labels should be on the same device, got ",
              device_name(x), " and ", device_name(labels));
  TORCH_CHECK_VALUE(k >= 1, "kmeans_update: k should be at least 1, got ", num(k));
  auto x3 = x.dim() == 3 ? x : x.unsqueeze(0);
  auto l2 = labels.dim() == 2 ? labels : labels.unsqueeze(0);
  TORCH_CHECK_VALUE(l2.size(0) == x3.size(0) && l2.size(1) == x3.size(1), "kmeans_update: labels should be [B, N] = [",
              num(x3.size(0)), ", ", num(x3.size(1)), "] to match x, got ", shape(labels));
  return {x3, l2};
}

// Features as float32 rows with unit stride inside a row (what both kernels index); keeps a
// row-strided view as it is instead of copying it.
inline at::Tensor float_rows(const at::Tensor& t) {
  at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  return f.stride(-1) == 1 && f.stride(-2) >= f.size(-1) ? f : f.contiguous();
}

// The kernels work on [B, ...]; a 2-D call gets its outputs back without the batch dimension.
inline std::tuple<at::Tensor, at::Tensor> squeeze_if_2d(const at::Tensor& like, at::Tensor a, at::Tensor b) {
  if (like.dim() == 2) return {a.squeeze(0), b.squeeze(0)};
  return {a, b};
}

// --- the finite check of kmeans_assign (check_finite = true) ---------------------------------------
// The assignment minimises |c|^2 - 2 x.c in float32 and reports |x - c|^2, so it needs those to be
// finite floats. NaN or Inf anywhere, or finite features whose squares overflow, left it comparing Inf
// and NaN: with every centroid's squared norm Inf, every label came out 0 without a word (features of
// 1e30; or of 1e20 plus small variations, whose distances to their centroids stay finite, so that a
// look at dist would not catch it). Every squared norm at most a quarter of float32's largest value (a norm below
// ~9.2e18, half of sqrt(FLT_MAX) ~ 1.8e19) bounds all of them: |x.c| <= |x||c| and
// |x - c|^2 <= (|x| + |c|)^2 <= 4 max(|x|, |c|)^2. So the kernels check the centroids' norms, which they
// compute anyway, and each row's norm next to its winner's distance, while the row is in cache: 1-2% of
// the call on the 2-core dev machine (100k x 256 x 1024, 15 interleaved rounds), where the separate
// pass over x it replaced made the default call 1.4-1.7x slower than the raw op on 400k x 256.
constexpr double kMaxSquaredNorm = std::numeric_limits<float>::max() / 4;

// Only on the error path: a second look at both inputs says which one is at fault and why.
[[noreturn]] inline void throw_not_finite(const char* op, const at::Tensor& x, const at::Tensor& centroids) {
  const at::Tensor* inputs[2] = {&x, &centroids};
  const char* names[2] = {"x", "centroids"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *inputs[i];
    const int64_t bad = t.isfinite().logical_not().sum().item<int64_t>();
    TORCH_CHECK_VALUE(bad == 0, op, ": ", names[i], " should be finite, got ", num(bad),
                      " NaN/Inf value(s) in a tensor of shape ", shape(t),
                      "; clean the features first (a diverged model or NaN weights produce them), or pass "
                      "check_finite_input=False to skip this test");
  }
  // Both finite, so some squared norm was over the limit; the larger norm is the culprit.
  double largest[2];
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *inputs[i];
    largest[i] = t.numel() ? t.norm(at::Scalar(2.0), at::IntArrayRef{-1}, false, at::kDouble).max().item<double>() : 0.0;
  }
  const int i = largest[0] >= largest[1] ? 0 : 1;
  TORCH_CHECK_VALUE(false, op, ": ", names[i], i == 0 ? " overflows" : " overflow", " float32 when squared: the largest ",
                    i == 0 ? "row" : "centroid",
                    " norm is ", sci(largest[i]), ", above ", sci(std::sqrt(kMaxSquaredNorm)),
                    " (beyond it squared norms and distances overflow float32), so the labels would be meaningless; "
                    "scale the features down or L2-normalise them (KMeans on L2-normalised features, as pca_whiten "
                    "gives, never meets this)");
}

}  // namespace xdc_fast
