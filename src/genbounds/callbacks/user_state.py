"""The plain Python state a user's ``training_step`` keeps on its modules, snapshotted before a
probe calls it and restored after (:func:`kept_user_state`, used by
:func:`~genbounds.callbacks.isolation.muted_training_step`).

Lightning's documentation keeps a step's outputs on the module —
``self.training_step_outputs.append(loss)`` and their mean logged in ``on_train_epoch_end`` —
and users count samples (``self.samples_seen += len(x)``). A probe that calls ``training_step``
(the loss contract's trial, the extra passes, the held-out and flatness probes) ran that code too:
a fit with the default suite ended its first epoch with 320 outputs kept instead of 6, and logged
another epoch mean. What is restored, on every module of the LightningModule except torchmetrics
metrics (whose states :func:`~genbounds.callbacks.isolation.muted_training_step` restores):

* every attribute the user's classes set (not those ``nn.Module`` / ``LightningModule`` set
  themselves, nor genbounds' own ``_genbounds_*``): rebound to its old value when rebound
  (``self.count += 1``), removed when the call added it;
* lists, dicts, sets, deques and bytearrays changed in place, nested ones too (four levels): the
  same objects, their old contents (``append``, ``extend``, ``pop``, ``d[k] = v``); one of over
  :data:`MAX_CONTAINER_ITEMS` items, or past :data:`MAX_ITEMS_PER_CALL` items in all, keeps its
  length only (a list cut back to it);
* tensor attributes that are neither parameters nor buffers, changed in place, of up to
  :data:`MAX_TENSOR_ELEMENTS` elements (counters, small running values): copied before,
  copied back when their version moved. A larger one changed in place is reported (one warning
  per attribute): copying it on every probe would cost what the probe costs.

* random generators the module keeps (``torch.Generator``, NumPy's ``Generator`` and
  ``RandomState``, ``random.Random``; noise or augmentation drawn from ``self.gen``): their
  states, so a probe's draws do not shift the run's.

Not restored: the internal state of other objects the module refers to (a custom tracker's
``update``, a file written), and tensors inside containers changed in place (reported, one warning
per attribute: copying each on every call would cost what a probe costs). Buffers,
parameters, modes and the global random streams are the isolation's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

MAX_TENSOR_ELEMENTS = 1 << 16
"""Largest tensor attribute copied before a probe (elements)."""

MAX_ITEMS_PER_CALL = 65536
"""Items kept across the containers nested in attributes, in one call; past it, nested containers
keep their length only (an attribute's own container of up to :data:`MAX_CONTAINER_ITEMS` items is
always kept: a large nested lookup cannot starve a small cache)."""

MAX_CONTAINER_ITEMS = 4096
"""Largest container whose items are kept before a probe; a larger one keeps its length only
(a list grown by the call is cut back to it — ``append`` and ``extend``, the usual changes; a
change of another large container's size is reported; a change that keeps the size is not
seen), so a vocabulary or an in-memory dataset held on the module costs little per probe."""

_DEPTH = 4
_BASE_KEYS: dict[type, frozenset[str]] = {}
_reported: set[str] = set()


def _base_keys(module: nn.Module) -> frozenset[str]:
    """Attribute names the framework's own constructors set (``nn.Module``'s, or
    ``LightningModule``'s for a LightningModule): not the user's state."""
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a dependency
        LightningModule = None  # type: ignore[assignment,misc]
    base: type = LightningModule if LightningModule is not None and isinstance(module, LightningModule) else nn.Module
    keys = _BASE_KEYS.get(base)
    if keys is None:
        keys = frozenset(base().__dict__) | {"training"}
        _BASE_KEYS[base] = keys
    return keys


class _Saved:
    """One value and what restores it: the old contents of a container (recursively), or a copy
    of a small tensor with its version."""

    __slots__ = ("value", "items", "version", "copy", "length", "rng", "nested")

    def __init__(self, value: Any, depth: int, budget: list[int]) -> None:
        self.value = value
        self.nested = depth < _DEPTH
        self.items: Any = None
        self.version = -1
        self.copy: Tensor | None = None
        self.length = -1
        self.rng = _rng_state(value) if depth == _DEPTH else None  # (an attribute itself: not in containers)
        if depth <= 0:
            return
        if isinstance(value, (list, deque, dict, set, bytearray, tuple)):
            # (an attribute's own container always fits: only what nests in it draws on the budget)
            limit = MAX_CONTAINER_ITEMS if depth == _DEPTH else min(MAX_CONTAINER_ITEMS, budget[0])
            if len(value) > limit:
                if not isinstance(value, tuple):
                    self.length = len(value)
                return
            if depth < _DEPTH:
                budget[0] -= len(value)
        if isinstance(value, (list, deque)):
            self.items = [_Saved(v, depth - 1, budget) for v in value]
        elif isinstance(value, dict):
            self.items = [(k, _Saved(v, depth - 1, budget)) for k, v in value.items()]
        elif isinstance(value, (set, bytearray)):
            self.items = value.copy()
        elif isinstance(value, tuple):  # (immutable itself; its containers are not)
            self.items = [_Saved(v, depth - 1, budget) for v in value]
        elif isinstance(value, Tensor) and not isinstance(value, nn.Parameter) \
                and not value.is_inference():  # (an inference tensor has no version: it cannot change in place)
            self.version = value._version
            # (an attribute itself is copied; a tensor inside a container — a list of step outputs —
            # keeps its identity, and a change in place is reported: copying each would cost every call)
            if depth == _DEPTH and value.numel() <= MAX_TENSOR_ELEMENTS:
                self.copy = value.detach().clone()

    def restore(self, name: str, key: str) -> None:
        v = self.value
        if self.rng is not None:
            _set_rng_state(v, self.rng)
            return
        if self.length >= 0:
            if isinstance(v, list) and len(v) > self.length:
                del v[self.length:]
            elif len(v) != self.length:
                _report(key, f"training_step changed the size of {name} ({self.length} → {len(v)} items) during a "
                        f"genbounds probe; a container of over {MAX_CONTAINER_ITEMS} items keeps its length only "
                        "and is not restored")
            return
        if self.items is not None:
            if isinstance(v, (list, deque)):
                v.clear()
                v.extend(s.value for s in self.items)
            elif isinstance(v, dict):
                v.clear()
                v.update((k, s.value) for k, s in self.items)
            elif isinstance(v, set):
                v.clear()
                v.update(self.items)
            elif isinstance(v, bytearray):
                v[:] = self.items
            if isinstance(v, (list, deque, tuple)):
                for s in self.items:
                    s.restore(name, key)
            elif isinstance(v, dict):
                for _, s in self.items:
                    s.restore(name, key)
        elif self.version >= 0 and v._version != self.version:
            if self.copy is not None:
                with torch.no_grad():
                    v.copy_(self.copy)
            elif self.nested:
                _report(key, f"training_step changed a tensor inside {name} in place during a genbounds probe; it "
                        "is not restored (tensors inside containers keep their identity only). Keep it as a tensor "
                        "attribute or a buffer to have it restored.")
            else:
                _report(key, f"training_step changed the tensor attribute {name} ({v.numel()} elements, not a "
                        "buffer) in place during a genbounds probe; it is not restored (only tensors of up to "
                        f"{MAX_TENSOR_ELEMENTS} elements are copied). Register it as a buffer to have it restored.")


_RNG_TYPES: tuple[type, ...] | None = None


def _rng_types() -> tuple[type, ...]:
    """The random-generator types a module may keep (resolved once)."""
    global _RNG_TYPES
    if _RNG_TYPES is None:
        import random

        import numpy as np

        _RNG_TYPES = (torch.Generator, random.Random, np.random.Generator, np.random.RandomState)
    return _RNG_TYPES


def _rng_state(value: Any) -> Any:
    """The state of a random generator the module keeps (``torch.Generator``, NumPy's
    ``Generator`` and ``RandomState``, Python's ``random.Random``), else ``None`` (also for a
    generator without a state: ``random.SystemRandom``)."""
    if not isinstance(value, _rng_types()):
        return None
    try:
        if isinstance(value, torch.Generator):
            return value.get_state()
        if hasattr(value, "bit_generator"):
            return value.bit_generator.state
        return value.get_state() if hasattr(value, "get_state") else value.getstate()
    except NotImplementedError:  # (random.SystemRandom: the system's entropy, no state)
        return None


def _set_rng_state(value: Any, state: Any) -> None:
    if isinstance(value, torch.Generator):
        value.set_state(state)
    elif hasattr(value, "bit_generator"):
        value.bit_generator.state = state
    elif hasattr(value, "set_state"):
        value.set_state(state)
    else:
        value.setstate(state)


def module_generators(module: nn.Module) -> list[Any]:
    """The random generators (with a state) kept as attributes on ``module`` and its
    submodules — not inside containers."""
    found = []
    for m in module.modules():
        for v in m.__dict__.values():
            if isinstance(v, _rng_types()) and _rng_state(v) is not None:
                found.append(v)
    return found


def generator_states(generators: list[Any]) -> list[Any]:
    return [_rng_state(g) for g in generators]


def restore_generators(generators: list[Any], states: list[Any]) -> None:
    for g, state in zip(generators, states):
        _set_rng_state(g, state)


def seed_generators(generators: list[Any], seed: int) -> None:
    """Each of ``generators`` seeded from ``seed`` and its place in the list."""
    for i, g in enumerate(generators):
        k = (seed + 7919 * (i + 1)) % (2**32)
        if isinstance(g, torch.Generator):
            g.manual_seed(k)
        elif hasattr(g, "bit_generator"):
            g.bit_generator.state = type(g.bit_generator)(k).state
        else:
            g.seed(k)


def same_states(a: list[Any], b: list[Any]) -> bool:
    """Whether two lists of generator states are equal."""
    import numpy as np

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, Tensor):
            return isinstance(y, Tensor) and torch.equal(x, y)
        if isinstance(x, np.ndarray):
            return isinstance(y, np.ndarray) and np.array_equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (tuple, list)):
            return isinstance(y, (tuple, list)) and len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def _report(key: str, message: str) -> None:
    """Warn once per attribute of a model (``key``: the model's id and the attribute's name)."""
    if key in _reported:
        return
    _reported.add(key)
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    rank_zero_warn("genbounds: " + message)


@contextmanager
def kept_user_state(module: nn.Module) -> Iterator[None]:
    """Restore, after the block, the user's plain state on ``module`` and its submodules (the
    module docstring)."""
    from genbounds.callbacks.isolation import _is_metric

    owners = [(m, _base_keys(m), prefix) for prefix, m in module.named_modules() if not _is_metric(m)]
    saved = []
    budget = [MAX_ITEMS_PER_CALL]
    for m, base, prefix in owners:
        for key in _user_keys(m, base):
            saved.append((m, key, _Saved(m.__dict__[key], _DEPTH, budget), f"{prefix}.{key}" if prefix else key))
    kept = {(id(m), key) for m, key, _, _ in saved}
    try:
        yield
    finally:
        for m, base, _ in owners:  # (an attribute the call added goes)
            for key in [k for k in _user_keys(m, base) if (id(m), k) not in kept]:
                del m.__dict__[key]
        for m, key, s, name in saved:
            m.__dict__[key] = s.value
            s.restore(name, f"{id(module)}:{name}")


def _user_keys(module: nn.Module, base: frozenset[str]) -> list[str]:
    """The attributes on ``module`` its user's classes set: not the framework's, not genbounds'."""
    return [k for k in module.__dict__ if k not in base and not k.startswith("_genbounds")]
