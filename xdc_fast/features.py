"""A round's features out of core: each rank's rows in a ``.npy`` file on disk, written and read one
chunk at a time, and k-means trained on a seeded sample of them and assigned in a stream.

At 10^8 clips a modality's features are 10^8 x 256 x 2 B = 51 GB in float16: more than a rank may hold,
but one rank's file is a plain numpy array (``np.load(path, mmap_mode="r")`` opens it). Chunks are read
through a short-lived memory map each, not one map of the whole file: the pages of a map count in the
process's resident set for as long as it stays mapped, so a pass over one big map would grow the resident
set to the file's size.

The fit follows faiss (``max_points_per_centroid``, 256 by default): the sample, about ``k * 256`` points
of all ranks together, drawn by :func:`~xdc_fast.cluster.sample_by_id` so it does not depend on how the
points are shared out, is the only part held in memory; the fitted centroids then assign every point,
chunk by chunk, with its distance and its margin (second-nearest minus nearest distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import distributed as xdist
from .cluster import (MAX_POINTS_PER_CENTROID, KMeans, Whitening, apply_whitening, nearest_other, sample_by_id,
                      whitening_from_moments)

# Rows per chunk of whitened (float16) rows read by the assignment: 65536 x 256 is 32 MiB.
CHUNK_ROWS = 65536
# Rows per chunk of raw rows (float32, both modalities side by side, widened to float64 for the moments):
# 8192 x 1024 x 16 B is 128 MiB, and the chunks are still large enough for BLAS.
RAW_CHUNK_ROWS = 8192


class RowFile:
    """A ``[rows, cols]`` array in a ``.npy`` file, written and read by blocks of rows."""

    def __init__(self, path: str | Path, rows: int, cols: int, dtype, offset: int):
        self.path, self.rows, self.cols, self.dtype, self.offset = Path(path), rows, cols, np.dtype(dtype), offset

    @classmethod
    def create(cls, path: str | Path, rows: int, cols: int, dtype=np.float16) -> "RowFile":
        """A new file of that shape (sparse on disk until written)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, cols))
        offset = array.offset
        del array
        return cls(path, rows, cols, dtype, offset)

    @classmethod
    def open(cls, path: str | Path) -> "RowFile":
        array = np.load(path, mmap_mode="r")
        if array.ndim != 2:
            raise ValueError(f"{path} should hold a 2-D array of rows, got shape {array.shape}")
        rows, cols, dtype, offset = array.shape[0], array.shape[1], array.dtype, array.offset
        del array
        return cls(path, rows, cols, dtype, offset)

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.dtype.itemsize

    def write(self, start: int, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        if values.ndim != 2 or values.shape[1] != self.cols or start < 0 or start + len(values) > self.rows:
            raise ValueError(f"{self.path}: rows {start}..{start + len(values)} of width {values.shape[-1]} do not fit "
                             f"a [{self.rows}, {self.cols}] file")
        with open(self.path, "r+b") as f:
            f.seek(self.offset + start * self.cols * self.dtype.itemsize)
            f.write(values.tobytes())

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as an array of their own (the map is closed before returning)."""
        stop = min(stop, self.rows)
        if stop <= start:
            return np.zeros((0, self.cols), dtype=self.dtype)
        view = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(stop - start, self.cols),
                         offset=self.offset + start * self.cols * self.dtype.itemsize)
        block = np.array(view)
        del view
        return block

    def chunks(self, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.rows, rows):
            yield start, self.read(start, start + rows)


# ---- whitening from moments ------------------------------------------------------------------------------

def fit_whitening_files(files: list[RowFile], dim: int, eps: float = 1e-5, *, chunk_rows: int = RAW_CHUNK_ROWS
                        ) -> Whitening:
    """The PCA-whitening of the rows ``[f_1 | f_2 | ...]`` (the files side by side, one row per point),
    from float64 moments summed chunk by chunk and all-reduced across ranks: ``fit_whitening`` of the same
    rows, without holding them."""
    if len({f.rows for f in files}) != 1:
        raise ValueError("fit_whitening_files: the files should have the same number of rows")
    width = sum(f.cols for f in files)
    if dim == 0:
        return Whitening(None, None, eps, True)
    total = torch.zeros(width, dtype=torch.float64)
    outer = torch.zeros(width, width, dtype=torch.float64)
    for start in range(0, files[0].rows, chunk_rows):
        block = torch.from_numpy(np.concatenate([f.read(start, start + chunk_rows) for f in files], axis=1)).double()
        total += block.sum(0)
        outer += block.T @ block
    n = int(xdist.all_reduce_sum(torch.tensor([files[0].rows], dtype=torch.long))[0])
    mean, projection = whitening_from_moments(n, xdist.all_reduce_sum(total), xdist.all_reduce_sum(outer),
                                              min(dim, width), eps, "fit_whitening_files")
    return Whitening(mean, projection, eps, True)


def whiten_files(files: list[RowFile], whitening: Whitening, out: str | Path, *, dtype=np.float16,
                 chunk_rows: int = RAW_CHUNK_ROWS) -> RowFile:
    """The rows of ``files`` side by side, through ``whitening``, into a new file (float16 by default: the
    rows are L2-normalised, where float16 keeps 3 significant digits of every coordinate)."""
    width = whitening.dim or sum(f.cols for f in files)
    target = RowFile.create(out, files[0].rows, width, dtype)
    for start in range(0, files[0].rows, chunk_rows):
        block = torch.from_numpy(np.concatenate([f.read(start, start + chunk_rows) for f in files], axis=1))
        target.write(start, apply_whitening(block.float(), whitening).numpy())
    return target


# ---- sampled fit and streamed assignment -----------------------------------------------------------------

@dataclass
class StreamedFit:
    """A sampled k-means fit and the assignment of every row of this rank's files."""

    kmeans: KMeans  # fitted on the sample (its ``labels`` are the sample's)
    centroids: torch.Tensor  # [B, K, D]
    labels: np.ndarray  # [B, rows] int64
    distance: np.ndarray  # [B, rows] float32, squared distance to the own centroid
    margin: np.ndarray  # [B, rows] float32, second-nearest minus nearest (0: a tie)
    sample_size: int  # points trained on, all ranks


def read_sample(files: list[RowFile], keep: np.ndarray, *, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Rows ``keep`` (sorted positions) of every file as ``[B, len(keep), D]`` float32."""
    out = torch.empty(len(files), len(keep), files[0].cols)
    for b, f in enumerate(files):
        done = 0
        for start in range(0, f.rows, chunk_rows):
            wanted = keep[(keep >= start) & (keep < start + chunk_rows)]
            if len(wanted):
                block = f.read(start, start + chunk_rows)
                out[b, done : done + len(wanted)] = torch.from_numpy(block[wanted - start].astype(np.float32))
                done += len(wanted)
    return out


def fit_streamed(files: list[RowFile], ids: np.ndarray, k: int, *, niter: int = 20, nredo: int = 1, seed: int = 0,
                 max_points_per_centroid: int | None = MAX_POINTS_PER_CENTROID, init=None, margins: bool = True,
                 chunk_rows: int = CHUNK_ROWS, verbose: bool = False) -> StreamedFit:
    """k-means of B problems (one file each, this rank's rows; ``ids`` numbers them across ranks) trained on
    the sample :func:`~xdc_fast.cluster.sample_by_id` draws (everything when there are at most
    ``k * max_points_per_centroid`` points), then every row assigned chunk by chunk.

    ``init`` is a callable ``init(sample_ids_of_this_rank, all_sample_ids, k)`` returning a KMeans init
    callable (pretraining's ``DatasetPermutationInit``, which gives the same centroids however the points
    are shared out); None uses KMeans's random init (k of rank 0's sampled points). With the same seed,
    the centroids and labels are those of ``KMeans(..., max_points_per_centroid=...).fit(x, ids=ids)`` on the
    whole rows in memory."""
    n_total = int(xdist.all_reduce_sum(torch.tensor([files[0].rows], dtype=torch.long))[0])
    size = n_total if max_points_per_centroid is None else k * max_points_per_centroid
    keep = np.flatnonzero(sample_by_id(ids, n_total, size, seed))
    sample = read_sample(files, keep, chunk_rows=chunk_rows)
    sample_ids = np.asarray(ids, dtype=np.int64)[keep]
    how = "random" if init is None else init(
        sample_ids, np.sort(torch.cat(xdist.all_gather_tensors(torch.from_numpy(sample_ids))).numpy()), k)
    kmeans = KMeans(files[0].cols, k, niter=niter, nredo=nredo, seed=seed, init=how, verbose=verbose).fit(sample)
    kmeans.labels = None  # the sample's: with the sample itself, not kept through the assignment pass
    del sample
    labels, distance, margin = assign_stream(files, kmeans.centroids, margins=margins, chunk_rows=chunk_rows)
    sampled = int(xdist.all_reduce_sum(torch.tensor([len(keep)], dtype=torch.long))[0])
    return StreamedFit(kmeans, kmeans.centroids, labels, distance, margin, sampled)


def assign_stream(files: list[RowFile], centroids: torch.Tensor, *, margins: bool = True,
                  chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest of ``centroids [B, K, D]`` for every row of ``files`` (one per problem), chunk by chunk with
    the fused kernels: labels (int64), squared distances and margins (float32; NaN when ``margins`` is
    False or k is 1), each ``[B, rows]``."""
    from .ops import kmeans_assign

    B, rows = len(files), files[0].rows
    labels = np.empty((B, rows), dtype=np.int64)
    distance = np.empty((B, rows), dtype=np.float32)
    margin = np.full((B, rows), np.nan, dtype=np.float32)
    for b, f in enumerate(files):
        c = centroids[b].float()
        for start, block in f.chunks(chunk_rows):
            x = torch.from_numpy(block.astype(np.float32))
            found, dist = kmeans_assign(x, c)
            labels[b, start : start + len(x)] = found.numpy()
            distance[b, start : start + len(x)] = dist.numpy()
            if margins and c.shape[0] > 1:
                _, second = nearest_other(x, c, found)
                margin[b, start : start + len(x)] = (second - dist).clamp_min(0).numpy()
    return labels, distance, margin


__all__ = ["RowFile", "CHUNK_ROWS", "RAW_CHUNK_ROWS", "fit_whitening_files", "whiten_files", "StreamedFit", "fit_streamed",
           "assign_stream", "read_sample"]
