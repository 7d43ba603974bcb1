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
    # Border outputs that no tap reaches: the batch-inner kernel clips every tap there (no padded copy).
    "padding wider than the kernel": dict(in_channels=6, out_channels=5, kernel_size=3, padding=(3, 4)),
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


@pytest.mark.parametrize("team", [True, False], ids=["torch OpenMP team", "numba pool"])
@pytest.mark.parametrize("batch_inner", [False, True])
def test_kernel_on_two_threads_matches_dense(monkeypatch, team, batch_inner):
    import numba

    from lightning_sparse.functional import sparse_conv
    from lightning_sparse.functional._openmp_team import torch_openmp_team

    if team and torch_openmp_team() is None:
        pytest.skip("torch does not use GNU libgomp here")
    monkeypatch.setattr(sparse_conv, "_USE_TORCH_TEAM", team)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        # Odd sizes: the tasks do not split evenly between the threads; batch 1 at 5 rows gives 5 x 7 tasks.
        for batch in (3, 1):
            x, weight = torch.randn(batch, 4, 5, 9), torch.randn(7, 4, 3, 3)
            weight.mul_(torch.rand_like(weight) < 0.5)
            out = sparse_conv2d(x, pack_conv2d_weight(weight), None, (1, 1, 1, 1), batch_inner=batch_inner)
            torch.testing.assert_close(out, F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)
        if not team:
            assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


def test_torch_openmp_team_is_torchs_own_libgomp():
    from lightning_sparse.functional._openmp_team import torch_openmp_team

    team = torch_openmp_team()
    if "OpenMP" not in torch.__config__.parallel_info():
        assert team is None
        return
    assert team is not None and "libgomp" in team.path
    assert team.thread_num() == 0 and team.num_threads() == 1  # outside a parallel region


def test_batch_innermost_output_view():
    x, weight = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 3, 3)
    packed = pack_conv2d_weight(weight)
    out = sparse_conv2d(x, packed, None, (1, 1, 1, 1), batch_inner=True, contiguous=False)
    assert out.shape == (3, 5, 6, 6) and out.stride() == (1, 6 * 6 * 3, 6 * 3, 3)
    torch.testing.assert_close(out, F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)
    # A batch-innermost input is read in place when no padding is needed, with a copy otherwise: same result.
    pointwise = torch.randn(2, 5, 1, 1)
    for padding in ((0, 0, 0, 0), (1, 1, 1, 1)):
        again = sparse_conv2d(out, pack_conv2d_weight(pointwise), None, padding, batch_inner=True)
        assert again.is_contiguous()
        expected = F.conv2d(F.pad(out, padding), pointwise)
        torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_inner", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch_innermost_input", [False, True])
def test_prologue_applies_batchnorm_and_relu_to_the_input(threads, batch_inner, stride, batch_innermost_input):
    # The pre-activation BatchNorm + ReLU folded into the padding copy: relu(x * scale + shift) per input channel.
    conv = _masked_conv(0.4, bias=True, in_channels=5, out_channels=6, kernel_size=3, stride=stride, padding=1)
    x = torch.randn(3, 5, 9, 8)
    if batch_innermost_input:
        x = x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    expected = conv(torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))).detach()
    packed = pack_conv2d_weight(conv.weight, conv.stride)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for _ in range(2):  # the second call reuses the padded buffer: its border must still be zero
            out = sparse_conv2d(x, packed, conv.bias, (1, 1, 1, 1), batch_inner=batch_inner, prologue=(scale, shift))
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="zero padding"):
        sparse_conv2d(x, packed, None, (1, 1, 1, 1), padding_mode="reflect", prologue=(scale, shift))
