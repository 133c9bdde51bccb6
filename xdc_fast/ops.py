"""The k-means ops: nearest-centroid assignment and per-cluster sums.

The kernels live in the compiled extension ``xdc_fast._C`` (C++ on the CPU, CUDA on the GPU) and are
registered as ``torch.ops.xdc_fast.kmeans_assign`` / ``kmeans_update``. When the extension is missing
(or was built without CUDA and a CUDA tensor comes), these wrappers warn once and run the plain-torch
twins of :mod:`xdc_fast.reference` instead, which are correct but slower and use more memory.
"""

from __future__ import annotations

import warnings

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    HAS_EXTENSION = True
    _IMPORT_ERROR: Exception | None = None
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    HAS_EXTENSION = False
    _IMPORT_ERROR = error

HAS_CUDA_KERNELS = HAS_EXTENSION and bool(torch.ops.xdc_fast.compiled_with_cuda())

_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _use_kernels(device: torch.device) -> bool:
    if not HAS_EXTENSION:
        _warn_once(
            "no-extension",
            f"xdc_fast._C could not be imported ({_IMPORT_ERROR}); using the plain-torch k-means, which is "
            "slower. Rebuild with `pip install --no-build-isolation -e .` (see README).",
        )
        return False
    if device.type == "cuda" and not HAS_CUDA_KERNELS:
        _warn_once(
            "no-cuda-kernels",
            "xdc_fast._C was built without CUDA kernels; using the plain-torch k-means on the GPU. "
            "Rebuild with CUDA_HOME set (or XDC_FAST_CUDA=1) to get them.",
        )
        return False
    return device.type in ("cpu", "cuda")


CPU_ISA_VARIABLE = "XDC_FAST_CPU_ISA"


def cpu_isas() -> list[str]:
    """The CPU assignment engines this build can run on this CPU, best first: ``avx512``, ``avx2``
    (x86 CPUs that have them) and ``portable`` (BLAS tiles, everywhere). Without the extension, none."""
    return list(torch.ops.xdc_fast.cpu_assign_isas()) if HAS_EXTENSION else []


def cpu_isa() -> str:
    """The engine the next CPU ``kmeans_assign`` takes: the best this CPU has, or the one the
    environment variable ``XDC_FAST_CPU_ISA`` (``avx512``, ``avx2`` or ``portable``) forces. A forced
    engine the CPU lacks raises ``ValueError``, as the op itself would."""
    return str(torch.ops.xdc_fast.cpu_assign_isa()) if HAS_EXTENSION else "plain torch (no extension)"


def cpu_fma_flops(isa: str) -> float:
    """Floating-point operations per second (two per multiply-add) that all of torch's threads sustain
    in registers with ``isa``'s vectors, measured in a few milliseconds: the ceiling of that engine's
    micro-kernel on this machine at the clock it keeps under load. 0 for an engine the CPU lacks, and
    for ``portable``, whose speed is its BLAS library's. The best of five runs, so that a core still
    raising its clock or a moment of other work on the machine does not pull the ceiling down."""
    if not HAS_EXTENSION:
        return 0.0
    return 2.0 * max(float(torch.ops.xdc_fast.cpu_fma_rate(isa)) for _ in range(5))


def _rank(t: torch.Tensor) -> str:
    return f"{t.dim()}-D"


def check_assign_inputs(x: torch.Tensor, centroids: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate kmeans_assign's inputs the way the compiled kernels do; returns (B, N, D, K)."""
    if x.dim() not in (2, 3):
        raise ValueError(f"kmeans_assign: x should be a 2-D [N, D] or 3-D [B, N, D] tensor, got {_rank(x)} {tuple(x.shape)}")
    if centroids.dim() != x.dim():
        want = "[B, K, D]" if x.dim() == 3 else "[K, D]"
        raise ValueError(
            f"kmeans_assign: centroids should be {_rank(x)} like x ({want}), got {_rank(centroids)} {tuple(centroids.shape)}"
        )
    for name, t in (("x", x), ("centroids", centroids)):
        if t.dtype not in _FEATURE_DTYPES:
            raise TypeError(f"kmeans_assign: {name} should be float32, float16 or bfloat16, got {t.dtype}")
    if x.device != centroids.device:
        raise ValueError(f"kmeans_assign: x and centroids should be on the same device, got {x.device} and {centroids.device}")
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    c3 = centroids if centroids.dim() == 3 else centroids.unsqueeze(0)
    if x3.shape[0] != c3.shape[0]:
        raise ValueError(f"kmeans_assign: x and centroids should have the same batch size B, got {x3.shape[0]} and {c3.shape[0]}")
    if x3.shape[2] != c3.shape[2]:
        raise ValueError(f"kmeans_assign: x and centroids should have the same dimension D, got {x3.shape[2]} and {c3.shape[2]}")
    if c3.shape[1] < 1:
        raise ValueError("kmeans_assign: centroids should hold at least one centroid (K >= 1), got K = 0")
    if x3.shape[2] < 1:
        raise ValueError("kmeans_assign: the dimension D should be at least 1, got 0")
    return x3.shape[0], x3.shape[1], x3.shape[2], c3.shape[1]


def check_update_inputs(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[int, int, int]:
    """Validate kmeans_update's inputs (all but the label range); returns (B, N, D)."""
    if x.dim() not in (2, 3):
        raise ValueError(f"kmeans_update: x should be a 2-D [N, D] or 3-D [B, N, D] tensor, got {_rank(x)} {tuple(x.shape)}")
    if labels.dim() != x.dim() - 1:
        want = "2-D [B, N]" if x.dim() == 3 else "1-D [N]"
        raise ValueError(
            f"kmeans_update: labels should be {want} to match x {tuple(x.shape)}, got {_rank(labels)} {tuple(labels.shape)}"
        )
    if x.dtype not in _FEATURE_DTYPES:
        raise TypeError(f"kmeans_update: x should be float32, float16 or bfloat16, got {x.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"kmeans_update: labels should be int64, got {labels.dtype}")
    if x.device != labels.device:
        raise ValueError(f"kmeans_update: x and labels should be on the same device, got {x.device} and {labels.device}")
    if k < 1:
        raise ValueError(f"kmeans_update: k should be at least 1, got {k}")
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    l2 = labels if labels.dim() == 2 else labels.unsqueeze(0)
    if tuple(l2.shape) != tuple(x3.shape[:2]):
        raise ValueError(f"kmeans_update: labels should be [B, N] = {list(x3.shape[:2])} to match x, got {list(labels.shape)}")
    return x3.shape[0], x3.shape[1], x3.shape[2]


# The largest squared norm of a row or centroid with which every norm, dot product and distance the
# assignment computes stays a finite float32: a quarter of float32's largest value (a norm of ~9.2e18).
# Why, and why the kernels check it themselves: csrc/kmeans.h.
MAX_SQUARED_NORM = float(torch.finfo(torch.float32).max) / 4


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"  # as the kernels write it


def _row_norms_fit(t: torch.Tensor) -> bool:
    # A float32 norm: 15x faster than in float64 and 20x faster than isfinite(t).all() (36 ms against
    # 0.53 s and 0.69 s on 400k x 256 here), and as good a test: a sum of squares that overflows float32
    # is past the limit anyway, and NaN/Inf give NaN/Inf, which compare false. Half precision would
    # overflow at 65504.
    norms = torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32)
    return bool((norms <= MAX_SQUARED_NORM**0.5).all())


def _raise_not_finite(op: str, inputs: dict[str, torch.Tensor], hint: str | None) -> None:
    """The kernels' message (csrc/kmeans.h throw_not_finite), for the paths that do not run them."""
    for name, t in inputs.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(
                f"{op}: {name} should be finite, got {bad} NaN/Inf value(s) in a tensor of shape {_shape(t)}; "
                f"clean the features first (a diverged model or NaN weights produce them)"
                + (f", or {hint}" if hint else "")
            )
    largest = {name: float(torch.linalg.vector_norm(t, dim=-1, dtype=torch.float64).max()) if t.numel() else 0.0
               for name, t in inputs.items()}
    name = max(largest, key=largest.get)  # the first on a tie, as in the kernels
    what = "row" if name == "x" else "centroid"
    raise ValueError(
        f"{op}: {name} {'overflows' if name == 'x' else 'overflow'} float32 when squared: the largest {what} "
        f"norm is {largest[name]:.2g}, above {MAX_SQUARED_NORM ** 0.5:.2g} (beyond it squared norms and distances "
        "overflow float32), so the labels would be meaningless; scale the features down or L2-normalise them "
        "(KMeans on L2-normalised features, as pca_whiten gives, never meets this)"
    )


_SKIP_HINT = "pass check_finite_input=False to skip this test"


def check_finite(x: torch.Tensor, op: str, *, hint: str | None = None) -> None:
    """Raise when ``x`` holds NaN or Inf, or rows over the norm limit of :func:`kmeans_assign`: one pass
    over x (a device sync on the GPU). The compiled ``kmeans_assign`` makes this check inside its kernels.
    ``hint``, if given, ends the NaN/Inf message (how the caller's user can skip the check)."""
    if not _row_norms_fit(x):
        _raise_not_finite(op, {"x": x}, hint)


def kmeans_assign(
    x: torch.Tensor, centroids: torch.Tensor, spherical: bool = False, *, check_finite_input: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row, fused with the argmin (the N x K matrix is never stored).

    Not differentiable: the outputs never require grad, whether or not the inputs do.

    Args:
        x (Tensor[B, N, D] or Tensor[N, D]): features; float32, or float16/bfloat16 (fp32 accumulate).
        centroids (Tensor[B, K, D] or Tensor[K, D]): same rank, device and D as ``x``.
        spherical (bool): maximise the inner product instead of minimising the squared L2 distance.
        check_finite_input (bool): raise ``ValueError`` naming the input at fault when ``x`` or
            ``centroids`` hold NaN/Inf, or a row or centroid whose norm is above ~9.2e18 (its square,
            or a distance to it, would overflow float32), where the labels would be meaningless. The
            kernels check the norms as they go (1-2% of the call's time); False skips the check.

    Returns:
        labels (Tensor[B, N] or Tensor[N], int64): index of the nearest centroid; the lowest index
            wins exact ties. Between CPU and GPU, or against another library, labels may differ on
            near-ties (distances equal to within float32 rounding).
        dist (Tensor[B, N] or Tensor[N], float32): the squared distance to that centroid, computed
            directly as sum((x - c)^2), or the inner product when ``spherical``.
    """
    if _use_kernels(x.device):
        return torch.ops.xdc_fast.kmeans_assign(x, centroids, spherical, check_finite_input)
    check_assign_inputs(x, centroids)
    x, centroids = x.detach(), centroids.detach()  # not differentiable, as the kernels are not
    if check_finite_input and not (_row_norms_fit(x) and _row_norms_fit(centroids)):
        _raise_not_finite("kmeans_assign", {"x": x, "centroids": centroids}, _SKIP_HINT)
    return reference.kmeans_assign_reference(x, centroids, spherical)


def kmeans_update(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts: the M-step primitive (dividing and empty clusters are policy).

    Not differentiable: the outputs never require grad, whether or not ``x`` does.

    Args:
        x (Tensor[B, N, D] or Tensor[N, D]): features; float32, or float16/bfloat16 (fp32 accumulate).
        labels (Tensor[B, N] or Tensor[N], int64): cluster of each row, in ``[0, k)``.
        k (int): number of clusters, at least 1.

    Returns:
        sums (Tensor[B, k, D] or Tensor[k, D], float32): sum of the rows of each cluster; the CPU
            accumulates in float64, so CPU sums can differ from GPU sums in the last bits.
        counts (Tensor[B, k] or Tensor[k], int64): rows per cluster, exact.
    """
    if _use_kernels(x.device):
        return torch.ops.xdc_fast.kmeans_update(x, labels, k)
    check_update_inputs(x, labels, k)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise ValueError(f"kmeans_update: labels should lie in [0, k) = [0, {k}), got {bad}")
    return reference.kmeans_update_reference(x.detach(), labels, k)


if HAS_EXTENSION:

    @torch.library.register_fake("xdc_fast::kmeans_assign")
    def _kmeans_assign_fake(x, centroids, spherical=False, check_finite=False):
        B, N, _, _ = check_assign_inputs(x, centroids)
        shape = (B, N) if x.dim() == 3 else (N,)
        return x.new_empty(shape, dtype=torch.long), x.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("xdc_fast::kmeans_update")
    def _kmeans_update_fake(x, labels, k):
        B, _, D = check_update_inputs(x, labels, k)
        sums_shape = (B, k, D) if x.dim() == 3 else (k, D)
        return x.new_empty(sums_shape, dtype=torch.float32), x.new_empty(sums_shape[:-1], dtype=torch.long)
