"""``BoundScope`` on its own: what the bounds are stated over, and when the fit's history makes
every bound NaN (the fits that reach each case are in ``test_trainable_set.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from genbounds.callbacks.bound_scope import BoundScope
from genbounds.callbacks.bound_series import BoundSeries


class _Said:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def __call__(self, kind: str, message: str) -> None:
        assert message.startswith("GeneralizationBound: ")
        self.kinds.append(kind)


def _module() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _started(series: BoundSeries) -> BoundScope:
    scope = BoundScope("GeneralizationBound", None)
    scope.start(series)
    return scope


def test_a_fit_of_its_own_takes_groups_and_d_and_configures_the_series():
    module, series, said, taken = _module(), BoundSeries(), _Said(), []
    scope = _started(series)
    assert scope.settle(SimpleNamespace(global_step=0), module, series, [0.1], said, lambda: taken.append(1))
    assert scope.groups == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    assert scope.d == 3 * 4 + 4 + 4 * 2 + 2 and taken == [1] and said.kinds == []
    assert series.config["group_sizes"] == [16, 10] and series.config["trained"] == list(module.state_dict())
    assert scope.complete() and scope.nan_reason() is None
    # nothing changed since: not taken again before an evaluation
    assert not scope.settle(SimpleNamespace(global_step=0), module, series, [0.1], said, lambda: taken.append(1))
    assert taken == [1]


def test_a_resumed_fit_on_other_parameters_states_no_bound():
    module, series, said = _module(), BoundSeries(), _Said()
    series.configure([0.1], {"0": ["0.weight", "0.bias"]}, {"0.weight": 12, "0.bias": 4}, ["0.weight", "0.bias"])
    scope = _started(series)  # (a checkpoint's configuration: compared at the first step only)
    step = SimpleNamespace(global_step=6)
    assert not scope.settle(step, module, series, [0.1], said, lambda: None)
    assert scope.changed_at is None and said.kinds == []
    assert not scope.settle(step, module, series, [0.1], said, lambda: None, first_step=True)
    assert scope.changed_at == 6 and said.kinds == ["resumed-other-parameters"]
    assert not scope.complete() and "changed at step 6" in scope.nan_reason()


def test_a_resumed_fit_on_another_grid_is_refused():
    module, series = _module(), BoundSeries()
    names = list(module.state_dict())
    series.configure([0.1, 0.2], {"0": names[:2], "2": names[2:]}, dict.fromkeys(names, 1), names)
    scope = _started(series)
    with pytest.raises(MisconfigurationException, match="σ grid"):
        scope.settle(SimpleNamespace(global_step=3), module, series, [0.5], _Said(), lambda: None, first_step=True)


def test_a_checkpoint_missing_steps_states_no_bound_until_a_new_run():
    module, series, said = _module(), BoundSeries(), _Said()
    series.lrs.extend([0.1, 0.1, 0.1])
    scope = _started(series)
    scope.settle(SimpleNamespace(global_step=0), module, series, [], said, lambda: None)
    scope.check_history(SimpleNamespace(global_step=3), series, said)
    assert scope.complete() and said.kinds == []  # (every step held)
    scope.check_history(SimpleNamespace(global_step=5), series, said)
    assert scope.unmeasured_steps == 2 and said.kinds == ["unmeasured-history"]
    assert not scope.complete() and "no measurements of its first steps" in scope.nan_reason()
    scope.new_run()
    assert scope.complete() and scope.nan_reason() is None


def test_a_change_after_the_first_step_is_noted_once():
    module, series, said = _module(), BoundSeries(), _Said()
    scope = _started(series)
    scope.settle(SimpleNamespace(global_step=0), module, series, [], said, lambda: None, first_step=True)
    with pytest.warns(UserWarning, match="trained parameters changed at step 4"):
        module[0].weight.requires_grad_(False)
        scope.settle(SimpleNamespace(global_step=4), module, series, [], said, lambda: None)
    assert scope.changed_at is None  # (the set's change is recorded; the scope reads it at note_change)
    scope.note_change(module)
    assert scope.changed_at == 4 and not scope.complete()
    module[2].weight.requires_grad_(False)
    scope.settle(SimpleNamespace(global_step=9), module, series, [], said, lambda: None)
    scope.note_change(module)
    assert scope.changed_at == 4 and said.kinds == []


def test_the_callbacks_settings_reach_its_scope():
    """``GeneralizationBound.layer_groups`` and ``changed_at`` read and write its scope's (a
    reassigned ``layer_groups`` was left behind by the scope: a review, round 33)."""
    from genbounds.callbacks import GeneralizationBound

    bound = GeneralizationBound(layer_groups={"0": "first"})
    assert bound.scope.layer_groups == {"0": "first"}
    bound.layer_groups = {"2": "last"}
    assert bound.scope.take_groups(_module()) == {"0": ["0.weight", "0.bias"], "last": ["2.weight", "2.bias"]}
    bound.changed_at = 3
    assert bound.scope.changed_at == 3 and not bound.scope.complete()
