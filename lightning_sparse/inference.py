"""One call from a trained sparse model to a faster one on the CPU: :func:`sparse_inference` (docs/inference.md).

Every ``nn.Conv2d`` / ``nn.Linear`` of the model is timed on the shapes it sees for ``example_input``: once dense
(torch's own kernel) and once per layout of the direct sparse kernel
(:mod:`lightning_sparse.functional.sparse_conv`); the fastest wins, so a layer where the sparse kernel loses keeps
the dense one. The result is a copy of the model in eval mode that runs without autograd, plus a per-layer report.
No Lightning import (a LightningModule is handled as the ``nn.Module`` it is).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.functional.sparse_conv import numba_available
from lightning_sparse.nn.conv_fusion import (
    ChannelAffine,
    ConvChain,
    find_batchnorm_relus,
    find_conv_chains,
    find_preactivated_convs,
    find_relus_after_additions,
    fold_batchnorm_,
    is_eval_affine,
)
from lightning_sparse.nn.sparse_layers import SparseConv2d, SparseLinear

__all__ = ["WHOLE_MODEL", "InferenceReport", "LayerChoice", "SparseInferenceModel", "median_timer", "sparse_inference"]

CANDIDATES = ("dense", "sparse", "sparse-batch-inner")
"""The implementations timed per layer: torch's dense kernel and the sparse kernel in its two memory layouts."""

Timer = Callable[[str, str, Callable[[], Any]], float]
"""``timer(layer_name, candidate, run) -> seconds``: how long ``run()`` takes (one of :data:`CANDIDATES`)."""


def median_timer(repeats: int = 5, warmup: int = 1) -> Timer:
    """A :data:`Timer`: the median wall time of ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")

    def timer(layer: str, candidate: str, run: Callable[[], Any]) -> float:
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return timer


def _interleaved_medians(runs: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, timed round-robin (one call of each per round, after one warm-up call each), so
    that a change of machine load during the measurement hits every candidate alike."""
    with torch.no_grad():
        for run in runs.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class LayerChoice:
    """What :func:`sparse_inference` decided for one layer.

    Attributes:
        name: qualified module name.
        kind: ``"Conv2d"`` or ``"Linear"``.
        weight_shape: the dense weight's shape.
        input_shape: the shape the layer saw for ``example_input`` (None if it was not called).
        density: fraction of non-zero weights.
        times_ms: candidate (:data:`CANDIDATES`) -> median milliseconds, for the candidates that were timed.
        choice: the candidate that runs now.
        reason: why, in words.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    density: float
    times_ms: dict[str, float] = field(default_factory=dict)
    choice: str = "dense"
    reason: str = ""

    @property
    def dense_ms(self) -> float | None:
        """The dense kernel's time, if measured."""
        return self.times_ms.get("dense")

    @property
    def sparse_ms(self) -> float | None:
        """The faster sparse layout's time, if measured."""
        sparse = [t for c, t in self.times_ms.items() if c != "dense"]
        return min(sparse) if sparse else None

    @property
    def chosen_ms(self) -> float | None:
        """The chosen implementation's time, if measured."""
        return self.times_ms.get(self.choice)


@dataclass
class InferenceReport:
    """The per-layer choices of :func:`sparse_inference`; ``str(report)`` is the table it prints."""

    layers: list[LayerChoice]
    threads: int
    folded_batchnorms: list[str] = field(default_factory=list)
    """BatchNorm2d modules folded into the conv before them (now ``nn.Identity``)."""
    fused_relus: list[str] = field(default_factory=list)
    """ReLU modules applied inside the sparse conv before them (now ``nn.Identity``)."""
    fusion_note: str = ""
    """Why nothing was folded, when the model could not be analysed (empty otherwise)."""
    affine_batchnorms: list[str] = field(default_factory=list)
    """BatchNorm2d modules that could not be folded, replaced by their :class:`ChannelAffine` because batch-inner
    layers hand on batch-innermost activations."""
    input_activations: list[str] = field(default_factory=list)
    """Of those, the ones (with their ReLU) applied by the sparse conv they feed as it copies its input."""
    in_place_relus: list[str] = field(default_factory=list)
    """ReLU modules after a residual addition, made to run in place (the sum has no other user)."""
    layout_note: str = ""
    """Why batch-inner layers return contiguous tensors, when the model did not run (or agree) with their
    batch-innermost views (empty otherwise)."""
    whole_model_ms: dict[str, float] = field(default_factory=dict)
    """The whole-model check: ``"dense"`` (every layer dense) and ``"sparse"`` (as chosen) milliseconds; empty
    when it did not run (no layer chose sparse, or a choice was forced)."""

    @property
    def sparse_layers(self) -> list[str]:
        """Names of the layers that now run the sparse kernel."""
        return [layer.name for layer in self.layers if layer.choice != "dense"]

    def totals_ms(self) -> tuple[float, float]:
        """Sum over the timed layers of the dense time and of the chosen time (the layers' share of the speedup)."""
        timed = [layer for layer in self.layers if layer.dense_ms is not None and layer.chosen_ms is not None]
        return sum(layer.dense_ms for layer in timed), sum(layer.chosen_ms for layer in timed)  # type: ignore[misc]

    def table(self) -> str:
        """A fixed-width table: layer, kind, weight shape, input shape, density, dense ms, sparse ms, choice."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        header = ("layer", "kind", "weight", "input", "density", "dense ms", "sparse ms", "choice")
        rows = [
            (
                layer.name,
                layer.kind,
                "x".join(str(d) for d in layer.weight_shape),
                "-" if layer.input_shape is None else "x".join(str(d) for d in layer.input_shape),
                f"{layer.density:.4f}",
                ms(layer.dense_ms),
                ms(layer.sparse_ms),
                layer.choice if layer.choice != "dense" or not layer.reason else f"dense ({layer.reason})",
            )
            for layer in self.layers
        ]
        dense_total, chosen_total = self.totals_ms()
        total = ("total", "", "", "", "", f"{dense_total:.3f}", f"{chosen_total:.3f}", "chosen")
        widths = [max(len(row[c]) for row in [header, *rows, total]) for c in range(len(header))]

        def line(row: tuple[str, ...]) -> str:
            return "  ".join(
                cell.ljust(width) if column in (0, 1, 2, 3, 7) else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(row, widths))
            ).rstrip()

        rule = "-" * max(len(line(header)), len(line(total)))
        body = [line(header), rule, *(line(row) for row in rows), rule, line(total)]
        fusion = (
            f"{len(self.folded_batchnorms)} BatchNorm2d folded into the conv before them, "
            f"{len(self.fused_relus)} ReLU fused into sparse convs"
        )
        if self.fusion_note:
            fusion += f" ({self.fusion_note})"
        if self.in_place_relus:
            fusion += f", {len(self.in_place_relus)} ReLU after additions in place"
        if self.affine_batchnorms:
            fusion += f", {len(self.affine_batchnorms)} BatchNorm2d as channel affine maps"
        if self.input_activations:
            fusion += f" ({len(self.input_activations)} of them, with their ReLU, inside the sparse conv they feed)"
        if self.layout_note:
            fusion += f"; {self.layout_note}"
        if self.whole_model_ms:
            kept = "sparse" if self.sparse_layers else "dense: every layer reverted"
            fusion += (
                f"; whole model: {self.whole_model_ms['dense']:.3f} ms all dense, "
                f"{self.whole_model_ms['sparse']:.3f} ms as chosen, kept {kept}"
            )
        return "\n".join(body) + f"\n({self.threads} thread(s); 'total' sums the timed layers only; {fusion})"

    def __str__(self) -> str:
        return self.table()


class SparseInferenceModel(nn.Module):
    """The model returned by :func:`sparse_inference`: eval mode, forward under ``torch.no_grad()``.

    Attributes:
        module: the converted copy of the model.
        report: the per-layer :class:`InferenceReport`.
    """

    def __init__(self, module: nn.Module, report: InferenceReport) -> None:
        super().__init__()
        self.module = module
        self.report = report
        super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's forward, without autograd."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> SparseInferenceModel:
        """Stays in eval mode: the sparse layers have no backward; train the original model instead."""
        if mode:
            raise RuntimeError(
                "a sparse_inference model is inference-only (eval mode, no gradients); train the original model "
                "and call sparse_inference again"
            )
        return super().train(False)


def _convertible(module: nn.Module) -> str | None:
    """None if ``module`` can be converted, else why not."""
    if module.weight.dtype != torch.float32 or module.weight.device.type != "cpu":
        return f"{module.weight.dtype} on {module.weight.device}; the kernel is float32 CPU"
    if type(module).forward not in (nn.Conv2d.forward, nn.Linear.forward):
        return f"{type(module).__name__} has its own forward"
    if getattr(module, "parametrizations", None) is not None:
        return "parametrized weight"
    if _has_hooks(module):
        return "has forward hooks"
    return None


WHOLE_MODEL = "(whole model)"
"""The layer name under which :func:`sparse_inference` passes the whole-model check to an injected timer."""


def _check_whole_model(
    converted: nn.Module,
    all_dense: nn.Module,
    example_input: Any,
    report: InferenceReport,
    timer: Timer | None,
    repeats: int,
) -> nn.Module:
    """Time the converted model against the same model with every layer dense; keep the faster.

    Layers are chosen one by one, each timed alone, but a layer's time depends on its neighbours: with several
    threads torch's OpenMP workers spin for a while after each of its operators, on the cores the sparse kernel's
    threads then need (docs/inference.md §3), which no single-layer timing sees. This check on the whole model
    keeps ``sparse_inference`` from returning a model slower than the dense one. Records the times on ``report``
    and, if dense is faster, turns every layer's choice back to dense.
    """

    def call(model: nn.Module) -> Callable[[], Any]:
        return lambda: model(*example_input) if isinstance(example_input, tuple) else model(example_input)

    runs = {"dense": call(all_dense), "sparse": call(converted)}
    with torch.no_grad():
        if timer is None:
            seconds = _interleaved_medians(runs, repeats)
        else:
            seconds = {candidate: timer(WHOLE_MODEL, candidate, run) for candidate, run in runs.items()}
    report.whole_model_ms = {candidate: 1e3 * value for candidate, value in seconds.items()}
    if seconds["sparse"] < seconds["dense"]:
        return converted
    _revert_to_dense(report, "whole model faster dense")
    return all_dense


def _revert_to_dense(report: InferenceReport, reason: str) -> None:
    """Record on ``report`` that every layer went back to dense (the all-dense copy is returned) and why."""
    for layer in report.layers:
        if layer.choice != "dense":
            layer.choice, layer.reason = "dense", reason
    report.fused_relus, report.affine_batchnorms, report.input_activations, report.layout_note = [], [], [], ""


def _batchnorms_as_affine(work: nn.Module) -> dict[str, nn.Module]:
    """Replace each eval-mode ``BatchNorm2d`` left in ``work`` by its :class:`ChannelAffine` (taking in the ReLU
    module that is its only user, which becomes ``nn.Identity``); return the replaced modules by name (to put back
    if no layer ends up batch-inner).

    Between batch-inner layers the activations stay batch-innermost; ``nn.BatchNorm2d`` would copy them to a
    contiguous layout first, ``ChannelAffine`` computes the same map in their own layout.
    """
    relus = find_batchnorm_relus(work)
    replaced: dict[str, nn.Module] = {}
    for name, module in list(work.named_modules()):
        if type(module) is nn.BatchNorm2d and not _has_hooks(module) and is_eval_affine(module):
            relu = relus.get(name)
            if relu is not None and _has_hooks(work.get_submodule(relu)):
                relu = None
            _set_submodule(work, name, ChannelAffine(module, relu=relu is not None))
            replaced[name] = module
            if relu is not None:
                replaced[relu] = work.get_submodule(relu)
                _set_submodule(work, relu, nn.Identity())
    return replaced


def _apply_input_activations(work: nn.Module, preactivated: Mapping[str, str]) -> list[str]:
    """Take each ``ChannelAffine`` (with its ReLU) that only feeds a sparse conv into that conv's input copy
    (:meth:`SparseConv2d.apply_input_activation`), leaving ``nn.Identity`` in its place; return their names."""
    applied = []
    for conv_name, batchnorm_name in preactivated.items():
        conv, affine = work.get_submodule(conv_name), work.get_submodule(batchnorm_name)
        if isinstance(conv, SparseConv2d) and isinstance(affine, ChannelAffine) and affine.relu:
            if conv.padding_mode == "zeros" and conv.input_scale is None:
                conv.apply_input_activation(affine.scale, affine.shift)
                _set_submodule(work, batchnorm_name, nn.Identity())
                applied.append(batchnorm_name)
    return applied


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def _run(model: nn.Module, example_input: Any) -> Any:
    with torch.no_grad():
        return model(*example_input) if isinstance(example_input, tuple) else model(example_input)


def _disagreement(converted: nn.Module, all_dense: nn.Module, example_input: Any) -> str:
    """Why ``converted`` does not compute what ``all_dense`` does on ``example_input`` ("" if it does): the error
    it raises, or which output differs by more than 1e-4 of the largest dense output value."""
    expected = torch.utils._pytree.tree_leaves(_run(all_dense, example_input))
    try:
        got = torch.utils._pytree.tree_leaves(_run(converted, example_input))
    except RuntimeError as error:
        return _first_line(error)
    for want, have in zip(expected, got):
        if isinstance(want, Tensor) and isinstance(have, Tensor) and want.numel():
            tolerance = 1e-4 * max(float(want.abs().max()), 1e-12)
            if want.shape != have.shape or float((want - have).abs().max()) > tolerance:
                return "its outputs differ from the dense model's by more than 1e-4 of their largest value"
    return ""


def _verify(converted: nn.Module, all_dense: nn.Module, example_input: Any, report: InferenceReport) -> nn.Module:
    """Run the converted model once and compare it with the dense one; return the model to keep.

    A model's own code may need contiguous activations (``x.view(n * c, -1)`` raises on a batch-innermost tensor):
    then the batch-inner layers are made to return contiguous tensors and the check runs again. A model that still
    raises or disagrees is never returned: every layer goes back to dense, with a warning (that would be a bug of
    the library's; please report it).
    """
    why = _disagreement(converted, all_dense, example_input)
    handing_on_views = [m for m in converted.modules() if isinstance(m, SparseConv2d) and not m.contiguous_output]
    if why and handing_on_views:
        for module in handing_on_views:
            module.contiguous_output = True
        report.layout_note = f"batch-inner layers return contiguous tensors (with batch-innermost views: {why})"
        why = _disagreement(converted, all_dense, example_input)
    if not why:
        return converted
    warnings.warn(
        f"sparse_inference: the converted model failed its check ({why}); every layer stays dense", stacklevel=3
    )
    _revert_to_dense(report, "converted model failed its check")
    return all_dense


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fold_batchnorms(work: nn.Module, chains: Mapping[str, ConvChain]) -> list[str]:
    """Fold each chain's BatchNorm into its conv and put ``nn.Identity`` in its place; return their names."""
    folded = []
    for chain in chains.values():
        conv = work.get_submodule(chain.conv)
        if chain.batchnorm is None or _has_hooks(conv):  # find_conv_chains takes plain nn.Conv2d only
            continue
        batchnorm = work.get_submodule(chain.batchnorm)
        if _has_hooks(batchnorm):
            continue
        fold_batchnorm_(conv, batchnorm)
        _set_submodule(work, chain.batchnorm, nn.Identity())
        folded.append(chain.batchnorm)
    return folded


class _LayerChooser(nn.Module):
    """Stands in for one ``Conv2d`` / ``Linear`` during the choosing pass of :func:`sparse_inference`.

    On its first call it times the candidates (:data:`CANDIDATES`) on the input it receives, keeps the fastest and
    returns that one's output. So each layer is timed on the input the layers chosen before it really hand on: a
    batch-innermost view after a batch-inner layer (cheap for a batch-inner layer to read, a transposing copy for
    the others), a contiguous tensor after the rest.
    """

    def __init__(
        self,
        name: str,
        layer: nn.Module,
        wanted: str,
        timer: Timer | None,
        repeats: int,
        max_density: float,
        have_numba: bool,
    ) -> None:
        super().__init__()
        weight = layer.weight.detach()
        self.layer = layer
        self.wanted, self.timer, self.repeats = wanted, timer, repeats
        self.max_density, self.have_numba = max_density, have_numba
        self.record = LayerChoice(
            name=name,
            kind="Conv2d" if isinstance(layer, nn.Conv2d) else "Linear",
            weight_shape=tuple(weight.shape),
            input_shape=None,
            density=float((weight != 0).sum()) / max(1, weight.numel()),
        )
        self.chosen: nn.Module | None = None
        self.contiguous_output = False

    def restart(self, contiguous_output: bool) -> None:
        """Forget the choice, to choose again on the next call (batch-inner candidates returning contiguous
        tensors if ``contiguous_output``)."""
        self.chosen, self.contiguous_output = None, contiguous_output
        self.record.times_ms.clear()
        self.record.choice, self.record.reason, self.record.input_shape = "dense", "", None

    def forward(self, x: Tensor) -> Tensor:
        if self.chosen is None:
            self.chosen = self._choose(x)
        return self.chosen(x)

    def finish(self) -> nn.Module:
        """The chosen module (the original layer if it was not called, or stays dense)."""
        if self.chosen is None:
            why_not = "numba not installed" if not self.have_numba else _convertible(self.layer)
            self.record.reason = why_not or "not called by example_input"
            if self.wanted not in ("timed", "dense"):
                raise ValueError(f"cannot run layer {self.record.name!r} sparse as asked ({self.record.reason})")
            return self.layer
        return self.chosen

    def _time(self, runs: dict[str, Callable[[], Any]]) -> None:
        with torch.no_grad():
            if self.timer is None:
                seconds = _interleaved_medians(runs, self.repeats)
            else:
                seconds = {candidate: self.timer(self.record.name, candidate, run) for candidate, run in runs.items()}
        self.record.times_ms.update({candidate: 1e3 * value for candidate, value in seconds.items()})

    def _choose(self, x: Tensor) -> nn.Module:
        layer, record, wanted = self.layer, self.record, self.wanted
        record.input_shape = tuple(x.shape)
        why_not = "numba not installed" if not self.have_numba else _convertible(layer)
        if why_not is None and x.dtype != torch.float32:
            why_not = f"{x.dtype} input"
        if why_not is None and wanted == "timed" and record.density > self.max_density:
            why_not = f"density > {self.max_density}"
        if why_not is not None or wanted == "dense":
            record.reason = why_not or ("forced" if wanted == "dense" else "")
            if wanted not in ("timed", "dense") and why_not is not None:
                raise ValueError(f"cannot run layer {record.name!r} sparse as asked ({why_not})")
            self._time({"dense": lambda: layer(x)})
            return layer
        if isinstance(layer, nn.Conv2d):
            candidates: dict[str, nn.Module] = {
                "sparse": SparseConv2d(layer, batch_inner=False),
                "sparse-batch-inner": SparseConv2d(
                    layer, batch_inner=True, contiguous_output=self.contiguous_output
                ),
            }
            samples = x.shape[0] if x.dim() == 4 else 1
        else:
            candidates = {
                "sparse": SparseLinear(layer, batch_inner=False),
                "sparse-batch-inner": SparseLinear(layer, batch_inner=True),
            }
            samples = x.numel() // max(1, x.shape[-1])
        if samples == 1 and wanted != "sparse-batch-inner":
            candidates.pop("sparse-batch-inner")  # a single sample: both layouts are the same computation
        runs: dict[str, Callable[[], Any]] = {"dense": lambda: layer(x)}
        runs.update({c: (lambda m=m: m(x)) for c, m in candidates.items()})
        if wanted in candidates:
            runs = {wanted: runs[wanted], "dense": runs["dense"]}
        self._time(runs)
        sparse_times = {c: t for c, t in record.times_ms.items() if c in candidates}
        fastest_sparse = min(sparse_times, key=sparse_times.__getitem__)
        if wanted in candidates:
            record.choice, record.reason = wanted, "forced"
        elif wanted == "sparse":
            record.choice, record.reason = fastest_sparse, "forced"
        elif record.times_ms[fastest_sparse] < record.times_ms["dense"]:
            record.choice = fastest_sparse
        else:
            record.reason = "sparse slower"
        return layer if record.choice == "dense" else candidates[record.choice]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _copy_model(model: nn.Module) -> nn.Module:
    # A LightningModule out of trainer.fit references its Trainer; share it instead of deep-copying it.
    trainer = model.__dict__.get("_trainer")
    memo = {id(trainer): trainer} if trainer is not None else {}
    return copy.deepcopy(model, memo)


def sparse_inference(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...],
    *,
    choose: str | Mapping[str, str] = "timed",
    timer: Timer | None = None,
    repeats: int = 5,
    max_density: float = 0.5,
    fuse: bool = True,
    verbose: bool = True,
) -> SparseInferenceModel:
    """Return a copy of ``model`` for CPU inference in which each sparse layer runs the faster of dense and sparse.

    The masked weights of a model trained with the callbacks (or restored with
    :func:`~lightning_sparse.export.load_sparse`) are exact zeros in dense storage; every ``nn.Conv2d`` and
    ``nn.Linear`` whose density is at most ``max_density`` is timed with torch's dense kernel and with the direct
    sparse kernel in both memory layouts (docs/inference.md §2-3), in one pass of ``example_input`` through the
    model in which each layer is timed on the input it really gets (a batch-innermost view after a batch-inner
    layer) and hands on the output of the fastest, which is kept. The converted model is then run once and compared
    with the dense one (if the model's own code cannot take batch-innermost activations, the batch-inner layers
    return contiguous tensors instead). Then the whole converted model is timed against the same model
    with every layer dense, and if it is not faster every layer goes back to dense (a layer timed alone does not see
    the thread contention between torch's operators and the sparse kernel; the check is skipped when a choice is
    forced). The choice depends on the batch size and the thread count
    (``torch.get_num_threads()``, which the sparse kernel also uses): call again with an input of the batch size you
    will serve.

    Args:
        model: the trained model (an ``nn.Module``; a LightningModule works). It is not modified.
        example_input: one input batch (or a tuple of positional arguments) of the shape to optimise for.
        choose: ``"timed"`` (default: fastest measured), ``"sparse"`` or ``"dense"`` for every layer, or a mapping
            layer name -> ``"timed"`` / ``"dense"`` / ``"sparse"`` / ``"sparse-batch-inner"`` (unnamed layers
            are timed). ``"sparse"`` takes the faster measured sparse layout.
        timer: ``timer(layer, candidate, run) -> seconds``, called once per candidate (e.g. :func:`median_timer`),
            and once with the layer name :data:`WHOLE_MODEL` and candidates ``"dense"`` / ``"sparse"``.
            Inject one to force or replay a decision (the tests do). Default: the candidates of a layer are timed
            round-robin, ``repeats`` rounds after a warm-up call each, and their medians compared.
        repeats: timed calls per candidate and layer for the default timing.
        max_density: layers denser than this stay dense without timing the sparse kernel (it loses there; the
            measured crossover is far lower, docs/inference.md §3).
        fuse: fold each eval-mode ``BatchNorm2d`` that only follows a ``Conv2d`` into that conv's weights and bias
            (zeros stay zeros), and apply a ``ReLU`` module that only follows such a conv inside the sparse kernel
            when the conv runs sparse; when some layer runs batch-inner, turn the other eval-mode BatchNorms (and
            the ReLU that only follows one) into :class:`~lightning_sparse.nn.conv_fusion.ChannelAffine`, or into
            the input copy of the sparse conv that is their only user; run a ``ReLU`` module after a residual sum
            that nothing else reads in place (docs/inference.md §2). The model is read with ``torch.fx``; a model
            it cannot trace is converted without fusion (the report says why).
        verbose: print the per-layer table.

    Returns:
        A :class:`SparseInferenceModel` (eval mode, forward under ``torch.no_grad()``) whose ``report`` holds the
        per-layer :class:`InferenceReport`. Without numba installed every layer stays dense (with a warning).

    Raises:
        ValueError: for an unknown ``choose`` value or layer name, or ``max_density`` outside [0, 1].

    Example::

        fast = sparse_inference(load_sparse("model.sparse.pt", cifar_resnet18()), torch.randn(64, 3, 32, 32))
        print(fast.report)        # layer, kind, weight, input, density, dense ms, sparse ms, choice
        logits = fast(images)
    """
    if not 0.0 <= max_density <= 1.0:
        raise ValueError(f"max_density must be in [0, 1], got {max_density}")
    valid = ("timed", "dense", "sparse", "sparse-batch-inner")
    if isinstance(choose, str):
        if choose not in ("timed", "dense", "sparse"):
            raise ValueError(f"choose must be 'timed', 'dense', 'sparse' or a mapping of layer names, got {choose!r}")
        per_layer: Mapping[str, str] = {}
        default = choose
    else:
        per_layer, default = dict(choose), "timed"
        bad = {name: value for name, value in per_layer.items() if value not in valid}
        if bad:
            raise ValueError(f"choose values must be one of {valid}; got {bad}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    work = _copy_model(model)
    work.eval()
    for parameter in work.parameters():
        parameter.requires_grad_(False)
    layers = {name: m for name, m in work.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = sorted(set(per_layer) - set(layers))
    if unknown:
        raise ValueError(f"choose names layers that are not Conv2d/Linear modules of the model: {unknown}")
    have_numba = numba_available()
    if not have_numba:
        warnings.warn(
            "numba is not installed, so every layer stays dense; pip install 'lightning-sparse[inference]'",
            stacklevel=2,
        )
    chains, fusion_note = find_conv_chains(work) if fuse else ({}, "")
    folded = _fold_batchnorms(work, chains)
    preactivated = find_preactivated_convs(work) if fuse else {}
    in_place_relus = find_relus_after_additions(work) if fuse else []
    for name in in_place_relus:
        work.get_submodule(name).inplace = True
    all_dense = copy.deepcopy(work)  # what the whole-model check below compares the converted model against

    affine = _batchnorms_as_affine(work) if fuse and have_numba else {}
    choosers = {
        name: _LayerChooser(name, layer, per_layer.get(name, default), timer, repeats, max_density, have_numba)
        for name, layer in layers.items()
    }
    for name, chooser in choosers.items():
        _set_submodule(work, name, chooser)
    layout_note = ""
    try:
        _run(work, example_input)  # each layer is chosen on its first call, on the input it really gets
    except RuntimeError as error:  # the model's own code may need contiguous activations (x.view(n * c, -1))
        layout_note = f"batch-inner layers return contiguous tensors (with batch-innermost views: {_first_line(error)})"
        for chooser in choosers.values():
            chooser.restart(contiguous_output=True)
        _run(work, example_input)

    fused_relus: list[str] = []
    for name, chooser in choosers.items():
        chosen = chooser.finish()
        relu = chains[name].relu if name in chains else None
        if isinstance(chosen, SparseConv2d) and relu is not None and not _has_hooks(work.get_submodule(relu)):
            chosen.relu = True
            _set_submodule(work, relu, nn.Identity())
            fused_relus.append(relu)
        _set_submodule(work, name, chosen)
    choices = [chooser.record for chooser in choosers.values()]
    if not any(isinstance(m, SparseConv2d) and m.batch_inner for m in work.modules()):
        for name, batchnorm in affine.items():  # only batch-innermost activations need them
            _set_submodule(work, name, batchnorm)
        affine = {}
    input_activations = _apply_input_activations(work, preactivated)

    report = InferenceReport(
        layers=choices,
        threads=torch.get_num_threads(),
        folded_batchnorms=folded,
        fused_relus=fused_relus,
        fusion_note=fusion_note or "",
    )
    report.layout_note = layout_note
    report.affine_batchnorms = [name for name, module in affine.items() if isinstance(module, nn.BatchNorm2d)]
    report.input_activations = input_activations
    report.in_place_relus = in_place_relus
    if report.sparse_layers:
        work = _verify(work, all_dense, example_input, report)
    if report.sparse_layers and not any(layer.reason == "forced" for layer in choices):
        work = _check_whole_model(work, all_dense, example_input, report, timer, repeats)
    if verbose:
        print(report)
    return SparseInferenceModel(work, report)
