import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_triton_assign.py). The choice
# must be made before triton is first imported: its standard library is compiled for one or the other.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def prepared_synthetic(root, **spec):
    """The built-in synthetic dataset written under ``root/media`` and prepared into ``root/ds`` (returned)."""
    from xdc_fast.data.prepare import prepare
    from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset

    make_synthetic_dataset(root / "media", SyntheticSpec(**spec))
    prepare(root / "media", root / "ds", workers=1, progress=False)
    return root / "ds"
