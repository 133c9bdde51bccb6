import ast
import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from xdc_fast.bench.loader import bench_loader, format_loader_table, loader_json
from xdc_fast import engine
from xdc_fast.bench.timing import check_device, gemm_rate, interleaved_best_times, memory_budget, write_json
from xdc_fast.bench.train import (bench_train, count_flops, format_train_table, step_flops_per_clip,
                                  train_json)
from xdc_fast.cli import main
from xdc_fast.data.prepare import prepare
from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset
from xdc_fast.errors import XdcError


def test_bench_loader_rows(tmp_path):
    make_synthetic_dataset(tmp_path / "media", SyntheticSpec(classes=2, videos_per_class=1, seconds=2.0, fps=12,
                                                             width=64, height=48))
    prepare(tmp_path / "media", tmp_path / "ds", workers=1, progress=False)
    rows = bench_loader(str(tmp_path / "ds"), workers=(0,), clips=4)
    names = [r.name for r in rows]
    assert names[0].startswith("pyav") and names[1].startswith("naive") and names[2].startswith("dali")
    for r in rows[:2]:
        assert r.clips == 4 and r.skipped == 0 and math.isfinite(r.clips_per_second)  # a measurement, no speed claim
    assert "| naive (decode from start) | 0 | 4 |" in format_loader_table(rows)
    # The synthetic data is H.264, which DALI decodes only on a GPU: reported, not measured, here.
    assert rows[2].clips == 0 or math.isfinite(rows[2].clips_per_second)
    records = loader_json(rows)
    assert [r["name"] for r in records] == names and records[0]["clips_per_second"] > 0
    assert all(r["clips_per_second"] is None for r, row in zip(records, rows) if not row.clips)
    json.dumps(records, allow_nan=True)

    out = tmp_path / "loader.json"
    result = CliRunner().invoke(main, ["bench", "loader", "--data", str(tmp_path / "ds"), "--workers", "0",
                                       "--clips", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "clips/s" in result.output
    assert [r["clips"] for r in json.loads(out.read_text())][:2] == [2, 2]


def test_flop_count_of_a_linear_step_matches_the_hand_count():
    b, d_in, d_out = 4, 6, 5
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(b, d_in, requires_grad=True)
    # Forward: one B x in x out product, 2 FLOPs a multiply-add. Backward: the gradient of the input and of
    # the weight, one product of the same size each; the bias gradient is a sum, which is not counted.
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * b * d_in * d_out * 3

    # A whole supervised_step: encoder Linear(in0 -> d) on an input without grad (so no input gradient),
    # then the head Linear(d -> k), whose input gradient does flow back to the encoder.
    in0, d, k = 7, 6, 5
    encoder = torch.nn.Linear(in0, d, bias=False)
    model = engine.EncodersWithHeads({"video": encoder}, {"video": [torch.nn.Linear(d, k)]})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = {"video": torch.randn(b, in0)}
    targets = {"video": [torch.randint(0, k, (b,))]}
    per_clip = (2 * in0 * d) * 2 + (2 * d * k) * 3  # encoder: forward + weight grad; head: forward + both grads
    assert step_flops_per_clip(model, [optimizer], inputs, targets, b) == per_clip


def test_bench_train_times_each_encoder_with_flops_and_a_loader(tmp_path):
    rows, shares = bench_train("cpu", ("tiny",), batch_size=2, steps=1, round_runner=None, loaders=("pyav",),
                               workers=0)
    assert [(r.arch, r.modality, r.loader) for r in rows] == [
        ("tiny", "video", None), ("tiny", "audio", None), ("tiny", "video+audio", None), ("tiny", "video", "pyav"),
        ("tiny", "audio", "pyav")]
    # The joint step (what XDC pretraining runs) costs what its two encoders' steps cost together.
    assert rows[2].flops_per_clip == pytest.approx(rows[0].flops_per_clip + rows[1].flops_per_clip, rel=1e-6)
    assert all(math.isfinite(r.clips_per_second) and r.clips_per_second > 0 for r in rows)  # each was measured
    assert all(r.flops_per_clip > 0 for r in rows)
    assert rows[0].flops_per_clip > 10 * rows[1].flops_per_clip  # a video clip costs far more than 1 s of log-mel
    assert [r.bound for r in rows] == [None, None, None] + [r.bound for r in rows[3:]]
    assert all(r.bound in ("loader", "compute") for r in rows[3:])
    assert shares == {}
    ceiling = {"dtype": "float32", "size": 64, "flops_per_s": 1e9}
    table = format_train_table(rows, shares, "cpu", ceiling)
    assert "| tiny | video | synthetic tensors | 2 |" in table and "| tiny | audio | pyav from files (0 workers) | 2 |" in table
    assert "float32" in table and "MFU is left out" in table
    record = train_json(rows, shares, "cpu", ceiling)
    assert record["bf16_tflops"] is None and all(r["mfu"] is None for r in record["rows"])  # MFU is a bf16 figure
    bf16 = train_json(rows, shares, "cuda", {"dtype": "bfloat16", "size": 64, "flops_per_s": 1e12})
    assert bf16["bf16_tflops"] == 1.0
    assert math.isclose(bf16["rows"][0]["mfu"], rows[0].flops_per_clip * rows[0].clips_per_second / 1e12)


@pytest.mark.skipif(not __import__("xdc_fast.data.dali_backend", fromlist=["x"]).dali_available(),
                    reason="nvidia-dali-cuda130 is not installed")
def test_bench_train_times_each_loader_from_files_and_from_shards(tmp_path):
    """On the CPU the data is VP9 and sharded as VP9, so DALI's CPU graph takes part from both sources,
    once per pipeline count asked for."""
    rows, _ = bench_train("cpu", ("tiny",), batch_size=2, steps=1, loaders=("pyav", "dali"), workers=1,
                          shards=True, dali_pipelines=(1, 2))
    fed = [(r.modality, r.loader, r.media, r.pipelines) for r in rows if r.loader]
    assert fed == [(modality, loader, media, pipelines) for modality in ("video", "audio")
                   for media in ("files", "shards")
                   for loader, pipelines in (("pyav", None), ("dali", 1), ("dali", 2))]
    assert all(r.measured and r.clips_per_second > 0 for r in rows), [r.note for r in rows if not r.measured]
    table = format_train_table(rows, {}, "cpu")
    assert "| tiny | video | dali from shards (1 workers, 2 pipeline(s)) | 2 |" in table
    assert {(r["media"], r["pipelines"]) for r in train_json(rows, {}, "cpu")["rows"] if r["loader"] == "dali"} == {
        ("files", 1), ("files", 2), ("shards", 1), ("shards", 2)}


def test_a_loader_fed_row_is_seconds_per_full_batch(tmp_path, monkeypatch):
    """With a clock that advances one second per training step, every loader-fed row reads 1 s per batch
    whatever the number of timed steps (an earlier version divided by the steps twice and reported
    loader-fed training 10x faster than the compute alone)."""
    from xdc_fast.bench import train as bench_train_module

    now = [0.0]
    real_step = bench_train_module.engine.supervised_step

    def step_taking_one_second(*args, **kwargs):
        now[0] += 1.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(bench_train_module, "_clock", lambda: now[0])
    monkeypatch.setattr(bench_train_module.engine, "supervised_step", step_taking_one_second)
    rows, _ = bench_train("cpu", ("tiny",), batch_size=2, steps=3, loaders=("pyav",), workers=0)
    fed = [r for r in rows if r.loader == "pyav"]
    assert len(fed) == 2 and all(r.seconds_per_step == 1.0 and r.clips_per_second == 2.0 for r in fed)


def test_gemm_rate_on_the_cpu_is_fp32():
    ceiling = gemm_rate("cpu", size=128, repeats=1)
    assert ceiling["dtype"] == "float32" and ceiling["size"] == 128 and ceiling["flops_per_s"] > 0


def test_bench_train_cli_writes_json(tmp_path):
    out = tmp_path / "train.json"
    result = CliRunner().invoke(main, ["bench", "train", "--steps", "1", "--batch-size", "2", "--no-round",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "clips/s" in result.output and "GEMM ceiling" in result.output
    record = json.loads(out.read_text())
    assert record["gemm_ceiling"]["dtype"] == "float32" and record["gemm_ceiling"]["flops_per_s"] > 0
    assert [(r["arch"], r["encoder"], r["loader"]) for r in record["rows"]] == [
        ("tiny", "video", None), ("tiny", "audio", None), ("tiny", "video+audio", None)]
    for r in record["rows"]:
        assert {"clips_per_s", "flops_per_clip", "mfu", "bound"} <= set(r)
        assert r["clips_per_s"] > 0 and r["flops_per_clip"] > 0 and r["mfu"] is None


def test_bench_train_round_runner_gives_phase_shares():
    calls = []

    def fake_round(dataset_dir: str, run_dir: str) -> dict:
        # The runner sees a prepared dataset that is still there, and a run folder of its own.
        calls.append((dataset_dir, run_dir, Path(dataset_dir).is_dir(), any(Path(dataset_dir).iterdir())))
        return {"seconds": {"extract": 1.0, "cluster": 1.0, "train": 2.0}}

    rows, shares = bench_train("cpu", (), round_runner=fake_round)
    assert rows == []
    ((dataset_dir, run_dir, existed, filled),) = calls
    assert existed and filled and dataset_dir != run_dir and not Path(dataset_dir).exists()  # cleaned up after
    assert shares == {"extract": 0.25, "cluster": 0.25, "train": 0.5}
    assert math.isclose(sum(shares.values()), 1.0)
    assert "extract 25%, cluster 25%, train 50%" in format_train_table(rows, shares, "cpu")


def test_bench_train_without_a_runner_skips_the_round():
    assert bench_train("cpu", (), round_runner=None) == ([], {})


def test_timing_helpers(tmp_path, monkeypatch):
    best = interleaved_best_times({"a": lambda: sum(range(100)), "b": lambda: None}, 2, torch.device("cpu"))
    assert set(best) == {"a", "b"} and all(0 <= t < math.inf for t in best.values())
    assert memory_budget("cpu") > 0
    write_json({"x": [1, 2]}, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    check_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(XdcError, match="--device cuda was asked for"):
        check_device("cuda")


COMMAND_MODULES = {"pretrain", "finetune", "probe", "extract", "demo", "cli"}


def _imported_names(source: str) -> set[str]:
    """Every module path part and imported name of ``source``'s imports (``from .. import pretrain`` gives
    pretrain, ``from xdc_fast.extract import x`` gives extract)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            names |= set((node.module or "").split(".")) | {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {part for a in node.names for part in a.name.split(".")}
    return names


def test_bench_imports_no_command_module():
    assert COMMAND_MODULES & _imported_names("def f():\n    from ..pretrain import pretrain\n")  # the check bites
    assert COMMAND_MODULES & _imported_names("import xdc_fast.extract\n")
    for path in (Path(__file__).parents[1] / "xdc_fast" / "bench").glob("*.py"):
        assert not COMMAND_MODULES & _imported_names(path.read_text()), path.name


def test_bench_kmeans_names_the_cpu_engine_and_times_each_forced_one():
    from xdc_fast import ops
    from xdc_fast.bench.kmeans import bench_kmeans, format_kmeans_table

    before = os.environ.get(ops.CPU_ISA_VARIABLE)
    result = bench_kmeans(n=2000, d=24, k=40, repeats=1, engines=["portable", "avx2", "avx512"])
    rows = {row.name: row for row in result.rows}
    assert result.cpu_isa == ops.cpu_isas()[0]
    for isa in ("portable", "avx2", "avx512"):
        row = rows[f"xdc-fast {isa}"]
        assert (row.assign_s is not None) == (isa in ops.cpu_isas()), row
    table = format_kmeans_table(result)
    assert f"CPU engine of the default call: {result.cpu_isa}" in table
    if result.cpu_isa == "portable":
        assert result.fma_peak_gflops is None and "the BLAS library's" in table
    else:
        # The ceiling is a rate the engine itself cannot beat by much: the default call stays under it.
        assert result.fma_peak_gflops > 0 and "FMA peak of that engine" in table
        assert result.flops / rows["xdc-fast"].assign_s / 1e9 < 1.2 * result.fma_peak_gflops
    assert os.environ.get(ops.CPU_ISA_VARIABLE) == before  # the forced engine does not outlive its row


def test_the_gpu_training_check_runs_every_section_on_the_cpu(tmp_path):
    """benchmarks/train_check.py, which a GPU machine runs once: here with the tiny arch, to know that
    every section writes its row (timings are not judged) and that each (2+1)D convolution's 2-D form
    computes what the Conv3d computes."""
    import subprocess
    import sys

    out = tmp_path / "check.jsonl"
    done = subprocess.run([sys.executable, "benchmarks/train_check.py", "--device", "cpu", "--arch", "tiny",
                           "--batch-size", "2", "--steps", "1", "--no-compile", "--deadline-s", "300",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": "."})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sections = [r["section"] for r in rows]
    assert sections[0] == "ceiling" and sections[-1] == "done"
    assert {"joint", "video", "reference", "audio", "profile", "conv"} <= set(sections)
    assert not any("error" in r or "skipped" in r for r in rows), [r for r in rows if "error" in r or "skipped" in r]
    assert [r["form"] for r in rows if r["section"] == "joint"] == ["eager", "eager_autotuned", "eager_autotuned_2d_views",
                                                                          "eager_autotuned_no_sync"]
    convs = [r for r in rows if r["section"] == "conv"]
    assert convs and all(r["same_output"] in (True, None) for r in convs)
    assert sum(r["same_output"] is True for r in convs) >= len(convs) - 3  # only the shortcuts lack a 2-D form
    for r in convs:  # a form padded to multiples of 8 channels exactly where a count is not one, same outputs
        assert (r["padded_same_output"] is True) == any(c % 8 for c in r["channels"]), r
        assert (r["conv3d_padded_ms"] is None) == (r["padded_same_output"] is None)
