"""Per-sample 0-1 error of a classifier, scored from the inputs of its captured loss call.

For ``cross_entropy``/``nll_loss`` the prediction is the arg-max over the class axis (axis 1 of
``[N, C, …]`` inputs) against class-index targets (``ignore_index`` positions excluded) or the
arg-max of probability targets; for ``binary_cross_entropy_with_logits`` the sign of the logit,
for ``binary_cross_entropy`` the probability against ½, each against ``target > ½``. A sample
with several scored elements (tokens, pixels, labels) gets the fraction of its elements that are
wrong — still in ``[0, 1]``, so the 0-1 loss's ``R = ½`` holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from genbounds.estimators.loss_capture import CapturedLoss


def per_sample_error(record: CapturedLoss, batch_size: int) -> Tensor:
    a = record.arguments
    x: Tensor = a["input"].detach()
    t: Tensor = a["target"].detach()
    valid = torch.ones(record.elements.shape, dtype=torch.bool, device=x.device)
    if record.name in ("cross_entropy", "nll_loss"):
        if t.is_floating_point() and t.shape == x.shape:  # probability targets
            wrong = x.argmax(1) != t.argmax(1)
        else:
            wrong = x.argmax(1) != t
            ignore = a.get("ignore_index", -100)
            valid = t != ignore
    elif record.name == "binary_cross_entropy_with_logits":
        wrong = (x > 0) != (t > 0.5)
    elif record.name == "binary_cross_entropy":
        wrong = (x > 0.5) != (t > 0.5)
    else:
        raise ValueError(f"{record.name} is not a classification loss")
    wrong = (wrong & valid).to(torch.float64).reshape(record.elements.shape)
    counts = record.map_to_samples(valid.to(torch.float64).reshape(record.elements.shape), batch_size)
    errors = record.map_to_samples(wrong, batch_size)
    return torch.where(counts > 0, errors / counts.clamp(min=1.0), torch.zeros_like(errors))
