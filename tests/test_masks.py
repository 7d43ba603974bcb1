import pytest
import torch
from torch import nn

from lightning_sparse.masks import SparseMasks, check_masks_fit, find_mask_owner


def _layer_and_masks():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    return layer, SparseMasks({"weight": layer.weight}, {"weight": mask})


def test_statistics_by_hand():
    _, masks = _layer_and_masks()
    assert masks.nnz() == 4 and masks.numel() == 12
    assert masks.density() == pytest.approx(1 / 3) and masks.sparsity() == pytest.approx(2 / 3)
    assert masks.layer_densities() == {"weight": pytest.approx(1 / 3)}
    assert list(masks) == ["weight"] and len(masks) == 1


def test_mapping_is_read_only():
    _, masks = _layer_and_masks()
    with pytest.raises(TypeError):
        masks["weight"] = torch.ones(3, 4, dtype=torch.bool)  # type: ignore[index]


def test_apply_and_mask_grads_zero_exactly_the_masked_positions():
    layer, masks = _layer_and_masks()
    before = layer.weight.detach().clone()
    masks.apply_()
    assert torch.equal(layer.weight.detach(), before * masks["weight"])
    layer(torch.randn(5, 4)).sum().backward()
    masks.mask_grads_()
    assert (layer.weight.grad[~masks["weight"]] == 0).all()
    assert (layer.weight.grad[masks["weight"]] != 0).all()


class _OddOptimizer(torch.optim.Optimizer):
    """An optimizer the library has never heard of, with param-shaped and other state."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state.setdefault("trace", torch.zeros_like(p)).add_(1.0)
                state["count"] = torch.tensor(3.0)
                state["row_norms"] = torch.ones(p.shape[0])


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.1),
    lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True),
    _OddOptimizer,
])
def test_optimizer_state_is_zeroed_for_any_optimizer(make):
    layer, masks = _layer_and_masks()
    optimizer = make(layer.parameters())
    layer(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    masks.attach_optimizers([optimizer])
    masks.reset_optimizer_state_()
    state = optimizer.state[layer.weight]
    shaped = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == layer.weight.shape]
    assert shaped, "the optimizer should have param-shaped state"
    for key in shaped:
        assert (state[key][~masks["weight"]] == 0).all(), key
        assert (state[key][masks["weight"]] != 0).any(), key
    if "count" in state:  # state of another shape is left alone
        assert state["count"].item() == 3.0 and (state["row_norms"] == 1).all()


def test_update_keeps_invariants_and_checks_the_budget():
    layer, masks = _layer_and_masks()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    masks.attach_optimizers([optimizer])
    masks.apply_()
    new = masks["weight"].clone()
    new[0, 0], new[0, 1] = False, True  # move one weight: (0,0) pruned, (0,1) grown
    with pytest.raises(ValueError, match="budget is 5"):
        masks.update_({"weight": new}, expected_nnz=5)
    version = masks.version
    changed = masks.update_({"weight": new}, expected_nnz=4)
    assert changed == {"weight": 2} and masks.version == version + 1
    assert layer.weight[0, 0].item() == 0 and layer.weight[0, 1].item() == 0  # grown weights start at 0
    momentum = optimizer.state[layer.weight]["momentum_buffer"]
    assert momentum[0, 0].item() == 0 and momentum[0, 1].item() == 0
    assert masks.nnz() == 4


def test_state_dict_round_trip_and_fingerprint():
    layer, masks = _layer_and_masks()
    saved = masks.state_dict()
    other_layer = nn.Linear(4, 3)
    other = SparseMasks({"weight": other_layer.weight}, {"weight": torch.ones(3, 4, dtype=torch.bool)})
    assert other.fingerprint() != masks.fingerprint()
    other.load_state_dict(saved)
    assert torch.equal(other["weight"], masks["weight"]) and other.fingerprint() == masks.fingerprint()
    assert (other_layer.weight[~masks["weight"]] == 0).all()


def test_masks_that_do_not_fit_are_listed():
    with pytest.raises(ValueError, match=r"no saved mask: \['b'\].*does not select: \['c'\].*shape mismatches"):
        check_masks_fit(
            {"a": torch.ones(2, 2, dtype=torch.bool), "c": torch.ones(1, dtype=torch.bool)},
            {"a": torch.Size([2, 3]), "b": torch.Size([1])},
        )


def test_constructor_rejects_mismatched_masks():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="shape"):
        SparseMasks({"weight": layer.weight}, {"weight": torch.ones(4, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="same tensors"):
        SparseMasks({"weight": layer.weight}, {"bias": torch.ones(3, dtype=torch.bool)})


def test_find_mask_owner_without_mask_init_says_what_to_add():
    class FakeTrainer:
        callbacks: list = []

    with pytest.raises(RuntimeError, match=r"add MaskInit\(sparsity=...\)"):
        find_mask_owner(FakeTrainer(), "DynamicReallocation")
