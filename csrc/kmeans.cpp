// Op schemas of xdc_fast, and their Autograd kernels (the ops' one property that is not a backend's).
// Each backend registers its kernels in its own file (cpu/, cuda/, autocast/); Python owns the fake
// kernels and the public wrappers.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "kmeans.h"

// Importing xdc_fast._C loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace xdc_fast {

bool compiled_with_cuda() {
#ifdef XDC_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(xdc_fast, m) {
  m.def("kmeans_assign(Tensor x, Tensor centroids, bool spherical=False, bool check_finite=False) -> "
        "(Tensor labels, Tensor dist)");
  m.def("kmeans_update(Tensor x, Tensor labels, int k) -> (Tensor sums, Tensor counts)");
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  m.def("cpu_assign_isa() -> str", &cpu_assign_isa);
  m.def("cpu_assign_isas() -> str[]", &cpu_assign_isas);
  m.def("cpu_fma_rate(str isa) -> float", &cpu_fma_rate);
}

// Neither op is differentiable (labels and counts are integers; nothing asks for the gradient of a
// distance or a sum here), and saying so at the Autograd key is what makes every backend treat an input
// that requires grad alike. Without it, the autograd fallback ran the kernels with autograd still live:
// the fused CPU path returned a dist whose backward silently gave no gradient, and the BLAS-tile path's
// at::mm_out raised "functions with out=... arguments don't support automatic differentiation". Below
// this guard (the one PyTorch's own autograd kernels redispatch under) no kernel sees autograd, whatever
// ATen calls it makes, and the outputs come back without grad_fn, as from a detached input.
namespace {

std::tuple<at::Tensor, at::Tensor> kmeans_assign_no_grad(const at::Tensor& x, const at::Tensor& centroids,
                                                         bool spherical, bool check_finite) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xdc_fast::kmeans_assign", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool, bool)>();
  return op.call(x, centroids, spherical, check_finite);
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_no_grad(const at::Tensor& x, const at::Tensor& labels, int64_t k) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("xdc_fast::kmeans_update", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(x, labels, k);
}

}  // namespace

TORCH_LIBRARY_IMPL(xdc_fast, Autograd, m) {
  m.impl("kmeans_assign", &kmeans_assign_no_grad);
  m.impl("kmeans_update", &kmeans_update_no_grad);
}

}  // namespace xdc_fast
