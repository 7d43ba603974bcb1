"""The ``lightning-sparse`` console script and the example configs."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sparse.callbacks import MaskInit
from lightning_sparse.callbacks._sparsity_logging import DENSITY_HEATMAP_TAG
from lightning_sparse.classification import ImageClassifier
from lightning_sparse.cli import SparseCLI, main
from lightning_sparse.export import load_sparse
from lightning_sparse.models import WideResNet
from lightning_sparse.selection import select_sparse_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
CONFIG_NAMES = [
    "quickstart.yaml",
    "cifar10_wrn28x2_dsr.yaml",
    "cifar100_resnet50_dsr.yaml",
    "imagenet_resnet50_dsr.yaml",
]
TINY_RUN = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


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
    assert printed["model"]["network"]["class_path"] == "lightning_sparse.models.WideResNet"
    assert printed["model"]["network"]["init_args"]["depth"] == 16
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
            "--trainer.limit_test_batches=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert "test/acc" in capsys.readouterr().out

    output = tmp_path / "export" / "quickstart.sparse.pt"
    main(["export", "--ckpt_path", str(ckpt), "--output", str(output)])
    printed = capsys.readouterr().out
    assert "of the dense state_dict" in printed and str(output) in printed
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
    assert "could not be loaded as an ImageClassifier checkpoint" in capsys.readouterr().err


def test_help_lists_the_subcommands_and_export(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("fit", "validate", "test", "export"):
        assert word in out
    assert "{fit,validate,test}" in out


def test_console_script_runs_export_help():
    result = subprocess.run(
        [sys.executable, "-c", "from lightning_sparse.cli import main; main()", "export", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--ckpt_path" in result.stdout and "--output" in result.stdout


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
