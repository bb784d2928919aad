"""The pieces of a bound evaluation that live outside the callback's hooks
(``callbacks/bound_evaluation.py``, ``BoundSeries.check_resumable``, ``bounds.aggregate.upper_test_error``)
and the dispersion step's record helpers, each against its direct definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genbounds.bounds.aggregate import upper_test_error as error_upper
from genbounds.callbacks.bound_evaluation import LossRange, bound_notes, final_shares
from genbounds.callbacks.bound_series import BoundSeries
from genbounds.callbacks.channel import DispersionRecord
from genbounds.estimators.functional import group_index
from genbounds.estimators.gradient_dispersion import DispersionEstimate


def test_loss_range_modes():
    losses = np.array([0.0, 1.0, 2.0, np.nan, 10.0])
    fixed = LossRange(3.0)
    assert fixed.value == 3.0  # given: known before any evaluation
    assert math.isnan(LossRange("quantile").value)
    assert fixed.update(losses) == 3.0
    quantile = LossRange("quantile")
    finite = losses[np.isfinite(losses)]
    lo, hi = np.quantile(finite, [0.01, 0.99])
    assert quantile.update(losses) == pytest.approx((hi - lo) / 2)
    observed = LossRange("observed_range")
    observed.update(np.array([1.0, 2.0]))
    assert observed.update(np.array([0.5, 1.5])) == pytest.approx((2.0 - 0.5) / 2)  # the range of all evaluations
    state = observed.state_dict()
    again = LossRange("observed_range")
    again.load_state_dict(state)
    assert (again.lo, again.hi) == (0.5, 2.0)
    observed.unknown()
    assert math.isnan(observed.value)  # no held-out data: a data-dependent R is unknown
    fixed.unknown()
    assert fixed.value == 3.0
    assert LossRange(2).value == 2.0 and LossRange(2).update(losses) == 2.0  # an int is a given R too


class _Probe:
    final_share = None
    final_floor_after = 0.0


def test_final_shares_set_and_reset():
    probes = [_Probe(), _Probe(), _Probe()]
    with final_shares(probes, [1.0, 2.0, 4.0]):
        assert [p.final_share for p in probes] == pytest.approx([1 / 3, 1 / 2, 1.0])
        assert [p.final_floor_after for p in probes] == [6.0, 4.0, 0.0]
    assert all(p.final_share is None and p.final_floor_after == 0.0 for p in probes)
    with pytest.raises(RuntimeError):
        with final_shares(probes, [1.0, 2.0, 4.0]):
            raise RuntimeError("a probe failed")
    assert all(p.final_share is None for p in probes)  # reset on failure too
    with final_shares(probes, [], enabled=False):  # an intermediate evaluation
        assert all(p.final_share is None for p in probes)


def test_test_error_upper():
    values = {"bound/wang_mao_eq2_error": 0.3, "bound/neu_error": 0.2, "gap/train_error": 0.05}
    assert error_upper(values, ("wang_mao_eq2_error", "neu_error")) == {"bound/test_error_upper": pytest.approx(0.25)}
    values["bound/neu_error"] = math.nan
    assert error_upper(values, ("neu_error",))["bound/test_error_upper"] == pytest.approx(0.35)
    assert error_upper({"bound/neu_error": 2.0, "gap/train_error": 0.5}, ("neu_error",)) == {"bound/test_error_upper": 1.0}
    nan = error_upper({"bound/neu_error": math.nan, "gap/train_error": 0.1}, ("neu_error",))
    assert math.isnan(nan["bound/test_error_upper"])  # wanted, none finite: NaN, never left out
    assert error_upper({}, ("wang_mao_eq3",)) == {}


def test_bound_notes_kinds():
    values = {"bound_valid/neu": 0.0, "bound/neu": math.nan, "bound_terms/wang_mao_eq2_sigma_at_edge": 1.0,
              "bound_terms/wang_mao_eq2_degenerate": 1.0, "bound_valid/wang_mao_eq3": 1.0}
    kinds = [k for k, _ in bound_notes(values, ["neu", "wang_mao_eq2", "wang_mao_eq3"], 7)]
    assert kinds == ["invalid-neu", "edge-wang_mao_eq2", "degenerate-wang_mao_eq2"]
    assert "could not be computed" in bound_notes(values, ["neu"], 7)[0][1]
    below = bound_notes({"bound_valid/neu": 0.0, "bound/neu": 0.1}, ["neu"], 3)
    assert "below the measured gap" in below[0][1] and "step 3" in below[0][1]


def test_check_resumable():
    series = BoundSeries()
    series.config.update(sigmas=[0.01, 0.1], groups=["a", "b"])
    series.check_resumable([0.01, 0.1], ["a", "b"])
    series.check_resumable([], [])  # no flatness, no groups: nothing to compare
    with pytest.raises(MisconfigurationException, match="σ grid"):
        series.check_resumable([0.01, 0.2], ["a", "b"])
    with pytest.raises(MisconfigurationException, match="parameter groups"):
        series.check_resumable([0.01, 0.1], ["a"])


def test_group_index():
    groups = {"l1": ["w1", "b1"], "l2": ["w2"]}
    assert group_index(groups, ["w2", "w1", "b1"]) == {"w2": 1, "w1": 0, "b1": 0}


def test_dispersion_record_round_trip():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    est = DispersionEstimate(norm_sq=t(1.0), trace_cov=t(8.0), dispersion=t(2.0), trace_cov_se=t(0.5),
                             batch_size=4, num_units=4, group_dispersion=t([0.5, 1.5]))
    values = est.tagged(["l1", "l2"])
    assert set(values) == {"grad/norm_sq", "grad/trace_cov", "grad/dispersion", "grad/trace_cov_se",
                           "grad/dispersion/layer/l1", "grad/dispersion/layer/l2"}
    record = DispersionRecord.from_values(3, {k: float(v) for k, v in values.items()}, ["l1", "l2"])
    assert record == DispersionRecord(step=3, norm_sq=1.0, trace_cov=8.0, dispersion=2.0, trace_cov_se=0.5,
                                      groups=[0.5, 1.5])
    bare = DispersionEstimate(norm_sq=t(1.0), trace_cov=t(8.0), dispersion=t(2.0), trace_cov_se=None,
                              batch_size=4, num_units=4).tagged(["l1"])
    assert set(bare) == {"grad/norm_sq", "grad/trace_cov", "grad/dispersion"}
    assert DispersionRecord.from_values(0, {k: float(v) for k, v in bare.items()}, ["l1"]).groups is None


def test_bound_r_set_after_construction_takes_effect():
    from genbounds.callbacks import GeneralizationBound

    bound = GeneralizationBound()
    assert bound.R == "quantile" and math.isnan(bound.loss_range.value)
    bound.R = 0.7
    assert bound.loss_range.update(np.array([0.0, 5.0])) == 0.7
    bound.R = "observed_range"
    assert bound.loss_range.update(np.array([1.0, 2.0])) == pytest.approx(2.5)  # the range of every update


def test_bound_values_without_inputs_are_nan_for_every_wanted_bound():
    from genbounds.callbacks.bound_evaluation import bound_values

    values, notes = bound_values(None, ("wang_mao_eq3", "neu"))
    # (with Neu's: its |gap| bound, whose value of an earlier evaluation must not stand)
    assert list(values) == ["bound/wang_mao_eq3", "bound/neu", "bound/neu_abs", "bound/wang_mao_eq3_se",
                            "bound/neu_se", "bound/neu_abs_se"]
    assert all(math.isnan(v) for v in values.values()) and notes == []


def test_the_notes_the_bound_math_adds_reach_the_user():
    """compute_bounds adds notes of its own (a Hessian trace ≤ 0, a layer-wise relaxation refused):
    bound_values read the notes before computing, so they were never said, and a negative trace
    left Eq. 3 NaN with "a failed estimate" for its only reason (a matrix's fast_dev_run run)."""
    import numpy as np

    from genbounds.bounds.aggregate import BoundInputs
    from genbounds.callbacks.bound_evaluation import bound_values

    inp = BoundInputs(T=4, n=100, d=10, r=1.0, eta=np.full(4, 0.1), vhat=np.ones(4), sigmas=[0.1],
                      wanted=("wang_mao_eq3",), curvature={"hessian_trace": -9.2, "hessian_trace_se": 4.1})
    values, notes = bound_values(inp, ("wang_mao_eq3",))
    assert math.isnan(values.get("bound/wang_mao_eq3", math.nan))
    (trace,) = [message for kind, message in notes if kind == "trace"]
    assert trace.startswith("GeneralizationBound: the Hessian trace estimate") and "-9.2 ± 4.1" in trace


def test_finish_values_flags_a_bound_below_the_gap_and_says_so():
    from genbounds.callbacks.bound_evaluation import finish_values

    values = {"bound/wang_mao_eq3": 0.1, "bound/neu": math.nan, "gap/measured": 0.2,
              "bound/wang_mao_eq2_error": 0.3, "gap/train_error": 0.05}
    notes = finish_values(values, ("wang_mao_eq3", "neu", "wang_mao_eq2_error"), 7, plain_sgd=False, overhead=0.125)
    assert values["bound_valid/wang_mao_eq3"] == 0.0 and values["bound_valid/neu"] == 0.0
    assert values["bound_valid/wang_mao_eq2_error"] == 1.0 and values["bound/valid"] == 0.0
    assert values["bound/heuristic"] == 1.0 and values["perf/overhead"] == 0.125
    assert values["bound/test_error_upper"] == pytest.approx(0.35)
    kinds = [kind for kind, _ in notes]
    assert kinds == ["invalid-neu", "invalid-wang_mao_eq3"]
    assert "could not be computed (NaN)" in notes[0][1] and "below the measured gap at step 7" in notes[1][1]


def test_bounds_that_could_not_be_computed_are_said_in_one_warning_with_the_reason_given():
    from genbounds.callbacks.bound_evaluation import finish_values

    wanted = ("wang_mao_eq2", "wang_mao_eq3", "neu")
    values = {f"bound/{name}": math.nan for name in wanted} | {"gap/measured": 0.2, "setting/R": 1.0}
    notes = finish_values(values, wanted, 9, plain_sgd=True, overhead=0.1, reason="the parameters changed")
    assert [kind for kind, _ in notes] == ["invalid-wang_mao_eq2+wang_mao_eq3+neu"]
    assert "bound/wang_mao_eq2, bound/wang_mao_eq3, bound/neu could not be computed (NaN) at step 9: the " \
           "parameters changed" in notes[0][1]
    # without a reason: what it may be (it read "a failed estimate" where a probe had not measured
    # yet: a new user's walk, round 31)
    values = {f"bound/{name}": math.nan for name in wanted} | {"gap/measured": 0.2, "setting/R": 1.0}
    assert "a measurement it needs not taken yet" in finish_values(values, wanted, 9, plain_sgd=True,
                                                                   overhead=0.1)[0][1]


def test_warn_once_says_each_kind_once():
    from genbounds.callbacks.bound_evaluation import WarnOnce

    warn = WarnOnce()
    with pytest.warns(UserWarning) as caught:
        warn.all([("a", "first a"), ("b", "first b"), ("a", "second a")])
        warn("b", "second b")
    assert [str(w.message) for w in caught] == ["first a", "first b"]
    assert warn.said == {"a", "b"}


def test_a_missing_heldout_producer_is_noted_only_when_neu_is_wanted():
    from genbounds.callbacks.bound_producers import Producers

    producers = Producers()
    assert [kind for kind, _ in producers.notes(("neu", "wang_mao_eq3"))] == ["no-heldout"]
    assert producers.notes(("wang_mao_eq3",)) == []
    producers.heldout = object()  # type: ignore[assignment]
    assert producers.notes(("neu",)) == []


def test_the_number_of_training_samples_is_given_found_or_an_error_before_step_0():
    from types import SimpleNamespace

    from genbounds.callbacks.probe_data import num_train_samples

    sized = SimpleNamespace(datamodule=None, train_dataloader=torch.utils.data.DataLoader(list(range(12))))
    assert num_train_samples("HeldoutGradient", None, sized) == 12
    assert num_train_samples("HeldoutGradient", 30, sized) == 30

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(12))

    unsized = SimpleNamespace(datamodule=None, train_dataloader=torch.utils.data.DataLoader(Stream()))
    with pytest.raises(MisconfigurationException, match=r"pass GeneralizationBound\(num_train=\.\.\.\)"):
        num_train_samples("GeneralizationBound", None, unsized)
    assert num_train_samples("GeneralizationBound", 12, unsized) == 12


def test_a_window_result_gives_its_row_or_values_from_its_moments_against_the_definition():
    from types import SimpleNamespace

    from genbounds.callbacks.dispersion.base import WindowResult
    from genbounds.estimators.gradient_dispersion import GradientMoments

    one_process = SimpleNamespace(world_size=1)
    row = torch.arange(5.0, dtype=torch.float64)
    assert WindowResult(None, row=row).values(one_process, [[0], [1]], True) is row
    g = torch.randn(6, 3, dtype=torch.float64)  # six per-sample gradients of one parameter
    moments = GradientMoments((g ** 2).sum(), 6, 6, weighted_sum=[g.sum(0)])
    values = WindowResult(moments).values(one_process, [[0]], True)
    mean = g.mean(0)
    s2 = ((g - mean) ** 2).sum() / 5
    tagged = values.tagged(["w"]) if not isinstance(values, torch.Tensor) else dict(
        zip(("grad/norm_sq", "grad/trace_cov", "grad/dispersion"), values))
    assert float(tagged["grad/norm_sq"]) == pytest.approx(float(mean @ mean), rel=1e-12)
    assert float(tagged["grad/trace_cov"]) == pytest.approx(float(s2), rel=1e-12)
    assert float(tagged["grad/dispersion"]) == pytest.approx(float(s2) / 6, rel=1e-12)
    single = GradientMoments((g[:1] ** 2).sum(), 1, 1, weighted_sum=[g[0]])
    assert WindowResult(single).values(one_process, [[0]], True) is None  # no spread in one sample
