"""Per-sample squared gradient norms from BackPACK's ``BatchL2Grad``, during an existing backward.

BackPACK computes ``‖∂L/∂θ_i‖²`` for every sample ``i`` from the inputs and output gradients of
each *supported* layer, inside the backward pass the training step runs anyway — no extra pass.
Two of its behaviours need guarding, and this module does:

* it **silently skips** layers it has no extension for (LayerNorm, GroupNorm, raw
  ``nn.Parameter`` s, …): :func:`backpack_coverage` counts the trainable scalars it covers,
  and callers refuse anything short of 100 % — mixing covered ``Σ‖g_i‖²`` with an all-parameter
  ``‖ḡ‖²`` would be silently wrong;
* ``backpack.extend`` installs hooks on every module forever: :class:`BackpackNormHooks`
  instead hooks only the covered layers, only while a measurement is wanted, and removes its
  hooks afterwards, so unmeasured steps and the user's model stay untouched.

Scaling: for a mean-reduced loss ``L = 1/(m·A) Σ_i ℓ_i`` (``A`` = accumulation factor)
BackPACK returns ``‖g_i‖²/(m·A)²``; :meth:`BackpackNormHooks.read` undoes that.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from backpack import backpack as backpack_context
from backpack import hook_run_extensions, hook_store_io, memory_cleanup
from backpack.extensions import BatchL2Grad

from genbounds.estimators import recording
from genbounds.estimators.ghost_norms import times_scale_sq_


@dataclass
class BackpackCoverage:
    """Which trainable parameters BackPACK's ``BatchL2Grad`` reaches."""

    covered_modules: list[nn.Module] = field(default_factory=list)
    covered_scalars: int = 0
    total_scalars: int = 0
    uncovered: dict[str, str] = field(default_factory=dict)
    """Qualified parameter name → the reason it is not covered."""

    @property
    def fraction(self) -> float:
        return 1.0 if self.total_scalars == 0 else self.covered_scalars / self.total_scalars

    @property
    def complete(self) -> bool:
        return not self.uncovered and self.covered_scalars == self.total_scalars

    def describe(self, limit: int = 6) -> str:
        items = [f"{name} ({why})" for name, why in list(self.uncovered.items())[:limit]]
        more = len(self.uncovered) - len(items)
        return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def backpack_coverage(model: nn.Module, batchnorm_in_train_mode: bool = True) -> BackpackCoverage:
    """Count the trainable scalars whose per-sample norms ``BatchL2Grad`` computes.

    BackPACK matches layer types exactly (a subclass of ``nn.Linear`` is not covered), reaches
    only the parameters a supported layer owns directly, and raises on BatchNorm in train mode
    (BatchNorm mixes the samples of a batch). ``batchnorm_in_train_mode`` says whether the
    BatchNorm layers will be in train mode when measured.
    """
    supported = _supported_layer_types()
    cov = BackpackCoverage()
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        size = sum(p.numel() for _, p in own)
        cov.total_scalars += size
        reason = None
        if type(module) not in supported:
            reason = f"{type(module).__name__} has no BackPACK extension"
        elif isinstance(module, _BatchNorm) and batchnorm_in_train_mode:
            reason = "BatchNorm in train mode couples the samples"
        if reason is None:
            cov.covered_modules.append(module)
            cov.covered_scalars += size
        else:
            for n, _ in own:
                cov.uncovered[prefix + n] = reason
    return cov


def _supported_layer_types() -> set[type]:
    """Layer classes ``BatchL2Grad`` has an extension for. BackPACK keeps its table in a
    name-mangled attribute with no public accessor; read it, else fall back to the classes
    documented for backpack-for-pytorch 1.7."""
    table = getattr(BatchL2Grad(), "_BackpropExtension__module_extensions", None)
    if isinstance(table, dict):
        return set(table)
    return {
        nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
        nn.ConvTranspose3d, nn.RNN, nn.LSTM, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
        nn.Embedding,
    }


class BackpackNormHooks:
    """Per-sample squared gradient norms of the covered layers, for backward passes run
    between :meth:`attach` and :meth:`detach`.

    Usage around a backward whose loss is ``mean_i ℓ_i / A`` over ``m`` samples::

        hooks.attach()            # before the forward
        ...forward...
        with hooks.active():      # around the backward
            loss.backward()
        sq = hooks.read(scale=m * A)   # Σ_i ‖g_i‖² (float64)
        hooks.detach()
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self._handles: list[RemovableHandle] = []
        self._extension = BatchL2Grad()
        self._context: backpack_context | None = None

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Hook the covered layers (store their inputs/outputs; run BackPACK in backward)."""
        if self._handles:
            return
        # The first layer's input needs no gradient, so torch notes that its full backward hook
        # fires for the output gradient only — which is all BatchL2Grad uses.
        warnings.filterwarnings(
            "ignore",
            message="Full backward hook is firing when gradients are computed with respect to module outputs",
            category=UserWarning,
        )
        for module in self.modules:
            self._handles.append(module.register_forward_hook(hook_store_io))
            self._handles.append(module.register_full_backward_hook(hook_run_extensions))
        recording.register(self)

    def detach(self, clean: bool = True) -> None:
        """Remove every hook and every field BackPACK wrote (``batch_l2``, stored IO)."""
        if clean:
            self.exit_backward()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        recording.unregister(self)
        if not clean:
            return
        for module in self.modules:
            memory_cleanup(module)
            for p in module.parameters(recurse=False):
                if hasattr(p, "batch_l2"):
                    del p.batch_l2

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Remove the hooks for the duration of the block (an extra pass run while they are
        attached: ``torch.func`` transforms reject BackPACK's hooked modules, and the probe's
        forward must not be recorded as the training step's) and put them back afterwards."""
        was_attached = self.attached
        context = self._context
        if was_attached:
            self._context = None  # keep BackPACK's extension context across the pause
            self.detach(clean=False)
        try:
            yield
        finally:
            if was_attached:
                self.attach()
                self._context = context

    def enter_backward(self) -> None:
        """Activate ``BatchL2Grad`` for the next backward (the entry half of ``with backpack``)."""
        if self._context is None:
            self._context = backpack_context(self._extension)
            self._context.__enter__()

    def exit_backward(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None

    def read_modules(self, scale: float | Tensor) -> dict[nn.Module, Tensor] | None:
        """Per covered module, ``‖g_i‖²`` per sample (float64, ``[m]``) from the last backward;
        ``scale`` as in :meth:`read` (a number or a 0-d device tensor). ``None`` when some covered
        layer produced no field."""
        out: dict[nn.Module, Tensor] = {}
        for module in self.modules:
            per_sample = None
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    continue
                field_ = getattr(p, "batch_l2", None)
                if field_ is None:
                    return None
                contrib = field_.double()
                per_sample = contrib if per_sample is None else per_sample + contrib
                del p.batch_l2
            if per_sample is not None:  # (its own float64 tensor: the field is deleted above)
                out[module] = times_scale_sq_(per_sample, scale)
        return out

    def read(self, scale: float | Tensor) -> tuple[Tensor, Tensor] | None:
        """``(Σ_i ‖g_i‖², ‖g_i‖² per sample)`` in float64 from the last backward, with
        ``scale`` the loss's divisor (``m·A`` for a mean over ``m`` samples divided by ``A``).
        ``None`` when some covered layer produced no field (it was not used in the backward)."""
        per_module = self.read_modules(scale)
        if not per_module:
            return None
        per_sample = torch.stack(list(per_module.values())).sum(0)
        return per_sample.sum(), per_sample


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


__all__ = ["BackpackCoverage", "BackpackNormHooks", "backpack_coverage", "has_batchnorm"]
