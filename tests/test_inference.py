"""sparse_inference: per-layer choice, equality with the dense model, load_sparse and trainer.fit models."""

import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparse import MaskInit, load_sparse, save_sparse, sparse_inference
from lightning_sparse.inference import SparseInferenceModel, median_timer
from lightning_sparse.models import cifar_resnet18
from tests.helpers import Classifier, random_loader, trainer_kwargs

numba = pytest.importorskip("numba", reason="the sparse kernel needs numba (pip install 'lightning-sparse[inference]')")

from lightning_sparse.nn.sparse_layers import SparseConv2d, SparseLinear  # noqa: E402


class AllGeometries(nn.Module):
    """Stride, padding, dilation, depthwise groups, bias, 1x1 convs and a Linear, with BatchNorm in between."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32)
        self.pointwise = nn.Conv2d(32, 24, 1, bias=False)
        self.shortcut = nn.Conv2d(16, 24, 1, stride=2)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        y = self.pointwise(torch.relu(self.depthwise(torch.relu(self.down(x)))))
        return self.fc((y + self.shortcut(x)).mean((2, 3)))


def _sparsify(model: nn.Module, density: float) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(torch.rand_like(module.weight) < density)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _assert_matches(fast: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
    out = fast(x)
    assert not out.requires_grad
    # The criterion: equal to the dense model to 1e-4 relative.
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def _sparse_after_timing(layer: str, candidate: str, run) -> float:
    run()
    return 1.0 if candidate == "dense" else 0.5


def _dense_after_timing(layer: str, candidate: str, run) -> float:
    run()
    return 0.5 if candidate == "dense" else 1.0


@pytest.mark.parametrize("batch", [1, 4])
def test_every_layer_sparse_matches_dense_model(batch):
    model = _sparsify(AllGeometries(), 0.3)
    x = torch.randn(batch, 3, 12, 12)
    fast = sparse_inference(model, x, timer=_sparse_after_timing, verbose=False)
    assert isinstance(fast, SparseInferenceModel) and not fast.training
    sparse = [m for m in fast.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    assert len(sparse) == 6  # every Conv2d and the Linear
    assert fast.report.sparse_layers == ["stem", "down", "depthwise", "pointwise", "shortcut", "fc"]
    _assert_matches(fast, model, x)
    _assert_matches(fast, model, torch.randn(3, 3, 12, 12))  # another batch size works too
    assert all(not p.requires_grad for p in fast.parameters())
    assert not any(isinstance(m, SparseConv2d) for m in model.modules())  # the original is untouched


def test_falls_back_to_dense_where_the_sparse_kernel_is_slower():
    model = _sparsify(AllGeometries(), 0.3)
    x = torch.randn(4, 3, 12, 12)
    fast = sparse_inference(model, x, timer=_dense_after_timing, verbose=False)
    assert fast.report.sparse_layers == []
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in fast.modules())
    for layer in fast.report.layers:
        assert layer.choice == "dense" and layer.reason == "sparse slower", layer
        assert layer.dense_ms == 500.0 and layer.sparse_ms == 1000.0
    _assert_matches(fast, model, x)


def test_choice_is_per_layer_and_reported():
    model = _sparsify(AllGeometries(), 0.3)
    x = torch.randn(4, 3, 12, 12)

    def timer(layer, candidate, run):
        run()
        slow_sparse = layer in ("down", "fc")
        return {"dense": 1.0, "sparse": 2.0 if slow_sparse else 0.5, "sparse-batch-inner": 3.0}[candidate]

    fast = sparse_inference(model, x, timer=timer, verbose=False)
    choices = {layer.name: layer.choice for layer in fast.report.layers}
    assert choices == {
        "stem": "sparse",
        "down": "dense",
        "depthwise": "sparse",
        "pointwise": "sparse",
        "shortcut": "sparse",
        "fc": "dense",
    }
    table = str(fast.report)
    for column in ("layer", "density", "dense ms", "sparse ms", "choice", "dense (sparse slower)", "16x3x3x3"):
        assert column in table
    _assert_matches(fast, model, x)


def test_forced_choices_and_bad_arguments():
    model = _sparsify(AllGeometries(), 0.3)
    x = torch.randn(4, 3, 12, 12)
    fast = sparse_inference(
        model, x, choose={"down": "sparse-batch-inner", "fc": "dense"}, timer=_sparse_after_timing, verbose=False
    )
    choices = {layer.name: layer.choice for layer in fast.report.layers}
    assert choices["down"] == "sparse-batch-inner" and choices["fc"] == "dense" and choices["stem"] == "sparse"
    assert fast.module.down.batch_inner
    _assert_matches(fast, model, x)
    assert sparse_inference(model, x, choose="dense", verbose=False).report.sparse_layers == []
    with pytest.raises(ValueError, match="not Conv2d/Linear"):
        sparse_inference(model, x, choose={"bn": "dense"}, verbose=False)
    with pytest.raises(ValueError, match="choose must be"):
        sparse_inference(model, x, choose="fastest", verbose=False)
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.train()
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.module.stem(torch.randn(1, 3, 8, 8, requires_grad=True))


def test_dense_layers_above_max_density_are_not_timed_sparse():
    model = _sparsify(AllGeometries(), 0.3)
    with torch.no_grad():
        model.stem.weight.fill_(1.0)
    fast = sparse_inference(model, torch.randn(2, 3, 12, 12), timer=_sparse_after_timing, verbose=False)
    stem = fast.report.layers[0]
    assert stem.name == "stem" and stem.choice == "dense" and stem.reason == "density > 0.5"
    assert stem.sparse_ms is None and stem.dense_ms is not None


def test_round_trip_from_load_sparse(tmp_path):
    torch.manual_seed(0)
    model = _sparsify(cifar_resnet18(width=16), 0.05)
    save_sparse(model, tmp_path / "model.sparse.pt")
    restored = load_sparse(tmp_path / "model.sparse.pt", cifar_resnet18(width=16)).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = sparse_inference(restored, x, choose="sparse", verbose=False)
    convs = [m for m in restored.modules() if isinstance(m, nn.Conv2d)]
    assert len(fast.report.sparse_layers) == len(convs) + 1  # every conv and the classifier
    _assert_matches(fast, model, x)


def test_model_straight_out_of_trainer_fit(tmp_path):
    pl_module = Classifier()
    mask_init = MaskInit(sparsity=0.8, distribution="uniform", seed=0)
    trainer = L.Trainer(callbacks=[mask_init], max_steps=4, **trainer_kwargs(tmp_path))
    trainer.fit(pl_module, random_loader(n=32))
    x = torch.randn(3, 3, 16, 16)
    fast = sparse_inference(pl_module, x, choose="sparse", verbose=False)
    assert fast.report.sparse_layers == ["net.conv1", "net.conv2", "net.fc"]
    assert isinstance(pl_module.net.conv1, nn.Conv2d)  # the fitted module itself is not converted
    pl_module.eval()
    _assert_matches(fast, pl_module, x)


def test_without_numba_every_layer_stays_dense(monkeypatch):
    monkeypatch.setattr("lightning_sparse.inference.numba_available", lambda: False)
    model = _sparsify(AllGeometries(), 0.3)
    x = torch.randn(2, 3, 12, 12)
    with pytest.warns(UserWarning, match="numba is not installed"):
        fast = sparse_inference(model, x, verbose=False)
    assert fast.report.sparse_layers == []
    assert {layer.reason for layer in fast.report.layers} == {"numba not installed"}
    assert fast.report.folded_batchnorms == ["bn"]  # folding is a dense-path change: it does not need numba
    torch.testing.assert_close(fast(x), model(x).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_package_imports_and_runs_dense_without_numba():
    # numba made unimportable in a fresh interpreter: the package imports and sparse_inference keeps dense layers.
    script = (
        "import sys, warnings; sys.modules['numba'] = None\n"
        "import torch, lightning_sparse\n"
        "from tests.helpers import TinyCNN\n"
        "model = TinyCNN().eval(); x = torch.randn(2, 3, 16, 16)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    fast = lightning_sparse.sparse_inference(model, x, verbose=False)\n"
        "assert any('numba is not installed' in str(w.message) for w in caught)\n"
        "assert fast.report.sparse_layers == [], fast.report\n"
        "torch.testing.assert_close(fast(x), model(x).detach(), rtol=1e-5, atol=1e-6)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_median_timer_calls_warmup_plus_repeats_and_rejects_bad_counts():
    calls = []
    seconds = median_timer(repeats=3, warmup=2)("layer", "dense", lambda: calls.append(1))
    assert len(calls) == 5 and 0 <= seconds < 1
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        median_timer(repeats=0)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        sparse_inference(_sparsify(AllGeometries(), 0.3), torch.randn(1, 3, 12, 12), repeats=0, verbose=False)


def test_batchnorm_is_folded_and_relu_fused_into_sparse_convs():
    from tests.helpers import TinyCNN

    model = _sparsify(TinyCNN(), 0.1)
    x = torch.randn(4, 3, 16, 16)
    fast = sparse_inference(model, x, choose={"conv1": "sparse", "conv2": "dense"}, timer=_sparse_after_timing)
    report = fast.report
    assert report.folded_batchnorms == ["bn1", "bn2"]
    assert report.fused_relus == ["act1"]  # conv2 stays dense, so its ReLU stays a module
    assert isinstance(fast.module.bn1, nn.Identity) and isinstance(fast.module.act1, nn.Identity)
    assert isinstance(fast.module.act2, nn.ReLU) and fast.module.conv1.relu
    assert "2 BatchNorm2d folded" in str(report) and "1 ReLU fused" in str(report)
    _assert_matches(fast, model, x)
    # The caller's model is untouched, and fuse=False keeps every module.
    assert isinstance(model.bn1, nn.BatchNorm2d) and isinstance(model.act1, nn.ReLU)
    plain = sparse_inference(model, x, fuse=False, timer=_sparse_after_timing, verbose=False)
    assert plain.report.folded_batchnorms == plain.report.fused_relus == []
    assert isinstance(plain.module.bn1, nn.BatchNorm2d)
    _assert_matches(plain, model, x)


def test_every_layer_goes_back_to_dense_when_the_whole_model_is_slower_sparse():
    from lightning_sparse.inference import WHOLE_MODEL

    model = _sparsify(AllGeometries(), 0.3)
    x = torch.randn(4, 3, 12, 12)

    def timer(layer, candidate, run):
        run()
        if layer == WHOLE_MODEL:  # each layer wins alone, the model as a whole loses (e.g. thread contention)
            return 0.5 if candidate == "dense" else 1.0
        return 1.0 if candidate == "dense" else 0.5

    fast = sparse_inference(model, x, timer=timer, verbose=False)
    assert fast.report.sparse_layers == [] and fast.report.fused_relus == []
    assert {layer.reason for layer in fast.report.layers} == {"whole model faster dense"}
    assert fast.report.whole_model_ms == {"dense": 500.0, "sparse": 1000.0}
    assert "kept dense: every layer reverted" in str(fast.report)
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in fast.modules())
    _assert_matches(fast, model, x)
    # When the whole model wins too, the choice stands and the check is reported.
    kept = sparse_inference(model, x, timer=_sparse_after_timing, verbose=False)
    assert len(kept.report.sparse_layers) == 6 and kept.report.whole_model_ms == {"dense": 1000.0, "sparse": 500.0}


class PreActivation(nn.Module):
    """Two pre-activation residual blocks (BatchNorm -> ReLU -> conv, BatchNorms after the additions unfoldable),
    then a head that, if ``view_head``, averages each (sample, channel) plane through ``.view(n * c, -1)``, which
    cannot view a batch-innermost tensor (samples and channels are not adjacent in its memory)."""

    def __init__(self, view_head: bool = False) -> None:
        super().__init__()
        self.view_head = view_head
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.act1, self.conv1 = nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        self.bn2, self.act2, self.conv2 = nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 if view_head else 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv1(self.act1(self.bn1(x)))
        x = x + self.conv2(self.act2(self.bn2(x)))
        if self.view_head:
            n, c = x.shape[:2]
            return self.fc(x.view(n * c, -1).mean(1).view(n, c))
        return self.fc(self.pool(x).flatten(1))


def _inner_after_timing(layer: str, candidate: str, run) -> float:
    run()
    return {"dense": 1.0, "sparse": 0.8, "sparse-batch-inner": 0.5}[candidate]


def test_batch_inner_layers_hand_on_batch_innermost_views_and_unfolded_batchnorms_follow():
    model = _sparsify(PreActivation(), 0.3)
    x = torch.randn(4, 3, 8, 8)
    seen = {}

    def timer(layer, candidate, run):
        out = run()
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            seen[(layer, candidate)] = out.stride()
        return _inner_after_timing(layer, candidate, run)

    fast = sparse_inference(model, x, timer=timer, verbose=False)
    report = fast.report
    assert [layer.choice for layer in report.layers if layer.kind == "Conv2d"] == ["sparse-batch-inner"] * 3
    # conv1 is chosen on the stem's batch-innermost output: its own output is a view with the batch innermost.
    assert seen[("conv1", "sparse-batch-inner")][0] == 1
    assert not fast.module.conv1.contiguous_output and report.layout_note == ""
    # The BatchNorms after the additions cannot be folded: each becomes one affine map with its ReLU, and as each
    # only feeds a sparse conv, that conv applies them as it copies its input.
    assert report.affine_batchnorms == report.input_activations == ["bn1", "bn2"]
    assert isinstance(fast.module.bn1, nn.Identity) and isinstance(fast.module.act1, nn.Identity)
    assert fast.module.conv1.input_scale is not None and fast.module.stem.input_scale is None
    assert "2 BatchNorm2d as channel affine maps (2 of them, with their ReLU, inside the sparse conv" in str(report)
    _assert_matches(fast, model, x)
    # fuse=False keeps the BatchNorms as they are, even between batch-inner layers.
    plain = sparse_inference(model, x, timer=_inner_after_timing, fuse=False, verbose=False)
    assert isinstance(plain.module.bn1, nn.BatchNorm2d) and plain.report.affine_batchnorms == []
    _assert_matches(plain, model, x)
    # With every layer dense the affine maps are not needed: the BatchNorms stay.
    dense = sparse_inference(model, x, timer=_dense_after_timing, verbose=False)
    assert isinstance(dense.module.bn1, nn.BatchNorm2d) and isinstance(dense.module.act1, nn.ReLU)
    assert dense.report.affine_batchnorms == []


def test_a_model_that_needs_contiguous_activations_gets_contiguous_outputs():
    model = _sparsify(PreActivation(view_head=True), 0.3)
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(RuntimeError, match="view"):  # what the model's own code does on a batch-innermost map
        torch.randn(8, 8, 8, 4).permute(3, 0, 1, 2).view(32, -1)
    fast = sparse_inference(model, x, timer=_inner_after_timing, verbose=False)
    assert "return contiguous tensors" in fast.report.layout_note and "view" in fast.report.layout_note
    assert all(m.contiguous_output for m in fast.modules() if isinstance(m, SparseConv2d))
    _assert_matches(fast, model, x)


def test_a_converted_model_that_disagrees_with_the_dense_one_is_never_returned(monkeypatch):
    model = _sparsify(AllGeometries(), 0.3)
    x = torch.randn(4, 3, 12, 12)
    forward = SparseConv2d.forward
    monkeypatch.setattr(SparseConv2d, "forward", lambda self, x: forward(self, x) + 1.0)  # a wrong kernel
    with pytest.warns(UserWarning, match="failed its check"):
        fast = sparse_inference(model, x, timer=_sparse_after_timing, verbose=False)
    assert fast.report.sparse_layers == []
    assert {layer.reason for layer in fast.report.layers} == {"converted model failed its check"}
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in fast.modules())
    _assert_matches(fast, model, x)
