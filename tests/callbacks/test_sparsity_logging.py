import logging
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_sparse import ImageClassifier, MaskInit, SparseMasks
from lightning_sparse.callbacks import _sparsity_logging as sparsity_logging
from lightning_sparse.callbacks._sparsity_logging import (
    DENSITY_HEATMAP_TAG,
    LAYER_TABLE_TAG,
    DensityHistory,
    color_range,
    colorize,
    custom_scalars_layout,
    density_heatmap,
    heatmap_due,
    labelled_density_heatmap,
    layer_table,
)
from lightning_sparse.callbacks.weight_sharing import WeightSharing
from tests.callbacks.test_east_stack import TinyResNet
from tests.helpers import Classifier, TinyCNN, random_loader, tensorboard_events, trainer_kwargs

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


def test_heatmap_image_and_layer_table_reach_tensorboard_and_console(tmp_path, caplog):
    logger = TensorBoardLogger(tmp_path, name="run")
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_epochs=2, logger=logger))
    with caplog.at_level(logging.INFO):
        trainer.fit(Classifier(), random_loader())
    events = tensorboard_events(logger.log_dir)
    assert DENSITY_HEATMAP_TAG in events.Tags()["images"]
    images = events.Images(DENSITY_HEATMAP_TAG)
    assert len(images) == 2  # one per epoch end
    layers = len(mask_init.masks)
    # The labelled picture (matplotlib): a quarter inch per layer row plus 1 inch of title and axis, at 100 dpi.
    assert images[-1].height == pytest.approx(100 * (1.0 + 0.25 * layers), abs=1)
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
    assert DENSITY_HEATMAP_TAG not in tensorboard_events(logger.log_dir).Tags()["images"]


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


# ---------------------------------------------------------------------------------- labelled heatmap (matplotlib)
def _near(image: torch.Tensor, rgb: list[int], tolerance: int = 12) -> bool:
    return bool(((image.int() - torch.tensor(rgb).view(3, 1, 1)).abs().max(dim=0).values <= tolerance).any())


def test_labelled_heatmap_grows_with_layers_and_names_and_spans_the_colour_scale():
    pytest.importorskip("matplotlib")
    densities = torch.tensor([[0.01, 0.02, 0.04], [0.1, 0.1, 0.1], [1.0, 0.5, 0.5]])
    small = labelled_density_heatmap(["a", "b", "c"], [0, 1, 2], densities)
    assert small.dtype == torch.uint8 and small.shape[0] == 3
    taller = labelled_density_heatmap(["a", "b", "c", "d", "e", "f"], [0, 1, 2], densities.repeat(2, 1))
    assert taller.shape[1] - small.shape[1] == pytest.approx(75, abs=1)  # 3 more rows of a quarter inch at 100 dpi
    wider = labelled_density_heatmap(["a" * 40, "b", "c"], [0, 1, 2], densities)
    assert wider.shape[2] > small.shape[2]  # room for the longer row label
    # Both ends of the log colour scale are drawn (cells and colour bar): viridis's dark purple and yellow.
    assert _near(small, PURPLE) and _near(small, YELLOW)


def test_labelled_heatmap_rejects_mismatched_shapes():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="len\\(names\\), len\\(epochs\\)"):
        labelled_density_heatmap(["a"], [0, 1], torch.zeros(2, 2))


def test_without_matplotlib_the_plain_picture_and_a_legend_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(sparsity_logging, "_has_matplotlib", lambda: False)
    logger = TensorBoardLogger(tmp_path, name="run")
    mask_init = MaskInit(sparsity=0.8, seed=0)
    L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, logger=logger)).fit(Classifier(), random_loader())
    events = tensorboard_events(logger.log_dir)
    image = events.Images(DENSITY_HEATMAP_TAG)[-1]
    assert (image.height, image.width) == (8 * len(mask_init.masks), 1 * 32 + 6)
    assert DENSITY_HEATMAP_TAG + "/legend/text_summary" in events.Tags()["tensors"]


def test_heatmap_is_drawn_at_powers_of_two_every_tenth_epoch_and_at_the_end():
    assert [n for n in range(1, 41) if heatmap_due(n)] == [1, 2, 4, 8, 10, 16, 20, 30, 32, 40]


# ------------------------------------------------------------------- what the logs say against what was asked
def _scalars(events: EventAccumulator, tag: str) -> list[float]:
    return [event.value for event in events.Scalars(tag)]


def test_custom_scalars_layout_charts_the_logged_tags(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_epochs=2, logger=logger))
    trainer.fit(Classifier(), random_loader())
    events = tensorboard_events(logger.log_dir)
    config = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(config)
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    scalar_tags = events.Tags()["scalars"]
    per_layer = [
        tag for tag in scalar_tags if any(re.match(regex, tag) for regex in charts["density of each sparse tensor"])
    ]
    assert sorted(per_layer) == sorted(f"sparsity/density/{name}" for name in mask_init.masks)
    overall = [
        tag
        for tag in scalar_tags
        if any(re.match(regex, tag) for regex in charts["sparsity: requested, real (global), effective"])
    ]
    assert sorted(overall) == ["sparsity/global", "sparsity/requested"]
    assert _scalars(events, "sparsity/requested")[-1] == pytest.approx(0.8)
    assert _scalars(events, "sparsity/global")[-1] == pytest.approx(mask_init.masks.sparsity())


def test_custom_scalars_layout_follows_the_logger_prefix():
    layout = custom_scalars_layout(prefix="exp", per_layer=False)
    (chart,) = layout["sparsity"].values()
    assert re.match(chart[1][0], "exp-sparsity/requested") and not re.match(chart[1][0], "sparsity/requested")


def test_weight_sharing_shows_requested_real_and_effective_and_states_the_budget_rule(tmp_path, caplog):
    sharing, mask_init = WeightSharing(), MaskInit(sparsity=0.999, distribution="erk", seed=0)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = L.Trainer(
        callbacks=[sharing, mask_init],
        **trainer_kwargs(tmp_path, max_steps=1, limit_val_batches=0, log_every_n_steps=1, logger=logger),
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(Classifier(TinyResNet(), optimizer="sgd"), random_loader(n=4, batch_size=4, size=16))
    masks = mask_init.masks
    real, effective = masks.sparsity(), 1 - masks.effective_density()
    start = [record.getMessage() for record in caplog.records if record.getMessage().startswith("MaskInit: ")]
    assert f"requested 99.9000%, real {real:.4%}" in start[0] and f"effective {effective:.4%}" in start[0]
    unshared = sum(masks.numel(name) * masks.uses[name] for name in masks)
    assert "budget rule" in start[1] and f"(1 - 0.999) x the unshared model's {unshared:,} weights" in start[1]
    events = tensorboard_events(logger.log_dir)
    # Logged at the first step and at the epoch end, the three side by side; 0.999 is not the real figure here.
    assert _scalars(events, "sparsity/requested") == [pytest.approx(0.999)] * 2
    assert _scalars(events, "sparsity/global") == [pytest.approx(real)] * 2
    assert _scalars(events, "sparsity/effective") == [pytest.approx(effective)] * 2
    assert real != pytest.approx(0.999, abs=1e-5)


@pytest.mark.parametrize("verbose", [0, 1, 2])
def test_verbose_controls_the_console_and_not_the_heatmap(tmp_path, caplog, verbose):
    logger = TensorBoardLogger(tmp_path, name="run")
    mask_init = MaskInit(sparsity=0.8, seed=0, verbose=verbose)
    with caplog.at_level(logging.INFO):
        L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, logger=logger)).fit(Classifier(), random_loader())
    messages = [record.getMessage() for record in caplog.records if "MaskInit" in record.getMessage()]
    table = "Sparse layers at the end of fit" in caplog.text
    if verbose == 0:
        assert messages == [] and not table
    elif verbose == 1:
        assert len(messages) == 2 and "requested 80.0000%" in messages[0] and "end of fit" in messages[1]
        assert not table
    else:
        assert "requested 80.0000%" in messages[0] and table
    assert DENSITY_HEATMAP_TAG in tensorboard_events(logger.log_dir).Tags()["images"]


def test_verbose_must_be_a_level():
    with pytest.raises(ValueError, match="verbose must be 0"):
        MaskInit(sparsity=0.8, verbose=3)


def test_test_and_validate_log_the_sparsity(tmp_path):
    mask_init = MaskInit(sparsity=0.8, seed=0)
    model = ImageClassifier(TinyCNN(), num_classes=10, lr=0.05, lr_schedule="none")
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path))
    trainer.fit(model, random_loader(), random_loader(n=16))
    (tested,) = trainer.test(model, random_loader(n=16), verbose=False)
    assert tested["sparsity/global"] == pytest.approx(mask_init.masks.sparsity())
    assert tested["sparsity/requested"] == pytest.approx(0.8)
    # A fresh Trainer and MaskInit, no fit (as `lightning-sparse validate --ckpt_path ...`): measured from the zeros.
    evaluator = L.Trainer(callbacks=[MaskInit(sparsity=0.8)], **trainer_kwargs(tmp_path))
    (validated,) = evaluator.validate(model, random_loader(n=16), verbose=False)
    assert validated["sparsity/global"] == pytest.approx(mask_init.masks.sparsity())
    assert "sparsity/density/net.conv1.weight" not in validated  # the global figures only


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
    events = tensorboard_events(logger.log_dir).Scalars("sparsity/empty_channels")
    logged = {event.step: event.value for event in events}
    # At every step (the first one, each update step and between them) the curve shows the masks' true count.
    assert {step: logged[step] for step in recorder.counts} == recorder.counts
    assert events[-1].value == recorder.counts[max(recorder.counts)]  # the epoch-end value
