"""The parameters a fit trains, as the whole suite sees them: one :class:`TrainableSet` per
LightningModule, shared by every genbounds callback (as the loss contract is).

The set is taken at ``on_train_start``, after ``on_fit_start``, where Lightning's
``BaseFinetuning`` callbacks (``BackboneFinetuning``) freeze a backbone before step 0; taken at
``setup`` it held parameters that never train. It is compared with the module again at every
epoch's first batch and before every probe and bound evaluation (a tuple of names: tens of µs for
a ResNet, once an epoch), because a fit may unfreeze or freeze layers as it goes (a backbone
unfrozen at an epoch, ``requires_grad_`` in a hook). A change bumps :attr:`TrainableSet.version`
and is said once, naming the layers; each callback rebuilds what it keeps per parameter when it
sees a version it has not seen. A change made inside an epoch is seen at the next epoch's first
batch (or at a probe before it).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from genbounds.estimators.functional import trainable_parameters


@dataclass(frozen=True)
class Change:
    """One change of the trained parameters, seen at optimizer step ``step``."""

    step: int
    added: tuple[str, ...]
    removed: tuple[str, ...]


class TrainableSet:
    """The trained parameters' names (:attr:`names`) and their changes over the fit."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.version = 0
        """How many times the set changed since ``on_train_start`` (0: the set the fit started with)."""
        self.changes: list[Change] = []

    @staticmethod
    def shared(pl_module: nn.Module) -> TrainableSet:
        """The suite's set for ``pl_module`` (created on first use, kept on the module)."""
        found = pl_module.__dict__.get("_genbounds_trainable_set")
        if found is None:
            found = TrainableSet()
            pl_module.__dict__["_genbounds_trainable_set"] = found
        return found

    def take(self, pl_module: nn.Module) -> None:
        """At ``on_train_start`` (the first caller of a fit takes it; the others find it taken)."""
        if self.names is None:
            self.names = tuple(trainable_parameters(pl_module))

    def reset(self) -> None:
        """At the end of a fit: the next fit takes its own."""
        self.names = None
        self.version = 0
        self.changes.clear()

    def check(self, pl_module: nn.Module, step: int) -> int:
        """Compare with the module now; on a change, record and say it (once per change).
        Returns :attr:`version`."""
        if self.names is None:
            self.take(pl_module)
            return self.version
        now = tuple(trainable_parameters(pl_module))
        if now == self.names:
            return self.version
        before, after = set(self.names), set(now)
        change = Change(step, tuple(n for n in now if n not in before), tuple(n for n in self.names if n not in after))
        self.names = now
        self.version += 1
        self.changes.append(change)
        rank_zero_warn(
            f"genbounds: the trained parameters changed at step {step} ({describe(change)}). The per-step "
            "statistics and the probes measure the parameters trained at each step from now on (per-layer series "
            "change their layers); the bounds are stated for one parameter set trained from step 0, so "
            "GeneralizationBound's bounds are NaN from here on (flagged bound/valid = 0), while gap/measured goes on.")
        return self.version


def describe(change: Change) -> str:
    """``unfrozen: backbone.0, backbone.1; frozen: head`` (by layer, the parameters' owners)."""

    def layers(names: tuple[str, ...]) -> str:
        owners = list(dict.fromkeys(n.rsplit(".", 1)[0] if "." in n else "(root)" for n in names))
        shown = ", ".join(owners[:6]) + (f", … ({len(owners)} layers)" if len(owners) > 6 else "")
        return shown

    parts = []
    if change.added:
        parts.append("unfrozen: " + layers(change.added))
    if change.removed:
        parts.append("frozen: " + layers(change.removed))
    return "; ".join(parts) or "the same names in another order"
