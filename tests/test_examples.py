"""The scripts in ``examples/``, run in-process on tiny settings."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchvision.io import decode_png, read_file

from lightning_sparse import MaskInit
from lightning_sparse.callbacks._sparsity_logging import render_density_heatmap
from lightning_sparse.export import load_sparse
from tests.helpers import Classifier, load_script, random_loader, trainer_kwargs

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    return load_script(EXAMPLES / f"{name}.py")


def test_density_heatmap_png_renders_the_checkpointed_history(tmp_path):
    mask_init = MaskInit(sparsity=0.8, seed=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="run")
    L.Trainer(
        callbacks=[mask_init, checkpoint], **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True)
    ).fit(Classifier(), random_loader())
    output = _load("density_heatmap_png").main(
        ["--ckpt_path", str(tmp_path / "run.ckpt"), "--output", str(tmp_path / "images" / "heatmap.png")]
    )
    image = decode_png(read_file(str(output)))
    assert torch.equal(image, render_density_heatmap(mask_init.density_history, dpi=130))


def test_density_heatmap_png_rejects_a_checkpoint_without_mask_init(tmp_path):
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(Classifier(), random_loader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="no MaskInit density record"):
        _load("density_heatmap_png").main(["--ckpt_path", str(tmp_path / "plain.ckpt")])


def test_add_to_existing_trainer_tiny_run(tmp_path, capsys):
    example = _load("add_to_existing_trainer")
    accuracy = example.main(["--tiny", "--root_dir", str(tmp_path)])
    assert 0.0 <= accuracy <= 1.0
    out = capsys.readouterr().out
    assert "sparsity within the masked layers: 90.0" in out
    # The export loads into the script's plain model.
    model = load_sparse(tmp_path / "small_cnn.sparse.pt", example.SmallCNN())
    conv_weights = [module.weight for module in model.features if isinstance(module, torch.nn.Conv2d)]
    zeros = sum(int((weight == 0).sum()) for weight in conv_weights)
    assert zeros / sum(weight.numel() for weight in conv_weights) > 0.85
