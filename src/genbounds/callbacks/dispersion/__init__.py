"""Backends of :class:`~genbounds.callbacks.GradientDispersion`, one per file behind
:class:`~genbounds.callbacks.dispersion.base.DispersionBackend`:

* ``hooks`` (:mod:`.norm_hooks`) — per-sample squared norms from the training step's own backward
  (ghost norms / Goodfellow factorization; BackPACK for RNN and LSTM layers): no extra pass;
* ``functorch`` (:mod:`.per_sample`) — exact per-sample gradients by an extra pass, memory-bounded;
* ``microbatch`` (:mod:`.microbatch`) — random chunks by an extra pass (any model);
* ``accumulation`` (:mod:`.accumulation`) — the gradient-accumulation micro-steps as chunks, free.

:func:`.select.choose_backend` picks one for ``backend="auto"``; :class:`.slot.BackendSlot` holds
the one a callback measures with over a fit (chosen, checked, replaced when it fails, resumed).
"""
