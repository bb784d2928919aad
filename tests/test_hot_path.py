"""The every-step path's building blocks against brute force: the CPU squared norms without a
float64 copy, the step log's run-long buffer, and the norm hooks kept armed between measured steps."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from genbounds.callbacks import GradientDispersion
from genbounds.callbacks.step_log import StepLog
from genbounds.data import DigitsDataModule
from genbounds.estimators.functional import (
    grouped_sq_norms,
    per_tensor_sq_norms,
    row_sq_norms,
    sq_norm,
    squared_pieces,
)
from genbounds.estimators.ghost_norms import GhostNormHooks
from genbounds.estimators.gradient_dispersion import (
    GradientMoments,
    dispersion_from_moments,
    dispersion_row,
    hook_dispersion_row,
)
from genbounds.models import MLP, Classifier
from helpers import trainer


def _brute(tensors):
    return torch.stack([(t.double() ** 2).sum() for t in tensors])


@pytest.mark.parametrize("shapes", [[(512, 784), (512,), (512, 512), (10, 512), (10,)],
                                    [(3, 40000), (32768,), (50000,), (0,), (1,)],
                                    [(64, 3, 3, 3), (7, 1023), (2, 2049)]])
def test_cpu_squared_norms_match_float64_brute_force(shapes):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(*s, generator=gen) * 10 ** torch.randint(-3, 3, (), generator=gen).item() for s in shapes]
    got, want = per_tensor_sq_norms(tensors), _brute(tensors)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=2e-7, atol=0)
    assert sq_norm(tensors).item() == pytest.approx(want.sum().item(), rel=2e-7)
    # float64 and half inputs take the fused path (no precision is lost for them)
    doubles = [t.double() for t in tensors]
    assert torch.allclose(per_tensor_sq_norms(doubles), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shapes", [[(512, 784), (512,), (512, 512), (10, 512), (10,)],
                                    [(3, 40000), (1024,), (2048,), (0,), (1,), (1023,), (1025,)]])
def test_grouped_squared_norms_match_float64_brute_force(shapes):
    """The per-step ``‖ḡ_k‖²``/``‖ḡ‖²``: fp32 norms of ≤ 1,024-element pieces, summed per group in
    float64 — every piece size, an empty tensor, a non-contiguous one, a tensor in no group."""
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(*s, generator=gen) * 10 ** torch.randint(-3, 3, (), generator=gen).item() for s in shapes]
    tensors[0] = tensors[0].t() if tensors[0].dim() == 2 else tensors[0]  # non-contiguous
    tensors[2].requires_grad_()  # (detached where read; gradients usually are not)
    groups = [[0, 2], [1], list(range(3, len(tensors) - 1))]  # the last tensor belongs to no group
    want = _brute(tensors)
    got = grouped_sq_norms(tensors, groups)
    assert got.dtype == torch.float64 and got.shape == (len(groups) + 1,) and not got.requires_grad
    expected = torch.stack([want[g].sum() for g in groups] + [want.sum()])
    assert torch.allclose(got, expected, rtol=2e-7, atol=1e-300)
    doubles = grouped_sq_norms([t.double() for t in tensors], groups)  # the fused float64 path
    assert torch.allclose(doubles, expected, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("shapes", [[(512, 784), (512,), (10, 512), (10,)], [(3, 40000), (1024,), (1023,), (5,)]])
def test_squared_pieces_into_work_buffers_equal_the_fresh_ones(shapes):
    """``squared_pieces(reuse=True)`` (the per-step path: norms written into kept buffers, squared
    exactly into float64 by one ``addcmul``) gives the fresh path's values bit for bit, in the same
    buffer from step to step, and a new layout its own."""
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(*s, generator=gen) for s in shapes]
    tensors[0] = tensors[0].t()  # non-contiguous: its remainder joins the small tensors
    want, layout = squared_pieces(tensors)
    got, got_layout = squared_pieces(tensors, reuse=True)
    assert got_layout == layout and got.dtype == torch.float64 and torch.equal(got, want)
    again, _ = squared_pieces([t * 2 for t in tensors], reuse=True)
    assert again.data_ptr() == got.data_ptr() and torch.equal(again, want * 4)
    other, _ = squared_pieces(tensors[1:], reuse=True)
    assert other.data_ptr() != again.data_ptr() and torch.equal(other, squared_pieces(tensors[1:])[0])


def test_the_kept_piece_plan_gives_the_general_paths_values():
    """The per-step path keeps a plan for one list of shapes (``functional._PiecePlan``): a later
    step with those shapes runs it — same buffer, the general path's values bit for bit — and a
    step it does not fit (another shape, a non-contiguous tensor, a float64 tensor, a tensor that
    requires gradient) gets the right values too."""
    from genbounds.estimators import functional

    gen = torch.Generator().manual_seed(5)
    shapes = [(512, 784), (512,), (64, 1024), (10, 64), (10,)]
    tensors = [torch.randn(*s, generator=gen) for s in shapes]
    want, layout = squared_pieces(tensors)
    first, first_layout = squared_pieces(tensors, reuse=True)
    plan = functional._PIECE_PLAN[0]
    assert plan is not None and plan.fits(tensors) and first_layout == layout and torch.equal(first, want)
    halves = [t / 2 for t in tensors]
    again, again_layout = squared_pieces(halves, reuse=True)
    assert functional._PIECE_PLAN[0] is plan and again_layout is plan.layout
    assert again.data_ptr() == first.data_ptr() and torch.equal(again, squared_pieces(halves)[0])
    for other, fits in (([t.t() if t.dim() == 2 else t for t in tensors], False),  # not contiguous
                        ([tensors[0].double(), *tensors[1:]], False),  # another dtype
                        ([tensors[0][:-1], *tensors[1:]], False),  # another shape
                        ([tensors[0].clone().requires_grad_(), *tensors[1:]], True)):  # detached in the plan
        assert plan.fits(other) == fits
        got, got_layout = squared_pieces(other, reuse=True)
        fresh, fresh_layout = squared_pieces(other)
        assert got_layout == fresh_layout and torch.equal(got, fresh)


def test_the_fused_hook_row_follows_a_new_batch_size_and_groups():
    """:func:`hook_dispersion_row` keeps the last step's maps for the same objects: a new batch
    size, or groups of another content, get maps of their own."""
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(64, 1024, generator=gen) / 40, torch.randn(64, generator=gen) / 40,
             torch.randn(10, 64, generator=gen) / 40, torch.randn(10, generator=gen) / 40]
    module_sums = torch.rand(2, generator=gen, dtype=torch.float64) + 2.0
    module_groups = ((0,), (1,))
    groups = [[0, 1], [2, 3]]
    regrouped = [[0, 1, 2], [3]]  # another list of another content, the modules' groups unchanged
    for b, grouping in ((16, groups), (16, groups), (5, groups), (5, regrouped), (5, [[0, 1, 2, 3], []])):
        mg = ((0, 1), ()) if len(grouping[1]) == 0 else module_groups
        group_sq = torch.stack([module_sums[list(m)].sum() for m in mg]) * 9.0
        want = dispersion_row(group_sq, grouped_sq_norms(grads, grouping)[:-1], b, b)
        for scale in (3.0, torch.tensor(3.0)):  # (on the host; the kept maps)
            got = hook_dispersion_row(module_sums, mg, scale, grads, grouping, b)
            assert torch.allclose(got, want, rtol=1e-12, atol=0), (b, got, want)


@pytest.mark.parametrize("b", [2, 7, 128])
def test_dispersion_row_equals_the_moments_formula(b):
    """The one-vector form logged every step equals :func:`dispersion_from_moments` value by value."""
    gen = torch.Generator().manual_seed(b)
    group_sq = torch.rand(4, generator=gen, dtype=torch.float64) * 50 + 1
    group_mean = torch.rand(4, generator=gen, dtype=torch.float64) * group_sq / b  # S_k ≥ b‖ḡ_k‖²
    est = dispersion_from_moments(GradientMoments(group_sq.sum(), b, b, group_sq=group_sq), group_mean.sum(), group_mean)
    row = dispersion_row(group_sq, group_mean, b, b)
    want = torch.cat([torch.stack([est.norm_sq, est.trace_cov, est.dispersion]), est.group_dispersion])
    assert torch.allclose(row, want, rtol=1e-12, atol=0)
    assert row[3:].sum().item() == pytest.approx(row[2].item(), rel=1e-13)
    with pytest.raises(ValueError):
        dispersion_row(group_sq, group_mean, 1, 1)


@pytest.mark.parametrize("scale", [7.0, "tensor"])
@pytest.mark.parametrize("shapes", [[(512, 784), (512,), (10, 512), (10,)], [(3, 5), (5,), (4, 3)]])
def test_the_fused_hook_row_equals_the_grouped_path(shapes, scale):
    """:func:`hook_dispersion_row` (the norm hooks' per-step path: module sums and the gradient's
    pieces folded into two cached maps) = ``dispersion_row`` of the scaled group sums and
    :func:`grouped_sq_norms` — split pieces (fp32 CPU), whole tensors (float64), a tensor scale
    (AMP), modules listed out of group order."""
    gen = torch.Generator().manual_seed(len(shapes))
    b = 16
    for dtype in (torch.float32, torch.float64):
        grads = [torch.randn(*sh, generator=gen, dtype=dtype) / 40 for sh in shapes]
        groups = [[0, 1], [2, 3]] if len(shapes) == 4 else [[2], [0, 1]]
        module_groups = ((1,), (0, 2))  # three hooked modules: two in group 1, one in group 0
        module_sums = torch.rand(3, generator=gen, dtype=torch.float64) + 2.0
        s = torch.tensor(7.0) if scale == "tensor" else scale
        got = hook_dispersion_row(module_sums, module_groups, s, grads, groups, b)
        group_sq = torch.stack([module_sums[[1]].sum(), module_sums[[0, 2]].sum()]) * 49.0
        want = dispersion_row(group_sq, grouped_sq_norms(grads, groups)[:-1], b, b)
        assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-12, atol=0), (got, want)
    with pytest.raises(ValueError):
        hook_dispersion_row(module_sums, module_groups, 1.0, grads, groups, 1)


def test_ghost_read_sums_equal_the_per_sample_read():
    """``read_sums`` (the per-step path) = ``read``'s per-module vectors summed over samples."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    hooks = GhostNormHooks.for_model(net)
    got = []
    for reader in ("sums", "read"):
        hooks.arm()
        nn.functional.cross_entropy(net(x), y).backward()
        got.append(hooks.read_sums(scale=9) if reader == "sums" else hooks.read(scale=9))
        net.zero_grad()
    sums, norms = got
    assert hooks.module_names == ("0", "2", "4")
    assert torch.allclose(sums, torch.stack([norms.per_group[n].sum() for n in hooks.module_names]), rtol=1e-12)
    assert sums.sum().item() == pytest.approx(norms.total.sum().item(), rel=1e-12)
    hooks.arm()
    assert hooks.read_sums(scale=9) is None  # nothing recorded since the last read


def test_step_log_record_row_matches_record():
    names = ("a", "b", "c")
    by_dict, by_row = StepLog("dict"), StepLog("row")
    for step in range(70):  # past the first buffer
        row = torch.tensor([step, step / 3, -step], dtype=torch.float64)
        by_dict.record(step, dict(zip(names, row.unbind())))
        by_row.record_row(step, names, row)
    a, b = by_dict.flush(_Trainer()), by_row.flush(_Trainer())
    assert [(r.step, r.values) for r in a] == [(r.step, r.values) for r in b] and len(b) == 70


@pytest.mark.parametrize("width", [5, 32768, 32769, 70_000])
def test_row_squared_norms_match_float64_brute_force(width):
    rows = torch.randn(6, width, generator=torch.Generator().manual_seed(1)) * 3
    got = row_sq_norms(rows)
    assert got.dtype == torch.float64 and got.shape == (6,)
    assert torch.allclose(got, (rows.double() ** 2).sum(1), rtol=2e-7, atol=0)


class _Trainer:
    loggers: list = []


def test_step_log_buffer_keeps_every_record_across_growth_and_widths():
    log = StepLog("test")
    want = []
    for step in range(150):  # past the first buffer (64 rows) twice; records of 1 to 3 values
        values = {f"v{k}": torch.tensor(step + k / 10, dtype=torch.float32 if k else torch.float64)
                  for k in range(1 + step % 3)}
        if step % 7 == 0:
            values["plain"] = 0.5  # a number, not a tensor
        log.record(step, values)
        want.append((step, {k: float(v) for k, v in values.items()}))
    assert len(log) == 150
    got = log.flush(_Trainer())
    assert [(r.step, r.values) for r in got] == [(s, pytest.approx(v)) for s, v in want]
    assert len(log) == 0 and log.flush(_Trainer()) == []
    log.record(7, {"a": torch.tensor(1.0)})  # the buffer is reused after a flush
    assert [(r.step, r.values) for r in log.flush(_Trainer())] == [(7, {"a": 1.0})]


def test_step_log_buffer_skips_a_non_finite_record_only():
    log = StepLog("test")
    log.record(0, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    log.record(1, {"a": torch.tensor(float("nan")), "b": torch.tensor(2.0)})
    log.record(2, {"a": torch.tensor(3.0), "b": torch.tensor(4.0)})
    with pytest.warns(RuntimeWarning, match="step 1"):
        got = log.flush(_Trainer())
    assert [r.step for r in got] == [0, 2] and got[1].values == {"a": 3.0, "b": 4.0}


class _StrayForward(pl.Callback):
    """A grad-enabled forward of the model between steps that nothing differentiates (as some
    users' callbacks do): it must not disturb the next step's norms."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module(batch[0][:3])


def _records(tmp_path, callbacks, seed=0, **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    module = Classifier(MLP(64, 10, 32), lr=0.0)
    disp = next(c for c in callbacks if isinstance(c, GradientDispersion))
    out = []
    disp.add_listener(out.extend)
    trainer(tmp_path, callbacks, max_steps=6, **trainer_kwargs).fit(module, DigitsDataModule(batch_size=32))
    return module, disp, out


def test_hooks_stay_armed_between_measured_steps_and_a_stray_forward_changes_nothing(tmp_path):
    _, disp, ref = _records(tmp_path / "a", [GradientDispersion(backend="hooks")])
    module, disp2, got = _records(tmp_path / "b", [GradientDispersion(backend="hooks"), _StrayForward()])
    assert disp2.active_backend == "hooks" and len(got) == len(ref) == 6
    for a, b in zip(got, ref):
        assert a.values["grad/dispersion"] == pytest.approx(b.values["grad/dispersion"], rel=1e-12)
    for m in module.modules():  # detached at the end of fit
        assert not m._forward_hooks
    shared = module.__dict__["_genbounds_norm_hooks"]  # its process-wide forward hook is removed too
    assert shared.ghost is not None and not shared.ghost.attached


class _ForwardAfterBackward(pl.Callback):
    """A grad-enabled forward of the model after the step's backward, before its optimizer step
    (where the norms are read): outside the recording window, it must not join the step's calls."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.x = batch[0][:3]

    def on_after_backward(self, trainer, pl_module):
        pl_module(self.x)


class _CopiesTheModule(pl.Callback):
    """Copies the network inside an epoch, between measured steps (an EMA's copy), and at the next
    epoch's start (``StochasticWeightAveraging``'s), pickles and scripts it there (an export), and
    runs the copy with gradient inside the next step's forward window."""

    def __init__(self) -> None:
        self.hooks: list[tuple[int, bool, int]] = []  # (step, window open, forward hooks on the module)
        self.copy = None

    def on_train_epoch_start(self, trainer, pl_module):
        import copy
        import io

        if trainer.current_epoch == 0:
            return
        assert not any(m._forward_hooks for m in pl_module.modules())  # (out at the epoch's end)
        buffer = io.BytesIO()
        torch.save(pl_module.network, buffer)  # (nothing of our hooks in the pickle: the network's class is
        assert b"ghost_norms" not in buffer.getvalue()  # genbounds' own MLP, loaded with genbounds anyway)
        torch.jit.script(pl_module.network)  # (a Python hook on a module is compiled with it, and fails)
        self.copy = copy.deepcopy(pl_module.network)
        assert not any(m._forward_hooks for m in self.copy.modules())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.copy is not None:
            self.copy(batch[0][:5]).sum()  # (recorded by nothing: a copy of ours is inert, or has none)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import copy
        import io

        from genbounds.estimators.ghost_norms.hooks import _inert_hook, _ModuleHook

        ours = [h for m in pl_module.modules() for h in m._forward_hooks.values() if isinstance(h, _ModuleHook)]
        shared = pl_module.__dict__["_genbounds_norm_hooks"]
        self.hooks.append((trainer.global_step - 1, shared.ghost.attached, len(ours)))
        torch.save(pl_module.network, io.BytesIO())  # (a closure on the module would not pickle)
        self.copy = copy.deepcopy(pl_module.network)
        copied = [h for m in self.copy.modules() for h in m._forward_hooks.values()]
        assert all(h is _inert_hook for h in copied) and len(copied) == len(ours)


@pytest.mark.parametrize("extra", [_ForwardAfterBackward, _CopiesTheModule])
def test_per_module_hooks_record_only_their_steps_forward(tmp_path, extra):
    """The MLP's hooks are one per hooked module (``per_module``), kept from measured step to
    measured step within an epoch and taken out at its end: they record a step's own forward only
    — not a forward after its backward, nor a copy of the module (deep-copied or pickled with them
    on, an inert hook) run inside the window —, between epochs the network copies, pickles and
    scripts as without us (a review: kept hooks broke ``torch.jit.script``), and the values are
    those of the run without the extra callback."""
    _, _, ref = _records(tmp_path / "a", [GradientDispersion(backend="hooks")], limit_train_batches=3)
    spy = extra()
    module, disp, got = _records(tmp_path / "b", [GradientDispersion(backend="hooks"), spy], limit_train_batches=3)
    assert disp.active_backend == "hooks" and module.__dict__["_genbounds_norm_hooks"].ghost.per_module
    assert len(got) == len(ref) == 6
    for a, b in zip(got, ref):
        assert a.values["grad/dispersion"] == pytest.approx(b.values["grad/dispersion"], rel=1e-12)
    if isinstance(spy, _CopiesTheModule):  # kept between steps (two Linear layers), the window closed
        assert spy.hooks == [(s, False, 2) for s in range(6)]
    assert not any(m._forward_hooks for m in module.modules())  # (removed at the end of fit)


class _DoublesFirstLayer(Classifier):
    """Registers, at each batch start (after ours armed the hooks) or once as a process-wide hook,
    a forward hook that doubles the first Linear's output — and runs before ours."""

    def __init__(self, how: str) -> None:
        super().__init__(MLP(64, 10, 32), lr=0.0)
        self.how, self.handle = how, None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.how == "between" and self.handle is None:  # (after step 0: before ours from step 1)
            self.handle = self.network.net[1].register_forward_hook(lambda module, args, out: out * 2, prepend=True)

    def on_train_batch_start(self, batch, batch_idx):
        if self.how in ("prepend", "global") and self.handle is None:
            first = self.network.net[1]
            double = lambda module, args, out: out * 2  # noqa: E731
            self.handle = (first.register_forward_hook(double, prepend=True) if self.how == "prepend"
                           else torch.nn.modules.module.register_module_forward_hook(
                               lambda module, args, out: out * 2 if module is first else None))

    def on_train_end(self):
        if self.handle is not None:
            self.handle.remove()


def test_a_user_hook_put_first_between_steps_is_put_after_ours_again(tmp_path):
    """A user's ``prepend=True`` hook registered between measured steps: ours is put first again
    at the next step's arm, and every step is measured by the hooks, with the values of a run whose
    doubling hook came after ours from the start (the forward computes the same either way)."""
    def run(how, root):
        pl.seed_everything(0, verbose=False)
        module = _DoublesFirstLayer(how)
        disp = GradientDispersion(backend="hooks")
        out = []
        disp.add_listener(out.extend)
        trainer(root, [disp], max_steps=4).fit(module, DigitsDataModule(batch_size=32, shuffle=False))
        return disp, out

    class _After(_DoublesFirstLayer):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.handle is None:  # (the same hook, registered after ours: it never runs first)
                self.handle = self.network.net[1].register_forward_hook(lambda module, args, out: out * 2)

    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*runs before ours.*")
        disp, got = run("between", tmp_path / "a")
    pl.seed_everything(0, verbose=False)
    module = _After("after")
    ref_disp = GradientDispersion(backend="hooks")
    ref = []
    ref_disp.add_listener(ref.extend)
    trainer(tmp_path / "b", [ref_disp], max_steps=4).fit(module, DigitsDataModule(batch_size=32, shuffle=False))
    assert disp.active_backend == ref_disp.active_backend == "hooks"
    assert [r.step for r in got] == [r.step for r in ref] == [0, 1, 2, 3]
    for a, b in zip(got, ref):
        assert a.values["grad/trace_cov"] == pytest.approx(b.values["grad/trace_cov"], rel=1e-12)


@pytest.mark.parametrize("how", ["prepend", "global"])
def test_a_user_hook_that_runs_before_ours_is_not_silently_read(tmp_path, how):
    """A user's forward hook that runs before ours — registered with ``prepend=True`` after ours
    were put first, or process-wide (those run before every module's) — may replace the layer's
    output, and the gradient we read is then not the one the weight's is made of: 0.27-0.33 off,
    silently (a review; the process-wide case on the global hook too). The step is not measured
    (said), and an extra pass measures from the next one: exact against brute force."""
    pl.seed_everything(0, verbose=False)
    module = _DoublesFirstLayer(how)
    disp = GradientDispersion(backend="hooks")
    out = []
    disp.add_listener(out.extend)
    with pytest.warns(UserWarning, match="runs before ours"):
        trainer(tmp_path, [disp], max_steps=4).fit(module, DigitsDataModule(batch_size=32, shuffle=False))
    assert disp.active_backend != "hooks" and [r.step for r in out] == [1, 2, 3]


def test_hooks_disarm_on_unmeasured_steps(tmp_path):
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shared = pl_module.__dict__["_genbounds_norm_hooks"]
            seen.append((trainer.global_step - 1, shared.ghost.armed, sum(map(len, (
                m._forward_hooks for m in pl_module.modules())))))

    _records(tmp_path, [GradientDispersion(backend="hooks", every_n_steps=3), Probe()])
    # measured at steps 0 and 3: armed after them (their per-module forward hooks kept, the window
    # closed); steps 1, 2, 4, 5 are not measured (no hook of ours on the module)
    assert seen == [(0, True, 2), (1, False, 0), (2, False, 0), (3, True, 2), (4, False, 0), (5, False, 0)]


@pytest.mark.parametrize("seed", [0, 1, 2, "large"])
def test_the_row_maps_built_from_lists_equal_their_matrix_products(seed):
    """The drain's constant maps, built as Python lists (no kernel of their own), equal the
    products they stand for, made with tensor ops: ``on_s @ [module in group]`` and
    ``on_n @ [tensor in group][:, piece owner]`` — groups of several tensors, empty groups, tensors
    split into pieces and gathered ones."""
    import random

    from genbounds.estimators import gradient_dispersion as gd

    rng = random.Random(seed)
    n = rng.randint(2, 9)
    # (large: more entries than the list limit, the pieces' map made by one indexing op)
    full = tuple(rng.choice([0, 0, 1, 3, 40] if seed != "large" else [0, 20000]) for _ in range(n))
    rest = tuple(sorted(i for i in range(n) if not full[i] or rng.random() < 0.3))
    layout = (full, rest)
    K = rng.randint(1, n)
    owner = [rng.randrange(K) for _ in range(n)]  # (a partition: every tensor in one group)
    groups = tuple(tuple(i for i in range(n) if owner[i] == k) for k in range(K))
    n_modules = rng.randint(1, 6)
    module_groups = tuple(tuple(j for j in range(n_modules) if j % K == k) for k in range(K))
    b = rng.randint(2, 300)
    on_modules, on_pieces = gd._hook_row_maps.__wrapped__(n_modules, module_groups, groups, layout, b,
                                                           torch.device("cpu"))
    on_s, on_n = gd._row_maps.__wrapped__(K, b, b, torch.device("cpu"))
    of_module = torch.zeros(K, n_modules, dtype=torch.float64)
    of_tensor = torch.zeros(K, n, dtype=torch.float64)
    for k in range(K):
        of_module[k, list(module_groups[k])] = 1.0
        of_tensor[k, list(groups[k])] = 1.0
    owners = torch.cat([torch.repeat_interleave(torch.arange(n), torch.tensor(full)), torch.tensor(rest)])
    assert torch.equal(on_modules, on_s @ of_module)
    assert torch.equal(on_pieces, (on_n @ of_tensor)[:, owners])
    c = 1.0 / ((b - 1) * b)  # the closed form of the rows (norm_sq, trace_cov, dispersion, per group)
    assert torch.equal(on_s[:3], torch.tensor([[0.0] * K, [b * c] * K, [c] * K], dtype=torch.float64))
    assert torch.equal(on_n[3:], -b * c * torch.eye(K, dtype=torch.float64))


def test_a_measured_fit_runs_none_of_the_kernels_that_mapped_the_most_code(tmp_path, monkeypatch):
    """Each kernel a process runs for the first time maps its library code into memory (0.2-0.9 MiB
    each, benchmarks/memory_breakdown.py --code-pages). On the CPU the dispersion's fit — the
    checks before step 0, the measured steps, the rows made at the drain and at an epoch's short
    last batch (read at once), the constant maps — dispatches none of those it used to and that
    training never runs: among them any float64 matrix product (MKL's code); the values are
    tested above and in test_row_ring.py / test_piece_blocks.py."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[tuple[str, str]] = set()

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dtypes = {str(a.dtype) for a in args if isinstance(a, torch.Tensor)}
            seen.add((func.overloadpacket.__name__, "float64" if "torch.float64" in dtypes else ""))
            return func(*args, **(kwargs or {}))

    class Watch(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.mode = Ops()
            self.mode.__enter__()

        def on_fit_end(self, trainer, pl_module):
            self.mode.__exit__(None, None, None)

    from genbounds.callbacks.dispersion import norm_hooks
    from genbounds.estimators import functional
    from genbounds.estimators import gradient_dispersion as gd

    for cached in (gd._row_maps, gd._hook_row_maps, functional.group_matrix, functional.piece_owner,
                   functional._piece_buffers):
        cached.cache_clear()  # (made again inside the fit, with the kept plan and maps)
    functional._PIECE_PLAN[0] = None
    gd._LAST_ROW_MAPS[0] = None
    pl.seed_everything(0, verbose=False)
    disp = GradientDispersion(backend="hooks")
    out: list = []
    disp.add_listener(out.extend)
    # batches of 500: the digits' training split ends each epoch on a shorter one (read at once)
    data = DigitsDataModule(batch_size=500)
    per_step = []
    real = gd.hook_dispersion_row

    def counted(*args, **kwargs):
        per_step.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(norm_hooks, "hook_dispersion_row", counted)
    trainer(tmp_path, [Watch(), disp], max_steps=6, log_every_n_steps=50).fit(Classifier(MLP(64, 10, 32), lr=0.0), data)
    assert disp.active_backend == "hooks" and len(out) == 6 and per_step  # (the short batch: read at once)
    names = {name for name, _ in seen}
    assert "linalg_vector_norm" in names  # (the mode saw the measured steps)
    assert not names & {"index_put_", "_foreach_copy_", "addcmul", "eye", "repeat_interleave", "index_add_",
                        "_foreach_norm"}, seen
    in_float64 = {name for name, dtype in seen if dtype == "float64"}
    assert not in_float64 & {"mm", "addmm", "mv", "addmv", "bmm", "mean", "pow"}, in_float64


@pytest.mark.cuda
def test_cuda_norms_and_step_log_match_the_cpu():
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(*s, generator=gen) for s in ((512, 784), (512,), (10, 512))]
    want = _brute(tensors)
    got = per_tensor_sq_norms([t.to(dev) for t in tensors])
    assert got.device.type == "cuda" and torch.allclose(got.cpu(), want, rtol=1e-6, atol=0)
    rows = torch.randn(4, 70_000, generator=gen)
    assert torch.allclose(row_sq_norms(rows.to(dev)).cpu(), (rows.double() ** 2).sum(1), rtol=2e-7, atol=0)
    log = StepLog("test")
    for step in range(70):  # past the first buffer, on the device
        log.record(step, {"a": torch.tensor(step, dtype=torch.float32, device=dev), "b": torch.tensor(0.5, device=dev)})
    got = log.flush(_Trainer())
    assert [(r.step, r.values) for r in got] == [(s, {"a": float(s), "b": 0.5}) for s in range(70)]


def test_state_keys_are_formatted_once_and_unchanged():
    """Lightning formats ``state_key`` at every hook it dispatches: ours are formatted once, with the
    same string ``_generate_state_key`` gives (checkpoints written before keep loading)."""
    from genbounds.callbacks import Flatness, GradientSensitivity, HeldoutGradient, HessianTrace

    cases = [(GradientDispersion(every_n_steps=3), {"every_n_steps": 3}),
             (HeldoutGradient(every_n_steps=7), {"every_n_steps": 7}),
             (GradientSensitivity(sigmas=[0.01, 0.1]), {"sigmas": [0.01, 0.1]}),
             (Flatness(scaling="fixed"), {"scaling": "fixed"}),
             (HessianTrace(), {"backend": "hutchinson"})]
    for cb, args in cases:
        first = cb.state_key
        assert first == cb._generate_state_key(**args)
        assert cb.state_key is first
