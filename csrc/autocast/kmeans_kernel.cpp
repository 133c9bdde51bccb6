// Autocast: under torch.autocast the features may arrive in half or bfloat16. The kernels always
// accumulate in float32, so autocast's job here is only to run them outside the autocast key with
// float32 inputs and hand back float32 results, whatever the surrounding autocast dtype.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace xdc_fast {
namespace {

// Only reduced-precision floats are upcast: anything else goes through untouched, so the kernels'
// own dtype checks still reject it with their message.
at::Tensor upcast(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t;
}

template <c10::DispatchKey AutocastKey>
std::tuple<at::Tensor, at::Tensor> kmeans_assign_autocast(const at::Tensor& x, const at::Tensor& centroids,
                                                          bool spherical, bool check_finite) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xdc_fast::kmeans_assign", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op.call(upcast(x), upcast(centroids), spherical, check_finite);
}

template <c10::DispatchKey AutocastKey>
std::tuple<at::Tensor, at::Tensor> kmeans_update_autocast(const at::Tensor& x, const at::Tensor& labels, int64_t k) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xdc_fast::kmeans_update", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(upcast(x), labels, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(xdc_fast, AutocastCPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_autocast<c10::DispatchKey::AutocastCPU>);
  m.impl("kmeans_update", &kmeans_update_autocast<c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(xdc_fast, AutocastCUDA, m) {
  m.impl("kmeans_assign", &kmeans_assign_autocast<c10::DispatchKey::AutocastCUDA>);
  m.impl("kmeans_update", &kmeans_update_autocast<c10::DispatchKey::AutocastCUDA>);
}

}  // namespace xdc_fast
