import pytest
import torch
import torchvision

from lightning_sparse.export import load_sparse, read_sparse_state_dict, save_sparse
from tests.helpers import TinyCNN


def _sparse_resnet18(sparsity: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.mul_((torch.rand_like(module.weight) >= sparsity).float())
        for module in model.modules():  # non-trivial BatchNorm statistics so that eval outputs depend on them
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(("sparsity", "max_ratio"), [(0.9, 0.25), (0.99, 0.03), (0.999, 0.01)])
def test_export_round_trip_and_size(tmp_path, sparsity, max_ratio):
    model = _sparse_resnet18(sparsity)
    report = save_sparse(model, tmp_path / "model.pt")
    assert report.ratio < max_ratio, str(report)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    # Every conv/fc weight is stored sparse (and so are the all-zero BatchNorm biases, which cost nothing).
    assert report.sparse_tensors >= len(weights) == 21
    assert report.nonzero_weights == sum(int((w != 0).sum()) for w in weights)
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    load_sparse(tmp_path / "model.pt", fresh)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name


def test_dense_tensors_and_integer_buffers_survive(tmp_path):
    model = TinyCNN()
    save_sparse(model, tmp_path / "dense.pt")
    state = read_sparse_state_dict(tmp_path / "dense.pt")
    assert list(state) == list(model.state_dict())
    assert state["bn1.num_batches_tracked"].dtype == torch.long
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_not_an_export(tmp_path):
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a lightning-sparse export"):
        read_sparse_state_dict(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="not a lightning-sparse export"):
        read_sparse_state_dict(tmp_path / "text.pt")


def test_model_that_does_not_match(tmp_path):
    save_sparse(TinyCNN(num_classes=10), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"does not match TinyCNN.*fc\.weight: file \(10, 16\) vs model \(5, 16\)"):
        load_sparse(tmp_path / "m.pt", TinyCNN(num_classes=5))
    with pytest.raises(ValueError, match="missing"):
        load_sparse(tmp_path / "m.pt", torchvision.models.resnet18())
