"""``estimators/coupling.py``: whether per-sample losses read each other's entries of a
parameterized layer's batched output — true for in-batch negatives (one tower or two), false for
independent samples in any layout, for a table shared by the batch (even of the batch's length),
and for what a step does to its inputs before the model (mixup)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genbounds.estimators.coupling import losses_couple

torch.manual_seed(0)
MLP = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
X, Y = torch.randn(6, 5), torch.randint(0, 3, (6,))


def ce(batch):
    x, y = batch
    return F.cross_entropy(MLP(x), y, reduction="none")


def test_independent_samples_do_not_couple():
    assert not losses_couple(ce, (X, Y), 6)


def test_mixup_before_the_model_does_not_couple():
    """Each mixed row is one row of the model: the hooks' rows are per-sample gradients."""
    def mixed(batch):
        x, y = batch
        return F.cross_entropy(MLP(0.7 * x + 0.3 * x.flip(0)), y, reduction="none")

    assert not losses_couple(mixed, (X, Y), 6)


def test_a_sequence_first_transformer_does_not_couple():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # [T, B, d]
    proj = nn.Linear(4, 8)

    def tagger(batch):
        x, y = batch  # x: [B, T, 4], fed as [T, B, 4]
        return F.cross_entropy(layer(proj(x.transpose(0, 1))).mean(0), y, reduction="none")

    assert not losses_couple(tagger, (torch.randn(6, 7, 4), torch.randint(0, 8, (6,))), 6)


def test_in_batch_negatives_couple_on_two_views_and_on_tokens():
    def nt_xent(batch):
        (x,) = batch
        b = len(x)
        z = F.normalize(MLP(torch.cat([x, x.flip(1)])), dim=1)
        sim = (z @ z.t()).masked_fill(torch.eye(2 * b, dtype=torch.bool), -1e9)
        rows = F.cross_entropy(sim, torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]), reduction="none")
        return (rows[:b] + rows[b:]) / 2

    assert losses_couple(nt_xent, (X,), 6)
    emb = nn.Embedding(20, 4)

    def in_batch(batch):
        (tokens,) = batch
        e = emb(tokens)
        return F.cross_entropy(e @ e.t(), torch.arange(len(tokens)), reduction="none")

    assert losses_couple(in_batch, (torch.randint(0, 20, (6,)),), 6)


def test_two_towers_couple_in_the_second_one():
    """Dense retrieval: queries and passages through two towers, each query contrasted with every
    passage — the first tower's rows are per-sample, the passage tower's are read by every loss."""
    q_tower, p_tower = nn.Linear(5, 4), nn.Linear(5, 4)

    def retrieval(batch):
        q, p = batch
        return F.cross_entropy(q_tower(q) @ p_tower(p).t(), torch.arange(len(q)), reduction="none")

    assert losses_couple(retrieval, (torch.randn(6, 5), torch.randn(6, 5)), 6)


def test_a_table_shared_by_the_batch_is_left_out_even_of_the_batchs_length():
    """A positional table of ``arange(T)`` added to every sample is read by every loss; with
    ``T = b`` its shape alone does not tell it from a batched layer, running on one sample does."""
    pos, head = nn.Embedding(6, 4), nn.Linear(4, 3)

    def model(batch):
        x, y = batch  # [B, T = 6, 4]
        return F.cross_entropy(head((x + pos(torch.arange(6))).mean(1)), y, reduction="none")

    assert not losses_couple(model, (torch.randn(6, 6, 4), Y), 6)


def test_cannot_tell_means_false():
    assert not losses_couple(ce, (X[:1], Y[:1]), 1)
    with torch.no_grad():
        assert not losses_couple(ce, (X, Y), 6)


def test_mixup_between_hidden_states_couples_through_any_row():
    """Manifold mixup, ``h·λ + h[perm]·(1−λ)`` after the first layer: the first sample's loss reads
    row ``perm[0]`` of that layer's output, which the others read too. Comparing the first two
    losses alone saw it only where ``perm`` paired those two (here it does not: missed, a matrix,
    round 30); the first against all the others sees it."""
    perm = torch.tensor([2, 3, 4, 5, 0, 1])  # (0 ↔ 1 not paired)
    first, head = nn.Linear(5, 8), nn.Linear(8, 3)

    def manifold(batch):
        x, y = batch
        h = torch.tanh(first(x))
        return F.cross_entropy(head(0.7 * h + 0.3 * h[perm[: len(h)] % len(h)]), y, reduction="none")

    assert losses_couple(manifold, (X, Y), 6)


def test_a_loss_that_needs_gradient_on_one_sample_is_still_checked():
    """The one-sample forward ran under ``no_grad``: a loss that takes a backward through its own
    arithmetic there (genbounds' weights read from the step's returned loss, a mixup λ) recorded no
    layer, and the check said "cannot tell" for every such loss."""

    def needs_grad(batch):
        x, y = batch
        h = torch.tanh(MLP[0](x))
        z = F.normalize(h, dim=1)
        losses = F.cross_entropy(z @ z.t(), torch.arange(len(x)), reduction="none")
        torch.autograd.grad(losses.sum(), h, retain_graph=True)  # (raises under no_grad)
        return losses

    assert losses_couple(needs_grad, (X, Y), 6)
