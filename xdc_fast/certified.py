"""Certified tensor-core k-means assignment: the executable specification, in plain torch on the CPU.

A tensor core multiplies bf16 (or tf32) inputs, so its nearest-centroid labels can differ from the exact
ones on rows whose two best centroids are nearly equidistant. The certified assignment keeps the speed
and gives exact labels anyway: it scores every (row, centroid) pair from rounded inputs, proves for most
rows that the rounding cannot have changed the winner, and re-decides only the other rows exactly. This
module is that algorithm step by step, with the rounding done bit for bit, so that a CUDA or Triton
kernel can be checked against it. It favours clarity over speed.

The contract: the labels equal the argmin over K of the exact squared distance ||x_n - c_k||^2 of the
float32 inputs, the lowest index winning exact ties -- whatever the precision and whatever the data.

The algorithm, per problem b of a batch:

1. Centre (optional). m = the mean centroid, rounded to float32; y_n = fl(x_n - m), z_k = fl(c_k - m)
   in float32. Any m leaves every distance unchanged; this one makes the vectors, and so their rounding
   errors, small when the data sit far from the origin.
2. Round y and z to the tensor core's input format with round-to-nearest-even: x~ and c~ (bf16 keeps 8
   significant bits, tf32 11; both keep float32's exponent range).
3. Score like a tensor core, s^_nk = fl(cn^_k - 2 d^_nk), where d^_nk accumulates the products
   x~_ni c~_ki and cn^_k the squares c~_ki^2. Such products are exact in float32 (16 or 22 significant
   bits). The emulation walks D in steps of 16 (one wgmma k-step), adds a step's 16 products exactly
   and rounds once into the float32 accumulator -- the accumulator takes part in the fused add, as in
   the hardware -- then goes on to the next step. Each step's sum is formed in float64, which is exact
   unless its products span more than ~2^27 in magnitude; the bound below does not depend on the order.
4. Certify. Let s1 be the row's smallest score (lowest index on ties) and s2 the smallest of the
   others. The row is certified when every score is finite and s2 - s1 > E_n(s1) + E_n(s2); certified
   rows keep the tensor core's winner.
5. Re-decide every other row exactly: float64 distances to all centroids shortlist the centroids that
   float64's own error could make the winner; a shortlist of several is re-scored with direct float64
   differences and, if still within their error, compared in exact integer arithmetic (every float32
   is an integer times 2^-149).

The bound E_n(s). Write x' = x - m and c' = c - m in exact arithmetic (so ||x' - c'|| = ||x - c||),
a_n = x~_n - x'_n and b_k = c~_k - c'_k for the total input errors, T_k = ||x' - c'_k||^2 for the
true squared distance, R_k = ||x~ - c~_k||^2 for the distance between the rounded vectors, and
X_n = ||x~_n||^2. The claim is |s^_nk + X_n - T_k| <= E_n(s^_nk): the tensor core's score, shifted by a
constant of the row, is the exact squared distance within E_n. The row constant cancels when two
centroids of a row are compared.

* Input error. |y_i - x'_i| <= u |y_i| with u = 2^-24 (float32 round-to-nearest; a subtraction whose
  result is subnormal is exact), and x~ - y is exact in float32, so
  ||a_n|| <= alpha_n := ||x~_n - y_n|| + u ||y_n||, measured per row; likewise
  ||b_k|| <= beta := max_k (||c~_k - z_k|| + u ||z_k||) per problem. Without centring y = x and the u
  term vanishes. Let eta_n = alpha_n + beta.
* Rounded against exact distance. x~ - c~ = (x' - c') + (a - b), hence
  |R_k - T_k| = |2 (x~ - c~)·(a - b) - ||a - b||^2| <= 2 sqrt(R_k) eta_n + eta_n^2 (Cauchy-Schwarz).
  This is what makes the bound small: it scales with the distance to the centroid, not with the
  norms, and only the nearest centroids matter for the labels.
* Accumulation. For any summation order, a sum of n terms in a float arithmetic of unit u' is off
  by at most gamma_n(u') sum|terms|, gamma_n(u') = n u' / (1 - n u') (Higham, Accuracy and Stability
  of Numerical Algorithms, ch. 3 and 4). With Cauchy-Schwarz, sum|x~_i c~_ki| <= ||x~|| ||c~_k||, so
  |d^ - x~·c~_k| <= g ||x~|| C and |cn^_k - ||c~_k||^2| <= g C^2 with g = gamma_D(u') and
  C = max_k ||c~_k||. Then the float32 subtraction adds u (|cn^| + 2 |d^|) <= u (1 + g) P. All
  together, with P_n = C^2 + 2 sqrt(X_n) C,
      |s^_nk + X_n - R_k| <= A_n := (g + u (1 + g)) P_n + D 2^-147,
  the last term paying for products and sums that fall below float32's normal range, where relative
  error bounds fail (each such rounding errs by at most 2^-150, and there are fewer than 8 D of them).
  u' is `accumulation_unit`. The emulation rounds to nearest (u' = 2^-24 suffices), but tensor cores'
  multi-term adders align and truncate (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA
  tensor cores", PeerJ CS 2021): rounding toward zero doubles the unit to 2^-23, and truncating every
  aligned term of an m-term fused add costs up to (m + 1)/m <= 2 times more, hence the default
  u' = 2^-22, so that the same bound holds on the hardware. At D = 256 this term is ~1e-4 of the scale,
  far below the rounding of the inputs (~2^-8 for bf16).
* Together. sqrt(R_k) <= sqrt(s^ + X_n + A_n) by the previous line, so
      E_n(s) = 2 eta_n sqrt(max(s + X_n + A_n, 4 eta_n^2)) + eta_n^2 + A_n,
  evaluated in float64 with alpha, beta, C and X_n rounded up, the sum under the root raised by
  2^-50 times its terms' magnitudes (it may cancel), and the whole padded by a relative 2^-40, which
  covers float64's own rounding in the remaining few operations and in s2 - s1.
* Why s1 and s2 suffice. The floor 4 eta^2 under the root (which only loosens the bound) makes
  s - E_n(s) non-decreasing in s: its slope is 1 - eta (1 + 2^-40) / sqrt(max(...)) >= 1/2. So for every
  other centroid k, s^_k >= s2 gives a lower bound s^_k - E_n(s^_k) >= s2 - E_n(s2) > s1 + E_n(s1), an
  upper bound on the winner's; hence T_k > T_winner for every k != winner, and the winner is exact,
  ties included (an exact tie has T_k = T_winner, which the strict inequality excludes). A kernel
  therefore needs only what its epilogue already keeps per row: the best score, its index and the
  second-best score, plus X_n, alpha_n per row and beta, C per problem.

What a kernel must do to match this specification: round x and c to nearest even itself (once per fit
for x), so that alpha and beta describe the values the tensor core really multiplies -- fed float32
for tf32, the hardware would silently drop the low 13 bits instead; compute alpha_n, X_n, beta and C
from the rounded data, rounding upward; keep s1, its index and s2 per row; re-decide the rows that fail
the test. Its scores need not equal this emulation's bit for bit (the hardware's adders differ, which
`accumulation_unit` pays for); its labels must be identical.

Spherical (maximum inner product) assignment is not covered: centring changes inner products.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

# Bits of a float32 significand that each format drops (bf16 keeps 7 stored bits, tf32 10, of 23).
DROPPED_BITS = {"bf16": 16, "tf32": 13}
FP32_UNIT_ROUNDOFF = 2.0**-24
# See the module docstring: truncating multi-term adders, not round-to-nearest, hence twice 2^-23.
HARDWARE_ACCUMULATION_UNIT = 2.0**-22
# One wgmma k-step for 16-bit inputs; the emulation rounds into the accumulator once per step.
TENSOR_CORE_K_STEP = 16
# Error of one rounding below float32's normal range (half its smallest subnormal), times 8 per term.
_SUBNORMAL_SLACK_PER_TERM = 2.0**-147
# Pads the bound's own float64 evaluation; see "Together" in the module docstring.
_FLOAT64_PAD = 1.0 + 2.0**-40
# Float64 step sums materialised at a time (64 MiB): the rows per block follow from K and D.
_BLOCK_ELEMENTS = 1 << 23


def _round_significand(x: torch.Tensor, dropped_bits: int) -> torch.Tensor:
    """Round float32 values to ``23 - dropped_bits`` stored significand bits, ties to even, on the bits."""
    if x.dtype != torch.float32:
        raise TypeError(f"expected a float32 tensor, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    sign = bits ^ magnitude
    finite = magnitude < 0x7F800000
    # NaN payloads could carry past bit 31; they are passed through untouched below anyway.
    magnitude = torch.where(finite, magnitude, torch.zeros_like(magnitude))
    # Adding just under half an output ulp, plus the bit that will become the output's last one, rounds
    # halves to even; a carry out of the significand correctly bumps the exponent (or reaches inf).
    # The largest finite magnitude plus the addend stays below 2^31, so int32 never wraps.
    half_ulp_minus_one = (1 << (dropped_bits - 1)) - 1
    kept_lsb = (magnitude >> dropped_bits) & 1
    rounded = (magnitude + half_ulp_minus_one + kept_lsb) & -(1 << dropped_bits)
    result = (rounded | sign).view(torch.float32).view(x.shape)
    return torch.where(finite.view(x.shape), result, x)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """The bfloat16 nearest to each float32 (ties to even), as float32; inf and NaN pass through."""
    return _round_significand(x, DROPPED_BITS["bf16"])


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """The tf32 nearest to each float32 (ties to even), as float32; inf and NaN pass through."""
    return _round_significand(x, DROPPED_BITS["tf32"])


def round_to_precision(x: torch.Tensor, precision: str) -> torch.Tensor:
    """round_to_bf16 or round_to_tf32, by name."""
    if precision not in DROPPED_BITS:
        raise ValueError(f"precision should be one of {sorted(DROPPED_BITS)}, got {precision!r}")
    return _round_significand(x, DROPPED_BITS[precision])


def gamma(n: int, unit: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float sum."""
    if n * unit >= 1:
        return math.inf
    return n * unit / (1 - n * unit)


def _norm_upper(v: torch.Tensor) -> torch.Tensor:
    # Squares of float32 values are exact in float64; the D-term sum and the root err by at most
    # (D + 1) 2^-53 relative, which the factor more than covers.
    d = v.shape[-1]
    return torch.linalg.vector_norm(v.double(), dim=-1) * (1 + (d + 4) * 2.0**-52)


class RoundedProblem(NamedTuple):
    """The tensor core's inputs for a batch of problems and the per-row and per-problem quantities of
    the bound (module docstring: alpha, X, beta, C)."""

    x: torch.Tensor  # [B, N, D] float32 holding bf16/tf32 values: x~
    c: torch.Tensor  # [B, K, D] float32: c~
    alpha: torch.Tensor  # [B, N] float64, >= ||x~_n - (x_n - m)||
    row_sq_norm: torch.Tensor  # [B, N] float64, >= ||x~_n||^2
    beta: torch.Tensor  # [B] float64, >= max_k ||c~_k - (c_k - m)||
    max_centroid_norm: torch.Tensor  # [B] float64, >= max_k ||c~_k||


def round_problem(x: torch.Tensor, c: torch.Tensor, precision: str = "bf16", centre: bool = True) -> RoundedProblem:
    """Steps 1-2 (centre, round) and the input-error terms of the bound; x [B, N, D], c [B, K, D] float32."""
    if centre:
        # Rounded from float64 so that the centre does not depend on torch's float32 reduction order.
        m = c.double().mean(dim=1, keepdim=True).float()
        y, z = x - m, c - m
        subtraction_unit = FP32_UNIT_ROUNDOFF
    else:
        y, z = x, c
        subtraction_unit = 0.0
    x_rounded = round_to_precision(y, precision)
    c_rounded = round_to_precision(z, precision)
    alpha = _norm_upper(x_rounded - y) + subtraction_unit * _norm_upper(y)
    beta = (_norm_upper(c_rounded - z) + subtraction_unit * _norm_upper(z)).amax(dim=-1)
    return RoundedProblem(
        x=x_rounded,
        c=c_rounded,
        alpha=alpha,
        row_sq_norm=_norm_upper(x_rounded).square() * (1 + 2.0**-50),
        beta=beta,
        max_centroid_norm=_norm_upper(c_rounded).amax(dim=-1),
    )


def _accumulate_like_tensor_core(step_sums: torch.Tensor) -> torch.Tensor:
    """Add the k-steps' float64 sums [S, ...] into a float32 accumulator in order, rounding once per step."""
    acc = torch.zeros(step_sums.shape[1:], dtype=torch.float32)
    exact = torch.empty(step_sums.shape[1:], dtype=torch.float64)
    for step_sum in step_sums:
        torch.add(step_sum, acc, out=exact)
        acc.copy_(exact)  # float64 -> float32 conversion rounds to nearest even
    return acc


def _split_into_k_steps(t: torch.Tensor) -> torch.Tensor:
    """[B, R, D] -> float64 [S, B, R, 16], zero-padded: zeros leave every step's sum unchanged."""
    d = t.shape[-1]
    steps = -(-d // TENSOR_CORE_K_STEP)
    padded = torch.nn.functional.pad(t.double(), (0, steps * TENSOR_CORE_K_STEP - d))
    return padded.unflatten(-1, (steps, TENSOR_CORE_K_STEP)).permute(2, 0, 1, 3)


def tensor_core_scores(x_rounded: torch.Tensor, c_rounded: torch.Tensor) -> torch.Tensor:
    """Step 3: s^ = fl(cn^ - 2 d^) [B, n, K] float32 from rounded inputs [B, n, D] and [B, K, D]."""
    x_steps, c_steps = _split_into_k_steps(x_rounded), _split_into_k_steps(c_rounded)
    dots = _accumulate_like_tensor_core(x_steps @ c_steps.transpose(-1, -2))
    centroid_sq_norms = _accumulate_like_tensor_core(c_steps.square().sum(-1))
    return centroid_sq_norms.unsqueeze(-2) - 2 * dots  # float32, rounded to nearest once


def score_error_bound(scores: torch.Tensor, problem: RoundedProblem, rows: slice = slice(None),
                      accumulation_unit: float = HARDWARE_ACCUMULATION_UNIT) -> torch.Tensor:
    """E_n(s) of the module docstring, elementwise, float64, for scores [B, n, ...] of ``problem``'s
    rows ``rows``: |s^_nk + ||x~_n||^2 - ||x_n - c_k||^2| <= E_n(s^_nk), and s - E_n(s) is
    non-decreasing in s."""
    d = problem.x.shape[-1]
    g = gamma(d, accumulation_unit)
    row_sq = problem.row_sq_norm[:, rows]
    big_c = problem.max_centroid_norm[:, None]
    products = big_c.square() + 2 * row_sq.sqrt() * big_c
    accumulation = (g + FP32_UNIT_ROUNDOFF * (1 + g)) * products + d * _SUBNORMAL_SLACK_PER_TERM
    eta = problem.alpha[:, rows] + problem.beta[:, None]
    extra = [None] * (scores.dim() - 2)
    row_sq, accumulation, eta = (t[(..., *extra)] for t in (row_sq, accumulation, eta))
    terms = (scores.double(), row_sq, accumulation)
    # The float64 sum may cancel; its error is relative to the terms' magnitudes, not to the result.
    distance_estimate = sum(terms) + 2.0**-50 * sum(t.abs() for t in terms)
    root = torch.maximum(distance_estimate, 4 * eta.square()).sqrt()
    return (2 * eta * root + eta.square() + accumulation) * _FLOAT64_PAD


def _to_exact_integer(v: float) -> int:
    # Every float32 is a multiple of 2^-149, so this scaling is exact (and math.ldexp is exact).
    return int(math.ldexp(v, 149))


def _nearest_among(row: torch.Tensor, centroids: torch.Tensor, candidates: torch.Tensor) -> int:
    """The exact nearest of ``candidates`` (ascending indices) to one float64-held float32 row."""
    d = row.shape[-1]
    # Direct differences: float64 cancellation cannot swamp them, and they err by gamma_{D+2} relative
    # (doubled, as below, to cover the rounding of the error estimate itself).
    distance = (row - centroids[candidates]).square().sum(-1)
    error = distance * gamma(2 * d + 4, 2.0**-53)
    candidates = candidates[distance - error <= (distance + error).min()]
    if len(candidates) == 1:
        return int(candidates[0])
    exact_row = [_to_exact_integer(v) for v in row.tolist()]
    winner, winner_distance, seen = -1, None, set()
    for index in candidates.tolist():
        values = tuple(centroids[index].tolist())
        if values in seen:  # a duplicate of a lower index, which wins the tie
            continue
        seen.add(values)
        exact_distance = sum((a - b) * (a - b) for a, b in zip(exact_row, map(_to_exact_integer, values)))
        if winner_distance is None or exact_distance < winner_distance:  # strict: lowest index on ties
            winner, winner_distance = index, exact_distance
    return winner


def exact_nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Step 5 for rows x [R, D] against centroids c [K, D] (float32): the exact argmin of the squared
    distance, lowest index on ties, as int64 [R]."""
    r, d = x.shape
    labels = torch.empty(r, dtype=torch.long)
    x64, c64 = x.double(), c.double()
    centroid_sq_norms = c64.square().sum(-1)
    centroid_norms = centroid_sq_norms.sqrt()
    # The float64 expansion errs by at most gamma_{D+4}(2^-53) (||x|| + ||c||)^2; it only shortlists.
    # Twice that covers the float64 rounding of the norms in the estimate.
    expansion_error = gamma(2 * d + 8, 2.0**-53)
    rows_per_block = max(1, (1 << 22) // c.shape[0])
    for start in range(0, r, rows_per_block):
        block = x64[start : start + rows_per_block]
        row_sq_norms = block.square().sum(-1, keepdim=True)
        approx = row_sq_norms - 2 * block @ c64.T + centroid_sq_norms
        slack = expansion_error * (row_sq_norms.sqrt() + centroid_norms).square()
        candidates = approx - slack <= (approx + slack).amin(-1, keepdim=True)
        labels[start : start + len(block)] = approx.argmin(-1)
        for row in torch.nonzero(candidates.sum(-1) > 1).flatten().tolist():
            labels[start + row] = _nearest_among(block[row], c64, torch.nonzero(candidates[row]).flatten())
    return labels


class CertifiedAssignment(NamedTuple):
    labels: torch.Tensor  # [B, N] or [N] int64: the exact nearest centroid, lowest index on ties
    rechecked: torch.Tensor  # [B, N] or [N] bool: rows the tensor-core pass could not certify
    bound: torch.Tensor  # [B, N] or [N] float64: E(s1) + E(s2), what s2 - s1 had to exceed (E(s1) if K = 1)


Top2 = Callable[[RoundedProblem], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
"""``top2(problem) -> (winner, best, second, all_finite)``, each [B, N]: per row, the index of the
smallest score (lowest on ties), that score and the smallest of the others (float32; inf when K = 1),
and whether every score was finite -- what a tensor-core kernel's epilogue keeps."""


def emulated_top2(problem: RoundedProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``Top2`` of the emulated tensor core (``tensor_core_scores``), a block of rows at a time."""
    batch, n, d = problem.x.shape
    k = problem.c.shape[1]
    parts = []
    rows_per_block = max(1, _BLOCK_ELEMENTS // (batch * k * -(-d // TENSOR_CORE_K_STEP)))
    for start in range(0, n, rows_per_block):
        parts.append(top2_of_scores(tensor_core_scores(problem.x[:, start : start + rows_per_block], problem.c)))
    return tuple(torch.cat(part, dim=1) for part in zip(*parts))


def top2_of_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``Top2`` of a score matrix [..., K]: winner (lowest index on ties), best, second (inf when K = 1)
    and whether the row's scores are all finite."""
    winner = scores.argmin(dim=-1, keepdim=True)  # the first minimum: lowest index on ties
    best = scores.gather(-1, winner)
    second = scores.scatter(-1, winner, math.inf).amin(dim=-1, keepdim=True)
    return winner[..., 0], best[..., 0], second[..., 0], torch.isfinite(scores).all(dim=-1)


def certify_rows(problem: RoundedProblem, best: torch.Tensor, second: torch.Tensor, all_finite: torch.Tensor,
                 k: int, accumulation_unit: float = HARDWARE_ACCUMULATION_UNIT
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 for every row of ``problem``: (certified [B, N] bool, bound [B, N] float64), the bound being
    E(s1) + E(s2) (E(s1) when k = 1), what s2 - s1 had to exceed."""
    bound_best = score_error_bound(best[..., None], problem, slice(None), accumulation_unit)[..., 0]
    if k == 1:
        return all_finite.clone(), bound_best
    bound = bound_best + score_error_bound(second[..., None], problem, slice(None), accumulation_unit)[..., 0]
    return all_finite & ((second.double() - best.double()) > bound), bound


def certified_assign(x: torch.Tensor, c: torch.Tensor, precision: str = "bf16", centre: bool = True, *,
                     accumulation_unit: float = HARDWARE_ACCUMULATION_UNIT,
                     top2: Top2 | None = None) -> CertifiedAssignment:
    """Exact nearest-centroid labels through an emulated bf16/tf32 tensor-core pass plus exact re-checks.

    Args:
        x (Tensor[B, N, D] or Tensor[N, D], float32): the rows.
        c (Tensor[B, K, D] or Tensor[K, D], float32): the centroids, same rank as ``x``.
        precision: "bf16" or "tf32", the tensor core's input format.
        centre: subtract the mean centroid first (exact labels either way; fewer re-checks when the
            data sit far from the origin).
        accumulation_unit: u' of the accumulation error bound; the default holds for tensor cores.
        top2: the pass that scores the rounded problem (default: the emulation; a kernel's, to check it
            or to use it).
    """
    if x.dim() not in (2, 3) or c.dim() != x.dim():
        raise ValueError(f"x and c should both be [N, D] / [K, D] or [B, N, D] / [B, K, D], "
                         f"got {tuple(x.shape)} and {tuple(c.shape)}")
    if x.dtype != torch.float32 or c.dtype != torch.float32:
        raise TypeError(f"x and c should be float32, got {x.dtype} and {c.dtype}")
    x3 = (x if x.dim() == 3 else x.unsqueeze(0)).detach().cpu()
    c3 = (c if c.dim() == 3 else c.unsqueeze(0)).detach().cpu()
    if x3.shape[0] != c3.shape[0] or x3.shape[2] != c3.shape[2] or c3.shape[1] < 1 or x3.shape[2] < 1:
        raise ValueError(f"x {tuple(x.shape)} and c {tuple(c.shape)} should share B and D, with K >= 1 and D >= 1")
    if not (torch.isfinite(x3).all() and torch.isfinite(c3).all()):
        raise ValueError("x and c should be finite: the nearest centroid of NaN or Inf is undefined")
    batch, n, _ = x3.shape
    k = c3.shape[1]

    problem = round_problem(x3, c3, precision, centre)
    winner, best, second, all_finite = (top2 or emulated_top2)(problem)
    certified, bound = certify_rows(problem, best, second, all_finite, k, accumulation_unit)
    labels, rechecked = winner.clone(), ~certified

    for b in range(batch):
        uncertain = torch.nonzero(rechecked[b]).flatten()
        if len(uncertain):
            labels[b, uncertain] = exact_nearest(x3[b, uncertain], c3[b])

    device = x.device
    labels, rechecked, bound = labels.to(device), rechecked.to(device), bound.to(device)
    if x.dim() == 2:
        return CertifiedAssignment(labels[0], rechecked[0], bound[0])
    return CertifiedAssignment(labels, rechecked, bound)


def rechecked_fraction(x: torch.Tensor, c: torch.Tensor, precision: str = "bf16", centre: bool = True) -> float:
    """The fraction of rows that the tensor-core pass leaves to the exact re-check."""
    return float(certified_assign(x, c, precision, centre).rechecked.double().mean())


def _lloyd(x: torch.Tensor, k: int, iterations: int, generator: torch.Generator | None) -> torch.Tensor:
    centroids = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iterations):
        labels = (centroids.square().sum(-1) - 2 * x @ centroids.T).argmin(-1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(-1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


def gaussian_mixture(
    n: int, d: int, k: int, *, batch: int | None = None, noise: float = 1.0, iterations: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test and simulation data: n L2-normalised rows drawn around k random unit directions (the noise's
    norm is ``noise`` times the direction's before normalising), and k centroids from ``iterations``
    Lloyd steps started at k random rows, as k-means would hold them (never exactly the directions,
    and with boundaries through crowded regions where components overlap)."""
    rows, centroids = [], []
    for _ in range(1 if batch is None else batch):
        directions = torch.nn.functional.normalize(torch.randn(k, d, generator=generator), dim=-1)
        component = torch.randint(0, k, (n,), generator=generator)
        spread = torch.randn(n, d, generator=generator) * (noise / math.sqrt(d))
        x = torch.nn.functional.normalize(directions[component] + spread, dim=-1)
        rows.append(x)
        centroids.append(_lloyd(x, min(k, n), iterations, generator))
    if batch is None:
        return rows[0], centroids[0]
    return torch.stack(rows), torch.stack(centroids)
