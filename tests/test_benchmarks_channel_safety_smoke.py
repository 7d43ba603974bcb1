"""benchmarks/channel_safety.py runs in a tiny setting, in parts merged afterwards, and writes JSON and Markdown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_channel_safety_quick_parts_merge_into_one_report(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = [
        sys.executable,
        str(ROOT / "benchmarks" / "channel_safety.py"),
        "--quick",
        "--epochs",
        "1",
        "--batches",
        "3",
    ]
    for part, only in (("a", "static"), ("b", "rigl: today")):
        subprocess.run(
            [*script, "--only", only, "--jsonl", str(tmp_path / f"{part}.jsonl"), "--out", str(tmp_path / part)],
            check=True,
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=300,
        )
    subprocess.run(
        [*script, "--merge", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path)],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    result = json.loads((tmp_path / "channel_safety_quick.json").read_text())
    assert list(result["summary"]) == ["static", "rigl: today (floor 0, global growth)"]
    for run in result["runs"]:
        assert run["empty_channels_start"] <= run["empty_channels_max"] and run["final_train_loss"] > 0
        assert run["steps"] == 3 and run["update_period_steps"] == 2
    assert result["summary"]["static"]["empty_channels_end"] == result["summary"]["static"]["empty_channels_start"]
    text = (tmp_path / "channel_safety_quick.md").read_text()
    assert text.startswith("# Channel collapse") and "| static |" in text
