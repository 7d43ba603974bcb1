"""Each benchmark runs in its --quick setting and writes its results, so the scripts cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("script", "key"),
    [("reallocation_cost", "dsr_over_sort_topk"), ("step_overhead", "overhead")],
)
def test_benchmark_runs_quick(tmp_path, script, key):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(tmp_path)],
        check=True, env=env, cwd=ROOT, capture_output=True, timeout=300,
    )
    result = json.loads((tmp_path / f"{script}_quick.json").read_text())
    assert result["quick"] is True and isinstance(result[key], float)
    assert (tmp_path / f"{script}_quick.md").read_text().startswith("# ")
    if script == "step_overhead":  # the hooks were timed in the sparse runs
        assert all(row["hooks"]["ordinary_ms"] > 0 for row in result["results"])
