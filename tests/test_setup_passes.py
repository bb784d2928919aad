"""The dispersion's set-up passes before step 0 hold one pass's graph at a time: the loss
contract's trial lets its whole-batch graph go before the coupling check runs (held through it,
the heap grew to two passes' size and the check's lasting allocations were placed above both —
the AlexNet-style CNN's peak growth +42 MiB over plain training, round 33)."""

from __future__ import annotations

import weakref

import torch
from helpers import CrossEntropyModule, TensorData, trainer
from torch import nn

import genbounds.callbacks.loss_contract as loss_contract
from genbounds.callbacks import GradientDispersion


RETURNED: list[weakref.ref] = []
"""A weak reference to each loss ``KeepsTrack.training_step`` returns (not on the module: the
isolation of extra passes restores the module's own attributes)."""


class KeepsTrack(CrossEntropyModule):
    """Lightning's docs' classifier that keeps a weak reference to each loss it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        RETURNED.append(weakref.ref(loss))
        return loss


def test_the_trial_lets_its_graph_go_before_the_coupling_check(tmp_path, monkeypatch):
    torch.manual_seed(0)
    RETURNED.clear()
    module = KeepsTrack()
    alive_at_check: list[bool] = []
    inner = loss_contract.losses_couple

    def checked(*args, **kwargs):
        if not alive_at_check:  # (the first check: the trial's training_step was the first call)
            alive_at_check.append(RETURNED[0]() is not None)
        return inner(*args, **kwargs)

    monkeypatch.setattr(loss_contract, "losses_couple", checked)
    data = TensorData(torch.randn(32, 12), torch.randint(0, 3, (32,)), batch_size=16)
    trainer(tmp_path, [GradientDispersion()], max_steps=1).fit(module, data)
    assert alive_at_check == [False]  # (the check ran, with the trial's loss and graph gone)
