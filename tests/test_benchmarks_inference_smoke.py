import json
from pathlib import Path

from lightning_sparse.functional.sparse_conv import numba_available
from tests.helpers import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"


def test_inference_quick_writes_json_markdown_png(tmp_path):
    rows = load_script(BENCHMARK, "inference_benchmark").main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "inference_quick.json").read_text())
    assert payload["rows"] == rows and "load average" in payload["note"]
    assert [(row["batch"], row["sparsity"]) for row in rows] == [(1, 0.99), (8, 0.99)]
    for row in rows:
        assert abs(row["density"] - 0.01) < 1e-3 and row["flop_limit"] > 95
        assert row["max_relative_error"] < 1e-4  # ours computes the dense model's function
        assert {"dense", "ours"} <= set(row["median_ms"]) and row["speedup_vs_dense"] > 0
        assert len(row["layers"]) == 21  # 20 convs and the classifier, each with its choice
        if numba_available():
            assert all("dense" in layer["times_ms"] for layer in row["layers"])
            assert any(layer["choice"] != "dense" or layer["reason"] for layer in row["layers"])
    markdown = (tmp_path / "inference_quick.md").read_text()
    assert "speedup vs dense" in markdown and "FLOP limit" in markdown and "layer1.0.conv1" in markdown
    assert (tmp_path / "inference_quick.png").stat().st_size > 0


def test_inference_mask_seeds_report_their_spread(tmp_path):
    argv = ["--quick", "--seeds", "0", "1", "--name", "inference_seeds", "--out", str(tmp_path)]
    rows = load_script(BENCHMARK, "inference_benchmark").main(argv)
    assert [(row["batch"], row["mask_seed"]) for row in rows] == [(1, 0), (1, 1), (8, 0), (8, 1)]
    first, second = (row["layers"][1]["density"] for row in rows[:2])
    assert first == second  # the same ERK density per layer under every seed
    markdown = (tmp_path / "inference_seeds_quick.md").read_text()
    assert "## Spread over mask seeds" in markdown and "| resnet18 | 0.990 | 8 | 1 | 0, 1 |" in markdown
