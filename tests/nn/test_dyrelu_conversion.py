"""Tests for ReLU <-> DyReLU model surgery and blend control (docs/algorithms.md §3c)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightning_sparse.nn import (
    DyReLU,
    convert_dyrelu_to_relu,
    convert_relu_to_dyrelu,
    dyrelu_modules,
    set_dyrelu_blend,
)


def _small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


def test_static_inference_on_sequential_conv_bn_relu() -> None:
    net = convert_relu_to_dyrelu(_small_cnn(), reduction=2)
    found = {name: m.channels for name, m in dyrelu_modules(net).items()}
    # Widths from the preceding BatchNorm2d(num_features) and Linear(out_features).
    assert found == {"0.2": 8, "1.2": 12, "5": 6}
    assert net[0][2].site_name == "0.2" and net[0][2].reduction == 2
    assert not any(type(m) is nn.ReLU for m in net.modules())
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_static_inference_fails_without_preceding_width() -> None:
    net = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match=r"ReLU '0'.*channels=\{'0': C\}.*example_input"):
        convert_relu_to_dyrelu(net)
    converted = convert_relu_to_dyrelu(net, channels={"0": 3})
    assert converted[0].channels == 3


def test_explicit_channels_validated() -> None:
    with pytest.raises(ValueError, match="not nn.ReLU modules.*'0.0'"):
        convert_relu_to_dyrelu(_small_cnn(), channels={"0.0": 8})
    with pytest.raises(ValueError, match="positive int"):
        convert_relu_to_dyrelu(_small_cnn(), channels={"0.2": 0})


def test_root_relu_is_replaced_and_returned() -> None:
    converted = convert_relu_to_dyrelu(nn.ReLU(), channels={"": 5})
    assert isinstance(converted, DyReLU) and converted.channels == 5


def test_resnet18_dry_run_shared_relu_same_width() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    model.layer1.eval()  # a mixed train/eval state must come back unchanged
    x = torch.randn(2, 3, 32, 32)
    converted = convert_relu_to_dyrelu(model, example_input=x)
    assert converted is model
    assert model.training and not model.layer1.training and model.layer2.training
    modules = dyrelu_modules(model)
    # Stem + one (twice-used) relu per BasicBlock: 1 + 8 modules.
    assert len(modules) == 9
    assert modules["layer3.1.relu"].channels == 256 and modules["relu"].channels == 64
    assert torch.isfinite(model(x)).all()


def test_resnet50_shared_bottleneck_relu_with_two_widths_raises() -> None:
    model = torchvision.models.resnet50(num_classes=10)
    with pytest.raises(ValueError, match=r"'layer1\.0\.relu'.*\[64, 256\].*give each activation site its own module"):
        convert_relu_to_dyrelu(model, example_input=torch.randn(1, 3, 32, 32))
    # Nothing was swapped: the error comes before any surgery.
    assert not dyrelu_modules(model)
    # Static inference sees only bn3 (256, registered just before relu); the first use (64 channels) then fails
    # in the forward, naming the site.
    convert_relu_to_dyrelu(model)
    with pytest.raises(ValueError, match=r"'layer1\.0\.relu' was built for 256 channels .* 64 channels"):
        model(torch.randn(1, 3, 32, 32))


def test_relu_registered_twice_becomes_one_dyrelu_at_both_places() -> None:
    shared = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), shared, nn.Conv2d(4, 4, 1), shared)
    convert_relu_to_dyrelu(net, example_input=torch.randn(1, 2, 3, 3))
    assert isinstance(net[2], DyReLU) and net[2] is net[4]


def test_set_blend_and_convert_back_gives_identical_outputs() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    relu_output = model(x)
    convert_relu_to_dyrelu(model, example_input=x)
    assert not torch.allclose(model(x), relu_output)

    with pytest.raises(ValueError, match=r"beta > 0: relu \(beta=1.0\), layer1\.0\.relu"):
        convert_dyrelu_to_relu(model)

    assert set_dyrelu_blend(model, 0.0) == 9
    blended_off = model(x)
    assert torch.equal(blended_off, relu_output)
    convert_dyrelu_to_relu(model)
    assert not dyrelu_modules(model)
    assert type(model.layer1[0].relu) is nn.ReLU
    assert torch.equal(model(x), blended_off)


def test_set_blend_validates_and_counts() -> None:
    net = convert_relu_to_dyrelu(_small_cnn())
    assert set_dyrelu_blend(net, 0.3) == 3
    assert all(m.beta == 0.3 for m in dyrelu_modules(net).values())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        set_dyrelu_blend(net, 1.2)
    assert set_dyrelu_blend(nn.Linear(2, 2), 0.5) == 0


def test_new_modules_follow_model_dtype() -> None:
    net = _small_cnn().double()
    convert_relu_to_dyrelu(net)
    assert net[0][2].fc1.weight.dtype == torch.float64
    assert net(torch.randn(1, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64
