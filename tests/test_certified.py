import math
import struct
from fractions import Fraction

import pytest
import torch

from xdc_fast.certified import (
    certified_assign,
    gaussian_mixture,
    rechecked_fraction,
    round_problem,
    round_to_bf16,
    round_to_tf32,
    score_error_bound,
    tensor_core_scores,
)

EMULATION_UNIT = 2.0**-24  # the emulation adds in round-to-nearest float32: the sharpest valid bound


def as_batch(t):
    return t if t.dim() == 3 else t.unsqueeze(0)


def float64_distances(x, c):
    """[B, N, K] squared distances from direct float64 differences, a few rows at a time."""
    x3, c3 = as_batch(x).double(), as_batch(c).double()
    rows = max(1, (1 << 21) // (c3.shape[1] * c3.shape[2]))
    blocks = [(x3[:, i : i + rows, None] - c3[:, None]).square().sum(-1) for i in range(0, x3.shape[1], rows)]
    return torch.cat(blocks, 1)


def float64_labels(x, c):
    labels = float64_distances(x, c).argmin(-1)  # the first minimum: lowest index on ties
    return labels if x.dim() == 3 else labels[0]


def float32_from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


EDGE_VALUES = [
    0.0, -0.0, 1.0, -1.0, float32_from_bits(1), float32_from_bits(0x807FFFFF), float32_from_bits(0x00800000),
    float32_from_bits(0x7F7FFFFF), float32_from_bits(0xFF7FFFFF), float32_from_bits(0x7F7F7FFF),
    1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 1 + 2**-11, 1 + 3 * 2**-11, 2**-133, 3 * 2**-134,
    2**-137, 3 * 2**-137, 65504.0, 1e-40, -1e-45, 3.4e38, math.inf, -math.inf,
]


def test_bf16_rounding_matches_torch_bit_for_bit():
    random_bits = torch.randint(-(2**31), 2**31, (300_000,), dtype=torch.int64).to(torch.int32)
    x = torch.cat([random_bits.view(torch.float32), torch.tensor(EDGE_VALUES, dtype=torch.float32)])
    # Every exponent, subnormals, the overflow boundary and both signs, plus exact halfway cases.
    x = torch.cat([x, (torch.randint(0, 2**16, (100_000,), dtype=torch.int32) * 2**16 + 2**15).view(torch.float32)])
    ours, torchs = round_to_bf16(x), x.to(torch.bfloat16).float()
    nan = torch.isnan(x)
    assert torch.equal(bits_of(ours)[~nan], bits_of(torchs)[~nan])
    assert bool(torch.isnan(ours[nan]).all())
    assert ours.shape == x.shape and ours.dtype == torch.float32


def tf32_from_float64(v: float) -> float:
    """Round to 11 significant bits (ties to even) with tf32's subnormal spacing of 2^-136."""
    if not math.isfinite(v) or v == 0:
        return v
    _, exponent = math.frexp(v)
    quantum = 2.0 ** max(exponent - 11, -136)
    rounded = round(v / quantum) * quantum  # Python rounds halves to even; the scaling is exact
    if abs(rounded) >= 2.0**128:
        return math.copysign(math.inf, v)
    return math.copysign(rounded, v) if rounded == 0 else rounded


def test_tf32_rounding_matches_a_float64_construction():
    hand = {1 + 2**-11: 1.0, 1 + 3 * 2**-11: 1 + 2**-9, -(1 + 3 * 2**-11): -(1 + 2**-9), 2**-137: 0.0,
            3 * 2**-137: 2**-135, float32_from_bits(0x7F7FFFFF): math.inf, float32_from_bits(1): 0.0}
    for value, expected in hand.items():
        assert tf32_from_float64(value) == expected, value
        assert round_to_tf32(torch.tensor([value], dtype=torch.float32)).item() == expected, value
    values = EDGE_VALUES + torch.randint(-(2**31), 2**31, (20_000,), dtype=torch.int64).to(torch.int32).view(
        torch.float32).tolist()
    values = [v for v in values if not math.isnan(v)]
    ours = round_to_tf32(torch.tensor(values, dtype=torch.float32)).tolist()
    expected = [tf32_from_float64(v) for v in values]
    assert ours == expected
    assert all(math.copysign(1, a) == math.copysign(1, b) for a, b in zip(ours, expected))  # signed zeros
    assert math.isnan(round_to_tf32(torch.tensor([math.nan])).item())


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("d", [1, 7, 200, 513])
@pytest.mark.parametrize("k", [1, 255, 257])
def test_labels_are_the_float64_argmin(precision, d, k):
    x, c = torch.randn(3, 131, d), torch.randn(3, k, d)
    result = certified_assign(x, c, precision)
    assert result.labels.shape == (3, 131) and result.labels.dtype == torch.int64
    assert result.rechecked.shape == (3, 131) and result.bound.shape == (3, 131)
    assert torch.equal(result.labels, float64_labels(x, c))
    if k == 1:
        assert int(result.labels.max()) == 0 and not bool(result.rechecked.any())


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_duplicate_centroids_and_exact_ties_go_to_the_lowest_index(precision):
    base = torch.randint(-4, 5, (3, 40, 7)).float()
    c = torch.cat([base, base], 1)[:, torch.randperm(80)]  # every centroid twice, copies scattered
    x = torch.cat([
        c[:, :50],  # on a centroid: distance 0, shared with its copy
        (c[:, :30] + c[:, 30:60]) / 2,  # halfway between two integer centroids: exact ties
        torch.randn(3, 77, 7) * 3,
    ], 1)
    result = certified_assign(x, c, precision)
    assert torch.equal(result.labels, float64_labels(x, c))
    assert bool(result.rechecked[:, :80].all())  # a tie can never be certified
    many_copies = torch.ones(300, 4)
    assert int(certified_assign(torch.randn(100, 4), many_copies, precision).labels.max()) == 0


DROPPED_BITS = {"bf16": 16, "tf32": 13}
ROUND = {"bf16": round_to_bf16, "tf32": round_to_tf32}


def straddling_pairs(shape, precision):
    """Centroid pairs one float32 ulp either side of the midpoint between two adjacent bf16/tf32
    values: exactly, they are nearly the same point; rounded, a whole bf16/tf32 ulp apart."""
    lower = ROUND[precision](torch.rand(shape) + 0.5)
    upper = (bits_of(lower) + (1 << DROPPED_BITS[precision])).view(torch.float32)
    midpoint = (lower + upper) / 2
    below = torch.nextafter(midpoint, torch.zeros_like(midpoint))
    above = torch.nextafter(midpoint, torch.full_like(midpoint, math.inf))
    assert torch.equal(ROUND[precision](below), lower) and torch.equal(ROUND[precision](above), upper)
    return midpoint, torch.stack([below, above], -2).flatten(-3, -2)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("centre", [True, False])
def test_near_ties_in_the_last_bits_are_resolved_exactly(precision, centre):
    c = torch.randn(3, 64, 33)
    neighbour = torch.nextafter(c, torch.full_like(c, math.inf))
    same_rounding = torch.stack([c, neighbour], 2).flatten(1, 2)  # centroids 2j and 2j+1 one ulp apart
    x = torch.cat([c + 1e-3 * torch.randn_like(c), (c + neighbour) / 2, torch.randn(3, 100, 33)], 1)
    result = certified_assign(x, same_rounding, precision, centre)
    assert torch.equal(result.labels, float64_labels(x, same_rounding))
    assert bool(result.rechecked[:, :128].all())
    # Rows next to the midpoints, where the rounded centroids often point to the wrong one of a pair:
    # only the bound keeps such rows from being certified.
    midpoint, straddling = straddling_pairs((3, 20, 33), precision)
    x = (midpoint[:, :, None] + 1e-6 * torch.randn(3, 20, 8, 33)).flatten(1, 2)
    result = certified_assign(x, straddling, precision, centre)
    assert torch.equal(result.labels, float64_labels(x, straddling))
    assert float(result.rechecked.double().mean()) > 0.9


def test_a_tie_below_float64_resolution_is_decided_exactly():
    # 1e10^2 + 4 and 1e10^2 + 1 are one float64 value; the second centroid is nearer all the same.
    x = torch.tensor([[1e10, 0.0]])
    c = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, -1.0]])
    exact = [sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(x[0].tolist(), row)) for row in c.tolist()]
    assert exact.index(min(exact)) == 1
    assert certified_assign(x, c).labels.tolist() == [1]


def test_common_offset_is_harmless_with_centring_and_costly_without():
    x, c = gaussian_mixture(600, 32, 24, batch=3, noise=1.0)
    x, c = x + 1e3, c + 1e3
    centred = certified_assign(x, c, "bf16", centre=True)
    raw = certified_assign(x, c, "bf16", centre=False)
    expected = float64_labels(x, c)
    assert torch.equal(centred.labels, expected) and torch.equal(raw.labels, expected)
    centred_fraction = float(centred.rechecked.double().mean())
    raw_fraction = float(raw.rechecked.double().mean())
    assert centred_fraction < 0.1
    assert raw_fraction > 0.5 and raw_fraction > 5 * centred_fraction


@pytest.mark.parametrize("precision,limit", [("bf16", 0.2), ("tf32", 0.05)])
def test_bound_certifies_most_rows_of_normalised_mixtures(precision, limit):
    x, c = gaussian_mixture(2000, 64, 64, batch=2, noise=2.0, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x.norm(dim=-1), torch.ones(2, 2000))
    result = certified_assign(x, c, precision)
    assert torch.equal(result.labels, float64_labels(x, c))
    assert float(result.rechecked.double().mean()) < limit
    assert rechecked_fraction(x, c, precision) == float(result.rechecked.double().mean())


def test_certified_rows_keep_the_tensor_core_winner():
    x, c = gaussian_mixture(500, 48, 40, noise=2.0)
    result = certified_assign(x, c, "bf16")
    problem = round_problem(x[None], c[None], "bf16")
    tensor_core_labels = tensor_core_scores(problem.x, problem.c).argmin(-1)[0]
    certified = ~result.rechecked
    assert bool(certified.any())
    assert torch.equal(result.labels[certified], tensor_core_labels[certified])


def bound_violation_ratio(x, c, precision, centre):
    """max over entries of |s^ + ||x~||^2 - ||x - c||^2| / E: above 1 means the bound is wrong."""
    problem = round_problem(x, c, precision, centre)
    scores = tensor_core_scores(problem.x, problem.c)
    bound = score_error_bound(scores, problem, accumulation_unit=EMULATION_UNIT)
    shift = problem.x.double().square().sum(-1, keepdim=True)
    truth = float64_distances(x, c)
    # The float64 references carry ~1e-16 relative error of their own.
    slack = 1e-13 * (shift + truth)
    return float(((scores.double() + shift - truth).abs() / (bound + slack)).max())


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
@pytest.mark.parametrize("centre", [True, False])
def test_bound_holds_for_every_score_and_is_tight(precision, centre):
    ratios = {}
    for d in (1, 2, 7, 64, 200):
        x = torch.randn(3, 400, d) * 3 + 0.5
        c = torch.randn(3, 50, d) * 3 + 0.5
        ratios[d] = bound_violation_ratio(x, c, precision, centre)
    assert max(ratios.values()) <= 1, ratios
    # In two dimensions the rounding errors can line up with the difference vector, and they do
    # somewhere among 60,000 pairs: a bound half as large would fail here.
    assert ratios[2] > 0.6, ratios


def test_bound_covers_the_accumulation_alone():
    # Inputs already in bf16: no rounding error, only the float32 sums remain to bound.
    x, c = round_to_bf16(torch.randn(2, 300, 256)), round_to_bf16(torch.randn(2, 60, 256))
    problem = round_problem(x, c, "bf16", centre=False)
    assert float(problem.alpha.max()) == 0 and float(problem.beta.max()) == 0
    assert 0 < bound_violation_ratio(x, c, "bf16", centre=False) <= 1


def test_score_minus_bound_never_decreases():
    # What lets the kernel certify from the best and second-best scores alone.
    x, c = gaussian_mixture(50, 16, 8)
    problem = round_problem(x[None], c[None], "bf16")
    grid = torch.linspace(-3, 3, 20001, dtype=torch.float32).expand(1, 50, -1)
    lower = grid.double() - score_error_bound(grid, problem)
    assert bool((lower.diff(dim=-1) >= 0).all())


def test_two_dimensional_inputs_and_bad_inputs():
    x, c = torch.randn(137, 9), torch.randn(17, 9)
    result = certified_assign(x, c, "tf32")
    assert result.labels.shape == (137,) and result.rechecked.shape == (137,)
    assert torch.equal(result.labels, certified_assign(x[None], c[None], "tf32").labels[0])
    assert torch.equal(result.labels, float64_labels(x, c))
    with pytest.raises(ValueError, match="finite"):
        certified_assign(torch.full((3, 9), math.nan), c)
    with pytest.raises(ValueError, match="precision"):
        certified_assign(x, c, "fp8")
    with pytest.raises(TypeError, match="float32"):
        certified_assign(x.double(), c)
