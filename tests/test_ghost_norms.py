"""Ghost norms (``genbounds.estimators.ghost_norms``) against exact per-sample gradients.

The reference is ``torch.func.vmap(torch.func.grad(ℓ_i))`` per sample, reduced per module to
``Σ_{own params} ‖∂ℓ_i/∂θ‖²``; the hooks see the backward of the *mean* loss and are read with
``scale = b``.  Models run in float64 so that the comparison measures the algebra, not rounding.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from genbounds.estimators.ghost_norms import conv as ghost_conv
from genbounds.estimators.ghost_norms import (
    DECOMPOSITION,
    DECOMPOSITION_BN,
    EXACT,
    GHOST,
    GOODFELLOW,
    MATERIALIZE,
    GhostNormHooks,
    PerSampleNorms,
    plan,
    predict_methods,
    declared_batch_dims,
    suspended_ghost_hooks,
)

RTOL = 1e-5
DT = torch.float64


def per_sample_losses(out: Tensor, target: Tensor) -> Tensor:
    """A non-trivial per-sample loss of an output of any shape: ½‖y − t‖² + Σ y³/3."""
    d = (out - target).flatten(1)
    return 0.5 * (d * d).sum(1) + (out.flatten(1) ** 3).sum(1) / 3.0


def reference(model: nn.Module, x: Tensor, target: Tensor, extra: tuple = ()) -> dict[str, Tensor]:
    """module name → ``[b]`` ``Σ_{own trainable params} ‖∂ℓ_i/∂θ‖²`` via vmap(grad)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss_one(p, xi, ti):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),) + extra)
        return per_sample_losses(out, ti.unsqueeze(0)).sum()

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, target)
    out: dict[str, Tensor] = {}
    for name, g in grads.items():
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        sq = (g.reshape(g.shape[0], -1).double() ** 2).sum(1)
        out[mod] = out[mod] + sq if mod in out else sq
    return out


def measure(model: nn.Module, x: Tensor, target: Tensor, *, method=None, modules=None,
            hooks: GhostNormHooks | None = None, extra: tuple = ()) -> PerSampleNorms:
    if hooks is None:
        if modules is None:
            modules, uncovered = plan(model)
            assert not uncovered, uncovered
        hooks = GhostNormHooks(modules, method=method, batch_dims=declared_batch_dims(model))
        hooks.attach()
    hooks.arm(x.shape[0])  # (the batch size: used by sequence-first models only)
    model.zero_grad(set_to_none=True)
    out = model(x, *extra)
    per_sample_losses(out, target).mean().backward()
    norms = hooks.read(scale=x.shape[0])
    assert norms is not None
    return norms


def assert_matches(norms: PerSampleNorms, ref: dict[str, Tensor], rtol: float = RTOL) -> None:
    assert set(ref) <= set(norms.per_group), (set(ref), set(norms.per_group))
    for name, expected in ref.items():
        got = norms.per_group[name]
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected.double(), rtol=rtol, atol=1e-12 * float(expected.abs().max()),
                                   msg=lambda m: f"{name}: {m}")
    total = sum(ref.values())
    torch.testing.assert_close(norms.total, total.double(), rtol=rtol, atol=0.0)


def check(model: nn.Module, x: Tensor, target_shape=None, **kw) -> PerSampleNorms:
    model = model.to(DT)
    if x.is_floating_point():
        x = x.to(DT)
    with torch.no_grad():
        out = model(x, *kw.get("extra", ()))
    target = torch.randn(out.shape, dtype=DT)
    ref = reference(model, x, target, kw.get("extra", ()))
    norms = measure(model, x, target, **kw)
    assert_matches(norms, ref)
    return norms


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- layer types


def test_linear_2d_goodfellow():
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    norms = check(model, torch.randn(6, 7))
    assert norms.methods == {"0": GOODFELLOW, "2": GOODFELLOW}
    assert norms.exactness == {"0": EXACT, "2": EXACT}


def test_linear_2d_forced_materialize():
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    norms = check(model, torch.randn(6, 7), method=MATERIALIZE)
    assert set(norms.methods.values()) == {MATERIALIZE}


@pytest.mark.parametrize("method", [None, GHOST, MATERIALIZE])
def test_linear_on_sequences(method):
    # T = 3·4 = 12: 2T² = 288 vs d_in·d_out = 16·24 = 384 → ghost by the rule
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 2))
    norms = check(model, torch.randn(5, 3, 4, 16), method=method)
    if method is None:
        assert norms.methods == {"0": GHOST, "2": MATERIALIZE}  # 2·144 ≥ 24·2
    else:
        assert set(norms.methods.values()) == {method}


CONVS = {
    "1d-stride-pad-dil": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (5, 3, 17)),
    "1d-same-even-kernel": (lambda: nn.Conv1d(3, 4, 4, padding="same"), (5, 3, 11)),
    "1d-valid-groups": (lambda: nn.Conv1d(4, 6, 3, padding="valid", groups=2), (5, 4, 9)),
    "2d-stride-pad-dil-groups": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2), (4, 4, 9, 8)),
    "2d-depthwise": (lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (4, 3, 7, 6)),
    "2d-same-dilated": (lambda: nn.Conv2d(3, 5, (3, 4), padding="same", dilation=(2, 1)), (4, 3, 8, 7)),
    "2d-circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), (4, 2, 6, 5)),
    "2d-reflect-stride": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(1, 2), padding_mode="reflect"), (4, 2, 7, 6)),
    "3d-stride-pad-dil-groups": (
        lambda: nn.Conv3d(4, 4, (2, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2), groups=2),
        (3, 4, 5, 6, 5)),
    "3d-same": (lambda: nn.Conv3d(2, 3, 3, padding="same"), (3, 2, 4, 5, 3)),
    "3d-depthwise-nobias": (lambda: nn.Conv3d(3, 3, 2, groups=3, bias=False), (3, 3, 4, 4, 4)),
}


def _windowed_gram(monkeypatch) -> None:
    """The patch Gram as on CUDA (one strided window sum), here on the CPU."""
    monkeypatch.setattr(ghost_conv, "_conv_patch_gram",
                        functools.partial(ghost_conv._conv_patch_gram, windowed=True))


@pytest.mark.parametrize("route", ["auto", "ghost-unfold", "ghost-gram", "ghost-gram-windowed", "materialize"])
@pytest.mark.parametrize("case", list(CONVS))
def test_convolutions(case, route, monkeypatch):
    make, shape = CONVS[case]
    method = {"auto": None, "materialize": MATERIALIZE}.get(route, GHOST)
    if route.startswith("ghost-"):  # A Aᵀ from unfolded patches, or from the channel Gram
        monkeypatch.setattr(ghost_conv, "_conv_gram_cheaper", lambda *a: route.startswith("ghost-gram"))
    if route == "ghost-gram-windowed":
        _windowed_gram(monkeypatch)
    norms = check(nn.Sequential(make()), torch.randn(*shape), method=method)
    if method is not None:
        assert norms.methods["0"] == method


@pytest.mark.parametrize("route", ["ghost-unfold", "ghost-gram", "ghost-gram-windowed", "materialize"])
@pytest.mark.parametrize("budget", [1, 3000])
def test_convolutions_in_chunks_of_samples(route, budget, monkeypatch):
    """A work-buffer budget below one sample's (chunks of 1) or a few samples' (uneven chunks):
    the same exact values, on every route, with and without groups."""
    monkeypatch.setattr(ghost_conv, "WORK_BUFFER_BYTES", {"cpu": budget, "default": budget})
    if route.startswith("ghost-"):
        monkeypatch.setattr(ghost_conv, "_conv_gram_cheaper", lambda *a: route.startswith("ghost-gram"))
    if route == "ghost-gram-windowed":
        _windowed_gram(monkeypatch)
    method = MATERIALIZE if route == "materialize" else GHOST
    for case in ("2d-stride-pad-dil-groups", "1d-same-even-kernel", "3d-same"):
        make, shape = CONVS[case]
        x = torch.randn(7, *shape[1:])  # 7 samples: chunks of 1, or uneven chunks
        assert check(nn.Sequential(make()), x, method=method).methods["0"] == method


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_patch_gram_equals_unfolded_gram(case, windowed):
    """Both implementations (sliced adds on the CPU, one strided window sum elsewhere), through
    the reused work buffers too (a second call, whose buffers hold the first call's values)."""
    conv = CONVS[case][0]().to(DT)
    x = torch.randn(*CONVS[case][1], dtype=DT)
    A = ghost_conv._conv_unfold(conv, x)
    A = A.reshape(x.shape[0] * conv.groups, -1, A.shape[-1])
    scratch = ghost_conv._Scratch()
    for _ in range(2):
        got = ghost_conv._conv_patch_gram(conv, x, scratch, windowed=windowed)[0]
        torch.testing.assert_close(got, A.transpose(1, 2) @ A, rtol=1e-12, atol=1e-12)
    assert A.shape[-1] == conv(x)[0, 0].numel()
    if x.dim() == 4 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        ref = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
        torch.testing.assert_close(ghost_conv._conv_unfold(conv, x), ref, rtol=0, atol=0)


def test_conv_rule_picks_per_layer():
    # 8×8 outputs: T = 64, K·C_out = 27·16 = 432 < 2·64² → materialize;
    # 2×2 outputs: T = 4, K·C_out = 144·8 → ghost
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=4))
    norms = check(model, torch.randn(3, 3, 8, 8))
    assert norms.methods == {"0": MATERIALIZE, "2": GHOST}


@pytest.mark.parametrize("method", [None, GHOST, MATERIALIZE])
def test_embedding_padding_and_repeats(method):
    emb = nn.Embedding(6, 5, padding_idx=2)
    idx = torch.tensor([[1, 1, 2, 3, 1], [2, 2, 2, 2, 2], [0, 5, 5, 2, 0], [4, 3, 2, 1, 0]])
    model = nn.Sequential(emb, nn.Tanh())
    norms = check(model, idx, method=method)
    assert norms.per_group["0"][1] == 0.0  # only padding → no gradient
    if method is None:
        assert norms.methods["0"] == MATERIALIZE  # 2T = 10 ≥ d = 5
    else:
        assert norms.methods["0"] == method


def test_embedding_ghost_by_rule_and_1d_indices():
    norms = check(nn.Sequential(nn.Embedding(9, 16)), torch.tensor([[1, 3, 1], [0, 0, 0]]))
    assert norms.methods["0"] == GHOST
    norms = check(nn.Sequential(nn.Embedding(9, 4)), torch.tensor([1, 3, 1, 8]))
    assert norms.methods["0"] == GOODFELLOW


NORMS = {
    "layernorm-seq": (lambda: nn.LayerNorm(6), (4, 3, 6)),
    "layernorm-2dshape": (lambda: nn.LayerNorm((3, 5)), (4, 2, 3, 5)),
    "layernorm-nobias": (lambda: nn.LayerNorm(6, bias=False), (4, 6)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (3, 4, 5, 3)),
    "groupnorm-1d": (lambda: nn.GroupNorm(3, 6), (3, 6, 7)),
    "instancenorm2d": (lambda: nn.InstanceNorm2d(3, affine=True), (3, 3, 4, 5)),
    "batchnorm2d-eval": (lambda: nn.BatchNorm2d(3).eval(), (4, 3, 5, 4)),
    "batchnorm1d-eval-2d": (lambda: nn.BatchNorm1d(5).eval(), (4, 5)),
    "batchnorm1d-eval-3d": (lambda: nn.BatchNorm1d(3).eval(), (4, 3, 6)),
    "batchnorm3d-eval": (lambda: nn.BatchNorm3d(2).eval(), (3, 2, 3, 3, 2)),
}
if hasattr(nn, "RMSNorm"):
    NORMS["rmsnorm"] = (lambda: nn.RMSNorm(6, eps=1e-6), (4, 3, 6))


def _randomize_affine(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.copy_(torch.randn_like(layer.running_mean))
            layer.running_var.copy_(torch.rand_like(layer.running_var) + 0.5)
    return layer


@pytest.mark.parametrize("case", list(NORMS))
def test_normalization_layers(case):
    make, shape = NORMS[case]
    model = nn.Sequential(_randomize_affine(make()))
    norms = check(model, torch.randn(*shape) * 2 + 1)
    assert norms.methods["0"] == MATERIALIZE
    assert norms.exactness["0"] == EXACT


# --------------------------------------------------------------------------- models


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding="same", groups=2)
        self.gn = nn.GroupNorm(4, 8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(8 * 3 * 3, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)), inplace=True)  # in-place on a hooked output
        x = F.max_pool2d(x, 2)
        h = self.gn(self.conv2(x))
        h += x  # in-place residual on a hooked output
        x = torch.relu(self.dw(h))
        return self.fc(x.flatten(1))


def test_small_cnn_end_to_end():
    model = _randomize_norms(SmallCNN()).eval()
    norms = check(model, torch.randn(5, 3, 16, 16))
    assert norms.exact
    assert norms.methods["dw"] == MATERIALIZE and norms.methods["fc"] == GOODFELLOW


def _randomize_norms(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            _randomize_affine(m)
    return model


class TinyTransformer(nn.Module):
    """Embedding + Linear-on-sequence + LayerNorm, with hand-written single-head attention."""

    def __init__(self, vocab=11, d=16, max_len=8, pad=0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=pad)
        self.pos = nn.Embedding(max_len, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device).unsqueeze(0).expand(idx.shape[0], T)
        h = self.tok(idx) + self.pos(pos)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.proj(att @ v)
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return self.head(h.mean(1))


def test_small_transformer_end_to_end():
    model = _randomize_norms(TinyTransformer())
    idx = torch.randint(0, 11, (4, 7))
    idx[0, 3:] = 0  # padding
    idx[1, :4] = 5  # repeats
    norms = check(model, idx)
    assert norms.exact
    assert norms.methods["head"] == GOODFELLOW
    assert set(norms.methods) == {n for n, _ in plan(model)[0].items()}


# --------------------------------------------------------------------------- weight sharing


class SharedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class SharedEverything(nn.Module):
    """Each layer kind called twice, the calls with different lengths/sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=1)
        self.lin = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)

    def forward(self, idx):
        a = self.emb(idx)  # [b, T, 6]
        b = self.emb(idx[:, :2].flip(1))  # [b, 2, 6]
        h = torch.cat([self.lin(a), self.lin(torch.tanh(b))], 1)  # [b, T+2, 6]
        h = self.ln(torch.tanh(self.ln(h)))
        c = self.conv(h.transpose(1, 2))  # [b, 6, T+2]
        c = self.conv(torch.tanh(c[:, :, ::2]))  # second call, shorter
        return c.mean(2)


@pytest.mark.parametrize("method", [None, GHOST, MATERIALIZE])
def test_weight_sharing_linear_2d(method):
    norms = check(SharedLinear(), torch.randn(5, 6), method=method)
    if method is None:
        assert norms.methods["lin"] == GHOST  # T = 2 calls: 2·4 < 36


@pytest.mark.parametrize("method", [None, GHOST, MATERIALIZE])
def test_weight_sharing_every_kind(method):
    model = _randomize_norms(SharedEverything())
    check(model, torch.randint(0, 7, (4, 5)), method=method)


def test_a_backward_that_creates_a_graph_gives_the_same_norms():
    """``backward(create_graph=True)`` (a gradient penalty): the hooks compute with gradient
    recording off (they failed with an ``out=`` error before), single calls and shared ones alike,
    and leave nothing that requires gradient in their rows."""

    for model, width, out in ((nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT), 5, 3),
                              (SharedLinear().to(DT), 6, 2)):
        x = torch.randn(6, width, dtype=DT)
        target = torch.randn(6, out, dtype=DT)
        ref = reference(model, x, target)
        modules, _ = plan(model)
        hooks = GhostNormHooks(modules)
        hooks.arm()
        model.zero_grad(set_to_none=True)
        per_sample_losses(model(x), target).mean().backward(create_graph=True)
        norms = hooks.read(scale=x.shape[0])
        assert norms is not None and not norms.total.requires_grad
        assert_matches(norms, ref)
        hooks.detach()
        model.zero_grad(set_to_none=True)  # (create_graph leaves .grad in the graph)


def test_weight_sharing_with_an_unused_call():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            self.lin(x * 3)  # output unused: contributes no gradient
            return self.lin(torch.tanh(self.lin(x)))

    check(Model(), torch.randn(5, 4))


@pytest.mark.parametrize("kind", ["linear", "linear_seq", "conv", "embedding", "layernorm"])
def test_a_module_whose_output_is_unused_has_zero_norms(kind):
    """A hooked module called but whose output the loss does not use (a branch a batch skips)
    adds zero to every per-sample gradient, as a module that did not run: zero norms, the others
    exact — ``read`` gave ``None`` for the whole step (and the dispersion fell back to an extra
    pass for the rest of the fit; under DDP in one process alone, which broke its collectives)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 6)
            self.out = nn.Linear(6, 3)
            self.aux = {"linear": nn.Linear(6, 6), "linear_seq": nn.Linear(6, 6),
                        "conv": nn.Conv1d(1, 2, 3, padding=1), "embedding": nn.Embedding(7, 6),
                        "layernorm": nn.LayerNorm(6)}[kind]

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            if kind == "linear_seq":
                self.aux(h.unsqueeze(1).expand(-1, 4, -1))
            elif kind == "conv":
                self.aux(h.unsqueeze(1))
            elif kind == "embedding":
                self.aux((h.detach().abs() * 7).long().clamp(max=6))
            else:
                self.aux(h)
            return self.out(h)

    norms = check(Model(), torch.randn(5, 6))
    assert torch.equal(norms.per_group["aux"], torch.zeros(5, dtype=torch.float64))
    assert float(norms.per_group["inp"].min()) > 0


# --------------------------------------------------------------------------- frozen params


def test_frozen_parameters():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Conv1d(1, 2, 3), nn.Flatten(), nn.LayerNorm(8))
    model = _randomize_norms(model)
    model[0].weight.requires_grad_(False)  # bias only
    model[2].requires_grad_(False)  # whole layer frozen
    model[4].bias.requires_grad_(False)  # weight only
    model[6].weight.requires_grad_(False)

    class Wrap(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = self.inner[:4](x).unsqueeze(1)
            return self.inner[4:](h)

    wrapped = Wrap(model)
    covered, uncovered = plan(wrapped)
    assert set(covered) == {"inner.0", "inner.4", "inner.6"} and not uncovered
    norms = check(wrapped, torch.randn(4, 5))
    assert set(norms.per_group) == {"inner.0", "inner.4", "inner.6"}


# --------------------------------------------------------------------------- scaling


@pytest.mark.parametrize("as_tensor", [False, True])
def test_accumulation_and_loss_scale(as_tensor):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    x, t = torch.randn(4, 6, dtype=DT), torch.randn(4, 3, dtype=DT)
    ref = reference(model, x, t)
    hooks = GhostNormHooks(plan(model)[0])
    hooks.attach()
    m, A, S = x.shape[0], 3, 1024.0
    hooks.arm()
    (per_sample_losses(model(x), t).sum() * (S / (m * A))).backward()
    scale = torch.tensor(m * A / S) if as_tensor else m * A / S
    norms = hooks.read(scale)
    assert_matches(norms, ref)


def test_autocast_bf16_close_to_float32():
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    x, t = torch.randn(6, 12), torch.randn(6, 4)
    ref = reference(model, x, t)
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = per_sample_losses(out.float(), t).mean()
    loss.backward()
    norms = hooks.read(scale=6)
    assert norms.total.dtype == torch.float64 and torch.isfinite(norms.total).all()
    for name, expected in ref.items():
        torch.testing.assert_close(norms.per_group[name], expected.double(), rtol=5e-2, atol=0.0)


def test_float32_model():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(5, 6, 16)
    t = torch.randn(5, 6, 4)
    ref = reference(model, x, t)
    for method in (GHOST, MATERIALIZE):
        norms = measure(model, x, t, method=method)
        assert_matches(norms, ref, rtol=1e-4)


@pytest.mark.parametrize("gpu_branches", [False, True])
def test_float32_convolutions_and_normalizations(gpu_branches, monkeypatch):
    """fp32 (the float64 tests write per-sample sums straight into the float64 row: same dtype;
    here a sum in fp32, then a copy into the row), on the CPU's branches and on the GPU's (the
    patch Gram's window sum), taken here on the CPU; convolutions with and without a bias."""
    if gpu_branches:
        _windowed_gram(monkeypatch)
    model = _randomize_norms(SmallCNN()).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        t = torch.randn(model(x).shape)
    ref = reference(model, x, t)
    for method in (None, GHOST, MATERIALIZE):
        assert_matches(measure(model, x, t, method=method), ref, rtol=1e-4)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.Conv2d(16, 4, 3, groups=2, bias=False))
    xp = torch.randn(5, 3, 4, 4)
    with torch.no_grad():
        tp = torch.randn(plain(xp).shape)
    for method in (None, GHOST, MATERIALIZE):
        assert_matches(measure(plain, xp, tp, method=method), reference(plain, xp, tp), rtol=1e-4)
    ln = _randomize_norms(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 2)))
    xs, ts = torch.randn(4, 5, 6), torch.randn(4, 5, 2)
    assert_matches(measure(ln, xs, ts), reference(ln, xs, ts), rtol=1e-4)


def test_scratch_views_follow_their_buffer():
    """A cached view of a slot's buffer is never handed out after the slot's buffer was replaced."""
    scratch = ghost_conv._Scratch()
    like = torch.zeros(1)
    small = scratch.get("A", (2, 3), like)
    assert scratch.get("A", (2, 3), like) is small  # (cached: no slice or view op)
    big = scratch.get("A", (4, 5), like)  # outgrows the buffer: a new one
    again = scratch.get("A", (2, 3), like)
    assert again is not small and again.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()
    again.fill_(1.0)
    assert big.view(-1)[:6].eq(1.0).all()
    assert scratch.get("B", (2, 3), like).untyped_storage().data_ptr() != big.untyped_storage().data_ptr()
    assert scratch.get("A", (2, 3), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


KERNEL_BUDGET = {  # kernels beyond plain with one hooked layer: the layer's + 3 a step (rows, their float64 copy, sum)
    "conv3x3-ghost-gram": (lambda: nn.Conv2d(32, 32, 3, padding=1, bias=False), (4, 32, 4, 4), 7 + 3),
    "conv3x3-ghost-gram-bias": (lambda: nn.Conv2d(32, 32, 3, padding=1), (4, 32, 4, 4), 8 + 3),  # (bias folded)
    "conv3x3-materialize": (lambda: nn.Conv2d(8, 8, 3, padding=1), (4, 8, 6, 6), 10 + 3),  # (with a bias)
    "linear-sequence-ghost-bias": (lambda: nn.Linear(64, 64), (4, 16, 64), 5 + 3),
    "conv1x1-stride2": (lambda: nn.Conv2d(8, 16, 1, stride=2, bias=False), (4, 8, 6, 6), 4 + 3),
    "groupnorm": (lambda: nn.GroupNorm(2, 8), (4, 8, 6, 6), 6 + 3),
    "linear": (lambda: nn.Linear(8, 8), (4, 8), 5 + 3),
}
VIEW_OPS = {"view", "_unsafe_view", "slice", "select", "detach", "alias", "transpose", "t", "permute", "expand",
            "unsqueeze", "squeeze", "as_strided", "unbind", "split", "_reshape_alias", "reshape", "promote_types",
            "result_type", "empty", "empty_like", "empty_strided", "lift_fresh", "unfold"}


@pytest.mark.parametrize("case", list(KERNEL_BUDGET))
def test_kernels_per_hooked_layer_on_the_gpu_branches(case, monkeypatch):
    """Every op is a launch on a GPU: the GPU branches (window-sum patch Gram, buffers allocated),
    counted on the CPU, stay within a few kernels per layer — and the measured step's kernels
    beyond plain are counted exactly, so a regression fails here."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Kernels(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEW_OPS:
                Kernels.n += 1
            return func(*args, **(kwargs or {}))

    _windowed_gram(monkeypatch)
    monkeypatch.setattr(ghost_conv._Scratch, "get",
                        lambda self, slot, shape, like: torch.empty(shape, dtype=like.dtype, device=like.device))
    grams: list[int] = []
    windowed = ghost_conv._conv_patch_gram
    monkeypatch.setattr(ghost_conv, "_conv_patch_gram", lambda *a, **k: grams.append(1) or windowed(*a, **k))
    make, shape, budget = KERNEL_BUDGET[case]
    model = nn.Sequential(make())
    x = torch.randn(*shape)
    hooks = GhostNormHooks(plan(model)[0])

    def kernels(measured: bool) -> int:
        model.zero_grad(set_to_none=True)
        Kernels.n = 0
        with Kernels():
            if measured:
                hooks.arm()
            model(x).square().sum().backward()
            if measured:
                assert hooks.read_sums() is not None
                hooks.unhook()
        return Kernels.n

    kernels(True)  # (the first read checks parameter hooks: once)
    extra = kernels(True) - kernels(False)
    assert 0 < extra <= budget, f"{case}: {extra} extra kernels"
    assert bool(grams) == ("gram" in case)  # (the route the case is named after)


def test_rows_widen_for_a_float64_layer_after_an_fp32_one():
    """The step's rows take the first call's compute dtype (fp32 here) and widen, never narrow,
    when a float64 layer's values arrive (first, in the backward): its values are not rounded."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(5, 6)
            self.b = nn.Linear(6, 3).double()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).double())

    model = Mixed()
    x, t = torch.randn(4, 5), torch.randn(4, 3, dtype=torch.float64)
    want_a = []
    for i in range(4):  # (one sample at a time: the fp32 layer's output may differ in its last bits)
        model.zero_grad()
        ((model(x[i:i + 1]) - t[i:i + 1]) ** 2).sum().backward()
        want_a.append(sum(float(p.grad.double().square().sum()) for p in model.a.parameters()))
    with torch.no_grad():  # the float64 layer in closed form from the batch's own activations
        h = torch.tanh(model.a(x)).double()
        want_b = (2 * (model.b(h) - t)).square().sum(1) * (h.square().sum(1) + 1)
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    model.zero_grad()
    ((model(x) - t) ** 2).sum().backward()
    norms = hooks.read()
    assert norms.total.dtype == torch.float64
    torch.testing.assert_close(norms.per_group["b"], want_b, rtol=1e-14, atol=0)  # not rounded to fp32
    torch.testing.assert_close(norms.per_group["a"], torch.tensor(want_a, dtype=torch.float64), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------- lifecycle


def test_disarmed_records_nothing_and_suspended():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, t = torch.randn(3, 5, dtype=DT), torch.randn(3, 2, dtype=DT)
    hooks = GhostNormHooks(plan(model)[0])
    hooks.attach()
    per_sample_losses(model(x), t).mean().backward()  # attached, never armed
    assert hooks.read(3) is None
    hooks.arm()
    hooks.disarm()
    per_sample_losses(model(x), t).mean().backward()
    assert hooks.read(3) is None
    assert all(not site.calls for site in hooks._sites)

    hooks.arm()
    x2, t2 = torch.randn(7, 5, dtype=DT), torch.randn(7, 2, dtype=DT)
    with hooks.suspended():  # a probe pass (other batch size) while armed
        per_sample_losses(model(x2), t2).mean().backward()
    assert hooks.armed
    with suspended_ghost_hooks():
        per_sample_losses(model(x2), t2).mean().backward()
        # functorch transforms work on the hooked (suspended) model
        ref = reference(model, x, t)
    norms = measure(model, x, t, hooks=hooks)
    assert_matches(norms, ref)


def test_the_forward_hook_goes_at_the_end_of_the_backward():
    """``unhook_after_backward``: the global forward hook is removed when the backward that reached
    the recorded calls ends — a call whose output never gets a gradient does not hold it — not
    before: a segment checkpointed with ``use_reentrant=True`` runs its forward again inside the
    backward, and that forward must be recorded (the norms are exact). The next ``arm`` attaches
    it again."""
    from torch.utils.checkpoint import checkpoint

    class Model(nn.Module):
        def __init__(self, unused: bool, reentrant: bool) -> None:
            super().__init__()
            self.lin, self.mid, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            self.unused, self.reentrant = unused, reentrant

        def segment(self, x):
            return torch.tanh(self.mid(torch.tanh(self.lin(x))))

        def forward(self, x):
            if self.unused:
                self.head(x)  # recorded, never gets a gradient
            h = checkpoint(self.segment, x, use_reentrant=True) if self.reentrant else self.segment(x)
            return self.head(h)

    for unused, reentrant in ((False, False), (True, False), (False, True)):
        model = Model(unused, reentrant).to(DT)
        x, t = torch.randn(5, 4, dtype=DT), torch.randn(5, 3, dtype=DT)
        model.reentrant = False  # (functorch's reference: without the checkpoint, the same function)
        ref = reference(model, x, t)
        model.reentrant = reentrant
        hooks = GhostNormHooks(plan(model)[0], unhook_after_backward=True)
        seen: list[bool] = []
        model.lin.weight.register_hook(lambda g: seen.append(hooks.attached))  # inside the backward
        for _ in range(2):
            hooks.arm()
            assert hooks.attached
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(reentrant)  # (a reentrant checkpoint needs an input that does)
            per_sample_losses(model(xi), t).mean().backward()
            assert not hooks.attached
            assert_matches(hooks.read(scale=5), ref)
        assert seen == [True, True]
        hooks.detach()


def test_hooks_attached_once_survive_many_steps():
    model = _randomize_norms(SmallCNN()).to(DT).eval()
    hooks = GhostNormHooks(plan(model)[0])
    hooks.attach()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(5):
        x = torch.randn(4, 3, 16, 16, dtype=DT)
        t = torch.randn(4, 4, dtype=DT)
        armed = step != 2
        if armed:
            with hooks.suspended():  # the functorch reference is a probe pass
                ref = reference(model, x, t)
            hooks.arm()
        else:
            hooks.disarm()
        opt.zero_grad(set_to_none=True)
        per_sample_losses(model(x), t).mean().backward()
        norms = hooks.read(scale=4)
        if armed:
            assert_matches(norms, ref)
        else:
            assert norms is None
        opt.step()
    from torch.nn.modules.module import _global_forward_hooks

    handle = hooks._handle  # one global forward hook, dispatching by module
    assert handle is not None and handle.id in _global_forward_hooks
    hooks.detach()
    assert not model.conv1._forward_hooks and handle.id not in _global_forward_hooks


def test_read_before_backward_is_none_and_clear_drops_state():
    model = nn.Sequential(nn.Linear(3, 2))
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    out = model(torch.randn(4, 3))
    assert hooks.read(4) is None
    out2 = model(torch.randn(4, 3))
    hooks.clear()
    out2.sum().backward()  # recorded before clear(): ignored
    assert hooks.read(4) is None
    del out


# --------------------------------------------------------------------------- train-mode BatchNorm


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def test_train_mode_batchnorm_decomposition():
    model = _randomize_norms(BNNet()).to(DT).train()
    x, t = torch.randn(8, 5, dtype=DT), torch.randn(8, 3, dtype=DT)
    b = x.shape[0]
    hooks = GhostNormHooks(plan(model)[0])
    hooks.attach()
    # capture (input, output gradient) independently, to materialize the contributions
    seen: dict[str, list] = {}

    def capture(name):
        def fwd(mod, args, out):
            seen[name] = [args[0].detach()]
            out.register_hook(lambda g: seen[name].append(g.detach()))
        return fwd

    handles = [getattr(model, n).register_forward_hook(capture(n)) for n in ("fc1", "bn", "fc2")]
    hooks.arm()
    losses = per_sample_losses(model(x), t)
    losses.mean().backward(retain_graph=True)
    norms = hooks.read(scale=b)
    for h in handles:
        h.remove()

    contrib: dict[str, list[Tensor]] = {}
    for name in ("fc1", "fc2"):
        a, g = seen[name]
        contrib[name] = [torch.einsum("bo,bi->boi", g, a), g]
    a, g = seen["bn"]
    xhat = (a - a.mean(0)) / torch.sqrt(a.var(0, unbiased=False) + model.bn.eps)
    contrib["bn"] = [g * xhat, g]
    for name, (cw, cb) in contrib.items():
        mod = getattr(model, name)
        # Σ_i contribution_i is the batch gradient, exactly
        torch.testing.assert_close(cw.sum(0), mod.weight.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(cb.sum(0), mod.bias.grad, rtol=1e-12, atol=1e-14)
        sq = (cw.flatten(1) ** 2).sum(1) + (cb ** 2).sum(1)
        torch.testing.assert_close(norms.per_group[name], sq * b * b, rtol=RTOL, atol=0.0)
    assert norms.methods == {"fc1": GOODFELLOW, "bn": DECOMPOSITION_BN, "fc2": GOODFELLOW}
    assert norms.exactness == {"fc1": DECOMPOSITION, "bn": DECOMPOSITION, "fc2": EXACT}
    assert not norms.exact
    # fc2 is downstream of every BatchNorm: its values are the per-sample gradients of ℓ_i
    for i in range(b):
        gw, gb = torch.autograd.grad(losses[i], (model.fc2.weight, model.fc2.bias), retain_graph=True)
        torch.testing.assert_close(norms.per_group["fc2"][i], (gw ** 2).sum() + (gb ** 2).sum(), rtol=RTOL, atol=0.0)


# --------------------------------------------------------------------------- BackPACK


def test_agrees_with_backpack_batch_l2():
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.ReLU(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(6, 3, 8, 8, dtype=DT), torch.randint(0, 3, (6,))
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    F.cross_entropy(model(x), y).backward()
    norms = hooks.read(scale=6)

    bp_model = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss())(bp_model(x), y)
    with backpack(BatchL2Grad()):
        loss.backward()
    for name, mod in bp_model.named_children():
        params = list(mod.parameters())
        if not params:
            continue
        bp = sum(p.batch_l2 for p in params) * 6 ** 2  # BackPACK: ‖g_i / b‖²
        torch.testing.assert_close(norms.per_group[name], bp.double(), rtol=RTOL, atol=0.0)


# --------------------------------------------------------------------------- plan & refusals


def test_plan_refuses_unsupported_tied_and_functional():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.att = nn.MultiheadAttention(4, 2, add_bias_kv=True)
            self.att_ok = nn.MultiheadAttention(4, 2, batch_first=True)  # self-attention: its projections are matched in the graph
            self.act = nn.PReLU()
            self.tconv = nn.ConvTranspose1d(4, 4, 3)
            self.bag = nn.Embedding(5, 4, max_norm=1.0)
            self.ok = nn.Linear(4, 4)
            self.raw = nn.Parameter(torch.zeros(3))

    covered, uncovered = plan(Model())
    assert set(covered) == {"ok", "att_ok", "att_ok.out_proj"}
    assert "tied" in uncovered["emb.weight"] and "tied" in uncovered["head.weight"]
    assert "add_bias_kv" in uncovered["att.in_proj_weight"]
    assert "MultiheadAttention" in uncovered["att.out_proj.weight"]
    assert "PReLU" in uncovered["act.weight"]
    assert "transposed" in uncovered["tconv.weight"]
    assert "max_norm" in uncovered["bag.weight"]
    assert "raw" in uncovered
    assert GhostNormHooks.supported(nn.SyncBatchNorm(3)) is not None
    assert GhostNormHooks.supported(nn.Embedding(3, 2, scale_grad_by_freq=True)) is not None
    assert GhostNormHooks.supported(nn.Conv2d(1, 1, 1, padding_mode="reflect")) is None
    with pytest.raises(ValueError, match="cannot cover"):
        GhostNormHooks.for_model(Model())
    with pytest.raises(ValueError, match="not supported"):
        GhostNormHooks({"act": nn.PReLU()})


def test_plan_leaves_reparametrized_layers_to_an_extra_pass():
    """A pruned layer trains ``weight_orig`` (its weight is ``weight_orig * mask``, made before the
    forward), the old ``weight_norm`` ``weight_g`` and ``weight_v``: the layer rule's per-sample
    gradient is the computed weight's, not theirs. Covered, they crashed HeldoutGradient's probe
    after ``ModelPruning`` ("recorded no gradient") and left its hook route's numbers unchecked."""
    import warnings

    from genbounds.estimators.per_sample_gradients import hooks_cover

    pruned, old_norm, plain = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(4, 3)
    torch.nn.utils.prune.l1_unstructured(pruned, "weight", amount=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (weight_norm's deprecation)
        torch.nn.utils.weight_norm(old_norm)
    model = nn.Sequential(pruned, nn.Tanh(), old_norm, nn.Tanh(), plain)
    covered, uncovered = plan(model)
    assert set(covered) == {"4"}
    assert set(uncovered) == {"0.weight_orig", "0.bias", "2.weight_g", "2.weight_v", "2.bias"}
    assert "reparametrization" in uncovered["0.weight_orig"] and "weight_orig" in uncovered["0.bias"]
    assert not hooks_cover(model) and hooks_cover(nn.Sequential(plain))


def test_weight_used_outside_forward_is_detected():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return F.linear(x, self.lin.weight, self.lin.bias)

    model = Model()
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="outside the module's forward"):
        hooks.read(2)


def test_unbatched_input_is_reported():
    lin = nn.Linear(3, 2)
    hooks = GhostNormHooks({"lin": lin})
    hooks.arm()
    lin(torch.randn(3)).sum().backward()
    with pytest.raises(RuntimeError, match="unbatched"):
        hooks.read(1)


def test_predict_methods_matches_recorded():
    model = TinyTransformer()
    covered = plan(model)[0]
    idx = torch.randint(0, 11, (3, 8))
    predicted = predict_methods(covered, lambda: model(idx))
    norms = measure(model, idx, torch.randn(3, 3), modules=covered)
    assert predicted == norms.methods
    cnn = SmallCNN()
    covered = plan(cnn)[0]
    x = torch.randn(2, 3, 16, 16)
    assert predict_methods(covered, lambda: cnn(x)) == measure(cnn, x, torch.randn(2, 4), modules=covered).methods


def test_group_of_sums_modules():
    model = _randomize_norms(TinyTransformer()).to(DT)
    idx = torch.randint(0, 11, (3, 6))
    t = torch.randn(3, 3, dtype=DT)
    ref = reference(model, idx, t)
    covered = plan(model)[0]
    groups = {"ff1": "mlp", "ff2": "mlp", "tok": "embeddings", "pos": "embeddings"}
    hooks = GhostNormHooks(covered, group_of=groups)
    norms = measure(model, idx, t, hooks=hooks)
    assert set(norms.per_group) == {"mlp", "embeddings", "ln1", "qkv", "proj", "ln2", "head"}
    torch.testing.assert_close(norms.per_group["mlp"], ref["ff1"] + ref["ff2"], rtol=RTOL, atol=0.0)
    torch.testing.assert_close(norms.per_group["embeddings"], ref["tok"] + ref["pos"], rtol=RTOL, atol=0.0)
    torch.testing.assert_close(norms.total, sum(ref.values()), rtol=RTOL, atol=0.0)
    assert set(norms.methods) == set(covered)  # methods stay per module


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["2d-stride-pad-dil-groups", "2d-same-dilated", "2d-circular", "3d-same"])
def test_cuda_windowed_patch_gram(case):
    """On CUDA the patch Gram takes the window sum by default: equal to the unfolded Gram."""
    dev = torch.device("cuda")
    conv = CONVS[case][0]().to(dev, DT)
    x = torch.randn(*CONVS[case][1], dtype=DT, device=dev)
    A = ghost_conv._conv_unfold(conv, x)
    A = A.reshape(x.shape[0] * conv.groups, -1, A.shape[-1])
    got = ghost_conv._conv_patch_gram(conv, x)[0]
    torch.testing.assert_close(got, A.transpose(1, 2) @ A, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
def test_cuda_exact_and_autocast():
    dev = torch.device("cuda")
    for model, x in ((_randomize_norms(SmallCNN()).eval(), torch.randn(5, 3, 16, 16)),
                     (_randomize_norms(TinyTransformer()), torch.randint(0, 11, (4, 7)))):
        model = model.to(dev, DT)
        x = x.to(dev, DT) if x.is_floating_point() else x.to(dev)
        with torch.no_grad():
            t = torch.randn(model(x).shape, dtype=DT, device=dev)
        ref = reference(model, x, t)
        hooks = GhostNormHooks(plan(model)[0])
        hooks.arm()
        per_sample_losses(model(x), t).mean().backward()
        norms = hooks.read(torch.tensor(float(x.shape[0]), device=dev))  # device scale: no sync
        assert norms.total.device.type == "cuda"
        assert_matches(norms, ref)
        hooks.detach()
    model = SmallCNN().to(dev).eval()
    hooks = GhostNormHooks(plan(model)[0])
    hooks.arm()
    with torch.autocast("cuda", dtype=torch.float16):
        out = model(torch.randn(8, 3, 16, 16, device=dev))
    (out.float() ** 2).mean().backward()
    norms = hooks.read(8)
    assert norms.total.dtype == torch.float64 and torch.isfinite(norms.total).all()


# --------------------------------------------------------------------------- hook order and reuse


class ScaledGradNet(nn.Module):
    """A user's tensor hook on a layer's output rescales its gradient per output unit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)
        self.register_buffer("gain", torch.linspace(0.5, 3.0, 6))

    def forward(self, x):
        h = self.fc1(x)
        if h.requires_grad:
            h.register_hook(lambda g: g * self.gain)
        return self.fc2(torch.tanh(h))


def test_norms_see_the_gradient_after_a_users_tensor_hook():
    # the weight's gradient is made of the hooked gradient: the norms must be of that one
    model = ScaledGradNet().to(DT)
    x, t = torch.randn(7, 5, dtype=DT), torch.randn(7, 3, dtype=DT)
    ref: dict[str, Tensor] = {"fc1": torch.zeros(7, dtype=DT), "fc2": torch.zeros(7, dtype=DT)}
    for i in range(7):  # brute force: one backward per sample, through the user's hook
        model.zero_grad(set_to_none=True)
        per_sample_losses(model(x[i:i + 1]), t[i:i + 1]).sum().backward()
        for name in ref:
            ref[name][i] = sum((p.grad ** 2).sum() for p in getattr(model, name).parameters())
    norms = measure(model, x, t)
    assert_matches(norms, ref)
    model.gain.fill_(1.0)  # without the user's rescaling the norms differ: the hook matters
    assert not torch.allclose(ref["fc1"], reference(model, x, t)["fc1"], rtol=0.1)


def test_rows_reused_across_steps_never_alias_a_returned_read():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    hooks = GhostNormHooks(plan(model)[0])
    hooks.attach()
    kept = []
    for b in (4, 4, 6, 4, 4):  # same shape: the last step's rows are reused; a new b: new rows
        x, t = torch.randn(b, 4, dtype=DT), torch.randn(b, 2, dtype=DT)
        with hooks.suspended():  # (the functorch reference is a probe pass)
            ref = reference(model, x, t)
        norms = measure(model, x, t, hooks=hooks)
        assert_matches(norms, ref)
        kept.append((norms, {k: v.clone() for k, v in norms.per_group.items()}, norms.total.clone()))
        hooks.arm()
        model(x).sum().backward()
        sums = hooks.read_sums()  # a new tensor each step, never the reused rows
        assert sums is not None and sums.shape == (2,)  # per module: Σ_i over the batch
        kept.append((sums, sums.clone()))
    for item in kept:  # nothing handed out earlier was overwritten by a later step
        if len(item) == 3:
            norms, groups, total = item
            assert all(torch.equal(norms.per_group[k], v) for k, v in groups.items())
            assert torch.equal(norms.total, total)
        else:
            assert torch.equal(item[0], item[1])
    hooks.detach()


def test_an_output_without_autograd_node_fails_closed():
    # unreachable through plan() (it refuses a Linear whose forward is not Linear's); an instance
    # attribute reaches it: the hook must record a problem, not measure nothing
    model = nn.Linear(3, 3)
    hooks = GhostNormHooks({"fc": model})
    model.forward = lambda x: model.weight  # returns a leaf: no node to hook
    hooks.attach()
    hooks.arm()
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="no autograd node"):
        hooks.read(4)
    hooks.detach()


@pytest.mark.parametrize("with_norm_layer", [False, True])
def test_linear_rows_made_at_the_read_equal_the_per_layer_route(with_norm_layer, monkeypatch):
    """A 2-D Linear's rows are made at the read from its two row norms (goodfellow_rows: every
    such layer at once; with another kind hooked too, only their rows): the same values as the
    per-layer route that squares and combines them in the backward, to fp32 rounding, for a layer
    with a bias, one without and one whose weight is frozen (bias only); and exact against
    per-sample gradients in float64."""
    from genbounds.estimators.ghost_norms import linear as ghost_linear
    from genbounds.estimators.ghost_norms import step_rows

    from helpers import linear_mix

    def build() -> nn.Module:
        torch.manual_seed(3)
        return linear_mix(9, 12, 7, 5, with_norm_layer)

    made = []
    real_rows = step_rows.goodfellow_rows
    monkeypatch.setattr(step_rows, "goodfellow_rows", lambda *a, **k: made.append(k.get("out")) or real_rows(*a, **k))
    x, t = torch.randn(8, 9), torch.randn(8, 5)
    deferred = measure(build(), x, t)
    assert len(made) == 1 and (made[0] is None) == with_norm_layer  # one call; into the rows when all are Linear
    monkeypatch.setattr(ghost_linear._LinearKind, "defers_rows", False)
    per_layer = measure(build(), x, t)
    assert len(made) == 1
    for name, want in per_layer.per_group.items():
        torch.testing.assert_close(deferred.per_group[name], want, rtol=2e-6, atol=0)
    monkeypatch.setattr(ghost_linear._LinearKind, "defers_rows", True)
    check(build(), torch.randn(8, 9))  # float64: against vmap(grad)
    assert len(made) == 2
