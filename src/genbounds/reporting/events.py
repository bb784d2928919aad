"""Reading runs back from TensorBoard event files."""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field


class UnreadableRun(Exception):
    """The path holds no readable TensorBoard run (exit code 2 of the CLI)."""


@dataclass
class Run:
    """Every scalar series of one run (one directory of event files)."""

    path: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path

    def final(self, tag: str) -> float | None:
        """The value at the largest step (the last written wins at equal steps)."""
        series = self.scalars.get(tag)
        if not series:
            return None
        return max(enumerate(series), key=lambda item: (item[1][0], item[0]))[1][1]

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        points = sorted(self.scalars.get(tag, []), key=lambda p: p[0])
        return [p[0] for p in points], [p[1] for p in points]

    def tags(self, prefix: str = "") -> list[str]:
        return sorted(t for t in self.scalars if t.startswith(prefix))


def find_runs(path: str) -> list[str]:
    """Directories under ``path`` (itself included) that contain event files."""
    if os.path.isfile(path):
        return [os.path.dirname(os.path.abspath(path))]
    files = glob.glob(os.path.join(path, "**", "events.out.tfevents.*"), recursive=True)
    return sorted({os.path.dirname(f) for f in files})


def load_run(path: str) -> Run:
    """Load the single run at ``path``.

    Raises:
        UnreadableRun: no event file, several runs under ``path``, or a corrupt file.
    """
    if not os.path.exists(path):
        raise UnreadableRun(f"{path}: no such file or directory")
    runs = find_runs(path)
    if not runs:
        raise UnreadableRun(f"{path}: no TensorBoard event files found")
    if len(runs) > 1:
        listing = "\n  ".join(runs)
        raise UnreadableRun(f"{path} holds {len(runs)} runs; pass one of:\n  {listing}")
    return _read_dir(runs[0])


def _read_dir(directory: str) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(directory)
    files = sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
    for f in files:
        try:
            acc = EventAccumulator(f, size_guidance={"scalars": 0})
            acc.Reload()
        except Exception as err:  # noqa: BLE001 - any parse failure is "unreadable"
            raise UnreadableRun(f"{f}: cannot read event file ({type(err).__name__}: {err})") from None
        for tag in acc.Tags().get("scalars", []):
            run.scalars.setdefault(tag, []).extend((e.step, float(e.value)) for e in acc.Scalars(tag))
    if not run.scalars:
        raise UnreadableRun(f"{directory}: event files hold no scalars")
    return run


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}"
