"""The loss contract: how every genbounds callback gets the losses of a batch at given weights.

One :class:`LossContract` per LightningModule is shared by the whole suite (resolved once; one
message names every callback and what it needs). Tiers, in order of priority:

1. ``loss_fn=`` given to a callback — ``loss_fn(pl_module, batch) -> per-sample losses`` (an
   import path in YAML). A callback without its own ``loss_fn`` uses the suite's when exactly one
   distinct ``loss_fn`` was given.
2. a ``per_sample_loss(self, batch)`` method on the LightningModule.
3. **automatic** — nothing to add to the module. Extra passes run the module's own
   ``training_step`` inside :func:`~genbounds.callbacks.isolation.muted_training_step` (no
   logging, no metric updates, no optimizer effects) while
   :class:`~genbounds.estimators.loss_capture.LossCapture` records the calls to torch's loss
   functions and recomputes them with ``reduction="none"`` on the same tensors:

   * ``captured`` — per-sample losses ``ℓ_i`` whose mean is the training loss (the coefficients of
     the captured terms in the returned loss come from one tiny backward, once; where they change
     from batch to batch — per-sample weights from the batch, mixup's random λ — from each batch's
     own returned loss, ``per_batch``);
   * ``returned`` — nothing captured (a hand-written loss): the batch-mean loss that
     ``training_step`` returns; estimators that need only a mean (micro-batch dispersion, Hessian
     trace/eigenvalue, flatness, contractivity, half-split Γ, the measured gap) still run, the
     per-sample-only parts are named once.

The tier is settled by a **trial** at ``on_train_start`` on one training batch, before step 0:
run the contract once (isolated), compare the per-sample mean with the loss ``training_step``
returned (one host sync, once). When they agree, backends may read the training step's own
backward (per-sample norm hooks, accumulation micro-steps); when the returned loss holds a term
the per-sample losses do not (a regularizer such as ``0.01 * w.pow(2).sum()``), the per-sample
losses keep the data term only and those backends are disabled, with one warning.

Per-sample losses are always on the scale of the training objective: ``mean_i ℓ_i`` equals the
loss ``training_step`` returns (a ``sum`` reduction gives ``ℓ_i = b ×`` the unreduced loss). The
bounds and the measured gap are both stated for that ``ℓ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from genbounds.callbacks.captured_weights import (CLASSIFICATION_LOSSES, CoefficientSpec, PerBatchRead, captured_step,
                                                  coefficient_spec, coefficients_for, outside_inference, per_record,
                                                  returned_loss, same_spec, scores_one_prediction_twice)
from genbounds.callbacks.isolation import as_training_batch, call_training_step, isolated_pass, muted_training_step
from genbounds.callbacks.per_module import KeptOnModule, kept_on
from genbounds.callbacks.step_draws import DrawSeeds, host_rng_states, replayed_draws
from genbounds.callbacks.user_state import generator_states, module_generators, same_states
from genbounds.estimators.batching import batch_size
from genbounds.estimators.coupling import has_train_batchnorm, losses_couple
from genbounds.estimators.functional import LossFn, graph_nodes

COUPLING_PARTS = 4
"""Runs of the trial batch's samples the coupling check takes (``estimators/coupling.py``)."""

UserLossFn = Callable[[LightningModule, Any], Tensor]

@dataclass
class Need:
    owner: str
    per_sample: bool
    what: str
    """What the callback loses when only a batch-mean loss is available."""
    gradients: bool = False
    """Whether its passes take gradients by ``torch.autograd.grad`` (not possible through
    ``torch.utils.checkpoint(use_reentrant=True)``)."""


@dataclass
class TrialResult:
    tier: str
    per_sample: bool
    reads_training_backward: bool
    errors: bool
    notes: list[str] = field(default_factory=list)


class LossContract(KeptOnModule):
    """The losses of a batch for one LightningModule (see the module docstring). Callable as the
    estimators' ``loss_fn(module, batch)``: a 1-d tensor of per-sample losses, or — in the
    ``returned`` tier — a 1-element tensor holding the batch mean."""

    def __init__(self) -> None:
        self.explicit: dict[str, UserLossFn] = {}
        self.needs: list[Need] = []
        self.tier: str | None = None
        self.per_sample = False
        self.reads_training_backward = False
        self.errors_available = False
        self.stochastic = False
        """Whether the trial's ``training_step`` drew from the global RNG (dropout, noise): an extra
        pass then runs with other random numbers than the training step it describes."""
        self.coupled = False
        """Whether the trial's per-sample losses depend on each other (``estimators/coupling.py``)."""
        self.reentrant_checkpoint = False
        """Whether the trial's loss was computed through ``torch.utils.checkpoint(use_reentrant=True)``,
        whose backward ``torch.autograd.grad`` cannot take: passes that need it measure nothing."""
        self._draw_seeds = DrawSeeds()
        self._read = PerBatchRead()
        """Each batch's weights read from its own loss, where ``per_batch`` (``captured_weights.py``)."""
        self._errors_off = False
        """Whether a batch scored one prediction against several targets by weights read per batch
        (mixup seen after the trial): no 0-1 error from then on, for any batch."""
        self._mean_checked = False
        """Whether the captured per-sample losses' mean was the returned loss on the trial batch: then
        every later batch's is checked too (NaN losses where it is not)."""
        self.coefficients: list[CoefficientSpec] | None = None
        """How each captured record enters the training loss (:func:`coefficient_spec`), settled by
        the trial and applied to every later batch's records."""
        self.per_batch = False
        """Whether the captured records' weights in the training loss change from batch to batch
        (per-sample weights or a mask from the batch, mixup's random λ): each batch's are then read
        from its own returned loss (``captured_weights.PerBatchRead``) instead of the trial's specs."""
        self.notes: list[str] = []
        self.warned = False
        """Whether the trial's notes were already given to the user as a warning (callbacks then
        refer to it instead of repeating them)."""
        self._default: LossFn | None = None
        self._error_record: int | None = None
        self._resolved = False

    # ------------------------------------------------------------------ construction
    @staticmethod
    def shared(pl_module: nn.Module) -> LossContract:
        """The suite's contract of ``pl_module`` (created on first use, kept on the module)."""
        return kept_on(pl_module, "_genbounds_loss_contract", LossContract)

    def register(self, owner: str, loss_fn: UserLossFn | None, *, per_sample: bool = False, what: str = "",
                 gradients: bool = False) -> LossFn:
        """Called from a callback's ``setup``: declare what it needs; returns its ``loss_fn``."""
        if loss_fn is not None:
            if not callable(loss_fn):
                raise MisconfigurationException(f"{owner}(loss_fn={loss_fn!r}) must be callable")
            self.explicit[owner] = loss_fn
        self.needs = [n for n in self.needs if n.owner != owner] + [Need(owner, per_sample, what, gradients)]
        if loss_fn is not None:
            return _UserLoss(loss_fn)
        return self

    # ------------------------------------------------------------------ resolution
    def resolve(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> TrialResult:
        """Settle the tier on one training ``batch`` (once; later calls return the same result)."""
        if self._resolved:
            return self.result
        self._resolved = True
        explicit = {id(f): f for f in self.explicit.values()}
        if callable(getattr(pl_module, "per_sample_loss", None)):
            self.tier, self._default = "per_sample_loss", _module_per_sample_loss
        elif len(explicit) == 1:
            only = next(iter(explicit.values()))
            self.tier, self._default = "loss_fn", _UserLoss(only)
            shared_with = [n.owner for n in self.needs if n.owner not in self.explicit]
            if shared_with:
                rank_zero_info(f"genbounds: the loss_fn given to {sorted(self.explicit)} also serves {shared_with}.")
        else:
            self.tier = "automatic"
        self._trial(pl_module, batch)
        self._report(pl_module)
        return self.result

    @property
    def per_sample_method(self) -> str:
        """How an exact per-sample-gradient pass may evaluate these losses: ``"vmap"`` over single
        samples for a plain per-sample function, ``"jacobian"`` (one forward of the whole batch)
        when a loss depends on its batch (captured from ``training_step``, or a sum rescaled by
        the batch size)."""
        if self.tier in ("per_sample_loss", "loss_fn") and not isinstance(self._default, _SumScaled) \
                and not self.coupled:  # (a coupled loss on one sample alone is another loss)
            return "vmap"
        return "jacobian"

    @property
    def result(self) -> TrialResult:
        return TrialResult(self.tier or "unresolved", self.per_sample, self.reads_training_backward,
                           self.errors_available, list(self.notes))

    def _trial(self, module: LightningModule, batch: Any) -> None:
        from genbounds.estimators.loss_capture import LossCapture, combined_per_sample, loss_coefficients

        b = batch_size(batch)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            rng = torch.get_rng_state()
            cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
            with ExitStack() as stack:
                stack.enter_context(isolated_pass(module, mode="keep", grad=True))
                host = host_rng_states()  # (inside the pass's fork of them)
                gens = module_generators(module)  # (restored by muted_training_step)
                kept = generator_states(gens)
                manual = stack.enter_context(muted_training_step(module))
                cap = stack.enter_context(LossCapture(batch_size=b))
                out = call_training_step(module, batch)
                # (inside the fork: whether training_step drew random numbers, e.g. dropout masks,
                # or mixup's λ from Python's or NumPy's generator)
                self.stochastic = not torch.equal(torch.get_rng_state(), rng) or (
                    cuda_rng is not None and not torch.equal(torch.cuda.get_rng_state(device), cuda_rng)
                ) or host_rng_states() != host or not same_states(kept, generator_states(gens))
                returned = returned_loss(out, manual)
                self.reentrant_checkpoint = returned is not None and _through_reentrant_checkpoint(returned)
                records = [r for r in cap.records if r.mappable]
                classification = [i for i, r in enumerate(records) if r.name in CLASSIFICATION_LOSSES]
                if self.tier == "automatic":
                    self._settle_automatic(module, batch, returned, records, rng, loss_coefficients,
                                           combined_per_sample)
                self._error_record = classification[0] if classification else None
                if self.per_batch and scores_one_prediction_twice(records):
                    # (mixup: one prediction scored against two targets, by weights that change)
                    self._error_record = None
                    rank_zero_info("genbounds: training_step scores its predictions against more than one target by "
                                   "weights that change from batch to batch (mixup?): no per-sample 0-1 error is "
                                   "taken from it, so the bounds on the 0-1 error are left out.")
                user_per_sample = None
                if self.tier in ("per_sample_loss", "loss_fn"):
                    # the same dropout masks as training_step's forward: replay the RNG state
                    torch.set_rng_state(rng)
                    if cuda_rng is not None:
                        torch.cuda.set_rng_state(cuda_rng, device)
                    assert self._default is not None
                    user_per_sample = self._default(module, batch)
        if self.tier in ("per_sample_loss", "loss_fn"):
            self.per_sample = True
            self.reads_training_backward = _agrees(returned, user_per_sample, [], "the per-sample losses")
            if not self.reads_training_backward and user_per_sample is not None and \
                    _agrees(returned, user_per_sample * user_per_sample.shape[0], [], "b ×"):
                # a sum reduction: ℓ_i on the training objective's scale is b × the unreduced loss
                assert self._default is not None
                self._default = _SumScaled(self._default)
                self.reads_training_backward = True
                self.notes.append("training_step's loss is the sum of the per-sample losses: genbounds uses "
                                  "b × per_sample_loss, whose mean is the training loss")
            elif not self.reads_training_backward:
                _agrees(returned, user_per_sample, self.notes, "the per-sample losses")
        self.errors_available = callable(getattr(module, "per_sample_error", None)) or self._error_record is not None
        if self.reads_training_backward and len(manual.manual_losses) > 1:
            # (each backward's rows are read apart: ‖a‖² + ‖b‖² where the step's gradient is ‖a + b‖²)
            self.reads_training_backward = False
            self.notes.append(
                f"training_step calls manual_backward {len(manual.manual_losses)} times on one batch: the per-sample "
                "rows of separate backward passes cannot be added up per sample, so the dispersion is taken by an "
                "extra pass on the per-sample losses (their sum)")
        # the trial's graph (the whole batch's activations) let go before the coupling check: held
        # through it, the heap grew to two passes' size and the check's lasting allocations (first-use
        # caches) landed at its top, where the heap could not shrink below them — the CNN's peak
        # growth +42 MiB over plain training (round 33; benchmarks/setup_heap.py)
        del out, returned, user_per_sample, records, cap, manual
        if self.per_sample and not has_train_batchnorm(module):
            # (train-mode BatchNorm couples the samples too; it has estimators of its own)
            try:
                with torch.random.fork_rng(devices=devices, device_type=device.type), \
                        isolated_pass(module, mode="keep", grad=True):
                    # four runs of the batch's samples, the t-th as batch_idx t: a step that
                    # couples on some draws (mixup applied with a probability: each run draws
                    # again) shows it in one; one that couples on some batches only where those
                    # batches capture the trial batch's losses (an in-batch term of its own on odd
                    # batches captures others: read per batch, not with gradient — not seen)
                    for t in range(COUPLING_PARTS):
                        with as_training_batch(t):
                            self.coupled = losses_couple(lambda part: self(module, part), batch, b, part=t)
                        if self.coupled:
                            break
            except Exception:  # noqa: BLE001 - a check the user's step cannot take says nothing
                self.coupled = False
        if self.coupled and self.per_sample:
            self.reads_training_backward = False
            self.notes.append(
                "the per-sample losses depend on the other samples of the batch (a sample's loss reads entries of a "
                "layer's output that other samples' losses read: in-batch negatives, a contrastive or ranking loss, "
                "mixup between hidden states?): the "
                "training backward's rows are not per-sample gradients, so the dispersion is taken from the "
                "gradients of the per-sample losses through the whole batch (a decomposition: their mean is the batch "
                "gradient)")

    def _sizes_told(self, module: nn.Module, batch: Any, specs: list, full_sizes: list[int], rng: Tensor,
                    loss_coefficients: Callable) -> list | None:
        """``specs`` with each unreduced loss averaged into the training loss (``.mean()``: weights
        ``m/numel``) told from one weighted the same at any size (``.sum()``, ``.sum() / 128``), by
        the first half of the trial batch (its RNG replayed), once; ``None`` when some is neither (a
        mask or weights uniform on the trial batch only)."""
        from genbounds.estimators.batching import index_batch

        half = batch_size(batch) // 2
        if half < 1:
            return specs
        torch.set_rng_state(rng)
        out, manual, records = captured_step(module, index_batch(batch, slice(0, half)), half)
        returned = returned_loss(out, manual)
        if returned is None or not returned.requires_grad or len(records) != len(specs):
            return specs
        coefficients, _ = loss_coefficients(returned, records)
        told: list = []
        for spec, r, c, n_full in zip(specs, records, per_record(coefficients, records), full_sizes):
            if not isinstance(spec, tuple):
                told.append(spec)
                continue
            got = coefficient_spec(r, c)
            m_full, m_half = spec[1], (got[1] if got is not None else math.nan)
            c_full, c_half = m_full / max(n_full, 1), m_half / max(c.numel(), 1)
            if math.isclose(m_half, m_full, rel_tol=1e-6, abs_tol=1e-12):
                told.append(("mean", m_full))  # (m / numel at both sizes)
            elif math.isclose(c_half, c_full, rel_tol=1e-6, abs_tol=1e-15):
                told.append(("fixed", c_full))  # (the same weight at both sizes)
            else:
                return None
        return told

    def _redraw_differs(self, module: nn.Module, batch: Any, specs: list, loss_coefficients: Callable) -> bool:
        """Whether ``training_step``, run once more on the trial batch with the random streams
        going on (another draw), weights its captured losses otherwise than ``specs`` (mixup's
        λ; a dropout mask alone leaves the weights as they were). Once, for a step that drew."""
        out, manual, records = captured_step(module, batch, batch_size(batch))
        returned = returned_loss(out, manual)
        if returned is None or not returned.requires_grad or len(records) != len(specs):
            return True
        coefficients, _ = loss_coefficients(returned, records)
        again = [coefficient_spec(r, c) for r, c in zip(records, per_record(coefficients, records))]
        return not all(same_spec(a, b) for a, b in zip(specs, again))

    def _batch_mean_only(self, note: str) -> None:
        """The ``returned`` tier: only the batch-mean loss ``training_step`` returns, and why."""
        self.tier, self.per_sample, self.reads_training_backward = "returned", False, False
        self.notes.append(note)

    def _settle_automatic(self, module: nn.Module, batch: Any, returned: Tensor | None, records: list, rng: Tensor,
                          loss_coefficients: Callable, combined_per_sample: Callable) -> None:
        if records and returned is not None and returned.requires_grad:
            # (with their own graph where they depend on the model: a focal or learned weight, refused below)
            coefficients, remainder = loss_coefficients(returned, records, create_graph=True)
            model_weights = coefficients.requires_grad
            coefficients, remainder = coefficients.detach(), remainder.detach()
            parts = per_record(coefficients, records)
            used = [k for k, c in enumerate(parts) if bool((c != 0).any())]
            specs: list | None = [coefficient_spec(r, c) for r, c in zip(records, parts)]
            # weights that no spec describes for another batch — element by element (per-sample
            # weights, a mask), drawn at random (mixup's λ), or not told apart by size — are read
            # from each batch's own loss instead (PerBatchRead)
            varying = any(specs[k] is None for k in used)
            if used and not varying and self.stochastic:
                varying = self._redraw_differs(module, batch, specs, loss_coefficients)
            if used and not varying and any(isinstance(c, tuple) for c in specs):
                told = self._sizes_told(module, batch, specs, [r.value.numel() for r in records], rng,
                                        loss_coefficients)
                varying, specs = told is None, told if told is not None else specs
            names = ", ".join(sorted({records[k].name for k in used}))
            if used and model_weights:
                self._batch_mean_only(
                    f"training_step weights the captured {names} by values that depend on the model (a focal-style "
                    "weight, a learned task weight?): per-sample losses with those weights held fixed would have "
                    "other gradients, so only the returned batch-mean loss is used (add "
                    "`per_sample_loss(self, batch)`)")
                return
            try:
                per_sample = combined_per_sample(records, coefficients, batch_size(batch)) if used else None
            except ValueError as err:  # (per-element losses changed in place: `l.mul_(w)`)
                self._batch_mean_only(f"the captured {names} cannot be split by sample ({err}): only the returned "
                                      "batch-mean loss is used (add `per_sample_loss(self, batch)`)")
                return
            if used:
                self.tier = "captured"
                self.per_sample = True
                self.per_batch = varying
                self.coefficients = None if varying else specs
                exact = _agrees(returned - remainder, per_sample, self.notes, f"the captured {names}")
                rest = float(remainder.detach().double().abs())
                scale = max(float(returned.detach().double().abs()), 1e-12)
                self._read.exact = exact and rest <= 1e-5 * scale
                if varying:
                    rank_zero_info(
                        f"genbounds: training_step weights the captured {names} differently from batch to batch "
                        "(per-sample weights or a mask from the batch, mixup's random λ?): each batch's weights are "
                        "read from its own returned loss (a backward through the loss's arithmetic only).")
                if self._read.exact:
                    self.reads_training_backward = True
                    self._mean_checked = not varying
                    self.notes.append(f"per-sample losses captured from {names} in training_step")
                else:
                    self.reads_training_backward = False
                    self.notes.append(
                        f"training_step's loss holds a term beyond the captured {names} (a regularizer? "
                        f"{rest:.3g} of {scale:.3g}); the per-sample losses keep the captured data term only, and "
                        "backends that read the training backward are not used")
                return
        if returned is not None:
            self._batch_mean_only("no torch loss function was captured in training_step (a hand-written loss?): "
                                  "only its returned batch-mean loss is available")
            return
        self.tier = "none"

    def _report(self, module: LightningModule) -> None:
        blocked = [n.owner for n in self.needs if n.gradients]
        if self.reentrant_checkpoint and blocked:
            rank_zero_warn(
                f"genbounds: {type(module).__name__}.training_step runs torch.utils.checkpoint with "
                f"use_reentrant=True, whose backward torch.autograd.grad cannot take: {', '.join(blocked)} measure "
                "nothing in this run (NaN), nor do the bounds that need them (GradientDispersion and Flatness are "
                "not affected). Pass use_reentrant=False, which PyTorch recommends, to measure them.")
        if self.tier == "none":
            owners = ", ".join(n.owner for n in self.needs) or "the genbounds callbacks"
            raise MisconfigurationException(
                f"{owners} need the loss of a batch, but {type(module).__name__}.training_step returned no loss and "
                "called no torch loss function genbounds can capture. Add a method `per_sample_loss(self, batch)` "
                "returning the unreduced per-sample losses, or pass `loss_fn=...` (a callable "
                "`loss_fn(pl_module, batch) -> Tensor[batch_size]`, an import path in YAML) to any one of the "
                "genbounds callbacks: it is shared by the whole suite."
            )
        if self.per_sample:
            if self.notes and not self.reads_training_backward:
                rank_zero_warn("genbounds: " + "; ".join(self.notes) + ".")
                self.warned = True
            return
        lost = [n for n in self.needs if n.per_sample]
        if lost:
            items = "; ".join(f"{n.owner}: {n.what}" for n in lost)
            errors = "" if self.errors_available else (
                " The 0-1 error (gap/error, the *_error bounds, bound/test_error_upper) needs per-sample errors as "
                "well: add `per_sample_error(self, batch)` for a classifier.")
            rank_zero_warn(
                "genbounds: " + "; ".join(self.notes) + ". Without per-sample losses these parts are not available — "
                + items + ". To get them, add `per_sample_loss(self, batch)` to your LightningModule or pass "
                "`loss_fn=...` to one genbounds callback." + errors
            )
            self.warned = True

    # ------------------------------------------------------------------ as a loss function
    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        if self._default is not None:
            return self._default(module, batch)
        return self._training_step_losses(module, batch)[0]

    def _training_step_losses(self, module: nn.Module, batch: Any) -> tuple[Tensor, list]:
        from genbounds.estimators.loss_capture import _transform_level

        if not self.stochastic or _transform_level() is not None:
            return self._losses_of(module, batch)
        with replayed_draws(module, self._draw_seeds.seed(module, batch)) as reseed:
            return self._losses_of(module, batch, reseed)

    def _losses_of(self, module: nn.Module, batch: Any, reseed: Callable[[], None] | None = None
                   ) -> tuple[Tensor, list]:
        from genbounds.estimators.loss_capture import _transform_level, combined_per_sample

        b = batch_size(batch)
        if self.per_batch:
            return self._read.losses(module, batch, b, reseed)
        with torch.inference_mode(False):  # (an evaluation loop's batch: its own tensors, not inference ones)
            out, manual, records = captured_step(module, outside_inference(batch), b)
        if self.tier != "captured":
            returned = returned_loss(out, manual)
            if returned is None:
                raise RuntimeError("genbounds: training_step returned no loss on a probe batch")
            return returned.reshape(1), records
        readable = _transform_level() is None  # (where the batch's own weights can be read)
        coefficients = coefficients_for(records, self.coefficients)
        if coefficients is None:
            # other records than the trial's (a loss called on some batches only: mixup applied
            # with a probability): this batch's weights, and every later one's, from its own loss
            if readable:
                return self._read_per_batch_from_now(module, batch, b, "captures other losses than the trial batch",
                                                     reseed)
            device = records[0].value.device if records else None
            return torch.full((b,), math.nan, device=device), records
        losses = combined_per_sample(records, coefficients, b)
        returned = returned_loss(out, manual) if self._mean_checked else None
        if isinstance(returned, Tensor) and returned.numel() == 1:
            # fail closed, on the device: a batch whose per-sample mean is not the loss training_step
            # returned (a padding mask the trial batch did not have) gives NaN losses, not wrong ones
            mean = losses.detach().mean().to(torch.float64)
            ok = torch.isclose(mean, returned.detach().to(torch.float64).reshape(()), rtol=1e-4, atol=1e-6)
            losses = torch.where(ok, losses, torch.full_like(losses, math.nan))
            if readable and not torch.is_grad_enabled() and not bool(ok) and not self._read.nonfinite(returned):
                # (a host read in an evaluation's call only, not in a backend's per-step pass: the
                # weights are then read from each batch's own loss, this one's included)
                return self._read_per_batch_from_now(
                    module, batch, b, f"weights its captured losses otherwise than the trial batch (their mean "
                    f"{float(mean):.6g} against the returned {float(returned):.6g})", reseed)
        return losses, records

    def _read_per_batch_from_now(self, module: nn.Module, batch: Any, b: int, what: str,
                                 reseed: Callable[[], None] | None) -> tuple[Tensor, list]:
        """Switch to reading each batch's weights from its own loss (once, said as an info line),
        and do so for ``batch`` (its step run again with the same draws: ``reseed``)."""
        if reseed is not None:
            reseed()
        self.per_batch = True
        self._mean_checked = False
        rank_zero_info(f"genbounds: a batch {what} (a padding mask or a loss the trial batch did not need, mixup "
                       "applied with a probability?): from now on each batch's weights are read from its own "
                       "returned loss.")
        return self._read.losses(module, batch, b, reseed)

    def losses_and_errors(self, module: nn.Module, batch: Any) -> Tensor:
        """``[2, b]``: the per-sample losses and 0-1 errors of ``batch`` (one forward when both
        come from the captured ``training_step``)."""
        if self._default is None and self._error_record is not None and self.tier == "captured":
            from genbounds.estimators.classification_error import per_sample_error

            losses, records = self._training_step_losses(module, batch)
            if self._no_errors_in(records):
                return torch.stack([losses, torch.full_like(losses, math.nan)])
            errors = per_sample_error(records[self._error_record], batch_size(batch))
            return torch.stack([losses, errors.to(losses.dtype)])
        both = getattr(module, "per_sample_loss_and_error", None)
        if callable(both) and self.tier == "per_sample_loss" and not isinstance(self._default, _SumScaled):
            return both(batch)
        losses = self(module, batch)
        errors = self.errors(module, batch)
        if errors is None:
            raise RuntimeError("genbounds: no per-sample 0-1 error for this module")
        return torch.stack([losses, errors.to(losses.dtype).reshape(losses.shape)])

    def errors(self, module: nn.Module, batch: Any) -> Tensor | None:
        """Per-sample 0-1 error (classifiers), or ``None`` when not available."""
        method = getattr(module, "per_sample_error", None)
        if callable(method):
            return method(batch)
        if self._error_record is None:
            return None
        from genbounds.estimators.classification_error import per_sample_error

        b = batch_size(batch)
        losses, records = self._training_step_losses(module, batch)
        if self._no_errors_in(records):
            return torch.full_like(losses, math.nan)
        return per_sample_error(records[self._error_record], b)

    def _no_errors_in(self, records: list) -> bool:
        """Whether a batch's records give no 0-1 error: its records are not the trial's, or it
        scores one prediction against several targets by weights read per batch (mixup seen after
        the trial). The second turns the errors off for the rest of the run, every batch's: errors
        of the batches that happened not to mix would stand for all (said once)."""
        assert self._error_record is not None
        several = self.per_batch and scores_one_prediction_twice(records)
        if several and not self._errors_off:
            self._errors_off = True
            self.errors_available = False  # (probes that ask for errors at each probe ask no more)
            rank_zero_warn("genbounds: a batch's training_step scores its predictions against more than one "
                           "target by weights that change from batch to batch (mixup, applied to some batches?): no "
                           "per-sample 0-1 error is taken from now on, and the 0-1 error bounds are NaN.")
        return self._errors_off or self._error_record >= len(records)


class _UserLoss:
    """An explicit ``loss_fn(pl_module, batch)`` (the estimators' ``LossFn`` signature)."""

    def __init__(self, fn: UserLossFn) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        return self.fn(module, batch)  # type: ignore[arg-type]


class _SumScaled:
    """``b × loss_fn``: per-sample losses whose mean is a sum-reduced training loss."""

    def __init__(self, fn: LossFn) -> None:
        self.fn = fn

    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        losses = self.fn(module, batch)
        return losses * losses.shape[0]


def _module_per_sample_loss(module: nn.Module, batch: Any) -> Tensor:
    return module.per_sample_loss(batch)  # type: ignore[operator]


def _agrees(returned: Tensor | None, per_sample: Tensor | None, notes: list[str], what: str) -> bool:
    """Is ``returned`` the mean of ``per_sample``? (one host sync)"""
    if returned is None or per_sample is None:
        return False
    if not isinstance(per_sample, Tensor) or per_sample.dim() != 1:
        notes.append(f"{what} are not a 1-d tensor of per-sample losses")
        return False
    observed = float(returned.detach().double())
    values = per_sample.detach().tolist()  # (summed on the host: a float64 mean is a kernel training never runs)
    reference = math.fsum(values) / len(values) if values else math.nan
    ok = math.isfinite(observed) and math.isclose(observed, reference, rel_tol=1e-4, abs_tol=1e-7)
    if not ok:
        notes.append(f"training_step's loss ({observed:.6g}) is not the mean of {what} ({reference:.6g})")
    return ok


def _through_reentrant_checkpoint(loss: Tensor) -> bool:
    """Whether ``loss``'s autograd graph holds a ``torch.utils.checkpoint(use_reentrant=True)``
    segment (its node; walked once, at the trial)."""
    return any(type(node).__name__ == "CheckpointFunctionBackward" for node in graph_nodes(loss))
