"""Ghost norms of ``nn.MultiheadAttention`` (``genbounds.estimators.ghost_attention``) against
exact per-sample gradients (``vmap(grad)``, float64), and what is refused."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from genbounds.estimators.ghost_norms import GHOST, MATERIALIZE, GhostNormHooks, plan, predict_methods
from test_ghost_norms import DT, check, measure, per_sample_losses, reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SelfAttention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, *, batch_first: bool = True, need_weights: bool = False,
                 bias: bool = True, calls: int = 1, use_weights: bool = False) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(d, heads, batch_first=batch_first, bias=bias)
        self.head = nn.Linear(d, 3)
        self.batch_first, self.need_weights, self.calls, self.use_weights = batch_first, need_weights, calls, use_weights

    def forward(self, x: Tensor) -> Tensor:  # x: [b, T, d]
        h = x if self.batch_first else x.transpose(0, 1)
        extra = 0.0
        for _ in range(self.calls):  # calls > 1: the same weights twice (weight sharing)
            h, w = self.att(h, h, h, need_weights=self.need_weights)
            h = torch.tanh(h)
            if self.use_weights:  # a second path from the in-projection to the loss
                extra = extra + w.sum((1, 2)).unsqueeze(-1)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h).mean(1) + extra


CASES = {
    "batch_first": {},
    "sequence_first": {"batch_first": False},
    "need_weights": {"need_weights": True, "use_weights": True},
    "no_bias": {"bias": False},
    "shared_twice": {"calls": 2},
}


@pytest.mark.parametrize("method", [None, GHOST, MATERIALIZE])
@pytest.mark.parametrize("case", list(CASES))
def test_self_attention_matches_per_sample_gradients(case, method):
    model = SelfAttention(**CASES[case])
    norms = check(model, torch.randn(4, 5, 8), method=method)
    assert set(norms.per_group) >= {"att", "att.out_proj", "head"}
    if method is not None:
        assert norms.methods["att"] == norms.methods["att.out_proj"] == method
    assert norms.exact


def test_transformer_encoder_layers_with_causal_mask():
    """nn.TransformerEncoder (two layers, pre- and post-norm) as users build it: every parameter
    covered, no extra pass, exact per layer (dropout 0 so the reference sees the same function)."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(13, 8)
            post = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
            pre = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=True)
            self.layers = nn.ModuleList([post, pre])
            self.head = nn.Linear(8, 3)

        def forward(self, idx: Tensor) -> Tensor:
            h = self.emb(idx)
            mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], dtype=h.dtype)
            for layer in self.layers:
                h = layer(h, src_mask=mask, is_causal=True)
            return self.head(h.mean(1))

    model = Encoder()
    covered, uncovered = plan(model)
    assert not uncovered, uncovered
    assert {"layers.0.self_attn", "layers.0.self_attn.out_proj"} <= set(covered)
    check(model, torch.randint(0, 13, (3, 6)))


def test_dropout_in_attention_gives_the_sampled_functions_norms():
    """With attention dropout the per-sample gradient is that of the dropped-out function; the hooks
    see the training backward's own masks. Checked through the batch gradient: the per-sample
    gradients' squared norms sum to at least ‖Σ_i g_i‖² / b (Cauchy–Schwarz) and the hook values
    are deterministic given the RNG state."""
    model = SelfAttention().to(DT)
    model.att.dropout = 0.5
    x = torch.randn(4, 5, 8, dtype=DT)
    t = torch.randn(4, 3, dtype=DT)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(measure(model, x, t).total)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.manual_seed(1)
    model.zero_grad()
    per_sample_losses(model(x), t).mean().backward()
    batch_sq = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()) * 4 ** 2
    assert float(runs[0].sum()) * 4 >= batch_sq * (1 - 1e-9)


def test_frozen_in_projection_trainable_out_projection():
    model = SelfAttention()
    model.att.in_proj_weight.requires_grad_(False)
    model.att.in_proj_bias.requires_grad_(False)
    covered, uncovered = plan(model)
    assert not uncovered and "att" in covered and "att.out_proj" in covered
    norms = check(model, torch.randn(3, 4, 8))
    assert "att" not in norms.methods and "att.out_proj" in norms.methods


def test_predict_methods_covers_the_out_projection():
    model = SelfAttention(d=8)
    covered = plan(model)[0]
    x = torch.randn(2, 30, 8)  # T = 30: 2T² ≥ d_in·d_out → materialize for both projections
    predicted = predict_methods(covered, lambda: model(x))
    assert predicted == measure(model, x, torch.randn(2, 3), modules=covered).methods
    assert predicted["att"] == predicted["att.out_proj"] == MATERIALIZE
    x = torch.randn(2, 3, 8)
    assert predict_methods(covered, lambda: model(x))["att"] == GHOST


@pytest.mark.parametrize("kw,match", [
    ({"add_bias_kv": True}, "add_bias_kv"),
    ({"kdim": 4, "vdim": 4}, "kdim"),
])
def test_plan_refuses_what_the_graph_rule_does_not_cover(kw, match):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, **kw)

    covered, uncovered = plan(Model())
    assert not covered
    assert any(match in why for why in uncovered.values()), uncovered
    assert match in uncovered["att.out_proj.weight"]


def test_cross_attention_is_reported_not_mismeasured():
    """Query ≠ key: the in-projection uses slices of the packed weight, which the rule does not
    match; the read raises (the dispersion callback then switches to an extra-pass backend)."""
    att = nn.MultiheadAttention(8, 2, batch_first=True)
    hooks = GhostNormHooks(plan(att)[0])
    hooks.arm()
    q, kv = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    out, _ = att(q, kv, kv, need_weights=False)
    out.sum().backward()
    with pytest.raises(RuntimeError, match="in_proj not found"):
        hooks.read(3)


def test_out_projection_alone_is_not_silently_measured():
    """The out-projection's forward never runs: hooked without its attention, its parameters
    receive gradient with no recorded call, which the read reports."""
    att = nn.MultiheadAttention(8, 2, batch_first=True)
    hooks = GhostNormHooks({"att.out_proj": att.out_proj})
    hooks.arm()
    x = torch.randn(3, 4, 8)
    att(x, x, x, need_weights=False)[0].sum().backward()
    with pytest.raises(RuntimeError, match="outside the module's forward"):
        hooks.read(3)


def test_reference_groups_match_the_sites():
    """The reference reduces per owning module: the in-projection belongs to the attention module,
    the out-projection to ``out_proj`` — the same split as the hooks' sites (and as
    GradientDispersion's default per-layer groups)."""
    model = SelfAttention().to(DT)
    x = torch.randn(2, 3, 8, dtype=DT)
    assert set(reference(model, x, torch.randn(2, 3, dtype=DT))) == {"att", "att.out_proj", "head"}
