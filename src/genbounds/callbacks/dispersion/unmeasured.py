"""What ``GradientDispersion`` says, once a fit each, about a measured step it leaves unmeasured
for want of anything to measure: a step that ran no backward, a batch of one sample. The step's
value is then absent (the bounds count the step as Lightning does: the measured step before it
stands for it)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor


class UnmeasuredNotes:
    """The two notes, each said once (a new object per callback: its fits share it)."""

    def __init__(self) -> None:
        self.no_backward_said = False
        self.one_sample_said = False

    def no_backward(self, params: list[Tensor], step: int) -> bool:
        """Whether this measured step ran no backward — no trained parameter has a gradient: its
        ``training_step`` returned ``None``, which Lightning counts as a step all the same (it says
        so itself) — said once: the step is left unmeasured."""
        if any(p.grad is not None for p in params):
            return False
        if not self.no_backward_said:
            self.no_backward_said = True
            rank_zero_info(f"GradientDispersion: step {step} ran no backward (training_step returned None?): "
                           "it is left unmeasured, and in the bounds, which count it as Lightning does, the measured "
                           "step before it stands for it.")
        return True

    def one_sample(self, window: Any, step: int) -> None:
        """Said once: a measured step whose batch held one sample (no spread) is not measured
        (``window``: the step's window, or its batch size)."""
        units = window if isinstance(window, int) else getattr(window, "batch", getattr(window, "num_units", None))
        if isinstance(units, int) and units < 2 and not self.one_sample_said:
            self.one_sample_said = True
            rank_zero_info(f"GradientDispersion: step {step}'s batch holds one sample (a last batch of size 1? "
                           "DataLoader(drop_last=True) avoids it): it has no spread to measure, so the step is left "
                           "unmeasured (in the bounds, the measured step before it stands for it).")
