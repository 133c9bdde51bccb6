"""Adding an evaluation protocol is one entry in ``xdc_fast.protocols.PROTOCOLS``: the CLI offers it,
``evaluate`` runs it and tables its headline, and the docs check asks for its documentation."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import prepared_synthetic
from tests.test_docs import undocumented_protocols
from xdc_fast import protocols
from xdc_fast.config import EvaluateConfig
from xdc_fast.evaluate import evaluate

CLIP = {"frames": 4, "resize_short": 32, "crop": 28, "audio_seconds": 0.5, "n_mels": 20}


def nearest_median(features: protocols.Features, settings) -> dict:
    """A protocol of its own: each test video goes to the class whose median training feature is nearest."""
    classes = np.unique(features.train_y)
    medians = np.stack([np.median(features.train_mean[features.train_y == c], axis=0) for c in classes])
    distance = ((features.test_mean[:, None] - medians[None]) ** 2).sum(-1)
    predicted = classes[distance.argmin(1)]
    return {"scores": {"top1": float((predicted == features.test_y).mean()), "num_test": len(predicted)},
            "params": {"statistic": "median"}}


MEDIAN = protocols.Protocol("median", "nearest class median of mean video features", "top1", nearest_median,
                            default=False)


def test_a_new_protocol_is_offered_by_the_cli():
    # In a fresh process: the help text is built when the CLI is first imported.
    script = ("from xdc_fast import protocols\n"
              "protocols.PROTOCOLS['median'] = protocols.Protocol('median', 'nearest class median of mean video "
              "features', 'top1', lambda f, s: None, default=False)\n"
              "from xdc_fast.cli import main\nmain(['evaluate', '--help'])\n")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert "median: nearest class median" in " ".join(shown.stdout.split())


@pytest.mark.training_outcome
def test_a_new_protocol_runs_in_evaluate_and_tables_its_headline(tmp_path, monkeypatch):
    seen = []

    def recording(features, settings):
        seen.append(features)
        return nearest_median(features, settings)

    monkeypatch.setitem(protocols.PROTOCOLS, "median", dataclasses.replace(MEDIAN, run=recording))
    dataset = prepared_synthetic(tmp_path / "data", classes=3, videos_per_class=4, seconds=1.5, fps=8, width=32,
                                 height=32, seed=5)
    config = EvaluateConfig(protocols=["median", "knn"], clips_per_video=2, clip=CLIP, batch_size=8, device="cpu",
                            loader="pyav")
    document = evaluate(dataset, tmp_path / "out", config, log=lambda *_: None)
    mine = [r for r in document["results"] if r["protocol"] == "median"]
    assert len(mine) == 1 and mine[0]["fingerprint"]["params"] == {"statistic": "median"}
    assert len(seen) == 1 and len(seen[0].test_y) == mine[0]["scores"]["num_test"] > 0
    assert mine[0]["scores"] == nearest_median(seen[0], None)["scores"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| random | median | top1 |" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["protocols"] == ["median", "knn"]


def test_a_new_protocol_is_missing_from_the_docs_until_documented(monkeypatch):
    monkeypatch.setitem(protocols.PROTOCOLS, "median", MEDIAN)
    assert undocumented_protocols() == ["median"]
    assert undocumented_protocols("| `median` | nearest class median |\n" + "\n".join(
        f"| `{name}` | ... |" for name in protocols.PROTOCOLS if name != "median")) == []
