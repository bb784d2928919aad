"""``genbounds gate`` semantics: thresholds on final values, failing closed.

A gated metric whose final value is

* **NaN** (``nan``),
* **infinite** (``±inf``: no bound or measurement is infinite where it holds; never lenient),
* **missing** (never logged in the run), or
* **stale** (its last step is older than the run's end: the step of ``run/complete``, else the
  largest step of any scalar; by more than ``stale_tolerance`` steps, default 1 because Lightning
  logs its own metrics at ``global_step - 1``)

violates its threshold unless the case is made lenient (``lenient={"nan", "missing", "stale"}``),
which turns it into a warning. A stale value that is lenient is still compared with the threshold.
The plain comparison is ``value > max`` / ``value < min`` (same as
:func:`genbounds.callbacks.bound_gate.check_thresholds`); infinite limits are allowed, NaN limits are
refused by :func:`parse_threshold`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from genbounds.reporting.events import Run, fmt

LENIENT_CASES = ("nan", "missing", "stale")


@dataclass(frozen=True)
class Threshold:
    metric: str
    kind: str  # "max" or "min"
    limit: float

    @property
    def rule(self) -> str:
        return f"{'<=' if self.kind == 'max' else '>='} {self.limit:g}"


def parse_threshold(text: str, kind: str) -> Threshold:
    """``METRIC=VALUE`` → :class:`Threshold`. Raises ValueError on a malformed or NaN limit."""
    if "=" not in text:
        raise ValueError(f"expected METRIC=VALUE, got {text!r}")
    name, value = text.rsplit("=", 1)
    name = name.strip()
    if not name:
        raise ValueError(f"no metric name in {text!r}")
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number (in {text!r})") from None
    if math.isnan(limit):
        raise ValueError(f"--{kind} {text}: a NaN limit can never be crossed, so the check could never fail")
    return Threshold(name, kind, limit)


@dataclass
class Check:
    metric: str
    kind: str
    limit: float
    value: float | None
    step: int | None
    end_step: int | None
    status: str  # "pass", "fail" or "warn"
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "kind": self.kind, "limit": self.limit, "value": self.value,
                "step": self.step, "end_step": self.end_step, "status": self.status, "reason": self.reason}


@dataclass
class Verdict:
    path: str
    name: str
    label: str
    status: str  # "PASS", "FAIL" or "ERROR"
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    complete: bool | None = None
    end_step: int | None = None
    source: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"PASS": 0, "FAIL": 1}.get(self.status, 2)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.name, "label": self.label, "path": self.path, "status": self.status,
                "exit_code": self.exit_code, "complete": self.complete, "end_step": self.end_step,
                "source": self.source, "error": self.error, "notes": list(self.notes),
                "checks": [c.as_dict() for c in self.checks]}


def _missing_reason(run: Run, metric: str) -> str:
    tags = run.tags()
    guesses = difflib.get_close_matches(metric, tags, n=3, cutoff=0.5)
    prefix = metric.split("/", 1)[0] + "/" if "/" in metric else ""
    near = [t for t in tags if prefix and t.startswith(prefix)] or tags
    shown = ", ".join(near[:12]) + (f", … (+{len(near) - 12} more)" if len(near) > 12 else "")
    scope = f"under {prefix}" if prefix and near is not tags else "tags"
    reason = f"missing (never logged) — available {scope}: {shown or 'none'}"
    if guesses:
        reason += f"; did you mean {' or '.join(guesses)}?"
    return reason


#: Lightning logs its own step and epoch-end metrics at ``global_step - 1`` while callbacks (the
#: bounds, ``run/complete``) log at ``global_step``: one step of slack before a value counts as stale.
DEFAULT_STALE_TOLERANCE = 1


def check_run(run: Run, thresholds: list[Threshold], lenient: set[str] | frozenset[str] = frozenset(),
              stale_tolerance: int = DEFAULT_STALE_TOLERANCE) -> list[Check]:
    """One :class:`Check` per threshold on ``run``'s final values."""
    end = run.end_step
    checks = []
    for th in thresholds:
        point = run.final_point(th.metric)
        if point is None:
            status = "warn" if "missing" in lenient else "fail"
            reason = _missing_reason(run, th.metric) + (" (lenient: missing)" if status == "warn" else "")
            checks.append(Check(th.metric, th.kind, th.limit, None, None, end, status, reason))
            continue
        step, value = point
        if math.isnan(value):
            status = "warn" if "nan" in lenient else "fail"
            reason = f"nan: the final value (step {step}) is NaN" + (" (lenient: nan)" if status == "warn" else "")
            checks.append(Check(th.metric, th.kind, th.limit, value, step, end, status, reason))
            continue
        if math.isinf(value):  # (±inf passed a max or a min: a new user's walk, round 33)
            checks.append(Check(th.metric, th.kind, th.limit, value, step, end, "fail",
                                f"infinite: the final value (step {step}) is {fmt(value)}"))
            continue
        crossed = value > th.limit if th.kind == "max" else value < th.limit
        comparison = f"{fmt(value)} {'>' if th.kind == 'max' else '<'} {th.kind} {th.limit:g}" if crossed \
            else f"{fmt(value)} {th.rule}"
        if end is not None and step < end - stale_tolerance:
            stale = f"stale: last logged at step {step}, run ended at step {end}"
            if "stale" not in lenient:
                checks.append(Check(th.metric, th.kind, th.limit, value, step, end, "fail",
                                    f"{stale} (last value {fmt(value)})"))
            elif crossed:
                checks.append(Check(th.metric, th.kind, th.limit, value, step, end, "fail",
                                    f"{comparison}; also {stale}"))
            else:
                checks.append(Check(th.metric, th.kind, th.limit, value, step, end, "warn",
                                    f"{comparison}, but {stale} (lenient: stale)"))
            continue
        checks.append(Check(th.metric, th.kind, th.limit, value, step, end, "fail" if crossed else "pass",
                            comparison))
    return checks


def verdict_for(run: Run, thresholds: list[Threshold], lenient: set[str] | frozenset[str] = frozenset(),
                stale_tolerance: int = DEFAULT_STALE_TOLERANCE) -> Verdict:
    checks = check_run(run, thresholds, lenient, stale_tolerance)
    status = "FAIL" if any(c.status == "fail" for c in checks) else "PASS"
    return Verdict(run.path, run.name, run.label or run.name, status, checks, complete=run.complete,
                   end_step=run.end_step, source=run.source, notes=list(run.notes))


def format_text(verdicts: list[Verdict], thresholds: list[Threshold]) -> str:
    rules = ", ".join(f"{t.metric} {t.rule}" for t in thresholds)
    lines = [f"genbounds gate: {len(verdicts)} run(s); thresholds: {rules}"]
    for v in verdicts:
        lines.append("")
        if v.status == "ERROR":
            lines.append(f"ERROR {v.label}: {v.error}")
            continue
        warns = sum(c.status == "warn" for c in v.checks)
        fails = sum(c.status == "fail" for c in v.checks)
        extra = f"{fails} violation(s)" if fails else "all thresholds hold"
        if warns:
            extra += f", {warns} warning(s)"
        where = f"{v.path}, {v.source}, " + (f"ended at step {v.end_step}" if v.complete
                                             else f"INCOMPLETE (allowed), last step {v.end_step}")
        lines.append(f"{v.status} {v.label} — {extra} [{where}]")
        for note in v.notes:
            lines.append(f"    note: {note}")
        width = max(len(c.metric) for c in v.checks)
        for c in v.checks:
            mark = {"pass": "ok  ", "fail": "FAIL", "warn": "warn"}[c.status]
            lines.append(f"    {mark} {c.metric:<{width}}  {c.reason}")
    counts = {s: sum(v.status == s for v in verdicts) for s in ("PASS", "FAIL", "ERROR")}
    code = max((v.exit_code for v in verdicts), default=2)
    lines.append("")
    worst = [v.label for v in verdicts if v.exit_code == code and code != 0]
    lines.append(f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['ERROR']} unreadable "
                 f"-> exit {code}" + (f" because of: {'; '.join(worst)}" if worst else ""))
    return "\n".join(lines)
