import logging

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sparse import MaskInit, SparseMasks
from lightning_sparse.callbacks._sparsity_logging import (
    DENSITY_HEATMAP_TAG,
    LAYER_TABLE_TAG,
    DensityHistory,
    color_range,
    colorize,
    density_heatmap,
    layer_table,
)
from tests.helpers import Classifier, random_loader, trainer_kwargs

PURPLE = [68, 1, 84]
YELLOW = [253, 231, 37]


def _masks(first_active: int = 2, second_active: int = 3) -> SparseMasks:
    first = torch.nn.Parameter(torch.ones(2, 4))
    second = torch.nn.Parameter(torch.ones(3, 2, 1, 1))
    first_mask = torch.zeros(8, dtype=torch.bool)
    first_mask[:first_active] = True
    second_mask = torch.zeros(6, dtype=torch.bool)
    second_mask[:second_active] = True
    return SparseMasks(
        {"fc.weight": first, "conv.weight": second},
        {"fc.weight": first_mask.view(2, 4), "conv.weight": second_mask.view(3, 2, 1, 1)},
    )


def test_colorize_interpolates_between_viridis_anchors():
    rgb = colorize(torch.tensor([0.0, 1.0, 0.125, 2.0, -1.0]))
    assert rgb.dtype == torch.uint8 and rgb.shape == (3, 5)
    assert rgb[:, 0].tolist() == PURPLE
    assert rgb[:, 1].tolist() == YELLOW
    # 0.125 is halfway between the first two anchors (68,1,84) and (59,82,139): 63.5, 41.5, 111.5 rounded to even.
    assert rgb[:, 2].tolist() == [64, 42, 112]
    assert rgb[:, 3].tolist() == YELLOW and rgb[:, 4].tolist() == PURPLE  # clamped


def test_density_heatmap_layout_and_scale():
    densities = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.2, 0.2], [0.4, 0.4, 0.4, 0.4]])
    image = density_heatmap(densities, log_scale=False, cell_height=8, min_width=256, max_cell_width=32)
    # 3 layers x 8 px high; 4 records x min(32, ceil(256 / 4)) px, a 2 px white gap, a 4 px scale strip.
    assert image.shape == (3, 24, 4 * 32 + 2 + 4)
    assert image.dtype == torch.uint8
    assert image[:, 0, 0].tolist() == PURPLE  # density 0
    assert image[:, 16, 0].tolist() == YELLOW  # the largest density is the top of the scale
    assert image[:, 8, 0].tolist() == colorize(torch.tensor(0.25)).tolist()  # 0.1 / 0.4
    assert image[:, 8, 3 * 32].tolist() == colorize(torch.tensor(0.5)).tolist()  # 0.2 / 0.4
    assert (image[:, :, 128:130] == 255).all()
    assert image[:, 0, 131].tolist() == YELLOW and image[:, 23, 131].tolist() == PURPLE


def test_density_heatmap_log_scale_spans_smallest_nonzero_to_largest():
    densities = torch.tensor([[0.01, 0.1, 1.0, 0.0]])
    assert color_range(densities) == pytest.approx((0.01, 1.0))
    image = density_heatmap(densities, cell_height=1, min_width=4, max_cell_width=1)
    # log10: -2, -1, 0 over [-2, 0] -> 0, 0.5, 1; a zero density takes the bottom colour.
    assert image[:, 0, :4].T.tolist() == [PURPLE, colorize(torch.tensor(0.5)).tolist(), YELLOW, PURPLE]


def test_density_heatmap_rejects_empty_history():
    with pytest.raises(ValueError, match="layers, records"):
        density_heatmap(torch.zeros(3, 0))


def test_density_history_records_replaces_and_round_trips():
    history = DensityHistory()
    history.record(0, _masks(2, 3))
    history.record(1, _masks(4, 3))
    history.record(1, _masks(8, 6))  # the same epoch again (a resumed run) replaces the record
    assert history.names == ["fc.weight", "conv.weight"]
    assert history.epochs == [0, 1]
    assert torch.equal(history.densities(), torch.tensor([[0.25, 1.0], [0.5, 1.0]]))
    restored = DensityHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.epochs == [0, 1] and torch.equal(restored.densities(), history.densities())


def test_layer_table_lists_shape_active_density_and_empty_channels():
    lines = layer_table(_masks(2, 3)).splitlines()
    assert lines[0].split() == ["layer", "shape", "active", "weights", "density", "empty", "channels"]
    # fc: 2 active weights, both in output row 0 of 2 -> 1 empty; conv: 3 of 6 in rows 0 and 1 of 3 -> 1 empty.
    assert lines[2].split() == ["fc.weight", "2x4", "2", "8", "0.2500", "1/2"]
    assert lines[3].split() == ["conv.weight", "3x2x1x1", "3", "6", "0.5000", "1/3"]
    assert lines[-1].split() == ["total", "5", "14", f"{5 / 14:.4f}", "2/5"]


def _events(log_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_heatmap_image_and_layer_table_reach_tensorboard_and_console(tmp_path, caplog):
    logger = TensorBoardLogger(tmp_path, name="run")
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_epochs=2, logger=logger))
    with caplog.at_level(logging.INFO):
        trainer.fit(Classifier(), random_loader())
    events = _events(logger.log_dir)
    assert DENSITY_HEATMAP_TAG in events.Tags()["images"]
    images = events.Images(DENSITY_HEATMAP_TAG)
    assert len(images) == 2  # one per epoch end
    layers = len(mask_init.masks)
    # The last picture has one column per epoch: 2 x min(32, 128) px wide plus gap and scale; 8 px per layer.
    assert (images[-1].height, images[-1].width) == (8 * layers, 2 * 32 + 6)
    assert mask_init.density_history.epochs == [0, 1]
    assert LAYER_TABLE_TAG + "/text_summary" in events.Tags()["tensors"]
    table = layer_table(mask_init.masks)
    assert "Sparse layers at the end of fit" in caplog.text and table in caplog.text
    assert "conv1.weight" in table and f"{mask_init.masks.nnz():,}" in table


def test_without_tensorboard_logger_history_is_kept_and_nothing_fails(tmp_path):
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path)))
    trainer.fit(Classifier(), random_loader())
    assert mask_init.density_history.epochs == [0, 1]


def test_layer_report_false_records_nothing(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    mask_init = MaskInit(sparsity=0.8, seed=0, layer_report=False)
    L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, logger=logger)).fit(Classifier(), random_loader())
    assert len(mask_init.density_history) == 0
    assert DENSITY_HEATMAP_TAG not in _events(logger.log_dir).Tags()["images"]


def test_resumed_run_continues_the_picture(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = MaskInit(sparsity=0.8, seed=0)
    L.Trainer(callbacks=[first, checkpoint], **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True)).fit(
        Classifier(), random_loader()
    )
    resumed = MaskInit(sparsity=0.8, seed=0)
    L.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path, max_epochs=3)).fit(
        Classifier(), random_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.density_history.epochs == [0, 1, 2]
    assert torch.equal(resumed.density_history.densities()[:, :2], first.density_history.densities())


class _EmptyChannelRecorder(L.Callback):
    """The true empty-channel count after every training batch, and the steps at which the masks changed."""

    def __init__(self, mask_init: MaskInit) -> None:
        self.mask_init = mask_init
        self.version = -1
        self.counts: dict[int, int] = {}
        self.change_steps: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.mask_init.masks
        self.counts[batch_idx] = sum(int((m.reshape(m.shape[0], -1).sum(1) == 0).sum()) for m in masks.values())
        if masks.version != self.version:
            self.version = masks.version
            self.change_steps.append(batch_idx)


def test_empty_channels_are_logged_at_fit_start_and_after_every_topology_update(tmp_path):
    from lightning_sparse import DynamicReallocation

    logger = TensorBoardLogger(tmp_path, name="run")
    mask_init = MaskInit(sparsity=0.97, seed=0, log_layer_densities=False)
    # Floor 0: today's RigL, so the count moves at updates (7 empty channels at the start, 9 after the first).
    reallocation = DynamicReallocation("rigl", every_n_steps=2, stop_at=1.0, min_active_per_channel=0)
    recorder = _EmptyChannelRecorder(mask_init)
    trainer = L.Trainer(
        callbacks=[mask_init, reallocation, recorder],
        **trainer_kwargs(tmp_path, max_epochs=1, logger=logger, log_every_n_steps=1),
    )
    trainer.fit(Classifier(), random_loader(n=96))
    assert reallocation.num_updates == 5 and recorder.change_steps == [0, 2, 4, 6, 8, 10]
    assert len(set(recorder.counts.values())) > 1, "the test needs a run in which the count changes"
    events = _events(logger.log_dir).Scalars("sparsity/empty_channels")
    logged = {event.step: event.value for event in events}
    # At every step (the first one, each update step and between them) the curve shows the masks' true count.
    assert {step: logged[step] for step in recorder.counts} == recorder.counts
    assert events[-1].value == recorder.counts[max(recorder.counts)]  # the epoch-end value
