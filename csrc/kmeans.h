// Shared boundary checks and shape normalisation for the k-means ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>

namespace xdc_fast {

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

}  // namespace xdc_fast
