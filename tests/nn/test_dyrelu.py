"""Tests for DyReLU-B and its blend factor (docs/algorithms.md §3c)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sparse.nn import DyReLU

# sigmoid(+-ln 3) = 0.75 / 0.25, so theta = 2 * sigmoid - 1 = +-0.5.
LOGIT_HALF = math.log(3.0)


def _zero_hyper_network(act: DyReLU) -> None:
    with torch.no_grad():
        for layer in (act.fc1, act.fc2):
            layer.weight.zero_()
            layer.bias.zero_()


def _set_theta(act: DyReLU, theta: list[list[float]]) -> None:
    """Make the hyper-network output a fixed theta (C rows of [a1, a2, b1, b2]) for any input."""
    _zero_hyper_network(act)
    logits = torch.logit((torch.tensor(theta, dtype=torch.float64) + 1) / 2).to(torch.float32)
    with torch.no_grad():
        act.fc2.bias.copy_(logits.flatten())


def test_zero_hyper_network_gives_relu() -> None:
    # theta = 2 * sigmoid(0) - 1 = 0, so (a1, a2, b1, b2) = (1, 0, 0, 0) and y = max(x, 0).
    act = DyReLU(2)
    _zero_hyper_network(act)
    x = torch.tensor([[[-2.0, 3.0]], [[0.5, -0.25]]]).view(1, 2, 1, 2)
    assert torch.equal(act(x), torch.relu(x))


def test_known_theta_gives_hand_computed_output() -> None:
    act = DyReLU(2)
    # channel 0: a1 = 1 + 0.5 = 1.5, a2 = 0, b1 = 0, b2 = 0.5 * -0.5 = -0.25   -> y = max(1.5x, -0.25)
    # channel 1: a1 = 1 - 0.5 = 0.5, a2 = 0.5, b1 = 0.5 * 0.5 = 0.25, b2 = 0  -> y = max(0.5x + 0.25, 0.5x)
    _set_theta(act, [[0.5, 0.0, 0.0, -0.5], [-0.5, 0.5, 0.5, 0.0]])
    x = torch.tensor([[2.0, -1.0, 0.0], [2.0, -1.0, 0.0]]).view(1, 2, 3)
    expected = torch.tensor([[3.0, -0.25, 0.0], [1.25, -0.25, 0.25]]).view(1, 2, 3)
    torch.testing.assert_close(act(x), expected, rtol=0, atol=1e-6)


def test_blend_half_interpolates_coefficients_not_outputs() -> None:
    act = DyReLU(2)
    _set_theta(act, [[0.5, 0.0, 0.0, -0.5], [-0.5, 0.5, 0.5, 0.0]])
    act.beta = 0.5
    # coeff = 0.5 * coeff_dyrelu + 0.5 * (1, 0, 0, 0):
    # channel 0: (1.25, 0, 0, -0.125)     -> y = max(1.25x, -0.125)
    # channel 1: (0.75, 0.25, 0.125, 0)   -> y = max(0.75x + 0.125, 0.25x)
    x = torch.tensor([[2.0, -1.0], [2.0, -1.0]]).view(1, 2, 2)
    expected = torch.tensor([[2.5, -0.125], [1.625, -0.25]]).view(1, 2, 2)
    torch.testing.assert_close(act(x), expected, rtol=0, atol=1e-6)
    # Blending outputs instead would give 0.5 * max(0.5x + 0.25, 0.5x) + 0.5 * relu(x) = 1.625 at x = 2 too, but
    # -0.125 (not -0.25) at x = -1 on channel 1.
    torch.testing.assert_close(
        act.coefficients(x)[0],
        torch.tensor([[1.25, 0.0, 0.0, -0.125], [0.75, 0.25, 0.125, 0.0]]),
        rtol=0,
        atol=1e-6,
    )


def test_beta_zero_is_relu_bitwise_and_skips_hyper_network() -> None:
    torch.manual_seed(0)
    act = DyReLU(8)
    calls: list[str] = []
    for name in ("fc1", "fc2"):
        getattr(act, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    x = torch.randn(3, 8, 5, 5)
    act(x)
    assert calls == ["fc1", "fc2"]
    calls.clear()
    act.beta = 0.0
    y = act(x)
    assert calls == []
    assert torch.equal(y, torch.relu(x))


def test_matches_reference_formula_per_sample_and_pools_over_space() -> None:
    torch.manual_seed(1)
    act = DyReLU(6, reduction=2, num_pieces=3, lambdas=(0.8, 0.3))
    act.beta = 0.7
    x = torch.randn(4, 6, 3, 5)
    y = act(x)

    # Reference written out step by step for one sample at a time.
    for n in range(4):
        z = x[n].mean(dim=(1, 2))
        theta = 2 * torch.sigmoid(act.fc2(torch.relu(act.fc1(z)))) - 1
        theta = theta.view(6, 6)
        a = 1.0 * torch.tensor([1.0, 0.0, 0.0]) + 0.8 * theta[:, :3]
        b = 0.3 * theta[:, 3:]
        a = 0.7 * a + 0.3 * torch.tensor([1.0, 0.0, 0.0])
        b = 0.7 * b
        pieces = x[n].unsqueeze(-1) * a[:, None, None, :] + b[:, None, None, :]
        torch.testing.assert_close(y[n], pieces.max(dim=-1).values)
    # Coefficients depend on the sample: different samples get different slopes.
    coefficients = act.coefficients(x)
    assert not torch.allclose(coefficients[0], coefficients[1])


def test_two_dimensional_input_and_spatially_constant_input_agree() -> None:
    torch.manual_seed(2)
    act = DyReLU(4)
    v = torch.randn(2, 4)
    constant_map = v[:, :, None, None].expand(2, 4, 3, 3)
    torch.testing.assert_close(act(constant_map), act(v)[:, :, None, None].expand(2, 4, 3, 3))


def test_tiny_channel_count_has_hidden_width_one() -> None:
    act = DyReLU(2, reduction=4)
    assert act.fc1.out_features == 1
    assert act(torch.randn(2, 2, 4, 4)).shape == (2, 2, 4, 4)


def test_gradients_reach_hyper_network_and_input() -> None:
    torch.manual_seed(3)
    act = DyReLU(16)
    x = torch.randn(2, 16, 3, 3, requires_grad=True)
    act(x).sum().backward()
    for grad in (x.grad, act.fc1.weight.grad, act.fc2.weight.grad, act.fc2.bias.grad):
        assert grad is not None and grad.abs().sum() > 0


def test_channel_mismatch_error_names_site_and_counts() -> None:
    act = DyReLU(64)
    act.site_name = "layer1.0.relu"
    with pytest.raises(ValueError, match=r"'layer1.0.relu' was built for 64 channels .* 256 channels.*several sites"):
        act(torch.randn(1, 256, 2, 2))
    act.beta = 0.0
    with pytest.raises(ValueError, match="64 channels"):
        act(torch.randn(1, 256, 2, 2))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_beta_out_of_range_rejected(bad: float) -> None:
    act = DyReLU(4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        act.beta = bad
    assert act.beta == 1.0


def test_beta_is_a_plain_float_not_state() -> None:
    act = DyReLU(4)
    act.beta = 0.25
    assert isinstance(act.beta, float)
    assert not any("beta" in key for key in act.state_dict())
    assert "beta" not in dict(act.named_buffers()) and "beta" not in dict(act.named_parameters())
    with pytest.raises(TypeError):
        act.beta = torch.tensor(0.5)  # type: ignore[assignment]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="num_pieces"):
        DyReLU(4, num_pieces=1)
    with pytest.raises(ValueError, match="2 \\* num_pieces = 6"):
        DyReLU(4, num_pieces=3, init_coefficients=(1.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="channels"):
        DyReLU(0)
    with pytest.raises(ValueError, match="shape"):
        DyReLU(4)(torch.randn(4))


def test_custom_init_coefficients_used_when_theta_is_zero() -> None:
    act = DyReLU(1, init_coefficients=(1.0, 0.1, 0.0, 0.0))  # leaky ReLU with slope 0.1
    _zero_hyper_network(act)
    x = torch.tensor([[-2.0, 3.0]]).view(2, 1)
    torch.testing.assert_close(act(x), torch.tensor([[-0.2], [3.0]]))


# ------------------------------------------------------------------ the K = 2 kernel against the stacked formula
def _stacked_formula(act: DyReLU, x: torch.Tensor) -> torch.Tensor:
    """DyReLU's output as it was computed before issue 10 point 7: stack the K pieces, take amax."""
    coefficients = act.coefficients(x)
    coefficients = coefficients.view(x.shape[0], act.channels, *([1] * (x.dim() - 2)), 2 * act.num_pieces)
    pieces = x.unsqueeze(-1) * coefficients[..., : act.num_pieces] + coefficients[..., act.num_pieces :]
    return pieces.amax(dim=-1)


@pytest.mark.parametrize("shape", [(6, 8, 5, 5), (4, 8), (3, 8, 7), (2, 8, 3, 4, 4)])
@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_two_piece_module_matches_stacked_formula_forward_and_backward(shape: tuple[int, ...], beta: float) -> None:
    torch.manual_seed(11)
    act = DyReLU(8, reduction=2, lambdas=(0.9, 0.6)).double()
    act.beta = beta
    with torch.no_grad():  # larger hyper-network weights, so that both pieces win somewhere
        act.fc2.weight.mul_(8.0)
    x = torch.randn(*shape, dtype=torch.float64)
    grad_out = torch.randn(*shape, dtype=torch.float64)

    results = []
    for forward in (act, lambda inp: _stacked_formula(act, inp)):
        act.zero_grad()
        inp = x.clone().requires_grad_()
        out = forward(inp)
        out.backward(grad_out)
        results.append((out.detach(), inp.grad, [p.grad.clone() for p in act.parameters()]))
    (new_out, new_gx, new_gp), (old_out, old_gx, old_gp) = results
    assert torch.equal(new_out, old_out)  # same floating-point operations: bitwise
    # The input's gradient also flows through the pooled mean into the coefficients: equal up to summation order.
    torch.testing.assert_close(new_gx, old_gx, rtol=1e-12, atol=1e-12)
    for new, old in zip(new_gp, old_gp):
        torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12)
    # Both pieces were active somewhere, so the comparison exercised both branches.
    coefficients = act.coefficients(x).view(x.shape[0], 8, *([1] * (x.dim() - 2)), 4)
    first_wins = x.unsqueeze(-1)[..., 0] * coefficients[..., 0] + coefficients[..., 2] > (
        x * coefficients[..., 1] + coefficients[..., 3]
    )
    assert first_wins.any() and (~first_wins).any()


def test_two_piece_max_splits_the_gradient_evenly_on_a_tie_like_amax() -> None:
    from lightning_sparse.nn.dyrelu import two_piece_max

    x = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64).view(1, 1, 3)  # ties at x = 0 when b1 == b2
    coefficients = torch.tensor([[[1.5, -0.5, 0.25, 0.25]]], dtype=torch.float64)
    grads = []
    for fn in (
        lambda a, c: two_piece_max(a, c),
        lambda a, c: (a.unsqueeze(-1) * c[:, :, None, :2] + c[:, :, None, 2:]).amax(-1),
    ):
        a, c = x.clone().requires_grad_(), coefficients.clone().requires_grad_()
        fn(a, c).sum().backward()
        grads.append((a.grad, c.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert grads[0][0][0, 0, 0].item() == pytest.approx(0.5)  # (1.5 + (-0.5)) / 2
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert torch.autograd.gradcheck(
        two_piece_max,
        (
            torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
        ),
    )


def test_two_piece_max_keeps_only_input_and_coefficients_for_backward() -> None:
    act = DyReLU(8)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        act(x)
    # Full-size saved tensors: only x itself (the stacked formula also kept the 2x-larger pieces and the output).
    full_size = [t for t in saved if t.numel() >= x.numel()]
    assert len(full_size) == 1 and full_size[0].data_ptr() == x.data_ptr()
