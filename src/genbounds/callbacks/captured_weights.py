"""How the captured losses enter the training loss, and each batch's own weights read from it.

The loss contract's ``captured`` tier (``loss_contract.py``) records the torch loss calls of
``training_step`` and recomputes them unreduced. Each record enters the returned loss with
coefficients ``c_k = ∂loss/∂value_k`` (:func:`~genbounds.estimators.loss_capture.loss_coefficients`).
Where the trial finds them the same for every batch (a ``mean``, a ``sum``, a fixed divisor) the
contract keeps one :data:`CoefficientSpec` per record and applies it to later batches
(:func:`coefficients_for`). Where they change from batch to batch (per-sample weights or a mask
from the batch, mixup's random λ) :class:`PerBatchRead` reads each batch's own from its returned
loss: a backward through the loss's arithmetic, not the model. docs/math.md §1 derives both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from genbounds.callbacks.isolation import MutedStep, call_training_step, muted_training_step

CLASSIFICATION_LOSSES = ("cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits")


class PerBatchRead:
    """The per-sample losses of a batch whose captured losses are weighted by that batch's own
    returned loss (the contract's ``per_batch``). NaN where they cannot be read, said once per
    kind (:meth:`say_nan`)."""

    def __init__(self) -> None:
        self.exact = False
        """Whether the trial's captured per-sample losses explained its whole returned loss (no
        regularizer beside them): each batch is then checked the same way."""
        self.step_needs_parameters = False
        """Whether ``training_step`` differentiates with respect to its own weights (a gradient
        penalty): the forward is then recorded under ``no_grad`` too."""
        self.nan_said: set[str] = set()

    def losses(self, module: nn.Module, batch: Any, b: int, reseed: Callable[[], None] | None = None
               ) -> tuple[Tensor, list]:
        """The captured per-sample losses of ``batch`` with the weights its own returned loss gives
        them (``c_k = ∂loss/∂value_k``, :func:`~genbounds.estimators.loss_capture.loss_coefficients`:
        a backward through the loss's arithmetic, not the model). Under ``no_grad`` or inference
        mode (an evaluation) the parameters are set not to require gradient for the call, so only
        that arithmetic is recorded, and the losses come back detached. NaN losses (never wrong
        ones): inside a ``torch.func`` transform (no backward can be taken there), where the
        per-element losses were changed in place, where the weights depend on the model (a
        focal-style weight: its gradient would be lost; checked where gradients are asked for),
        and — where the trial's losses explained its whole loss — where a batch's do not (a term
        the trial batch did not have), checked on the device."""
        from genbounds.estimators.loss_capture import _transform_level, combined_per_sample, loss_coefficients

        grad = torch.is_grad_enabled()
        if _transform_level() is not None:
            self.say_nan("in-transform", "the captured losses' weights change from batch to batch and cannot be read "
                          "inside a torch.func transform (a probe's draws_per_pass > 1, hvp_method='forward')")
            return torch.full((b,), math.nan, device=next((p.device for p in module.parameters()), None)), []
        with torch.inference_mode(False), torch.enable_grad():
            batch = outside_inference(batch)
            ran = False  # (a manual-optimization step returns None)
            if not grad and not self.step_needs_parameters:
                try:
                    with parameters_without_grad(module):
                        out, manual, records = captured_step(module, batch, b, leaves=True)
                    ran = True
                except RuntimeError:  # (a step that differentiates with respect to its own weights)
                    self.step_needs_parameters = True
                    if reseed is not None:
                        reseed()
            if not ran:
                out, manual, records = captured_step(module, batch, b, leaves=True)
            returned = returned_loss(out, manual)
            if returned is None:
                raise RuntimeError("genbounds: training_step returned no loss on a probe batch")
            nan = torch.full((b,), math.nan, dtype=torch.promote_types(returned.dtype, torch.float32),
                             device=returned.device)
            if not records or not returned.requires_grad:
                return nan, records
            coefficients, remainder = loss_coefficients(returned, records, create_graph=grad)
            if coefficients.requires_grad:
                self.say_nan("model-weights", "training_step weights its captured losses by values that depend on "
                              "the model (a focal-style weight?): their gradients would miss that dependence")
                return nan, records
            remainder = remainder.detach()
            try:
                losses = combined_per_sample(records, coefficients, b)
            except ValueError as err:  # (per-element losses changed in place)
                self.say_nan("in-place", str(err))
                return nan, records
            if self.exact:
                rest = remainder.to(torch.float64).abs()
                ok = rest <= 1e-5 * returned.detach().to(torch.float64).abs() + 1e-7
                losses = torch.where(ok, losses, nan.to(losses.dtype))
                if not grad and "remainder" not in self.nan_said and not bool(ok):
                    # (a host read in an evaluation's call only, and only until said)
                    if not self.nonfinite(returned):  # (a NaN loss: not a term beyond the captured ones)
                        self.say_nan("remainder", f"a batch's loss holds a term beyond its captured losses (of "
                                      f"{float(returned):.6g}, {float(remainder):.6g} unexplained), which the trial "
                                      "batch's did not")
        return (losses if grad else losses.detach()), records

    def nonfinite(self, returned: Tensor) -> bool:
        """Whether a batch's returned loss is itself not finite (every target ignored: a mean over
        no element; a NaN in the batch), said once: its per-sample losses are NaN, which is no fault
        of the capture (one host read: callers ask only where a check already failed)."""
        value = float(returned)
        if math.isfinite(value):
            return False
        if "nonfinite" not in self.nan_said:
            self.nan_said.add("nonfinite")
            rank_zero_warn(f"genbounds: a batch's loss as training_step returned it is {value} (every target "
                           "ignore_index, a mean over no element? a NaN in the batch?): its per-sample losses are NaN, "
                           "and what is measured on it is left out.")
        return True

    def say_nan(self, kind: str, why: str) -> None:
        """Once per kind: why some batches' per-sample losses are NaN."""
        if kind not in self.nan_said:
            self.nan_said.add(kind)
            rank_zero_warn(f"genbounds: {why}: those per-sample losses are NaN (never wrong); add "
                           "`per_sample_loss(self, batch)` to your LightningModule to give them.")


def returned_loss(out: Any, muted: MutedStep) -> Tensor | None:
    if isinstance(out, Tensor) and out.numel() == 1:
        return out.reshape(())
    if isinstance(out, dict) and isinstance(out.get("loss"), Tensor):
        return out["loss"].reshape(())
    if muted.manual_losses:
        total = muted.manual_losses[0]
        for extra in muted.manual_losses[1:]:
            total = total + extra
        return total.reshape(())
    return None


CoefficientSpec = float | tuple[str, float]
"""A captured record's coefficient in the training loss: a number for a reduced loss (``'mean'``,
``'sum'``, …: ``∂loss/∂value``), ``("mean", m)`` for an unreduced one averaged into the loss
(every element weighted ``m / numel``, e.g. ``F.cross_entropy(…, reduction="none").mean()``:
``m = 1``), ``("fixed", c)`` for one weighted the same whatever the batch's size (``.sum()``:
``c = 1``; ``.sum() / 128``)."""


def coefficient_spec(record: Any, c: Tensor) -> CoefficientSpec | None:
    """The spec of one record from its coefficients on the trial batch; ``None`` for an unreduced
    loss whose elements are weighted unequally (weights that belong to that batch)."""
    if record.combine != "none":
        return float(c.reshape(-1)[0])
    n = c.numel()
    if n == 0:
        return ("mean", 0.0)
    first = float(c.reshape(-1)[0])
    if not bool(torch.all(torch.abs(c - first) <= 1e-12 * max(abs(first), 1e-300))):
        return None
    return ("mean", first * n)  # (or "fixed": told apart on a second batch size, LossContract._sizes_told)


def coefficients_for(records: list, specs: list[CoefficientSpec] | None) -> Tensor | None:
    """The coefficient vector of ``records`` (another batch's, maybe of another size) from the
    trial's specs; ``None`` when the records do not match them (another structure)."""
    if specs is None or len(records) != len(specs):
        return None
    parts = []
    for r, spec in zip(records, specs):
        n = r.value.numel()
        if isinstance(spec, tuple):
            if r.combine != "none":
                return None
            kind, m = spec
            parts.append(torch.full((n,), m if kind == "fixed" else m / max(n, 1), dtype=torch.float64))
        else:
            if r.combine == "none":
                return None
            parts.append(torch.full((n,), float(spec), dtype=torch.float64))
    return torch.cat(parts) if parts else None


def scores_one_prediction_twice(records: list) -> bool:
    """Whether two captured classification losses score the very same prediction tensor (mixup's
    ``CE(out, y)`` and ``CE(out, y[perm])``; a two-headed model's losses score two)."""
    inputs = [r.arguments.get("input") for r in records if r.name in CLASSIFICATION_LOSSES]
    inputs = [t for t in inputs if isinstance(t, Tensor)]
    return any(inputs[i] is inputs[j] for i in range(len(inputs)) for j in range(i + 1, len(inputs)))


def same_spec(a: CoefficientSpec | None, b: CoefficientSpec | None) -> bool:
    """Two specs of one record equal (to rounding)."""
    if a is None or b is None or isinstance(a, tuple) != isinstance(b, tuple):
        return False
    if isinstance(a, tuple):
        assert isinstance(b, tuple)
        return a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-12)
    assert not isinstance(b, tuple)
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


@contextmanager
def parameters_without_grad(module: nn.Module) -> Iterator[None]:
    """The module's parameters set not to require gradient for the block (then restored): a call
    under recorded gradients records only what follows its loss values (made leaves)."""
    flipped = [p for p in module.parameters() if p.requires_grad]
    for p in flipped:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


def outside_inference(batch: Any) -> Any:
    """``batch`` with its inference-mode tensors cloned (autograd cannot record them)."""
    from genbounds.estimators.batching import map_tensors

    return map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def captured_step(module: nn.Module, batch: Any, b: int, leaves: bool = False) -> tuple[Any, MutedStep, list]:
    """``training_step`` on ``batch``, muted, with its torch loss calls captured: its output, the
    muted step (the losses given to ``manual_backward``) and the records that map to samples
    (``leaves``: see ``LossCapture``)."""
    from genbounds.estimators.loss_capture import LossCapture

    with muted_training_step(module) as manual, LossCapture(batch_size=b, leaves=leaves) as cap:
        out = call_training_step(module, batch)
    return out, manual, [r for r in cap.records if r.mappable]


def per_record(coefficients: Tensor, records: list) -> tuple[Tensor, ...]:
    """``loss_coefficients``' vector split by record (a reduced record has one, an unreduced one
    one per element)."""
    return torch.split(coefficients, [r.value.numel() for r in records])
