import pytest

from lightning_sparse.callbacks import DynamicReallocation, MaskInit
from tests.distributed.ddp_harness import fit_ddp_spawn, read_rank_records, read_rank_summaries


@pytest.mark.parametrize("method", ["dsr", "set", "rigl"])
def test_every_rank_holds_identical_masks_after_every_update(tmp_path, method):
    # 64 samples over 2 ranks in batches of 8: 4 optimizer steps per epoch, 8 in all; updates at 2, 4, 6.
    kwargs = dict(initial_threshold=0.05) if method == "dsr" else {}
    callbacks = [
        MaskInit(sparsity=0.8, seed=0),
        DynamicReallocation(method, every_n_steps=2, stop_at=1.0, **kwargs),
    ]
    directory = fit_ddp_spawn(tmp_path, callbacks, max_epochs=2)
    rank0, rank1 = read_rank_records(directory, world_size=2)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(8))
    changed = [b["step"] for a, b in zip(rank0, rank0[1:]) if b["version"] != a["version"]]
    assert changed == [2, 4, 6]
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    assert len({r["fingerprint"] for r in rank0}) == 4  # the masks really changed at each update
    # The ranks agreed on their own: rank 0's safety-net broadcast never had to correct rank 1.
    summaries = read_rank_summaries(directory, world_size=2)
    assert [s["num_updates"] for s in summaries] == [3, 3]
    assert [s["num_rank_corrections"] for s in summaries] == [0, 0]
