"""The hooks themselves: :class:`GhostNormHooks` (one global forward hook, or one per hooked
module with ``per_module``; per hooked module a
site that stores its calls' inputs and computes the per-sample norms when the output gradient
arrives in the backward), :func:`suspended_ghost_hooks` for probe passes. Where each step's values
land (rows, Linear pair norms, lent buffers) is ``step_rows.StepRows``."""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.nn.modules.module import _global_forward_hooks, register_module_forward_hook
from torch.utils.hooks import RemovableHandle

from genbounds.estimators import ghost_attention
from genbounds.estimators.ghost_norms.base import (
    DECOMPOSITION,
    EXACT,
    GHOST,
    GOODFELLOW,
    MATERIALIZE,
    PerSampleNorms,
    _autocast_off,
    _compute_dtype,
    _Kind,
    _Scratch,
)
from genbounds.estimators.ghost_norms.normalization import _BatchNormKind
from genbounds.estimators.ghost_norms.planning import _ATTENTION, _kind_of, declared_batch_dims, plan
from genbounds.estimators.ghost_norms.step_rows import Lender, StepRows

# ----------------------------------------------------------------------------- hooks


class _Site:
    """One hooked module and what it recorded during the current step."""

    __slots__ = ("name", "module", "group", "kind", "forced", "calls", "received", "factors",
                 "method", "coupled", "first_ordinal", "param_grad", "stale_grad", "flags", "b", "touched",
                 "index", "partner", "slices", "sub", "layout", "batch_dim", "pairs")

    def __init__(self, name: str, module: nn.Module, group: str, kind: _Kind, forced: str | None,
                 index: int) -> None:
        self.name, self.module, self.group, self.kind, self.forced = name, module, group, kind, forced
        self.index = index
        self.partner: _Site | None = None  # a MultiheadAttention's out_proj site, recorded by its hook
        self.slices: list[_Site] = []  # a MultiheadAttention's rows for cross-attention's key/value products
        self.sub = False  # one of those rows: no hooks of its own, the attention's name and group
        self.batch_dim: int | None = None  # declared by a transformer container (declared_batch_dims)
        self.pairs = kind.defers_rows and forced != MATERIALIZE
        """A 2-D call's values may be its row norms (``StepRows.write_pair``): a Linear not forced
        to materialize."""
        self.reset()

    def reset(self) -> None:
        self.calls: list[_Call] = []
        self.received = 0
        self.factors: list[tuple] = []
        self.method: str | None = None
        self.coupled = False
        self.first_ordinal = 0
        self.param_grad = False
        self.stale_grad = False
        self.touched = False
        self.flags: tuple[bool, bool] = (False, False)
        self.b = -1
        self.layout: tuple = ()  # a MultiheadAttention's products this step: ((slot, rows of the weight), …)


class _Call:
    __slots__ = ("site", "x", "version", "epoch", "got", "rows")

    def __init__(self, site: _Site, x: Tensor | None, version: int, epoch: int, rows: int) -> None:
        self.site, self.x, self.version, self.epoch, self.got, self.rows = site, x, version, epoch, False, rows


def times_scale_sq_(t: Tensor, scale: float | Tensor) -> Tensor:
    """``t *= scale²`` in place (float64 ``t``; a tensor ``scale`` stays on the device)."""
    if isinstance(scale, Tensor):
        return t.mul_(scale.detach().to(device=t.device, dtype=torch.float64).square())
    if scale == 1.0:
        return t  # (an op saved on the per-step path, which applies the scale later)
    return t.mul_(float(scale) ** 2)


_ARMED: "weakref.WeakSet[GhostNormHooks]" = weakref.WeakSet()

_any_autocast: Callable[[], bool] = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
"""Whether autocast is on for the CPU or CUDA (or a few other devices; not MPS in torch 2.14): one
call, where the gradient's device type (a device object made for it) and the device's flag took
two, ~7 µs of each hooked layer's backward in a training step (line-profiled). Asked only for a
CPU or CUDA gradient; any other device is asked directly. Private to PyTorch; where it is missing
every gradient's device is asked."""


@contextmanager
def suspended_ghost_hooks() -> Iterator[None]:
    """Suspend every armed :class:`GhostNormHooks` for the block (for probe passes)."""
    with ExitStack() as stack:
        for hooks in list(_ARMED):
            stack.enter_context(hooks.suspended())
        yield


def _dispatch_forward(ref: "weakref.ref[GhostNormHooks]", module: nn.Module, args: tuple, output: Any) -> None:
    """The global module forward hook: the call of a hooked module goes to its site."""
    owner = ref()
    if owner is not None:
        fn = owner._dispatch.get(id(module))
        if fn is not None:
            handle = owner._handle
            fn(module, args, output, handle.id if handle is not None else None)


def _foreign_global_hook_before(key: int | None) -> bool:
    """Whether a process-wide module forward hook that is not one of ours (:func:`_dispatch_forward`)
    runs before the one registered under ``key`` (``None``: before any module's own hooks). Global
    hooks run in registration order, before every module's."""
    for k, h in _global_forward_hooks.items():
        if k == key:
            return False
        if not (isinstance(h, functools.partial) and h.func is _dispatch_forward):
            return True
    return False


def _inert_hook(module: nn.Module, args: tuple, output: Any) -> None:
    """What a copy of a module carries in place of our per-module hook (:class:`_ModuleHook`)."""
    return None


class _ModuleHook:
    """A hooked module's own forward hook (``GhostNormHooks(per_module=True)``). It stays on the
    user's module between measured steps of an epoch, so a module copied or pickled then (an EMA's
    ``deepcopy``, a ``torch.save`` of the whole module) must not carry it: the copy gets
    :func:`_inert_hook` instead (a closure would not even pickle)."""

    __slots__ = ("fn", "key")

    def __init__(self, fn: Callable, key: int) -> None:
        self.fn, self.key = fn, key

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        return self.fn(module, args, output, self.key)

    def __reduce__(self) -> tuple:
        return (_returns_inert, ())


def _returns_inert() -> Callable:
    return _inert_hook


_GLOBAL_HOOKS: list[tuple["weakref.ref[GhostNormHooks]", RemovableHandle]] = []
"""Every registered global hook with its owner (weakly)."""


class GhostNormHooks:
    """Exact per-sample squared gradient norms of ``modules``, from the training backward.

    One global module forward hook is registered by :meth:`attach` (or :meth:`arm`) and removed
    by :meth:`unhook`; registered but disarmed, it costs a lookup and an attribute check per
    hooked module's forward.  While armed (:meth:`arm`), each forward call of a hooked module stores its input
    (detached, no copy) and puts a hook on its output (for ``nn.MultiheadAttention``: finds its
    products' nodes in the output's graph, keeps their saved inputs and puts a pre-hook on each);
    when the output's gradient arrives in the
    backward, the module's per-sample squared norms are computed there, the stored input is
    released, and the result lands in the module's row of a buffer on the device (in the step's
    compute dtype, summed in float64 when read).  Read it after the backward with :meth:`read`
    (which also resets it for the next step)::

        hooks = GhostNormHooks(covered)      # covered, uncovered = plan(model)
        hooks.arm()                          # measured steps: before the forward
        loss = per_sample_losses.mean() / A
        loss.backward()
        norms = hooks.read(scale=m * A)      # ‖∇ℓ_i‖², float64, [m]
        hooks.unhook()                       # no forward hook until the next measured forward

    Args:
        modules: qualified name → module (supported kinds only: see :meth:`supported`).
        group_of: module name → group name (default: the module's own name).
        method: force a route, ``"ghost"`` or ``"materialize"``, for every module or per module
            name (default: the memory rule ``2T² < d_in·d_out``).  Ignored by normalization layers.
        verify_every_step: check on every backward (not only the first after :meth:`arm`) that
            no hooked parameter received gradient while its module's output received none — the
            sign of a weight used outside its module's ``forward``.  The check costs one
            autograd hook call per parameter and backward; the usage it detects is structural,
            so by default it runs on the first measured backward after each :meth:`arm` only.
        per_module: one forward hook per hooked module instead of the global one, kept between
            windows (:meth:`attach`).
        unhook_after_backward: :meth:`unhook` at the end of a backward that reached a recorded
            call (an autograd engine callback, queued by the first such call's gradient):
            ``GradientDispersion``'s hooks, whose forward hook then lives only from a measured
            step's forward to its backward, however late the norms are read; the next :meth:`arm`
            attaches it again.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        *,
        group_of: Mapping[str, str] | None = None,
        method: str | Mapping[str, str] | None = None,
        verify_every_step: bool = False,
        batch_dims: Mapping[str, int] | None = None,
        unhook_after_backward: bool = False,
        per_module: bool = False,
    ) -> None:
        self.unhook_after_backward = unhook_after_backward
        self.per_module = per_module
        self._open = False  # (per_module: the window from arm to the backward's end)
        self._module_entries: list[tuple[nn.Module, RemovableHandle, _ModuleHook]] = []  # (per_module, while armed)
        self._unhook_queued = False  # (an unhook queued to run at the end of the current backward)
        group_of = dict(group_of or {})
        batch_dims = dict(batch_dims or {})
        self.verify_every_step = verify_every_step
        self._sites: list[_Site] = []
        seen: dict[int, str] = {}
        for name, module in modules.items():
            kind, reason = _kind_of(module)
            if kind is None:
                raise ValueError(f"module {name!r} is not supported: {reason}")
            if id(module) in seen:
                raise ValueError(f"module {name!r} is the same object as {seen[id(module)]!r}")
            seen[id(module)] = name
            forced = method.get(name) if isinstance(method, Mapping) else method
            if forced not in (None, GHOST, MATERIALIZE):
                raise ValueError(f"method must be 'ghost', 'materialize' or None, got {forced!r}")
            self._sites.append(_Site(name, module, group_of.get(name, name), kind, forced, len(self._sites)))
            self._sites[-1].batch_dim = batch_dims.get(name)
        # a sequence-first model: layers outside the transformer modules may see the batch in
        # dimension 1 too; each call's layout is then read off its shape (arm(batch_size=…))
        self.sequence_first = any(dim == 1 for dim in batch_dims.values()) or any(
            isinstance(m, nn.MultiheadAttention) and not m.batch_first for m in modules.values())
        self._batch: int | None = None
        by_module = {id(site.module): site for site in self._sites}
        for site in list(self._sites):
            if site.kind is _ATTENTION:
                out = by_module.get(id(site.module.out_proj))
                site.partner = out  # (its own forward hook stays: a direct call of out_proj is a call too)
                for _ in range(2):  # cross-attention: the key's and the value's rows of in_proj_weight
                    sub = _Site(site.name, site.module, site.group, _ATTENTION, site.forced, len(self._sites))
                    sub.sub = True
                    site.slices.append(sub)
                    self._sites.append(sub)
        self._modules = sum(not site.sub for site in self._sites)  # the sub-rows come last
        self._module_names = tuple(site.name for site in self._sites if not site.sub)
        # read_sums folds each sub-row into its attention's row (None: no sub-rows)
        self._fold: Tensor | None = None
        if self._modules < len(self._sites):
            owner = list(range(self._modules)) + [main.index for main in self._sites for _ in main.slices]
            self._fold = torch.tensor(owner)
        self._group_rows: dict[str, list[int]] = {}
        for site in self._sites:
            self._group_rows.setdefault(site.group, []).append(site.index)
        self._armed = False
        self._handle: RemovableHandle | None = None  # the global forward hook, while attached
        self._dispatch: dict[int, Callable] = {  # id(module) → its site's recorder
            id(site.module): self._forward_hook(site) for site in self._sites if not site.sub}
        self._param_handles: list[RemovableHandle] = []
        self._epoch = 0
        self.backwards = 0
        """How many steps' backwards brought this object a recorded call's gradient (counted at the
        first such gradient after each reset): a backward count that needs no hook of its own."""
        self.seconds = 0.0
        """Wall time spent in the forward and gradient hooks (read and reset by the callback that
        charges it to the overhead budget)."""
        self._scratch = _Scratch()
        self._touched: list[_Site] = []
        # the step's rows (one per site) and 2-D Linear pair norms, and the buffers they live in
        self._step = StepRows(len(self._sites))
        self._reset_step()

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def supported(module: nn.Module) -> str | None:
        """``None`` when ``module``'s own parameters can be covered, else the reason."""
        return _kind_of(module)[1]

    @property
    def attached(self) -> bool:
        return self._open if self.per_module else self._handle is not None

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def site_count(self) -> int:
        """Rows a step writes (hooked modules, and a cross-attention's key/value rows)."""
        return len(self._sites)

    @property
    def module_names(self) -> tuple[str, ...]:
        """The hooked modules' names, in the order of :meth:`read_sums` (one tuple for this
        object's life: compared by identity first where it is read every step)."""
        return self._module_names

    @property
    def recorded_since_clear(self) -> bool:
        """Whether anything was recorded or reported since the last :meth:`clear` or read (a
        :meth:`clear` then is a no-op but for the epoch: a step's ~10 µs when skipped). A recorded
        call touches its site, which the rows taken and the call's ordinal imply; the sequence-first
        notes are the only state a call can leave without touching a site or reporting."""
        return bool(self._touched or self._problems or self._guessed or self._length_is_batch)

    @property
    def problems(self) -> tuple[str, ...]:
        """What the hooks reported since the last read (what :meth:`read` would raise with)."""
        return tuple(self._problems)

    def call_rows(self) -> dict[str, tuple[int, ...]]:
        """Per hooked module recorded since the last read (attention's projections left out), the
        leading size of each call's input as recorded (batch first): the batch size, for a
        layer whose rows are samples."""
        return {s.name: tuple(c.rows for c in s.calls) for s in self._touched
                if s.calls and s.kind is not _ATTENTION and not s.sub}

    @property
    def step_buffers(self) -> Lender | None:
        """Where a step's rows and pair norms are written instead of this object's own buffers
        (``(b, dtype, device) → StepBuffers`` or ``None`` for its own): a consumer that keeps several
        steps' raw values and makes their sums at once (:meth:`read_parts`, :meth:`sums_of`)."""
        return self._step.lender

    @step_buffers.setter
    def step_buffers(self, lender: Lender | None) -> None:
        self._step.lender = lender

    @property
    def workspace_bytes(self) -> int:
        """Bytes held in reusable CPU work buffers (released by :meth:`disarm`)."""
        return self._scratch.nbytes

    def attach(self) -> None:
        """Register the forward hook (a no-op while it is registered) and open the recording
        window (closed by :meth:`unhook`).

        By default one *global* module forward hook (``torch.nn.modules.module.register_module_forward_hook``)
        that dispatches by module to the hooked sites, not a hook on each module: global hooks run
        before a module's own, so a user's hook that returns a new output (registered before or
        after ours) cannot put itself between the module's product and the gradient we read; and
        PyTorch's eval-mode fast path of ``TransformerEncoderLayer``, which is refused while the
        layer or a child carries a forward hook, stays available to the user's own ``no_grad``
        forwards — a module hook changed the user's validation values in the last bits.

        ``per_module``: a hook on each hooked module instead, registered first among its hooks
        (``prepend=True``) and kept until :meth:`disarm` or :meth:`release`; each call puts it first
        again where a hook of the user's came before it (registered with ``prepend=True`` between
        steps) and opens the recording window, which :meth:`unhook` closes (a flag). The user's
        module calls that are not hooked keep PyTorch's hook-free fast path, which a process-wide
        hook takes from every call. A forward hook of the user's that runs before ours in the
        window and may replace the output — registered with ``prepend=True`` inside it, or
        process-wide — is a problem of the step (it was silently wrong): not measured. Put in and
        taken out at every step instead (two dict operations a module), the hooks measured 1.107×
        against 1.093× kept (docs/results/overhead.md, round 31). For models without
        ``TransformerEncoderLayer``, whose eval-mode fast path a module hook turns off (its results
        differ in the last bits)."""
        if self.per_module:
            self._open = True
            if not self._module_entries:
                for site in self._sites:
                    if not site.sub:
                        hook = _ModuleHook(self._dispatch[id(site.module)], -1)
                        handle = site.module.register_forward_hook(hook, prepend=True)
                        hook.key = handle.id
                        self._module_entries.append((site.module, handle, hook))
                return
            for module, handle, hook in self._module_entries:
                hooks = module._forward_hooks  # (looked up each time: a user may have replaced the dict)
                if next(iter(hooks), None) != handle.id:  # (a hook of the user's put before ours, or ours gone)
                    hooks[handle.id] = hook
                    hooks.move_to_end(handle.id, last=False)
            return
        if self._handle is not None:
            return
        # the process-wide hook holds this object weakly; the hook of an object collected without
        # unhook() is removed at the next attach() of any instance (never from a finalizer: the
        # garbage collector may run while torch iterates over the global hooks)
        for ref, handle in list(_GLOBAL_HOOKS):
            if ref() is None:
                handle.remove()
                _GLOBAL_HOOKS.remove((ref, handle))
        self._handle = register_module_forward_hook(functools.partial(_dispatch_forward, weakref.ref(self)))
        _GLOBAL_HOOKS.append((weakref.ref(self), self._handle))

    def _backward_ended(self) -> None:
        self._unhook_queued = False
        self.unhook()

    def unhook(self) -> None:
        """Remove the forward hook only (armed state, gradient hooks, recorded calls and work
        buffers stay): it exists from a measured step's forward to its backward, so every other
        module call of the process takes PyTorch's hook-free fast path. ``per_module``: close the
        recording window only (the hooks stay until :meth:`disarm` or :meth:`release`)."""
        if self.per_module:
            self._open = False
            return
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.remove()
        _GLOBAL_HOOKS[:] = [(ref, h) for ref, h in _GLOBAL_HOOKS if h is not handle]

    def arm(self, batch_size: int | None = None) -> None:
        """Record the following forwards (attaches the forward hook if needed).  Otherwise a
        no-op when armed; when not, drops anything left from an unread step.

        ``batch_size`` (needed only by a sequence-first model, :attr:`sequence_first`): the
        batch's size, by which each call's batch dimension (0 or 1) is found."""
        self.attach()
        self._batch = batch_size
        if self._armed:
            return
        self.clear()
        for site in self._sites:
            if site.sub:
                continue
            for p in site.module.parameters(recurse=False):  # (out_proj, when hooked, is a site of its own)
                if p.requires_grad:
                    self._param_handles.append(
                        p.register_post_accumulate_grad_hook(functools.partial(self._param_hook, site)))
        self._armed = True
        _ARMED.add(self)

    def disarm(self) -> None:
        """Stop recording new forwards (gradients of already recorded calls are still taken) and
        release the work buffers."""
        self._armed = False
        self._remove_param_hooks()
        self._remove_module_hooks()
        self._scratch.clear()
        self._step.release()
        _ARMED.discard(self)

    def release(self) -> None:
        """``per_module``: take the modules' hooks out until the next :meth:`attach` (armed state
        kept) — at an epoch's end and before validation, where users' callbacks copy, save or
        script the module (``StochasticWeightAveraging``'s copy, a checkpoint, an export)."""
        if self.per_module:
            self._remove_module_hooks()

    def _remove_module_hooks(self) -> None:
        self._open = False
        for module, handle, _ in self._module_entries:
            handle.remove()
            module._forward_hooks.pop(handle.id, None)  # (a dict the user put in place of the one it knows)
        self._module_entries.clear()

    def _remove_param_hooks(self) -> None:
        for h in self._param_handles:
            h.remove()
        self._param_handles.clear()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Disarm for the block (probe passes run while armed), then restore."""
        was = self._armed
        self._armed = False
        try:
            yield
        finally:
            self._armed = was

    def clear(self) -> None:
        """Drop stored activations, pending calls and results."""
        self._epoch += 1
        for site in self._touched:
            site.reset()
        self._touched.clear()
        self._reset_step()

    def detach(self) -> None:
        """Remove every hook and drop all state."""
        self.disarm()
        self.unhook()
        self.clear()

    def _reset_step(self) -> None:
        # one row per hooked module, taken at the step's first recorded forward (StepRows)
        self._step.reset()
        self._counted = False  # (this step's first gradient counted in self.backwards)
        self._problems: list[str] = []
        self._ordinal = 0
        self._coupled_upto = 0
        self._guessed: list[str] = []  # sequence-first: layers whose batch dimension was guessed
        self._length_is_batch = False  # … and a sequence length equal to the batch size was seen
        self._length_reported = False

    # -- hooks -------------------------------------------------------------------------------

    def _forward_hook(self, site: _Site) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any, key: int | None = None) -> None:
            if not self._armed or (self.per_module and (not self._open or module is not site.module)):
                return None
            if key is not None:
                # another forward hook ran first and may have replaced the product's output: the
                # gradient read would not be the one its weight's gradient is made of
                if self.per_module:  # (ours first among the module's, and no process-wide one of the user's)
                    before = next(iter(module._forward_hooks), None) != key or (
                        bool(_global_forward_hooks) and _foreign_global_hook_before(None))
                else:  # (no process-wide one of the user's registered before ours)
                    before = _foreign_global_hook_before(key)
                if before and torch.is_grad_enabled():
                    self._problems.append(
                        f"{site.name}: a forward hook of the user's runs before ours (one registered with "
                        "prepend=True during the step, or a process-wide one) and may replace the layer's output")
                    return None
            started = time.perf_counter()
            self._record(site, module, args, output)
            self.seconds += time.perf_counter() - started
            return None

        return hook

    def _record(self, site: _Site, module: nn.Module, args: tuple, output: Any) -> None:
        if site.kind is _ATTENTION:
            self._record_attention(site, module, output)
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return  # no gradient will flow (no_grad, inference, everything frozen)
        params = module._parameters  # faster than Module.__getattr__
        w = params.get("weight")
        c = params.get("bias")
        wt = w is not None and w.requires_grad
        bt = c is not None and c.requires_grad
        if not (wt or bt):
            return
        if not args:
            self._problems.append(f"{site.name}: input passed by keyword")
            return
        x = args[0]
        problem = site.kind.check(module, x)
        if problem is not None:
            self._problems.append(f"{site.name}: {problem}")
            return
        if isinstance(site.kind, _BatchNormKind) and site.kind.batch_stats(module):
            site.coupled = True
            self._coupled_upto = self._ordinal + 1
        dim = self._batch_dim(site, module, x) if self.sequence_first else 0
        if isinstance(dim, str):
            self._problems.append(f"{site.name}: {dim}")
            return
        if dim:  # [T, B, …]: recorded as [B, T, …] (a view), its gradient likewise
            x = x.transpose(0, 1)
        # the input is kept (no copy) and read in the backward only: its row norms taken here
        # instead, while it is hot in cache, measured about 70 µs a step slower on the MLP (0.6-1.4
        # points of a raw step in five in-process A/B runs; docs/results/overhead.md). Not
        # detached here (an op, ~20 µs of the MLP's measured forward): the backward hook reads it
        # with gradient recording off, and releases it
        dt = x.dtype  # (the compute dtype: fp32 for fp32 calls without the promotion's op)
        call = self._new_call(site, x if site.kind.needs_input(wt, bt) else None, x.shape[0], x, wt, bt,
                              dt if dt is torch.float32 and output.dtype is dt else _compute_dtype(dt, output.dtype))
        if call is None:
            return
        node = output.grad_fn
        if node is None:  # a leaf: not computed from its weights in this call (fails closed)
            self._problems.append(f"{site.name}: its output has no autograd node")
            return
        # a pre-hook on the output's node: what its backward receives for this output (after any
        # hook of the user's on the tensor: the gradient the weight's gradient is made of); about
        # half of Tensor.register_hook's Python cost (3.4 against 6.5 µs a call, measured)
        node.register_prehook(functools.partial(self._output_hook, call, output.output_nr, dim))

    def _batch_dim(self, site: _Site, module: nn.Module, x: Tensor) -> int | str:
        """Which dimension of ``x`` holds the batch, in a sequence-first model (a problem when
        that cannot be told).

        A layer outside PyTorch's transformer layers is *guessed*: by the dimension of size ``B``
        among the first two.  When a sequence length in the step equals ``B`` (seen by a declared
        layer or an attention) no guess is trusted: a layer on ``[T, 1, d]`` or ``[T, d]`` — a
        positional embedding shared by the batch — would pass for a batch-first one.  The step
        is then reported."""
        least = site.kind.sequence_dims(module)
        if least is None:
            return 0
        batched = x.dim() >= least
        if site.batch_dim is not None:
            if batched and self._batch is not None and x.shape[1 - site.batch_dim] == self._batch:
                self._note_lengths(length_is_batch=True)
            return site.batch_dim if batched else 0
        self._note_lengths(guessed=site.name)
        if not batched:
            return 0
        B = self._batch
        if B is None:
            return ("a sequence-first model and no batch size (arm(batch_size=…)): which dimension of "
                    f"{tuple(x.shape)} holds the batch cannot be told")
        first, second = x.shape[0] == B, x.shape[1] == B
        if first and second:
            return (f"input {tuple(x.shape)}: dimensions 0 and 1 both have the batch size {B} (sequence length "
                    "= batch size) in a sequence-first model, so which holds the batch cannot be told")
        return 1 if second else 0  # (neither: reported as mismatched batch sizes)

    def _note_lengths(self, guessed: str | None = None, length_is_batch: bool = False) -> None:
        if guessed is not None and guessed not in self._guessed:
            self._guessed.append(guessed)
        self._length_is_batch = self._length_is_batch or length_is_batch
        if self._guessed and self._length_is_batch and not self._length_reported:
            self._length_reported = True
            self._problems.append(
                f"a sequence length equals the batch size ({self._batch}) in a sequence-first model: whether "
                f"{', '.join(self._guessed)} (outside PyTorch's transformer layers) see the batch or positions shared "
                "by the batch (e.g. a positional embedding) cannot be told")

    def _new_call(self, site: _Site, x: Tensor | None, b: int, on: Tensor, wt: bool, bt: bool,
                  dtype: torch.dtype) -> _Call | None:
        """Book one forward call of ``site`` (``None`` when it cannot be recorded: reported).
        ``dtype``: the call's compute dtype, the step's rows' dtype when it is the first call;
        ``on``: a tensor of the call, on the device of the step's rows (its device read only there)."""
        if site.calls and site.received == len(site.calls):
            self._problems.append(
                f"{site.name}: forward recorded again after its backward; call read() or clear() "
                "between steps")
            return None
        if self._step.rows is None:
            self._step.take(b, dtype, on.device)
        self._ordinal += 1
        if not site.calls:
            if not site.touched:
                site.touched = True
                self._touched.append(site)
            site.first_ordinal = self._ordinal
            site.flags = (wt, bt)
        call = _Call(site, x, x._version if x is not None else 0, self._epoch, b)
        site.calls.append(call)
        return call

    def _record_attention(self, site: _Site, module: nn.Module, output: Any) -> None:
        """A MultiheadAttention call: its in-projection (this site) and out-projection (the partner
        site) are matched in the output's autograd graph; each gets a hook on its product's node
        that receives the product's output gradient (ghost_attention)."""
        out = output[0] if isinstance(output, tuple) else output
        if not isinstance(out, Tensor) or not out.requires_grad:
            return
        if out.dim() != 3:
            self._problems.append(f"{site.name}: unbatched input (the batch must be a dimension of a 3-D input)")
            return
        B, L = ghost_attention.batch_and_length(module, out.shape)
        found, problem = ghost_attention.find_projections(module, out, B, L)
        if problem is not None:
            self._problems.append(f"{site.name}: {problem}")
            return
        if self.sequence_first and any(p.T == B for p in found if p.slot != ghost_attention.OUT):
            self._note_lengths(length_is_batch=True)  # (query or memory length = batch size)
        layout = tuple(sorted((p.slot, p.width) for p in found if p.slot != ghost_attention.OUT))
        if layout and site.calls and layout != site.layout:
            # a whole-weight product and row-block products of one weight have cross terms
            self._problems.append(f"{site.name}: called as self- and as cross-attention (or with key = value and "
                                  "key != value) in one step; per-sample norms of that weight sharing are not "
                                  "implemented")
            return
        if layout:
            site.layout = layout
        (w_in, c_in), (w_out, c_out) = ghost_attention.projection_parameters(module)
        for proj in found:
            if proj.slot == ghost_attention.OUT:
                target, w, c = site.partner, w_out, c_out
            else:
                target, w, c = (site if proj.slot == 0 else site.slices[proj.slot - 1]), w_in, c_in
            if target is None:
                continue
            wt, bt = w.requires_grad, c is not None and c.requires_grad
            T = proj.T  # rows are position-major: [T·B, d] → [B, T, d] (a view)
            x = proj.rows.detach().view(T, B, -1).transpose(0, 1) if wt else None
            call = self._new_call(target, x, B, out, wt, bt, _compute_dtype(out.dtype))
            if call is not None:
                proj.node.register_prehook(functools.partial(self._node_hook, call, T, B))

    def _node_hook(self, call: _Call, T: int, B: int, grad_outputs: tuple) -> None:
        grad = grad_outputs[0]
        if grad is not None:
            started = time.perf_counter()
            try:
                self._on_grad(call, grad.view(T, B, -1).transpose(0, 1))
            finally:
                self.seconds += time.perf_counter() - started

    def _output_hook(self, call: _Call, nr: int, dim: int, grad_outputs: tuple) -> None:
        grad = grad_outputs[nr]
        if grad is not None:
            started = time.perf_counter()
            try:
                self._on_grad(call, grad.transpose(0, 1) if dim else grad)
            finally:
                self.seconds += time.perf_counter() - started

    def _on_grad(self, call: _Call, grad: Tensor) -> None:
        site = call.site
        if call.epoch != self._epoch:  # recorded before a clear(): ignored
            site.stale_grad = True
            if not site.touched:
                site.touched = True
                self._touched.append(site)
            return
        if call.got:
            self._problems.append(f"{site.name}: two backward passes through one recorded forward")
            return
        call.got = True
        site.received += 1
        if not self._counted:
            self._counted = True
            self.backwards += 1
        if self.unhook_after_backward and not self._unhook_queued and self.attached:
            # the step's forward hook goes when this backward ends (callbacks and hooks that run
            # before the norms are read see none); not before: a segment checkpointed with
            # use_reentrant=True runs its forward again inside the backward, to be recorded
            Variable._execution_engine.queue_callback(self._backward_ended)
            self._unhook_queued = True
        x = call.x
        call.x = None
        single = len(site.calls) == 1
        if x is not None and x._version != call.version:
            self._problems.append(f"{site.name}: its input was modified in place after the forward")
            return
        try:
            if torch.is_grad_enabled():  # backward(create_graph=True): nothing of ours is recorded
                with torch.no_grad(), torch.autocast(grad.device.type, enabled=False):
                    self._compute(site, x, grad, single)
            elif (_any_autocast() or not (grad.is_cpu or grad.is_cuda)) and torch.is_autocast_enabled(grad.device.type):
                with torch.autocast(grad.device.type, enabled=False):  # backward called inside autocast
                    self._compute(site, x, grad, single)
            else:
                self._compute(site, x, grad, single)
        except RuntimeError as err:  # shape mismatch between shared calls, …
            self._problems.append(f"{site.name}: {err}")

    def _compute(self, site: _Site, x: Tensor | None, grad: Tensor, single: bool) -> None:
        wt, bt = site.flags
        # a 2-D Linear call (Goodfellow): only its two row norms ‖δ_i‖ and ‖a_i‖, written into the
        # step's pair buffer (two ops in the backward, where squaring and combining them took
        # five; the rows of every such module are made at the read in three: StepRows.finish_linear).
        # write_pair declines anything else — another dtype than the rows' (autocast, a wider
        # layer), a batch size other than the rows' — for the general route below
        if single and site.pairs and self._step.write_pair(site.index, x if wt else None, grad, bt):
            site.method = GOODFELLOW
            site.b = grad.shape[0]
            return
        if single:
            cd = _compute_dtype(grad.dtype, x.dtype if x is not None else grad.dtype)
            row: Tensor | None = self._step.row_for(site.index, cd)
            if len(row) != grad.shape[0]:
                row = None  # mismatched batch sizes: _add reports them
            sq, site.method = site.kind.single(site.module, x, grad, wt, bt, site.forced, self._scratch, row)
            self._add(site, sq)
        else:
            # kept past this hook (summed by _finish, maybe outside the backward): detached, as a
            # view made here of a tensor that requires gradient requires it too
            if x is not None and x.requires_grad:
                x = x.detach()
            if grad.requires_grad:
                grad = grad.detach()
            site.factors.append(site.kind.factor(site.module, x, grad, wt, bt))
            if site.received == len(site.calls):
                self._finish(site)

    def _param_hook(self, site: _Site, p: Tensor) -> None:
        if self._armed:
            site.param_grad = True
            if not site.touched:
                site.touched = True
                self._touched.append(site)

    def _finish(self, site: _Site) -> None:
        wt, bt = site.flags
        f = site.factors[0] if len(site.factors) == 1 else site.kind.concat(site.factors)
        site.factors = []
        sq, site.method = site.kind.norms(site.module, f, wt, bt, site.forced, self._scratch)
        self._add(site, sq)

    def _add(self, site: _Site, sq: Tensor) -> None:
        # one [b] vector per module and step (usually written in place by the module's last op);
        # summed per group in float64 by read() with a constant number of ops
        site.b = sq.shape[0]
        self._step.store(site.index, sq)

    # -- results -----------------------------------------------------------------------------

    def read(self, scale: float | Tensor = 1.0) -> PerSampleNorms | None:
        """Per-sample squared norms of the last backward, times ``scale²``; resets the step.

        Args:
            scale: ``m·A/S`` (see the module docstring); a number or a 0-d tensor (it is never
                moved to the host).

        Returns:
            ``None`` when nothing was recorded, when no recorded call received gradient (read
            before the backward), or when a module whose recorded calls received none has
            weights with a gradient (which the read cannot place). A module whose recorded calls
            received none (its output did not reach the loss) and whose weights have no gradient
            has zero norms, as one that did not run.

        Raises:
            RuntimeError: when exact values cannot be produced (unbatched input, an input
                modified in place, a second backward through the same forward, parameters that
                received gradient although their module's recorded calls did not, mismatched
                batch sizes).
        """
        try:
            return self._read(scale)
        finally:
            self.clear()

    def read_sums(self, scale: float | Tensor = 1.0) -> Tensor | None:
        """``[len(modules)]`` float64 ``Σ_i ‖∇ℓ_i‖²`` restricted to each hooked module (in the
        order of ``modules``; zero for a module that did not run), times ``scale²`` — what
        :meth:`read` gives summed over the samples, with the same checks, in one op (two with a
        scale) instead of the per-module vectors. ``GradientDispersion``'s per-step path reads at
        scale 1 and applies the batch's scale where it folds the sums into its row. Resets the step."""
        try:
            if self._validated() is None:
                return None
            assert self._step.rows is not None
            sums = self._step.rows.sum(1, dtype=torch.float64)  # (exact widening, then the sum: one op)
            if self._fold is not None:  # cross-attention's key/value rows belong to their attention
                if self._fold.device != sums.device:
                    self._fold = self._fold.to(sums.device)
                sums = torch.zeros(self._modules, dtype=sums.dtype, device=sums.device).index_add_(0, self._fold, sums)
            return times_scale_sq_(sums, scale)
        finally:
            self.clear()

    def read_parts(self) -> tuple[Tensor | None, tuple[tuple[int, bool], ...]] | None:
        """:meth:`read_sums` at scale 1, or — when the step's rows and pair norms are
        :attr:`step_buffers`' — nothing computed: ``(None, deferred)``, whose sums the lender makes
        later with :meth:`sums_of` (for many steps at once). The same checks; ``None`` when nothing
        was recorded. Resets the step."""
        step = self._step
        if not (step.lent and self._fold is None):
            sums = self.read_sums()
            return None if sums is None else (sums, ())
        try:
            if self._validated(finish_linear=False) is None:  # (the Linear rows: sums_of)
                return None
            if not step.lent:  # (widened by a wider layer's values: a copy, read now)
                step.finish_linear()
                assert step.rows is not None
                return step.rows.sum(1, dtype=torch.float64), ()
            return None, tuple(step.deferred)
        finally:
            self.clear()

    def sums_of(self, rows: Tensor, pairs: Tensor, deferred: tuple[tuple[int, bool], ...]) -> Tensor:
        """``[k, modules]`` float64 ``Σ_i ‖∇ℓ_i‖²`` per hooked module of ``k`` steps read by
        :meth:`read_parts` with the same ``deferred`` (their lent rows ``[k, sites, b]`` and pair
        norms ``[k, 2, sites, b]``): each step's :meth:`read_sums` at scale 1, in a few ops for all."""
        return self._step.sums_of(rows, pairs, deferred)

    def _validated(self, finish_linear: bool = True) -> list[_Site] | None:
        """The modules recorded this step, once every check passed (``None``: nothing to read);
        the deferred Linear rows made unless ``finish_linear`` is false (:meth:`read_parts`)."""
        if self._problems:
            raise RuntimeError("ghost norms unavailable: " + "; ".join(self._problems))
        for site in self._touched:
            if site.param_grad and site.received == 0 and not site.stale_grad:
                raise RuntimeError(
                    f"ghost norms unavailable: parameters of {site.name!r} received gradient but no "
                    "recorded forward call of it did (weights used outside the module's forward, or "
                    "armed after the forward)")
        recorded = [s for s in self._touched if s.calls]
        # a recorded call whose output the backward did not reach adds zero to every sample's
        # gradient, as a module that did not run: its row stays unwritten, zeroed below (a branch
        # whose output a batch does not use: the step was lost, and an extra pass measured the rest
        # of the fit). Nothing reached: no backward
        if not any(s.received for s in recorded):
            return None
        for site in recorded:
            if not site.received and not site.sub and any(
                    p is not None and p.requires_grad and p.grad is not None for p in site.module._parameters.values()):
                # … only where its weights have no gradient at all: one they have came another way
                # (the weight also applied by F.linear: a review found that 43-47 % low, silently,
                # once the verification hooks were gone) or is an earlier one (accumulation, DDP's
                # average of the other processes'), which the read cannot tell apart: not measured
                return None
        if finish_linear and self._step.deferred:
            self._step.finish_linear()
        if self._param_handles and not self.verify_every_step:
            self._remove_param_hooks()  # the structure was verified on this backward
        for site in recorded:
            if site.factors:  # shared module whose other calls got no gradient (they add zero)
                with _autocast_off(site.factors[0][1]):
                    self._finish(site)
        sizes = {s.b for s in recorded if s.received}
        if len(sizes) != 1:
            raise RuntimeError(f"ghost norms unavailable: modules saw different batch sizes {sorted(sizes)}")
        self._step.zero_unwritten()
        return recorded

    def _read(self, scale: float | Tensor) -> PerSampleNorms | None:
        recorded = self._validated()
        if recorded is None:
            return None
        rows = self._step.rows64()
        # handed out below (per_group's views): the step's own rows are not reused by the next step
        views = self._step.hand_out() if rows is self._step.rows else rows.unbind(0)
        times_scale_sq_(rows, scale)
        total = rows.sum(0)  # rows of modules that did not run are zero
        per_group: dict[str, Tensor] = {}
        for g, members in self._group_rows.items():
            acc = views[members[0]]
            if len(members) > 1:
                acc = acc + views[members[1]]
                for i in members[2:]:
                    acc.add_(views[i])
            per_group[g] = acc
        recorded.sort(key=lambda s: s.first_ordinal)
        # (an attention's route is its query product's, as predict_methods predicts it)
        methods = {s.name: s.method for s in recorded if s.method is not None and not s.sub}
        exactness = {
            s.name: DECOMPOSITION if (s.coupled or s.first_ordinal < self._coupled_upto) else EXACT
            for s in recorded if not s.sub
        }
        return PerSampleNorms(total=total, per_group=per_group, methods=methods, exactness=exactness)

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        *,
        group_of: Mapping[str, str] | None = None,
        method: str | Mapping[str, str] | None = None,
    ) -> GhostNormHooks:
        """Hooks on every covered module of ``model``; raises when some trainable parameter is
        not covered (mixing covered and uncovered parameters would be silently wrong)."""
        covered, uncovered = plan(model)
        if uncovered:
            items = [f"{k} ({v})" for k, v in list(uncovered.items())[:6]]
            raise ValueError("ghost norms cannot cover: " + ", ".join(items)
                             + (f" and {len(uncovered) - 6} more" if len(uncovered) > 6 else ""))
        return cls(covered, group_of=group_of, method=method, batch_dims=declared_batch_dims(model))
