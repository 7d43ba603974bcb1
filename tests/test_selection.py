import pytest
import torch
import torchvision
from torch import nn

from lightning_sparse.nn import convert_relu_to_dyrelu, share_stage_weights
from lightning_sparse.selection import select_sparse_parameters
from tests.helpers import TinyCNN


def test_default_selects_conv_and_linear_weights_only():
    names = list(select_sparse_parameters(TinyCNN()))
    assert names == ["conv1.weight", "conv2.weight", "fc.weight"]


def test_dyrelu_hyper_network_stays_dense_by_default():
    model = convert_relu_to_dyrelu(TinyCNN(), example_input=torch.randn(2, 3, 16, 16))
    names = list(select_sparse_parameters(model))
    assert names == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert any(".fc1." in name for name, _ in model.named_parameters())  # the hyper-net has Linear weights


def test_shared_weights_are_selected_once_under_their_source_name():
    model = torchvision.models.resnet34(num_classes=10)
    share_stage_weights(model)
    selected = select_sparse_parameters(model)
    assert "layer1.1.conv1.weight" in selected and "layer1.2.conv1.weight" not in selected
    assert not any(name.endswith("scale") for name in selected)
    assert len({id(p) for p in selected.values()}) == len(selected)


def test_patterns_must_match_something():
    with pytest.raises(ValueError, match="include pattern 'conv3.weight' matches no parameter"):
        select_sparse_parameters(TinyCNN(), include=["conv3.weight"])
    # One string is one pattern, never split into characters.
    assert "fc.weight" not in select_sparse_parameters(TinyCNN(), exclude="fc.weight")


def test_nothing_to_make_sparse():
    with pytest.raises(ValueError, match="no parameter to make sparse"):
        select_sparse_parameters(nn.Sequential(nn.BatchNorm1d(3)))
