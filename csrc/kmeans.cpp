// Op schemas of xdc_fast. Each backend registers its kernels in its own file
// (cpu/, cuda/, autocast/); Python owns the fake kernels and the public wrappers.
#include <Python.h>
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
  m.def("kmeans_assign(Tensor x, Tensor centroids, bool spherical=False) -> (Tensor labels, Tensor dist)");
  m.def("kmeans_update(Tensor x, Tensor labels, int k) -> (Tensor sums, Tensor counts)");
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
}

}  // namespace xdc_fast
