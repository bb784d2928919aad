"""Shared benchmark pieces: in-memory batches, a BackPACK-compatible ResNet-18, a step timer."""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class FixedBatches(Dataset):
    """Pre-built batches served as-is (``DataLoader(batch_size=None)``): no collation or host→
    device copy in the timed loop, so ratios measure the callbacks, not the input pipeline."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.batches[i % len(self.batches)]


def random_image_batches(n_batches: int, batch: int, shape: tuple[int, ...], classes: int, device: torch.device,
                         seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, *shape, generator=gen).to(device), torch.randint(0, classes, (batch,), generator=gen).to(device))
        for _ in range(n_batches)
    ]


def loader(batches: list[tuple[Tensor, Tensor]], steps: int) -> DataLoader:
    return DataLoader(FixedBatches(batches, steps), batch_size=None, shuffle=False)


class Samples(Dataset):
    """The samples of pre-built in-memory batches, one at a time, for an ordinary
    ``DataLoader(batch_size=b)`` (default collation, as a user's in-memory data would be served;
    the samples cycle for ``length`` items)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], length: int) -> None:
        self.x = torch.cat([b[0] for b in batches])
        self.y = torch.cat([b[1] for b in batches])
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = i % self.x.shape[0]
        return self.x[j], self.y[j]


def sample_loader(batches: list[tuple[Tensor, Tensor]], steps: int, pin_memory: bool = False) -> DataLoader:
    """``steps`` batches of the batches' size, collated from single samples (in order); host
    tensors, pinned when asked (for a CUDA run: Lightning copies each batch to the device)."""
    b = batches[0][0].shape[0]
    return DataLoader(Samples(batches, steps * b), batch_size=b, shuffle=False, pin_memory=pin_memory)


class _Block(nn.Module):
    """ResNet basic block without BatchNorm and without in-place ops (BackPACK's backward hooks
    reject in-place updates of hooked outputs); the second conv starts at zero (Fixup-style) so
    the 18-layer stack trains stably without normalization."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.act2(self.conv2(self.act1(self.conv1(x))) + self.shortcut(x))


class ResNet18NoBN(nn.Module):
    """ResNet-18 layout for 32×32 inputs (64-128-256-512 channels, 2 blocks each): 11.2 M
    parameters, every one in a Conv2d or Linear layer BackPACK supports."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
        c = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(c, c_out, stride), _Block(c_out, c_out, 1)]
            c = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def minor_faults() -> int:
    """The process's minor page faults so far (``getrusage``; 0 where there is none)."""
    try:
        import resource
    except ImportError:  # (not POSIX)
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepTimer(pl.Callback):
    """Wall time per optimizer step between step ``warmup`` and the last step (one device
    synchronization at each end, none in between), and the process's minor page faults per step
    over the same steps (:attr:`faults_per_step`: pages the heap handed back to the kernel and
    took again, e.g. glibc trimming the top of its heap and growing it again every step)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0: float | None = None
        self.t1: float | None = None
        self.steps = 0
        self.faults0 = self.faults1 = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            self._sync(pl_module)
            self.faults0 = minor_faults()
            self.t0 = time.perf_counter()
            self.start_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self.t1 = time.perf_counter()
        self.faults1 = minor_faults()
        self.steps = trainer.global_step - self.start_step

    @property
    def seconds_per_step(self) -> float:
        assert self.t0 is not None and self.t1 is not None and self.steps > 0
        return (self.t1 - self.t0) / self.steps

    @property
    def faults_per_step(self) -> float:
        assert self.t0 is not None and self.t1 is not None and self.steps > 0
        return (self.faults1 - self.faults0) / self.steps


def time_per_step(make_module: Callable[[], pl.LightningModule], train_loader: DataLoader, callbacks: list,
                  steps: int, warmup: int, accelerator: str, accumulate: int = 1) -> float:
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        accumulate_grad_batches=accumulate, callbacks=[*callbacks, timer], log_every_n_steps=50,
    )
    trainer.fit(make_module(), train_dataloaders=train_loader)
    return timer.seconds_per_step


def median_table(results: dict[str, list[float]], baselines: dict[str, str]) -> list[tuple[str, float, float, float, float]]:
    """Rows (name, best ms/step, ratio of best times, median per-round ratio, half-range of the
    per-round ratios). Best (minimum) times are the least disturbed by other load on the machine;
    the per-round ratios compare runs made back to back."""
    rows = []
    for name, times in results.items():
        base = results[baselines[name]]
        ratios = [t / b for t, b in zip(times, base)]
        spread = (max(ratios) - min(ratios)) / 2 if len(ratios) > 1 else 0.0
        rows.append((name, 1000 * min(times), min(times) / min(base), statistics.median(ratios), spread))
    return rows


def format_table(title: str, rows: list[tuple[str, float, float, float, float]]) -> str:
    lines = [f"### {title}", "",
             "| configuration | best ms / optimizer step | ratio of best times | median per-round ratio (± half-range) |",
             "|---|---:|---:|---:|"]
    for name, ms, best_ratio, ratio, spread in rows:
        lines.append(f"| {name} | {ms:.2f} | {best_ratio:.2f} | {ratio:.2f} ± {spread:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Shared by overhead_dispersion.py, overhead_suite.py and batchnorm_decomposition.py: fresh-process
# runs, peak-memory readings, ratio summaries, the machine description, the benchmark models.
# ----------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402


def single_thread_env() -> dict[str, str]:
    """Environment of a child run: one BLAS/OpenMP thread (the machine is shared; one thread gives
    the steadiest timings and is what ``torch.set_num_threads(1)`` does inside)."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def quiet_child() -> None:
    """Inside a benchmark's child run: one intra-op thread, no warnings, Lightning's errors only
    (its start-up notes would interleave with the JSON the parent reads)."""
    import logging
    import warnings

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def run_json_child(argv: list[str], timeout: float | None = None, env: dict[str, str] | None = None
                   ) -> dict[str, Any]:
    """Run ``python argv…`` in a fresh interpreter (``env``: variables set on top of
    :func:`single_thread_env`); its last stdout line is a JSON object."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          env={**single_thread_env(), **(env or {})}, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(argv)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"child {' '.join(argv)} printed no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def emit_report(text: str, out: str | None = None, json_path: str | None = None, payload: Any = None,
                quiet: bool = False) -> None:
    """Print a benchmark's Markdown (unless ``quiet``: an interim report); also write it to ``out``
    and ``payload`` as JSON to ``json_path`` when given (their folders are created)."""
    if not quiet:
        print(text)
    for path, write in ((out, lambda fh: fh.write(text + "\n")),
                        (json_path, lambda fh: json.dump(payload, fh, indent=1))):
        if path:  # written whole, then renamed: a run killed mid-write leaves the previous file
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path + ".part", "w") as fh:
                write(fh)
            os.replace(path + ".part", path)


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: resident now; ``VmHWM``: resident peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc ``malloc_trim``) so that the resident set
    read as the baseline holds what is live, not what was freed earlier."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current resident set
    (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def alone_us(fn: Callable[[], Any], reps: int = 300, warmup: int = 20) -> float:
    """Median µs of one call of ``fn`` over 7 blocks of ``reps`` calls, after ``warmup`` calls
    (an op timed alone, hot caches: what ``hook_split.py`` and ``kernel_floor.py`` set a step's
    phases beside)."""
    for _ in range(warmup):
        fn()
    blocks = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        blocks.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(blocks)


def ratio_stats(values: list[float], base: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-round ratios ``values[r] / base[r]``."""
    ratios = [v / b for v, b in zip(values, base)]
    return statistics.median(ratios), min(ratios), max(ratios)


def fmt_ratio(stats: tuple[float, float, float]) -> str:
    med, lo, hi = stats
    return f"{med:.3f}× [{lo:.3f}–{hi:.3f}]"


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, coverage)``: a distribution-free confidence interval for the median of the
    distribution the ``values`` were drawn from (independent draws, any continuous distribution).

    The interval between the ``k``-th smallest and the ``k``-th largest value covers the median
    with probability ``1 − 2·P(Bin(n, ½) ≤ k − 1)`` whatever the distribution; ``k`` is the
    largest for which that reaches ``level`` (n = 9 → the 2nd and 8th values, 96.1 %; n = 22 →
    the 6th and 17th, 98.3 %).  Below n = 6 no pair reaches 95 %: the interval is then
    ``[min, max]`` and ``coverage`` says what it does reach (n = 5: 93.8 %).  Per-round timing
    ratios on a shared machine have heavy tails (one round in a slow state), which is why the
    median and this interval, not a mean ± SE, are what the benchmarks report."""
    xs = sorted(v for v in values if math.isfinite(v))
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0.0
    cdf = 0.5 ** n  # P(Bin(n, ½) ≤ k − 1) for k = 1, built up term by term
    k, coverage = 1, 1.0 - 2.0 * cdf
    while 2 * (k + 1) <= n + 1:  # the pair stays ordered (k-th smallest ≤ k-th largest)
        # (in logarithms: C(n, k)·2⁻ⁿ overflows a float beyond n ≈ 1,000)
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0))
        if 1.0 - 2.0 * cdf < level:
            break
        k, coverage = k + 1, 1.0 - 2.0 * cdf
    return xs[k - 1], xs[n - k], coverage


def fmt_ci(values: list[float], level: float = 0.95) -> str:
    """``median [low, high]`` with the interval of :func:`median_ci` (its coverage when short of ``level``)."""
    lo, hi, coverage = median_ci(values, level)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    short = "" if coverage >= level else f", {100 * coverage:.1f} %"
    return f"{statistics.median(finite):.3f}× [{lo:.3f}, {hi:.3f}{short}]"


def verdict(values: list[float], limit: float, level: float = 0.95) -> str:
    """A target ``median ≤ limit`` read with the median's interval of :func:`median_ci`:
    ``met`` (the whole interval under the line), ``met by the median`` (the interval reaches
    above it: another run of the same code may land over), ``missed by the median`` (the
    interval reaches below) or ``**missed**`` (the whole interval above)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "**n/a** (no finite ratio)"
    lo, hi, coverage = median_ci(finite, level)
    short = "" if coverage >= level else f" (too few rounds for {100 * level:.0f} %: the interval covers {100 * coverage:.1f} %)"
    if statistics.median(finite) <= limit:
        return ("met" if hi <= limit else "met by the median (its interval reaches over the line)") + short
    return ("**missed**" if lo > limit else "**missed by the median** (its interval reaches under the line)") + short


def machine_description() -> dict[str, Any]:
    """``nproc``, the CPU model (``/proc/cpuinfo``), memory, load averages, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            mem_gib = int(fh.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    import lightning

    return {"nproc": nproc, "cpu": cpu, "mem_gib": mem_gib, "load": load_average(), "python": platform.python_version(),
            "torch": torch.__version__, "lightning": lightning.__version__}


def load_average() -> str:
    """The 1/5/15-minute load averages (what ``uptime`` prints)."""
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "unknown"


def describe_machine_md(info: dict[str, Any], loads: list[str]) -> str:
    mem = f", {info['mem_gib']:.0f} GiB RAM" if info.get("mem_gib") else ""
    return (f"Machine: `nproc` = {info['nproc']}, CPU `{info['cpu']}`{mem}; Python {info['python']}, torch "
            f"{info['torch']}, lightning {info['lightning']}; one thread per run (`OMP_NUM_THREADS=1`, "
            f"`torch.set_num_threads(1)`). Load averages (1/5/15 min) read during the measurement: "
            + "; ".join(loads) + ".")


def around_batches(callbacks: list, on_start: Callable[[pl.Trainer], None],
                   on_end: Callable[[pl.Trainer], None]) -> list:
    """``callbacks`` between two of ours: ``on_start(trainer)`` runs before every other callback's
    ``on_train_batch_start``, ``on_end(trainer)`` after every other's ``on_train_batch_end``
    (Lightning calls the callbacks' hooks in list order), so a window opened and closed there holds
    a whole training batch."""

    class First(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            on_start(trainer)

    class Last(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            on_end(trainer)

    return [First(), *callbacks, Last()]


class FitTimer(pl.Callback):
    """Wall time from ``on_fit_start`` to ``on_fit_end`` (the training a user waits for, without
    interpreter start-up, imports or config parsing), and of the validation steps."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.seconds: float | None = None
        self.val_step_s = 0.0
        """Wall time of the user's ``validation_step`` calls (from this callback's
        ``on_validation_batch_start`` to its ``on_validation_batch_end``; put last in the list):
        the same work with and without measurement callbacks, the run's speed reference for
        :func:`speed_adjusted`. 0 on CUDA (no sync per batch) and without validation."""
        self._val_t: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.t0 = time.perf_counter()

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not trainer.sanity_checking and pl_module.device.type == "cpu":
            self._val_t = time.perf_counter()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._val_t is not None:
            self.val_step_s += time.perf_counter() - self._val_t
            self._val_t = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        assert self.t0 is not None
        self.seconds = time.perf_counter() - self.t0


class PeakRSS:
    """Peak resident memory of a block of code above what the process held before it:
    the heap is trimmed, ``VmRSS`` noted and ``VmHWM`` reset on entry; on exit
    ``growth_mib = (VmHWM − VmRSS(entry)) / 1024``. Every host allocation touched inside counts
    (activations, gradients, saved tensors, work buffers, allocator caching, lazily imported
    modules); Linux only (``nan`` elsewhere).

    ``file_growth_mib``: the file-backed part of the resident set on exit less on entry
    (``RssFile``) — mostly the code pages of library kernels run for the first time inside the
    block. They count in ``VmHWM`` but are shared between processes and reclaimable; on the MLP
    benchmark they were 3.3 of the 6.2 MiB a measured fit adds (``/proc/self/smaps``:
    ``libtorch_cpu.so``)."""

    def __enter__(self) -> "PeakRSS":
        trim_heap()
        self.base_kib = status_kib("VmRSS")
        self.base_file_kib = status_kib("RssFile")
        self.reset = reset_peak_rss()
        self.peak_kib: int | None = None
        self.file_kib: int | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_kib = status_kib("VmHWM")
        self.file_kib = status_kib("RssFile")

    @property
    def file_growth_mib(self) -> float:
        if self.base_file_kib is None or self.file_kib is None:
            return float("nan")
        return (self.file_kib - self.base_file_kib) / 1024.0

    @property
    def growth_mib(self) -> float:
        if not self.reset or self.base_kib is None or self.peak_kib is None:
            return float("nan")
        return (self.peak_kib - self.base_kib) / 1024.0


# ---------------------------------------------------------------------------- benchmark models


def resnet18_torchvision(num_classes: int = 10, norm: str = "batch") -> nn.Module:
    """torchvision's ResNet-18 as shipped (7×7 stem, max-pool, in-place ReLUs), ``norm="batch"``
    (train-mode BatchNorm) or ``norm="group"`` (GroupNorm with 32 groups in place of every
    BatchNorm: per-sample gradients are defined, the hooks are exact)."""
    import torchvision

    if norm == "batch":
        return torchvision.models.resnet18(num_classes=num_classes)
    if norm == "group":
        return torchvision.models.resnet18(num_classes=num_classes, norm_layer=lambda c: nn.GroupNorm(32, c))
    raise ValueError(norm)


class TinyTransformer(nn.Module):
    """Token classifier: Embedding → ``nn.TransformerEncoder`` (``layers`` × d_model ``d``,
    ``heads`` heads, feed-forward ``4d``, batch first) → mean over positions → Linear;
    ``batch_first=False``: the layout of PyTorch's tutorials (tokens turned to ``[T, b]`` before
    the embedding, a sequence-first encoder)."""

    def __init__(self, vocab: int = 1000, d: int = 64, heads: int = 4, layers: int = 2, num_classes: int = 10,
                 dropout: float = 0.1, batch_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=dropout, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, num_classes)
        self.batch_first = batch_first

    def forward(self, tokens: Tensor) -> Tensor:
        if self.batch_first:
            return self.head(self.encoder(self.embed(tokens)).mean(1))
        return self.head(self.encoder(self.embed(tokens.t())).mean(0))


def random_token_batches(n_batches: int, batch: int, length: int, vocab: int, classes: int,
                         seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, length), generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(n_batches)]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def calibrated_ratio(run: dict, plain: dict, key: str = "calib_ms") -> float:
    """``(step / calibration)`` of ``run`` over that of ``plain`` (``overhead_dispersion.py``'s
    runs: each step time over the forward-and-backward calibration timed in the same process
    after ``fit``), the dispersion rows' speed-adjusted ratio; ``key="calib_before_ms"``: over the
    calibration before ``fit`` (``--calibrate-before``). NaN without a calibration."""
    a, b = run.get(key), plain.get(key)
    if not a or not b:
        return float("nan")
    return (run["ms_per_step"] / a) / (plain["ms_per_step"] / b)


def speed_adjusted(run: dict, plain: dict) -> float:
    """``(fit / validation steps)`` of ``run`` over that of ``plain``: the time ratio with each
    process's own speed taken out. This machine has slow states that last a whole process (every
    part of a run, the user's validation steps included, 30–50 % slower: the per-segment timings
    in docs/results/overhead.md), and a round whose two runs land in different states gives a
    ratio off by that much either way; the validation steps are nearly the same work in both runs
    (no measurement callback has a per-batch validation hook), so their time measures the state.
    Not quite the same: the dispersion's norm hooks stay attached, disarmed, through validation
    (about 3.7 µs a batch on the main job, ≈ 0.4 % of its validation steps), so the adjusted ratio
    favours the suite by about that much. NaN without validation time."""
    a, b = run.get("val_step_s") or 0.0, plain.get("val_step_s") or 0.0
    if a <= 0.0 or b <= 0.0:
        return float("nan")
    return (run["fit_s"] / a) / (plain["fit_s"] / b)
