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


@pytest.fixture(autouse=True)
def _cpu_isa(request, monkeypatch):
    """A test marked ``cpu_isa(name)`` runs with the CPU assignment forced to that engine, or is skipped
    where this CPU lacks it (the build compiles every engine; only the CPU decides what can run)."""
    mark = request.node.get_closest_marker("cpu_isa")
    if mark is None:
        return
    from xdc_fast import ops

    isa = mark.args[0]
    if isa not in ops.cpu_isas():
        pytest.skip(f"this CPU has no {isa} engine (it has: {', '.join(ops.cpu_isas())})")
    monkeypatch.setenv(ops.CPU_ISA_VARIABLE, isa)


def prepared_synthetic(root, **spec):
    """The built-in synthetic dataset written under ``root/media`` and prepared into ``root/ds`` (returned)."""
    from xdc_fast.data.synthetic import SyntheticSpec, prepare_synthetic

    return prepare_synthetic(root / "media", root / "ds", SyntheticSpec(**spec), workers=1)
