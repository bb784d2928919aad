"""The hooks' one-time exactness check (``genbounds.estimators.ghost_norm_check``): a layer whose
output the whole batch shares is caught by its values when no shape can tell, and exact models
pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genbounds.estimators.ghost_norm_check import HookProblem, hook_norm_errors
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


def test_shared_positions_with_length_equal_to_batch_are_caught_by_value():
    model = SharedPositions()
    errors = hook_norm_errors(model, plan(model)[0], token_losses, batch_of(6, 6))
    assert set(errors) == {"pos"} and errors["pos"] > 0.05, errors  # every other layer is exact


def test_shared_positions_with_another_length_are_reported_by_shape():
    model = SharedPositions()
    with pytest.raises(HookProblem, match="pos"):
        hook_norm_errors(model, plan(model)[0], token_losses, batch_of(6, 5))


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
