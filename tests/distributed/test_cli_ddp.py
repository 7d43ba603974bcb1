"""DDP as users run it: the ``lightning-sparse`` console script with ``--trainer.strategy=ddp`` on 2 CPU processes.

Lightning's ``ddp`` strategy starts the second process by running the same command line again, so this goes through
the real console script, the quickstart config and Lightning's own launcher. Each rank writes its mask fingerprint
at every optimizer step through :class:`~tests.distributed.ddp_harness.MaskFingerprints`, appended to the config's
callbacks on the command line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.ddp_harness import read_rank_records, read_rank_summaries

pytest.importorskip("sklearn", reason="the quickstart's digits data ships with scikit-learn ([offline] extra)")

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "configs" / "quickstart.yaml"


def console_script() -> str:
    """The installed ``lightning-sparse`` script of this interpreter's environment."""
    script = Path(sys.executable).with_name("lightning-sparse")
    found = str(script) if script.is_file() else shutil.which("lightning-sparse")
    if found is None:
        pytest.fail("the lightning-sparse console script is not installed; run `pip install -e .` first")
    return found


def test_cli_fit_under_ddp_keeps_ranks_identical_and_warns_about_no_library_metric(tmp_path: Path) -> None:
    records = tmp_path / "ranks"
    records.mkdir()
    # Quickstart under 2 ranks: 629 training images per rank in batches of 64, 10 optimizer steps per epoch. DSR
    # reallocates every 20 steps until 0.95 of the run: 22 steps (two epochs and two steps) include the update at
    # step 20, broadcast to rank 1. About 30 s of CPU time in all (3 processes); 3.6 min wall time was measured
    # while other jobs loaded the 2 cores 6-fold.
    command = [
        console_script(),
        "fit",
        f"--config={QUICKSTART}",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=22",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=tests.distributed.ddp_harness.MaskFingerprints",
        f"--trainer.callbacks.init_args.directory={records}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    rank0, rank1 = read_rank_records(records, world_size=2)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(22))
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    changed = [b["step"] for a, b in zip(rank0, rank0[1:]) if b["version"] != a["version"]]
    assert changed == [20]  # the DSR update, the same on both ranks
    summaries = read_rank_summaries(records, world_size=2)
    assert [s["num_updates"] for s in summaries] == [1, 1]
    assert [s["num_rank_corrections"] for s in summaries] == [0, 0]

    # Lightning's "It is recommended to use `self.log('<name>', ..., sync_dist=True)`" for none of our metrics.
    named = re.findall(r"self\.log\('([^']+)'", output)
    assert named == [], f"logging warnings for {named}"
    assert (tmp_path / "checkpoints" / "quickstart" / "quickstart.ckpt").is_file()
