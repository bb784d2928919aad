"""Estimators of SPEC §3–§5 against closed forms (quadratic loss, linear regression) and PyHessian."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genbounds.estimators.contractivity import contractivity, contractivity_exact
from genbounds.estimators.flatness import gaussian_flatness
from genbounds.estimators.gradient_sensitivity import gradient_sensitivity
from genbounds.estimators.hessian_eigenvalue import top_eigenvalue
from genbounds.estimators.hessian_trace import hutchinson_trace
from genbounds.estimators.hessian_vector_product import LossHessian, rademacher_like
from genbounds.estimators.perturbation import standard_normal
from genbounds.estimators.weighted_dispersion import hessian_weighted_dispersion
from helpers import unit_sphere_regression


class Quadratic(nn.Module):
    """``ℓ(w, z) = ½ wᵀAw − zᵀw``: every sample has Hessian ``A``; gradients differ by ``z``."""

    def __init__(self, a: Tensor, w0: Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w0.clone())

    def per_sample_loss(self, z: Tensor) -> Tensor:
        return 0.5 * self.w @ self.a @ self.w - z @ self.w


def quad_loss(module: nn.Module, batch: Tensor) -> Tensor:
    return module.per_sample_loss(batch)


def make_quadratic(d: int = 8, seed: int = 0) -> tuple[Quadratic, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    eig = torch.linspace(0.2, 3.0, d)
    a = q @ torch.diag(eig) @ q.T
    a = 0.5 * (a + a.T)
    model = Quadratic(a, torch.randn(d, generator=gen))
    z = torch.randn(64, d, generator=gen)
    return model, z


def lin_loss(module: nn.Module, batch) -> Tensor:
    x, y = batch
    return 0.5 * (module(x).squeeze(-1) - y.squeeze(-1)) ** 2


def ce_loss(module: nn.Module, batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def params_snapshot(m: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def assert_same(m: nn.Module, snap: list[Tensor]) -> None:
    assert all(torch.equal(p, s) for p, s in zip(m.parameters(), snap))


# ---------------------------------------------------------------- HVP
@pytest.mark.parametrize("method,vectorize", [("reverse", False), ("reverse", True), ("forward", True)])
def test_hvp_matches_the_full_hessian(method, vectorize):
    model = tiny_mlp()
    torch.manual_seed(1)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def flat_loss(flat: Tensor) -> Tensor:
        parts, start = {}, 0
        for (name, _), shape, size in zip(model.named_parameters(), shapes, sizes):
            parts[name] = flat[start : start + size].view(shape)
            start += size
        out = torch.func.functional_call(model, parts, (x,))
        return F.cross_entropy(out, y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    full = torch.autograd.functional.hessian(flat_loss, flat)
    snap = params_snapshot(model)
    op = LossHessian(model, ce_loss, (x, y), method=method, vectorize=vectorize)
    vs = [torch.randn(3, *s) for s in shapes]
    hv = op.hvp_batched(vs)
    for j in range(3):
        v = torch.cat([t[j].reshape(-1) for t in vs])
        expected = full @ v
        got = torch.cat([t[j].reshape(-1) for t in hv])
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    single = torch.cat([t.reshape(-1) for t in op.hvp([t[0] for t in vs])])
    assert torch.allclose(single, full @ torch.cat([t[0].reshape(-1) for t in vs]), rtol=1e-5, atol=1e-6)
    # a block of one vector (the CPU's default block) and the looped block: each product as hvp gives it
    one = op.hvp_batched([t[:1] for t in vs])
    assert all(o.shape == (1, *s) for o, s in zip(one, shapes))
    assert torch.allclose(torch.cat([t[0].reshape(-1) for t in one]), single, rtol=1e-6, atol=1e-7)
    if not vectorize:
        for j in range(3):
            each = op.hvp([t[j] for t in vs])
            assert all(torch.equal(h[j], e) for h, e in zip(hv, each))
    assert all(p.grad is None for p in model.parameters())  # nothing written into .grad
    assert_same(model, snap)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rademacher_draws_are_those_of_int64_bits(dtype):
    """The signs drawn in the parameter's dtype equal the int64-bits draw they replaced, value for
    value, and leave the generator where it left it (the same probes as before the change)."""
    params = [torch.zeros(3, 1025, dtype=dtype), torch.zeros(7, dtype=dtype)]
    g_new, g_ref = gen(5), gen(5)
    got = rademacher_like(params, 4, g_new)
    for p, v in zip(params, got):
        ref = (torch.randint(0, 2, (4, *p.shape), generator=g_ref) * 2 - 1).to(dtype)
        assert v.dtype == dtype and torch.equal(v, ref)
    assert set(torch.cat([v.flatten().float() for v in got]).unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(g_new.get_state(), g_ref.get_state())

# ---------------------------------------------------------------- Hutchinson trace
def test_hutchinson_linear_regression_unit_inputs_trace_is_one():
    x, y = unit_sphere_regression(128, 20)
    model = nn.Linear(20, 1, bias=False)
    est = hutchinson_trace(LossHessian(model, lin_loss, (x, y)), gen(0), rel_tol=0.02, max_probes=500)
    assert abs(est.value - 1.0) < 3 * est.standard_error
    assert est.standard_error < 0.03 and est.num_probes >= 10


def test_hutchinson_standard_error_coverage_is_nominal():
    """Over repeated seeds, |estimate − 1| < 1.96·SE about 95 % of the time (stopping rule on)."""
    x, y = unit_sphere_regression(64, 12, seed=3)
    model = nn.Linear(12, 1, bias=False)
    op = LossHessian(model, lin_loss, (x, y))
    reps, hits, ratios = 400, 0, []
    for seed in range(reps):
        est = hutchinson_trace(op, gen(seed), rel_tol=0.1, min_probes=10, max_probes=200)
        hits += abs(est.value - 1.0) < 1.96 * est.standard_error
        ratios.append(est.standard_error)
    coverage = hits / reps
    assert 0.90 <= coverage <= 0.99, coverage


def test_hutchinson_absolute_floor_stops_near_zero_trace():
    """A Hessian with trace ≈ 0 (indefinite, symmetric spectrum) stops on the SE floor."""
    d = 10
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(0)))
    a = q @ torch.diag(torch.linspace(-1, 1, d)) @ q.T
    model = Quadratic(0.5 * (a + a.T), torch.zeros(d))
    est = hutchinson_trace(LossHessian(model, quad_loss, torch.zeros(4, d)), gen(1), rel_tol=0.05, abs_tol=0.5,
                           max_probes=1000)
    assert est.num_probes < 1000 and abs(est.value) < 3 * est.standard_error + 1e-6


def test_trace_agrees_with_pyhessian_within_5_percent():
    from pyhessian import hessian as PyHessian

    model = tiny_mlp(2)
    torch.manual_seed(5)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    ours = hutchinson_trace(LossHessian(model, ce_loss, (x, y)), gen(0), rel_tol=0.005, max_probes=4000,
                            block_size=200)
    torch.manual_seed(0)  # PyHessian draws from the global RNG
    samples = PyHessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace(maxIter=3000, tol=0.0)
    theirs = sum(samples) / len(samples)
    assert len(samples) == 3000  # tol=0 keeps PyHessian 0.1 from its early exit
    assert ours.value == pytest.approx(theirs, rel=0.05)


# ---------------------------------------------------------------- eigenvalue
def test_power_iteration_finds_top_eigenvalue_and_warm_start_helps():
    model, z = make_quadratic(10)
    op = LossHessian(model, quad_loss, z)
    cold = top_eigenvalue(op, gen(0), tol=1e-8, max_iter=2000)
    assert cold.value == pytest.approx(3.0, rel=1e-4) and cold.converged
    init = [3.0 * t for t in cold.vector]  # (not of norm 1: normalizing it in place would show)
    kept = [t.clone() for t in init]
    warm = top_eigenvalue(op, gen(1), init=init, tol=1e-8, max_iter=2000)
    assert warm.iterations < cold.iterations and warm.residual < 1e-2
    # the iteration normalizes its own products in place, never the caller's warm start
    assert all(torch.equal(a, b) for a, b in zip(init, kept))
    # the residual ‖Hv − λv‖ of the returned pair, recomputed
    hv = op.hvp(warm.vector)
    assert warm.residual == pytest.approx(
        math.sqrt(sum(float(((h - warm.value * x) ** 2).double().sum()) for h, x in zip(hv, warm.vector))),
        rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- flatness
@pytest.mark.parametrize("draws_per_pass", [1, 16])
def test_flatness_of_a_quadratic_is_half_sigma_squared_trace(draws_per_pass):
    model, z = make_quadratic(8)
    snap = params_snapshot(model)
    sigmas = [0.05, 0.3, 1.0]
    est = gaussian_flatness(model, quad_loss, z[:32], sigmas, 400, gen(0), heldout_batch=z[32:],
                            draws_per_pass=draws_per_pass)
    tr = float(torch.trace(model.a))
    for s, m, se in zip(sigmas, est.train, est.train_se):
        assert abs(m - 0.5 * s * s * tr) < 3 * se, (s, m, se)
        assert se > 0
    # same Hessian on both data sets: the flatness term is exactly 0 draw by draw
    assert all(abs(t) < 1e-6 * max(1.0, abs(m)) for t, m in zip(est.term, est.train))
    # common random numbers: the per-draw increments scale exactly with σ²
    inc = est.increments["train"]
    assert torch.allclose(inc[1] / inc[0], torch.full_like(inc[0], (0.3 / 0.05) ** 2), rtol=1e-3)
    assert_same(model, snap)


def test_flatness_term_se_uses_paired_draws():
    torch.manual_seed(0)
    model = tiny_mlp(1)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    est = gaussian_flatness(model, ce_loss, (x[:32], y[:32]), [0.1], 200, gen(0), heldout_batch=(x[32:], y[32:]))
    unpaired = math.hypot(est.train_se[0], est.heldout_se[0])
    assert est.term_se[0] < unpaired  # positive correlation of the two sets' increments


@pytest.mark.parametrize("dtype", [None, torch.float64, torch.bfloat16, torch.float16])
def test_shifted_points_in_place_equal_the_expression_bit_for_bit(dtype):
    """``PerturbedLoss.shifted`` builds ``w + s·ε`` in the points' own storage (and, with ``out``,
    in a set of points of an earlier call): the bits of ``base + s·ε``, for a float and a tensor
    scale, block shapes, and a base wider than the directions (kept as the expression)."""
    from genbounds.estimators.perturbation import PerturbedLoss

    torch.manual_seed(0)
    model = tiny_mlp(1)
    fn = PerturbedLoss(model, ce_loss, dtype)
    eps = standard_normal(fn.base, 3, gen(2))
    shape = {fn.names[0]: 0.25}
    reused = None
    for scale in (0.37, -0.37, torch.tensor(1e-3, dtype=torch.float64), torch.tensor(0.2)):
        for blocks in (None, shape):
            want = {k: fn.base[k].unsqueeze(0) + (scale if blocks is None else scale * blocks.get(k, 1.0)) * eps[k]
                    for k in fn.names}
            fresh = fn.shifted(eps, scale, shape=blocks)
            reused = fn.shifted(eps, scale, shape=blocks, out=reused)
            for k in fn.names:
                assert torch.equal(fresh[k], want[k]) and torch.equal(reused[k], want[k]), (scale, blocks, k)
    narrow = {k: v.to(torch.bfloat16) for k, v in eps.items()}
    wide = PerturbedLoss(model, ce_loss, torch.float64)
    for given in (None, {k: torch.empty_like(v) for k, v in narrow.items()}):  # (out= of the narrow dtype)
        got = wide.shifted(narrow, 0.5, out=given)
        assert all(got[k].dtype == torch.float64 and torch.equal(got[k], wide.base[k] + 0.5 * narrow[k])
                   for k in wide.names)


def test_flatness_evaluates_every_point_in_one_set_of_storage(monkeypatch):
    """w + σε and w − σε, for every σ and both data sets, are built in one set of points (the
    probe holds the draws and one perturbed copy of the weights, not two): every loss evaluation
    of a pass sees the same storage."""
    from genbounds.estimators.perturbation import PerturbedLoss

    seen: list[tuple[int, ...]] = []
    original = PerturbedLoss.losses_at

    def recording(self, points, batch):
        seen.append(tuple(v.data_ptr() for v in points.values()))
        return original(self, points, batch)

    monkeypatch.setattr(PerturbedLoss, "losses_at", recording)
    torch.manual_seed(0)
    model = tiny_mlp(1)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    gaussian_flatness(model, ce_loss, (x[:32], y[:32]), [0.1, 0.2], 2, gen(0), heldout_batch=(x[32:], y[32:]),
                      draws_per_pass=2)
    assert len(seen) == 2 * 2 * 2 and len(set(seen)) == 1


# ---------------------------------------------------------------- gradient sensitivity
def test_sensitivity_of_a_quadratic_is_sigma_squared_trace_of_h_squared():
    model, z = make_quadratic(8, seed=2)
    snap = params_snapshot(model)
    sigmas = [0.0, 0.1, 0.5]
    est = gradient_sensitivity(model, quad_loss, z, sigmas, 300, gen(0))
    tr2 = float(torch.trace(model.a @ model.a))
    assert est.value[0] == 0.0
    for s, m, se in zip(sigmas[1:], est.value[1:], est.standard_error[1:]):
        assert abs(m - s * s * tr2) < 3 * se, (s, m, se)
    assert_same(model, snap)


def test_half_split_removes_the_fixed_batch_bias():
    """Linear regression: per-sample Hessians x xᵀ differ from their mean, so the naive
    ‖ĝ(w) − ĝ(w+ξ)‖² on one batch is biased up; the half-split product is not."""
    d, sigma = 20, 0.5  # bias σ²(1 − 1/d)/m vs truth σ²/d: the naive estimate is ≈ 2.2× too large
    x, y = unit_sphere_regression(4000, d, seed=9)
    model = nn.Linear(d, 1, bias=False)
    h_pop = (x.T @ x / x.shape[0]).double()  # population Hessian (of the pool)
    truth = sigma**2 * float(torch.trace(h_pop @ h_pop))
    g = gen(0)
    split, naive = [], []
    for rep in range(60):
        idx = torch.randperm(4000, generator=g)[:16]
        est = gradient_sensitivity(model, lin_loss, (x[idx], y[idx]), [sigma], 50, g)
        split.append(est.value[0])
        hb = (x[idx].T @ x[idx] / 16).double()
        naive.append(sigma**2 * float(torch.trace(hb @ hb)))  # E_ξ of the naive estimator
    mean_split = sum(split) / len(split)
    se_split = torch.tensor(split).std().item() / math.sqrt(len(split))
    assert abs(mean_split - truth) < 3 * se_split
    assert sum(naive) / len(naive) > 1.5 * truth  # the bias the half split avoids


def test_sensitivity_with_parameters_whose_gradients_autograd_shares(monkeypatch):
    """A loss that reads the sum of two parameters (autograd hands both the same gradient tensor)
    and one parameter through ``.sum()`` (its gradient an expanded view). The in-place differences
    (``_minus_into``) leave such tensors alone, and the estimate equals the out-of-place one bit
    for bit, draw by draw (it did not when the shared one was written twice; the expanded one
    raised)."""
    import genbounds.estimators.gradient_sensitivity as gs

    got = gradient_sensitivity(_SharedAndExpanded(), _shared_loss, _shared_batch(), [0.3], 6, gen(0),
                               draws_per_pass=1)
    monkeypatch.setattr(gs, "_minus_into", lambda g, gp, names: {k: g[k].unsqueeze(0) - gp[k] for k in names})
    want = gradient_sensitivity(_SharedAndExpanded(), _shared_loss, _shared_batch(), [0.3], 6, gen(0),
                                draws_per_pass=1)
    assert torch.equal(got.samples, want.samples) and got.value[0] != 0.0


class _SharedAndExpanded(nn.Module):
    """A loss that reads ``a + b`` (autograd hands both one gradient tensor) and ``c.sum()`` (its
    gradient an expanded view, stride 0): results no in-place op may write."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(1)))
        self.b = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(2)))
        self.c = nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(3)))
        self.d = nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(6)))

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.a + self.b) + (x * x) @ self.d + self.c.sum() ** 2


def _shared_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return 0.5 * (module(x) - y) ** 2


def _shared_batch() -> tuple[Tensor, Tensor]:
    return (torch.randn(16, 5, generator=torch.Generator().manual_seed(4)),
            torch.randn(16, generator=torch.Generator().manual_seed(5)))


def test_writable_in_place_leaves_shared_and_expanded_results_alone():
    from genbounds.estimators.functional import writable_in_place

    model = _SharedAndExpanded()
    loss = _shared_loss(model, _shared_batch()).mean()
    ga, gb, gc, gd = torch.autograd.grad(loss, [model.a, model.b, model.c, model.d])
    assert ga.untyped_storage().data_ptr() == gb.untyped_storage().data_ptr() and 0 in gc.stride()
    assert writable_in_place([ga, gb, gc, gd]) == [False, False, False, True]
    assert writable_in_place([torch.zeros(1, 4).expand(1, 4), torch.zeros(4, 1).expand(4, 1)]) == [True, True]
    # disjoint views of one buffer (reduce_all's output under DDP) are each writable; overlapping
    # ones (by one element, or one inside another) are not, and neither is what they overlap
    buf = torch.zeros(30)
    assert writable_in_place([buf[:5], buf[5:12].view(7, 1), buf[12:20]]) == [True, True, True]
    assert writable_in_place([buf[:6], buf[5:9], buf[9:12]]) == [False, False, True]
    assert writable_in_place([buf[20:30], buf[:10], buf[22:24], buf[25:27]]) == [False, True, False, False]


@pytest.mark.parametrize("method,reduce", [("reverse", None), ("forward", None), ("reverse", "views")])
def test_power_iteration_with_shared_and_expanded_products(monkeypatch, method, reduce):
    """The in-place normalization divides each storage once and writes no expanded view: the
    eigenvalue, residual and vector equal the out-of-place iteration's bit for bit (a shared
    product divided twice gave 8.38 for 12.45 and called it converged; an expanded one raised).
    ``views``: products returned as views of one buffer, as ``reduce_all`` returns them under DDP
    (an identity reduction here)."""
    import genbounds.estimators.hessian_eigenvalue as he

    op = LossHessian(_SharedAndExpanded(), _shared_loss, _shared_batch(), method=method,
                     reduce=(lambda flat: flat) if reduce == "views" else None)
    got = top_eigenvalue(op, gen(0), tol=1e-10, max_iter=500)
    original = he._normalized
    monkeypatch.setattr(he, "_normalized", lambda v, in_place=False: original(v))
    want = top_eigenvalue(op, gen(0), tol=1e-10, max_iter=500)
    assert got.value == want.value and got.residual == want.residual and got.iterations == want.iterations
    assert all(torch.equal(a, b) for a, b in zip(got.vector, want.vector))
    # an eigenpair, whether or not the iteration met its 1e-10 tolerance: the fp32 Rayleigh
    # quotient's last bits go on moving on some CPUs (an AMD EPYC's kernels, round 33; residual 1.4e-6)
    assert got.residual < 1e-4 * abs(got.value) and got.iterations >= 2


# ---------------------------------------------------------------- contractivity
def test_contractivity_of_a_quadratic_matches_closed_form():
    model, z = make_quadratic(8, seed=4)
    snap = params_snapshot(model)
    a, w = model.a.double(), model.w.detach().double()
    zbar = z.double().mean(0)
    g = a @ w - zbar
    exact = float(g @ a @ g / (g @ g))
    assert contractivity_exact(LossHessian(model, quad_loss, z)) == pytest.approx(exact, rel=1e-5)
    # finite differences at K points on the unit sphere: exact for a quadratic, point by point
    g_state = gen(7)
    replay = torch.Generator().set_state(g_state.get_state())
    est = contractivity(model, quad_loss, z, g_state, radius=1.0, eta=1e-3, num_points=20, points_per_pass=20)
    u = standard_normal({"w": model.w.detach()}, 20, replay)["w"].double()
    u = u / u.norm(dim=1, keepdim=True)
    expected = []
    for k in range(20):
        gk = a @ (w + u[k]) - zbar
        expected.append(float(gk @ a @ gk / (gk @ gk)))
    assert torch.allclose(est.values, torch.tensor(expected, dtype=torch.float64), rtol=1e-3)
    assert est.minimum == pytest.approx(min(expected), rel=1e-3)
    assert_same(model, snap)


# ---------------------------------------------------------------- weighted dispersion
def test_weighted_dispersion_formula_on_a_quadratic():
    model, z = make_quadratic(6, seed=5)
    hess = LossHessian(model, quad_loss, z[:8])  # H = A on any batch
    k = 4
    est = hessian_weighted_dispersion(model, quad_loss, z[16:48], hess, num_chunks=k)
    a = model.a.double()
    zc = z[16:48].double().view(k, 8, -1).mean(1)  # h_j = A w − z̄_j
    dev = zc - zc.mean(0)
    expected = float(sum(d @ a @ d for d in dev)) / (k * (k - 1))
    assert est.value == pytest.approx(expected, rel=1e-5)
    assert est.standard_error > 0


def test_functional_loss_moves_every_name_of_a_tied_parameter():
    # the probes' functional calls skip functional_call's per-call tie search: the names of a tied
    # parameter are found once (tied_names) and all get the new value — as if the weights were written
    from torch import nn

    from genbounds.estimators.functional import functional_loss, tied_names, trainable_parameters

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.out(self.emb(x))

    torch.manual_seed(0)
    model, x = Tied(), torch.randint(0, 10, (6,))
    loss = lambda m, b: nn.functional.cross_entropy(m(b), b, reduction="none")  # noqa: E731
    assert tied_names(model) == {"emb.weight": ["emb.weight", "out.weight"]}
    shifted = {k: v.detach() + 0.1 for k, v in trainable_parameters(model).items()}
    got = functional_loss(model, loss)(shifted, x)
    with torch.no_grad():
        saved = model.emb.weight.clone()
        model.emb.weight.add_(0.1)  # both uses see it: the true perturbed loss
        want = loss(model, x)
        model.emb.weight.copy_(saved)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, loss(model, x).detach())  # and it did move


def test_one_point_gradient_by_autograd_equals_torch_func_and_falls_back_where_autograd_cannot():
    """PerturbedLoss takes a one-point gradient by plain autograd (cheaper per call than
    torch.func.grad, which the stacked path keeps): the same numbers; under inference mode, and
    for a loss cut from the weights, what torch.func.grad gives."""
    from torch import nn

    from genbounds.estimators.perturbation import PerturbedLoss

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(11, 5), torch.randint(0, 3, (11,))

    def per_sample(module, batch):
        return nn.functional.cross_entropy(module(batch[0]), batch[1], reduction="none")

    fn = PerturbedLoss(net, per_sample)
    point = {k: v + 0.01 for k, v in fn.base.items()}
    plain = fn.gradient(point, (x, y))
    reference = fn._transformed_gradient(point, (x, y))
    for k in plain:
        assert torch.allclose(plain[k], reference[k], rtol=1e-6, atol=1e-7), k
    with torch.inference_mode():
        inside = fn.gradient(point, (x, y))
    for k in plain:
        assert torch.allclose(inside[k], reference[k], rtol=1e-6, atol=1e-7), k
    cut = PerturbedLoss(net, lambda module, batch: per_sample(module, batch).detach())
    assert all(float(g.abs().sum()) == 0.0 for g in cut.gradient(point, (x, y)).values())
