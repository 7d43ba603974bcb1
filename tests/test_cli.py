"""The ``lightning-sparse`` console script and the example configs."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from lightning_sparse.callbacks import DynamicReallocation, MaskInit
from lightning_sparse.callbacks._sparsity_logging import DENSITY_HEATMAP_TAG
from lightning_sparse.classification import ImageClassifier
from lightning_sparse.cli import SparseCLI, export_checkpoint, main
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.export import load_sparse
from lightning_sparse.models import WideResNet
from lightning_sparse.selection import select_sparse_parameters
from tests.helpers import trainer_kwargs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
CONFIG_NAMES = [
    "quickstart.yaml",
    "cifar10_wrn28x2_dsr.yaml",
    "cifar100_resnet50_dsr.yaml",
    "imagenet_resnet50_dsr.yaml",
]
TINY_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",  # an int: jsonargparse reads 1 as 1.0, i.e. every batch
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


class UserModule(L.LightningModule):
    """A user's own LightningModule with no configure_optimizers: the CLI's --optimizer supplies it."""

    def __init__(self, channels: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)


class SavePredictions(BasePredictionWriter):
    """Writes every prediction batch of ``lightning-sparse predict`` to one file."""

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any, batch_indices: Any) -> None:
        torch.save(torch.cat(predictions), self.path)


@pytest.fixture(autouse=True)
def _no_pytest_arguments(monkeypatch):
    # main(args) runs LightningCLI like the shell would; pytest's own sys.argv would only add a warning.
    monkeypatch.setattr(sys, "argv", ["lightning-sparse"])


def _quickstart_without_reallocation(tmp_path: Path) -> Path:
    """The quickstart config minus DynamicReallocation: exercises the CLI with MaskInit alone."""
    config = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    config["trainer"]["callbacks"] = [
        callback for callback in config["trainer"]["callbacks"] if not callback["class_path"].endswith("Reallocation")
    ]
    path = tmp_path / "quickstart_mask_init_only.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _print_config(config: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_resolves_the_quickstart_model_and_data(tmp_path, capsys):
    printed = _print_config(_quickstart_without_reallocation(tmp_path), capsys)
    # The config's model section has no class_path: ImageClassifier is the default model.
    assert printed["model"]["class_path"] == "lightning_sparse.ImageClassifier"
    assert printed["model"]["init_args"]["network"]["class_path"] == "lightning_sparse.models.WideResNet"
    assert printed["model"]["init_args"]["network"]["init_args"]["depth"] == 16
    assert printed["optimizer"] is None and printed["lr_scheduler"] is None
    assert printed["data"]["class_path"] == "lightning_sparse.data.DigitsDataModule"
    assert printed["trainer"]["callbacks"][0]["init_args"]["sparsity"] == 0.9


def test_fit_test_and_export_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(_quickstart_without_reallocation(tmp_path))
    main(["fit", "--config", config, *TINY_RUN])
    ckpt = tmp_path / "checkpoints" / "quickstart" / "quickstart.ckpt"
    assert ckpt.is_file()

    # The checkpoint rebuilds its network without any config, and the network is 90% sparse.
    model = ImageClassifier.load_from_checkpoint(ckpt)
    assert isinstance(model.network, WideResNet) and len(model.network.layer1) == 2
    sparse = select_sparse_parameters(model)
    zeros = sum(int((param == 0).sum()) for param in sparse.values())
    assert zeros / sum(param.numel() for param in sparse.values()) == pytest.approx(0.9, abs=1e-3)

    # The TensorBoard run holds the density heatmap.
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert DENSITY_HEATMAP_TAG in events.Tags()["images"]

    capsys.readouterr()
    main(
        [
            "test",
            "--config",
            config,
            "--ckpt_path",
            str(ckpt),
            "--trainer.limit_test_batches=2",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert "test/acc" in capsys.readouterr().out

    # predict is a subcommand like the others; a BasePredictionWriter callback keeps the logits.
    predictions = tmp_path / "predictions.pt"
    main(
        [
            "predict",
            "--config",
            config,
            "--ckpt_path",
            str(ckpt),
            "--trainer.limit_predict_batches=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=tests.test_cli.SavePredictions",
            f"--trainer.callbacks.path={predictions}",
        ]
    )
    assert torch.load(predictions).shape == (128, 10)

    output = tmp_path / "export" / "quickstart.sparse.pt"
    main(["export", "--ckpt_path", str(ckpt), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "of the dense state_dict" in printed and str(output) in printed
    assert "model = lightning_sparse.models.WideResNet(depth=16, width=2, num_classes=10" in printed
    network = load_sparse(output, WideResNet(depth=16, width=2, num_classes=10))
    images = torch.randn(2, 3, 16, 16)
    model.eval(), network.eval()
    assert torch.equal(network(images), model(images))

    # Without --output the export goes next to the checkpoint.
    main(["export", "--ckpt_path", "checkpoints/quickstart/quickstart.ckpt"])
    assert (tmp_path / "checkpoints" / "quickstart" / "quickstart.sparse.pt").is_file()


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(tmp_path / "nothing.ckpt")])
    assert exit_info.value.code != 0
    assert "no checkpoint at" in capsys.readouterr().err


def test_export_of_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(not_a_checkpoint)])
    assert exit_info.value.code != 0
    assert "could not be read as a Lightning checkpoint" in capsys.readouterr().err


def test_help_lists_the_subcommands_and_export(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "usage: lightning-sparse" in out and "{fit,validate,test,predict,export}" in out
    assert "Write a checkpoint's sparse weights" in out


def test_console_script_runs_export_help():
    result = subprocess.run(
        [sys.executable, "-c", "from lightning_sparse.cli import main; main()", "export", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--ckpt_path" in result.stdout and "--output" in result.stdout


def _console_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lightning-sparse")
    if not script.is_file():
        pytest.skip("the lightning-sparse console script is not installed (pip install -e .)")
    # The repository root on the path: the script then imports this checkout and tests.test_cli.UserModule.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_console_script_fits_a_user_module_with_any_optimizer_and_exports_it(tmp_path, capsys):
    fit = _console_script(
        "fit",
        "--model=tests.test_cli.UserModule",
        "--model.channels=6",
        "--optimizer=torch.optim.AdamW",
        "--optimizer.lr=0.01",
        "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
        "--lr_scheduler.step_size=1",
        "--data=lightning_sparse.data.DigitsDataModule",
        "--data.image_size=8",
        "--data.batch_size=32",
        "--trainer.callbacks+=lightning_sparse.callbacks.MaskInit",
        "--trainer.callbacks.sparsity=0.8",
        "--trainer.callbacks.seed=0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath=ckpts",
        "--trainer.callbacks.filename=user",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt_path = tmp_path / "ckpts" / "user.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    hparams = ckpt["hyper_parameters"]
    assert (hparams["_class_path"], hparams["channels"], hparams["num_classes"]) == ("tests.test_cli.UserModule", 6, 10)
    # The optimizer and the scheduler are the ones named on the command line (AdamW's default weight decay 0.01;
    # StepLR's default gamma 0.1, stepped at each of the 2 epoch ends).
    (group,) = ckpt["optimizer_states"][0]["param_groups"]
    assert (group["initial_lr"], group["weight_decay"]) == (0.01, 0.01)
    assert "exp_avg_sq" in next(iter(ckpt["optimizer_states"][0]["state"].values()))
    assert ckpt["lr_schedulers"][0]["step_size"] == 1 and ckpt["lr_schedulers"][0]["_last_lr"] == pytest.approx(
        [0.01 * 0.1**2]
    )
    (masks,) = [state["masks"] for state in ckpt["callbacks"].values() if "masks" in state]
    assert set(masks) == {"backbone.0.weight", "backbone.3.weight", "head.weight"}

    main(["export", "--ckpt_path", str(ckpt_path)])  # in-process: one more interpreter start would add nothing
    assert "model = tests.test_cli.UserModule(...)" in capsys.readouterr().out
    module = load_sparse(tmp_path / "ckpts" / "user.sparse.pt", UserModule(channels=6))
    assert module.state_dict().keys() == ckpt["state_dict"].keys()
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, ckpt["state_dict"][name]), name
    sparse = [module.state_dict()[name] for name in masks]
    assert sum(int((t == 0).sum()) for t in sparse) / sum(t.numel() for t in sparse) == pytest.approx(0.8, abs=0.01)


def test_optimizer_flags_that_would_be_ignored_are_parse_errors(tmp_path, capsys):
    quickstart = str(CONFIGS / "quickstart.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", quickstart, "--optimizer=torch.optim.AdamW"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "ImageClassifier defines configure_optimizers" in error and "--model.optimizer" in error

    data = ["--data=lightning_sparse.data.DigitsDataModule"]
    with pytest.raises(SystemExit):
        main(["fit", "--model=tests.test_cli.UserModule", *data])
    assert "UserModule has no configure_optimizers: pass the optimizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--model=tests.test_cli.UserModule", *data, "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"])
    assert "--lr_scheduler needs an optimizer" in capsys.readouterr().err


def _small_cnn_class() -> type[L.LightningModule]:
    spec = importlib.util.spec_from_file_location(
        "add_to_existing_trainer", ROOT / "examples" / "add_to_existing_trainer.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.SmallCNN


def _plain_trainer(tmp_path: Path, callbacks: list) -> L.Trainer:
    # A plain Trainer script's fit, checkpoints written by the ModelCheckpoint among ``callbacks``.
    settings = trainer_kwargs(tmp_path, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=True)
    return L.Trainer(callbacks=callbacks, **settings)


def test_export_of_a_plain_trainer_checkpoint_with_a_user_module(tmp_path, capsys):
    # examples/add_to_existing_trainer.py's module and callbacks, with a ModelCheckpoint.
    small_cnn = _small_cnn_class()
    torch.manual_seed(0)
    mask_init = MaskInit(sparsity=0.9, distribution="erk", exclude=["classifier.weight"], seed=0)
    callbacks = [mask_init, DynamicReallocation(method="dsr", every_n_steps=2), ModelCheckpoint(tmp_path, "plain")]
    model = small_cnn()
    _plain_trainer(tmp_path, callbacks).fit(model, DigitsDataModule(image_size=16, batch_size=64))

    output = tmp_path / "small_cnn.sparse.pt"
    main(["export", "--ckpt_path", str(tmp_path / "plain.ckpt"), "--output", str(output)])
    assert "model = the LightningModule that wrote the checkpoint" in capsys.readouterr().out
    exported = load_sparse(output, small_cnn())
    images = torch.randn(4, 3, 16, 16)
    model.eval(), exported.eval()
    assert torch.equal(exported(images), model(images))
    for name, mask in mask_init.masks.state_dict()["masks"].items():
        weight = exported.state_dict()[name]
        assert not weight[~mask].any() and int((weight != 0).sum()) == int(mask.sum()), name

    # --submodule keeps one attribute, without its prefix.
    report = export_checkpoint(tmp_path / "plain.ckpt", tmp_path / "features.sparse.pt", submodule="features")
    features = load_sparse(report.path, small_cnn().features).eval()
    assert torch.equal(features(images), model.features(images))


def test_export_of_a_checkpoint_without_masks_says_what_to_do(tmp_path, capsys):
    small_cnn = _small_cnn_class()
    weights_only = ModelCheckpoint(tmp_path, "weights_only", save_weights_only=True)
    trainer = _plain_trainer(tmp_path, [MaskInit(sparsity=0.9, seed=0), weights_only])
    trainer.fit(small_cnn(), DigitsDataModule(image_size=16, batch_size=64))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(tmp_path / "weights_only.ckpt")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "holds no MaskInit masks" in error and "save_weights_only=True" in error

    trainer.save_checkpoint(tmp_path / "full.ckpt")
    with pytest.raises(ValueError, match=r"no tensors under 'backbone'; .* names are \['classifier', 'features'\]"):
        export_checkpoint(tmp_path / "full.ckpt", submodule="backbone")


def test_sparse_cli_refuses_export_with_directions():
    with pytest.raises(ValueError, match="export is not a Trainer subcommand"):
        SparseCLI(args=["export", "--ckpt_path", "x.ckpt"])


# ------------------------------------------------------------------- configs that need DynamicReallocation
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_prints_its_full_config(name, capsys):
    printed = _print_config(CONFIGS / name, capsys)
    class_paths = [callback["class_path"] for callback in printed["trainer"]["callbacks"]]
    assert class_paths[:2] == ["lightning_sparse.callbacks.MaskInit", "lightning_sparse.callbacks.DynamicReallocation"]
    assert printed["trainer"]["callbacks"][1]["init_args"]["method"] == "dsr"


def _build(name: str, tmp_path: Path, monkeypatch) -> SparseCLI:
    monkeypatch.chdir(tmp_path)
    return SparseCLI(args=["--config", str(CONFIGS / name)], run=False)


def _callback(cli: SparseCLI, class_name: str):
    return next(callback for callback in cli.trainer.callbacks if type(callback).__name__ == class_name)


def test_wrn28x2_config_is_the_dsr_paper_protocol(tmp_path, monkeypatch):
    cli = _build("cifar10_wrn28x2_dsr.yaml", tmp_path, monkeypatch)
    assert sum(param.numel() for param in cli.model.network.parameters()) == 1_467_610
    mask_init: MaskInit = _callback(cli, "MaskInit")
    sparse = select_sparse_parameters(cli.model, mask_init.include, mask_init.exclude)
    # docs/algorithms.md §2b: the 24 block 3x3 convs (1,451,520 weights) are sparse; stem, shortcuts and FC dense.
    assert len(sparse) == 24 and sum(param.numel() for param in sparse.values()) == 1_451_520
    assert all(param.shape[-2:] == (3, 3) for param in sparse.values())
    assert "network.conv1.weight" not in sparse and "network.fc.weight" not in sparse
    assert (mask_init.sparsity, mask_init.distribution) == (0.9, "uniform")
    dsr = _callback(cli, "DynamicReallocation")
    assert dsr.prune_target == 20_000 and isinstance(dsr.prune_target, int)
    assert (dsr.initial_threshold, dsr.tolerance, dsr.stop_at) == (0.001, 0.1, 0.95)
    # Period 100 / 200 / 400 / 800 from epochs 0 / 25 / 80 / 140 of 200.
    assert [dsr.schedule.period(epoch / 200) for epoch in (0, 24, 25, 79, 80, 139, 140, 199)] == [
        100,
        100,
        200,
        200,
        400,
        400,
        800,
        800,
    ]
    assert cli.trainer.max_epochs == 200 and cli.datamodule.batch_size == 100
    model = cli.model
    assert (model.lr, model.momentum, model.nesterov, model.weight_decay) == (0.1, 0.9, True, 5e-4)
    assert (model.milestones, model.gamma) == ([0.3, 0.6, 0.8], 0.2)


@pytest.mark.parametrize("name", ["cifar100_resnet50_dsr.yaml", "imagenet_resnet50_dsr.yaml"])
def test_resnet50_configs_sparsify_bottleneck_convs_and_fc(name, tmp_path, monkeypatch):
    cli = _build(name, tmp_path, monkeypatch)
    mask_init: MaskInit = _callback(cli, "MaskInit")
    sparse = select_sparse_parameters(cli.model, mask_init.include, mask_init.exclude)
    # 16 bottlenecks x 3 convs + the classifier weight; the stem and the downsample convs stay dense.
    assert len(sparse) == 16 * 3 + 1 and "network.fc.weight" in sparse
    assert not any("downsample" in name for name in sparse) and "network.conv1.weight" not in sparse
    dsr = _callback(cli, "DynamicReallocation")
    assert dsr.prune_target == 400_000 and isinstance(dsr.prune_target, int)


def test_quickstart_runs_a_few_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *TINY_RUN])
    ckpt = torch.load(tmp_path / "checkpoints" / "quickstart" / "quickstart.ckpt", weights_only=True)
    assert any(key.startswith("DynamicReallocation") for key in ckpt["callbacks"])
    assert math.isclose(ckpt["hyper_parameters"]["lr"], 0.1)
