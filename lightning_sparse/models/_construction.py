"""Construction helpers shared by the CIFAR models: activation factory, size checks, He init."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ActivationFactory = Callable[[], nn.Module]


def resolve_activation(activation: type[nn.Module] | None) -> ActivationFactory:
    """Check a user-given activation class and return a zero-argument factory for it.

    Models call the factory once per activation site, so every site owns its own module and a
    callback can swap sites one by one (docs/architecture.md §3, DyReLU swap).

    Args:
        activation: an ``nn.Module`` subclass constructible without arguments (e.g. ``nn.SiLU``),
            or ``None`` for ``nn.ReLU``.

    Returns:
        A callable that builds a fresh activation module on every call.

    Raises:
        TypeError: if ``activation`` is an instance instead of a class, is not an ``nn.Module``
            subclass, or cannot be built without arguments.
    """
    if activation is None:
        return nn.ReLU
    if isinstance(activation, nn.Module):
        raise TypeError(
            f"activation must be a class such as nn.ReLU, not an instance ({activation!r}): "
            "the model builds one separate module per activation site."
        )
    if not (isinstance(activation, type) and issubclass(activation, nn.Module)):
        raise TypeError(f"activation must be an nn.Module subclass such as nn.ReLU, got {activation!r}.")
    try:
        activation()
    except TypeError as err:
        raise TypeError(
            f"activation {activation.__name__} must be constructible without arguments "
            f"(the model calls {activation.__name__}() once per site): {err}"
        ) from None
    return activation


def check_positive_int(**sizes: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not a positive integer."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def he_init_(model: nn.Module) -> None:
    """He-normal (fan_out) init for every conv, std sqrt(2 / (k^2 * c_out)); BN weight 1, bias 0.

    This is the init of the DSR experiments (docs/algorithms.md §2b, "init") and of torchvision's ResNet.
    Linear layers keep PyTorch's default init.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
