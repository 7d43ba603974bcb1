"""read_sparse_checkpoint: the masked weights of any Lightning checkpoint written with MaskInit."""

import lightning as L
import pytest
import torch

from lightning_sparse import MaskInit
from lightning_sparse.checkpoints import read_sparse_checkpoint
from lightning_sparse.classification import ImageClassifier
from tests.helpers import Classifier, TinyCNN, random_loader, trainer_kwargs


def _fit(tmp_path, model: L.LightningModule, name: str) -> MaskInit:
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(model, random_loader())
    trainer.save_checkpoint(tmp_path / name)
    return mask_init


def test_an_image_classifier_built_in_python_exports_its_network(tmp_path):
    # No `_class_path` in its hyperparameters (not built by the CLI): recognised by ImageClassifier's own.
    model = ImageClassifier(TinyCNN(), num_classes=10, lr_schedule="none")
    _fit(tmp_path, model, "python.ckpt")
    sparse = read_sparse_checkpoint(tmp_path / "python.ckpt")
    assert sparse.submodule == "network" and sparse.module_class_path is None
    assert sparse.state_dict.keys() == TinyCNN().state_dict().keys()
    # The whole module on request.
    whole = read_sparse_checkpoint(tmp_path / "python.ckpt", submodule="")
    assert whole.state_dict.keys() == model.state_dict().keys()


def test_the_masks_are_applied_to_the_weights(tmp_path):
    mask_init = _fit(tmp_path, Classifier(), "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    # A weight edited after training at a masked position: the export is the masked model all the same.
    weight = checkpoint["state_dict"]["net.conv2.weight"]
    mask = mask_init.masks.state_dict()["masks"]["net.conv2.weight"]
    weight[~mask] = 1.0
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    sparse = read_sparse_checkpoint(tmp_path / "edited.ckpt")
    assert sparse.submodule == "" and sparse.masked_tensors == 3
    assert not sparse.state_dict["net.conv2.weight"][~mask].any()
    assert torch.equal(sparse.state_dict["net.conv2.weight"][mask], weight[mask])


def test_masks_that_do_not_fit_the_weights_are_a_clear_error(tmp_path):
    _fit(tmp_path, Classifier(), "run.ckpt")
    checkpoint = torch.load(tmp_path / "run.ckpt", weights_only=True)
    del checkpoint["state_dict"]["net.fc.weight"]
    torch.save(checkpoint, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match=r"do not fit its state_dict \(masks without a weight: \['net.fc.weight'\]"):
        read_sparse_checkpoint(tmp_path / "broken.ckpt")


def test_a_file_without_a_state_dict_is_a_clear_error(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="is not a Lightning checkpoint \\(no 'state_dict' entry\\)"):
        read_sparse_checkpoint(tmp_path / "bare.pt")
