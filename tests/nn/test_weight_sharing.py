"""Tests for intra-stage weight sharing and the EAST budget multiplier (docs/algorithms.md §3d)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from lightning_sparse.nn import (
    SharedConv2d,
    effective_density_multiplier,
    parameter_uses,
    share_stage_weights,
)

# Hand counts for torchvision ResNets, conv weights only (3x3 conv C->C: 9*C^2; stem 7x7: 3*64*49 = 9,408).
# ResNet-34, stages [3, 4, 6, 3] of BasicBlocks (2 convs):
#   layer1: 3 * 2*9*64^2                                            =    221,184
#   layer2: (9*64*128 + 9*128^2 + 64*128) + 3 * 2*9*128^2           =  1,114,112
#   layer3: (9*128*256 + 9*256^2 + 128*256) + 5 * 2*9*256^2         =  6,815,744
#   layer4: (9*256*512 + 9*512^2 + 256*512) + 2 * 2*9*512^2         = 13,107,200
#   + stem 9,408                                                     = 21,267,648
# Shared (source = block 1, so blocks 2.. reuse it): 1*73,728 + 2*294,912 + 4*1,179,648 + 1*4,718,592 = 10,100,736
RESNET34_CONV_BEFORE = 21_267_648
RESNET34_VIRTUAL = 10_100_736
RESNET34_CONV_AFTER = RESNET34_CONV_BEFORE - RESNET34_VIRTUAL  # 11,166,912
# ResNet-50, stages [3, 4, 6, 3] of Bottlenecks; a non-first block of width p has 4p*p + 9p^2 + p*4p = 17p^2:
#   layer1 (p=64):  (4,096 + 36,864 + 16,384 + ds 16,384) + 2 * 69,632            =    212,992
#   layer2 (p=128): (32,768 + 147,456 + 65,536 + ds 131,072) + 3 * 278,528        =  1,212,416
#   layer3 (p=256): (131,072 + 589,824 + 262,144 + ds 524,288) + 5 * 1,114,112    =  7,077,888
#   layer4 (p=512): (524,288 + 2,359,296 + 1,048,576 + ds 2,097,152) + 2 * 4,456,448 = 14,942,208
#   + stem 9,408                                                                  = 23,454,912
# Shared: 1*69,632 + 2*278,528 + 4*1,114,112 + 1*4,456,448 = 9,539,584
RESNET50_CONV_BEFORE = 23_454_912
RESNET50_VIRTUAL = 9_539_584

EXPECTED_SHARED = {
    "layer1.2": "layer1.1",
    "layer2.2": "layer2.1",
    "layer2.3": "layer2.1",
    "layer3.2": "layer3.1",
    "layer3.3": "layer3.1",
    "layer3.4": "layer3.1",
    "layer3.5": "layer3.1",
    "layer4.2": "layer4.1",
}


def _prunable_weight_names(model: nn.Module) -> list[str]:
    return [
        f"{name}.weight" for name, module in model.named_modules() if type(module) in (nn.Conv2d, nn.Linear)
    ]


def _cifar_style(model: nn.Module) -> nn.Module:
    """3x3 stride-1 stem, no max-pool, bias-free classifier (docs/algorithms.md §3f)."""
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Linear(model.fc.in_features, 10, bias=False)
    return model


def _tiny_stage(blocks: int = 4, width: int = 4) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(width, width) for _ in range(blocks)])


def test_shared_conv_reuses_source_parameter_and_scales_output() -> None:
    torch.manual_seed(0)
    source = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    reuse = SharedConv2d(source, scale_init=2.0, source_name="block.conv")
    assert reuse.weight is source.weight and reuse.bias is source.bias
    assert reuse.scale.shape == torch.Size([]) and reuse.scale.item() == 2.0
    assert "source=block.conv" in repr(reuse)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(reuse(x), 2.0 * source(x))


def test_shared_conv_default_scale_is_uniform_0_1_and_padding_mode_copied() -> None:
    torch.manual_seed(0)
    source = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect", bias=False)
    scales = torch.stack([SharedConv2d(source).scale.detach() for _ in range(50)])
    assert (scales >= 0).all() and (scales < 1).all() and scales.std() > 0.1
    reuse = SharedConv2d(source, scale_init=1.0)
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(reuse(x), source(x))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SharedConv2d(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_resnet34_counts_structure_and_parameter_identity() -> None:
    model = torchvision.models.resnet34(num_classes=10)
    params_before = dict(model.named_parameters())
    report = share_stage_weights(model)

    assert report.stages == ("layer1", "layer2", "layer3", "layer4")
    assert report.shared_blocks == EXPECTED_SHARED
    assert report.skipped_blocks == {}
    assert report.conv_weights_before == RESNET34_CONV_BEFORE
    assert report.virtual_weights == RESNET34_VIRTUAL
    assert report.conv_weights_after == RESNET34_CONV_AFTER == 11_166_912

    # Blocks 0 and 1 keep their own convs; block 2 reuses block 1's Parameter objects; BN is not shared.
    assert type(model.layer3[0].conv1) is nn.Conv2d and type(model.layer3[1].conv2) is nn.Conv2d
    assert model.layer3[0].conv1.weight is not model.layer3[1].conv1.weight
    assert model.layer3[4].conv2.weight is model.layer3[1].conv2.weight
    assert model.layer3[4].conv2.source_name == "layer3.1.conv2"
    assert model.layer3[4].bn2 is not model.layer3[1].bn2

    # named_parameters() lists each shared tensor once, under the source name; the aliases appear only with
    # remove_duplicate=False. Each of the 16 reused convs adds its own scalar.
    names = dict(model.named_parameters())
    scales = {name: p for name, p in names.items() if name.endswith(".scale")}
    assert len(scales) == 16 and len({id(p) for p in scales.values()}) == 16
    assert set(names) - set(scales) < set(params_before)
    assert "layer3.4.conv2.weight" not in names and "layer3.1.conv2.weight" in names
    aliases = dict(model.named_parameters(remove_duplicate=False))
    assert aliases["layer3.4.conv2.weight"] is names["layer3.1.conv2.weight"]
    assert len(aliases) - len(names) == 16

    uses = parameter_uses(model)
    assert uses["layer1.1.conv1.weight"] == 2  # source + layer1.2
    assert uses["layer3.1.conv1.weight"] == 5  # source + layer3.2..5
    assert uses["layer3.0.conv1.weight"] == 1 and uses["layer3.4.bn1.weight"] == 1
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_resnet50_counts_and_all_three_bottleneck_convs_shared() -> None:
    model = torchvision.models.resnet50(num_classes=10)
    report = share_stage_weights(model)
    assert report.shared_blocks == EXPECTED_SHARED
    assert report.conv_weights_before == RESNET50_CONV_BEFORE
    assert report.virtual_weights == RESNET50_VIRTUAL
    assert report.conv_weights_after == 13_915_328
    shared_convs = [m for m in model.modules() if isinstance(m, SharedConv2d)]
    assert len(shared_convs) == 8 * 3
    assert model.layer2[3].conv3.weight is model.layer2[1].conv3.weight
    assert torch.isfinite(model.eval()(torch.randn(1, 3, 32, 32))).all()


def test_resnet18_needs_min_blocks_2() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ValueError, match=r"min_blocks=3.*'layer1' \(2 blocks\).*'layer4' \(2 blocks\)"):
        share_stage_weights(model)
    report = share_stage_weights(model, source_block=0, min_blocks=2)
    # Only layer1 has a downsample-free block 0 matching block 1 (64->64, stride 1); in layers 2-4 block 0 is the
    # strided, widening block, so block 1's conv1 differs from it.
    assert report.shared_blocks == {"layer1.1": "layer1.0"}
    assert set(report.skipped_blocks) == {"layer2.1", "layer3.1", "layer4.1"}
    assert report.virtual_weights == 2 * 9 * 64 * 64
    assert model.layer1[1].conv1.weight is model.layer1[0].conv1.weight


def test_invalid_arguments_and_double_application() -> None:
    model = torchvision.models.resnet34(num_classes=10)
    with pytest.raises(ValueError, match=r"source_block=3 is out of range.*'layer1': 3"):
        share_stage_weights(model, source_block=3)
    with pytest.raises(ValueError, match="min_blocks must be >= 2"):
        share_stage_weights(model, min_blocks=1)
    with pytest.raises(ValueError, match=">= 0"):
        share_stage_weights(model, source_block=-1)
    with pytest.raises(TypeError, match="source_block must be an int"):
        share_stage_weights(model, source_block=1.0)  # type: ignore[arg-type]
    share_stage_weights(model)
    with pytest.raises(ValueError, match="already shares weights"):
        share_stage_weights(model)


def test_sequential_of_plain_sequentials_is_not_a_residual_stage() -> None:
    chain = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)) for _ in range(4)])
    with pytest.raises(ValueError, match=r"Stages found .*: none"):
        share_stage_weights(chain)


def test_shared_stage_matches_unshared_copy_and_gradients_accumulate() -> None:
    torch.manual_seed(0)
    stage = _tiny_stage(blocks=4).eval()
    # Reference: an unshared copy whose blocks 2 and 3 hold copies of block 1's conv weights.
    reference = copy.deepcopy(stage)
    for index in (2, 3):
        for conv in ("conv1", "conv2"):
            getattr(reference[index], conv).weight.data.copy_(getattr(reference[1], conv).weight.data)

    share_stage_weights(stage)
    for module in stage.modules():
        if isinstance(module, SharedConv2d):
            module.scale.data.fill_(1.0)
    x = torch.randn(2, 4, 6, 6)
    out, expected = stage(x), reference(x)
    torch.testing.assert_close(out, expected)

    out.square().sum().backward()
    expected.square().sum().backward()
    # The source tensor's gradient is the sum of its three users' gradients in the unshared network.
    summed = sum(reference[i].conv1.weight.grad for i in (1, 2, 3))
    torch.testing.assert_close(stage[1].conv1.weight.grad, summed)
    assert stage[2].conv1.scale.grad is not None and stage[2].conv1.scale.grad.abs() > 0


@pytest.mark.parametrize("user", [2, 3])
def test_each_user_alone_sends_gradient_to_source(user: int) -> None:
    torch.manual_seed(0)
    stage = _tiny_stage(blocks=4)
    share_stage_weights(stage)
    stage[user](torch.randn(2, 4, 5, 5)).sum().backward()
    # Block 1 never ran, yet its weights received the gradient of the block that reuses them.
    assert stage[1].conv1.weight.grad is not None and stage[1].conv1.weight.grad.abs().sum() > 0
    assert stage[1].conv2.weight.grad.abs().sum() > 0
    assert stage[0].conv1.weight.grad is None


def test_deepcopy_and_state_dict_round_trip_keep_sharing() -> None:
    torch.manual_seed(0)
    stage = _tiny_stage(blocks=3).eval()
    share_stage_weights(stage)
    clone = copy.deepcopy(stage)
    assert clone[2].conv1.weight is clone[1].conv1.weight
    other = _tiny_stage(blocks=3).eval()
    share_stage_weights(other)
    other.load_state_dict(stage.state_dict())
    x = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(other(x), stage(x))


def test_effective_density_multiplier_cifar_resnet34_is_1_905() -> None:
    model = _cifar_style(torchvision.models.resnet34(num_classes=10))
    assert effective_density_multiplier(model, _prunable_weight_names(model)) == 1.0
    share_stage_weights(model)
    # The reused convs are SharedConv2d now, so only canonical (real) tensors are listed.
    names = _prunable_weight_names(model)
    # docs/algorithms.md §3d: P_real = 11,164,352 (= 11,166,912 - 9,408 + 1,728 stem + 5,120 fc),
    # P_virtual = 10,100,736, so (P_real + P_virtual) / P_real = 21,265,088 / 11,164,352 = 1.9047.
    multiplier = effective_density_multiplier(model, names)
    assert multiplier == 21_265_088 / 11_164_352
    assert round(multiplier, 3) == 1.905


def test_effective_density_multiplier_torchvision_resnet34_and_cifar_resnet50() -> None:
    model = torchvision.models.resnet34(num_classes=10)
    share_stage_weights(model)
    # 7x7 stem and fc of 512*10 = 5,120 weights: P_real = 11,166,912 + 5,120 = 11,172,032,
    # (P_real + P_virtual) / P_real = 21,272,768 / 11,172,032 = 1.9041.
    assert effective_density_multiplier(model, _prunable_weight_names(model)) == 21_272_768 / 11_172_032

    resnet50 = _cifar_style(torchvision.models.resnet50(num_classes=10))
    share_stage_weights(resnet50)
    # P_real = 13,915,328 - 9,408 + 1,728 + 2048*10 = 13,928,128; + 9,539,584 virtual -> 1.685 (docs/algorithms.md §3d).
    multiplier = effective_density_multiplier(resnet50, _prunable_weight_names(resnet50))
    assert multiplier == (13_928_128 + RESNET50_VIRTUAL) / 13_928_128
    assert round(multiplier, 3) == 1.685


def test_effective_density_multiplier_rejects_bad_names() -> None:
    stage = _tiny_stage(blocks=3)
    share_stage_weights(stage)
    with pytest.raises(ValueError, match=r"'2.conv1.weight' is an alias of '1.conv1.weight'"):
        effective_density_multiplier(stage, ["2.conv1.weight"])
    with pytest.raises(ValueError, match="'nope' not found"):
        effective_density_multiplier(stage, ["nope"])
    with pytest.raises(ValueError, match="empty"):
        effective_density_multiplier(stage, [])
    with pytest.raises(ValueError, match="repeats"):
        effective_density_multiplier(stage, ["1.conv1.weight", "1.conv1.weight"])
    # Only the shared tensor: it is used twice, so the multiplier is exactly 2.
    assert effective_density_multiplier(stage, ["1.conv1.weight"]) == 2.0
