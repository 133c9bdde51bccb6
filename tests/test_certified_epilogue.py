"""csrc/cuda/certified_epilogue.h, the tensor-core kernel's epilogue, run on the CPU by
tests/cpp/test_certified_epilogue.cpp (partitioned as a wgmma accumulator is, merged as the shuffles
merge), against the specification in xdc_fast/certified.py: the same rounding bit for bit, the same
(winner, best, second) per row, the same certification and the same bound."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_certified import EDGE_VALUES
from xdc_fast.certified import (
    DROPPED_BITS,
    HARDWARE_ACCUMULATION_UNIT,
    certify_rows,
    gaussian_mixture,
    round_problem,
    round_to_precision,
    tensor_core_scores,
    top2_of_scores,
)

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "c++")
NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs {CXX}")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("epilogue") / "test_certified_epilogue"
    cmd = [CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests/cpp/test_certified_epilogue.cpp"), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    return exe


def run(harness, mode: str, payload: bytes, tmp_path) -> bytes:
    source, result = tmp_path / f"{mode}.in", tmp_path / f"{mode}.out"
    source.write_bytes(payload)
    done = subprocess.run([str(harness), mode, str(source), str(result)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return result.read_bytes()


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_rounding_is_the_specification_bit_for_bit(harness, precision, tmp_path):
    random_bits = torch.randint(-(2**31), 2**31, (200_000,), dtype=torch.int64).to(torch.int32)
    halfway = torch.randint(0, 2**16, (50_000,), dtype=torch.int32) * 2**16 + 2**15  # bf16 ties
    x = torch.cat([random_bits.view(torch.float32), torch.tensor(EDGE_VALUES, dtype=torch.float32),
                   halfway.view(torch.float32)])
    bits = x.view(torch.int32).numpy().astype("<u4")
    payload = np.array([len(bits), DROPPED_BITS[precision]], "<i4").tobytes() + bits.tobytes()
    ours = np.frombuffer(run(harness, "round", payload, tmp_path), "<u4")
    expected = round_to_precision(x, precision).view(torch.int32).numpy().astype("<u4")
    assert np.array_equal(ours, expected)


RECORD = np.dtype([("row", "<i4"), ("winner", "<i4"), ("best", "<f4"), ("second", "<f4"), ("certified", "u1"),
                   ("bound", "<f8")])


def epilogue(harness, scores: torch.Tensor, problem, tile_n: int, tmp_path):
    """The harness's per-row results for one problem's score matrix [rows, K], ordered by row."""
    rows, k = scores.shape
    header = np.array([rows, k, problem.x.shape[-1], tile_n], "<i4").tobytes() + np.array(
        [HARDWARE_ACCUMULATION_UNIT, float(problem.beta[0]), float(problem.max_centroid_norm[0])], "<f8").tobytes()
    payload = (header + scores.numpy().astype("<f4").tobytes() + problem.alpha[0].numpy().astype("<f8").tobytes()
               + problem.row_sq_norm[0].numpy().astype("<f8").tobytes())
    records = np.frombuffer(run(harness, "tile", payload, tmp_path), RECORD)
    assert sorted(records["row"].tolist()) == list(range(rows))  # every row once
    return np.sort(records, order="row")


def check(harness, x, c, precision, tile_n, tmp_path, scores=None):
    problem = round_problem(x[None], c[None], precision)
    if scores is None:
        scores = tensor_core_scores(problem.x, problem.c)[0]
    got = epilogue(harness, scores, problem, tile_n, tmp_path)
    winner, best, second, all_finite = top2_of_scores(scores[None])
    certified, bound = certify_rows(problem, best, second, all_finite, c.shape[0])
    # A row with a NaN or inf score is never certified, so what it names as winner does not matter (torch
    # takes NaN as the minimum, the kernel skips it).
    finite = all_finite[0].numpy()
    assert np.array_equal(got["winner"][finite], winner[0].numpy()[finite])
    assert np.array_equal(got["best"][finite].view("<u4"), best[0].numpy()[finite].view(np.uint32))
    assert np.array_equal(got["second"][finite].view("<u4"), second[0].numpy()[finite].view(np.uint32))
    # The same float64 operations in the same order; torch's vectorised sqrt (SLEEF) may still differ
    # from the correctly rounded one by an ulp, which the bound's own padding (2^-40) more than covers.
    expected_bound = bound[0].numpy()
    assert np.allclose(got["bound"][finite], expected_bound[finite], rtol=2.0**-45, atol=0)
    with np.errstate(invalid="ignore"):  # inf - inf on the rows given non-finite scores
        margin = second[0].double().numpy() - best[0].double().numpy()
    decided = ~(np.abs(margin - expected_bound) <= 2.0**-44 * np.abs(expected_bound))  # NaN margins too
    assert np.array_equal(got["certified"].astype(bool)[decided], certified[0].numpy()[decided])
    return got


@pytest.mark.parametrize("k,tile_n", [(1, 8), (7, 8), (255, 64), (257, 256), (300, 128)])
def test_a_tile_gives_the_specification_per_row(harness, k, tile_n, tmp_path):
    # 150 rows: two full 64-row tiles and a partial one, as N rarely divides.
    generator = torch.Generator().manual_seed(k)
    x, c = torch.randn(150, 33, generator=generator), torch.randn(k, 33, generator=generator)
    got = check(harness, x, c, "bf16", tile_n, tmp_path)
    if k > 1:
        assert 0 < got["certified"].mean() < 1  # both outcomes exercised


def test_duplicates_ties_and_non_finite_scores(harness, tmp_path):
    base = torch.randint(-3, 4, (40, 9), generator=torch.Generator().manual_seed(2)).float()
    c = torch.cat([base, base])[torch.randperm(80, generator=torch.Generator().manual_seed(3))]
    x = torch.cat([c[:30], torch.randn(70, 9)])
    got = check(harness, x, c, "tf32", 64, tmp_path)
    assert not got["certified"][:30].any()  # on a centroid and its copy: a tie is never certified
    problem = round_problem(x[None], c[None], "tf32")
    scores = tensor_core_scores(problem.x, problem.c)[0]
    scores[5, 17], scores[6, 3], scores[7, :] = float("nan"), float("inf"), float("inf")
    got = check(harness, x, c, "tf32", 64, tmp_path, scores=scores)
    assert not got["certified"][5:8].any()


def test_normalised_mixture_at_a_kernel_tile_width(harness, tmp_path):
    x, c = gaussian_mixture(256, 128, 256, noise=2.0, generator=torch.Generator().manual_seed(4))
    got = check(harness, x, c, "bf16", 256, tmp_path)
    assert got["certified"].mean() > 0.8


@pytest.fixture(scope="module")
def device_harness(tmp_path_factory):
    """The GPU program, built for Hopper (sm_90a) whether or not a GPU is here: a compile gate."""
    if not NVCC.exists():
        pytest.skip(f"needs the CUDA toolkit ({NVCC})")
    exe = tmp_path_factory.mktemp("epilogue_device") / "test_certified_epilogue_device"
    cmd = [str(NVCC), "-std=c++17", "-O2", "-arch=sm_90a", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'tests/cpp'}", str(ROOT / "tests/cpp/test_certified_epilogue_device.cu"), "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    return exe, done.stderr


def test_the_device_epilogue_builds_for_hopper_without_spills(device_harness):
    _, ptxas = device_harness
    assert "for 'sm_90a'" in ptxas
    assert "0 bytes spill stores, 0 bytes spill loads" in ptxas and "bytes spill stores" in ptxas
    assert all(line.strip().startswith("0 bytes stack frame, 0 bytes spill") for line in ptxas.splitlines()
               if "spill" in line)


@pytest.mark.cuda
@pytest.mark.parametrize("k,tile_n", [(1, 8), (257, 256), (300, 128)])
def test_the_device_epilogue_gives_the_specification(device_harness, k, tile_n, tmp_path):
    exe, _ = device_harness
    generator = torch.Generator().manual_seed(k + 7)
    x, c = torch.randn(150, 33, generator=generator), torch.randn(k, 33, generator=generator)
    check(exe, x, c, "bf16", tile_n, tmp_path)
