"""The row ring (``callbacks/dispersion/row_ring.py``): a measured step keeps raw values only and
the logged rows are made for many steps at once — the same records as each step's own row, in
step order, every one of them (a full ring, a batch size that changes, a failing step, a flush),
within its memory bound; and its building blocks against the per-step ones."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from genbounds.callbacks import GradientDispersion
from genbounds.callbacks.dispersion import norm_hooks, row_ring
from genbounds.callbacks.step_log import StepLog
from genbounds.data import DigitsDataModule
from genbounds.estimators.functional import piece_plan, squared_pieces
from genbounds.estimators.ghost_norms import GhostNormHooks
from genbounds.estimators.ghost_norms.step_rows import step_buffer_views
from genbounds.estimators.gradient_dispersion import hook_dispersion_row, hook_dispersion_rows
from genbounds.estimators.piece_blocks import PieceBlocks
from genbounds.models import MLP, Classifier
from helpers import linear_mix, trainer


class _Trainer:
    loggers: list = []


def _fit(tmp_path, ring: bool, monkeypatch, budget: int | None = None, steps: int = 100, **kw):
    """Every record of a fit of the digits MLP (batch 40: each epoch ends on a batch of 37)."""
    with monkeypatch.context() as patch:
        if not ring:
            patch.setattr(norm_hooks.NormHooksBackend, "use_row_ring", lambda self, *a: None)
        if budget is not None:
            patch.setattr(row_ring.RowRing.__init__, "__defaults__", (budget, 64))
        drained: list[int] = []
        real = row_ring.RowRing.drain

        def drain(self) -> None:
            drained.append(self.pending_count())
            real(self)

        patch.setattr(row_ring.RowRing, "drain", drain)
        pl.seed_everything(0, verbose=False)
        disp = GradientDispersion(**kw)
        out: list = []
        disp.add_listener(out.extend)
        trainer(tmp_path, [disp], max_steps=steps, log_every_n_steps=30).fit(
            Classifier(MLP(64, 10, 32), lr=0.05), DigitsDataModule(batch_size=40))
    return out, [d for d in drained if d], disp


# the default; three steps of this MLP (its lent rows and row norms, 960 bytes, and 5 piece norms)
@pytest.mark.parametrize("budget", [None, 3 * (3 * 2 * 40 * 4 + 5 * 4)])
def test_the_ring_logs_each_steps_own_row(tmp_path, monkeypatch, budget):
    """With the ring (steps kept, their rows made at a flush, when the ring is full, or when a
    step of another batch size arrives) the listener gets the records of the per-step path: the
    same steps in the same order, the same values up to the order of float64 sums."""
    want, none, _ = _fit(tmp_path / "a", False, monkeypatch)
    got, drained, disp = _fit(tmp_path / "b", True, monkeypatch, budget)
    assert not none and disp.active_backend == "hooks"
    assert [r.step for r in got] == [r.step for r in want] == list(range(100))
    for a, b in zip(got, want):
        assert a.values.keys() == b.values.keys()
        for k, v in b.values.items():
            assert a.values[k] == pytest.approx(v, rel=1e-12, abs=1e-300), (a.step, k)
    # every step but an epoch's short last batch arriving while steps are pending (read at once)
    assert 100 - 3 <= sum(drained) <= 100
    if budget is None:
        assert max(drained) == 30  # (a flush every 30 steps: before the ring is full at 64)
    else:
        assert max(drained) == 3  # (a full ring)


def test_a_step_that_fails_after_kept_ones_logs_them_and_falls_back(tmp_path, monkeypatch):
    """The hooks fail at step 7 (a problem their checks report): the six steps the ring kept are
    logged, and the step's fallback backend measures from there, as without the ring."""
    real = GhostNormHooks._validated
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        if self.step_buffers is not None:  # the training steps' hooks (not the exactness check's)
            calls["n"] += 1
            if calls["n"] == 8:
                self._problems.append("planted")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GhostNormHooks, "_validated", failing)
    with pytest.warns(UserWarning, match="planted"):
        got, drained, disp = _fit(tmp_path, True, monkeypatch, steps=12)
    assert disp.active_backend != "hooks"
    assert drained[0] == 7 and [r.step for r in got] == [s for s in range(12) if s != 7]


def test_step_log_sources_keep_step_order():
    """A source's pending records count as pending, and are made before a later record and
    before a flush."""

    class Source:
        def __init__(self, log):
            self.log, self.steps = log, []

        def pending_count(self):
            return len(self.steps)

        def drain(self):
            steps, self.steps = self.steps, []
            self.log.record_rows(steps, ("a", "b"), torch.tensor([[s, -s] for s in steps], dtype=torch.float64))

    log = StepLog("t")
    source = Source(log)
    log.add_source(source)
    source.steps = [0, 1, 2]
    assert len(log) == 3
    log.record_row(3, ("a", "b"), torch.tensor([3.0, -3.0], dtype=torch.float64))
    source.steps = list(range(4, 80))  # past the first buffer
    assert len(log) == 80
    got = log.flush(_Trainer())
    assert [(r.step, r.values) for r in got] == [(s, {"a": s, "b": -s}) for s in range(80)]
    log.remove_source(source)
    source.steps = [80]
    assert len(log) == 0 and log.flush(_Trainer()) == []


def test_batched_rows_equal_each_steps_row():
    """``hook_dispersion_rows`` over k steps = ``hook_dispersion_row`` of each."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(512, 784), (512,), (64, 1024), (10, 64), (10,)]
    groups, module_groups, b, scale = [[0, 1], [2], [3, 4]], ((0,), (1,), (2,)), 32, 32.0
    steps = []
    for _ in range(5):
        grads = [torch.randn(*s, generator=gen) / 30 for s in shapes]
        sums = torch.rand(3, generator=gen, dtype=torch.float64) + 1
        steps.append((grads, sums))
    plan = piece_plan(steps[0][0])
    assert plan is not None
    blocks = PieceBlocks(plan.layout)
    assert blocks.block > 1  # (the blocked sum is exercised, not only the piece-by-piece one)
    norms = torch.zeros(5, blocks.width)
    for (grads, _), row in zip(steps, norms.unbind(0)):
        plan.norms_into(grads, *blocks.views_of(row))
    group_sq = blocks.group_sums(norms, groups)
    module_sums = torch.stack([s for _, s in steps])
    got = hook_dispersion_rows(module_sums, module_groups, scale, group_sq, b)
    want = torch.stack([hook_dispersion_row(s, module_groups, scale, g, groups, b) for g, s in steps])
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    # the per-step row's tensor path (a tensor scale: the matrix-vector products) agrees too
    on_maps = torch.stack([hook_dispersion_row(s, module_groups, torch.tensor(scale), g, groups, b) for g, s in steps])
    assert torch.allclose(got, on_maps, rtol=1e-12, atol=0)
    # the kept row holds each piece's norm once, the gaps zero
    row = norms[-1]
    assert torch.equal(row[row != 0].sort().values, squared_pieces(steps[-1][0])[0].sqrt().float().sort().values)
    with pytest.raises(ValueError):
        hook_dispersion_rows(module_sums, module_groups, scale, group_sq, 1)


@pytest.mark.parametrize("mixed", [False, True])
def test_lent_buffers_give_read_sums(mixed):
    """Hooks writing into lent buffers (``step_buffers``) and read by ``read_parts``: their sums,
    made later by ``sums_of`` for two steps at once, are ``read_sums``' of each step — for Linear
    layers only (their rows all made from row norms) and with a normalization layer among them
    (only the Linear rows made; a bias-only Linear; a Linear without bias)."""
    torch.manual_seed(0)
    net = linear_mix(6, 5, 4, 3, mixed)
    xs, ys = [torch.randn(9, 6) for _ in range(2)], [torch.randint(0, 3, (9,)) for _ in range(2)]
    hooks = GhostNormHooks.for_model(net)
    want = []
    for x, y in zip(xs, ys):
        hooks.arm()
        nn.functional.cross_entropy(net(x), y).backward()
        want.append(hooks.read_sums())
        net.zero_grad()
    n = hooks.site_count
    rows, pairs = torch.full((2, n, 9), float("nan")), torch.full((2, 2, n, 9), float("nan"))  # (never zeroed)
    lent = [step_buffer_views(rows[k], pairs[k]) for k in range(2)]
    keys = []
    for k, (x, y) in enumerate(zip(xs, ys)):
        hooks.step_buffers = lambda b, dtype, device, k=k: lent[k]
        hooks.arm()
        nn.functional.cross_entropy(net(x), y).backward()
        sums, deferred = hooks.read_parts()
        assert sums is None and deferred
        keys.append(deferred)
        net.zero_grad()
    assert keys[0] == keys[1]
    got = hooks.sums_of(rows, pairs, keys[0])
    assert torch.allclose(got, torch.stack(want), rtol=1e-6, atol=0)
    hooks.step_buffers = None
    hooks.arm()
    nn.functional.cross_entropy(net(xs[0]), ys[0]).backward()
    sums, deferred = hooks.read_parts()  # its own buffers: read at once, as read_sums
    assert deferred == () and torch.allclose(sums, want[0], rtol=1e-6, atol=0)


def test_the_ring_stays_within_its_budget():
    """Capacity: at most ``budget_bytes`` of lent rows and pair norms, at most ``max_steps``, at
    least one step; nothing lent off the CPU. Then the piece norms narrow it to what fits beside."""
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    hooks = GhostNormHooks.for_model(net)
    log = StepLog("t")
    per_step = 3 * hooks.site_count * 128 * 4
    for budget, want in ((10 * per_step + 5, 10), (per_step // 2, 1), (1 << 30, 64)):
        ring = row_ring.RowRing(hooks, log, ("a",), budget_bytes=budget)
        assert ring.lend(128, torch.float32, torch.device("cpu")) is not None
        assert ring.capacity == want and ring.lent == 0
        assert ring.lend(128, torch.float32, torch.device("meta")) is None and ring.lent is None
        ring.close()


def test_piece_norms_count_against_the_budget():
    """The first kept step's piece norms narrow the ring to the steps whose lent buffers and piece
    norms fit the budget together (here 2 of 10); the ring is then full at two steps."""
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    hooks = GhostNormHooks.for_model(net)
    log = StepLog("t")
    names = ("grad/norm_sq", "grad/trace_cov", "grad/dispersion", "grad/dispersion/layer/0",
             "grad/dispersion/layer/2")
    per_step = 3 * hooks.site_count * 8 * 4
    grads = [torch.randn(4096), torch.randn(5), torch.randn(15), torch.randn(3)]  # 4 + 3 pieces
    budget = 10 * per_step + 2 * 7 * 4 + 3
    ring = row_ring.RowRing(hooks, log, names, budget_bytes=budget)
    assert ring.lend(8, torch.float32, torch.device("cpu")) is not None and ring.capacity == 10
    ring._rows.fill_(1.0)
    assert ring.keep(0, (), 8.0, 8, grads, ((0,), (1,)), [[0, 1], [2, 3]])
    assert ring.capacity == (budget - 10 * per_step) // (7 * 4) == 2
    assert ring.lend(8, torch.float32, torch.device("cpu")) is not None and ring.lent == 1
    assert ring.keep(1, (), 8.0, 8, grads, ((0,), (1,)), [[0, 1], [2, 3]])  # full: made
    assert ring.pending_count() == 0 and len(log) == 2
    ring.close()


def test_weights_used_outside_their_modules_warn_and_fall_back(tmp_path):
    """From step 2 on, the model applies its Linear weights with ``F.linear``: the hooks record no
    call, yet the weights get gradients. The step is not taken for one without a backward (the
    ghost hooks count only a backward that reached a recorded call), nor given the last step's
    values: it is read, warns and falls back, and the other steps are logged. (Before the shared
    hooks' cache was cleared at each arm, it logged only step 0.) The switch is by step, not by
    forward count: the checks before step 0 run forwards of their own."""

    class Switch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c, self.step = nn.Linear(64, 32), nn.Linear(32, 10), -1

        def forward(self, x):
            if self.step < 2:
                return self.c(torch.tanh(self.a(x)))
            h = torch.tanh(nn.functional.linear(x, self.a.weight, self.a.bias))
            return nn.functional.linear(h, self.c.weight, self.c.bias)

    class SetStep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            pl_module.network.step = trainer.global_step

    pl.seed_everything(0, verbose=False)
    disp = GradientDispersion(backend="auto")
    out: list = []
    disp.add_listener(out.extend)
    with pytest.warns(UserWarning,
                      match="not through the outputs the hooks read|received gradient but no recorded forward"):
        trainer(tmp_path, [SetStep(), disp], max_steps=12).fit(Classifier(Switch(), lr=0.05),
                                                                DigitsDataModule(batch_size=32))
    steps = [r.step for r in out]  # every step but the one that fell back (its window is incomplete)
    assert disp.active_backend != "hooks" and len(steps) == 11 and steps == sorted(set(steps)) and steps[-1] == 11


def test_gradients_that_require_grad_leave_the_piece_plan_usable():
    """``squared_pieces(reuse=True)`` on tensors that carry a graph (a gradient taken with
    ``create_graph``): the same values as on detached ones, and the kept plan serves both."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(64, 1024), (64,), (10, 64), (10,)]
    plain = [torch.randn(*s, generator=gen) for s in shapes]
    graph = [(t.clone().requires_grad_() * 1.0) for t in plain]
    want = squared_pieces(plain)[0].clone()
    for tensors in (graph, plain, graph):
        got, _ = squared_pieces(tensors, reuse=True)
        assert not got.requires_grad and torch.equal(got, want)


def test_a_ring_closed_while_its_drain_fails_warns_and_stops_lending(monkeypatch):
    """``close`` runs in ``on_exception`` too: a drain that fails there (out of memory, say) drops
    the kept steps with one warning naming how many, instead of raising over the run's own error;
    the hooks get their own buffers back and the step log loses its source."""
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    hooks = GhostNormHooks.for_model(net)
    log = StepLog("t")
    ring = row_ring.RowRing(hooks, log, ("a", "b", "c", "d", "e"))
    hooks.step_buffers = ring.lend
    grads = [torch.randn(30), torch.randn(5), torch.randn(15), torch.randn(3)]
    groups = [[0, 1], [2, 3]]  # (the same object each step, as the callback's: else a new key)
    for step in range(2):
        assert ring.lend(8, torch.float32, torch.device("cpu")) is not None
        assert ring.keep(step, (), 8.0, 8, grads, ((0,), (1,)), groups)
    assert ring.pending_count() == 2

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(row_ring, "hook_dispersion_rows", boom)
    with pytest.warns(UserWarning, match="rows of 2 measured step"):
        ring.close()
    assert hooks.step_buffers is None and len(log) == 0 and ring.pending_count() == 0
