import pytest
import torch
from torch import nn

from lightning_sparse.nn.conv_fusion import (
    ChannelAffine,
    find_batchnorm_relus,
    find_conv_chains,
    find_preactivated_convs,
    find_relus_after_additions,
    fold_batchnorm_,
)
from tests.helpers import TinyCNN


def _eval_batchnorm(channels: int) -> nn.BatchNorm2d:
    batchnorm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        batchnorm.running_mean.uniform_(-0.5, 0.5)
        batchnorm.running_var.uniform_(0.5, 2.0)
        batchnorm.weight.uniform_(0.5, 1.5)
        batchnorm.bias.uniform_(-0.5, 0.5)
    return batchnorm.eval()


@pytest.mark.parametrize("bias", [False, True])
def test_folded_conv_equals_conv_then_batchnorm_and_keeps_its_zeros(bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < 0.2)
    batchnorm = _eval_batchnorm(6)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = batchnorm(conv(x))
        zeros = conv.weight == 0
        fold_batchnorm_(conv, batchnorm)
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv.weight == 0, zeros) and conv.bias is not None


def test_fold_refuses_a_training_mode_batchnorm_or_a_channel_mismatch():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm_(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="channels"):
        fold_batchnorm_(nn.Conv2d(3, 4, 1), _eval_batchnorm(5))


def test_chains_of_a_traceable_model():
    chains, why_not = find_conv_chains(TinyCNN().eval())
    assert why_not is None
    assert {name: (c.batchnorm, c.relu) for name, c in chains.items()} == {
        "conv1": ("bn1", "act1"),
        "conv2": ("bn2", "act2"),
    }


def test_a_module_used_twice_or_an_output_used_twice_is_not_chained():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.other = nn.Conv2d(3, 3, 1)
            self.bn_other = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            y = self.bn(self.conv(y))  # conv and bn called twice: folding would change both sites
            z = self.other(y)
            return self.bn_other(z) + z  # the conv's output has a second user: the BatchNorm cannot be removed

    chains, why_not = find_conv_chains(Shared().eval())
    assert why_not is None and chains == {}


def test_training_mode_batchnorm_is_not_folded_and_untraceable_model_says_why():
    chains, why_not = find_conv_chains(TinyCNN().train())
    assert why_not is None and chains == {}  # batch statistics: no fixed affine map to fold (nor a ReLU after the conv)

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) if y.sum() > 0 else y

    chains, why_not = find_conv_chains(DataDependent().eval())
    assert chains == {} and "torch.fx could not trace" in why_not


@pytest.mark.parametrize("relu", [False, True])
def test_channel_affine_equals_the_batchnorm_and_keeps_the_input_layout(relu):
    batchnorm = _eval_batchnorm(6)
    affine = ChannelAffine(batchnorm, relu=relu)
    x = torch.randn(4, 6, 5, 5)
    expected = torch.relu(batchnorm(x)) if relu else batchnorm(x)
    torch.testing.assert_close(affine(x), expected.detach(), rtol=1e-5, atol=1e-6)
    batch_innermost = x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    out = affine(batch_innermost)
    assert out.stride() == batch_innermost.stride()  # nn.BatchNorm2d would return a contiguous copy
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eval-mode"):
        ChannelAffine(nn.BatchNorm2d(3))


def test_batchnorm_relu_pairs_of_a_preactivation_model():
    class PreAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1, self.act1, self.conv1 = _eval_batchnorm(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
            self.bn2, self.act2 = _eval_batchnorm(4), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.conv1(self.act1(self.bn1(x)))
            y = self.bn2(x)
            return self.act2(y) + y  # bn2's output has two users: not a pair

    assert find_batchnorm_relus(PreAct()) == {"bn1": "act1"}


class _Residual(nn.Module):
    """relu(conv(x) + x) twice; the second sum is also returned, so its ReLU must not overwrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn, self.act0, self.act1, self.act2 = _eval_batchnorm(4), nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.act1(self.conv1(self.act0(self.bn(x))) + x)
        total = self.conv2(x) + x
        return self.act2(total), total


def test_relus_after_additions_and_preactivated_convs():
    model = _Residual()
    assert find_relus_after_additions(model) == ["act1"]  # act2's input is also returned
    assert find_preactivated_convs(model) == {"conv1": "bn"}
