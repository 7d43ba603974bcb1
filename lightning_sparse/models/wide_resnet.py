"""Wide ResNet WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis 2016), the DSR CIFAR-10 model.

Pre-activation blocks (BN -> activation -> conv, He et al. 2016 "Identity Mappings"), three stages of
``16k, 32k, 64k`` channels with ``(d - 4) / 6`` blocks each, a 1x1 shortcut conv wherever a block changes
the shape, a final BN + activation before global average pooling, and a linear classifier.

WRN-28-2 with 10 classes has exactly 1,467,610 parameters, the count of the DSR authors' model
(docs/algorithms.md §2b): stem conv 432 + 24 block 3x3 convs 1,451,520 + three 1x1 shortcut convs 10,752
+ BN 3,616 + FC (with bias) 1,290.

Attribute names: the model has ``conv1`` (stem), ``layer1..layer3`` (``nn.Sequential`` of blocks),
``bn_final``, ``act_final``, ``avgpool``, ``fc``; each block has ``bn1, act1, conv1, bn2, act2, dropout,
conv2, shortcut`` (``shortcut`` is an ``nn.Conv2d`` or ``None``). Every activation site is its own module.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_sparse.models._construction import (
    ActivationFactory,
    check_positive_int,
    he_init_,
    resolve_activation,
)


class WideBasicBlock(nn.Module):
    """Pre-activation block of two 3x3 convs (Zagoruyko & Komodakis 2016, Fig. 1c/1d "basic-wide").

    Computes ``conv2(dropout(act2(bn2(conv1(a))))) + s`` with ``a = act1(bn1(x))``, where the residual ``s``
    is ``x`` when the shape is kept and ``shortcut(a)`` (a 1x1 conv on the pre-activated input) when it is not.
    There is no activation after the add; the next block (or the model's ``bn_final``) pre-activates.

    Args:
        in_channels: channels of the block input.
        out_channels: channels of both convs.
        stride: stride of the first conv and of the shortcut conv.
        dropout: dropout probability between the two convs.
        activation: zero-argument factory called once per activation site.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dropout: float, activation: ActivationFactory
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = activation()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act2 = activation()
        self.dropout = nn.Dropout(p=dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre_activated = self.act1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(pre_activated)
        out = self.conv1(pre_activated)
        out = self.conv2(self.dropout(self.act2(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-width for CIFAR: stem 3x3 conv to 16 channels, three wide stages, BN + activation, pool, FC.

    Stage widths are ``16 * width, 32 * width, 64 * width``; stages 2 and 3 halve the resolution.
    Init: He-normal (fan_out) convs, BN weight 1 / bias 0 (docs/algorithms.md §2b, "init").

    Args:
        depth: total depth ``6 n + 4`` with ``n`` blocks per stage (28 gives 4 blocks per stage).
        width: widening factor ``k``.
        num_classes: classifier outputs.
        in_channels: image channels.
        dropout: dropout probability inside every block, in ``[0, 1)``; 0 disables it.
        activation: activation class built once per site (default ``nn.ReLU``).
        fc_bias: whether the classifier has a bias.

    Raises:
        ValueError: if ``depth`` is not of the form ``6 n + 4`` with ``n >= 1``, a size is not positive, or
            ``dropout`` is outside ``[0, 1)``.
        TypeError: if ``activation`` is not a suitable class.

    Example:
        >>> import torch
        >>> model = WideResNet(depth=28, width=2)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int = 28,
        width: int = 2,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        activation: type[nn.Module] | None = None,
        fc_bias: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(depth=depth, width=width, num_classes=num_classes, in_channels=in_channels)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"depth must be 6 * n + 4 with n >= 1 blocks per stage (e.g. 16, 22, 28, 40), got {depth}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        make_activation = resolve_activation(activation)
        blocks_per_stage = (depth - 4) // 6

        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False)
        channels = 16
        stages = []
        for stage_index, base_channels in enumerate((16, 32, 64)):
            out_channels = base_channels * width
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(WideBasicBlock(channels, out_channels, stride, dropout, make_activation))
                channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn_final = nn.BatchNorm2d(channels)
        self.act_final = make_activation()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes, bias=fc_bias)
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.act_final(self.bn_final(x))
        return self.fc(self.avgpool(x).flatten(1))


def wide_resnet28(width: int = 2, **kwargs: Any) -> WideResNet:
    """WRN-28-k; ``width=2`` is the DSR paper's CIFAR-10 model (1,467,610 parameters, docs/algorithms.md §2b).

    Args:
        width: widening factor ``k``.
        **kwargs: the other arguments of :class:`WideResNet` (``num_classes``, ``in_channels``, ``dropout``,
            ``activation``, ``fc_bias``), by keyword, as torchvision's model builders take them.

    Returns:
        The model (see :class:`WideResNet`).
    """
    return WideResNet(28, width, **kwargs)
