"""Reading runs back from disk: TensorBoard event files or Lightning ``CSVLogger`` tables.

Readers fail closed: every TFRecord of every event file is checked (length and data CRC32C, no cut
record, no trailing bytes) before it is parsed, and ``metrics.csv`` must end in a complete row; any
defect raises :class:`CorruptRun` naming the file and the byte offset. A run that never logged
``run/complete = 1`` (the genbounds callbacks log it at the last optimizer step of ``Trainer.fit``)
is incomplete: :func:`require_complete` raises :class:`IncompleteRun`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from genbounds.reporting import hparams as hp
from genbounds.reporting.csv_runs import METRICS_FILE, CorruptCSV, read_metrics_csv
from genbounds.reporting.tfrecord import CorruptEventFile, read_records

COMPLETE_TAG = "run/complete"
RAISED_TAG = "gate/raised"  # (BoundGate's, logged where on_violation="raise" ends the fit)
EVENT_FILE_MARKER = "events.out.tfevents."
HPARAMS_FILE = "hparams.yaml"


class UnreadableRun(Exception):
    """The path holds no readable run (exit code 2 of the CLI)."""


class CorruptRun(UnreadableRun):
    """A log file of the run fails its integrity checks (cut, bad checksum, trailing bytes)."""


class HParamsOnly(UnreadableRun):
    """Event files that hold hyper-parameters but no scalar: what ``SummaryWriter.add_hparams``
    writes into a sub-folder of its run. The caller merges ``hparams`` into the enclosing run."""

    def __init__(self, message: str, hparams: dict[str, Any]) -> None:
        super().__init__(message)
        self.hparams = hparams


class IncompleteRun(UnreadableRun):
    """The run never logged ``run/complete = 1``: it ended before ``Trainer.fit`` finished."""


@dataclass
class Run:
    """Every scalar series and the hyper-parameters of one run (one directory)."""

    path: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    source: str = "tensorboard"  # or "csv"
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    display_name: str | None = None
    label: str | None = None

    @property
    def name(self) -> str:
        return self.display_name or self.path

    # --- values --------------------------------------------------------------------------------
    def final(self, tag: str) -> float | None:
        """The value at the largest step (the last written wins at equal steps); None if never logged."""
        point = self.final_point(tag)
        return None if point is None else point[1]

    def final_point(self, tag: str) -> tuple[int, float] | None:
        series = self.scalars.get(tag)
        if not series:
            return None
        return max(enumerate(series), key=lambda item: (item[1][0], item[0]))[1]

    def last_step(self, tag: str) -> int | None:
        point = self.final_point(tag)
        return None if point is None else point[0]

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        """Points sorted by step; at a repeated step the last written value is kept."""
        by_step: dict[int, float] = {}
        for step, value in self.scalars.get(tag, []):
            by_step[step] = value
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def tags(self, prefix: str = "") -> list[str]:
        return sorted(t for t in self.scalars if t.startswith(prefix))

    # --- completeness --------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        value = self.final(COMPLETE_TAG)
        return value is not None and value == 1.0

    @cached_property
    def end_step(self) -> int | None:
        """Step of ``run/complete`` when logged, else the largest step of any scalar (computed once)."""
        if self.complete:
            return self.last_step(COMPLETE_TAG)
        steps = [step for series in self.scalars.values() for step, _ in series]
        return max(steps) if steps else None


# --- discovery -------------------------------------------------------------------------------------
def _is_event_file(name: str) -> bool:
    return "tfevents" in name  # tensorboard's own test (io_wrapper.IsTensorFlowEventsFile)


def find_runs(path: str) -> list[str]:
    """Run directories under ``path`` (itself included): those holding TensorBoard event files
    (``events.out.tfevents.*``) or a CSVLogger ``metrics.csv``. A directory with both is one run."""
    if os.path.isfile(path):
        return [os.path.dirname(os.path.abspath(path)) or "."]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        if METRICS_FILE in filenames or any(_is_event_file(f) for f in filenames):
            found.append(os.path.normpath(dirpath))
    return sorted(found)


def event_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if _is_event_file(f))


def load_run(path: str) -> Run:
    """Load the single run at ``path`` (a run directory, or a folder holding exactly one run).

    Raises:
        UnreadableRun: nothing there, several runs under ``path``, or no scalars.
        CorruptRun: a log file fails its integrity checks.
    """
    if not os.path.exists(path):
        raise UnreadableRun(f"{path}: no such file or directory")
    runs = find_runs(path)
    if not runs:
        raise UnreadableRun(f"{path}: no TensorBoard event files or CSVLogger metrics.csv found")
    if len(runs) > 1:
        listing = "\n  ".join(runs)
        raise UnreadableRun(f"{path} holds {len(runs)} runs; pass one of:\n  {listing}")
    return read_run_dir(runs[0])


def expand_paths(paths: list[str]) -> list[tuple[str, str | None]]:
    """``(run_dir, None)`` for every run under every path, or ``(path, error)`` for a path with none."""
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for path in paths:
        if not os.path.exists(path):
            out.append((path, f"{path}: no such file or directory"))
            continue
        runs = find_runs(path)
        if not runs:
            out.append((path, f"{path}: no TensorBoard event files or CSVLogger metrics.csv found"))
        for run in runs:
            key = os.path.realpath(run)
            if key not in seen:
                seen.add(key)
                out.append((run, None))
    return out


def read_run_dir(directory: str) -> Run:
    """Read one run directory: TensorBoard event files preferred, ``metrics.csv`` as the fallback
    when the directory has no usable event file (absent, or failing its checks — noted on the run).

    Raises:
        CorruptRun, UnreadableRun.
    """
    events = event_files(directory)
    csv_path = os.path.join(directory, METRICS_FILE)
    has_csv = os.path.isfile(csv_path)
    tb_error: UnreadableRun | None = None
    if events:
        try:
            run = _read_tensorboard(directory, events)
        except UnreadableRun as err:
            if not has_csv:
                raise
            tb_error = err
        else:
            return run
    if not has_csv:
        raise UnreadableRun(f"{directory}: no TensorBoard event files or CSVLogger metrics.csv found")
    run = _read_csv(directory, csv_path)
    if tb_error is not None:
        run.notes.append(f"TensorBoard event files not used ({tb_error}); read {csv_path} instead")
    return run


def _shortest_float32(value: float) -> float:
    """The float32 ``simple_value`` as its shortest decimal (``0.3``, not ``0.30000001192092896``)."""
    import numpy as np

    if not math.isfinite(value):
        return float(value)
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _read_tensorboard(directory: str, files: list[str]) -> Run:
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    files = sorted(files, key=_writer_order)
    run = Run(directory, source="tensorboard", files=list(files))
    plugin_of: dict[str, str] = {}
    hparams_plugin: dict[str, Any] = {}
    per_file: list[dict[str, list[tuple[int, float]]]] = []
    for path in files:
        scalars: dict[str, list[tuple[int, float]]] = {}  # (this file's: a later writer's supersede them)
        per_file.append(scalars)
        try:
            for offset, data in read_records(path):
                try:
                    event = event_pb2.Event.FromString(data)
                except DecodeError as err:
                    raise CorruptRun(f"{path}: corrupt event file at byte {offset}: the record's checksum "
                                     f"holds but it is not an Event protocol buffer ({err})") from None
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
                        plugin_of[value.tag] = value.metadata.plugin_data.plugin_name
                    kind = value.WhichOneof("value")
                    if kind == "simple_value":
                        scalars.setdefault(value.tag, []).append(
                            (int(event.step), _shortest_float32(value.simple_value)))
                    elif plugin_of.get(value.tag) == "hparams" and value.tag == hp.HPARAMS_TAG:
                        hparams_plugin.update(hp.from_plugin_content(value.metadata.plugin_data.content))
                    elif kind == "tensor" and plugin_of.get(value.tag) == "scalars":
                        array = tensor_util.make_ndarray(value.tensor)
                        if array.size == 1:
                            scalar = float(array.reshape(()))
                            if array.dtype.itemsize == 4:
                                scalar = _shortest_float32(scalar)
                            scalars.setdefault(value.tag, []).append((int(event.step), scalar))
        except CorruptEventFile as err:
            raise CorruptRun(str(err)) from None
        except OSError as err:
            raise UnreadableRun(f"{path}: cannot read ({err})") from None
    run.scalars = _latest_fit_supersedes(run, files, per_file)
    if not run.scalars:
        if hparams_plugin:
            raise HParamsOnly(f"{directory}: event files hold hyper-parameters but no scalars", hparams_plugin)
        raise UnreadableRun(f"{directory}: event files hold no scalars")
    run.hparams = _merge_hparams(directory, hparams_plugin)
    return run


def _writer_order(path: str) -> tuple:
    """An event file's place among the writers of its folder: ``events.out.tfevents.<seconds>.<host>.<pid>.<n>``
    by its creation second, then its counter (the name's order where it does not parse)."""
    parts = os.path.basename(path).split(".")
    try:
        return (0, int(parts[3]), int(parts[-1]), path)
    except (IndexError, ValueError):
        return (1, 0, 0, path)


#: Tags a fit writes at step 0 whatever step it starts from (Lightning's hyper-parameter metric).
_START_TAGS = ("hp_metric",)


def _latest_fit_supersedes(run: Run, files: list[str], per_file: list[dict[str, list[tuple[int, float]]]]
                           ) -> dict[str, list[tuple[int, float]]]:
    """Every file's scalars merged, a later writer's superseding the earlier ones' from the first
    step it logged when that step goes back before the latest step logged so far (TensorBoard's
    rule for orphaned steps: an event older than the most recent one purges those from its step
    on), or starts at it and goes on past it (a fit resumed from the earlier one's last checkpoint
    into its folder: one that crashed read as the earlier, complete fit — a review, round 34). A
    fit run again into the same folder (a re-run CI job with a fixed logger version) starts at step
    0 and replaces the earlier fit whole — its ``run/complete`` and final values were read as the
    new fit's, and a crashed re-run passed the gate (a new user's walk, round 33) — and a fit
    resumed there from a checkpoint keeps the history before its first step. A writer that stays at
    the latest step supersedes nothing: ``trainer.test``/``validate`` after ``fit`` (Lightning
    opens a new event file at the fit's last step) had dropped the fit's final values and
    ``run/complete`` (an engineer's walk, round 34). Files without scalars (a writer of images)
    take no part."""
    merged: dict[str, list[tuple[int, float]]] = {}
    writers = [(path, scalars) for path, scalars in zip(files, per_file) if scalars]
    for path, scalars in writers:
        starts = [step for tag, series in scalars.items() if tag not in _START_TAGS for step, _ in series]
        first = min(starts) if starts else None
        latest = max((step for series in merged.values() for step, _ in series), default=None)
        last = max((step for series in scalars.values() for step, _ in series), default=None)
        # (going back before the latest step, or starting at it and going on past it: a fit resumed
        # from the earlier one's last checkpoint that crashed later; a stage that stays at the latest
        # step, trainer.validate/test after fit, supersedes nothing)
        if first is not None and latest is not None and (first < latest or (first == latest and last > latest)):
            dropped = sum(1 for series in merged.values() for step, _ in series if step >= first)
            if dropped:
                merged = {tag: kept for tag, series in merged.items()
                          if (kept := [(st, v) for st, v in series if st < first])}
                run.notes.append(f"{os.path.basename(path)} is a later fit's log from step {first} on: {dropped} "
                                 f"value(s) that earlier event files in this folder logged from that step are "
                                 "superseded by it")
        for tag, series in scalars.items():
            merged.setdefault(tag, []).extend(series)
    return merged


def _read_csv(directory: str, path: str) -> Run:
    try:
        scalars = read_metrics_csv(path)
    except CorruptCSV as err:
        raise CorruptRun(str(err)) from None
    except OSError as err:
        raise UnreadableRun(f"{path}: cannot read ({err})") from None
    if not scalars:
        raise UnreadableRun(f"{path}: holds no metric values")
    run = Run(directory, scalars=scalars, source="csv", files=[path])
    run.hparams = _merge_hparams(directory, {})
    return run


def _merge_hparams(directory: str, plugin: dict[str, Any]) -> dict[str, Any]:
    try:
        from_yaml = hp.read_yaml(os.path.join(directory, HPARAMS_FILE))
    except ValueError as err:
        raise UnreadableRun(str(err)) from None
    merged = dict(plugin)
    merged.update(from_yaml)
    return merged


def require_complete(run: Run) -> None:
    """Raise :class:`IncompleteRun` when ``run/complete = 1`` was never logged."""
    if run.complete:
        return
    logged = run.final(COMPLETE_TAG)
    why = "never logged" if logged is None else f"logged as {logged}, not 1"
    later = [note for note in run.notes if "later fit" in note]  # (an earlier fit's completion is not this one's)
    steps, _ = run.series(RAISED_TAG)
    how = (f"ended by BoundGate(on_violation='raise') at step {steps[-1]}: a threshold was violated (the fit's "
           "output names it)" if steps else "killed or crashed")
    raise IncompleteRun(f"{run.path}: incomplete run — {COMPLETE_TAG} {why}, so training ended before "
                        f"Trainer.fit finished ({how}; last logged step {run.end_step}). "
                        + "".join(f"{note}. " for note in later) + "Pass --allow-incomplete to use it anyway.")


# --- names and labels ------------------------------------------------------------------------------
def assign_labels(runs: list[Run], given: list[str] | None = None) -> None:
    """Set ``display_name`` and ``label`` of every run.

    The name is the ``run_name`` hyper-parameter when every run has a distinct one, else the run
    directory relative to the common parent of the ``given`` paths (``digits_mlp/version_1`` for
    ``runs/``; ``version_1`` for two runs of ``runs/digits_mlp`` given one by one; a single run given
    directly keeps its parent's name). The label adds the settings that differ between ``runs``:
    ``version_1 (label_noise=0.4)``.
    """
    if not runs:
        return
    paths = [os.path.abspath(r.path) for r in runs]
    base = os.path.commonpath([os.path.abspath(p) for p in given]) if given else os.path.commonpath(paths)
    if any(not (p == base or p.startswith(base.rstrip(os.sep) + os.sep)) for p in paths):
        base = os.path.commonpath(paths)
    while base in paths:  # a run given directly (or runs nested in a run): name it with its parent
        base = os.path.dirname(base) if len(paths) > 1 else os.path.dirname(os.path.dirname(base))
    names = [os.path.relpath(p, base) for p in paths]
    run_names = [str(r.hparams.get("run_name", "")) for r in runs]
    use_run_name = all(run_names) and len(set(run_names)) == len(run_names)
    for run, name, run_name in zip(runs, names, run_names):
        run.display_name = run_name if use_run_name else (f"{name} [{run_name}]" if run_name else name)
    keys = hp.varying_keys([r.hparams for r in runs], aliases="leaf")
    for run in runs:
        parts = [f"{k}={hp.fmt_value(run.hparams[k]) if k in run.hparams else '—'}" for k in keys]
        run.label = f"{run.display_name} ({', '.join(parts)})" if parts else run.display_name


def common_parent(runs: list[Run]) -> str:
    paths = [os.path.abspath(r.path) for r in runs]
    if len(paths) == 1:
        return os.path.dirname(paths[0])
    return os.path.commonpath(paths)


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if float(value).is_integer() and abs(value) < 1e15:  # (a count or a size: setting/d 38410, not 3.841e+04)
        return str(int(value))
    return f"{value:.4g}"
