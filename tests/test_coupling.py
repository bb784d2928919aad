"""``estimators/coupling.py``: whether per-sample losses read each other's entries of the first
layer's output — true for in-batch negatives, false for independent samples in any layout, and
for what a step does to its inputs before the model (mixup)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genbounds.estimators.coupling import losses_couple

torch.manual_seed(0)
MLP = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_independent_samples_do_not_couple():
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    assert not losses_couple(lambda: F.cross_entropy(MLP(x), y, reduction="none"), 6)


def test_mixup_before_the_model_does_not_couple():
    """Each mixed row is one row of the model: the hooks' rows are per-sample gradients."""
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    mixed = 0.7 * x + 0.3 * x.flip(0)
    assert not losses_couple(lambda: F.cross_entropy(MLP(mixed), y, reduction="none"), 6)


def test_a_sequence_first_transformer_does_not_couple():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # [T, B, d]
    proj = nn.Linear(4, 8)
    x, y = torch.randn(7, 6, 4), torch.randint(0, 8, (6,))
    assert not losses_couple(lambda: F.cross_entropy(layer(proj(x)).mean(0), y, reduction="none"), 6)


def test_in_batch_negatives_couple_on_two_views_and_on_tokens():
    x = torch.randn(6, 5)

    def nt_xent():
        z = F.normalize(MLP(torch.cat([x, x.flip(1)])), dim=1)
        sim = (z @ z.t()).masked_fill(torch.eye(12, dtype=torch.bool), -1e9)
        rows = F.cross_entropy(sim, torch.cat([torch.arange(6, 12), torch.arange(0, 6)]), reduction="none")
        return (rows[:6] + rows[6:]) / 2

    assert losses_couple(nt_xent, 6)
    emb, tokens = nn.Embedding(20, 4), torch.randint(0, 20, (6,))

    def in_batch():
        e = emb(tokens)
        return F.cross_entropy(e @ e.t(), torch.arange(6), reduction="none")

    assert losses_couple(in_batch, 6)


def test_cannot_tell_means_false():
    x, y = torch.randn(1, 5), torch.randint(0, 3, (1,))
    assert not losses_couple(lambda: F.cross_entropy(MLP(x), y, reduction="none"), 1)
    with torch.no_grad():
        assert not losses_couple(lambda: F.cross_entropy(MLP(torch.randn(4, 5)), y.repeat(4), reduction="none"), 4)
