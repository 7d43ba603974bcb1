"""Training-step time of MaskInit + DynamicReallocation(dsr) against the same dense training, measured the way users
run it (issues 3 and 14).

For each model (torchvision ResNet-18, and the library's ``CifarResNet(BasicBlock, (3, 3, 3, 3), width=16)``), batch
size and number of torch threads, a dense run and a sparse run (``MaskInit(sparsity)`` +
``DynamicReallocation("dsr", every_n_steps=U, stop_at=1.0)``) train the same model on the same generated 32x32 images
with the same Trainer settings (a CSVLogger at the default ``log_every_n_steps=50``, and the model logging its loss
on every step, as a user's would). Dense and sparse runs alternate (dense, sparse, dense, ...) ``--repeats`` times in
one process, so machine noise falls on both alike.

Every step is timed on its own, from one batch start to the next (so the logger writes, the hooks and the data
loading are inside). Sparse steps are split into *ordinary* steps and *update* steps (those at which DSR ran); the
figures are medians over all timed steps of all repeats:

* ordinary step / dense step;
* update step - dense step, in dense steps (the extra cost of one DSR update);
* amortised at DSR period P: ``((P - 1) x ordinary + update) / P`` over dense, for P = 100 and 1000.

The update period U inside the benchmark is short (default 4) only to sample enough update steps; the amortised
figures use the real periods. A profile (cProfile, ``--profile-steps`` ordinary steps of each arm, ResNet-18 at the
first batch size and thread count) attributes the time above dense to the library's hooks.

Usage::

    python benchmarks/step_overhead.py --repeats 5   # full: 2 models x batch 64/256 x 1/2 threads (about 40 min here)
    python benchmarks/step_overhead.py --quick       # a tiny CNN (about a minute on a loaded machine)
    python benchmarks/step_overhead.py --threads 2 --profile-steps 0 --reuse benchmarks/results/step_overhead.json
        # re-measure the 2-thread rows only, keeping the others (a benchmark run in parts)

Two-thread figures need both cores to themselves: any other job on a 2-core machine makes one of torch's two
threads wait for the other at every operator, which inflates the step several-fold. The hooks-alone table is the
figure to hold against the targets; the end-to-end table shows what a user sees, noise included.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.callbacks import DynamicReallocation, MaskInit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    SGDClassifier,
    add_reuse_and_out_arguments,
    cpu_model,
    markdown_table,
    result_name,
    write_results,
)

MODELS = ("resnet18", "cifar_resnet")
CLOCKS = ("wall", "cpu")
"""Wall time (what users wait for) and the process's CPU time (all its threads; robust to other jobs' load)."""


def make_net(model: str) -> nn.Module:
    """The network of one benchmark model (``tiny`` is the ``--quick`` CNN)."""
    if model == "tiny":
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
        )
    if model == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    if model == "cifar_resnet":
        from lightning_sparse.models import BasicBlock, CifarResNet

        return CifarResNet(BasicBlock, (3, 3, 3, 3), width=16)
    raise ValueError(f"unknown model {model!r}")


MODEL_NAMES = {
    "tiny": "tiny CNN",
    "resnet18": "torchvision resnet18",
    "cifar_resnet": "CifarResNet(BasicBlock, (3, 3, 3, 3), width=16)",
}


class LoggingClassifier(SGDClassifier):
    """:class:`SGDClassifier` that logs its training loss on every step, as users' modules do."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


_TIMED_HOOKS = ("on_before_optimizer_step", "_before_optimizer_step", "_after_optimizer_step", "on_train_batch_end")
"""The library's per-step entry points (Lightning hooks and MaskInit's optimizer step pre/post hooks)."""


class HookClock:
    """Wall time spent inside the library's per-step hooks, per step.

    Wraps :data:`_TIMED_HOOKS` of the given callbacks on the instances (before ``fit``, so the optimizer hooks that
    MaskInit registers at fit start are the wrapped ones). The time above dense that these do not explain is
    Lightning's own (its logging of the callbacks' metrics, the callbacks' dispatch).
    """

    def __init__(self, callbacks: list[L.Callback]) -> None:
        self.seconds = 0.0
        for callback in callbacks:
            for hook in _TIMED_HOOKS:
                method = getattr(callback, hook, None)
                if method is not None and getattr(type(callback), hook, None) is not getattr(L.Callback, hook, None):
                    setattr(callback, hook, self._timed(method))

    def _timed(self, method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed

    def take(self) -> float:
        """The hook seconds since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class PerStepTimer(L.Callback):
    """Times every step from one batch start to the next, and notes which steps ran a DSR update."""

    def __init__(
        self,
        warmup: int,
        reallocation: DynamicReallocation | None,
        profiler: cProfile.Profile | None,
        hook_clock: HookClock | None = None,
    ) -> None:
        self.warmup = warmup
        self.reallocation = reallocation
        self.profiler = profiler
        self.hook_clock = hook_clock
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.hook_times: list[float] = []
        self.updates: list[bool] = []
        self._last: tuple[float, float, int] | None = None

    def _updates(self) -> int:
        return self.reallocation.num_updates if self.reallocation is not None else 0

    def _mark(self, batch_idx: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        hooks = self.hook_clock.take() if self.hook_clock is not None else 0.0
        if self._last is not None and batch_idx > self.warmup:
            self.times.append(now - self._last[0])
            self.cpu_times.append(cpu - self._last[1])
            self.hook_times.append(hooks)
            self.updates.append(self._updates() != self._last[2])
        self._last = (now, cpu, self._updates())

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.profiler is not None and batch_idx > self.warmup:
            self.profiler.disable()
        self._mark(batch_idx)
        if self.profiler is not None and batch_idx >= self.warmup:
            self.profiler.enable()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.profiler is not None:
            self.profiler.disable()
        self._mark(trainer.num_training_batches)


def run(
    model: str, sparse: bool, args: argparse.Namespace, seed: int, steps: int, profiler: cProfile.Profile | None = None
) -> tuple[dict[str, list[float]], list[bool]]:
    """Train ``warmup + steps`` steps; each timed step's seconds (wall, CPU) and whether a DSR update ran in it."""
    L.seed_everything(seed, verbose=False)
    total = args.warmup + steps
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(total * args.batch, 3, args.image_size, args.image_size, generator=generator)
    y = torch.randint(0, 10, (total * args.batch,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch)
    reallocation = None
    callbacks: list[L.Callback] = []
    if sparse:
        reallocation = DynamicReallocation("dsr", every_n_steps=args.every_n_steps, stop_at=1.0)
        callbacks += [MaskInit(sparsity=args.sparsity, seed=seed, layer_report=False), reallocation]
    hook_clock = HookClock(callbacks) if sparse and profiler is None else None
    timer = PerStepTimer(args.warmup, reallocation, profiler, hook_clock)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, logger=CSVLogger(log_dir), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, timer],
        )
        trainer.fit(LoggingClassifier(make_net(model)), loader)
    return {"wall": timer.times, "cpu": timer.cpu_times, "hooks": timer.hook_times}, timer.updates


def measure(model: str, threads: int, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved dense and sparse runs of one configuration; medians, ratios and the per-pair spread."""
    torch.set_num_threads(threads)
    args.batch = batch
    samples: dict[str, dict[str, list[float]]] = {
        clock: {"dense": [], "ordinary": [], "update": []} for clock in CLOCKS
    }
    hooks: dict[str, list[float]] = {"ordinary": [], "update": []}
    pair_ratios: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
    for repeat in range(args.repeats):
        dense_times, _ = run(model, False, args, seed=repeat, steps=args.steps)
        sparse_times, updates = run(model, True, args, seed=repeat, steps=args.steps)
        for clock in CLOCKS:
            ordinary = [t for t, u in zip(sparse_times[clock], updates) if not u]
            samples[clock]["dense"] += dense_times[clock]
            samples[clock]["ordinary"] += ordinary
            samples[clock]["update"] += [t for t, u in zip(sparse_times[clock], updates) if u]
            pair_ratios[clock].append(statistics.median(ordinary) / statistics.median(dense_times[clock]))
        hooks["ordinary"] += [t for t, u in zip(sparse_times["hooks"], updates) if not u]
        hooks["update"] += [t for t, u in zip(sparse_times["hooks"], updates) if u]
    result: dict[str, Any] = {"model": model, "threads": threads, "batch_size": batch, "samples": samples,
                              "hook_samples": hooks, "pair_ratios": pair_ratios}
    for clock in CLOCKS:
        dense_s = statistics.median(samples[clock]["dense"])
        ordinary_s = statistics.median(samples[clock]["ordinary"])
        update_s = statistics.median(samples[clock]["update"]) if samples[clock]["update"] else float("nan")
        figures = {"dense_step_s": dense_s, "ordinary_step_s": ordinary_s, "update_step_s": update_s,
                   "ordinary_ratio": ordinary_s / dense_s, "update_extra_dense_steps": (update_s - dense_s) / dense_s,
                   "pair_ratio_median": statistics.median(pair_ratios[clock]),
                   "pair_ratio_min": min(pair_ratios[clock]), "pair_ratio_max": max(pair_ratios[clock])}
        for period in args.periods:
            figures[f"amortised_{period}"] = ((period - 1) * ordinary_s + update_s) / period / dense_s
        result[clock] = figures
    dense_wall = result["wall"]["dense_step_s"]
    hook_ordinary = statistics.median(hooks["ordinary"])
    hook_update = statistics.median(hooks["update"]) if hooks["update"] else float("nan")
    # The masks do not change the dense kernels' work, so a sparse step is a dense step plus the library's hooks
    # (plus Lightning's handling of the logged metrics): these ratios are not blurred by the machine's run-to-run noise.
    result["hooks"] = {
        "ordinary_ms": hook_ordinary * 1e3,
        "update_ms": hook_update * 1e3,
        "ordinary_ratio": 1.0 + hook_ordinary / dense_wall,
        "update_extra_dense_steps": hook_update / dense_wall,
        **{f"amortised_{p}": 1.0 + ((p - 1) * hook_ordinary + hook_update) / p / dense_wall for p in args.periods},
    }
    return result


_HOOKS = (
    ("mask_init.py", "on_before_optimizer_step"),
    ("masks.py", "mask_grads_"),
    ("dynamic_reallocation.py", "_update"),
    ("mask_init.py", "_after_optimizer_step"),
    ("masks.py", "apply_"),
    ("mask_init.py", "on_train_batch_end"),
    ("dynamic_reallocation.py", "on_train_batch_end"),
    ("module.py", "log_dict"),
    ("module.py", "log"),
)


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """cProfile of ordinary steps of each arm: the library's hooks per step, and the largest per-function deltas."""
    model = "tiny" if args.quick else "resnet18"
    torch.set_num_threads(args.threads[0])
    args.batch = args.batch_sizes[0]
    saved_every = args.every_n_steps
    args.every_n_steps = 10**9  # ordinary steps only
    stats = {}
    try:
        for sparse in (False, True):
            profiler = cProfile.Profile(time.process_time)  # CPU time: descheduling does not count
            run(model, sparse, args, seed=0, steps=args.profile_steps, profiler=profiler)
            stats["sparse" if sparse else "dense"] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    finally:
        args.every_n_steps = saved_every
    steps = args.profile_steps

    def per_function(raw: dict[Any, Any]) -> dict[str, tuple[float, float, int]]:
        table: dict[str, tuple[float, float, int]] = {}
        for (filename, line, name), (_, calls, tottime, cumtime, _) in raw.items():
            key = f"{Path(filename).name}:{line}({name})" if filename != "~" else name
            table[key] = (tottime / steps, cumtime / steps, calls)
        return table

    dense, sparse = per_function(stats["dense"]), per_function(stats["sparse"])
    total = {arm: max(c for _, c, _ in table.values()) for arm, table in (("dense", dense), ("sparse", sparse))}
    hooks = []
    for filename, function in _HOOKS:
        for arm, table in (("dense", dense), ("sparse", sparse)):
            matches = [(key, value) for key, value in table.items() if key.startswith(filename) and
                       key.endswith(f"({function})")]
            cum = sum(value[1] for _, value in matches)
            calls = sum(value[2] for _, value in matches)
            if matches and arm == "sparse":
                dense_cum = sum(v[1] for k, v in dense.items() if k.startswith(filename) and k.endswith(f"({function})"))
                hooks.append({"function": f"{filename}:{function}", "sparse_ms_per_step": cum * 1e3,
                              "dense_ms_per_step": dense_cum * 1e3, "calls_per_step": calls / steps})
    deltas = sorted(
        ({"function": key, "delta_ms_per_step": (sparse.get(key, (0.0,))[0] - dense.get(key, (0.0,))[0]) * 1e3,
          "sparse_ms_per_step": sparse.get(key, (0.0,))[0] * 1e3, "dense_ms_per_step": dense.get(key, (0.0,))[0] * 1e3}
         for key in set(dense) | set(sparse)),
        key=lambda row: -abs(row["delta_ms_per_step"]),
    )[:12]
    return {"model": model, "threads": args.threads[0], "batch_size": args.batch_sizes[0], "steps": steps,
            "dense_step_ms": total["dense"] * 1e3, "sparse_step_ms": total["sparse"] * 1e3, "hooks": hooks,
            "largest_self_time_deltas": deltas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny CNN, few steps (smoke test)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=1, help="dense/sparse run pairs per configuration")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--every-n-steps", type=int, default=4, help="DSR period inside the benchmark (sampling)")
    parser.add_argument("--periods", type=int, nargs="+", default=[100, 1000], help="periods to amortise over")
    parser.add_argument("--profile-steps", type=int, default=4, help="ordinary steps per arm in the profile (0: none)")
    add_reuse_and_out_arguments(
        parser, "keep the rows (and the profile, if this run makes none) of an earlier results JSON for the "
        "configurations this run does not measure"
    )
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats, args.steps, args.warmup, args.batch_sizes, args.image_size = ["tiny"], 2, 6, 2, [8], 16
        args.every_n_steps, args.threads, args.profile_steps = 3, [1], 2
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = [measure(model, threads, batch, args)
               for model in args.models for batch in args.batch_sizes for threads in args.threads]
    summary = profile(args) if args.profile_steps > 0 else None
    total_seconds = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    loads = [[load_before, load_after]]
    if args.reuse is not None:
        earlier = json.loads(args.reuse.read_text())
        measured = {(r["model"], r["threads"], r["batch_size"]) for r in results}
        kept = [r for r in earlier["results"] if (r["model"], r["threads"], r["batch_size"]) not in measured]
        results = sorted(kept + results, key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else -1,
                                                        r["batch_size"], r["threads"]))
        summary = summary if summary is not None else earlier.get("profile")
        total_seconds += earlier.get("total_seconds", 0.0)
        loads = [*earlier.get("load_averages", [earlier.get("load_average", [float("nan")] * 2)]), *loads]

    worst = max(r["hooks"]["ordinary_ratio"] for r in results) - 1.0
    name = result_name("step_overhead", args.quick)
    periods = args.periods
    lines = [
        f"# Training-step time: MaskInit + DynamicReallocation(dsr) vs dense{' (QUICK setting)' if args.quick else ''}",
        "",
        f"Generated 3x{args.image_size}x{args.image_size} images, SGD Nesterov, sparsity {args.sparsity}, CSVLogger "
        f"(log_every_n_steps=50) and the loss logged every step; {args.repeats} interleaved dense/sparse run pair(s) "
        f"per row, {args.warmup} warm-up + {args.steps} timed steps each, every step timed on its own; DSR every "
        f"{args.every_n_steps} steps to sample update steps. Medians over the steps. torch {torch.__version__}, "
        f"lightning {L.__version__}, {cpu_model()}; total {total_seconds / 60:.1f} min"
        f"{f' in {len(loads)} parts (--reuse)' if len(loads) > 1 else ''}; 1-minute load average "
        + "; ".join(f"{before:.1f} at the start and {after:.1f} at the end" for before, after in loads)
        + f" on {os.cpu_count()} cores.",
        "",
        "## End to end",
        "",
        "Whole steps, sparse run over dense run. On a shared or virtual machine one step's time moves by 10-20% from "
        "step to step and from run to run, so these ratios carry that noise: *pairs* gives the lowest and highest "
        "ratio of single dense/sparse run pairs, the spread a single measurement would show.",
        "",
    ]
    header = ["model", "threads", "batch", "dense step (ms)", "ordinary / dense (wall)", "pairs min-max",
              "ordinary / dense (CPU)", "update: extra dense steps", *(f"amortised P={p}" for p in periods),
              "steps d/o/u"]
    rows = []
    for r in results:
        wall, cpu = r["wall"], r["cpu"]
        rows.append([MODEL_NAMES[r["model"]], r["threads"], r["batch_size"], f"{wall['dense_step_s'] * 1e3:.1f}",
                     f"{wall['ordinary_ratio']:.3f}", f"{wall['pair_ratio_min']:.3f}-{wall['pair_ratio_max']:.3f}",
                     f"{cpu['ordinary_ratio']:.3f}", f"{wall['update_extra_dense_steps']:.2f}",
                     *(f"{wall[f'amortised_{p}']:.3f}" for p in periods),
                     "/".join(str(len(r["samples"]["wall"][k])) for k in ("dense", "ordinary", "update"))])
    lines += markdown_table(header, rows)
    lines += [
        "", "## The library's hooks alone", "",
        "Wall time inside MaskInit's and DynamicReallocation's per-step hooks (the gradient masking pass, the "
        "post-step pass where it runs, the DSR update, the change-gated logging), timed in the sparse runs, over the "
        "dense step. The masks do not change what the dense kernels compute, so the sparse step is the dense step plus "
        "this (plus Lightning's handling of the few metrics logged when they change): these figures are free of the "
        "run-to-run noise above.", "",
    ]
    rows = [[MODEL_NAMES[r["model"]], r["threads"], r["batch_size"], f"{r['hooks']['ordinary_ms']:.2f}",
             f"{r['hooks']['ordinary_ratio']:.3f}", f"{r['hooks']['update_ms']:.1f}",
             f"{r['hooks']['update_extra_dense_steps']:.2f}", *(f"{r['hooks'][f'amortised_{p}']:.3f}" for p in periods)]
            for r in results]
    lines += markdown_table(["model", "threads", "batch", "hooks per ordinary step (ms)", "ordinary / dense",
                             "hooks per update step (ms)", "update: extra dense steps",
                             *(f"amortised P={p}" for p in periods)], rows)
    lines += ["", "Targets (issue 14): ordinary step and amortised at P=100 at most 1.03x dense; a DSR update step at "
              "most 0.3 dense steps extra."]
    if summary is not None:
        lines += [
            "", f"## Profile: where the time above dense goes ({MODEL_NAMES[summary['model']]}, batch "
            f"{summary['batch_size']}, {summary['threads']} thread(s), cProfile over {summary['steps']} ordinary steps "
            "per arm)", "",
            f"Whole step under cProfile: dense {summary['dense_step_ms']:.1f} ms, sparse {summary['sparse_step_ms']:.1f} "
            "ms of CPU time. The library's hooks (cumulative CPU time per step; nested entries are inside the one above them):", "",
        ]
        lines += markdown_table(["hook", "sparse (ms/step)", "calls/step"],
                                [[h["function"], f"{h['sparse_ms_per_step']:.2f}", f"{h['calls_per_step']:.1f}"]
                                 for h in summary["hooks"]])
        lines += ["", "The profiled steps end with the epoch, so the per-epoch work (MaskInit's per-layer density "
                  "logging, about 25 `log` calls, the non-finite repair pass, the heatmap record) is divided over them "
                  "here: that is the sparse arm's extra `log` calls and the isfinite/deepcopy rows below; in training "
                  "it is paid once per epoch."]
        lines += ["", "Largest per-function differences in self time (sparse - dense, ms/step; forward/backward "
                  "kernels differ by noise only, the masks do not change the dense kernels' work):", ""]
        lines += markdown_table(["function", "sparse - dense", "sparse", "dense"],
                                [[d["function"], f"{d['delta_ms_per_step']:+.2f}", f"{d['sparse_ms_per_step']:.2f}",
                                  f"{d['dense_ms_per_step']:.2f}"] for d in summary["largest_self_time_deltas"]])
    write_results(args.out, name, {"quick": args.quick, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
                                   "results": results, "profile": summary, "overhead": worst,
                                   "total_seconds": total_seconds,
                                   "load_averages": loads}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
