"""The geometry attributes a module that stands in for an ``nn.Conv2d`` copies from it. No Lightning import."""

from __future__ import annotations

from torch import nn

__all__ = ["CONV_GEOMETRY", "copy_conv_geometry"]

CONV_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "padding_mode")
"""The ``nn.Conv2d`` attributes that describe the convolution (padding is kept apart: each stand-in stores its own)."""


def copy_conv_geometry(target: nn.Module, conv: nn.Conv2d) -> None:
    """Set :data:`CONV_GEOMETRY` on ``target`` from ``conv`` (the same values, so ``repr`` and users read them alike)."""
    for name in CONV_GEOMETRY:
        setattr(target, name, getattr(conv, name))
