"""Float64 oracles for the k-means ops, independent of the code under test."""

import torch


def squared_distances64(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[B, N, K] squared distances in float64 (the expansion in float64 loses nothing at these scales)."""
    x64, c64 = x.double(), c.double()
    return x64.pow(2).sum(-1, keepdim=True) - 2 * x64 @ c64.transpose(-1, -2) + c64.pow(2).sum(-1).unsqueeze(-2)


def check_labels(x, c, labels, dist, spherical=False, rel_gap=1e-5):
    """Each label must be optimal up to a small gap relative to the problem's scale; dist must be
    the float64 value at that label. Returns the fraction of labels equal to the oracle's argmin."""
    x3 = x if x.dim() == 3 else x.unsqueeze(0)
    c3 = c if c.dim() == 3 else c.unsqueeze(0)
    l3 = (labels if labels.dim() == 2 else labels.unsqueeze(0)).cpu()
    d3 = (dist if dist.dim() == 2 else dist.unsqueeze(0)).cpu()
    x3, c3 = x3.cpu(), c3.cpu()
    assert l3.dtype == torch.int64 and d3.dtype == torch.float32
    assert l3.shape == x3.shape[:2] and d3.shape == x3.shape[:2]
    assert int(l3.min()) >= 0 and int(l3.max()) < c3.shape[1]
    if spherical:
        score = -(x3.double() @ c3.double().transpose(-1, -2))
        scale = x3.double().norm(dim=-1, keepdim=True) * c3.double().norm(dim=-1).amax(-1, keepdim=True)[..., None]
    else:
        score = squared_distances64(x3, c3)
        scale = x3.double().pow(2).sum(-1, keepdim=True) + c3.double().pow(2).sum(-1).amax(-1)[:, None, None]
    best = score.min(-1, keepdim=True).values
    chosen = score.gather(-1, l3.unsqueeze(-1))
    gap = chosen - best
    assert bool((gap <= rel_gap * scale + 1e-12).all()), f"label off the optimum by {float((gap / scale).max()):.3g} of scale"
    expected = -chosen[..., 0] if spherical else chosen[..., 0]
    err = (d3.double() - expected).abs()
    allowed = 1e-4 * expected.abs() + 1e-6 * scale[..., 0] + 1e-7
    assert bool((err <= allowed).all()), f"dist off by {float(err.max()):.3g}"
    return float((l3 == score.argmin(-1)).double().mean())


def update64(x, labels, k):
    x3 = (x if x.dim() == 3 else x.unsqueeze(0)).cpu().double()
    l2 = (labels if labels.dim() == 2 else labels.unsqueeze(0)).cpu()
    B, _, D = x3.shape
    sums = torch.zeros(B, k, D, dtype=torch.float64)
    counts = torch.zeros(B, k, dtype=torch.long)
    for b in range(B):
        sums[b].index_add_(0, l2[b], x3[b])
        counts[b] = torch.bincount(l2[b], minlength=k)
    if x.dim() == 2:
        return sums[0], counts[0]
    return sums, counts
