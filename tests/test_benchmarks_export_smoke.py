import json
from pathlib import Path

from tests.helpers import load_script

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "export_size.py"


def test_export_size_quick_writes_json_and_markdown(tmp_path):
    rows = load_script(BENCHMARK).main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "export_size_quick.json").read_text())
    assert [row["sparsity"] for row in payload["rows"]] == [0.9, 0.99, 0.999]
    assert payload["rows"] == rows
    ratios = [row["ratio"] for row in rows]
    # Fewer active weights, smaller file; the dense file is the same model each time.
    assert ratios[0] > ratios[1] > ratios[2] and ratios[0] < 0.25
    assert len({row["dense_bytes"] for row in rows}) == 1
    # ERK counts are exact: 10% of the conv/linear weights at 90% sparsity (to rounding per tensor).
    assert abs(rows[0]["active_sparse_weights"] / (rows[1]["active_sparse_weights"] * 10) - 1) < 0.01
    markdown = (tmp_path / "export_size_quick.md").read_text()
    assert "| 99.0% |" in markdown and "export / dense" in markdown
