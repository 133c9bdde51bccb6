import pytest
import torch

from xdc_fast import ops, reference

from .oracle import check_labels, squared_distances64, update64

# Every CPU engine the build has, each forced in turn (tests/conftest.py skips those the CPU lacks).
CPU_ISAS = ["avx512", "avx2", "portable"]
DEVICES = [*(pytest.param("cpu", id=f"cpu-{isa}", marks=pytest.mark.cpu_isa(isa)) for isa in CPU_ISAS),
           pytest.param("cuda", marks=pytest.mark.cuda)]


def test_extension_is_built():
    # The suite must exercise the compiled kernels, not the plain-torch fallback.
    assert ops.HAS_EXTENSION


# Ns: below the smallest CPU tile (16 rows), between tiles, and not a multiple of the GPU's 64.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [1, 3, 7, 64, 256, 513])
@pytest.mark.parametrize("k", [1, 2, 17, 1024])
@pytest.mark.parametrize("b,n", [(1, 5), (3, 37), (1, 300)])
def test_assign_matches_float64(device, d, k, b, n):
    x = torch.randn(b, n, d, device=device)
    c = torch.randn(b, k, d, device=device)
    labels, dist = ops.kmeans_assign(x, c)
    exact = check_labels(x, c, labels, dist)
    if d >= 7:  # with a few dimensions, near-ties are common and either label is right
        assert exact >= 0.99


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d,k", [(3, 17), (64, 1024), (513, 2)])
def test_assign_spherical(device, d, k):
    x = torch.nn.functional.normalize(torch.randn(2, 333, d, device=device), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(2, k, d, device=device), dim=-1)
    labels, sim = ops.kmeans_assign(x, c, spherical=True)
    check_labels(x, c, labels, sim, spherical=True)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_two_dimensional_input_means_one_problem(device):
    x, c = torch.randn(100, 8, device=device), torch.randn(5, 8, device=device)
    labels, dist = ops.kmeans_assign(x, c)
    assert labels.shape == (100,) and dist.shape == (100,)
    labels3, dist3 = ops.kmeans_assign(x[None], c[None])
    assert torch.equal(labels, labels3[0]) and torch.equal(dist, dist3[0])


@pytest.mark.parametrize("device", DEVICES)
def test_assign_lowest_index_wins_exact_ties(device):
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], device=device)
    # Each point is equidistant from all four centroids or from two identical ones.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], device=device)
    labels, _ = ops.kmeans_assign(x, c)
    assert labels.tolist() == [0, 0, 1, 0]
    # Many identical centroids: ties across the CPU's 512-centroid blocks, the GPU's 64-wide tiles
    # and the threads that share a row.
    labels, _ = ops.kmeans_assign(torch.randn(200, 4, device=device), torch.ones(1500, 4, device=device))
    assert int(labels.max()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_assign_non_contiguous_inputs(device):
    base = torch.randn(3, 200, 2 * 33, device=device)
    x = base[:, ::2, ::2]  # strided rows and columns
    c = torch.randn(33, 3, 17, device=device).permute(1, 2, 0)  # [3, 17, 33] with stride 1 on B
    assert not x.is_contiguous() and not c.is_contiguous()
    labels, dist = ops.kmeans_assign(x, c)
    check_labels(x, c, labels, dist)
    labels_c, dist_c = ops.kmeans_assign(x.contiguous(), c.contiguous())
    assert torch.equal(labels, labels_c)
    # Row-strided but unit-stride columns is handled without a copy on the CPU; same answer.
    x_rows = base[:, :, :33]
    torch.testing.assert_close(ops.kmeans_assign(x_rows, c)[1], ops.kmeans_assign(x_rows.contiguous(), c)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_assign_reduced_precision_accumulates_in_float32(device, dtype):
    x = torch.randn(2, 300, 64, device=device).to(dtype)
    c = torch.randn(2, 50, 64, device=device).to(dtype)
    labels, dist = ops.kmeans_assign(x, c)
    assert dist.dtype == torch.float32
    check_labels(x, c, labels, dist)  # the oracle sees the same rounded inputs


@pytest.mark.parametrize("device", DEVICES)
def test_assign_under_autocast_returns_float32(device):
    x, c = torch.randn(300, 32, device=device), torch.randn(20, 32, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device_type=device, dtype=dtype):
        labels, dist = ops.kmeans_assign(x, c)
        sums, counts = ops.kmeans_update(x, labels, 20)
    assert dist.dtype == torch.float32 and sums.dtype == torch.float32
    check_labels(x, c, labels, dist)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_empty_input(device):
    labels, dist = ops.kmeans_assign(torch.randn(2, 0, 5, device=device), torch.randn(2, 3, 5, device=device))
    assert labels.shape == (2, 0) and dist.shape == (2, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,n,d,k", [(1, 1, 1, 1), (1, 1000, 7, 17), (3, 5000, 64, 1024), (2, 2049, 513, 3)])
def test_update_matches_float64(device, b, n, d, k):
    x = torch.randn(b, n, d, device=device)
    labels = torch.randint(0, k, (b, n), device=device)
    sums, counts = ops.kmeans_update(x, labels, k)
    sums64, counts64 = update64(x, labels, k)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts.cpu(), counts64)
    torch.testing.assert_close(sums.cpu().double(), sums64, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_update_hot_cluster_and_empty_clusters(device):
    # One cluster takes almost everything: the case that serialises naive atomics.
    x = torch.randn(20000, 48, device=device)
    labels = torch.zeros(20000, dtype=torch.long, device=device)
    labels[::1000] = 7
    sums, counts = ops.kmeans_update(x, labels, 9)
    sums64, counts64 = update64(x, labels, 9)
    assert torch.equal(counts.cpu(), counts64)
    assert counts.tolist()[1:7] == [0] * 6 and float(sums[1:7].abs().sum()) == 0.0
    torch.testing.assert_close(sums.cpu().double(), sums64, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_update_non_contiguous_and_half(device):
    x = torch.randn(2, 600, 40, device=device)[:, ::3, ::2]
    labels = torch.randint(0, 5, (2, 600), device=device)[:, ::3]
    sums, counts = ops.kmeans_update(x, labels, 5)
    sums64, counts64 = update64(x, labels, 5)
    assert torch.equal(counts.cpu(), counts64)
    torch.testing.assert_close(sums.cpu().double(), sums64, rtol=1e-5, atol=1e-4)
    half = x.half()
    sums_h, _ = ops.kmeans_update(half, labels, 5)
    torch.testing.assert_close(sums_h.cpu().double(), update64(half, labels, 5)[0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_twins_agree_with_kernels(device):
    x, c = torch.randn(2, 500, 24, device=device), torch.randn(2, 40, 24, device=device)
    labels, dist = ops.kmeans_assign(x, c)
    ref_labels, ref_dist = reference.kmeans_assign_reference(x, c)
    check_labels(x, c, ref_labels, ref_dist)
    assert float((labels == ref_labels).double().mean()) > 0.99
    sums, counts = ops.kmeans_update(x, labels, 40)
    ref_sums, ref_counts = reference.kmeans_update_reference(x, labels, 40)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, c = torch.randn(2, 70, 9, device=device), torch.randn(2, 6, 9, device=device)
    labels = torch.randint(0, 6, (2, 70), device=device)
    for spherical in (False, True):
        torch.library.opcheck(torch.ops.xdc_fast.kmeans_assign.default, (x, c, spherical))
    torch.library.opcheck(torch.ops.xdc_fast.kmeans_assign.default, (x[0], c[0]))
    torch.library.opcheck(torch.ops.xdc_fast.kmeans_assign.default, (x, c, False, True))
    torch.library.opcheck(torch.ops.xdc_fast.kmeans_update.default, (x, labels, 6))
    torch.library.opcheck(torch.ops.xdc_fast.kmeans_update.default, (x[0], labels[0], 6))


def test_torch_compile_traces_the_ops():
    def step(x, c):
        labels, dist = torch.ops.xdc_fast.kmeans_assign(x, c, False)
        sums, counts = torch.ops.xdc_fast.kmeans_update(x, labels, c.shape[0])
        return sums / counts.clamp_min(1).unsqueeze(-1), dist.sum()

    x, c = torch.randn(200, 16), torch.randn(8, 16)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    new, obj = compiled(x, c)
    ref_new, ref_obj = step(x, c)
    torch.testing.assert_close(new, ref_new)
    torch.testing.assert_close(obj, ref_obj)


@pytest.mark.cuda
def test_cpu_and_cuda_agree():
    x, c = torch.randn(3, 4000, 96), torch.randn(3, 300, 96)
    labels_cpu, dist_cpu = ops.kmeans_assign(x, c)
    labels_gpu, dist_gpu = ops.kmeans_assign(x.cuda(), c.cuda())
    # Different summation orders: labels may differ only on near-ties, which check_labels allows.
    check_labels(x, c, labels_gpu.cpu(), dist_gpu.cpu())
    assert float((labels_cpu == labels_gpu.cpu()).double().mean()) > 0.999
    torch.testing.assert_close(dist_cpu, dist_gpu.cpu(), rtol=1e-4, atol=1e-4)
    sums_cpu, counts_cpu = ops.kmeans_update(x, labels_cpu, 300)
    sums_gpu, counts_gpu = ops.kmeans_update(x.cuda(), labels_cpu.cuda(), 300)
    assert torch.equal(counts_cpu, counts_gpu.cpu())
    torch.testing.assert_close(sums_cpu, sums_gpu.cpu(), rtol=1e-5, atol=1e-3)


# ---- errors: what was expected and what came ------------------------------------------------------

ASSIGN_ERRORS = [
    (lambda: (torch.randn(5), torch.randn(2, 5)), ValueError, "x should be a 2-D [N, D] or 3-D [B, N, D] tensor, got 1-D"),
    (lambda: (torch.randn(4, 5), torch.randn(1, 2, 5)), ValueError, "centroids should be 2-D like x"),
    (lambda: (torch.randn(2, 4, 5), torch.randn(3, 2, 5)), ValueError, "same batch size B, got 2 and 3"),
    (lambda: (torch.randn(4, 5), torch.randn(2, 6)), ValueError, "same dimension D, got 5 and 6"),
    (lambda: (torch.randn(4, 5), torch.randn(0, 5)), ValueError, "K >= 1"),
    (lambda: (torch.randn(4, 5).double(), torch.randn(2, 5)), TypeError, "x should be float32, float16 or bfloat16, got Double"),
    (lambda: (torch.randn(4, 5), torch.randint(0, 3, (2, 5))), TypeError, "centroids should be float32, float16 or bfloat16, got Long"),
]


@pytest.mark.parametrize("make,error,message", ASSIGN_ERRORS)
def test_assign_errors(make, error, message):
    x, c = make()
    with pytest.raises(error, match=_literal(message)):
        ops.kmeans_assign(x, c)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_rejects_non_finite_unless_told_not_to(device):
    x, c = torch.randn(10, 3, device=device), torch.randn(2, 3, device=device)
    x[4, 1] = float("nan")
    x[7, 0] = float("inf")
    with pytest.raises(ValueError, match=_literal("kmeans_assign: x should be finite, got 2 NaN/Inf value(s) in a "
                                                  "tensor of shape [10, 3]; clean the features first")):
        ops.kmeans_assign(x, c)
    labels, _ = ops.kmeans_assign(x, c, check_finite_input=False)
    assert int(labels.min()) >= 0 and int(labels.max()) < 2  # garbage in, but still in range
    c[1, 2] = float("-inf")
    with pytest.raises(ValueError, match=_literal("kmeans_assign: centroids should be finite, got 1 NaN/Inf")):
        ops.kmeans_assign(torch.randn(10, 3, device=device), c)
    # One bad value deep in a batch (past the first chunk of rows of any engine), in half precision.
    x = torch.randn(2, 700, 33, device=device)
    x[1, 650, 32] = float("nan")
    with pytest.raises(ValueError, match=_literal("x should be finite, got 1 NaN/Inf value(s) in a tensor of shape "
                                                  "[2, 700, 33]")):
        ops.kmeans_assign(x.half(), torch.randn(2, 5, 33, device=device).half())


def _centroids_from_points(x, k):
    return x[..., :k, :].clone()  # as KMeans draws them: each of the first k points is its own nearest


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spherical", [False, True])
def test_assign_rejects_features_whose_squares_overflow(device, spherical):
    # Finite but huge features, clustered as KMeans would: every squared norm is Inf in float32, and every
    # label came out 0 without a word, where float64 gives each of the first points its own centroid.
    x = torch.randn(2, 300, 16, device=device) * 1e30
    c = _centroids_from_points(x, 20)
    exact = squared_distances64(x, c).argmin(-1).cpu()
    assert torch.equal(exact[:, :20], torch.arange(20).expand(2, 20))
    with pytest.raises(ValueError, match=r"kmeans_assign: x overflows float32 when squared: the largest row norm "
                                         r"is [\d.]+e\+3\d, above 9\.2e\+18") as error:
        ops.kmeans_assign(x, c, spherical)
    assert "scale the features down or L2-normalise them" in str(error.value)
    with pytest.raises(ValueError, match=_literal("kmeans_assign: centroids overflow float32 when squared")):
        ops.kmeans_assign(x / 1e30, c, spherical)
    labels, _ = ops.kmeans_assign(x, c, spherical, check_finite_input=False)
    assert int(labels.min()) >= 0 and int(labels.max()) < 20
    # The way out the message gives: scaled down, the same points get the float64 labels of the original.
    labels, dist = ops.kmeans_assign(x / 1e30, c / 1e30, spherical)
    check_labels(x / 1e30, c / 1e30, labels, dist, spherical=spherical)
    if not spherical:
        assert torch.equal(labels.cpu(), exact)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_overflow_check_is_not_a_look_at_dist(device):
    # Wrong labels with finite distances, so a look at dist would pass them: only the norms tell.
    # 1e20 plus small variations: every centroid's squared norm is Inf in float32, every label came out 0,
    # and the distances to those centroids are ~1e35.
    base = torch.randn(16, device=device) * 1e20
    x = base + torch.randn(300, 16, device=device) * 1e17
    c = _centroids_from_points(x, 20)
    _, dist = ops.kmeans_assign(x, c, check_finite_input=False)
    assert bool(torch.isfinite(dist).all())
    with pytest.raises(ValueError, match="x overflows float32 when squared"):
        ops.kmeans_assign(x, c)
    # Centroids within the limit, rows 2.7 times past it: -2 x.c overflows to -Inf for both centroids,
    # the lower index wins, and float64 says the other; the distance to the wrong one (2.7e38) is finite.
    limit = ops.MAX_SQUARED_NORM ** 0.5
    u = torch.nn.functional.normalize(torch.randn(16, device=device), dim=0)
    w = torch.nn.functional.normalize(u + 0.3 * torch.nn.functional.normalize(torch.randn(16, device=device), dim=0),
                                      dim=0)
    x, c = (u * 2.7 * limit).expand(4, 16), torch.stack([w, u]) * 0.99 * limit
    assert squared_distances64(x[None], c[None])[0].argmin(-1).tolist() == [1] * 4
    labels, dist = ops.kmeans_assign(x, c, check_finite_input=False)
    assert bool(torch.isfinite(dist).all())
    with pytest.raises(ValueError, match=_literal("x overflows float32 when squared: the largest row norm is 2.5e+19")):
        ops.kmeans_assign(x, c)


@pytest.mark.parametrize("device", DEVICES)
def test_assign_norm_limit_keeps_distances_finite(device):
    # Norms of 8e18 pass and are assigned as float64 would, centroids opposite to points included:
    # their squared distances (2.6e38) still fit. Norms of 1e19 squared also fit float32 (1e38 < 3.4e38),
    # but their distances to opposite centroids (4e38) would not, so they are refused.
    direction = torch.nn.functional.normalize(torch.randn(200, 12, device=device), dim=-1)
    for norm, accepted in ((8e18, True), (1e19, False)):
        x = direction * norm
        c = torch.cat([x[:10], -x[10:20]])
        if accepted:
            labels, dist = ops.kmeans_assign(x, c)
            assert bool(torch.isfinite(dist).all())
            check_labels(x, c, labels, dist)
        else:
            with pytest.raises(ValueError, match=_literal("the largest row norm is 1e+19, above 9.2e+18")):
                ops.kmeans_assign(x, c)


def engine_contract_checks():
    """What every CPU assignment engine must do alike; run on each by test_each_cpu_engine_matches_float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 300, 64, requires_grad=True)
    c = torch.randn(2, 40, 64, requires_grad=True)
    for spherical in (False, True):
        for labels, dist in (ops.kmeans_assign(x, c, spherical), torch.ops.xdc_fast.kmeans_assign(x, c, spherical)):
            assert not labels.requires_grad and not dist.requires_grad and dist.grad_fn is None
            assert check_labels(x.detach(), c.detach(), labels, dist, spherical=spherical) > 0.99
    sums, counts = ops.kmeans_update(x, labels, 40)
    assert not sums.requires_grad and int(counts.sum()) == 600
    # Declared non-differentiable (an Autograd kernel), not left to the autograd fallback.
    torch.library.opcheck(torch.ops.xdc_fast.kmeans_assign.default, (x, c, False, True))
    torch.library.opcheck(torch.ops.xdc_fast.kmeans_update.default, (x, labels, 40))
    for bad_x, bad_c, message in [
        (float("nan"), 1.0, "x should be finite, got 1 NaN/Inf"),
        (1.0, float("inf"), "centroids should be finite, got 1 NaN/Inf"),
        (1e30, 1.0, "x overflows float32 when squared"),
        (1.0, 1e30, "centroids overflow float32 when squared"),
    ]:
        xb, cb = x.detach().clone(), c.detach().clone()
        xb[1, 250, 7] *= bad_x
        cb[1, 33, 5] *= bad_c
        try:
            ops.kmeans_assign(xb, cb)
        except ValueError as error:
            assert message in str(error), str(error)
        else:
            raise AssertionError(f"no error for {message}")
        ops.kmeans_assign(xb, cb, check_finite_input=False)


def test_device_mismatch_is_reported():
    with pytest.raises(ValueError, match="same device, got cpu and meta"):
        ops.check_assign_inputs(torch.randn(4, 5), torch.randn(2, 5, device="meta"))
    with pytest.raises(ValueError, match="same device, got cpu and meta"):
        ops.check_update_inputs(torch.randn(4, 5), torch.zeros(4, dtype=torch.long, device="meta"), 2)


UPDATE_ERRORS = [
    (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), 0), ValueError, "k should be at least 1, got 0"),
    (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.int32), 2), TypeError, "labels should be int64, got Int"),
    (lambda: (torch.randn(4, 5), torch.zeros(2, 4, dtype=torch.long), 2), ValueError, "labels should be 1-D [N]"),
    (lambda: (torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long), 2), ValueError, "labels should be [B, N] = [2, 4]"),
    (lambda: (torch.randn(4, 5), torch.tensor([0, 1, 2, 1]), 2), ValueError, "labels should lie in [0, k) = [0, 2), got 2"),
    (lambda: (torch.randn(4, 5), torch.tensor([0, -1, 1, 1]), 2), ValueError, "labels should lie in [0, k) = [0, 2), got -1"),
    (lambda: (torch.randn(4, 5).double(), torch.zeros(4, dtype=torch.long), 2), TypeError, "x should be float32"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make,error,message", UPDATE_ERRORS)
def test_update_errors(device, make, error, message):
    x, labels, k = make()
    with pytest.raises(error, match=_literal(message)):
        ops.kmeans_update(x.to(device), labels.to(device), k)


def _literal(message: str) -> str:
    import re

    return re.escape(message)


def test_fallback_without_extension_warns_once_and_is_correct(monkeypatch):
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    monkeypatch.setattr(ops, "_warned", set())
    x, c = torch.randn(2, 300, 9), torch.randn(2, 12, 9)
    with pytest.warns(RuntimeWarning, match="plain-torch k-means"):
        labels, dist = ops.kmeans_assign(x, c)
    check_labels(x, c, labels, dist)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        sums, counts = ops.kmeans_update(x, labels, 12)
    sums64, counts64 = update64(x, labels, 12)
    assert torch.equal(counts, counts64)
    torch.testing.assert_close(sums.double(), sums64, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=_literal("labels should lie in [0, k) = [0, 12), got 12")):
        ops.kmeans_update(x, torch.full((2, 300), 12), 12)
    with pytest.raises(ValueError, match="same dimension D, got 9 and 4"):
        ops.kmeans_assign(x, torch.randn(2, 12, 4))
    # No autograd through the fallback either.
    labels, dist = ops.kmeans_assign(x.requires_grad_(), c.requires_grad_())
    assert not dist.requires_grad and not ops.kmeans_update(x, labels, 12)[0].requires_grad


@pytest.mark.parametrize("bad_x,bad_c", [(float("nan"), 1.0), (1.0, float("-inf")), (1e30, 1.0), (1.0, 1e25)])
def test_fallback_checks_as_the_kernels_do(monkeypatch, bad_x, bad_c):
    x, c = torch.randn(2, 300, 9), torch.randn(2, 12, 9)
    x[1, 200, 3] *= bad_x
    c[0, 5, 8] *= bad_c
    with pytest.raises(ValueError) as kernels:
        ops.kmeans_assign(x, c)
    monkeypatch.setattr(ops, "HAS_EXTENSION", False)
    monkeypatch.setattr(ops, "_warned", {"no-extension"})
    with pytest.raises(ValueError) as fallback:
        ops.kmeans_assign(x, c)
    assert str(fallback.value) == str(kernels.value)
    ops.kmeans_assign(x, c, check_finite_input=False)


def test_bench_kmeans_times_the_default_call(monkeypatch):
    # The user's call, finite check included, is what the benchmark reports.
    from xdc_fast.bench.kmeans import bench_kmeans

    real, calls = ops.kmeans_assign, []
    monkeypatch.setattr(ops, "kmeans_assign", lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    bench_kmeans(n=64, d=4, k=4, repeats=1)
    assert calls and all(kwargs.get("check_finite_input", True) for kwargs in calls)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_each_cpu_engine_matches_float64(isa, monkeypatch):
    """The shapes that stress an engine's tiles (one point and one centroid, K not a multiple of a panel,
    K above a BLAS block, D odd and above a cache line), both metrics, and exact ties across 1500
    identical centroids."""
    if isa not in ops.cpu_isas():
        pytest.skip(f"this CPU has no {isa} engine (it has: {', '.join(ops.cpu_isas())})")
    monkeypatch.setenv(ops.CPU_ISA_VARIABLE, isa)
    assert ops.cpu_isa() == isa
    for b, n, d, k in [(1, 5, 1, 1), (3, 300, 7, 17), (2, 1000, 64, 1024), (1, 37, 513, 2), (2, 391, 33, 45)]:
        x, c = torch.randn(b, n, d), torch.randn(b, k, d)
        for spherical in (False, True):
            labels, dist = ops.kmeans_assign(x, c, spherical)
            check_labels(x, c, labels, dist, spherical=spherical)
    labels, _ = ops.kmeans_assign(torch.randn(50, 4), torch.ones(1500, 4))
    assert int(labels.max()) == 0
    engine_contract_checks()


def test_fused_engines_agree_bit_for_bit(monkeypatch):
    # Both fused engines sum every dot product in the same order with the same fused multiply-adds, so
    # a run's labels and distances do not depend on which of them the CPU offered.
    fused = [isa for isa in ("avx512", "avx2") if isa in ops.cpu_isas()]
    if len(fused) < 2:
        pytest.skip(f"needs both fused engines; this CPU has {', '.join(ops.cpu_isas())}")
    x, c = torch.randn(2, 2000, 97), torch.randn(2, 301, 97)
    results = []
    for isa in fused:
        monkeypatch.setenv(ops.CPU_ISA_VARIABLE, isa)
        results.append([ops.kmeans_assign(x, c, spherical) for spherical in (False, True)])
    for (l0, d0), (l1, d1) in zip(*results):
        assert torch.equal(l0, l1) and torch.equal(d0, d1)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_engines_offered_are_those_the_cpu_has(monkeypatch):
    import platform

    monkeypatch.delenv(ops.CPU_ISA_VARIABLE, raising=False)
    isas = ops.cpu_isas()
    assert isas[-1] == "portable" and ops.cpu_isa() == isas[0]  # the best one by default
    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64") and flags:
        assert ("avx512" in isas) == ("avx512f" in flags)
        assert ("avx2" in isas) == ({"avx2", "fma"} <= flags)
    elif platform.machine() not in ("x86_64", "AMD64"):
        assert isas == ["portable"]
    for isa in isas:
        assert ops.cpu_fma_flops(isa) > 0 or isa == "portable"


def test_a_forced_engine_that_is_absent_or_misspelt_is_refused(monkeypatch):
    x, c = torch.randn(10, 4), torch.randn(3, 4)
    monkeypatch.setenv(ops.CPU_ISA_VARIABLE, "avx1024")
    with pytest.raises(ValueError, match="XDC_FAST_CPU_ISA should be avx512, avx2 or portable .*got 'avx1024'"):
        ops.kmeans_assign(x, c)
    absent = [isa for isa in CPU_ISAS if isa not in ops.cpu_isas()]
    if absent:
        monkeypatch.setenv(ops.CPU_ISA_VARIABLE, absent[0])
        with pytest.raises(ValueError, match=f"XDC_FAST_CPU_ISA={absent[0]}: this CPU or this build has no"):
            ops.kmeans_assign(x, c)
        assert ops.cpu_fma_flops(absent[0]) == 0
