"""Tests for WRN-28-k: the DSR parameter count, pre-activation structure, activation sites."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sparse.models import WideBasicBlock, WideResNet, wide_resnet28
from tests.helpers import count_activation_calls


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_wrn28_2_has_the_dsr_parameter_count():
    # DSR's WRN-28-2 on CIFAR-10 has 1,467,610 parameters (docs/algorithms.md §2b). Ours matches exactly:
    #   stem 3x3 conv 3 -> 16:                                   3*16*9                   =       432
    #   24 block 3x3 convs (widths 32/64/128, 4 blocks x 2 convs per stage):
    #     stage 1: 16*32*9 + 7 * 32*32*9    =    4,608 +    64,512                       =    69,120
    #     stage 2: 32*64*9 + 7 * 64*64*9    =   18,432 +   258,048                       =   276,480
    #     stage 3: 64*128*9 + 7 * 128*128*9 =   73,728 + 1,032,192                       = 1,105,920
    #                                                                              sum  = 1,451,520
    #   three 1x1 shortcut convs (first block of each stage): 16*32 + 32*64 + 64*128     =    10,752
    #   BN (2 per channel): per block bn1(in) + bn2(out), plus the final BN(128):
    #     2 * [(16 + 32 + 6*32) + (32 + 64 + 6*64) + (64 + 128 + 6*128) + 128] = 2 * 1,808 =     3,616
    #   FC 128*10 weights + 10 bias                                                      =     1,290
    #   total = 432 + 1,451,520 + 10,752 + 3,616 + 1,290                                 = 1,467,610
    # So the DSR count includes the shortcut convs, the final BN and the FC bias.
    model = wide_resnet28(width=2, num_classes=10)
    assert count_parameters(model) == 1_467_610

    block_3x3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert model.conv1.weight.numel() == 432
    assert len(block_3x3) == 1 + 24
    assert sum(m.weight.numel() for m in block_3x3 if m is not model.conv1) == 1_451_520
    shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(shortcuts) == 3 and sum(m.weight.numel() for m in shortcuts) == 10_752
    assert sum(count_parameters(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)) == 3_616
    assert count_parameters(model.fc) == 1_290


def test_wrn28_10_matches_the_paper_size():
    # Zagoruyko & Komodakis report 36.5M parameters for WRN-28-10 (CIFAR-10). Same arithmetic as above
    # with widths 160/320/640: stem 432; 3x3 convs (23,040 + 7*230,400) + (460,800 + 7*921,600)
    # + (1,843,200 + 7*3,686,400) = 36,195,840; shortcuts 2,560 + 51,200 + 204,800 = 258,560;
    # BN 2 * (1,136 + 2,400 + 4,800 + 640) = 17,952; FC 6,410. Total 36,479,194.
    assert count_parameters(wide_resnet28(width=10)) == 36_479_194


def test_output_shape():
    model = wide_resnet28().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        assert WideResNet(depth=16, width=1, num_classes=100, in_channels=1).eval()(
            torch.randn(2, 1, 32, 32)
        ).shape == (2, 100)


def test_attribute_names_and_stage_layout():
    model = wide_resnet28()
    top_level = ["conv1", "layer1", "layer2", "layer3", "bn_final", "act_final", "avgpool", "fc"]
    assert [name for name, _ in model.named_children()] == top_level
    block_children = ["bn1", "act1", "conv1", "bn2", "act2", "dropout", "conv2", "shortcut"]
    for stage, width in ((model.layer1, 32), (model.layer2, 64), (model.layer3, 128)):
        assert isinstance(stage, nn.Sequential) and len(stage) == 4
        assert all(isinstance(block, WideBasicBlock) for block in stage)
        assert [name for name, _ in stage[0].named_children()] == block_children
        assert stage[0].shortcut is not None
        assert all(block.shortcut is None for block in stage[1:])
        assert stage[-1].conv2.out_channels == width
    assert model.layer1[0].conv1.stride == (1, 1) and model.layer2[0].conv1.stride == (2, 2)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def test_every_activation_module_runs_exactly_once_per_forward():
    model = wide_resnet28().eval()
    calls = count_activation_calls(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # 12 blocks x 2 pre-activations + the final one.
    assert len(calls) == 25
    assert set(calls.values()) == {1}


def test_activation_class_is_built_once_per_site():
    model = wide_resnet28(activation=nn.GELU)
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 25 and len({id(m) for m in gelus}) == 25
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_shortcut_conv_reads_the_pre_activated_input():
    torch.manual_seed(0)
    block = WideBasicBlock(4, 8, stride=2, dropout=0.0, activation=nn.ReLU).eval()
    with torch.no_grad():
        block.bn1.bias.fill_(-0.5)  # makes the pre-activation visibly different from x
        x = torch.randn(2, 4, 8, 8)
        pre_activated = torch.relu(block.bn1(x))
        expected = block.conv2(torch.relu(block.bn2(block.conv1(pre_activated)))) + block.shortcut(pre_activated)
        assert torch.allclose(block(x), expected, atol=1e-6)
        assert not torch.allclose(block(x), expected - block.shortcut(pre_activated) + block.shortcut(x))


def test_identity_block_adds_the_raw_input():
    block = WideBasicBlock(8, 8, stride=1, dropout=0.0, activation=nn.ReLU).eval()
    with torch.no_grad():
        x = torch.randn(2, 8, 4, 4)
        residual_branch = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x))))))
        assert torch.allclose(block(x), residual_branch + x, atol=1e-6)


def test_dropout_is_off_by_default_and_configurable():
    assert all(block.dropout.p == 0.0 for block in wide_resnet28().layer1)
    model = wide_resnet28(dropout=0.3)
    assert all(block.dropout.p == 0.3 for stage in (model.layer1, model.layer3) for block in stage)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 27}, "6 \\* n \\+ 4"),
        ({"depth": 4}, "6 \\* n \\+ 4"),
        ({"width": 0}, "width must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in \\[0, 1\\)"),
        ({"activation": nn.ReLU()}, "class such as nn.ReLU"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        WideResNet(**kwargs)
