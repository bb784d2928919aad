"""Ghost norms of ``nn.MultiheadAttention`` (``genbounds.estimators.ghost_attention``) against
exact per-sample gradients (``vmap(grad)``, float64), and what is refused."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from genbounds.estimators.ghost_norms import (
    GHOST,
    GOODFELLOW,
    MATERIALIZE,
    GhostNormHooks,
    declared_batch_dims,
    plan,
    predict_methods,
)
from test_ghost_norms import DT, check, measure, per_sample_losses, reference


# the vmap(grad) reference runs attention without a batching rule (slow, and torch says so)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


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
    """With attention dropout the per-sample gradient is that of the dropped-out function, whose
    masks the training backward has: the reference is ``autograd.grad(ℓ_i)`` on the same graph."""
    model = SelfAttention().to(DT)
    model.att.dropout = 0.5
    x, t = torch.randn(4, 5, 8, dtype=DT), torch.randn(4, 3, dtype=DT)
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    losses = per_sample_losses(model(x), t)
    losses.mean().backward(retain_graph=True)
    norms = hooks.read(scale=4)
    hooks.disarm()
    named = [(n, p) for n, p in model.named_parameters()]
    for i in range(4):  # (the hooks' late calls on the retained graph are ignored: read() cleared them)
        grads = torch.autograd.grad(losses[i], [p for _, p in named], retain_graph=True)
        per_module: dict[str, float] = {}
        for (n, _), g in zip(named, grads):
            per_module[n.rsplit(".", 1)[0]] = per_module.get(n.rsplit(".", 1)[0], 0.0) + float((g ** 2).sum())
        for name, value in per_module.items():
            assert float(norms.per_group[name][i]) == pytest.approx(value, rel=1e-9), (i, name)


def test_out_projection_also_called_directly():
    """``out_proj`` is bypassed by the attention's forward but may be called by the user too: both
    calls are the same weight's (concatenated along positions, as weight sharing)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.att(x, x, x, need_weights=False)[0]
            return self.att.out_proj(torch.tanh(h)).mean(1)

    check(Model(), torch.randn(3, 4, 8))


@pytest.mark.parametrize("context", ["save_on_cpu", "checkpoint"])
def test_saved_tensor_hooks_are_reported_and_leave_training_unchanged(context):
    """Reading a saved input under saved-tensor hooks would run their unpack inside the forward
    (recompute, copy): the call is reported instead, and the loss and gradients are the plain ones."""
    from torch.utils.checkpoint import checkpoint

    model = SelfAttention()
    model.att.dropout = 0.3
    x, t = torch.randn(3, 4, 8), torch.randn(3, 3)

    def run(hooks):
        model.zero_grad(set_to_none=True)
        if hooks is not None:
            hooks.arm()
        torch.manual_seed(5)
        if context == "checkpoint":
            out = checkpoint(model, x, use_reentrant=False, preserve_rng_state=False)
        else:
            with torch.autograd.graph.save_on_cpu():
                out = model(x)
        loss = per_sample_losses(out, t).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain = run(None)
    hooks = GhostNormHooks(plan(model)[0])
    hooked = run(hooks)
    with pytest.raises(RuntimeError, match="saved-tensor hooks"):
        hooks.read(3)
    assert torch.equal(plain[0], hooked[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], hooked[1]))


def test_frozen_in_projection_trainable_out_projection():
    model = SelfAttention()
    model.att.in_proj_weight.requires_grad_(False)
    model.att.in_proj_bias.requires_grad_(False)
    covered, uncovered = plan(model)
    assert not uncovered and "att" in covered and "att.out_proj" in covered
    norms = check(model, torch.randn(3, 4, 8))
    assert "att" not in norms.methods and "att.out_proj" in norms.methods


@pytest.mark.parametrize("T,route", [(30, MATERIALIZE), (3, GHOST), (1, GOODFELLOW)])
def test_predict_methods_covers_the_out_projection(T, route):
    """T = 30: 2T² ≥ d_in·d_out → materialize for both projections; T = 1 is reported as Goodfellow."""
    model = SelfAttention(d=8)
    covered = plan(model)[0]
    x = torch.randn(2, T, 8)
    predicted = predict_methods(covered, lambda: model(x))
    assert predicted == measure(model, x, torch.randn(2, 3), modules=covered).methods
    assert predicted["att"] == predicted["att.out_proj"] == route


@pytest.mark.parametrize("kw,match", [
    ({"add_bias_kv": True}, "add_bias_kv"),
    ({"kdim": 4, "vdim": 4}, "kdim"),
    ({"frozen": "in_proj_weight"}, "trainable bias with a frozen weight"),
    ({"frozen": "out_proj.weight"}, "trainable bias with a frozen weight"),
])
def test_plan_refuses_what_the_graph_rule_does_not_cover(kw, match):
    frozen = kw.pop("frozen", None)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, **{"batch_first": True, **kw})

    model = Model()
    if frozen is not None:
        model.att.get_parameter(frozen).requires_grad_(False)
    covered, uncovered = plan(model)
    assert not covered
    assert any(match in why for why in uncovered.values()), uncovered
    assert match in uncovered["att.out_proj.bias"]


def test_plan_covers_encoders_and_decoders_either_layout():
    """Encoder and decoder layers are covered, cross-attention included, batch-first or not; their
    modules' batch dimension is declared (a sequence-first layer's Linear and LayerNorm see
    ``[T, B, E]``), the layers' surroundings are not."""
    for batch_first in (True, False):
        model = nn.ModuleDict({
            "encoder": nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=batch_first), 1,
                                             norm=nn.LayerNorm(8), enable_nested_tensor=False),
            "decoder": nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, batch_first=batch_first),
            "head": nn.Linear(8, 3)})
        covered, uncovered = plan(model)
        assert not uncovered
        assert {"decoder.self_attn", "decoder.self_attn.out_proj", "decoder.multihead_attn",
                "decoder.multihead_attn.out_proj", "encoder.norm"} <= set(covered)
        dims = declared_batch_dims(model)
        assert "head" not in dims
        want = 0 if batch_first else 1
        assert all(dims[name] == want for name in covered if name != "head"), dims
        assert GhostNormHooks(covered, batch_dims=dims).sequence_first is (not batch_first)


class SequenceFirstEncoder(nn.Module):
    """PyTorch's word-language-model layout: tokens ``[b, T]`` turned to ``[T, b]`` before the
    embedding, a sequence-first ``nn.TransformerEncoder`` (post- and pre-norm layers, final norm)
    under a causal mask, a per-position head on ``[T, b, d]``; ``pool``: a head on the mean
    over positions instead."""

    def __init__(self, d: int = 8, pool: bool = False, embed: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(13, d) if embed else nn.Linear(3, d)
        post = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0)
        pre = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0, norm_first=True)
        self.layers = nn.ModuleList([post, pre])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.transpose(0, 1))  # [T, b, d]
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[0], dtype=h.dtype)
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        h = self.norm(h)
        if self.pool:
            return self.head(h.mean(0))
        return self.head(h).transpose(0, 1)  # [b, T, 3]


@pytest.mark.parametrize("method", [None, GHOST, MATERIALIZE])
@pytest.mark.parametrize("pool", [False, True])
def test_sequence_first_encoder_matches_per_sample_gradients(pool, method):
    """Every layer of a sequence-first model sees the batch in dimension 1 — the declared ones
    (inside the encoder layers) and the ones read off the shape (the embedding, the final norm,
    the head): exact against vmap(grad)."""
    model = SequenceFirstEncoder(pool=pool)
    norms = check(model, torch.randint(0, 13, (3, 5)), method=method)
    assert {"embed", "layers.0.self_attn", "layers.1.linear2", "norm", "head"} <= set(norms.per_group)
    assert norms.exact


@pytest.mark.parametrize("T", [2, 20])
def test_predict_methods_sequence_first(T):
    """The routes predicted from the shapes are the ones taken, the batch found as in the hooks
    (T = 2: ghost for the 8×8 and 8×16 weights; T = 20: materialize)."""
    model = SequenceFirstEncoder().to(DT)
    covered = plan(model)[0]
    x = torch.randint(0, 13, (3, T))
    predicted = predict_methods(covered, lambda: model(x), batch_dims=declared_batch_dims(model), batch_size=3)
    taken = measure(model, x, torch.randn(3, T, 3, dtype=DT), modules=covered).methods
    assert predicted == taken
    assert predicted["head"] == (GHOST if T == 2 else MATERIALIZE)


def test_sequence_first_attention_alone_matches_per_sample_gradients():
    check(SelfAttention(batch_first=False), torch.randn(4, 5, 8))
    check(SelfAttention(batch_first=False, calls=2), torch.randn(4, 5, 8))


def test_sequence_first_decoder_with_cross_attention():
    """``nn.Transformer`` sequence-first: encoder, decoder self- and cross-attention, causal mask."""

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.net = nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                                      dropout=0.0)
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            src = self.inp(x).transpose(0, 1)  # [T, b, 8]
            tgt = src[:3]
            mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=src.dtype)
            return self.head(self.net(src, tgt, tgt_mask=mask, tgt_is_causal=True)).transpose(0, 1)

    norms = check(Seq2Seq(), torch.randn(4, 6, 3))
    assert {"net.decoder.layers.0.multihead_attn", "net.encoder.norm", "net.decoder.norm"} <= set(norms.per_group)


def test_sequence_first_with_length_equal_to_batch():
    """``T = B``: the layers inside the encoder have a declared layout and stay exact; a layer
    outside (the embedding on ``[T, B]``) cannot tell its batch dimension from the shape: reported
    at the read, never guessed."""
    model = SequenceFirstEncoder(pool=True).to(DT)
    x = torch.randint(0, 13, (4, 4))
    hooks = GhostNormHooks.for_model(model)
    hooks.arm(batch_size=4)
    model(x).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="dimensions 0 and 1 both have the batch size 4"):
        hooks.read(scale=4)
    hooks.detach()
    # without the layers outside the encoder (features fed as [T, B, d] by the caller), exact
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 2, norm=nn.LayerNorm(8),
                                    enable_nested_tensor=False)

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x: Tensor) -> Tensor:
            return self.encoder(x.transpose(0, 1)).transpose(0, 1)

    check(Inner(), torch.randn(4, 4, 8))


class SharedPositions(nn.Module):
    """Features turned to ``[T, b, d]`` plus a learned positional embedding of ``arange(T)``,
    shared by the whole batch (``[T, 1, d]`` or ``[T, d]`` broadcast), then a sequence-first
    encoder."""

    def __init__(self, column: bool) -> None:
        super().__init__()
        self.pos = nn.Embedding(16, 8)
        self.column = column
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 1,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x.transpose(0, 1)
        ids = torch.arange(h.shape[0])
        p = self.pos(ids[:, None]) if self.column else self.pos(ids)[:, None]
        return self.head(self.encoder(h + p).mean(0))


@pytest.mark.parametrize("column", [True, False])
def test_sequence_first_positions_shared_by_the_batch_are_reported_when_length_equals_batch(column):
    """The positional embedding's input has no batch dimension; with T ≠ B its shape gives it away
    (mismatched batch sizes), with T = B it would pass for a batch-first layer: any guessed layer in
    a step whose sequence length equals the batch size is reported, never measured."""
    for B, T in ((3, 5), (4, 4)):
        model = SharedPositions(column).to(DT)
        hooks = GhostNormHooks.for_model(model)
        hooks.arm(batch_size=B)
        model(torch.randn(B, T, 8, dtype=DT)).pow(2).sum().backward()
        with pytest.raises(RuntimeError, match="a sequence length equals the batch size" if T == B else "batch sizes"):
            hooks.read(scale=B)
        hooks.detach()


def test_sequence_first_without_a_batch_size_is_reported():
    model = SequenceFirstEncoder()
    hooks = GhostNormHooks.for_model(model)
    hooks.arm()  # no batch size: the embedding's layout cannot be told
    model(torch.randint(0, 13, (3, 5))).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="no batch size"):
        hooks.read(scale=3)
    hooks.detach()


class CrossAttention(nn.Module):
    """Queries from the first ``L`` positions, memory from a projection of all ``T`` (``S = T``):
    key and value the same tensor (one product for their rows of the weight) or not (two)."""

    def __init__(self, d: int = 8, *, same_kv: bool = True, need_weights: bool = False, L: int = 3) -> None:
        super().__init__()
        self.mem = nn.Linear(d, d)
        self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)
        self.same_kv, self.need_weights, self.L = same_kv, need_weights, L

    def forward(self, x: Tensor) -> Tensor:
        memory = torch.tanh(self.mem(x))
        value = memory if self.same_kv else torch.sin(x)
        h, _ = self.att(x[:, : self.L], memory, value, need_weights=self.need_weights)
        return self.head(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("method", [None, GHOST, MATERIALIZE])
@pytest.mark.parametrize("same_kv", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_matches_per_sample_gradients(same_kv, need_weights, method):
    norms = check(CrossAttention(same_kv=same_kv, need_weights=need_weights), torch.randn(4, 6, 8), method=method)
    assert norms.exact and set(norms.methods) == {"mem", "att", "att.out_proj", "head"}


@pytest.mark.parametrize("make", [SelfAttention, lambda: CrossAttention(same_kv=True),
                                  lambda: CrossAttention(same_kv=False)], ids=["self", "cross-kv", "cross-k-v"])
def test_autocast_bf16_close_to_float32(make):
    """Under autocast the weights reach the products through a cast (``ToCopyBackward0``); in
    cross-attention the cast sits before the split, so the split's output index is behind it."""
    model = make()
    x, t = torch.randn(4, 6, 8), torch.randn(4, 3)
    ref = reference(model, x, t)
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = per_sample_losses(model(x).float(), t).mean()
    loss.backward()
    norms = hooks.read(scale=4)
    for name, expected in ref.items():
        torch.testing.assert_close(norms.per_group[name], expected.double(), rtol=5e-2, atol=0.0)


def test_read_sums_fold_the_key_value_rows_into_their_attention():
    model = CrossAttention(same_kv=False).to(DT)
    x, t = torch.randn(3, 6, 8, dtype=DT), torch.randn(3, 3, dtype=DT)
    hooks = GhostNormHooks(plan(model)[0])
    norms = measure(model, x, t, hooks=hooks)
    hooks.arm()
    model.zero_grad()
    per_sample_losses(model(x), t).mean().backward()
    sums = hooks.read_sums(scale=3)
    assert len(hooks.module_names) == len(set(hooks.module_names)) == sums.shape[0] == 4
    for name, value in zip(hooks.module_names, sums):
        torch.testing.assert_close(value, norms.per_group[name].sum(), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("same_kv", [True, False])
def test_cross_attention_shared_in_a_chain(same_kv):
    """One cross-attention applied twice, the second on the first's output (a recurrent or
    Perceiver-style decoder): each call's walk stays inside its own graph, and the calls of each
    block of the weight are concatenated along the positions."""

    class Chain(CrossAttention):
        def forward(self, x: Tensor) -> Tensor:
            memory = torch.tanh(self.mem(x))
            value = memory if self.same_kv else torch.sin(x)
            h = x[:, : self.L]
            for _ in range(2):
                h = torch.tanh(self.att(h, memory, value, need_weights=False)[0])
            return self.head(h).mean(1)

    check(Chain(same_kv=same_kv), torch.randn(4, 6, 8))


def test_self_and_cross_attention_through_one_module_is_reported():
    """One weight used whole and in row blocks in a step: the per-sample gradient has cross terms
    between the blocks that neither product's norm holds."""
    att = nn.MultiheadAttention(8, 2, batch_first=True)
    hooks = GhostNormHooks(plan(att)[0])
    hooks.arm()
    x, m = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    h = att(x, x, x, need_weights=False)[0]
    att(h, m, m, need_weights=False)[0].sum().backward()
    with pytest.raises(RuntimeError, match="self- and as cross-attention"):
        hooks.read(3)


def test_transformer_encoder_decoder():
    """``nn.Transformer`` (batch-first): decoder self-attention with a causal mask, cross-attention
    to the encoder's memory of another length, every parameter covered."""

    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Transformer(8, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                                      dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            tgt = x[:, :3]
            mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=x.dtype)
            return self.head(self.net(x, tgt, tgt_mask=mask, tgt_is_causal=True)).mean(1)

    model = Seq2Seq()
    assert not plan(model)[1]
    check(model, torch.randn(3, 5, 8))


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
