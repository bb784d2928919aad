"""Zero observer effect for extra forward/backward passes run from a callback.

:func:`isolated_pass` wraps a probe so that, afterwards, the model is exactly as before:

* the global RNG streams (CPU and the module's CUDA device, Python's ``random`` and NumPy's) are
  forked — dropout masks or any sampling inside the probe do not shift the training run's random
  numbers;
* every buffer (BatchNorm running statistics, ``num_batches_tracked``, user buffers) is restored
  bit-exactly from a snapshot, and train-mode BatchNorm layers run on batch statistics *without*
  updating their running statistics during the probe (an in-place update would also be refused
  inside ``torch.func`` transforms);
* every submodule's ``training`` flag is restored individually (never a blanket ``.train()``,
  which would un-freeze layers a user keeps in eval mode);
* autocast is switched off: probes run in the parameters' own precision (fp32) on purpose;
* ``scaled_dot_product_attention`` runs on its math kernel, the one with a double backward and
  batching rules (fused CPU/flash/efficient kernels have neither);
* a ``torch.compile``\\ d LightningModule is probed through its original forward (compiled
  graphs do not support double backward, and probe shapes would trigger recompilation);
* per-sample norm hooks armed for the training step's own backward are suspended.

:func:`muted_training_step` additionally lets a probe call the user's own ``training_step``:
``self.log``/``self.log_dict`` do nothing, torchmetrics ``Metric`` s neither update nor compute
(their states are snapshotted and restored as well), and under manual optimization
``manual_backward``, the optimizers' ``step``/``zero_grad``, the schedulers and
``toggle_optimizer`` are no-ops, and the attributes ``training_step`` keeps (a list of step
outputs, a counter) are restored (:mod:`~genbounds.callbacks.user_state`) — so what the user
logs, accumulates and steps is untouched.

Parameters are never written by the estimators (they use ``torch.func.functional_call`` or
``torch.autograd.grad``); :func:`assert_unchanged` exists for tests and debugging.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from genbounds.callbacks.user_state import kept_user_state
from genbounds.estimators.recording import all_suspended

ProbeMode = Literal["keep", "eval", "train"]


@contextmanager
def original_forward(module: nn.Module) -> Iterator[None]:
    """Temporarily restore the uncompiled ``forward`` of a module compiled by Lightning."""
    ctx = getattr(module, "_compiler_ctx", None)
    original = ctx.get("original_forward") if isinstance(ctx, dict) else None
    if original is None:
        yield
        return
    compiled = module.forward
    module.forward = original  # type: ignore[method-assign]
    try:
        yield
    finally:
        module.forward = compiled  # type: ignore[method-assign]


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextmanager
def _math_attention() -> Iterator[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def _batchnorm_without_running_updates(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm layers normalize with batch statistics but do not update their
    running statistics (``track_running_stats=False`` for the duration)."""
    changed = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@contextmanager
def forked_host_rngs() -> Iterator[None]:
    """Python's ``random`` and NumPy's global generator as they were after the block (a
    ``training_step`` drawing mixup's λ from ``np.random.beta`` shifted the run's stream)."""
    import random

    state = random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with torch
        np, np_state = None, None
    try:
        yield
    finally:
        random.setstate(state)
        if np is not None:
            np.random.set_state(np_state)


@contextmanager
def isolated_pass(module: nn.Module, mode: ProbeMode = "keep", grad: bool = True) -> Iterator[None]:
    """Run the body as a side-effect-free probe of ``module`` (see the module docstring).

    Args:
        module: the model being probed.
        mode: ``"keep"`` the current train/eval flags, or force ``"eval"`` / ``"train"`` for the
            duration of the probe.
        grad: enable autograd inside the body (probes often run from hooks under ``no_grad``).
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    modes = [(m, m.training) for m in module.modules()]
    snapshot = [(b, b.detach().clone()) for b in module.buffers()]
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=_rng_devices(device), device_type=device.type))
        stack.enter_context(forked_host_rngs())
        stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
        if device.type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        stack.enter_context(original_forward(module))
        stack.enter_context(all_suspended())
        stack.enter_context(_math_attention())
        try:
            if mode == "eval":
                module.eval()
            elif mode == "train":
                module.train()
            _fixed_spectral_norms(module)
            if not grad:  # (a user's checkpointed segment says so at every call under no_grad)
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
            stack.enter_context(_batchnorm_without_running_updates(module))
            yield
        finally:
            with torch.no_grad():
                for buf, saved in snapshot:
                    buf.copy_(saved)
            for m, flag in modes:
                m.training = flag


def _fixed_spectral_norms(module: nn.Module) -> None:
    """Spectral normalizations (``torch.nn.utils.parametrizations.spectral_norm`` and the older
    ``torch.nn.utils.spectral_norm``) set not to iterate for the pass: in training mode each
    forward first advances its power iteration (``u``, ``v``) and then divides by the new ``σ``,
    so a pass run again in training mode computed another function than the training step's
    forward (0.2–0.7 % off in the dispersion). Not iterating, it divides by the ``σ`` that
    forward used; the flags are restored with the others."""
    from torch.nn.utils import parametrizations, spectral_norm

    kinds = tuple(k for k in (getattr(parametrizations, "_SpectralNorm", None),) if k is not None)  # (private)
    hook = getattr(spectral_norm, "SpectralNorm", None)
    for m in module.modules():
        if (kinds and isinstance(m, kinds)) or (hook is not None and any(
                isinstance(h, hook) for h in m._forward_pre_hooks.values())):
            m.training = False


# ------------------------------------------------------------------------ the user's training_step
def _is_metric(module: nn.Module) -> bool:
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return False
    return isinstance(module, (Metric, MetricCollection))


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return copy.copy(value)


def _in_transform() -> bool:
    """Whether a ``torch.func`` transform is running (a forward-over-reverse Hessian-vector product
    calls the user's ``training_step`` inside ``jvp``)."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - other torch versions
        return False


def _containers(value: Any) -> Any:
    """``value``'s lists copied, their tensors kept (a list state appended to by hand is put back
    without the appends; no tensor of a transform's level is made)."""
    return [_containers(v) for v in value] if isinstance(value, list) else value


def _metric_state(metric: Any) -> dict[str, Any]:
    """A metric's states to put back after a muted step: copies, except inside a ``torch.func``
    transform, where a copy is a tensor of the transform's level that would outlive it in the
    metric (the next snapshot then failed, "escaped?", and ended the fit: HessianTrace with
    ``hvp_method="forward"`` on a module that owns a metric); there the state tensors themselves
    are kept, in copies of their lists (a muted step's metrics neither update nor run forward;
    torch.func refuses an in-place change of a captured tensor)."""
    keep = _in_transform()
    state = {name: _containers(getattr(metric, name)) if keep else _copied(getattr(metric, name))
             for name in getattr(metric, "_defaults", {})}
    for name in ("_update_count", "_computed", "_forward_cache", "_update_called"):
        if name in metric.__dict__:
            state[name] = metric.__dict__[name]
    return state


def _nan_like_output(*_args: Any, **_kwargs: Any) -> Tensor:
    return torch.tensor(float("nan"))


def _muted_forward(metric: nn.Module) -> Any:
    """What a muted metric's ``forward`` returns: NaN, shaped like the real output's keys for a
    ``MetricCollection`` (a dict by metric name, prefix/postfix included), so that a
    ``training_step`` indexing it (``out["train_acc"]``) still runs."""
    if not _is_metric_collection(metric):
        return _nan_like_output
    try:
        names = list(metric.keys(keep_base=False))  # type: ignore[operator]
    except TypeError:  # pragma: no cover - other torchmetrics versions
        names = list(metric.keys())  # type: ignore[operator]

    def forward(*_args: Any, **_kwargs: Any) -> dict[str, Tensor]:
        return {name: torch.tensor(float("nan")) for name in names}

    return forward


def _is_metric_collection(module: nn.Module) -> bool:
    try:
        from torchmetrics import MetricCollection
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        return False
    return isinstance(module, MetricCollection)


def _no_op(*_args: Any, **_kwargs: Any) -> None:
    return None


class _InertOptimizer:
    """Stands in for a LightningOptimizer inside a muted ``training_step``: ``step`` runs the
    closure (so a loss computed inside it is still seen) but updates nothing."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer

    def step(self, closure: Any = None, **_kwargs: Any) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:  # param_groups, state, … read-only access
        return getattr(self._optimizer, name)


class _InertScheduler:
    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def step(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)


def _inert(value: Any, wrap: type) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return type(value)(wrap(v) for v in value)
    return wrap(value)


class MutedStep:
    """What a muted ``training_step`` handed to ``manual_backward`` (manual optimization)."""

    def __init__(self) -> None:
        self.manual_losses: list[Tensor] = []

    def manual_backward(self, loss: Tensor, *_args: Any, **_kwargs: Any) -> None:
        self.manual_losses.append(loss)


@contextmanager
def muted_training_step(module: nn.Module) -> Iterator[MutedStep]:
    """Let a probe call ``module.training_step`` without side effects (see the module docstring).
    Patches instance attributes only, and removes them afterwards. Yields a :class:`MutedStep`
    that records the losses given to ``manual_backward``."""
    with kept_user_state(module):  # (the user's own attributes: callbacks/user_state.py)
        with _muted(module) as muted:
            yield muted


@contextmanager
def _muted(module: nn.Module) -> Iterator[MutedStep]:
    patched: list[tuple[Any, str, bool, Any]] = []
    muted = MutedStep()

    def patch(obj: Any, name: str, value: Any) -> None:
        had = name in obj.__dict__
        patched.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    metrics = [m for m in module.modules() if _is_metric(m) and hasattr(m, "_defaults")]
    states = [(m, _metric_state(m)) for m in metrics]
    try:
        if hasattr(module, "log"):
            patch(module, "log", _no_op)
        if hasattr(module, "log_dict"):
            patch(module, "log_dict", _no_op)
        for m in module.modules():
            if _is_metric(m):
                patch(m, "forward", _muted_forward(m))
                patch(m, "update", _no_op)
        if hasattr(module, "automatic_optimization") and not getattr(module, "automatic_optimization", True):
            optimizers = module.optimizers() if getattr(module, "_trainer", None) is not None else None
            schedulers = module.lr_schedulers() if getattr(module, "_trainer", None) is not None else None
            inert_opt = _inert(optimizers, _InertOptimizer)
            inert_sched = _inert(schedulers, _InertScheduler)
            patch(module, "optimizers", lambda *a, **k: inert_opt)
            patch(module, "lr_schedulers", lambda *a, **k: inert_sched)
            patch(module, "manual_backward", muted.manual_backward)
            for name in ("toggle_optimizer", "untoggle_optimizer", "clip_gradients"):
                patch(module, name, _no_op)
        yield muted
    finally:
        for obj, name, had, old in reversed(patched):
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)
        for metric, state in states:
            for name, value in state.items():
                setattr(metric, name, value)


_BATCH_INDEX = [0]
"""The ``batch_idx`` :func:`call_training_step` passes (a list, not a context variable: the step may
run on the thread that takes ``torch.func`` transforms, ``estimators/transform_thread.py``)."""


@contextmanager
def as_training_batch(batch_idx: int) -> Iterator[None]:
    """Inside the block, :func:`call_training_step` passes ``batch_idx``: an extra pass over the
    step's own training batch runs the step's own loss (a ``training_step`` that adds a term on odd
    batches, say). Elsewhere — the probes' batches, the trial before step 0 — it passes 0."""
    saved = _BATCH_INDEX[0]
    _BATCH_INDEX[0] = int(batch_idx)
    try:
        yield
    finally:
        _BATCH_INDEX[0] = saved


def call_training_step(module: nn.Module, batch: Any) -> Any:
    """``module.training_step(batch, batch_idx)`` (or ``(batch)`` for a one-argument signature),
    ``batch_idx`` 0 unless set by :func:`as_training_batch`."""
    import inspect

    step = module.training_step  # type: ignore[attr-defined]
    try:
        params = inspect.signature(step).parameters
    except (TypeError, ValueError):
        params = {}
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params.values())
    if len(positional) >= 2 or varargs:
        return step(batch, _BATCH_INDEX[0])
    return step(batch)


def parameter_snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def assert_unchanged(module: nn.Module, snapshot: list[torch.Tensor]) -> None:
    """Raise if any parameter differs bit-wise from ``snapshot``."""
    for p, saved in zip(module.parameters(), snapshot):
        if not torch.equal(p.detach(), saved):
            raise AssertionError("a probe modified the model's parameters")
