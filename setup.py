"""Builds xdc_fast._C: the CPU kernels always, the CUDA kernels whenever a toolkit is found.

Environment:
  XDC_FAST_CUDA=0|1        force the CUDA kernels off or on (default: on when a toolkit is found)
  TORCH_CUDA_ARCH_LIST     GPU targets (default "9.0": H100/H200)
  MAX_JOBS                 parallel compile jobs (ninja)
  XDC_FAST_DEBUG=1         -O0 -g, for debuggers and sanitizers
  XDC_FAST_PORTABLE_CPU=1  build only the portable CPU k-means assignment (BLAS tiles), without the x86
                           AVX2 engine: what ARM builds anyway, and a way to run that engine on x86
  XDC_FAST_NO_EXTENSION=1  register the package only (the Makefile then builds the extension in place,
                           incrementally, instead of pip compiling it a second time in a temporary folder)
"""

import glob
import os
import shutil

# The nvcc on PATH may be a wrapper script, from which torch would guess the wrong CUDA_HOME;
# this must be settled before torch.utils.cpp_extension reads the environment at import.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("XDC_FAST_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "no")
    return CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is not None


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extension():
    debug = os.environ.get("XDC_FAST_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-fopenmp", "-std=c++17"]
    macros = [("XDC_FAST_PORTABLE_CPU", "1")] if os.environ.get("XDC_FAST_PORTABLE_CPU") == "1" else []
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/autocast/*.cpp")
    if want_cuda():
        srcs += sources("csrc/cuda/*.cu")
        nvcc = [*opt, "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "xdc_fast._C", srcs,
            define_macros=[*macros, ("XDC_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("xdc_fast._C", srcs, define_macros=macros, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"])


setup(
    packages=find_packages(include=["xdc_fast", "xdc_fast.*"]),
    ext_modules=[] if os.environ.get("XDC_FAST_NO_EXTENSION") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
