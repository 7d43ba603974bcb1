"""Tests for the CIFAR-style ResNets: parameter counts, shapes, torchvision naming, activation sites."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from lightning_sparse.models import BasicBlock, Bottleneck, CifarResNet, cifar_resnet18, cifar_resnet34, cifar_resnet50
from tests.helpers import count_activation_calls

# Hand count, 10 classes (3x3 conv c_in -> c_out = 9 c_in c_out; BN(c) = 2c; downsample = 1x1 conv + BN).
# Stem: conv 3*64*9 = 1,728 + BN 128 = 1,856.
# BasicBlock(c -> c): 2 * 9c^2 + 2 * 2c.  BasicBlock(c -> 2c, stride 2): 9*c*2c + 9*(2c)^2 + 2*2*2c + c*2c + 2*2c.
#   c=64 (same):     73,728 + 256                                      =    73,984
#   64 -> 128:       73,728 + 147,456 + 512 + 8,192 + 256              =   230,144;  128 same:   295,424
#   128 -> 256:      294,912 + 589,824 + 1,024 + 32,768 + 512          =   919,040;  256 same: 1,180,672
#   256 -> 512:      1,179,648 + 2,359,296 + 2,048 + 131,072 + 1,024   = 3,673,088;  512 same: 4,720,640
# FC 512*10 + 10 = 5,130.
# ResNet-18 (2,2,2,2): 1,856 + 2*73,984 + (230,144 + 295,424) + (919,040 + 1,180,672)
#                      + (3,673,088 + 4,720,640) + 5,130                                   = 11,173,962
# ResNet-34 (3,4,6,3): 1,856 + 3*73,984 + (230,144 + 3*295,424) + (919,040 + 5*1,180,672)
#                      + (3,673,088 + 2*4,720,640) + 5,130                                 = 21,282,122
# Bottleneck(c_in, p): 1x1 c_in*p + 3x3 9p^2 + 1x1 4p^2 + BN 2(p + p + 4p), plus downsample c_in*4p + 8p.
#   p=64:  first (c_in 64)    4,096 + 36,864 + 16,384 + 768 + 16,384 + 512              =    75,008; rest    70,400
#   p=128: first (c_in 256)   32,768 + 147,456 + 65,536 + 1,536 + 131,072 + 1,024      =   379,392; rest   280,064
#   p=256: first (c_in 512)   131,072 + 589,824 + 262,144 + 3,072 + 524,288 + 2,048    = 1,512,448; rest 1,117,184
#   p=512: first (c_in 1024)  524,288 + 2,359,296 + 1,048,576 + 6,144 + 2,097,152 + 4,096 = 6,039,552; rest 4,462,592
# FC 2048*10 + 10 = 20,490.
# ResNet-50 (3,4,6,3): 1,856 + (75,008 + 2*70,400) + (379,392 + 3*280,064) + (1,512,448 + 5*1,117,184)
#                      + (6,039,552 + 2*4,462,592) + 20,490                                = 23,520,842
EXPECTED_PARAMETERS = {cifar_resnet18: 11_173_962, cifar_resnet34: 21_282_122, cifar_resnet50: 23_520_842}
TORCHVISION = {
    cifar_resnet18: torchvision.models.resnet18,
    cifar_resnet34: torchvision.models.resnet34,
    cifar_resnet50: torchvision.models.resnet50,
}
# Activation sites: the stem plus 2 per BasicBlock or 3 per Bottleneck.
EXPECTED_ACTIVATIONS = {cifar_resnet18: 1 + 2 * 8, cifar_resnet34: 1 + 2 * 16, cifar_resnet50: 1 + 3 * 16}
FACTORIES = list(EXPECTED_PARAMETERS)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_parameter_count_matches_hand_count(factory):
    assert count_parameters(factory(num_classes=10)) == EXPECTED_PARAMETERS[factory]


def test_block_parameter_counts_match_hand_count():
    resnet18 = cifar_resnet18()
    assert count_parameters(resnet18.layer1[0]) == 73_984
    assert count_parameters(resnet18.layer2[0]) == 230_144
    assert count_parameters(resnet18.layer4[1]) == 4_720_640


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_same_tensors_as_torchvision_except_the_stem(factory):
    ours = factory(num_classes=10).state_dict()
    torchvision_model = TORCHVISION[factory](num_classes=10)
    theirs = torchvision_model.state_dict()
    # Same keys (so weight-sharing and masking patterns written for torchvision names apply unchanged) ...
    assert list(ours) == list(theirs)
    # ... and same shapes, except the stem: torchvision 7x7 (3*64*49 = 9,408) vs ours 3x3 (3*64*9 = 1,728).
    differing = {name for name in ours if ours[name].shape != theirs[name].shape}
    assert differing == {"conv1.weight"}
    assert ours["conv1.weight"].shape == (64, 3, 3, 3)
    torchvision_count = count_parameters(torchvision_model)
    assert EXPECTED_PARAMETERS[factory] == torchvision_count - (3 * 64 * 49 - 3 * 64 * 9)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_forward_shapes_and_each_activation_module_runs_exactly_once(factory):
    # One forward per model (ResNet-50 is the expensive one) checks shapes and activation sites together.
    model = factory(num_classes=10).eval()
    final_maps = []
    model.layer4.register_forward_hook(lambda module, args, output: final_maps.append(output.shape))
    calls = count_activation_calls(model)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))

    assert logits.shape == (2, 10)
    # Stride-1 stem and no max-pool: 32 -> 32 -> 16 -> 8 -> 4 (ImageNet-style would give 1x1).
    assert final_maps[0][-2:] == (4, 4)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # A module reused at two sites would count 2; a site without its own module would be missing.
    assert len(calls) == EXPECTED_ACTIVATIONS[factory]
    assert set(calls.values()) == {1}


def test_model_and_block_attribute_names_follow_torchvision():
    model = cifar_resnet18()
    top_level = ["conv1", "bn1", "act1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]
    assert [name for name, _ in model.named_children()] == top_level
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        assert isinstance(stage, nn.Sequential)
        assert all(isinstance(block, BasicBlock) for block in stage)
    block = model.layer2[0]
    block_children = ["conv1", "bn1", "act1", "conv2", "bn2", "act2", "downsample"]
    assert [name for name, _ in block.named_children()] == block_children
    assert model.layer1[0].downsample is None and model.layer2[1].downsample is None
    downsample_conv, downsample_bn = block.downsample
    assert (downsample_conv.kernel_size, downsample_conv.stride) == ((1, 1), (2, 2))
    assert isinstance(downsample_bn, nn.BatchNorm2d)

    bottleneck = cifar_resnet50().layer1[0]
    assert isinstance(bottleneck, Bottleneck)
    assert [name for name, _ in bottleneck.named_children()] == [
        "conv1",
        "bn1",
        "act1",
        "conv2",
        "bn2",
        "act2",
        "conv3",
        "bn3",
        "act3",
        "downsample",
    ]
    # The first bottleneck widens 64 -> 256 channels, so it needs a projection even at stride 1.
    assert bottleneck.downsample is not None


def test_convs_have_no_bias_and_he_init():
    model = cifar_resnet18()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.bias is None for conv in convs)
    # He-normal, fan_out: std = sqrt(2 / (k^2 * c_out)) = sqrt(2 / (9 * 512)) = 0.02083 for layer4's 3x3 convs
    # (2.36M samples, so the empirical std is within 1%).
    weight = model.layer4[1].conv2.weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.01)
    assert weight.mean().item() == pytest.approx(0.0, abs=1e-3)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_activation_class_is_built_once_per_site():
    model = cifar_resnet34(activation=nn.SiLU)
    silus = [m for m in model.modules() if isinstance(m, nn.SiLU)]
    assert len(silus) == EXPECTED_ACTIVATIONS[cifar_resnet34]
    assert len({id(m) for m in silus}) == len(silus)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert isinstance(model.act1, nn.SiLU) and isinstance(model.layer3[2].act2, nn.SiLU)


def test_fc_bias_num_classes_and_in_channels():
    model = cifar_resnet18(num_classes=100, in_channels=1, fc_bias=False)
    assert model.fc.bias is None
    assert model.conv1.weight.shape == (64, 1, 3, 3)
    # 11,173,962 - stem (3 - 1) * 64 * 9 - FC bias 10 + 90 more classes * 512 weights.
    assert count_parameters(model) == 11_173_962 - 2 * 64 * 9 - 10 + 90 * 512
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 100)


def test_activation_instance_is_rejected():
    with pytest.raises(TypeError, match="class such as nn.ReLU"):
        cifar_resnet18(activation=nn.ReLU())


def test_activation_that_is_not_a_module_is_rejected():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        cifar_resnet18(activation=torch.relu)


def test_activation_needing_arguments_is_rejected():
    with pytest.raises(TypeError, match="constructible without arguments"):
        cifar_resnet18(activation=nn.Threshold)  # needs threshold and value


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"blocks_per_stage": (2, 2, 2)}, "four positive integers"),
        ({"blocks_per_stage": (2, 0, 2, 2)}, "four positive integers"),
        ({"num_classes": 0}, "num_classes must be a positive integer"),
        ({"block": nn.Conv2d}, "BasicBlock or Bottleneck"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    arguments = {"block": BasicBlock, "blocks_per_stage": (2, 2, 2, 2)} | kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        CifarResNet(**arguments)


def test_width_scales_every_stage():
    from lightning_sparse.models import cifar_resnet18

    default = cifar_resnet18()
    narrow = cifar_resnet18(width=16)
    assert sum(p.numel() for p in cifar_resnet18(width=64).parameters()) == sum(p.numel() for p in default.parameters())
    assert [narrow.conv1.out_channels] + [getattr(narrow, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] == [
        16,
        16,
        32,
        64,
        128,
    ]
    assert narrow.fc.in_features == 128
    assert narrow(torch.randn(2, 3, 16, 16)).shape == (2, 10)
