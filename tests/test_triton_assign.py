"""The Triton kernel of the certified assignment against the emulation (xdc_fast.certified) and float64.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py
sets before anything imports triton); with one, on CUDA."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_certified import float64_labels, straddling_pairs
from xdc_fast.certified import certified_assign, emulated_top2, gaussian_mixture, round_problem, score_error_bound

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def kernel():
    module = importlib.import_module("xdc_fast.triton_assign")
    if not torch.cuda.is_available():
        assert module.interpreted(), "tests/conftest.py should have chosen Triton's interpreter"
    return module


def check_against_the_emulation(kernel, x, c, precision, centre=True):
    """The kernel's per-row (winner, best, second) agree with the emulated tensor core within the error
    bound, and the certified labels through the kernel are the float64 argmin."""
    problem = round_problem(x, c, precision, centre)
    winner, best, second, finite = kernel.triton_top2(precision)(problem)
    e_winner, e_best, e_second, e_finite = emulated_top2(problem)
    assert torch.equal(finite, e_finite)
    # Both estimate the same exact quantity within E each, so they differ by at most 2E.
    slack = 2 * score_error_bound(e_best[..., None], problem)[..., 0]
    assert bool(((best.double() - e_best.double()).abs() <= slack).all())
    if c.shape[1] > 1:
        slack = 2 * score_error_bound(e_second[..., None], problem)[..., 0]
        assert bool(((second.double() - e_second.double()).abs() <= slack).all())
        # Where the emulation's winner is certain, the kernel must have found the same one.
        sure = (e_second.double() - e_best.double()) > 4 * slack
        assert torch.equal(winner[sure], e_winner[sure])
    else:
        assert bool(torch.isinf(second).all()) and int(winner.max()) == 0
    result = certified_assign(x, c, precision, centre, top2=kernel.triton_top2(precision))
    assert torch.equal(result.labels, float64_labels(x, c))
    return result


@pytest.mark.parametrize("d,k", [(1, 255), (7, 257), (200, 1), (513, 257), (7, 1), (200, 255)])
def test_labels_are_exact_for_odd_shapes_bf16(kernel, d, k):
    generator = torch.Generator().manual_seed(d * 1000 + k)
    x, c = torch.randn(3, 45, d, generator=generator), torch.randn(3, k, d, generator=generator)
    check_against_the_emulation(kernel, x, c, "bf16")  # 45 rows: a partial second row tile


@pytest.mark.parametrize("d,k", [(7, 257), (200, 255)])
def test_labels_are_exact_for_odd_shapes_tf32(kernel, d, k):
    generator = torch.Generator().manual_seed(d + k)
    x, c = torch.randn(3, 45, d, generator=generator), torch.randn(3, k, d, generator=generator)
    check_against_the_emulation(kernel, x, c, "tf32")


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_duplicates_and_ties_are_rechecked_and_go_to_the_lowest_index(kernel, precision):
    base = torch.randint(-4, 5, (3, 20, 7), generator=torch.Generator().manual_seed(5)).float()
    c = torch.cat([base, base], 1)[:, torch.randperm(40, generator=torch.Generator().manual_seed(6))]
    x = torch.cat([c[:, :24], (c[:, :10] + c[:, 10:20]) / 2, torch.randn(3, 11, 7)], 1)
    result = check_against_the_emulation(kernel, x, c, precision)
    assert bool(result.rechecked[:, :34].all())  # a tie can never be certified


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_near_ties_in_the_last_bits(kernel, precision):
    midpoint, straddling = straddling_pairs((3, 10, 33), precision)
    x = (midpoint[:, :, None] + 1e-6 * torch.randn(3, 10, 4, 33)).flatten(1, 2)
    result = check_against_the_emulation(kernel, x, straddling, precision)
    assert float(result.rechecked.double().mean()) > 0.9


def test_a_large_common_offset(kernel):
    x, c = gaussian_mixture(150, 32, 24, batch=3, noise=1.0, generator=torch.Generator().manual_seed(2))
    centred = check_against_the_emulation(kernel, x + 1e3, c + 1e3, "bf16", centre=True)
    raw = check_against_the_emulation(kernel, x + 1e3, c + 1e3, "bf16", centre=False)
    assert float(centred.rechecked.double().mean()) < 0.1 < float(raw.rechecked.double().mean())


def test_normalised_mixtures_are_mostly_certified(kernel):
    x, c = gaussian_mixture(300, 64, 64, batch=1, noise=2.0, generator=torch.Generator().manual_seed(1))
    result = check_against_the_emulation(kernel, x, c, "bf16")
    assert float(result.rechecked.double().mean()) < 0.2
    assert not math.isnan(float(result.bound.max()))


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_the_kernel_compiles_for_hopper_with_wgmma_and_no_spills(precision):
    """Compiled here for sm_90 without a GPU, in a process without the interpreter: the SASS must hold
    HGMMA (tensor cores, not FMA), and ptxas must keep every value in registers."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(root / "benchmarks/triton_compile_gate.py"), "--precision", precision],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ptxas_ok"] and report["cuobjdump_ok"], report
    assert report["ptx_wgmma"] > 0 and report["sass_hgmma"] > 0, report
    assert report["spill_bytes"] == 0, report


def test_row_offsets_hold_the_10m_shape_in_64_bits(kernel):
    """N = 10M rows of D = 256, two problems: offsets reach 5.1e9, past 32-bit integers (the kernel once
    multiplied in int32 and read wrong rows there). Checked on the kernel's own arithmetic, without
    allocating the 20 GB such inputs take."""
    n, d = 10_000_000, 256
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = kernel.row_offsets(1, n * d, n - 8, d, count=8, device=device).cpu()
    expected = torch.tensor([n * d + row * d for row in range(n - 8, n)], dtype=torch.int64)
    assert torch.equal(got, expected)
    assert int(expected.max()) > 2**32  # the shape does exceed what 32 bits hold
