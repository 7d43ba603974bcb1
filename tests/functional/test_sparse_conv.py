"""The direct sparse kernel equals torch's dense conv2d / linear on the same (masked) weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("numba", reason="the sparse kernel needs numba (pip install 'lightning-sparse[inference]')")

from lightning_sparse.functional.sparse_conv import (  # noqa: E402
    pack_conv2d_weight,
    pack_linear_weight,
    sparse_conv2d,
    sparse_linear,
)


def _masked_conv(density: float, bias: bool = True, **kwargs) -> nn.Conv2d:
    conv = nn.Conv2d(bias=bias, **kwargs)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < density)
        if bias:
            conv.bias.normal_()
    return conv


CONV_CASES = {
    "3x3 pad 1": dict(in_channels=6, out_channels=5, kernel_size=3, padding=1),
    "stride 2": dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1),
    "stride 3 odd size": dict(in_channels=4, out_channels=4, kernel_size=5, stride=3, padding=2),
    "1x1": dict(in_channels=8, out_channels=12, kernel_size=1),
    "1x1 stride 2 (shortcut)": dict(in_channels=8, out_channels=16, kernel_size=1, stride=2),
    "dilation 2": dict(in_channels=5, out_channels=6, kernel_size=3, padding=2, dilation=2),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    "groups 2": dict(in_channels=6, out_channels=4, kernel_size=3, padding=1, groups=2),
    "rectangular, mixed stride": dict(in_channels=3, out_channels=4, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
    "no padding": dict(  # and no bias
        in_channels=4, out_channels=4, kernel_size=3
    ),
    "reflect padding": dict(in_channels=4, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"),
    "circular padding": dict(in_channels=4, out_channels=3, kernel_size=3, padding=2, padding_mode="circular"),
    "padding same": dict(in_channels=4, out_channels=3, kernel_size=4, padding="same"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("batch_inner", [False, True])
def test_sparse_conv2d_matches_dense_conv(case, batch, batch_inner):
    conv = _masked_conv(0.3, bias=case != "no padding", **CONV_CASES[case])  # one case without bias
    x = torch.randn(batch, conv.in_channels, 11, 10)
    packed = pack_conv2d_weight(conv.weight, conv.stride, conv.dilation, conv.groups)
    out = sparse_conv2d(
        x, packed, conv.bias, conv._reversed_padding_repeated_twice, conv.padding_mode, batch_inner=batch_inner
    )
    expected = conv(x).detach()
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.0, 0.01, 1.0])
def test_sparse_conv2d_extreme_densities(density):
    # density 0: every output plane is the bias; 0.01: most output channels have no tap at all; 1.0: dense.
    conv = _masked_conv(density, in_channels=16, out_channels=16, kernel_size=3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    packed = pack_conv2d_weight(conv.weight)
    assert packed.nnz == int((conv.weight != 0).sum())
    torch.testing.assert_close(
        sparse_conv2d(x, packed, conv.bias, (1, 1, 1, 1)), conv(x).detach(), rtol=1e-5, atol=1e-5
    )


def test_sparse_conv2d_unbatched_input():
    conv = _masked_conv(0.5, in_channels=3, out_channels=4, kernel_size=3, padding=1)
    x = torch.randn(3, 7, 7)
    out = sparse_conv2d(x, pack_conv2d_weight(conv.weight), conv.bias, (1, 1, 1, 1))
    torch.testing.assert_close(out, conv(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_inner", [False, True])
@pytest.mark.parametrize("shape", [(1, 20), (5, 20), (2, 3, 20)])
def test_sparse_linear_matches_dense_linear(batch_inner, shape):
    linear = nn.Linear(20, 7)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) < 0.2)
    x = torch.randn(*shape)
    out = sparse_linear(x, pack_linear_weight(linear.weight), linear.bias, batch_inner=batch_inner)
    torch.testing.assert_close(out, linear(x).detach(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_with_the_fix():
    packed = pack_conv2d_weight(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="float32 CPU"):
        sparse_conv2d(torch.randn(1, 3, 8, 8, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match="expects 3 input channels"):
        sparse_conv2d(torch.randn(1, 5, 8, 8), packed)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        sparse_conv2d(torch.randn(1, 3, 2, 2), packed)
    with pytest.raises(ValueError, match="4-D"):
        pack_conv2d_weight(torch.randn(4, 3))
    with pytest.raises(ValueError, match="divisible by groups"):
        pack_conv2d_weight(torch.randn(5, 1, 3, 3), groups=2)


def test_kernel_uses_torch_thread_count():
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x, weight = torch.randn(2, 4, 6, 6), torch.randn(4, 4, 3, 3)
        out = sparse_conv2d(x, pack_conv2d_weight(weight), None, (1, 1, 1, 1))
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
        torch.testing.assert_close(out, F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("batch_inner", [False, True])
def test_sparse_conv2d_with_fused_relu_equals_relu_of_the_conv(batch_inner):
    conv = _masked_conv(0.3, bias=True, in_channels=4, out_channels=5, kernel_size=3, padding=1)
    x = torch.randn(3, 4, 9, 8)
    packed = pack_conv2d_weight(conv.weight, conv.stride, conv.dilation, conv.groups)
    out = sparse_conv2d(x, packed, conv.bias, conv._reversed_padding_repeated_twice, batch_inner=batch_inner, relu=True)
    expected = torch.relu(conv(x)).detach()
    assert (expected == 0).any() and (expected > 0).any()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_inner", [False, True])
def test_reused_padded_input_buffer_never_leaks_an_earlier_input(batch_inner):
    # The zero-bordered input buffer is kept per geometry: a second call, and a layer with other padding on an
    # input of the same shape, must see only their own input and zeros around it.
    conv = _masked_conv(0.5, bias=False, in_channels=3, out_channels=4, kernel_size=3, padding=1)
    wide = _masked_conv(0.5, bias=False, in_channels=3, out_channels=4, kernel_size=3, padding=2)
    for layer, scale in ((conv, 1e3), (conv, 1.0), (wide, 1.0), (conv, -1.0)):
        x = scale * torch.randn(2, 3, 6, 6)
        packed = pack_conv2d_weight(layer.weight, layer.stride, layer.dilation, layer.groups)
        out = sparse_conv2d(x, packed, None, layer._reversed_padding_repeated_twice, batch_inner=batch_inner)
        torch.testing.assert_close(out, layer(x).detach(), rtol=1e-5, atol=1e-4 * max(1.0, abs(scale)))
