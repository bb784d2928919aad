"""``backend="hooks"``: per-sample squared gradient norms inside the training step's own backward.

Per layer, the cheapest exact route (:mod:`genbounds.estimators.ghost_norms`): the Goodfellow
factorization for 2-D ``Linear`` inputs, the ghost norm or a materialized per-sample gradient for
sequences and convolutions (``2T² < d_in·d_out``), a ghost form for ``Embedding``, closed forms for
normalization layers; BackPACK's ``BatchL2Grad`` for ``RNN``/``LSTM`` layers, which only BackPACK
reaches. No extra forward or backward.

Hooks are shared by every ``GradientDispersion`` of a module (two callbacks with different
schedules read the same norms). The ghost norms record a call only from a measured step's forward
to its backward, and unmeasured steps cost nothing. Their forward hooks (``GhostNormHooks.attach``):

* by default one per hooked module, first among its hooks (``prepend=True``; put first again at
  each measured step's arm), kept from a measured step to the next and taken out at an unmeasured
  one, at an epoch's end and before validation. A flag closes the recording window at each
  backward's end, so a forward outside it records nothing and computes what it would without us.
  A hook of the user's that runs before ours and may replace the output — registered with
  ``prepend=True`` inside the window, or process-wide — leaves the step unmeasured (said) and an
  extra pass takes over. Inside an epoch, between measured steps, a copy of the module
  (``deepcopy``, pickling) carries an inert hook, and ``torch.jit.script`` of it fails (it compiles
  Python hooks): at the epoch's end and before validation there is none. One hook per module
  instead of one process-wide one spares the step's other module calls PyTorch's slow path of
  hooked calls: the MLP benchmark's measured step went from 1.102× to 1.093×
  (docs/results/overhead.md, round 31; put in and taken out at every step, the hooks cost that
  gain again: 1.107×);
* one process-wide hook that exists only from a measured step's forward to its backward for a
  module with a ``TransformerEncoderLayer`` — a module hook anywhere in one turns off its eval-mode
  fast path, whose results differ from the slow path's in the last bits (the drop-in test caught
  it in the user's validation loss at two threads) — and for one with BackPACK layers (left as
  they were: not measured or tested with per-module hooks).

Once a fit, before step 0,
the hooks are checked against exact gradients on one sample (:meth:`NormHooksBackend.verify`).

Under train-mode BatchNorm the per-sample terms are those of the batch gradient's exact
decomposition ``ḡ_B = mean_i g̃_i`` (batch statistics as computed on ``B``), not independent
per-sample gradients — documented as an approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from genbounds.callbacks.dispersion.accumulation import GradientDeltas
from genbounds.callbacks.dispersion.base import DispersionBackend, StepContext, WindowResult
from genbounds.callbacks.dispersion.row_ring import RowRing
from genbounds.callbacks.isolation import isolated_pass
from genbounds.callbacks.per_module import KeptOnModule
from genbounds.estimators import recording
from genbounds.estimators.backpack_norms import BackpackNormHooks
from genbounds.estimators.functional import group_matrix, grouped_sq_norms, per_tensor_sq_norms
from genbounds.estimators.batching import batch_size
from genbounds.estimators.ghost_norm_check import HookProblem, batch_layout_problem, hook_norm_errors
from genbounds.estimators.ghost_norms import GhostNormHooks, times_scale_sq_, declared_batch_dims
from genbounds.estimators.gradient_dispersion import GradientMoments, group_sums, hook_dispersion_row

if TYPE_CHECKING:
    from genbounds.callbacks.step_log import StepLog


@dataclass
class HookSums:
    """One batch's per-sample squared norms as the hooks left them: ``Σ_i ‖g_{i,j}‖² / scale²``
    per hooked module ``j`` (``names``), for :func:`~genbounds.estimators.gradient_dispersion.hook_dispersion_row`
    at the optimizer step (one backward per window, one process) — or, ``sums`` ``None``, still in
    the buffers a :class:`~genbounds.callbacks.dispersion.row_ring.RowRing` lent the hooks, with the
    Linear rows that wait to be made (``deferred``)."""

    sums: Tensor | None
    names: tuple[str, ...]
    scale: Tensor | float
    batch: int
    deferred: tuple = ()


class SharedHooks(KeptOnModule):
    """One set of norm hooks per module, armed while any owner measures; each backward's norms
    are read once and served to every owner."""

    def __init__(self, root: nn.Module, ghost: dict[str, nn.Module], backpack: dict[str, nn.Module]) -> None:
        # each hooked module's own hook, kept between measured steps (module docstring), unless a
        # TransformerEncoderLayer would lose its eval-mode fast path to it, or with BackPACK
        # layers (the one global hook, from a measured forward to its backward only, then)
        per_module = not backpack and not any(isinstance(m, nn.TransformerEncoderLayer) for m in root.modules())
        self.ghost = GhostNormHooks(ghost, batch_dims=declared_batch_dims(root), unhook_after_backward=True,
                                    per_module=per_module) if ghost else None
        self.backpack = BackpackNormHooks(list(backpack.values())) if backpack else None
        self.backpack_names = {id(m): n for n, m in backpack.items()}
        self.key = _covering(ghost, backpack)
        """The modules these hooks cover (hooks for another set are other hooks)."""
        self.owners: set[int] = set()
        self.cache: tuple[int, Any] | None = None
        self.verdict: tuple[int, str | None] | None = None
        """The exactness check's result, with the ``id`` of the fit it was taken in (one check a
        fit, however many callbacks share these hooks)."""
        self._backpack_backwards = 0
        self.in_backward = False

    @staticmethod
    def for_module(module: nn.Module, ghost: dict[str, nn.Module], backpack: dict[str, nn.Module]) -> SharedHooks:
        shared = module.__dict__.get("_genbounds_norm_hooks")
        key = _covering(ghost, backpack)
        if shared is None or shared.key != key:  # (none yet, or other layers trained: trainable_set.py)
            shared = SharedHooks(module, ghost, backpack)
            module.__dict__["_genbounds_norm_hooks"] = shared
        return shared

    def unhook(self) -> None:
        """Remove the forward hooks (after the measured backward, and at the batch's end)."""
        if self.ghost is not None:
            self.ghost.unhook()

    def arm(self, owner: int, batch: Any = None) -> None:
        # a new step: the last read is not this step's (a backward that reaches no recorded call
        # leaves the ghost hooks' count where it was, and must not find the last step's values)
        self.cache = None
        if self.owners and self.ghost is not None and self.ghost.armed and self.ghost.recorded_since_clear:
            # armed since an earlier step (kept armed between consecutive measured steps): drop
            # whatever a forward outside the training step recorded since the last read
            self.ghost.clear()
        if not self.owners:
            if self.ghost is not None:
                recording.register(self.ghost)
            if self.backpack is not None:
                self.backpack.attach()
        self.owners.add(owner)
        if self.ghost is not None:
            # arms once, and attaches the forward hook for this forward; a sequence-first model's
            # layers find their batch dimension by the batch size
            self.ghost.arm(batch_size(batch) if self.ghost.sequence_first and batch is not None else None)

    @property
    def backward_count(self) -> int:
        """Backwards seen: counted by the ghost hooks themselves (a backward that reached a
        recorded call) and, with BackPACK layers, by :meth:`before_backward`."""
        return self._backpack_backwards + (self.ghost.backwards if self.ghost is not None else 0)

    def before_backward(self) -> None:
        if self.backpack is not None and not self.in_backward:
            self.in_backward = True
            self._backpack_backwards += 1
            if self.backpack.attached:
                self.backpack.enter_backward()

    def read(self) -> tuple[Tensor | None, tuple[str, ...], tuple] | None:
        """``(Σ_i ‖g_i‖² per hooked module [n] float64, the modules' names, ())`` of the last
        backward, for a loss of scale 1 (times ``scale²`` for the batch's; shared: not to be
        modified); ``(None, names, deferred)`` when the ghost hooks wrote into a row ring's lent
        buffers (``GhostNormHooks.read_parts``: its owner makes the sums)."""
        if self.cache is not None and self.cache[0] == self.backward_count:
            return self.cache[1]
        self.in_backward = False
        parts: list[Tensor] = []
        names: tuple[str, ...] = ()
        if self.ghost is not None:
            if self.ghost.step_buffers is not None and self.backpack is None:
                got = self.ghost.read_parts()
                result = None if got is None else (got[0], self.ghost.module_names, got[1])
                self.cache = (self.backward_count, result)
                return result
            sums = self.ghost.read_sums()
            if sums is None:
                self.cache = (self.backward_count, None)
                return None
            parts.append(sums)
            names = self.ghost.module_names
        if self.backpack is not None:
            self.backpack.exit_backward()
            read = self.backpack.read_modules(1)
            if read is None:
                self.cache = (self.backward_count, None)
                return None
            if read:  # (empty when every BackPACK layer's parameters are frozen)
                device = parts[0].device if parts else None
                parts.append(torch.stack([sq.sum().to(device) if device is not None else sq.sum()
                                          for sq in read.values()]))
                names = names + tuple(self.backpack_names[id(m)] for m in read)
        if not parts:
            self.cache = (self.backward_count, None)
            return None
        result = (parts[0] if len(parts) == 1 else torch.cat(parts), names, ())
        self.cache = (self.backward_count, result)
        return result

    @property
    def stays_armed(self) -> bool:
        """Whether the hooks may stay armed from one measured step to the next. Ghost hooks are
        suspended during every extra pass (:mod:`genbounds.estimators.recording`) and ignore
        gradient-free forwards, so keeping them armed only saves re-registering the per-parameter
        hooks and re-faulting the work buffers every step (with the step log's run-long buffer,
        measured together: peak-memory growth of the MLP benchmark 80 → 35 MiB,
        docs/results/overhead.md); BackPACK's hooks would run in
        every backward, probes' included, so a module with BackPACK layers disarms each step."""
        return self.backpack is None

    def disarm(self, owner: int) -> None:
        if not self.owners and (self.ghost is None or not self.ghost.armed) and (
                self.backpack is None or not self.backpack.attached):
            return  # nothing armed (an unmeasured step after an unmeasured step): 1 µs instead of 10
        self.owners.discard(owner)
        if not self.owners:
            if self.ghost is not None:
                self.ghost.disarm()
                recording.unregister(self.ghost)
            if self.backpack is not None:
                self.backpack.detach()

    def detach(self) -> None:
        self.owners.clear()
        if self.ghost is not None:
            self.ghost.detach()
            recording.unregister(self.ghost)
        if self.backpack is not None:
            self.backpack.detach()


class NormHooksBackend(DispersionBackend):
    name = "hooks"
    reads_training_backward = True

    def __init__(self, ghost: dict[str, nn.Module], backpack: dict[str, nn.Module],
                 group_of_module: dict[str, int], num_groups: int, approximate_batchnorm: bool) -> None:
        self.ghost_modules = ghost
        self.backpack_modules = backpack
        self.group_of_module = group_of_module
        self.num_groups = num_groups
        self.approximate_batchnorm = approximate_batchnorm
        parts = ["per-sample norms in the training backward (ghost norms"]
        if backpack:
            parts.append(", BackPACK for " + ", ".join(sorted({type(m).__name__ for m in backpack.values()})))
        parts.append("; no extra pass)")
        if approximate_batchnorm:
            parts.append(" — train-mode BatchNorm: the per-sample terms of the batch gradient's decomposition, "
                         "an approximation that measured 2.5-7x the dispersion over independent batches "
                         "(docs/results/overhead.md; backend='microbatch' or accumulate_grad_batches>=2 "
                         "for the train-mode chunk estimator)")
        self.description = "".join(parts)
        self.shared: SharedHooks | None = None
        self.deltas = GradientDeltas()
        self._accumulated: list[Tensor] | None = None
        self.failed: Exception | None = None
        self.failure_here: str | None = None
        """Under DDP: why this process's hooks failed at a step since the last flush (``_failed_step``)."""
        self._index_key: tuple[str, ...] | None = None
        self._groups_of_names: tuple[tuple[int, ...], ...] = ()
        self._backwards_at_forward = -1
        self.ring: RowRing | None = None
        self._ring_for: tuple | None = None  # (step log, names) of use_row_ring

    def attach(self, module: LightningModule) -> None:
        self.shared = SharedHooks.for_module(module, self.ghost_modules, self.backpack_modules)

    def start_window(self, measuring: bool) -> None:
        self.deltas.reset()
        self._accumulated = None
        if not measuring and self.shared is not None:
            self.shared.disarm(id(self))

    @property
    def reads_late(self) -> bool:
        """Whether a backward's norms may be read at the optimizer step rather than right after
        it: ghost hooks only (BackPACK's leave the backward at the read)."""
        return self.shared is not None and self.shared.backpack is None

    def use_row_ring(self, step_log: StepLog, names: tuple[str, ...]) -> None:
        """Keep the raw values of steps read at the optimizer step (one backward a step, one
        process, groups that partition the parameters) in a :class:`RowRing` whose rows go to
        ``step_log`` under ``names`` (made when the ring is first needed: ghost hooks alone)."""
        self._ring_for = (step_log, names)

    def before_forward(self, ctx: StepContext) -> None:
        assert self.shared is not None
        self.shared.arm(id(self), ctx.batch)
        self._backwards_at_forward = self.shared.backward_count
        ghost = self.shared.ghost
        if ghost is not None:
            if self._ring_for is not None and self.ring is None and self.shared.backpack is None:
                self.ring = RowRing(ghost, *self._ring_for)
            # one owner only (callbacks sharing the hooks read them at once)
            ghost.step_buffers = self.ring.lend if self.ring is not None and len(self.shared.owners) == 1 else None

    def before_backward(self, ctx: StepContext) -> None:
        assert self.shared is not None
        self.shared.before_backward()

    def after_backward(self, ctx: StepContext) -> GradientMoments | HookSums | None:
        assert self.shared is not None
        m = ctx.micro_size
        scale: Tensor | float = m * ctx.accumulate / ctx.loss_scale
        # one backward per window, one process, groups that partition the parameters: the sums
        # stay raw until end_window folds them into the row (hook_dispersion_row)
        raw = (ctx.accumulate == 1 and ctx.module.automatic_optimization and ctx.trainer.world_size == 1
               and ctx.groups_partition)
        if self.shared.backward_count == self._backwards_at_forward and all(p.grad is None for p in ctx.params):
            # no backward since the forward (read at the optimizer step: a step without one). The
            # ghost hooks count a backward that reached a recorded call; one that reached none but
            # left gradients (weights used outside their modules' calls) is read below, and fails
            return None
        try:
            read = self.shared.read()  # (unscaled: callbacks sharing the hooks read the same values)
        except RuntimeError as err:
            self.shared.disarm(id(self))
            return self._failed_step(ctx, err, str(err))
        self.shared.unhook()
        if read is None or not self.shared.stays_armed:
            self.shared.disarm(id(self))
        if read is None:
            return self._failed_step(ctx, RuntimeError("no per-sample norms: the weights' gradient came past the "
                                                       "hooked outputs"),
                                     "the weights received gradient in this step, but not through the outputs the "
                                     "hooks read (layers applied outside their modules' forward, or an RNN/LSTM read "
                                     "through its final state alone)")
        sums, names, deferred = read
        if raw:
            return HookSums(sums, names, scale, m, deferred)
        assert sums is not None  # (buffers are lent on the raw path only: use_row_ring)
        # Σ_i ‖g_{i,k}‖² per group k and their total: one matrix-vector product (cached matrix)
        per_group = times_scale_sq_(self._group_matrix(names, sums.device) @ sums, scale)
        if ctx.accumulate >= 2 and ctx.trainer.world_size == 1:
            # ḡ = Σ_j m_j h_j / b, which .grad = Σ_j h_j / A equals only for equal micro-batches
            part = [d * scale for d in self.deltas.delta(ctx.extras["grads"])]
            self._accumulated = part if self._accumulated is None else [a + p for a, p in zip(self._accumulated, part)]
        return GradientMoments(per_group[-1], m, m, group_sq=per_group[:-1])

    def _failed_step(self, ctx: StepContext, err: Exception, why: str) -> GradientMoments | None:
        """The hooks could not measure this step (a layer applied to part of the batch, say). One
        process: the step is left unmeasured and an extra pass measures from the next (said once,
        ``failed``). Under DDP the failure may be this process's alone (its data took the branch),
        and the others are about to enter the step's reduction: this process enters it too, with
        NaN moments of the same layout flagged failed — the step's values are NaN everywhere (a
        skipped step) and every process falls back together at the callback's next flush
        (``GradientDispersion``), where the summed flag is read with the step log's values."""
        if ctx.trainer.world_size <= 1:
            self.failed = err
            rank_zero_warn(f"GradientDispersion(backend='hooks'): {why}; this step is left unmeasured, and an "
                           "extra-pass backend measures from the next one.")
            return None
        if self.failure_here is None:
            self.failure_here = why
        device = ctx.params[0].device if ctx.params else torch.device("cpu")
        nan = torch.full((self.num_groups,), float("nan"), dtype=torch.float64, device=device)
        m = ctx.micro_size
        return GradientMoments(nan.sum(), m, m, group_sq=nan, failed=1.0)

    def _module_groups(self, names: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        """The indices in ``names`` of each group's hooked modules (cached for the last ``names``)."""
        if self._index_key is not names and self._index_key != names:
            self._groups_of_names = tuple(tuple(j for j, name in enumerate(names) if self.group_of_module[name] == k)
                                          for k in range(self.num_groups))
            self._index_key = names
        return self._groups_of_names

    def _group_matrix(self, names: tuple[str, ...], device: torch.device) -> Tensor:
        """``[K + 1, n]`` 0/1 float64: module → its group, and a last row of ones (the total)."""
        return group_matrix(len(names), self._module_groups(names), device)

    def end_window(self, ctx: StepContext, window: GradientMoments | HookSums | None) -> WindowResult | None:
        if window is None:
            return None
        if isinstance(window, HookSums):
            sums = window.sums
            if sums is None:  # in the ring's lent buffers: kept there, or its sums made now
                assert self.ring is not None
                if window.batch >= 2 and self.ring.keep(ctx.step, window.deferred, window.scale, window.batch,
                                                        ctx.extras["grads"], self._module_groups(window.names),
                                                        ctx.groups):
                    return WindowResult(None, kept=True)
                sums = self.ring.sums_now(window.deferred)
            if window.batch < 2:
                return None  # a one-sample batch has no spread to measure (e.g. a last batch of size 1)
            row = hook_dispersion_row(sums, self._module_groups(window.names), window.scale,
                                      ctx.extras["grads"], ctx.groups, window.batch)
            return WindowResult(None, row=row)
        if self._accumulated is not None:
            b = int(window.num_samples)
            per_param = per_tensor_sq_norms([a / b for a in self._accumulated])
            self._accumulated = None
            return WindowResult(window, per_param.sum(), group_sums(per_param, ctx.groups))
        # ‖ḡ_k‖² per group and ‖ḡ‖² from .grad in about ten ops (estimators.functional)
        norms = grouped_sq_norms(ctx.extras["grads"], ctx.groups)
        return WindowResult(window, norms[-1], norms[:-1])

    def verify(self, module: LightningModule, loss_fn: Any, batch: Any, fit: int) -> str | None:
        """Once a fit (``fit``: its key), before step 0: why the hooks cannot be trusted on this
        model — a layer whose norm on one sample of ``batch`` differs from the exact one, or what
        the hooks reported (:mod:`genbounds.estimators.ghost_norm_check`) — or ``None``. An error
        of the user's code leaves the check undecided (``None``): the per-step checks still apply."""
        assert self.shared is not None
        if not (self.ghost_modules or self.backpack_modules):
            return None
        if self.shared.verdict is not None and self.shared.verdict[0] == fit:
            return self.shared.verdict[1]
        why: str | None = None
        try:
            with isolated_pass(module, mode="keep"):
                errors = hook_norm_errors(module, self.ghost_modules, loss_fn, batch, self.backpack_modules)
                # (the whole first batch's shapes: a sequence length equal to its size in a
                # sequence-first model, a layer applied to part of it)
                layout = (None if errors or not self.ghost_modules else
                          batch_layout_problem(module, self.ghost_modules, loss_fn, batch))
            if errors:
                worst = ", ".join(f"{name} (relative error {err:.2g})" for name, err in sorted(errors.items())[:4])
                # (a weight tied by module attribute is refused by the plan before: ghost_norms.plan)
                why = (f"on one sample of the first batch the norms of {worst} differ from the exact ones — a "
                       "weight also used outside its layer's call (an output projection tied by F.linear?), a weight "
                       "recomputed from other parameters before the call (torch.nn.utils.weight_norm's older API?) "
                       "or a layer whose output the whole batch shares (a positional embedding of arange(T)?)")
            elif layout is not None:
                why = f"on the first batch the hooks cannot measure it: {layout}"
        except HookProblem as err:
            why = f"on one sample of the first batch the hooks cannot measure it: {err}"
        except Exception:  # noqa: BLE001 - the user's step in a probe; never fail the run here
            why = None
        self.shared.verdict = (fit, why)
        return why

    def end_batch(self) -> None:
        if self.shared is not None:
            self.shared.unhook()  # (a measured step whose training_step returned None: no backward)

    def end_epoch(self) -> None:
        # the per-module forward hooks out of the user's modules until the next measured step
        # (where callbacks copy, save or script them: GhostNormHooks.release)
        if self.shared is not None and self.shared.ghost is not None:
            self.shared.ghost.release()

    def hook_seconds(self) -> float:
        ghost = self.shared.ghost if self.shared is not None else None
        if ghost is None:
            return 0.0
        spent, ghost.seconds = ghost.seconds, 0.0
        return spent

    def detach(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.shared is not None:
            self.shared.detach()


def _covering(ghost: dict[str, nn.Module], backpack: dict[str, nn.Module]) -> tuple:
    """Which modules a :class:`SharedHooks` covers, by route."""
    return tuple((n, id(m)) for n, m in ghost.items()), tuple((n, id(m)) for n, m in backpack.items())
