"""Shared benchmark pieces: in-memory batches, a BackPACK-compatible ResNet-18, a step timer."""

from __future__ import annotations

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


class StepTimer(pl.Callback):
    """Wall time per optimizer step between step ``warmup`` and the last step (one device
    synchronization at each end, none in between)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0: float | None = None
        self.t1: float | None = None
        self.steps = 0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.warmup and self.t0 is None:
            self._sync(pl_module)
            self.t0 = time.perf_counter()
            self.start_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)
        self.t1 = time.perf_counter()
        self.steps = trainer.global_step - self.start_step

    @property
    def seconds_per_step(self) -> float:
        assert self.t0 is not None and self.t1 is not None and self.steps > 0
        return (self.t1 - self.t0) / self.steps


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
