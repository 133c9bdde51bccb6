import json

from click.testing import CliRunner

from xdc_fast.cli import main


def test_help_lists_the_verbs():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "bench" in result.output
    result = CliRunner().invoke(main, ["bench", "kmeans", "--help"])
    assert result.exit_code == 0 and "--json" in result.output and "default: 400000" in result.output


def test_bench_kmeans_small(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main, ["bench", "kmeans", "--n", "3000", "--d", "16", "--k", "32", "--b", "2", "--repeats", "1",
               "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "| xdc-fast |" in result.output and "| torch mm+argmin |" in result.output
    data = json.loads(out.read_text())
    assert data["n"] == 3000 and data["k"] == 32 and data["b"] == 2
    names = [row["name"] for row in data["rows"]]
    assert names[:2] == ["xdc-fast", "torch mm+argmin"] and "faiss" in names and "scikit-learn" in names
    ours = data["rows"][0]
    assert ours["assign_s"] > 0 and ours["lloyd_s"] > 0 and ours["assign_gflops"] > 0


def test_bench_kmeans_bad_input_is_a_clear_error():
    result = CliRunner().invoke(main, ["bench", "kmeans", "--n", "10", "--k", "20"])
    assert result.exit_code == 2
    assert "--k 20 is larger than --n 10" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["bench", "kmeans", "--k", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.output


def test_prepare_command(tmp_path):
    from xdc_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "root", SyntheticSpec(classes=2, videos_per_class=1, seconds=1.5, fps=8,
                                                            width=32, height=32))
    (tmp_path / "root" / "notes.mp4").write_text("not a video")
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "root"), "--out", str(tmp_path / "ds"),
                                       "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "2 usable, 1 rejected" in result.output
    again = CliRunner().invoke(main, ["prepare", str(tmp_path / "root"), "--out", str(tmp_path / "ds"),
                                      "--workers", "1"])
    assert "0 usable, 0 rejected" in again.output and "3 already done" in again.output


def test_prepare_bad_root_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "ds")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def _option_help(command: str, option: str) -> str:
    text = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    start = text.index(f"  {option} ")
    end = text.find("\n  --", start + 1)
    return " ".join(text[start:end].split())


def test_pretraining_learning_rate_is_its_own():
    # The inherited SGD field is redefined for pretraining only: the other commands keep their rate, and
    # the CPU preset agrees with the flag's default, so `--config tiny` changes nothing a user did not ask.
    from xdc_fast.config import PretrainConfig, read_yaml

    assert "[default: 0.05;" in _option_help("pretrain", "--lr")
    assert "[default: 0.01;" in _option_help("finetune", "--lr")
    assert "[default: 0.01;" in _option_help("evaluate", "--lr")
    assert read_yaml("tiny")["lr"] == PretrainConfig().lr
