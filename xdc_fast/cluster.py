"""Batched k-means on top of the fused kernels, and DeepCluster's feature preprocessing.

``KMeans`` follows faiss's Lloyd loop and vocabulary (``d``, ``k``, ``niter``, ``nredo``, ``obj``,
``imbalance_factor``, ``nsplit``): assign, sum, divide, split empty clusters. It takes a batch of B
independent problems ``[B, N, D]`` and runs them in the same kernel launches, which is how XDC
clusters its video and audio features together. Under ``torch.distributed`` each rank passes its
own shard; sums, counts and objectives are all-reduced, so every rank holds the same centroids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import distributed as xdist
from .ops import check_finite, kmeans_assign, kmeans_update

# faiss's relative perturbation when a split gives one centroid's position to two clusters.
SPLIT_EPS = 1.0 / 1024
# k-means++ seeds on at most this many points per centroid (drawn at random): the sequential
# algorithm costs k passes over its input, which must not be millions of points.
KMEANSPP_POINTS_PER_CENTROID = 8
# Rows per block when PCA accumulates its float64 statistics.
PCA_BLOCK_ROWS = 65536
# faiss's default cap on training points per centroid: beyond k * 256 points the centroids barely move
# (a sampled fit of 2M points at k = 1024 lands within a fraction of a percent of the full fit's
# objective, benchmarks/results/kmeans_scale_cpu.md), while every iteration costs N * k * d.
MAX_POINTS_PER_CENTROID = 256
# Rows per block of the final assignment: a float32 copy of one block at a time, not of all points.
ASSIGN_BLOCK_ROWS = 65536


class KMeans:
    """k-means (Lloyd) with faiss's conventions, for one problem ``[N, D]`` or a batch ``[B, N, D]``.

    Args:
        d: dimension of the points.
        k: number of centroids.
        niter: Lloyd iterations; 20 is DeepCluster's choice.
        nredo: restarts with different seeds; each problem keeps its best objective.
        spherical: maximise inner products and L2-normalise centroids after each update.
        seed: seed of every random choice (init, subsampling, splits); None draws one.
        init: ``"random"`` picks k distinct training points of rank 0; ``"kmeans++"`` seeds by D^2
            sampling on a random subsample of ``KMEANSPP_POINTS_PER_CENTROID * k`` points; or a callable
            ``init(x [B, N, D], generator) -> centroids [B, K, D]`` called once per restart with this
            rank's points and that restart's generator, which must return the same centroids on every
            rank (pretraining draws clips from the whole dataset across ranks this way).
        max_points_per_centroid: train on a random subset of about ``k * max_points_per_centroid``
            points (faiss uses 256, ``MAX_POINTS_PER_CENTROID``); None trains on every point. Labels always
            cover every point. With ``fit(..., ids=...)`` the subset is drawn by :func:`sample_by_id`, so it
            is the same points however they are shared across ranks.
        verbose: print one line per iteration.

    After ``fit``: ``centroids`` (``[K, D]`` or ``[B, K, D]``), ``labels`` (``[N]`` or ``[B, N]``, this
    rank's points against the final centroids), ``obj`` (numpy, one objective per iteration:
    ``[niter]`` or ``[niter, B]``; the sum of squared distances, or of similarities when spherical),
    and ``stats`` (one dict per iteration: ``obj``, ``imbalance_factor``, ``nsplit``, ``time``).
    """

    def __init__(
        self,
        d: int,
        k: int,
        *,
        niter: int = 20,
        nredo: int = 1,
        spherical: bool = False,
        seed: int | None = None,
        init: str | Callable[[torch.Tensor, torch.Generator], torch.Tensor] = "random",
        max_points_per_centroid: int | None = None,
        verbose: bool = False,
    ):
        if d < 1:
            raise ValueError(f"KMeans: d should be at least 1, got {d}")
        if k < 1:
            raise ValueError(f"KMeans: k should be at least 1, got {k}")
        if niter < 0:
            raise ValueError(f"KMeans: niter should be non-negative, got {niter}")
        if nredo < 1:
            raise ValueError(f"KMeans: nredo should be at least 1, got {nredo}")
        if not callable(init) and init not in ("random", "kmeans++"):
            raise ValueError(f"KMeans: init should be 'random' or 'kmeans++', got {init!r}")
        if max_points_per_centroid is not None and max_points_per_centroid < 1:
            raise ValueError(f"KMeans: max_points_per_centroid should be at least 1, got {max_points_per_centroid}")
        self.d, self.k = d, k
        self.niter, self.nredo = niter, nredo
        self.spherical = spherical
        self.seed = seed
        self.init = init
        self.max_points_per_centroid = max_points_per_centroid
        self.verbose = verbose
        self.centroids: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.obj: np.ndarray | None = None
        self.stats: list[dict] = []

    # ----------------------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor, init_centroids: torch.Tensor | None = None, *,
            ids: torch.Tensor | np.ndarray | None = None) -> "KMeans":
        """Cluster ``x`` (``[N, D]`` or ``[B, N, D]``; this rank's shard when distributed).

        ``ids`` (int64 ``[N]``, optional): a global number of each of this rank's points, unique across
        ranks; with ``max_points_per_centroid`` the training subset is then a function of the ids and the
        seed alone, so one process and several ranks train on the same points. A half-precision ``x`` is
        widened to float32 only for the subset and one block of the final assignment at a time."""
        batched = self._check_points(x)
        x3 = x if batched else x.unsqueeze(0)
        B, N, _ = x3.shape
        n_total = int(xdist.all_reduce_sum(torch.tensor([N], dtype=torch.long))[0])
        if n_total < self.k:
            raise ValueError(f"KMeans: {self.k} clusters need at least {self.k} points, got {n_total}")
        sampling = self.max_points_per_centroid is not None and n_total > self.k * self.max_points_per_centroid
        if ids is not None and len(ids) != N:
            raise ValueError(f"KMeans.fit: ids should have one entry per point ({N}), got {len(ids)}")
        if not sampling:
            x3 = x3.float()
            check_finite(x3, "KMeans.fit")
        start = self._check_init_centroids(init_centroids, batched, x3)

        seed = self._resolve_seed()
        if sampling and ids is not None:
            keep = torch.from_numpy(np.flatnonzero(sample_by_id(np.asarray(ids), n_total, self.k * self.max_points_per_centroid,
                                                                seed)))
            if self.verbose and xdist.is_main_process():
                print(f"KMeans: sampling about {self.k * self.max_points_per_centroid} of {n_total} points for training")
            train = x3[:, keep.to(x3.device)].float()
        else:
            train = self._subsample(x3, n_total, torch.Generator().manual_seed(seed + 7919 * (xdist.rank() + 1)))
            train = train.float()
        if sampling:
            check_finite(train, "KMeans.fit")

        best = None
        for redo in range(self.nredo):
            if start is not None:
                centroids = start.clone()
            elif callable(self.init):
                # The whole shard, not the subsample: a callable init may address points by position.
                centroids = self._checked_init(self.init(x3, torch.Generator().manual_seed(seed + redo)), x3)
            else:
                centroids = self._initial_centroids(train, torch.Generator().manual_seed(seed + redo))
            run = self._lloyd(train, centroids, torch.Generator().manual_seed(seed + 104729 + redo))
            best = run if best is None else self._keep_best(best, run)

        centroids, obj, imbalance, nsplit, elapsed = best
        if sampling:
            labels = assign_blocks(x3, centroids, self.spherical)[0]
        else:
            labels, _ = kmeans_assign(x3, centroids, self.spherical, check_finite_input=False)
        self.centroids = centroids if batched else centroids[0]
        self.labels = labels if batched else labels[0]
        self.obj = obj if batched else obj[:, 0]
        self.stats = [
            {
                "obj": self._per_problem(obj[i], batched),
                "imbalance_factor": self._per_problem(imbalance[i], batched),
                "nsplit": self._per_problem(nsplit[i], batched),
                "time": float(elapsed[i]),
            }
            for i in range(len(elapsed))
        ]
        return self

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest fitted centroid of each point: ``(labels int64, dist float32)``, shaped like ``x[..., 0]``."""
        if self.centroids is None:
            raise RuntimeError("KMeans.assign: call fit first")
        if x.dim() != self.centroids.dim():
            raise ValueError(
                f"KMeans.assign: x should be {self.centroids.dim()}-D like the fitted problem, got {x.dim()}-D"
            )
        return kmeans_assign(x.float(), self.centroids.to(x.device), self.spherical)

    # ----------------------------------------------------------------------------------------------
    def _check_points(self, x: torch.Tensor) -> bool:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"KMeans.fit: x should be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(f"KMeans.fit: x should be [N, D] or [B, N, D], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.d:
            raise ValueError(f"KMeans.fit: x should have d = {self.d} columns, got {x.shape[-1]}")
        if not x.is_floating_point():
            raise TypeError(f"KMeans.fit: x should be floating point, got {x.dtype}")
        return x.dim() == 3

    def _check_init_centroids(self, init, batched: bool, x3: torch.Tensor) -> torch.Tensor | None:
        if init is None:
            return None
        want = (x3.shape[0], self.k, self.d) if batched else (self.k, self.d)
        if tuple(init.shape) != want:
            raise ValueError(f"KMeans.fit: init_centroids should have shape {list(want)}, got {list(init.shape)}")
        init3 = init if batched else init.unsqueeze(0)
        return init3.to(device=x3.device, dtype=torch.float32)

    def _checked_init(self, centroids: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        want = (x3.shape[0], self.k, self.d)
        if tuple(centroids.shape) != want:
            raise ValueError(f"KMeans.fit: the init callable should return shape {list(want)}, "
                             f"got {list(centroids.shape)}")
        return centroids.to(device=x3.device, dtype=torch.float32)

    def _resolve_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        # Every rank must take the same random decisions: rank 0 draws, the others listen.
        drawn = torch.randint(0, 2**31 - 1, (1,), dtype=torch.long)
        return int(xdist.broadcast(drawn)[0])

    def _subsample(self, x3: torch.Tensor, n_total: int, gen: torch.Generator) -> torch.Tensor:
        if self.max_points_per_centroid is None or n_total <= self.k * self.max_points_per_centroid:
            return x3
        keep = max(1, round(x3.shape[1] * self.k * self.max_points_per_centroid / n_total))
        if self.verbose and xdist.is_main_process():
            print(f"KMeans: sampling {self.k * self.max_points_per_centroid} of {n_total} points for training")
        rows = torch.stack([torch.randperm(x3.shape[1], generator=gen)[:keep] for _ in range(x3.shape[0])])
        rows = rows.to(x3.device)
        return torch.gather(x3, 1, rows[..., None].expand(-1, -1, x3.shape[2]))

    def _initial_centroids(self, train: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Initial centroids from rank 0's shard, broadcast so every rank starts the same."""
        B, N, D = train.shape
        centroids = torch.empty(B, self.k, D, device=train.device)
        if xdist.is_main_process():
            if N < self.k:
                raise ValueError(
                    f"KMeans: initialisation draws {self.k} centroids from rank 0's {N} points; "
                    "give rank 0 at least k points or pass init_centroids"
                )
            for b in range(B):
                if self.init == "random":
                    rows = torch.randperm(N, generator=gen)[: self.k].to(train.device)
                    centroids[b] = train[b, rows]
                else:
                    centroids[b] = self._kmeanspp(train[b], gen)
        return xdist.broadcast(centroids)

    def _kmeanspp(self, points: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        sample = min(points.shape[0], KMEANSPP_POINTS_PER_CENTROID * self.k)
        pool = points[torch.randperm(points.shape[0], generator=gen)[:sample].to(points.device)]
        chosen = torch.empty(self.k, dtype=torch.long)
        chosen[0] = int(torch.randint(sample, (1,), generator=gen))
        closest = self._score(pool, pool[chosen[0]])
        for i in range(1, self.k):
            weights = closest.clamp_min(0).double().cpu()
            if float(weights.sum()) <= 0:  # every pool point already is a centroid: pick any other
                weights = torch.ones(sample, dtype=torch.float64)
                weights[chosen[:i]] = 0
            chosen[i] = int(torch.multinomial(weights, 1, generator=gen))
            closest = torch.minimum(closest, self._score(pool, pool[chosen[i]]))
        return pool[chosen.to(points.device)]

    def _score(self, pool: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
        """D^2 sampling weight of every pool point against one centroid (1 - cos for spherical)."""
        if self.spherical:
            return 1.0 - pool @ centroid
        return (pool - centroid).pow(2).sum(1)

    def _lloyd(self, train: torch.Tensor, centroids: torch.Tensor, gen: torch.Generator):
        B = train.shape[0]
        obj = np.zeros((self.niter, B))
        imbalance = np.zeros((self.niter, B))
        nsplit = np.zeros((self.niter, B), dtype=np.int64)
        elapsed = np.zeros(self.niter)
        t0 = time.perf_counter()
        for it in range(self.niter):
            labels, dist = kmeans_assign(train, centroids, self.spherical, check_finite_input=False)
            obj[it] = xdist.all_reduce_sum(dist.double().sum(1)).cpu().numpy()
            sums, counts = kmeans_update(train, labels, self.k)
            sums, counts = xdist.all_reduce_sum(sums), xdist.all_reduce_sum(counts)
            centroids = sums / counts.clamp_min(1).unsqueeze(-1).to(sums.dtype)
            counts_cpu = counts.cpu()
            imbalance[it] = imbalance_factor(counts_cpu).numpy()
            nsplit[it] = split_empty_clusters(centroids, counts_cpu, gen)
            if self.spherical:
                centroids = torch.nn.functional.normalize(centroids, dim=-1)
            elapsed[it] = time.perf_counter() - t0
            if self.verbose and xdist.is_main_process():
                print(
                    f"  iteration {it:3d}  obj {_fmt(obj[it])}  imbalance {_fmt(imbalance[it])}  "
                    f"nsplit {nsplit[it].tolist()}  {elapsed[it]:.2f} s"
                )
        return centroids, obj, imbalance, nsplit, elapsed

    def _keep_best(self, best, run):
        """Per problem, the run with the best final objective (lowest, or highest when spherical)."""
        if self.niter == 0:
            return best
        final_best, final_run = best[1][-1], run[1][-1]
        take = final_run > final_best if self.spherical else final_run < final_best
        if not take.any():
            return best
        mask = torch.as_tensor(take, device=best[0].device)
        centroids = torch.where(mask[:, None, None], run[0], best[0])
        merged = [np.where(take[None, :], r, b) for b, r in zip(best[1:4], run[1:4])]
        return (centroids, *merged, run[4])

    @staticmethod
    def _per_problem(values: np.ndarray, batched: bool):
        return values.tolist() if batched else values[0].item()


def imbalance_factor(counts: torch.Tensor) -> torch.Tensor:
    """faiss's imbalance factor per problem: k * sum(n_i^2) / (sum n_i)^2; 1 is perfectly balanced."""
    c = counts.double()
    total = c.sum(-1)
    return c.shape[-1] * c.pow(2).sum(-1) / total.pow(2).clamp_min(1)


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, gen: torch.Generator) -> np.ndarray:
    """faiss's rule, in place: each empty cluster takes the position of a donor drawn with
    probability proportional to (size - 1); both move by a relative +-SPLIT_EPS in opposite
    directions and the donor's count is halved between them. Returns the splits per problem."""
    B, K, D = centroids.shape
    nsplit = np.zeros(B, dtype=np.int64)
    sign = torch.ones(D, dtype=torch.float32)
    sign[1::2] = -1  # dimension parity decides who moves which way, as in faiss
    for b in range(B):
        empty = (counts[b] == 0).nonzero().flatten().tolist()
        if not empty:
            continue
        sizes = counts[b].double().clone()
        c = centroids[b].cpu()
        for ci in empty:
            weights = (sizes - 1).clamp_min(0)
            if float(weights.sum()) <= 0:
                break  # no cluster has a point to spare (only possible with fewer points than clusters)
            cj = int(torch.multinomial(weights, 1, generator=gen))
            donor = c[cj].clone()
            c[ci] = donor * (1 + sign * SPLIT_EPS)
            c[cj] = donor * (1 - sign * SPLIT_EPS)
            sizes[ci] = sizes[cj] / 2
            sizes[cj] -= sizes[ci]
            nsplit[b] += 1
        centroids[b] = c.to(centroids.device)
    return nsplit


def pca_whiten(x: torch.Tensor, dim: int = 256, eps: float = 1e-5, *, l2_normalize: bool = True) -> torch.Tensor:
    """DeepCluster's preprocessing: PCA to ``dim`` with whitening (eigenvalues to the power -1/2,
    regularised by ``eps``), then L2-normalised rows.

    ``x`` is ``[N, D]`` or ``[B, N, D]`` (B problems whitened independently); ``dim = 0`` skips PCA;
    ``dim`` larger than D is clamped to D. Under ``torch.distributed`` the mean and covariance are
    those of all ranks' rows together. Statistics accumulate in float64; returns float32.

    The same as ``apply_whitening(x, fit_whitening(x, dim, eps, l2_normalize=...))``; those two keep the
    transform, so that new points can be mapped exactly as the fitted ones were.
    """
    return apply_whitening(x, fit_whitening(x, dim, eps, l2_normalize=l2_normalize, caller="pca_whiten"))


@dataclass
class Whitening:
    """A fitted PCA-whitening (or L2-only) transform: ``normalize((x - mean) @ projection)``.

    ``mean`` is ``[D]`` or ``[B, D]`` and ``projection`` ``[D, dim]`` or ``[B, D, dim]`` (float64, the
    eigenvectors already divided by ``sqrt(eigenvalue + eps)``); both are None when PCA is off
    (``dim`` 0). ``eps`` is kept to describe the transform, it is already inside ``projection``.
    """

    mean: torch.Tensor | None
    projection: torch.Tensor | None
    eps: float
    l2_normalize: bool = True

    @property
    def dim(self) -> int:
        """Output dimension, 0 when PCA is off (the output keeps the input's dimension)."""
        return 0 if self.projection is None else int(self.projection.shape[-1])

    def problem(self, b: int) -> "Whitening":
        """The transform of problem ``b`` of a batched fit, as an unbatched one."""
        if self.mean is None or self.mean.dim() == 1:
            return self
        return Whitening(self.mean[b], self.projection[b], self.eps, self.l2_normalize)

    def to_dict(self) -> dict:
        """Plain tensors and numbers (loadable with ``torch.load(..., weights_only=True)``), on the CPU."""
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {"mean": cpu(self.mean), "projection": cpu(self.projection), "eps": float(self.eps),
                "l2_normalize": bool(self.l2_normalize)}

    @classmethod
    def from_dict(cls, values: dict) -> "Whitening":
        return cls(values["mean"], values["projection"], float(values["eps"]), bool(values["l2_normalize"]))


def fit_whitening(x: torch.Tensor, dim: int = 256, eps: float = 1e-5, *, l2_normalize: bool = True,
                  caller: str = "fit_whitening") -> Whitening:
    """The transform :func:`pca_whiten` applies to ``x``, as data (see :class:`Whitening`)."""
    if x.dim() not in (2, 3):
        raise ValueError(f"{caller}: x should be [N, D] or [B, N, D], got shape {tuple(x.shape)}")
    if dim < 0:
        raise ValueError(f"{caller}: dim should be non-negative (0 = no PCA), got {dim}")
    if dim == 0:
        return Whitening(None, None, eps, l2_normalize)
    x3 = (x if x.dim() == 3 else x.unsqueeze(0)).float()
    B, N, D = x3.shape
    dim = min(dim, D)
    means, projections = [], []
    for b in range(B):
        total = torch.zeros(D, dtype=torch.float64, device=x3.device)
        outer = torch.zeros(D, D, dtype=torch.float64, device=x3.device)
        for start in range(0, N, PCA_BLOCK_ROWS):
            block = x3[b, start : start + PCA_BLOCK_ROWS].double()
            total += block.sum(0)
            outer += block.T @ block
        n = int(xdist.all_reduce_sum(torch.tensor([N], dtype=torch.long))[0])
        mean, projection = whitening_from_moments(n, xdist.all_reduce_sum(total), xdist.all_reduce_sum(outer), dim,
                                                  eps, caller)
        means.append(mean)
        projections.append(projection)
    mean, projection = torch.stack(means), torch.stack(projections)
    if x.dim() == 2:
        mean, projection = mean[0], projection[0]
    return Whitening(mean, projection, eps, l2_normalize)


def whitening_from_moments(n: int, total: torch.Tensor, outer: torch.Tensor, dim: int, eps: float,
                           caller: str = "fit_whitening") -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and whitening projection ``[D, dim]`` (float64) from the count, the sum ``[D]`` and the
    sum of outer products ``[D, D]`` of the rows (all ranks' together): moments are all a fit needs, so
    they can be summed chunk by chunk from rows that are never held at once."""
    if n < 2:
        raise ValueError(f"{caller}: needs at least 2 points, got {n}")
    D = total.shape[0]
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = torch.arange(D - 1, D - 1 - dim, -1, device=total.device)
    return mean, evecs[:, top] / torch.sqrt(evals[top].clamp_min(0) + eps)


def apply_whitening(x: torch.Tensor, whitening: Whitening) -> torch.Tensor:
    """``x`` (``[N, D]`` or ``[B, N, D]``, batched like the fit) through a fitted transform; float32.

    The arithmetic is pca_whiten's, step for step, so the fitted points come out bit for bit the same."""
    if x.dim() not in (2, 3):
        raise ValueError(f"apply_whitening: x should be [N, D] or [B, N, D], got shape {tuple(x.shape)}")
    x3 = (x if x.dim() == 3 else x.unsqueeze(0)).float()
    out = x3
    if whitening.projection is not None:
        mean, projection = whitening.mean, whitening.projection
        if mean.dim() != x.dim() - 1:
            fitted = "batched" if mean.dim() == 2 else "unbatched"
            raise ValueError(f"apply_whitening: the transform was fitted on {fitted} points, got x of shape "
                             f"{tuple(x.shape)}")
        mean3 = mean if mean.dim() == 2 else mean.unsqueeze(0)
        projection3 = projection if projection.dim() == 3 else projection.unsqueeze(0)
        if mean3.shape[0] != x3.shape[0] or mean3.shape[1] != x3.shape[2]:
            raise ValueError(f"apply_whitening: the transform takes {mean3.shape[0]} problem(s) of dimension "
                             f"{mean3.shape[1]}, got x of shape {tuple(x.shape)}")
        out = torch.empty(x3.shape[0], x3.shape[1], projection3.shape[-1], device=x3.device)
        for b in range(x3.shape[0]):
            out[b] = (x3[b] - mean3[b].to(x3.device).float()) @ projection3[b].to(x3.device).float()
    if whitening.l2_normalize:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out if x.dim() == 3 else out[0]


def nearest_other(x: torch.Tensor, centroids: torch.Tensor,
                  excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point of ``x [N, D]``, the nearest of ``centroids [K, D]`` other than ``excluded[i]``:
    ``(labels, squared distances)``. The margin of an assignment (second-nearest minus nearest) is a
    confidence; this gives the second-nearest with the same kernels, one call per excluded centroid,
    so the work is one assignment pass in all."""
    k = centroids.shape[0]
    if k < 2:
        raise ValueError("nearest_other: needs at least 2 centroids")
    labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    dist = torch.full((x.shape[0],), float("nan"), dtype=torch.float32, device=x.device)
    if not len(x):
        return labels, dist
    # The excluded centroid is moved out of reach in place (and put back) rather than the others copied for
    # every call: at k = 1024 the copies cost more than the kernels. At 3R from the origin, where R bounds
    # every norm, it is farther (> 4R^2) from any point than every real centroid (<= R^2).
    moved = centroids.float().clone()
    reach = float(torch.linalg.vector_norm(x.float(), dim=1).max() + torch.linalg.vector_norm(moved, dim=1).max())
    far = torch.zeros(moved.shape[1], device=moved.device)
    far[0] = 3 * max(reach, 1.0)
    for c in torch.unique(excluded).tolist():
        rows = (excluded == c).nonzero().flatten()
        kept = moved[c].clone()
        moved[c] = far
        labels[rows], dist[rows] = kmeans_assign(x[rows].float(), moved)
        moved[c] = kept
    return labels, dist


def assign_blocks(x: torch.Tensor, centroids: torch.Tensor, spherical: bool = False, *,
                  block_rows: int = ASSIGN_BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``kmeans_assign`` of ``x [B, N, D]`` (any float dtype) one block of rows at a time, each widened to
    float32 on its own: the labels and distances are the one call's, row for row."""
    B, N, _ = x.shape
    labels = torch.empty(B, N, dtype=torch.long, device=x.device)
    dist = torch.empty(B, N, dtype=torch.float32, device=x.device)
    for begin in range(0, N, block_rows):
        block = x[:, begin : begin + block_rows].float()
        check_finite(block, "KMeans.fit")
        labels[:, begin : begin + block_rows], dist[:, begin : begin + block_rows] = kmeans_assign(
            block, centroids, spherical, check_finite_input=False)
    return labels, dist


def sample_by_id(ids: np.ndarray, n_total: int, size: int, seed: int) -> np.ndarray:
    """Which points of ``ids`` (global point numbers, int64) a sample of about ``size`` of ``n_total``
    points keeps: a boolean mask. Each point is kept with probability ``size / n_total`` by a hash of
    (seed, id) (splitmix64), so the sample depends on the ids and the seed only, not on which rank holds
    which point, and costs no communication; its size varies by about sqrt(size)."""
    if size >= n_total:
        return np.ones(len(ids), dtype=bool)
    with np.errstate(over="ignore"):
        z = np.asarray(ids, dtype=np.int64).astype(np.uint64) + np.uint64(seed % 2**63) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < size / n_total


def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:.6g}" for v in np.atleast_1d(values))


__all__ = ["KMeans", "pca_whiten", "assign_blocks", "sample_by_id", "MAX_POINTS_PER_CENTROID", "Whitening", "fit_whitening", "whitening_from_moments", "apply_whitening", "nearest_other", "imbalance_factor",
           "split_empty_clusters", "SPLIT_EPS"]
