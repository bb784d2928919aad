"""The parameters a fit trains, as the whole suite sees them: one :class:`TrainableSet` per
LightningModule, shared by every genbounds callback (as the loss contract is).

The set is taken at ``on_train_start`` and taken again, silently, at the fit's first batch when
it differs there: the epoch-start hooks run in between, where a freeze schedule acts
(``requires_grad_(epoch >= k)``, Lightning's ``BaseFinetuning``, which also freezes a backbone in
``on_fit_start``). From the first optimizer step on, it is compared with the module at every
epoch's first batch and before every probe and bound evaluation (a tuple of names: tens of µs for
a ResNet), because a fit may unfreeze or freeze layers as it goes. Either way
:attr:`TrainableSet.version` goes up and each callback rebuilds what it keeps per parameter; a
change after the first step is also recorded (:attr:`TrainableSet.changes`: the bounds need one
set for the whole run) and said — the first with a warning, later ones as an info line. A change
made inside an epoch is seen at the next epoch's first batch, or at a probe before it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from genbounds.callbacks.per_module import KeptOnModule, kept_on
from genbounds.estimators.functional import trainable_parameters


@dataclass(frozen=True)
class Change:
    """One change of the trained parameters, seen at optimizer step ``step``."""

    step: int
    added: tuple[str, ...]
    removed: tuple[str, ...]


class TrainableSet(KeptOnModule):
    """The trained parameters' names (:attr:`names`) and their changes over the fit."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.version = 0
        """Times the set was taken again (changes, and a set taken again before the first step)."""
        self.changes: list[Change] = []
        """Changes after the fit's first optimizer step."""
        self.start_step = 0
        self._all: list[nn.Parameter] = []
        self._flags: tuple[bool, ...] = ()

    @staticmethod
    def shared(pl_module: nn.Module) -> TrainableSet:
        """The suite's set for ``pl_module`` (created on first use, kept on the module)."""
        return kept_on(pl_module, "_genbounds_trainable_set", TrainableSet)

    def take(self, pl_module: nn.Module, step: int) -> None:
        """At ``on_train_start`` (the first caller of a fit takes it; the others find it taken)."""
        if self.names is None:
            self.names = tuple(trainable_parameters(pl_module))
            self.start_step = step
            self._note_flags(pl_module)

    def moved(self) -> bool:
        """Whether a parameter's ``requires_grad`` changed since the set was taken: one flag read a
        parameter tensor (tens of ns each), cheap enough for every measured step, where
        :meth:`check` walks the module. Parameters added to the module are seen by :meth:`check`."""
        return tuple(p.requires_grad for p in self._all) != self._flags

    def _note_flags(self, pl_module: nn.Module) -> None:
        self._all = list(pl_module.parameters())
        self._flags = tuple(p.requires_grad for p in self._all)

    def reset(self) -> None:
        """At the end of a fit, or when it fails: the next fit takes its own."""
        self.names = None
        self.version = 0
        self.changes.clear()
        self._all, self._flags = [], ()

    def check(self, pl_module: nn.Module, step: int, after_backward: bool = False) -> int:
        """Compare with the module now (``step``: optimizer steps taken); a set that differs is
        taken again — before the fit's first step silently, after it as a change, recorded and
        said. ``after_backward``: a backward of this step already ran on the set before (a
        later micro-batch of the first window changed it): a change even before the first step.
        Returns :attr:`version`."""
        now = tuple(trainable_parameters(pl_module))
        if self.names is None:
            self.names, self.start_step = now, step
            self._note_flags(pl_module)
            return self.version
        if now == self.names:
            if self.moved():  # (flags back as they were, or parameter objects replaced: a fresh snapshot)
                self._note_flags(pl_module)
            return self.version
        self._note_flags(pl_module)
        before, after = set(self.names), set(now)
        change = Change(step, tuple(n for n in now if n not in before), tuple(n for n in self.names if n not in after))
        self.names = now
        self.version += 1
        if step == self.start_step and not after_backward:  # (no step taken yet: the set it trains from step 0)
            return self.version
        self.changes.append(change)
        if len(self.changes) == 1:
            rank_zero_warn(
                f"genbounds: the trained parameters changed at step {step} ({describe(change)}). The per-step "
                "statistics and the probes measure the parameters trained at each step from now on (per-layer "
                "series change their layers); the bounds are stated for one parameter set trained from step 0, so "
                "GeneralizationBound's bounds are NaN from here on (flagged bound/valid = 0), while gap/measured "
                "goes on.")
        else:
            rank_zero_info(f"genbounds: the trained parameters changed again at step {step} ({describe(change)}).")
        return self.version


def describe(change: Change) -> str:
    """``unfrozen: backbone.0, backbone.1; frozen: head`` (by layer, the parameters' owners); a layer
    whose parameters were replaced by others (a reparametrization such as pruning's ``weight_orig``)
    as ``replaced: net.0 (weight → weight_orig)``."""

    def by_layer(names: tuple[str, ...]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for n in names:
            owner, leaf = n.rsplit(".", 1) if "." in n else ("(root)", n)
            out.setdefault(owner, []).append(leaf)
        return out

    def shown(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f", … ({len(items)} layers)" if len(items) > 6 else "")

    added, removed = by_layer(change.added), by_layer(change.removed)
    parts = []
    replaced = [o for o in added if o in removed]
    if replaced:
        pairs = [f"{o} ({', '.join(removed[o])} → {', '.join(added[o])})" for o in replaced]
        parts.append("replaced: " + shown(pairs))
    unfrozen = [o for o in added if o not in removed]
    frozen = [o for o in removed if o not in added]
    if unfrozen:
        parts.append("unfrozen: " + shown(unfrozen))
    if frozen:
        parts.append("frozen: " + shown(frozen))
    return "; ".join(parts) or "the same names in another order"
