"""The issue-6 benchmarks run in a tiny setting and write their JSON, Markdown and PNG results, so they cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script, extra arguments that make --quick smaller still, keys the JSON must hold
CASES = [
    ("accuracy", ["--epochs", "1", "--batches", "2", "--sparsities", "0.9", "0.999"],
     ["machine", "settings", "runs", "summary", "verdicts"]),
    ("overhead", ["--repeats", "1"], ["machine", "median_step_seconds", "time_ratio", "peak_memory_bytes", "memory_ratio"]),
    ("topology_cost", [], ["machine", "median_seconds", "ratio_to_global_sort"]),
    ("peer_rigl_torch", ["--epochs", "1", "--batches", "2"],
     ["machine", "peer_available", "peer_unavailable_reason", "summary", "step_time_ratios"]),
]


@pytest.mark.parametrize(("script", "extra", "keys"), CASES, ids=[case[0] for case in CASES])
def test_benchmark_quick_writes_results(tmp_path: Path, script: str, extra: list[str], keys: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(tmp_path), *extra],
        check=True, env=env, cwd=ROOT, capture_output=True, timeout=300,
    )
    result = json.loads((tmp_path / f"{script}_quick.json").read_text())
    assert result["quick"] is True
    for key in keys:
        assert key in result, key
    assert {"cpu", "cpu_cores", "torch", "lightning", "date"} <= set(result["machine"])
    assert (tmp_path / f"{script}_quick.md").read_text().startswith("# ")
    assert (tmp_path / f"{script}_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if script == "accuracy":  # both expectations are decided from the run's own numbers and stated in the table
        assert {v["status"] for v in result["verdicts"].values()} <= {"confirmed", "refuted"}
        text = (tmp_path / "accuracy_quick.md").read_text()
        assert "(a) Dynamic methods" in text and "(b) EAST holds accuracy" in text

