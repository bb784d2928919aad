"""A registry of the hooks that record the training step's own forward/backward (per-sample
norm hooks), so that an extra pass run while they are armed can suspend all of them at once —
a probe's forward must never be recorded as the training step's.

Each registered object provides ``suspended()``, a context manager that stops recording for its
duration and resumes afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

_ACTIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register(hooks: Any) -> None:
    _ACTIVE.add(hooks)


def unregister(hooks: Any) -> None:
    _ACTIVE.discard(hooks)


@contextmanager
def all_suspended() -> Iterator[None]:
    """Suspend every registered recorder for the duration of the block."""
    with ExitStack() as stack:
        for hooks in list(_ACTIVE):
            stack.enter_context(hooks.suspended())
        yield
