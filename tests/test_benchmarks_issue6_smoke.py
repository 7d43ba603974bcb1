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
    (
        "accuracy",
        ["--seeds", "1", "--batches", "3", "--period", "2", "--sparsities", "0.9", "0.99", "--workers", "2"],
        ["machine", "settings", "runs", "summary", "verdicts"],
    ),
    (
        "overhead",
        ["--repeats", "1"],
        ["machine", "median_step_seconds", "time_ratio", "peak_memory_bytes", "memory_ratio"],
    ),
    ("topology_cost", [], ["machine", "median_seconds", "ratio_to_global_sort"]),
    (
        "peer_rigl_torch",
        ["--seeds", "1", "--batches", "3", "--period", "2"],
        ["machine", "peer_available", "peer_unavailable_reason", "summary", "paired_differences"],
    ),
]


@pytest.mark.parametrize(("script", "extra", "keys"), CASES, ids=[case[0] for case in CASES])
def test_benchmark_quick_writes_results(tmp_path: Path, script: str, extra: list[str], keys: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(tmp_path), *extra],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
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
        assert "(a) At sparsity 0.99, RigL and the EAST stack" in text and "(b) The full EAST stack" in text
        # every method at both columns, the EAST ablation at the extreme one, empty channels measured in every cell
        arms = {(cell["arm"], cell["sparsity"]) for cell in result["summary"].values()}
        for arm in ("static", "set", "rigl", "dsr", "dsr_erk", "east"):
            assert {(arm, 0.9), (arm, 0.99)} <= arms, arm
        for arm in ("east_no_dyrelu", "east_no_sharing", "east_no_cyclic", "east_no_channel_safety"):
            assert (arm, 0.99) in arms, arm
        assert all(isinstance(run["empty_channels_end"], int) for run in result["runs"])
        dsr = next(run for run in result["runs"] if run["arm"] == "dsr")  # paper setting: stem, shortcuts, fc dense
        assert dsr["sparse_weights"] < next(r for r in result["runs"] if r["arm"] == "static")["sparse_weights"]
    if script == "peer_rigl_torch" and result["peer_available"]:  # same layer layout: the stem dense in both arms
        densities = {run["kind"]: run["first_layer_density"] for run in result["runs"]}
        assert densities["peer_rigl"] == densities["ours_rigl"] == 1.0
