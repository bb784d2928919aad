"""``torch.func`` transforms run off the training thread.

A functorch transform (``torch.func``'s ``vmap``, ``grad``, ``jvp``) creates functorch's
thread-local state in the thread that runs it. That state lives as long as the thread, and every
later backward in that thread copies it (the autograd engine's ``getCopyOfFuncTorchTLS``). So a
probe that vectorized once in the training thread would leave work in every later training step
of the user's: on the MLP 784-512-512-10 at batch 128 a raw training step makes 382 small
allocations after one ``vmap`` in its thread against 312 before, and 312 after a vectorized probe
pass through this module (``benchmarks/functorch_state.py``). What that costs in time is below
the drift of a raw loop here; in Lightning, the same state left by the loss contract's trial
(until it stopped asking for the transform level outside a transform,
``loss_capture._transform_level``) had cost the dispersion benchmark about two points of its
ratio to plain training (docs/results/overhead.md).

:func:`off_training_thread` runs a function in a worker thread: one per calling thread, kept
for its life (trainings in threads of one process keep their probes apart; a forked child makes
its own). The caller waits for it (no parallelism, no other core used), so only the thread's
identity changes; a hop costs about 0.1-0.2 ms, once per vectorized pass. The worker runs with
the caller's thread-local settings that change results or speed: grad mode, inference mode,
autocast (CPU and CUDA), the intra-op thread count, the context variables and, on CUDA, the
current device and stream (the worker's work is queued on the caller's stream, so the order of
kernels is the caller's). Its errors are raised in the caller; a call from a worker runs inline,
and so does one made while the interpreter shuts its executors down. An interrupt (Ctrl-C) of
the caller takes effect when the worker's call returns. Not carried over: modes entered with
``TorchDispatchMode``/``TorchFunctionMode`` (``torch.set_default_device`` and ``with
torch.device(...)`` among them), forward-mode AD levels and ``saved_tensors_hooks`` of the
caller — none of which the estimators rely on.

The probes' transforms go through here: the stacked perturbation passes (``perturbation.py``)
and the forward-mode Hessian-vector products (``hessian_vector_product.py``). A batched backward
(``autograd.grad(is_grads_batched=True)``) runs PyTorch's legacy vmap, whose state is not
functorch's and ends with the call: it stays where it is called. So do the per-sample gradients
by ``vmap`` (``per_sample_gradients.py``: the ``functorch`` dispersion backend, ``HeldoutGradient``
where its hooks cannot serve): run here, the 5.6 M-parameter MLP's peak growth over plain training
went from 1.43× [1.31, 1.51] to 1.76× [1.55, 1.95] (7 fresh-process rounds each), the worker's
own heap holding the pass's freed blocks beside the training thread's, and a pass that runs every
measured step costs tens of times what the state's copy does. The opt-in
``VariabilityRegularizer`` (an intervention, inside the training step's own graph) is not moved
either. A CPU probe set to vectorize (``draws_per_pass`` > 1) allocates its stacked points in the
worker's heap too; on an accelerator, where probes vectorize by default, they live in the
device's memory.
"""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")

_AUTOCAST_DEVICES = ("cpu", "cuda")

_LOCAL = threading.local()
"""Per calling thread: its worker (an executor of one thread) and the generation it was made in."""
_GENERATION = [0]
"""Bumped in a forked child, whose copies of the parent's executors have no thread behind them."""
_WORKERS: set[int] = set()
"""The idents of the workers' threads."""


def _after_fork() -> None:
    _GENERATION[0] += 1
    _WORKERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _executor() -> ThreadPoolExecutor:
    made = getattr(_LOCAL, "executor", None)
    if made is None or made[0] != _GENERATION[0]:
        # one worker per calling thread: trainings in threads of one process keep their own
        made = (_GENERATION[0], ThreadPoolExecutor(max_workers=1, thread_name_prefix="genbounds-transforms"))
        _LOCAL.executor = made
    return made[1]


def in_worker() -> bool:
    """Whether the calling thread is a transforms' worker."""
    return threading.get_ident() in _WORKERS


def _autocast(device: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device`` in this thread, and its dtype."""
    try:
        return torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except (TypeError, AttributeError):  # pragma: no cover - torch < 2.4
        if device == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def _caller_state() -> dict[str, Any]:
    state: dict[str, Any] = {"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
                             "autocast": [], "threads": torch.get_num_threads()}
    for device in _AUTOCAST_DEVICES:
        enabled, dtype = _autocast(device)
        if enabled:
            state["autocast"].append((device, dtype))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = (torch.cuda.current_device(), torch.cuda.current_stream())
    return state


def _run(state: dict[str, Any], fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
    _WORKERS.add(threading.get_ident())
    if torch.get_num_threads() != state["threads"]:  # (per thread under OpenMP)
        torch.set_num_threads(state["threads"])
    with ExitStack() as stack:
        if "cuda" in state:
            device, stream = state["cuda"]
            stack.enter_context(torch.cuda.device(device))
            stack.enter_context(torch.cuda.stream(stream))
        stack.enter_context(torch.inference_mode(state["inference"]))
        stack.enter_context(torch.set_grad_enabled(state["grad"]))
        for device, dtype in state["autocast"]:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        return fn(*args, **kwargs)


def off_training_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the transforms' worker thread (module docstring); the caller
    waits for it. Inline when called from the worker."""
    if in_worker():
        return fn(*args, **kwargs)
    try:
        future = _executor().submit(contextvars.copy_context().run, _run, _caller_state(), fn, args, kwargs)
    except RuntimeError:  # (the interpreter is shutting its executors down: in the caller, then)
        return fn(*args, **kwargs)
    try:
        return future.result()
    except BaseException:
        # (an interrupt of the caller's wait: the worker finishes its call before the caller's
        # clean-up, e.g. an isolated pass restoring the weights, runs beside it)
        if not future.done():
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - the caller's own exception is raised below
                pass
        raise
