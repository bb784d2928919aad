"""Lightning's batch preparation, for every batch genbounds draws itself (the probe sets, the loss
contract's trial, the gap's evaluation): the precision plugin's input conversion, then
``on_before_batch_transfer``, ``transfer_batch_to_device`` and ``on_after_batch_transfer`` — as
Lightning prepares a batch for a step (round 34: the first two were skipped, so a module turning a
dict batch into ``(x, y)`` in ``on_before_batch_transfer`` crashed before step 0, and ``64-true``
met float32 inputs)."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from helpers import CrossEntropyModule, bound_suite, trainer


class DictDigits(Dataset):
    """The bundled digits as ``{"image", "label"}`` items (a dataset of dicts, as many are)."""

    def __init__(self, part: slice, split: int) -> None:
        from sklearn.datasets import load_digits

        self.split = split
        x, y = load_digits(return_X_y=True)
        self.x = torch.tensor(x / 16.0, dtype=torch.float32)[part]
        self.y = torch.tensor(y)[part]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "split": self.split}


class HookedModule(CrossEntropyModule):
    """Turns the dict batch into ``(x, y)`` before the transfer and adds noise from the global RNGs
    (torch's and NumPy's) after it while training (augmentation on the device, as Lightning's docs
    show it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        self.seen: list[tuple[str, bool]] = []  # (the trainer's stage, module.training) at each after-transfer call
        self.dtypes: set[torch.dtype] = set()
        self.stages: set[tuple[int, str]] = set()  # (0 training set, 1 held-out; the trainer's stage)

    def forward(self, x):
        return self.net(x)

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.stages.add((int(batch["split"][0]), self.trainer.state.stage.value))
        return batch["image"], batch["label"]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        self.seen.append((self.trainer.state.stage.value, self.training))
        self.dtypes.add(x.dtype)
        if self.trainer.training:
            x = x + 0.05 * torch.randn_like(x) + torch.from_numpy(np.random.normal(0, 0.01, x.shape)).to(x)
        return x, y


def _fit(tmp_path, callbacks, precision):
    pl.seed_everything(0, verbose=False)
    module = HookedModule()
    t = trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=6, limit_val_batches=2, precision=precision)
    t.fit(module, DataLoader(DictDigits(slice(0, 1000), 0), batch_size=32, shuffle=True),
          DataLoader(DictDigits(slice(1000, None), 1), batch_size=64))
    return module, t


@pytest.mark.parametrize("precision", ["32-true", "64-true"])
def test_probe_batches_are_prepared_as_lightning_prepares_a_steps_batch(tmp_path, precision):
    plain, _ = _fit(tmp_path / "plain", [], precision)
    suite = bound_suite()  # (dispersion, held-out gradient, Γ, flatness, Hessian trace and the bounds with the gap)
    measured, t = _fit(tmp_path / "suite", suite, precision)
    # zero observer effect: the hooks' noise for our batches was drawn from copies of the RNGs
    for p, q in zip(plain.parameters(), measured.parameters()):
        assert torch.equal(p, q)
    assert torch.isfinite(torch.as_tensor(t.callback_metrics["grad/dispersion"]))
    assert suite[1].num_probes_run >= 2 and suite[2].num_probes_run >= 1
    assert torch.isfinite(torch.as_tensor(t.callback_metrics["bound/wang_mao_eq3"]))
    # ours too (the probe sets, the trial, the gap's chunks); the held-out ones as validation
    # prepares a batch (the stage validating, eval mode: no training-time noise added to them)
    for case in (("train", True), ("validate", False)):
        assert measured.seen.count(case) > plain.seen.count(case), case
    # (and no other stage or mode, but the gap's pass over the training set in eval mode)
    assert set(measured.seen) <= set(plain.seen) | {("train", False)}
    # the training set's batches in the training stage, the held-out set's in validation's, also
    # when the gap is evaluated at a validation's end (a review, round 34)
    assert measured.stages == {(0, "train"), (1, "validate")}
    assert measured.dtypes == {torch.float64 if precision == "64-true" else torch.float32}
