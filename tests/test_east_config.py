"""The paper-setting EAST config (examples/configs/cifar10_resnet34_east.yaml) parses and builds the EAST stack."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "configs" / "cifar10_resnet34_east.yaml"


def _printed_config(capsys: pytest.CaptureFixture[str]) -> dict:
    from lightning_sparse.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_config_parses_with_the_protocol_of_section_3f(capsys) -> None:
    config = _printed_config(capsys)
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]
    assert config["model"]["class_path"] == "lightning_sparse.ImageClassifier"  # the CLI's default model
    assert trainer["max_epochs"] == 250 and trainer["gradient_clip_val"] == 1.0
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c.get("init_args", {}) for c in trainer["callbacks"]}
    assert callbacks["MaskInit"]["sparsity"] == 0.999 and callbacks["MaskInit"]["distribution"] == "erk"
    assert callbacks["WeightSharing"]["source_block"] == 1
    assert (callbacks["DyReLUPhaseOut"]["start"], callbacks["DyReLUPhaseOut"]["end"]) == (0.25, 0.496)
    cyclic = callbacks["CyclicSparsitySchedule"]
    assert (cyclic["max_multiplier"], cyclic["cycles"], cyclic["cycle_length"]) == (3.0, 2, 0.2)
    # 0.2 of 250 epochs is 50 epochs per cycle, and it must stay a float (an int would mean epochs).
    assert isinstance(cyclic["cycle_length"], float)
    realloc = callbacks["DynamicReallocation"]
    assert realloc["method"] == "rigl" and realloc["every_n_steps"] == 4000
    # After the cycles, as the authors' code runs it (docs/algorithms.md §3a, §3e): 0.5 annealed to 0.005 over the
    # whole run, updates to the end, counts rounded up.
    assert (realloc["drop_fraction"], realloc["drop_fraction_floor"], realloc["stop_at"]) == (0.5, 0.005, 1.0)
    assert realloc["rounding"] == "ceil"
    assert model["network"]["init_args"]["blocks_per_stage"] == [3, 4, 6, 3]
    assert model["nesterov"] is True and model["weight_decay"] == 0.0001 and model["milestones"] == [0.5, 0.75]
    assert data["init_args"]["batch_size"] == 128 and data["class_path"].endswith("CIFAR10DataModule")


def test_config_builds_the_model_and_every_callback() -> None:
    from lightning.pytorch.cli import LightningCLI

    from lightning_sparse.callbacks.cyclic_sparsity import CyclicSparsitySchedule
    from lightning_sparse.callbacks.dyrelu_phase_out import DyReLUPhaseOut
    from lightning_sparse.callbacks.weight_sharing import WeightSharing
    from lightning_sparse.classification import ImageClassifier

    cli = LightningCLI(
        ImageClassifier,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", str(CONFIG), "--trainer.logger=false"],
    )
    kinds = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"WeightSharing", "DyReLUPhaseOut", "MaskInit", "CyclicSparsitySchedule", "DynamicReallocation"} <= kinds
    phase_out = next(c for c in cli.trainer.callbacks if isinstance(c, DyReLUPhaseOut))
    cyclic = next(c for c in cli.trainer.callbacks if isinstance(c, CyclicSparsitySchedule))
    assert next(c for c in cli.trainer.callbacks if isinstance(c, WeightSharing)).source_block == 1
    assert (phase_out.start, phase_out.end, cyclic.cycle_length) == (0.25, 0.496, 0.2)
    assert sum(p.numel() for p in cli.model.parameters()) > 21_000_000
