"""The functorch backend's memory: chunk sizes from the budget, no second copy of a chunk, two
chunks never alive at once — and the same moments whatever the chunking (brute-force twins)."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genbounds.estimators import per_sample_gradients as psg
from genbounds.estimators.per_sample_gradients import (
    DEFAULT_MEMORY_BUDGET,
    budget_chunk_size,
    centered_row_sq_norms,
    per_sample_gradient_moments,
)


def _loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


def _setup(b: int = 10):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 96), nn.Tanh(), nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 5))
    batch = (torch.randn(b, 20), torch.randint(0, 5, (b,)))
    model.zero_grad()
    _loss(model, batch).mean().backward()
    mean = [p.grad.detach().reshape(-1).clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return model, batch, mean


def _brute(model, batch):
    """Per-sample gradients one sample at a time by plain autograd: (Σ‖g_i‖², Σ g_i, ‖g_i − ḡ‖²)."""
    rows = []
    for i in range(batch[0].shape[0]):
        loss = _loss(model, (batch[0][i:i + 1], batch[1][i:i + 1])).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    g = torch.stack(rows)
    mean = g.mean(0)
    return (g * g).sum(), g.sum(0), ((g - mean) ** 2).sum(1)


def test_budget_chunk_size():
    # the default holds one sample at a time for large models, the whole batch for small ones
    assert budget_chunk_size(5_590_000, 128) == 1
    assert budget_chunk_size(160_000, 32) == 32
    assert budget_chunk_size(1_000_000, 128) == DEFAULT_MEMORY_BUDGET // (2 * 4 * 1_000_000)
    for d in (1, 1_000, 123_457, 4_000_000, 50_000_000):
        for budget in (2**20, DEFAULT_MEMORY_BUDGET, 2**30):
            c = budget_chunk_size(d, 10_000, budget)
            assert c >= 1
            assert c == 1 or c * 2 * 4 * d <= budget  # c gradients and as much again fit
            assert c == 10_000 or (c + 1) * 2 * 4 * d > budget  # and no larger chunk would


@pytest.mark.parametrize("n", [7, 2048, 5000, 6144])
def test_centered_row_sq_norms_in_blocks_match_the_direct_sum(monkeypatch, n):
    monkeypatch.setattr(psg, "CENTER_BLOCK", 2048)
    torch.manual_seed(n)
    rows, center = torch.randn(3, n), torch.randn(n)
    want = ((rows.double() - center.double()) ** 2).sum(1)
    torch.testing.assert_close(centered_row_sq_norms(rows, center), want, rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("c", [1, 3])
def test_row_sum_is_added_in_place(c, dtype):
    torch.manual_seed(c)
    acc, rows = torch.randn(50, dtype=dtype), torch.randn(c, 50, dtype=dtype)
    want = acc + rows.sum(0)
    ptr = acc.data_ptr()
    psg._add_row_sums_([acc], [rows])
    assert acc.data_ptr() == ptr
    torch.testing.assert_close(acc, want, rtol=1e-6 if dtype != torch.bfloat16 else 2e-2, atol=1e-6 if dtype != torch.bfloat16 else 5e-2)


@pytest.mark.parametrize("method", ["vmap", "jacobian"])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_chunked_moments_equal_one_sample_at_a_time(monkeypatch, method, chunk):
    """Every chunking (centred blocks narrower than a layer) gives the brute-force moments."""
    monkeypatch.setattr(psg, "CENTER_BLOCK", 1024)  # the 96×64 layer spans several blocks
    model, batch, mean = _setup()
    sq, total, centred = _brute(model, batch)
    groups = [[0, 1], [2, 3], [4, 5]]
    mo = per_sample_gradient_moments(model, _loss, batch, method=method, chunk_size=chunk, groups=groups,
                                     mean_gradient=mean)
    torch.testing.assert_close(mo.weighted_sq_norm_sum.double(), sq, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.cat([s.reshape(-1) for s in mo.weighted_sum]).double(), total,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mo.group_sq.sum(), mo.weighted_sq_norm_sum.double(), rtol=1e-9, atol=0)
    assert mo.centered_sums is not None
    s1, s2, count = mo.centered_sums
    assert count == batch[0].shape[0]
    torch.testing.assert_close(s1, centred.sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(s2, (centred ** 2).sum(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", ["vmap", "jacobian"])
def test_two_chunks_are_never_alive_at_once(monkeypatch, method):
    """When a chunk is computed, no tensor of the previous chunk is referenced any more (by the
    consumer's loop or by the generator): the pass holds one chunk, not two."""
    name = "_vmap_chunks" if method == "vmap" else "_jacobian_chunks"
    original = getattr(psg, name)
    checks: list[bool] = []

    def spy(*args, **kwargs):
        gen = original(*args, **kwargs)
        refs: list[weakref.ref] = []
        while True:
            checks.append(all(r() is None for r in refs))  # before the next chunk is computed
            try:
                flat, loss = next(gen)
            except StopIteration:
                return
            refs = [weakref.ref(t if t._base is None else t._base) for t in flat]
            yield flat, loss
            del flat, loss

    monkeypatch.setattr(psg, name, spy)
    model, batch, mean = _setup()
    per_sample_gradient_moments(model, _loss, batch, method=method, chunk_size=2, mean_gradient=mean)
    assert len(checks) == 6 and all(checks), checks


@pytest.mark.parametrize("extra", [1000, 2 * (1 << 18) + 33 * 1024 + 7 - (1 << 18)])
def test_centered_row_sq_norms_at_the_default_block(extra):
    """The real block width, the last block narrower and wider than 32 k columns, rows not
    contiguous: the same as centring the whole rows at once."""
    from genbounds.estimators.functional import row_sq_norms

    n = psg.CENTER_BLOCK + extra
    torch.manual_seed(extra)
    rows = torch.randn(n, 2).t()  # [2, n], not contiguous
    center = torch.randn(n)
    torch.testing.assert_close(centered_row_sq_norms(rows, center), row_sq_norms(rows - center), rtol=1e-8, atol=0)


def test_budget_sets_the_chunks_end_to_end(monkeypatch):
    """Without ``chunk_size`` the chunks are what the budget allows (three samples here: 3,3,3,1),
    and without ``mean_gradient`` several chunks give no centred terms (no SE) but the same sums."""
    model, batch, _ = _setup()
    d = sum(p.numel() for p in model.parameters())
    original = psg._vmap_chunks
    sizes: list[int] = []

    def spy(*args, **kwargs):
        for flat, loss in original(*args, **kwargs):
            sizes.append(flat[0].shape[0])
            yield flat, loss

    monkeypatch.setattr(psg, "_vmap_chunks", spy)
    mo = per_sample_gradient_moments(model, _loss, batch, memory_budget=2 * 4 * d * 3 + 5)
    assert sizes == [3, 3, 3, 1]
    assert mo.centered_sums is None
    sq, total, _ = _brute(model, batch)
    torch.testing.assert_close(mo.weighted_sq_norm_sum.double(), sq, rtol=1e-5, atol=0)


def test_jacobian_chunks_with_an_unused_parameter():
    """A parameter that gets no gradient is a zero per-sample gradient in every chunk."""
    model, batch, _ = _setup()
    model.add_module("unused", nn.Linear(3, 3))
    loss = lambda m, b: _loss(m[:5], b)  # noqa: E731 - the unused layer is left out
    mo = per_sample_gradient_moments(model, loss, batch, method="jacobian", chunk_size=4)
    *_, w, bias = mo.weighted_sum
    assert w.shape == (3, 3) and not w.any() and not bias.any()
    whole = per_sample_gradient_moments(model, loss, batch, method="vmap")
    torch.testing.assert_close(mo.weighted_sq_norm_sum, whole.weighted_sq_norm_sum, rtol=1e-5, atol=0)


def test_centering_at_a_vector_of_another_length_is_an_error():
    with pytest.raises(ValueError, match="centring"):
        centered_row_sq_norms(torch.randn(2, 2 * psg.CENTER_BLOCK), torch.randn(2 * psg.CENTER_BLOCK + 5))


@pytest.mark.parametrize("method", ["vmap", "jacobian"])
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_without_the_running_sum_the_moments_are_the_same(method, chunk):
    """``gradient_sum=False`` (ḡ is the caller's): the same Σ‖g_i‖², group sums and centred terms
    as the brute force, and no Σ_i g_i is kept (one gradient's memory less)."""
    model, batch, mean = _setup()
    sq, _, centred = _brute(model, batch)
    mo = per_sample_gradient_moments(model, _loss, batch, method=method, chunk_size=chunk,
                                     groups=[[0, 1], [2, 3, 4, 5]], mean_gradient=mean, gradient_sum=False)
    assert mo.weighted_sum is None
    torch.testing.assert_close(mo.weighted_sq_norm_sum.double(), sq, rtol=1e-5, atol=0)
    torch.testing.assert_close(mo.group_sq.sum(), mo.weighted_sq_norm_sum.double(), rtol=1e-9, atol=0)
    s1, s2, count = mo.centered_sums
    assert count == batch[0].shape[0]
    torch.testing.assert_close(s1, centred.sum(), rtol=1e-4, atol=0)
    torch.testing.assert_close(s2, (centred ** 2).sum(), rtol=1e-4, atol=0)


def test_without_the_running_sum_no_add_over_the_gradient_runs(monkeypatch):
    calls: list[int] = []
    original = psg._add_row_sums_
    monkeypatch.setattr(psg, "_add_row_sums_", lambda acc, chunk: calls.append(1) or original(acc, chunk))
    model, batch, mean = _setup()
    per_sample_gradient_moments(model, _loss, batch, chunk_size=2, mean_gradient=mean)
    assert len(calls) == 4  # five chunks: the first starts the sum, four are added
    calls.clear()
    per_sample_gradient_moments(model, _loss, batch, chunk_size=2, mean_gradient=mean, gradient_sum=False)
    assert calls == []


def test_without_the_running_sum_the_mean_gradient_is_required():
    model, batch, _ = _setup()
    with pytest.raises(ValueError, match="needs mean_gradient"):
        per_sample_gradient_moments(model, _loss, batch, gradient_sum=False)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("n", [700, 2048, 5000])
def test_centring_into_a_scratch_buffer_is_bit_identical(monkeypatch, c, n):
    """``centered_row_sq_norms(…, scratch)`` writes its blocks into the one buffer (no temporary
    per block: the pass's 1 MiB blocks were what grew the heap under glibc's default) and gives
    exactly what it gives without one."""
    monkeypatch.setattr(psg, "CENTER_BLOCK", 1024)
    torch.manual_seed(n + c)
    rows, center = torch.randn(c, n), torch.randn(n)
    scratch = torch.full((c + 1, 1024), float("nan"))
    got = centered_row_sq_norms(rows, center, scratch)
    assert torch.equal(got, centered_row_sq_norms(rows, center))
    torch.testing.assert_close(got, ((rows.double() - center.double()) ** 2).sum(1), rtol=1e-6, atol=0)
    last = n - (n - 1) // 1024 * 1024  # the last block's width, written last
    assert torch.equal(scratch[:c, :last], rows[:, n - last:] - center[n - last:])


def test_a_scratch_buffer_of_another_dtype_or_too_small_is_not_written():
    """A model whose parameters differ in dtype (or a chunk wider than the buffer) centres those
    rows in a temporary of their own dtype, as without the buffer: never cast into it."""
    torch.manual_seed(1)
    rows, center = torch.randn(2, 700, dtype=torch.float64), torch.randn(700, dtype=torch.float64)
    for scratch in (torch.full((2, 1024), float("nan")), torch.full((1, 1024), float("nan"), dtype=torch.float64)):
        got = centered_row_sq_norms(rows, center, scratch)
        assert torch.equal(got, centered_row_sq_norms(rows, center))
        assert torch.isnan(scratch).all()


def test_probe_vectorization_width_fits_the_memory_budget():
    """On an accelerator a probe vectorizes only as many items (draws, Hutchinson vectors, points)
    as fit four float64 parameter-sized tensors each in the budget: the fixed widths 8–10 grew the
    H200's peak by 6,342 MiB in the CNN suite's final evaluation.  On the CPU one at a time; a
    requested width is kept.  (Meta tensors stand in for an accelerator's parameters.)"""
    from genbounds.callbacks import Flatness, HessianTrace
    from genbounds.callbacks.probe import PROBE_MEMORY_BUDGET, vectorization_width

    assert PROBE_MEMORY_BUDGET == DEFAULT_MEMORY_BUDGET
    assert vectorization_width(28_710_000, 8) == 1  # the AlexNet-style CNN
    assert vectorization_width(11_180_000, 10) == 1  # ResNet-18
    assert vectorization_width(50_000, 8) == 8  # the digits MLP's size: the fixed width as before
    d = 500_000
    assert vectorization_width(d, 10) == PROBE_MEMORY_BUDGET // (4 * 8 * d) == 4
    big, small = nn.Linear(4000, 4000, device="meta"), nn.Linear(10, 10, device="meta")
    trace, flat = HessianTrace(), Flatness()
    assert trace.per_pass(None, big, gpu_default=10) == 1
    assert trace.per_pass(None, small, gpu_default=10) == 10
    assert flat.per_pass(None, small) == 8
    assert flat.per_pass(None, nn.Linear(10, 10)) == 1  # the CPU
    assert flat.per_pass(3, big) == 3
    # the GMP intervention vectorizes its k perturbations alike
    import lightning.pytorch as pl

    from genbounds.callbacks import GaussianModelPerturbation

    class Regression(pl.LightningModule):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.net = nn.Linear(d, d)

        def per_sample_loss(self, batch):
            x, y = batch
            return ((self.net(x) - y) ** 2).mean(1)

    gmp = GaussianModelPerturbation(k=10)
    assert gmp._width(Regression(4000).to("meta")) == 1
    assert gmp._width(Regression(10).to("meta")) == 10
    assert gmp._width(Regression(10)) == 1  # the CPU


def test_chunked_float64_inner_products_and_the_probe_set_terms(monkeypatch):
    """``dot64`` over chunks equals the float64 inner product of the whole tensors (chunk size
    forced small: several chunks and a remainder), and ``against_mean`` gives, tensor by tensor,
    ``‖g − s/m‖²``, ``‖s/m‖²`` and ``Σ⟨g, s⟩/m`` of the brute-force float64 computation."""
    from genbounds.estimators import functional

    gen = torch.Generator().manual_seed(11)
    a, b = torch.randn(37, 29, generator=gen), torch.randn(37, 29, generator=gen)
    whole = float((a.double() * b.double()).sum())
    monkeypatch.setattr(functional, "_DOT_CHUNK", 100)  # 1,073 elements: 10 full chunks and a remainder
    got = functional.dot64(a, b)
    assert got.dtype == torch.float64 and got.dim() == 0 and float(got) == pytest.approx(whole, rel=1e-14)
    grads = [torch.randn(300, generator=gen), torch.randn(7, 5, generator=gen), torch.randn(3, generator=gen)]
    sums = [torch.randn_like(g) * 40 for g in grads]
    m = 17
    diff, mean_sq, cross = functional.against_mean(grads, sums, m)
    r = [s.double() / m for s in sums]
    assert torch.allclose(diff, torch.stack([((g.double() - q) ** 2).sum() for g, q in zip(grads, r)]), rtol=1e-12)
    assert torch.allclose(mean_sq, torch.stack([(q ** 2).sum() for q in r]), rtol=1e-12)
    want = sum(float((g.double() * s.double()).sum()) for g, s in zip(grads, sums)) / m
    assert float(cross) == pytest.approx(want, rel=1e-13)
    assert float(functional.dot(grads, sums)) == pytest.approx(want * m, rel=1e-13)
    # float64 inputs are read, never written (their .double() is the tensor itself)
    g64, s64 = [g.double() for g in grads], [s.double() for s in sums]
    kept = [t.clone() for t in g64 + s64]
    again = functional.against_mean(g64, s64, m)
    assert all(torch.equal(a, b) for a, b in zip(g64 + s64, kept))
    assert torch.allclose(again[0], diff, rtol=1e-12) and float(again[2]) == pytest.approx(float(cross), rel=1e-13)
    # a batch gradient equal to the mean up to 1e-7: the difference taken in float64, not after an fp32 mean
    near = [(s / m).double() + 1e-7 * torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in sums]
    close = functional.against_mean(near, s64, m)[0]
    exact = torch.stack([((a - b.double() / m) ** 2).sum() for a, b in zip(near, s64)])
    assert torch.allclose(close, exact, rtol=1e-9)


def test_row_inner_products_in_float64_with_bounded_copies(monkeypatch):
    """``row_dot64`` (the probes' per-draw inner products): a small stack gives the whole-stack
    float64 expression bit for bit; a stack over the chunk goes row by row through ``dot64``
    (several chunks forced) and equals the float64 brute force."""
    from genbounds.estimators import functional

    gen = torch.Generator().manual_seed(12)
    a, b = torch.randn(3, 11, 7, generator=gen), torch.randn(3, 11, 7, generator=gen)
    want = (a.double() * b.double()).reshape(3, -1).sum(1)
    assert torch.equal(functional.row_dot64(a, b), want)
    monkeypatch.setattr(functional, "_DOT_CHUNK", 50)  # 231 values: row by row, 2 chunks a row
    got = functional.row_dot64(a, b)
    assert got.dtype == torch.float64 and got.shape == (3,) and torch.allclose(got, want, rtol=1e-14, atol=0)
