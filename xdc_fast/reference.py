"""Plain-torch twins of the k-means ops.

They define what the compiled kernels must compute, serve as the fallback when ``xdc_fast._C`` is
missing, and are the "what a user would write" baseline of ``xdc-fast bench kmeans``. They follow the
same contracts as :mod:`xdc_fast.ops` (shapes, dtypes, lowest index on exact ties) but materialise a
``chunk x K`` block of distances at a time.
"""

from __future__ import annotations

import torch

# Rows per distance block. On the CPU, 4096 x K floats stays a few tens of MB for K up to a few
# thousand; on a GPU small blocks would leave it idle between launches, so a block there holds up to
# 2^28 distances (1 GiB).
DEFAULT_CHUNK_ROWS = 4096
GPU_CHUNK_DISTANCES = 1 << 28


def default_chunk_rows(device: torch.device, k: int) -> int:
    if device.type == "cuda":
        return max(DEFAULT_CHUNK_ROWS, GPU_CHUNK_DISTANCES // max(k, 1))
    return DEFAULT_CHUNK_ROWS


def _as_batch(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t if t.dim() == rank else t.unsqueeze(0)


def kmeans_assign_reference(
    x: torch.Tensor, centroids: torch.Tensor, spherical: bool = False, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by ``mm`` + ``argmin`` over blocks of rows; see :func:`xdc_fast.ops.kmeans_assign`."""
    x3 = _as_batch(x, 3).float()
    c3 = _as_batch(centroids, 3).float()
    B, N, _ = x3.shape
    chunk_rows = chunk_rows or default_chunk_rows(x.device, c3.shape[1])
    labels = torch.empty(B, N, dtype=torch.long, device=x.device)
    dist = torch.empty(B, N, dtype=torch.float32, device=x.device)
    cnorm = c3.pow(2).sum(-1)
    for b in range(B):
        for start in range(0, N, chunk_rows):
            block = x3[b, start : start + chunk_rows]
            dots = block @ c3[b].T
            if spherical:
                best = dots.argmax(1)
                dist[b, start : start + len(block)] = (block * c3[b, best]).sum(1)
            else:
                best = (cnorm[b] - 2 * dots).argmin(1)
                dist[b, start : start + len(block)] = (block - c3[b, best]).pow(2).sum(1)
            labels[b, start : start + len(block)] = best
    if x.dim() == 2:
        return labels[0], dist[0]
    return labels, dist


def kmeans_update_reference(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts by ``index_add_`` and ``bincount``; see :func:`xdc_fast.ops.kmeans_update`."""
    x3 = _as_batch(x, 3).float()
    l2 = _as_batch(labels, 2)
    B, _, D = x3.shape
    sums = torch.zeros(B, k, D, dtype=torch.float32, device=x.device)
    counts = torch.zeros(B, k, dtype=torch.long, device=x.device)
    for b in range(B):
        sums[b].index_add_(0, l2[b], x3[b])
        counts[b] = torch.bincount(l2[b], minlength=k)
    if x.dim() == 2:
        return sums[0], counts[0]
    return sums, counts
