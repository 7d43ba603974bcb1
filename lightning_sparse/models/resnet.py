"""CIFAR-style ResNet-18/34/50 (He et al. 2016) with torchvision's attribute names.

The CIFAR variant replaces ImageNet's 7x7 stride-2 stem and max-pool with a single 3x3 stride-1 conv, as in
the EAST authors' code (docs/algorithms.md §3f, "architecture (CIFAR)"), so a 32x32 input reaches ``layer4`` at 4x4.

Structural contract relied on by weight sharing and activation swapping (docs/architecture.md §2-§3):

* the model has ``conv1, bn1, act1, layer1..layer4, avgpool, fc`` (torchvision's names, with the stem
  activation as its own module ``act1``);
* each ``layerN`` is an ``nn.Sequential`` of blocks;
* ``BasicBlock`` has ``conv1, bn1, act1, conv2, bn2, act2, downsample`` and ``Bottleneck`` additionally
  ``conv3, bn3, act3``; the last activation is applied after the residual add;
* every activation site is its own module instance, called exactly once per forward.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from lightning_sparse.models._construction import (
    ActivationFactory,
    check_positive_int,
    he_init_,
    resolve_activation,
)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


def _projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN shortcut where the block changes shape (He et al. 2016, option B); ``None`` = identity."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016, Fig. 2 left); used by ResNet-18/34.

    Computes ``act2(bn2(conv2(act1(bn1(conv1(x))))) + shortcut(x))``.

    Args:
        in_channels: channels of the block input.
        planes: channels of both convs; the block outputs ``planes * expansion`` channels.
        stride: stride of the first conv (and of the projection shortcut).
        activation: zero-argument factory called once per activation site.
    """

    expansion: int = 1

    def __init__(self, in_channels: int, planes: int, stride: int, activation: ActivationFactory) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = activation()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = activation()
        self.downsample = _projection_shortcut(in_channels, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (He et al. 2016, Fig. 5 right); ResNet-50.

    The stride sits on the 3x3 conv, as in torchvision ("ResNet v1.5").

    Args:
        in_channels: channels of the block input.
        planes: channels of the 1x1 and 3x3 convs; the block outputs ``planes * 4`` channels.
        stride: stride of the 3x3 conv (and of the projection shortcut).
        activation: zero-argument factory called once per activation site.
    """

    expansion: int = 4

    def __init__(self, in_channels: int, planes: int, stride: int, activation: ActivationFactory) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = activation()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = activation()
        self.conv3 = _conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.act3 = activation()
        self.downsample = _projection_shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem conv + BN + activation, no max-pool, four stages.

    Stage widths are ``width`` x (1, 2, 4, 8), i.e. 64/128/256/512 by default (times the block expansion);
    stages 2-4 halve the resolution. A smaller ``width`` gives the same topology at a fraction of the cost
    (``width=16`` has about 1/16 of the parameters), handy for CPU experiments.
    Init: He-normal (fan_out) for every conv, i.e. std sqrt(2 / (k^2 * c_out)) (docs/algorithms.md §2b "init"),
    BatchNorm weight 1 and bias 0; the classifier keeps PyTorch's default ``nn.Linear`` init.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50).
        blocks_per_stage: number of blocks in each of the four stages, e.g. ``(2, 2, 2, 2)``.
        num_classes: classifier outputs.
        in_channels: image channels.
        activation: activation class built once per site (default ``nn.ReLU``).
        fc_bias: whether the classifier has a bias (the EAST code uses none, docs/algorithms.md §3f).
        width: channels of the stem and the first stage.

    Raises:
        ValueError: if ``blocks_per_stage`` does not hold four positive integers, or a size is not positive.
        TypeError: if ``block`` or ``activation`` is not a suitable class.

    Example:
        >>> import torch
        >>> model = CifarResNet(BasicBlock, (2, 2, 2, 2), num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: tuple[int, int, int, int] | list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        activation: type[nn.Module] | None = None,
        fc_bias: bool = True,
        width: int = 64,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}.")
        blocks_per_stage = tuple(blocks_per_stage)
        if len(blocks_per_stage) != 4 or any(not isinstance(n, int) or n < 1 for n in blocks_per_stage):
            raise ValueError(f"blocks_per_stage must be four positive integers, got {blocks_per_stage!r}.")
        check_positive_int(num_classes=num_classes, in_channels=in_channels, width=width)
        make_activation = resolve_activation(activation)

        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation()
        channels = width
        stages = []
        stage_widths = (width, 2 * width, 4 * width, 8 * width)
        for stage_index, (planes, num_blocks) in enumerate(zip(stage_widths, blocks_per_stage)):
            stride = 1 if stage_index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                blocks.append(block(channels, planes, stride if block_index == 0 else 1, make_activation))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes, bias=fc_bias)
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


_PRESET_ARGS = """
    Args:
        num_classes: classifier outputs.
        in_channels: image channels.
        activation: activation class built once per site (default ``nn.ReLU``).
        fc_bias: whether the classifier has a bias.
        width: channels of the stem and the first stage (64 is the standard network).

    Returns:
        The model (see :class:`CifarResNet`).
    """


def _preset(
    name: str, block: type[BasicBlock] | type[Bottleneck], stage_blocks: tuple[int, int, int, int], summary: str
) -> Callable[..., CifarResNet]:
    """A named factory for one standard depth: the same keyword arguments for every depth, one docstring."""

    def build(
        num_classes: int = 10,
        in_channels: int = 3,
        activation: type[nn.Module] | None = None,
        fc_bias: bool = True,
        width: int = 64,
    ) -> CifarResNet:
        return CifarResNet(block, stage_blocks, num_classes, in_channels, activation, fc_bias, width)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = summary + "\n" + _PRESET_ARGS
    return build


cifar_resnet18 = _preset(
    "cifar_resnet18",
    BasicBlock,
    (2, 2, 2, 2),
    "CIFAR-style ResNet-18: BasicBlocks ``(2, 2, 2, 2)``; 11,173,962 parameters at 10 classes.",
)
cifar_resnet34 = _preset(
    "cifar_resnet34",
    BasicBlock,
    (3, 4, 6, 3),
    "CIFAR-style ResNet-34: BasicBlocks ``(3, 4, 6, 3)``; 21,282,122 parameters at 10 classes.\n\n"
    "    This is the EAST paper's CIFAR ResNet-34 (docs/algorithms.md §3d) when ``fc_bias=False``.",
)
cifar_resnet50 = _preset(
    "cifar_resnet50",
    Bottleneck,
    (3, 4, 6, 3),
    "CIFAR-style ResNet-50: Bottlenecks ``(3, 4, 6, 3)``; 23,520,842 parameters at 10 classes.",
)
