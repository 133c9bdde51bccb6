import shutil

import numpy as np
import pytest

from xdc_fast.data.prepare import prepare
from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset, write_media

SMALL = SyntheticSpec(classes=3, videos_per_class=2, seconds=2.0, fps=12, width=64, height=48, seed=1)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, SMALL)
    return root


@pytest.fixture(scope="session")
def prepared(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(synthetic_root, out, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def small_video(tmp_path_factory):
    """One short H.264 + AAC file to copy wherever a layout needs many files."""
    path = tmp_path_factory.mktemp("media") / "base.mp4"
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(30, 32, 32, 3), dtype=np.uint8)
    write_media(path, frames, 15, rng.normal(0, 0.1, size=(1, 32000)).astype(np.float32), 16000)
    return path


def place(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
