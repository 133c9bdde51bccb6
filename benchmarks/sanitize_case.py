"""A small run of every CUDA code path, for `compute-sanitizer --tool memcheck` (see gpu_check.sh)."""

import torch

from xdc_fast import KMeans, kmeans_assign, kmeans_update

torch.manual_seed(0)
for b, n, d, k in [(1, 5, 1, 1), (3, 37, 7, 17), (1, 300, 513, 1024), (2, 1000, 64, 2)]:
    x = torch.randn(b, n, d, device="cuda")
    c = torch.randn(b, k, d, device="cuda")
    for spherical in (False, True):
        labels, dist = kmeans_assign(x, c, spherical)
    sums, counts = kmeans_update(x, labels, k)
    kmeans_assign(x[:, ::2, ::2], c[:, :, ::2])
    kmeans_update(x.half(), labels, k)
KMeans(16, 8, niter=3, seed=0).fit(torch.randn(2, 500, 16, device="cuda"))
torch.cuda.synchronize()
print("sanitize case done")
