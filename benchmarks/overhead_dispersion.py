"""What ``GradientDispersion`` every step costs: time and peak memory as ratios to plain training.

    python benchmarks/overhead_dispersion.py                        # all models, 5 rounds
    python benchmarks/overhead_dispersion.py --models mlp,cnn --rounds 7 --out bench_out/dispersion.md
    python benchmarks/overhead_dispersion.py --child mlp dispersion  # one run, prints JSON
    python benchmarks/overhead_dispersion.py --device cuda --suite   # the CUDA rows (benchmarks/cuda_check.sh)

Every run is a fresh Python process (one thread: ``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``) that builds the model and its in-memory batches, then calls a real
``lightning.pytorch.Trainer.fit`` (TensorBoard logger in a temporary folder, ``log_every_n_steps=50``,
no checkpointing, no validation, no progress bar) for ``warmup + steps`` optimizer steps:

* ``plain`` — no callback;
* ``dispersion`` — ``GradientDispersion()`` (``backend="auto"``, every step), or
  ``GradientDispersion(backend="functorch")`` for the 5.6 M-parameter MLP (default memory budget);
* ``raw-plain`` / ``raw-hooks`` (``--raw``, MLP and CNN): the same step in a hand-written loop
  without Lightning, with ghost-norm hooks attached, armed and read every step in the second;
* ``plain-val`` / ``suite`` (``--suite``): the whole default suite of ``configs/digits_mlp.yaml``
  (its ``trainer.callbacks``, ``overhead_budget=0.2`` included) against no callbacks, both with
  epochs of ``--epoch-steps`` steps and a 4-batch validation set (the suite's probes and bounds
  run at epoch ends); the time per step then includes validation and every probe.

Rounds: every round runs every (model, configuration) once, the two configurations of a model
back to back in an order that alternates from round to round; each ratio is taken against the
same round's ``plain`` run, and the tables give the median of the per-round ratios and their
min–max.

Time: wall time per optimizer step from the start of step ``warmup`` to the end of training
(``StepTimer``), i.e. everything Lightning and the callback do per step.

Peak memory: just before ``trainer.fit`` the child trims the heap (``malloc_trim``), notes its
resident set ``VmRSS`` and resets the kernel's high-water mark (``/proc/self/clear_refs``); after
``fit`` it reads ``VmHWM``.  **Peak growth = VmHWM − VmRSS(before fit)**: how far training pushed
the resident set above what the process held with the model and data built and every library
imported (imports happen before the baseline in both configurations).  It includes gradients,
activations, the callback's work buffers and per-sample gradients, the loss contract's trial
step, Lightning's own allocations and allocator caching.  The whole-process peak
(``ru_maxrss``, interpreter and libraries included) is reported too; its ratio is diluted by
the ~0.8 GiB the libraries occupy.

``--calibrate-before`` (CPU): each process also times the calibration before ``fit`` (see
``_calibrate``), and the tables add the ratio adjusted by that — each process's speed before the
callback ran — and each configuration's speed after ``fit`` over before it (a plain process runs
its model faster after its fit, a dispersion process did not: the after-``fit`` adjustment then
flatters the dispersion). It pre-faults memory before the peak-growth baseline: for time runs.

``--steady-heap`` (CPU, fresh processes): every child runs with glibc's trim and mmap thresholds
fixed (``STEADY_HEAP_ENV``), for time runs. By default glibc moves both thresholds up with the
largest block freed, and trims its heap's top whenever more than the trim threshold lies free
there; some processes then fall into a state where the top is trimmed and grown again every step
(``brk`` down and up by ~4 MiB on the MLP), and every re-grown page faults in again: up to ~200
minor page faults and ~1 ms a step on the MLP, plain or measured, chosen at random by where the
process's blocks landed. The tables give each configuration's faults per timed step. On the MLP
(36 rounds, docs/results/overhead.md) a steady heap took the faults away (measured processes 1.3
faults a step against 16–28 by default, plain 0.2 against 1–3) but not the spread of the
per-round ratios, nor the ratio: 1.124× against 1.120× by default.

``--in-process`` (CPU): every fit in this process instead, as on CUDA (fresh model and callbacks
each time; the order still alternates), for time only: the machine's slow and fast states then hit
both sides alike. ``--mmap-threshold BYTES`` (fresh processes): every child runs with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed, which stops the threshold from moving up with the block sizes a
run frees; what the peak growth then measures is close to the memory live at the peak, without the
heap's placement of a step's blocks (docs/results/mlp_memory_cpu.md).

CUDA (``--device cuda``): the CUDA models (ResNet-18 with GroupNorm and with BatchNorm, the CNN,
batch 128; then ResNet-18 with GroupNorm measured every 4th step, and at 224×224 with batch 32;
host batches in pinned memory, copied to the device by Lightning) run in this process, one
``Trainer.fit`` after another (fresh model each time); peak
memory is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
``memory_allocated()`` before ``fit``; the step timer synchronizes at both ends.  Without a CUDA
device the script prints "not measured" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from common import (  # noqa: E402
    quiet_child,
    calibrated_ratio,
    emit_report,
    FitTimer,
    PeakRSS,
    StepTimer,
    TinyTransformer,
    count_parameters,
    describe_machine_md,
    fmt_ci,
    fmt_ratio,
    load_average,
    machine_description,
    random_image_batches,
    random_token_batches,
    ratio_stats,
    resnet18_torchvision,
    run_json_child,
    sample_loader,
    verdict,
)


@dataclass
class Spec:
    title: str
    build: Callable[[], nn.Module]
    batches: Callable[[], list[tuple[Tensor, Tensor]]]
    steps: int
    warmup: int
    dispersion: dict  # GradientDispersion kwargs of the "dispersion" configuration
    device: str = "cpu"


def _mlp() -> nn.Module:
    from genbounds.models import MLP

    return MLP(784, 10, hidden=512, depth=2)


def _mlp_big() -> nn.Module:
    from genbounds.models import MLP

    return MLP(784, 10, hidden=2000, depth=2)  # 784·2000 + 2000² + 2000·10 + biases = 5.59 M


def _cnn() -> nn.Module:
    from genbounds.models import AlexNetSmall

    return AlexNetSmall(3, 10, width=1.0)


SPECS: dict[str, Spec] = {
    "mlp": Spec("MLP 784-512-512-10, batch 128", _mlp, lambda: random_image_batches(8, 128, (784,), 10, torch.device("cpu")),
                300, 30, {}),
    "mlp-every4": Spec("MLP 784-512-512-10, batch 128, `every_n_steps=4` (the cost model of a strided dispersion: "
                       "1 + (every-step ratio − 1)/4 if unmeasured steps are free)", _mlp,
                       lambda: random_image_batches(8, 128, (784,), 10, torch.device("cpu")), 300, 30,
                       {"every_n_steps": 4}),
    "cnn": Spec("AlexNet-style CNN of Wang & Mao (`genbounds.models.AlexNetSmall`, width 1: conv 64-192-384-256-256, "
                "FC 4096-4096-10), 32×32×3, batch 64", _cnn,
                lambda: random_image_batches(4, 64, (3, 32, 32), 10, torch.device("cpu")), 12, 3, {}),
    "resnet18": Spec("torchvision ResNet-18 (train-mode BatchNorm), 32×32×3, batch 16", resnet18_torchvision,
                     lambda: random_image_batches(4, 16, (3, 32, 32), 10, torch.device("cpu")), 30, 5, {}),
    "transformer": Spec("Transformer: Embedding(1000, 64) + nn.TransformerEncoder (2 layers, d=64, 4 heads, FF 256) "
                        "+ mean-pool + Linear, 32 tokens, batch 32", TinyTransformer,
                        lambda: random_token_batches(8, 32, 32, 1000, 10), 100, 10, {}),
    "transformer-sf": Spec("Transformer as above but sequence-first (`batch_first=False`, tokens turned to [T, b] "
                           "before the embedding, as in PyTorch's tutorials), 48 tokens, batch 32",
                           lambda: TinyTransformer(batch_first=False),
                           lambda: random_token_batches(8, 32, 48, 1000, 10), 100, 10, {}),
    "mlp5.6m": Spec("MLP 784-2000-2000-10 (5.59 M parameters), batch 128, `backend=\"functorch\"` "
                    "(default memory budget)", _mlp_big,
                    lambda: random_image_batches(4, 128, (784,), 10, torch.device("cpu")), 3, 1,
                    {"backend": "functorch"}),
    # CUDA rows (benchmarks/cuda_check.sh)
    "cuda-resnet18-gn": Spec("CUDA: torchvision ResNet-18 with GroupNorm(32) in place of BatchNorm, 32×32×3, batch 128",
                             lambda: resnet18_torchvision(norm="group"),
                             lambda: random_image_batches(8, 128, (3, 32, 32), 10, torch.device("cpu")), 200, 30, {}, "cuda"),
    "cuda-resnet18-bn": Spec("CUDA: torchvision ResNet-18 (train-mode BatchNorm), 32×32×3, batch 128",
                             resnet18_torchvision,
                             lambda: random_image_batches(8, 128, (3, 32, 32), 10, torch.device("cpu")), 200, 30, {}, "cuda"),
    "cuda-cnn": Spec("CUDA: AlexNet-style CNN of Wang & Mao (width 1), 32×32×3, batch 128", _cnn,
                     lambda: random_image_batches(8, 128, (3, 32, 32), 10, torch.device("cpu")), 200, 30, {}, "cuda"),
    # the two readings the H200 run left open (docs/results/cuda_h200/README.md): a host-bound
    # step measured every 4th step (estimate: 1 + 1.1/4), and a step the GPU bounds (224×224)
    "cuda-resnet18-gn-every4": Spec("CUDA: ResNet-18 with GroupNorm as above, `every_n_steps=4`",
                                    lambda: resnet18_torchvision(norm="group"),
                                    lambda: random_image_batches(8, 128, (3, 32, 32), 10, torch.device("cpu")),
                                    200, 30, {"every_n_steps": 4}, "cuda"),
    "cuda-resnet18-gn-224": Spec("CUDA: ResNet-18 with GroupNorm, 224×224×3, batch 32",
                                 lambda: resnet18_torchvision(norm="group"),
                                 lambda: random_image_batches(4, 32, (3, 224, 224), 10, torch.device("cpu")),
                                 60, 10, {}, "cuda"),
}
TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    # (model, quantity) → (description, limit on the median per-round ratio)
    ("mlp", "time"): ("dispersion every step, time ≤ 1.10× plain", 1.10),
    ("mlp", "memory"): ("dispersion every step, peak growth ≤ 1.2× plain", 1.2),
    ("cnn", "time"): ("dispersion every step, time ≤ 1.25× plain", 1.25),
    ("cnn", "memory"): ("dispersion every step, peak growth ≤ 1.2× plain", 1.2),
    ("mlp5.6m", "memory"): ("functorch, peak ≤ 2× plain", 2.0),
    ("cuda-resnet18-gn", "time"): ("dispersion every step, time ≤ 1.05× plain", 1.05),
}
STEADY_HEAP_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}
"""``--steady-heap``: glibc keeps up to 1 GiB free at its heap's top instead of trimming it, and
serves blocks up to 32 MiB (its largest mmap threshold) from the heap. Either variable alone fixes
both thresholds (glibc then stops moving them): the trim threshold at 128 KiB by default, which
would make every process trim every step."""

CPU_MODELS = ("mlp", "cnn", "resnet18", "transformer", "transformer-sf", "mlp5.6m")
CUDA_MODELS = ("cuda-resnet18-gn", "cuda-resnet18-bn", "cuda-cnn", "cuda-resnet18-gn-every4", "cuda-resnet18-gn-224")
SUITE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits_mlp.yaml")
RAW_MODELS = ("mlp", "cnn")


# ------------------------------------------------------------------------------------- child


def suite_callbacks(config: str = SUITE_CONFIG) -> list:
    """The callbacks of ``config``'s ``trainer.callbacks``, instantiated from their
    ``class_path``/``init_args`` (the default suite of the main job)."""
    import importlib

    import yaml

    with open(config) as fh:
        cfg = yaml.safe_load(fh)
    out = []
    for item in cfg["trainer"]["callbacks"]:
        module, _, name = item["class_path"].rpartition(".")
        out.append(getattr(importlib.import_module(module), name)(**(item.get("init_args") or {})))
    return out


def child(model_name: str, config: str, steps: int, warmup: int, log_every: int = 50, epoch_steps: int = 50,
          probe: Any = None, calibrate_before: bool = False) -> dict:
    """One run (a fresh process on CPU); returns the measurements. ``probe``: a callback placed
    first in the trainer's list, whose ``summary()`` (read right after ``fit``, before anything
    else runs) is returned as ``"probe"`` (``benchmarks/memory_breakdown.py``).
    ``calibrate_before``: also time the calibration before ``fit`` (``calib_before_ms``; CPU,
    plain and dispersion runs), which pre-faults memory before the peak-growth baseline — for
    time runs."""

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    import genbounds.callbacks  # noqa: F401  (import everything before the memory baseline)
    from genbounds.callbacks import GradientDispersion
    from genbounds.estimators.ghost_norms import GhostNormHooks
    from genbounds.models import Classifier

    try:
        import backpack  # noqa: F401
        import torch.func  # noqa: F401
    except ImportError:
        pass
    quiet_child()
    spec = SPECS[model_name]
    cuda = spec.device == "cuda"
    pl.seed_everything(0, verbose=False)
    batches = spec.batches()
    network = spec.build()
    out: dict = {"model": model_name, "config": config, "params": count_parameters(network), "steps": steps,
                 "warmup": warmup}
    if calibrate_before and not cuda and config in ("plain", "dispersion"):
        out["calib_before_ms"] = _calibrate(network, batches[0], max(3, min(30, warmup)))

    if config.startswith("raw-"):
        out.update(_raw_loop(network.to(spec.device), batches, steps, warmup, hooks=config == "raw-hooks",
                             hook_cls=GhostNormHooks))
    else:
        module = Classifier(network, num_classes=10, lr=0.01)
        callbacks: list = []
        disp = None
        if config == "dispersion":
            disp = GradientDispersion(**spec.dispersion)
            callbacks.append(disp)
        elif config == "suite":
            callbacks = suite_callbacks()
            disp = next((c for c in callbacks if isinstance(c, GradientDispersion)), None)
        with_val = config in ("suite", "plain-val")
        fit_timer, step_timer = FitTimer(), StepTimer(warmup)
        with tempfile.TemporaryDirectory() as logdir:
            trainer = pl.Trainer(
                accelerator="gpu" if cuda else "cpu", devices=1, max_steps=warmup + steps,
                logger=TensorBoardLogger(logdir, name="b"), enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=4 if with_val else 0,
                log_every_n_steps=log_every,
                callbacks=[*([probe] if probe is not None else []), fit_timer, *callbacks, step_timer])
            if with_val:  # epochs of `epoch_steps` steps; the validation set: 4 more batches of the same shape
                train_loader = sample_loader(batches, epoch_steps, pin_memory=cuda)
                val_batches = [(x.roll(1, 0), y.roll(1, 0)) for x, y in batches]
                loaders = {"train_dataloaders": train_loader,
                           "val_dataloaders": sample_loader(val_batches, 4, pin_memory=cuda)}
            else:
                loaders = {"train_dataloaders": sample_loader(batches, warmup + steps + 8, pin_memory=cuda)}
            if cuda:
                import gc

                gc.collect()  # the runs before share this process: what they left in reference cycles goes first
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                trainer.fit(module, **loaders)
                torch.cuda.synchronize()
                out["peak_growth_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                out["base_mib"] = base / 2**20
            else:
                with PeakRSS() as peak:
                    trainer.fit(module, **loaders)
                if probe is not None:
                    out["probe"] = probe.summary()
                out["peak_growth_mib"] = peak.growth_mib
                out["file_growth_mib"] = peak.file_growth_mib
                out["base_mib"] = (peak.base_kib or 0) / 1024
        out["ms_per_step"] = 1e3 * step_timer.seconds_per_step
        out["faults_per_step"] = step_timer.faults_per_step
        if not cuda and config in ("plain", "dispersion"):  # after fit: the memory baseline stays as it was
            out["calib_ms"] = _calibrate(network, batches[0], max(3, min(30, warmup)))
        out["fit_s"] = fit_timer.seconds
        if disp is not None:
            out["backend"] = disp.active_backend
            out["description"] = disp.impl.description if disp.impl is not None else ""
            out["measured_steps"] = disp.measured_steps
        budget = trainer.__dict__.get("_genbounds_overhead")
        if budget is not None:
            out["probe_s"] = budget.probe_time
            out["deferred"] = budget.deferred
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load"] = load_average()
    return out


def _calibrate(network: nn.Module, batch: tuple, steps: int) -> float:
    """Milliseconds per forward and backward of ``network`` on ``batch`` (median of ``steps``), run
    after ``fit`` in every Lightning run of a CPU model (the callbacks have removed their hooks at
    teardown; before ``fit`` it would pre-fault memory and lower the peak-growth baseline): the
    process's own speed.  This machine has slow states that last a whole process (the suite's speed-adjusted
    ratio, ``common.speed_adjusted``); dividing a run's step time by its own calibration takes them
    out of the ratio.  The weights are not stepped, the buffers (BatchNorm statistics) and the RNG
    are restored and the gradients dropped, so the training that follows is the same."""
    import torch.nn.functional as F

    x, y = batch
    saved = {k: v.clone() for k, v in network.state_dict().items()}
    times = []
    with torch.random.fork_rng():
        for _ in range(steps):
            t0 = time.perf_counter()
            F.cross_entropy(network(x), y).backward()
            times.append(time.perf_counter() - t0)
            network.zero_grad(set_to_none=True)
    network.load_state_dict(saved)
    return 1e3 * statistics.median(times)


def before_adjusted_ratio(run: dict, plain: dict) -> float:
    """``(step / calibration before fit)`` of ``run`` over that of ``plain`` (NaN without one)."""
    return calibrated_ratio(run, plain, key="calib_before_ms")


def speed_adjusted_ratios(runs: list[dict], base: list[dict]) -> list[float]:
    """Per-round ``(step / calibration)`` of ``runs`` over that of ``base`` (rounds without a
    calibration are left out)."""
    ratios = (calibrated_ratio(r, b) for r, b in zip(runs, base))
    return [x for x in ratios if math.isfinite(x)]


def raw_mlp() -> tuple[list, nn.Module, torch.optim.Optimizer]:
    """The MLP of ``SPECS["mlp"]`` for a hand-written loop: its batches, the model (seed 0) and a
    plain SGD optimizer (``piece_norms_in_situ.py``, ``capture_routes.py``)."""
    spec = SPECS["mlp"]
    torch.manual_seed(0)
    batches = spec.batches()
    model = spec.build()
    return batches, model, torch.optim.SGD(model.parameters(), lr=0.01)


def raw_step(model: nn.Module, batches: list, hooks: bool, hook_cls,
             marks: list[tuple[str, float]] | None = None) -> Callable[[int], None]:
    """One training step of batch ``i``: forward, mean cross-entropy, backward, SGD step; with
    ``hooks``, ghost-norm hooks attached once, armed, and reduced to the logged vector after every
    backward as the callback does (per-module sums by ``read_sums``, per-layer ``‖ḡ_k‖²`` by
    ``grouped_sq_norms``, the values by ``dispersion_row``). With ``marks``, each phase's end is
    appended as ``(phase, perf_counter())``, after a ``("start", …)``. Used by :func:`_raw_loop`,
    ``benchmarks/step_blocks.py`` and ``benchmarks/hook_split.py``."""
    import torch.nn.functional as F

    from genbounds.estimators.functional import grouped_sq_norms
    from genbounds.estimators.gradient_dispersion import dispersion_row

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    device = next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    h = None
    if hooks:
        h = hook_cls.for_model(model)
        h.attach()
        # one group per module, as the callback's default grouping
        owners = [n.rsplit(".", 1)[0] for n, _ in named]
        layers = list(dict.fromkeys(owners))
        groups = [[i for i, o in enumerate(owners) if o == layer] for layer in layers]
        to_group = torch.zeros(len(layers), len(h.module_names), dtype=torch.float64, device=device)
        for j, name in enumerate(h.module_names):
            to_group[layers.index(name), j] = 1.0
    sink: list[Tensor | None] = [None]

    mark = (lambda phase: None) if marks is None else (lambda phase: marks.append((phase, time.perf_counter())))

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        x, y = x.to(device), y.to(device)
        b = x.shape[0]
        opt.zero_grad(set_to_none=True)
        mark("start")
        if h is not None:
            h.arm()
            mark("arm")
        loss = F.cross_entropy(model(x), y)
        mark("forward")
        loss.backward()
        mark("backward")
        if h is not None:
            group_sq = to_group @ h.read_sums(scale=b)
            mark("read sums")
            mean_sq = grouped_sq_norms([p.grad for p in params], groups)
            mark("‖ḡ_k‖²")
            sink[0] = dispersion_row(group_sq, mean_sq[:-1], b, b)  # kept on the device, as the callback does
            mark("row")
        opt.step()
        mark("optimizer step")

    return step


def _raw_loop(model: nn.Module, batches: list, steps: int, warmup: int, hooks: bool, hook_cls) -> dict:
    """:func:`raw_step` ``warmup + steps`` times; the last ``steps`` timed."""
    step = raw_step(model, batches, hooks, hook_cls)
    with PeakRSS() as peak:
        for i in range(warmup):
            step(i)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        seconds = time.perf_counter() - t0
    return {"ms_per_step": 1e3 * seconds / steps, "peak_growth_mib": peak.growth_mib,
            "base_mib": (peak.base_kib or 0) / 1024, "backend": "ghost hooks (raw loop)" if hooks else None}


# ------------------------------------------------------------------------------------- parent


def config_groups(model_name: str, raw: bool, suite: bool | set[str]) -> list[list[str]]:
    """Groups of configurations run back to back; the first of each group is the others' baseline."""
    groups = [["plain", "dispersion"]]
    if raw and model_name in RAW_MODELS:
        groups.append(["raw-plain", "raw-hooks"])
    if suite is True or (isinstance(suite, set) and model_name in suite):
        groups.append(["plain-val", "suite"])
    return groups


def configs_of(model_name: str, raw: bool, suite: bool | set[str]) -> list[tuple[str, str]]:
    """(configuration, its baseline) pairs of one model."""
    return [(c, g[0]) for g in config_groups(model_name, raw, suite) for c in g]


def measure(models: list[str], rounds: int, raw: bool, suite: bool | set[str], steps_scale: float, in_process: bool,
            epoch_steps: int, on_round: Callable[[dict, list, dict, int], None] | None = None,
            child_env: dict[str, str] | None = None, calibrate_before: bool = False) -> tuple[dict, list[str], dict]:
    """Every round runs every (model, configuration); ``on_round(results, loads, failed, rounds_done)``
    after each (the CUDA script writes its tables then, so a run stopped by its time limit keeps the
    rounds it finished).  In one process (CUDA) a run that raises is reported in ``failed`` and its
    configuration dropped (the earlier rounds' runs too, so the rounds stay paired; a baseline's
    whole group with it); in fresh processes it stops the benchmark, as before."""
    results: dict[tuple[str, str], list[dict]] = {}
    failed: dict[tuple[str, str], str] = {}
    loads = [load_average()]
    here = os.path.abspath(__file__)
    for r in range(rounds):
        for m in models:
            spec = SPECS[m]
            steps = max(2, int(round(spec.steps * steps_scale)))
            for group in config_groups(m, raw, suite):
                order = group[r % len(group):] + group[:r % len(group)]  # rotates from round to round
                for config in order:
                    if (m, config) in failed:
                        continue
                    if in_process:
                        try:
                            res = child(m, config, steps, spec.warmup, epoch_steps=epoch_steps,
                                        calibrate_before=calibrate_before)
                        except Exception as err:  # noqa: BLE001 — reported in the tables, the others go on
                            import traceback

                            traceback.print_exc()
                            failed[(m, config)] = f"round {r + 1}: {type(err).__name__}: {str(err)[:300]}"
                            results.pop((m, config), None)
                            if config == group[0]:  # a baseline: its group's ratios cannot be taken
                                for other in group[1:]:
                                    failed.setdefault((m, other), f"round {r + 1}: its baseline {config} raised")
                                    results.pop((m, other), None)
                            if torch.cuda.is_available():
                                torch.cuda.empty_cache()
                            continue
                    else:
                        res = run_json_child([here, "--child", m, config, "--steps", str(steps), "--warmup",
                                              str(spec.warmup), "--epoch-steps", str(epoch_steps),
                                              *(["--calibrate-before"] if calibrate_before else [])], env=child_env)
                    results.setdefault((m, config), []).append(res)
                    print(f"[round {r + 1}/{rounds}] {m:16s} {config:10s} {res['ms_per_step']:9.2f} ms/step  "
                          f"peak +{res['peak_growth_mib']:7.1f} MiB  backend={res.get('backend')}  "
                          f"load {load_average()}", file=sys.stderr, flush=True)
        loads.append(load_average())
        if on_round is not None:
            on_round(results, loads, failed, r + 1)
    return results, loads, failed


def tables(results: dict, models: list[str], raw: bool, suite: bool | set[str]) -> str:
    lines = ["| model | configuration | backend | median ms / step | time ratio to plain: median [min–max] | "
             "peak growth MiB (median) | peak-growth ratio: median [min–max] | whole-process peak ratio (median) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for m in models:
        for config, base in configs_of(m, raw, suite):
            if (m, config) not in results or (m, base) not in results:  # a failed run (`measure`)
                continue
            runs, base_runs = results[(m, config)], results[(m, base)]
            t = [x["ms_per_step"] for x in runs]
            tb = [x["ms_per_step"] for x in base_runs]
            g = [x["peak_growth_mib"] for x in runs]
            gb = [x["peak_growth_mib"] for x in base_runs]
            # whole-process peak: ru_maxrss on CPU; on CUDA the device's peak allocated memory
            w = [x["base_mib"] + x["peak_growth_mib"] if SPECS[m].device == "cuda" else x["maxrss_mib"] for x in runs]
            wb = [x["base_mib"] + x["peak_growth_mib"] if SPECS[m].device == "cuda" else x["maxrss_mib"]
                  for x in base_runs]
            label = {"plain": "plain (Lightning)", "dispersion": "GradientDispersion(" + ", ".join(
                f"{k}={v!r}" for k, v in SPECS[m].dispersion.items()) + ")"
                + ("" if "every_n_steps" in SPECS[m].dispersion else " every step"),
                "raw-plain": "plain (raw loop)", "raw-hooks": "ghost hooks + dispersion (raw loop)",
                "plain-val": "plain, with validation each epoch", "suite": "default suite of digits_mlp.yaml"}[config]
            backend = runs[0].get("backend") or "–"
            lines.append(f"| {m} | {label} | {backend} | {statistics.median(t):.2f} | {fmt_ratio(ratio_stats(t, tb))} | "
                         f"{statistics.median(g):.1f} | {fmt_ratio(ratio_stats(g, gb))} | "
                         f"{statistics.median([a / b for a, b in zip(w, wb)]):.3f}× |")
    adjusted = []
    for m in models:
        rs = speed_adjusted_ratios(results.get((m, "dispersion"), []), results.get((m, "plain"), []))
        if rs:
            adjusted.append(f"* {m}: {statistics.median(rs):.3f}× [{min(rs):.3f}–{max(rs):.3f}] over {len(rs)} rounds "
                            f"(95 % CI of the median {fmt_ci(rs)})")
    if adjusted:
        lines += ["", "Speed-adjusted dispersion/plain (each run's step time over its own forward-and-backward "
                  "calibration after `fit`, `_calibrate`: the process's slow state taken out):", *adjusted]
    before = []
    for m in models:
        d, p = results.get((m, "dispersion"), []), results.get((m, "plain"), [])
        pairs = [(a, b) for a, b in zip(d, p) if a.get("calib_before_ms") and b.get("calib_before_ms")]
        if pairs:
            rs = [before_adjusted_ratio(a, b) for a, b in pairs]
            drift = {name: [x["calib_ms"] / x["calib_before_ms"] for x in runs if x.get("calib_before_ms")]
                     for name, runs in (("plain", p), ("dispersion", d))}
            before.append(f"* {m}: {fmt_ci(rs)} over {len(rs)} rounds; the process's own forward and backward "
                          f"after `fit` over before it: plain {fmt_ci(drift['plain'])}, "
                          f"dispersion {fmt_ci(drift['dispersion'])}")
    if before:
        lines += ["", "Adjusted by the calibration *before* `fit` instead (`--calibrate-before`: each process's speed "
                  "before the callback ran, so an after-effect of the fit on the process is not divided out):", *before]
    faults = []
    for m in models:
        for config, _ in [("plain", None), *configs_of(m, raw, suite)]:
            fs = [x["faults_per_step"] for x in results.get((m, config), []) if "faults_per_step" in x]
            if fs and not any(line.startswith(f"* {m}, {config}:") for line in faults):
                faults.append(f"* {m}, {config}: {statistics.median(fs):.1f} [{min(fs):.1f}–{max(fs):.1f}]")
    if faults:
        lines += ["", "Minor page faults per timed step, median [min–max] over the runs (the process's pages "
                  "faulted in between the timer's ends; tens to hundreds a step are the heap trimmed and grown "
                  "again every step, a state some processes fall into; `--steady-heap` prevents it):", *faults]
    files = []
    for m in models:
        for config, base in configs_of(m, raw, suite):
            fg = [x.get("file_growth_mib", float("nan")) for x in results.get((m, config), [])]
            fb = [x.get("file_growth_mib", float("nan")) for x in results.get((m, base), [])]
            if config in ("dispersion", "suite") and fg and fb and not any(math.isnan(v) for v in fg + fb):
                files.append(f"* {m}, {config}: {statistics.median(fg):.1f} MiB against {statistics.median(fb):.1f} "
                             f"for {base} (medians)")
    if files:
        lines += ["", "Beside the peak growth, the file-backed resident set `fit` added by its end (`RssFile` after "
                  "less before, not at the peak: mostly code pages of library kernels run for the first time; "
                  "shared between processes and reclaimable, `common.PeakRSS`):", *files]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated (default: every model of --device), from {', '.join(SPECS)}")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--raw", action="store_true", help="also time the raw loop (MLP and CNN)")
    parser.add_argument("--suite", action="store_true", help="also time the default suite (plain-val vs suite)")
    parser.add_argument("--suite-models", default=None, help="models the --suite rows run for (default: all)")
    parser.add_argument("--epoch-steps", type=int, default=50, help="steps per epoch of the suite runs")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every model's timed steps")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: every fit in this process (fits alternating, as on CUDA): time only, the "
                             "machine's slow states shared by both sides; peak memory is then not reported")
    parser.add_argument("--mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="CPU, fresh processes: run every child with MALLOC_MMAP_THRESHOLD_=BYTES (glibc's "
                             "moving mmap threshold fixed: peak growth without the allocator's placement)")
    parser.add_argument("--steady-heap", action="store_true",
                        help="CPU, fresh processes: run every child with glibc's trim and mmap thresholds fixed "
                             f"({', '.join(f'{k}={v}' for k, v in STEADY_HEAP_ENV.items())}): no process trims its "
                             "heap's top and grows it again every step (time runs; see the docstring)")
    parser.add_argument("--calibrate-before", action="store_true",
                        help="CPU: also calibrate each process before fit and report the ratio adjusted by that "
                             "(pre-faults memory before the peak-growth baseline: for time runs)")
    parser.add_argument("--out", default=None, help="also write the Markdown to this file")
    parser.add_argument("--json", default=None, help="also write every run's measurements to this JSON file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-every", type=int, default=50, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        m, config = args.child
        spec = SPECS[m]
        res = child(m, config, args.steps or spec.steps, spec.warmup if args.warmup is None else args.warmup,
                    log_every=args.log_every, epoch_steps=args.epoch_steps, calibrate_before=args.calibrate_before)
        print(json.dumps(res))
        return
    if args.in_process and (args.mmap_threshold or args.steady_heap):
        parser.error("--mmap-threshold and --steady-heap apply to fresh processes only (not with --in-process)")
    if args.mmap_threshold and args.steady_heap:
        parser.error("--steady-heap fixes the mmap threshold itself: not with --mmap-threshold")
    if args.device == "cuda" and not torch.cuda.is_available():
        emit_report("CUDA rows: not measured (torch.cuda.is_available() is False on this machine).", args.out)
        return
    default = CUDA_MODELS if args.device == "cuda" else CPU_MODELS
    models = [m.strip() for m in (args.models or ",".join(default)).split(",") if m.strip()]
    for m in models:
        if SPECS[m].device != args.device:
            raise SystemExit(f"model {m!r} is a {SPECS[m].device} model; pass --device {SPECS[m].device}")
    info = machine_description()
    if args.device == "cuda":
        info["cpu"] += f"; GPU {torch.cuda.get_device_name(0)}"
    # CUDA: one process (device memory is measured by the allocator, not the resident set)
    suite_models = set(models if not args.suite_models else args.suite_models.split(",")) if args.suite else set()

    def write(results: dict, loads: list, failed: dict, rounds_done: int) -> None:  # after every round
        emit_report(report(args, models, suite_models, info, results, loads, failed, rounds_done), args.out,
                    args.json, {"machine": info, "loads": loads, "rounds": rounds_done,
                                "failed": {f"{m}|{c}": v for (m, c), v in failed.items()},
                                "runs": {f"{m}|{c}": v for (m, c), v in results.items()}},
                    quiet=rounds_done < args.rounds)

    child_env = ({"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)} if args.mmap_threshold else
                 dict(STEADY_HEAP_ENV) if args.steady_heap else None)
    measure(models, args.rounds, args.raw, suite_models, args.steps_scale,
            in_process=args.device == "cuda" or args.in_process, epoch_steps=args.epoch_steps, on_round=write,
            child_env=child_env, calibrate_before=args.calibrate_before)


def report(args: argparse.Namespace, models: list[str], suite_models: set[str], info: dict, results: dict,
           loads: list, failed: dict, rounds_done: int) -> str:
    """The Markdown of the rounds done so far."""
    have = [m for m in models if (m, "plain") in results]
    legend = "\n".join(f"* **{m}**: {SPECS[m].title}; {results[(m, 'plain')][0]['params'] / 1e6:.2f} M parameters; "
                       f"{results[(m, 'plain')][0]['warmup']} warm-up + {results[(m, 'plain')][0]['steps']} timed steps"
                       for m in have)
    notes = []
    for m in models:
        for config in ("dispersion", "suite"):
            d = results.get((m, config))
            if d:
                extra = ""
                if config == "suite":
                    extra = (f"; probes {statistics.median([x.get('probe_s', 0.0) for x in d]):.2f} s per run, "
                             f"{statistics.median([x.get('deferred', 0) for x in d]):.0f} deferred by the budget")
                notes.append(f"* {m} ({config}): backend `{d[0].get('backend')}` — {d[0].get('description', '')}{extra}")
    one_process_cpu = args.device == "cpu" and args.in_process
    checks = []
    for (m, quantity), (what, limit) in TARGETS.items():
        if m not in models or (m, "dispersion") not in results or (m, "plain") not in results:
            continue
        if quantity == "memory" and one_process_cpu:
            continue
        key = "ms_per_step" if quantity == "time" else "peak_growth_mib"
        ratios = [a[key] / b[key] for a, b in zip(results[(m, "dispersion")], results[(m, "plain")])]
        med, lo, hi = statistics.median(ratios), min(ratios), max(ratios)
        read = f"{verdict(ratios, limit)}; median and its 95 % CI {fmt_ci(ratios)}"
        extra = ""
        if quantity == "memory":
            w = statistics.median([a["maxrss_mib"] / b["maxrss_mib"] for a, b in
                                   zip(results[(m, "dispersion")], results[(m, "plain")])])
            extra = f" (whole-process peak ratio {w:.2f}×)" if SPECS[m].device == "cpu" else ""
        checks.append(f"* {m}: {what} — measured {med:.3f}× [{lo:.3f}–{hi:.3f}]: {read}{extra}")
    parts = [
        f"### GradientDispersion every step vs plain training ({args.device.upper()}, {rounds_done} rounds"
        + (f" of {args.rounds} asked" if rounds_done < args.rounds else "")
        + (", every fit in one process" if one_process_cpu else "")
        + (f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "")
        + (", steady heap" if args.steady_heap else "") + ")",
        describe_machine_md(info, loads),
        *(["One process (`--in-process`): the fits alternate in this process, so a slow state of the machine "
           "hits both sides alike. Time only: the heap carries from fit to fit, so the peak-memory columns "
           "are not the fits' own and no memory target is read (fresh processes measure it)."]
          if one_process_cpu else []),
        *([f"Every child ran with `MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}`: glibc's mmap threshold fixed "
           "(by default it moves up with the sizes freed, and where a step's blocks land then changes the "
           "heap's high-water mark); the peak growth is then about the memory live at the peak."]
          if args.mmap_threshold else []),
        *(["Every child ran with a steady heap (`--steady-heap`: "
           + ", ".join(f"`{k}={v}`" for k, v in STEADY_HEAP_ENV.items())
           + "): glibc neither trims the top of its heap nor moves its thresholds, so no process hands pages "
           "back and faults them in again every step, which by default strikes processes at random, with "
           "and without the callback (the page-fault lines below)."]
          if args.steady_heap else []),
        legend,
        tables(results, have, args.raw, suite_models),
        "Backends chosen:\n" + "\n".join(notes),
        "Targets (median of the per-round ratios; `met` only where the median's distribution-free 95 % interval "
        "is under the line, `common.verdict`; pool several runs' --json with benchmarks/pool_runs.py):\n" + ("\n".join(checks) or "(none for these models)"),
    ]
    if failed:
        parts.append("Runs that raised (configuration left out of every round):\n"
                     + "\n".join(f"* {m} / {c}: {why}" for (m, c), why in failed.items()))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
