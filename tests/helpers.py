"""Small models, data and trainer helpers shared by the tests."""

from __future__ import annotations

import csv
import glob
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from genbounds.models import Regressor


def trainer(tmp_path, callbacks=(), **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer for tests."""
    defaults: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


class CrossEntropyModule(pl.LightningModule):
    """A classifier's steps as Lightning's docs write them (cross-entropy, logged, plain SGD);
    subclasses build the network and ``forward``."""

    lr = 0.1

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class TensorData(LightningDataModule):
    """Train/val TensorDatasets with a fixed batch order (no shuffling unless asked)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, x_val: Tensor | None = None,
                 y_val: Tensor | None = None, shuffle: bool = False) -> None:
        super().__init__()
        self.train = TensorDataset(x, y)
        self.val = TensorDataset(x_val, y_val) if x_val is not None else None
        self.batch_size = batch_size
        self.shuffle = shuffle

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0) if self.shuffle else None
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=self.shuffle, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size) if self.val is not None else []


def unit_sphere_regression(n: int, d: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, I)`` normalized to ``‖x‖ = 1``, ``y = βᵀx + noise``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x = x / x.norm(dim=1, keepdim=True)
    y = (x @ torch.randn(d, generator=gen) + 0.3 * torch.randn(n, generator=gen)).unsqueeze(1)
    return x, y


def linear_regressor(d: int, lr: float = 0.0, seed: int = 0) -> Regressor:
    from genbounds.models import LinearRegression

    torch.manual_seed(seed)
    return Regressor(LinearRegression(d), lr=lr)


def exact_linear_stats(module: Regressor, x: Tensor, y: Tensor) -> dict[str, float]:
    """Closed form for ``ℓ = ½(wᵀx − y)²``: ``g_i = (wᵀx_i − y_i) x_i``."""
    w = module.network.linear.weight.detach().double().squeeze(0)
    xd, yd = x.double(), y.double().squeeze(1)
    g = (xd @ w - yd)[:, None] * xd
    b = x.shape[0]
    gbar = g.mean(0)
    s2 = ((g - gbar) ** 2).sum() / (b - 1)
    return {"grad/norm_sq": float(gbar @ gbar), "grad/trace_cov": float(s2), "grad/dispersion": float(s2 / b)}


def tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series found in the TensorBoard event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def csv_metric(logdir: str, name: str) -> list[float]:
    """Values of one metric column from a CSVLogger's metrics.csv under ``logdir``."""
    (path,) = glob.glob(os.path.join(logdir, "**", "metrics.csv"), recursive=True)
    with open(path) as fh:
        return [float(row[name]) for row in csv.DictReader(fh) if row.get(name)]


class LayerNormNet(nn.Module):
    """An MLP with a LayerNorm, which BackPACK does not support."""

    def __init__(self, d_in: int = 64, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class DropoutBatchNormNet(nn.Module):
    """Dropout + BatchNorm: every source of hidden state a probe could disturb."""

    def __init__(self, d_in: int = 64, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.3), nn.Linear(width, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def bound_suite(sigmas=(1e-3, 1e-2, 1e-1), **bound_kwargs):
    """A small but complete measurement suite feeding GeneralizationBound."""
    from genbounds.callbacks import (
        Flatness,
        GeneralizationBound,
        GradientDispersion,
        GradientSensitivity,
        HeldoutGradient,
        HessianTrace,
    )

    sig = list(sigmas)
    return [
        GradientDispersion(backend="backpack"),
        HeldoutGradient(every_n_steps=2),
        GradientSensitivity(sigmas=sig, num_draws=4, every_n_steps=3),
        Flatness(sigmas=sig, scaling="sqrt_steps", num_draws=8, every_n_epochs=None, at_train_end=False),
        HessianTrace(min_probes=8, max_probes=24, every_n_epochs=None, at_train_end=False),
        GeneralizationBound(**bound_kwargs),
    ]


class RecordFinalStep(pl.Callback):
    """Writes ``rank global_step`` to a file at train end (works across spawned processes)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module) -> None:
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}.txt"), "w") as fh:
            fh.write(str(trainer.global_step))


class EndProcessGroup(pl.Callback):
    """Ends the gloo process group at a spawned rank's teardown (after a barrier), instead of
    leaving it to interpreter exit. Left to exit, rank 1 of the 2-process ``ddp_spawn`` tests
    aborted there ("terminate called without an active exception", SIGABRT) in about 1 test run in
    10 — after ``fit`` had finished, so nothing the tests check was affected, but the test failed.
    With it: 0 of 40."""

    def teardown(self, trainer, pl_module, stage) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


DEFAULT_SUITE_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                    "digits_mlp.yaml")


def default_suite(config: str = DEFAULT_SUITE_CONFIG, **small: Any) -> list[pl.Callback]:
    """Every callback of the default suite (``trainer.callbacks`` of ``configs/digits_mlp.yaml``):
    the same classes, in the same order, with the same σ grids, instantiated from the YAML's
    ``init_args`` updated by ``small`` — for speed in tests.

    ``small`` holds two kinds of overrides: ``ClassName={...}`` (e.g. ``HessianTrace={"max_probes": 12}``)
    updates that class's arguments only; any other ``name=value`` (e.g. ``num_draws=4``,
    ``probe_batch_size=16``, ``overhead_budget=None``) is given to every callback whose constructor
    takes an argument of that name. ``sigmas`` cannot be overridden (the grid is part of the suite).
    """
    import importlib
    import inspect

    import yaml

    if "sigmas" in small:
        raise ValueError("default_suite keeps the suite's σ grid")
    with open(config) as fh:
        specs = yaml.safe_load(fh)["trainer"]["callbacks"]
    per_class = {k: dict(v) for k, v in small.items() if k[:1].isupper()}
    shared = {k: v for k, v in small.items() if not k[:1].isupper()}
    names = [spec["class_path"].rsplit(".", 1)[1] for spec in specs]
    unknown = sorted(set(per_class) - set(names))
    if unknown:
        raise ValueError(f"default_suite: {unknown} are not in {config}: {names}")
    callbacks = []
    for spec, name in zip(specs, names):
        module, _, cls_name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = dict(spec.get("init_args") or {})
        kwargs.update({k: v for k, v in shared.items() if k in accepted})
        kwargs.update(per_class.get(name, {}))
        callbacks.append(cls(**kwargs))
    return callbacks


BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (its sibling ``common`` importable while it
    loads; registered in ``sys.modules``, which its dataclasses look up)."""
    sys.path.insert(0, BENCHMARKS)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(BENCHMARKS)


def linear_mix(d_in: int, hidden: int, d_mid: int, d_out: int, with_norm_layer: bool) -> nn.Sequential:
    """Three Linear layers — the second without a bias, the third's weight frozen (bias only) —
    and a LayerNorm with a non-trivial affine after them when asked: the cases the ghost hooks'
    Linear rows made at the read must cover (each kind of bias column, and the mask of a model
    whose other hooked layers write their own rows)."""
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_mid, bias=False), nn.Tanh(),
                               nn.Linear(d_mid, d_out)]
    if with_norm_layer:
        norm = nn.LayerNorm(d_out)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        layers.append(norm)
    model = nn.Sequential(*layers)
    model[4].weight.requires_grad_(False)
    return model


class RankGatedNet(CrossEntropyModule):
    """From step ``late`` on, the process of rank 1 alone passes the hidden layer through
    ``nn.Hardsigmoid``, which has no second derivative in PyTorch: a branch the check before step
    0 cannot see, met by one DDP process's probe mid-fit (digits: 64 inputs, 10 classes)."""

    def __init__(self, late: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 16)
        self.out = nn.Linear(16, 10)
        self.gate = nn.Hardsigmoid()
        self.late = late

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self._trainer is not None and self.trainer.global_rank == 1 and self.trainer.global_step >= self.late:
            h = h * self.gate(h)
        return self.out(h)


class _RankLateNet(CrossEntropyModule):
    """64 → 16 → 16 → 10 (digits), whose process of rank 1 alone does something else from step
    ``late`` on (:meth:`rank1_late`)."""

    def __init__(self, late: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 10)
        self.late = late

    def rank1_late(self) -> bool:
        return self._trainer is not None and self.trainer.global_rank == 1 and self.trainer.global_step >= self.late


class RankBranchNet(_RankLateNet):
    """The middle block is called on every batch, and from step ``late`` on rank 1 alone leaves its
    output unused (a branch one process's batches skip; DDP with ``find_unused_parameters=True``)."""

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        m = torch.tanh(self.mid(h))
        return self.out(h if self.rank1_late() else m)


class RankSubsetNet(_RankLateNet):
    """From step ``late`` on, rank 1 alone applies its middle layer to part of the batch (the
    samples of some classes, an adapter), which the hooks cannot attribute to samples."""

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.rank1_late():
            part = torch.arange(h.shape[0]) % 2 == 0
            out = h.clone()
            out[part] = torch.tanh(self.mid(h[part]))
            return self.out(out)
        return self.out(torch.tanh(self.mid(h)))


class _RecordAtTrainEnd(pl.Callback):
    """Writes :meth:`text` to ``rank<r>_<name>.txt`` at train end (works across spawned processes)."""

    name = ""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def text(self, trainer) -> str:
        raise NotImplementedError

    def on_train_end(self, trainer, pl_module) -> None:
        with open(os.path.join(self.directory, f"rank{trainer.global_rank}_{self.name}.txt"), "w") as fh:
            fh.write(self.text(trainer))


class RecordDispersion(_RecordAtTrainEnd):
    """Each process's ``GradientDispersion`` backend and measured steps (``rank<r>_dispersion.txt``)."""

    name = "dispersion"

    def text(self, trainer) -> str:
        from genbounds.callbacks import GradientDispersion

        cb = next(c for c in trainer.callbacks if isinstance(c, GradientDispersion))
        return f"{cb.active_backend} {cb.measured_steps}"


class RecordSecondOrder(_RecordAtTrainEnd):
    """Each process's ``HessianTrace.twice_differentiable_problem``, empty for none
    (``rank<r>_second_order.txt``)."""

    name = "second_order"

    def text(self, trainer) -> str:
        from genbounds.callbacks import HessianTrace

        probe = next(cb for cb in trainer.callbacks if isinstance(cb, HessianTrace))
        return probe.twice_differentiable_problem or ""


class MixtureOfExperts(nn.Module):
    """Top-1 routing: each expert a Linear applied to the rows routed to it, gated, scattered back
    (a layer applied to part of the batch)."""

    def __init__(self, d_in: int, width: int, d_out: int, experts: int = 3) -> None:
        super().__init__()
        self.inp, self.router, self.out = nn.Linear(d_in, width), nn.Linear(width, experts), nn.Linear(width, d_out)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        gate, idx = self.router(h).softmax(-1).max(-1)
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            m = idx == e
            if m.any():
                y[m] = expert(h[m]) * gate[m, None]
        return self.out(torch.tanh(y) + h)
