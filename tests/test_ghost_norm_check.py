"""The hooks' one-time exactness check (``genbounds.estimators.ghost_norm_check``): on one sample a
layer whose output the whole batch shares keeps its own leading size and is reported, whatever
the batch size in training; exact models pass; a wrong value is caught."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genbounds.estimators.ghost_norm_check import HookProblem, hook_norm_errors, batch_layout_problem
from genbounds.estimators.ghost_norms import plan


class SharedPositions(nn.Module):
    """GPT-style: token embedding ``[b, T, d]`` plus a learned positional embedding of
    ``arange(T)`` (``[T, d]``, broadcast over the batch), a causal encoder layer, a head."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 8)
        self.pos = nn.Embedding(16, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True)
        self.head = nn.Linear(8, 11)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        h = self.tok(idx) + self.pos(torch.arange(T))
        return self.head(self.block(h, src_mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True))


def token_losses(module: nn.Module, batch) -> Tensor:
    x, y = batch
    logits = module(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(x.shape[0], -1).mean(1)


def batch_of(b: int, T: int):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (b, T), generator=g), torch.randint(0, 11, (b, T), generator=g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("b,T", [(6, 6), (6, 5)])
def test_shared_positions_are_reported_whatever_the_batch_size(b, T):
    """``T = B`` passes every shape check in training; on one sample the positions' leading size
    (``T``) is not 1."""
    model = SharedPositions()
    with pytest.raises(HookProblem, match="pos"):
        hook_norm_errors(model, plan(model)[0], token_losses, batch_of(b, T))


def test_a_wrong_value_is_caught():
    """A user module hook that rescales an output leaves the values exact (our global hook runs
    first); norms off by 1 % are caught."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].register_forward_hook(lambda m, a, out: out * 3)  # ours (global) runs first: exact
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))

    def losses(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1], reduction="none")

    assert hook_norm_errors(model, plan(model)[0], losses, (x, y)) == {}
    import genbounds.estimators.ghost_norm_check as check

    real = check.GhostNormHooks

    class Off(real):  # per-sample norms off by 1 %: the check must say so
        def read(self, scale=1.0):
            norms = super().read(scale)
            norms.per_group["2"] = norms.per_group["2"] * 1.01
            return norms

    check.GhostNormHooks = Off
    try:
        errors = hook_norm_errors(model, plan(model)[0], losses, (x, y))
    finally:
        check.GhostNormHooks = real
    assert set(errors) == {"2"} and errors["2"] == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_an_exact_model_passes(dropout):
    """Without the shared layer (and with dropout: the reference uses the same graph's masks)."""

    class PerSample(SharedPositions):
        def forward(self, idx: Tensor) -> Tensor:
            T = idx.shape[1]
            h = self.tok(idx) + self.pos(torch.arange(T).expand_as(idx))  # positions per sample
            return self.head(self.block(h))

    model = PerSample(dropout)
    assert hook_norm_errors(model, plan(model)[0], token_losses, batch_of(6, 6)) == {}


def test_train_mode_batchnorm_is_checked_on_running_statistics():
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()

    def losses(module, batch):
        x, y = batch
        return F.cross_entropy(module(x), y, reduction="none")

    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    assert hook_norm_errors(model, plan(model)[0], losses, (x, y)) == {}


class SequenceFirstTagger(nn.Module):
    """PyTorch's tutorial layout: tokens ``[T, b]``, embedding and head outside the (sequence-first)
    encoder — layers whose batch dimension the hooks find by the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 11)

    def forward(self, idx: Tensor) -> Tensor:  # idx [b, T] → logits [b, T, V]
        return self.head(self.block(self.tok(idx.t()))).transpose(0, 1)


@pytest.mark.parametrize("b,T", [(6, 6), (6, 5)])
def test_a_sequence_length_equal_to_the_batch_size_is_seen_before_step_0(b, T):
    """On one sample a sequence-first layout is clear (the exactness check passes); one forward of
    the whole batch shows ``T = B``, where a layer outside the encoder cannot tell positions from
    samples. At ``T ≠ B``, and in a batch-first model, nothing is reported."""
    model = SequenceFirstTagger()
    covered = plan(model)[0]
    batch = batch_of(b, T)
    assert hook_norm_errors(model, covered, token_losses, batch) == {}
    said = batch_layout_problem(model, covered, token_losses, batch)
    if T == b:
        assert said is not None and "sequence length equals the batch size (6)" in said and "tok" in said, said
    else:
        assert said is None
    batch_first = SharedPositions()
    assert batch_layout_problem(batch_first, plan(batch_first)[0], token_losses, batch_of(6, 6)) is None


@pytest.mark.parametrize("final_state", [False, True])
def test_backpacks_layers_are_checked_in_the_same_backward(final_state):
    """An LSTM (BackPACK's ``BatchL2Grad``) beside a hooked Linear: exact when the LSTM's output is
    read; reported when only its final state is (BackPACK then has no values for it, although its
    weights get gradient — the hooks' first measured step found it, and was lost)."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 5, batch_first=True)
            self.fc = nn.Linear(5, 4)

        def forward(self, x: Tensor) -> Tensor:
            out, (h, _) = self.rnn(x)
            return self.fc(h[-1] if final_state else out[:, -1])

    torch.manual_seed(0)
    model = Recurrent()
    batch = (torch.randn(6, 7, 3), torch.randint(0, 4, (6,)))

    def losses(module, b):
        return F.cross_entropy(module(b[0]), b[1], reduction="none")

    if final_state:
        with pytest.raises(HookProblem, match="no per-sample norms for rnn"):
            hook_norm_errors(model, {"fc": model.fc}, losses, batch, {"rnn": model.rnn})
    else:
        assert hook_norm_errors(model, {"fc": model.fc}, losses, batch, {"rnn": model.rnn}) == {}
    assert not any(hasattr(p, "batch_l2") for p in model.parameters())  # (BackPACK's fields left behind: none)


def test_a_wrong_backpack_value_is_caught(monkeypatch):
    from genbounds.estimators import backpack_norms

    real = backpack_norms.BackpackNormHooks.read_modules
    monkeypatch.setattr(backpack_norms.BackpackNormHooks, "read_modules",
                        lambda self, scale: {m: 2 * v for m, v in real(self, scale).items()})
    torch.manual_seed(0)
    rnn, fc = nn.LSTM(3, 5, batch_first=True), nn.Linear(5, 4)
    model = nn.ModuleDict({"rnn": rnn, "fc": fc})

    def losses(module, b):
        return F.cross_entropy(module["fc"](module["rnn"](b[0])[0][:, -1]), b[1], reduction="none")

    errors = hook_norm_errors(model, {"fc": fc}, losses, (torch.randn(6, 7, 3), torch.randint(0, 4, (6,))),
                              {"rnn": rnn})
    assert set(errors) == {"rnn"} and errors["rnn"] == pytest.approx(1.0)


def test_a_layer_applied_to_part_of_the_batch_is_seen_before_step_0():
    """A top-1 mixture of experts (each expert a Linear on the rows routed to it): on one sample
    every expert sees the sample or nothing, so the exactness check passes, and the hooks failed
    at step 0's read (the step lost). One forward of the whole first batch shows it."""

    from helpers import MixtureOfExperts

    torch.manual_seed(0)
    model = MixtureOfExperts(6, 8, 4)
    batch = (torch.randn(12, 6), torch.randint(0, 4, (12,)))

    def losses(module, b):
        return F.cross_entropy(module(b[0]), b[1], reduction="none")

    covered = plan(model)[0]
    assert hook_norm_errors(model, covered, losses, batch) == {}
    said = batch_layout_problem(model, covered, losses, batch)
    assert said is not None and "rows of a batch of 12" in said and "experts." in said, said
    plain = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    assert batch_layout_problem(plain, plan(plain)[0], losses, batch) is None
