"""The user's own attributes across a probe's call of ``training_step``
(``callbacks/user_state.py``): restored as they were, down to the objects' identities; a large
tensor changed in place is reported, once; the framework's and genbounds' attributes are not
touched. And in a fit: Lightning's documented pattern of keeping step outputs on the module logs
the same epoch mean with and without the suite."""

from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genbounds.callbacks import GradientDispersion
from genbounds.callbacks.isolation import muted_training_step
from genbounds.callbacks.user_state import MAX_TENSOR_ELEMENTS, kept_user_state
from helpers import bound_suite, trainer


class Keeper(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 2)
        self.net.calls = 0  # (a submodule's attribute)
        self.outputs: list = []
        self.by_split = {"train": [], "seen": 0}
        self.seen = 0
        self.tags = {"a"}
        self.recent = deque([1, 2], maxlen=4)
        self.small = torch.zeros(3)
        self.large = torch.zeros(MAX_TENSOR_ELEMENTS + 1)
        self._mine = []  # (a private attribute of the user's class is the user's too)

    def change_everything(self) -> None:
        self.net.calls += 1
        self.outputs.append(torch.ones(()))
        self.by_split["train"].append(1.0)
        self.by_split["seen"] += 8
        self.by_split["new"] = 1
        self.seen += 8
        self.tags.add("b")
        self.recent.append(3)
        self.small += 1
        self.added = "later"
        self._mine.append(1)
        self._genbounds_note = "kept"  # genbounds' own attribute: kept


def test_every_kind_of_user_state_is_restored_with_its_identity():
    m = Keeper()
    before = {k: m.__dict__[k] for k in ("outputs", "by_split", "tags", "recent", "small", "_mine")}
    inner = m.by_split["train"]
    with kept_user_state(m):
        m.change_everything()
        m.outputs = ["rebound"]
    assert m.outputs == [] and m.outputs is before["outputs"]
    assert m.by_split == {"train": [], "seen": 0} and m.by_split["train"] is inner
    assert m.seen == 0 and m.net.calls == 0 and m.tags == {"a"} and list(m.recent) == [1, 2]
    assert torch.equal(m.small, torch.zeros(3)) and m.small is before["small"]
    assert not hasattr(m, "added") and m._mine == [] and m._genbounds_note == "kept"
    assert all(m.__dict__[k] is v for k, v in before.items())


def test_a_large_tensor_changed_in_place_is_reported_once_and_not_copied():
    m = Keeper()
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with kept_user_state(m):
                m.large += 1
        said = [w for w in caught if "tensor attribute large" in str(w.message)]
        assert len(said) == (1 if _ == 0 else 0)
    assert float(m.large[0]) == 2.0  # (not restored: said so)


def test_muted_training_step_restores_them_and_leaves_the_framework_alone():
    m = Keeper()
    m.training_step = lambda batch, i: m.change_everything()  # type: ignore[method-assign]
    with muted_training_step(m):
        m.training_step(None, 0)
    assert m.outputs == [] and m.seen == 0 and not hasattr(m, "added")
    assert "log" not in m.__dict__  # (the muting patches are gone too)


class StepOutputs(pl.LightningModule):
    """Lightning's documented pattern: the step's outputs kept on the module, their mean logged at
    the epoch's end; and a sample counter."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.training_step_outputs: list = []
        self.samples_seen = 0
        self.epoch_means: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.training_step_outputs.append(loss.detach())
        self.samples_seen += x.shape[0]
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_train_epoch_end(self) -> None:
        self.epoch_means.append(float(torch.stack(self.training_step_outputs).mean()))
        self.log("training_epoch_mean", self.epoch_means[-1])
        self.training_step_outputs.clear()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("with_suite", [False, True])
def test_step_outputs_kept_on_the_module_are_the_users_own(tmp_path, with_suite):
    from genbounds.data import DigitsDataModule

    runs = []
    for callbacks in ([], bound_suite() if with_suite else [GradientDispersion()]):
        pl.seed_everything(0, verbose=False)
        module = StepOutputs()
        t = trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=5, limit_val_batches=2)
        t.fit(module, DigitsDataModule(batch_size=64, seed=0))
        runs.append((module.samples_seen, module.epoch_means, float(t.callback_metrics["training_epoch_mean"])))
    assert runs[0][0] == 2 * 5 * 64
    assert runs[1] == runs[0]


def test_a_large_container_keeps_its_length_only():
    """A list or dict of more items than ``MAX_CONTAINER_ITEMS`` (a vocabulary, an in-memory
    dataset) is not copied per probe: a list grown by the call is cut back; a dict whose size
    changed is reported once."""
    from genbounds.callbacks.user_state import MAX_CONTAINER_ITEMS

    m = Keeper()
    m.big = list(range(MAX_CONTAINER_ITEMS + 1))
    m.vocab = {i: i for i in range(MAX_CONTAINER_ITEMS + 1)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kept_user_state(m):
            m.big.append(-1)
            m.big.extend([-2, -3])
            m.vocab[-1] = 0
    assert m.big == list(range(MAX_CONTAINER_ITEMS + 1))
    assert len(m.vocab) == MAX_CONTAINER_ITEMS + 2  # (not restored: said)
    assert sum("size of vocab" in str(w.message) for w in caught) == 1


def test_an_inference_tensor_attribute_is_kept_by_identity():
    """A tensor made under ``inference_mode`` (a precomputed log-prior) has no version counter:
    it is kept by identity, and the call does not raise."""
    m = Keeper()
    with torch.inference_mode():
        m.log_prior = torch.log(torch.tensor([0.25, 0.75]))
    prior = m.log_prior
    with kept_user_state(m):
        m.log_prior = prior + 1
    assert m.log_prior is prior


def test_isolated_pass_forks_python_and_numpy_random_streams():
    """A probe's ``training_step`` drawing from ``random`` or ``np.random`` (mixup's λ) leaves both
    streams where they were: the run draws the same numbers with and without the library."""
    import random

    import numpy as np

    from genbounds.callbacks.isolation import isolated_pass

    random.seed(1)
    np.random.seed(1)
    want = (random.random(), float(np.random.beta(0.4, 0.4)))
    random.seed(1)
    np.random.seed(1)
    with isolated_pass(nn.Linear(2, 2)):
        random.random()
        np.random.beta(0.4, 0.4, size=5)
    assert (random.random(), float(np.random.beta(0.4, 0.4))) == want


def test_many_containers_stay_within_one_calls_item_budget(monkeypatch):
    """2,000 lists of 2,000 floats on a module (a tokenized dataset) cost length checks past the
    call's item budget, not a copy of four million items per probe (6.4 s a call before); appends
    are still cut back."""
    from genbounds.callbacks import user_state

    made = [0]
    real = user_state._Saved.__init__

    def counting(self, *args, **kwargs):
        made[0] += 1
        real(self, *args, **kwargs)

    monkeypatch.setattr(user_state._Saved, "__init__", counting)
    m = Keeper()
    m.rows = [[0.0] * 2000 for _ in range(2000)]
    with kept_user_state(m):
        m.rows[-1].append(1.0)
        m.outputs.append(1)
    assert made[0] <= user_state.MAX_ITEMS_PER_CALL + user_state.MAX_CONTAINER_ITEMS + 100
    assert len(m.rows[-1]) == 2000 and m.outputs == []


def test_a_large_nested_lookup_does_not_starve_a_small_cache():
    """A 4,000 × 16 nested lookup uses the call's item budget; a small cache beside it is still
    restored (it was not, silently, when the budget counted attributes' own containers too)."""
    m = Keeper()
    m.lookup = {i: list(range(16)) for i in range(4000)}
    m.cache = {}
    with kept_user_state(m):
        m.cache["step"] = 1
    assert m.cache == {}


class PrivateNoise(pl.LightningModule):
    """Input noise drawn from generators the module keeps (``self.gen``, NumPy's and Python's):
    a probe that calls the step advanced them, and the run's later noise shifted."""

    def __init__(self) -> None:
        super().__init__()
        import random

        import numpy as np

        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.gen = torch.Generator().manual_seed(7)
        self.np_gen = np.random.default_rng(7)
        self.legacy = np.random.RandomState(7)
        self.py_gen = random.Random(7)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = x.flatten(1) + 0.1 * torch.randn(x.shape[0], 64, generator=self.gen)
        scale = float(self.np_gen.uniform(0.9, 1.1) * self.legacy.uniform(0.9, 1.1) * self.py_gen.uniform(0.9, 1.1))
        return F.cross_entropy(self.net(scale * x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_generators_the_module_keeps_are_restored_after_a_probe(tmp_path):
    """Same seed, same weights with and without the suite when the step draws from the module's
    own generators (they are restored like its other state)."""
    from genbounds.data import DigitsDataModule

    weights = []
    for callbacks in ([], bound_suite()):
        pl.seed_everything(0, verbose=False)
        module = PrivateNoise()
        trainer(tmp_path, callbacks, max_epochs=1, limit_train_batches=6, limit_val_batches=2).fit(
            module, DigitsDataModule(batch_size=64, seed=0))
        weights.append([p.detach().clone() for p in module.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_generators_the_module_keeps_make_its_step_random_and_seeded_per_batch(tmp_path):
    """Noise from the module's own generators makes the step random for the loss contract: two
    different batches (and two chunks of one) draw different noise at one step, one batch the
    same at every call of the step (restored after each call, the generators had given every
    call the same draws); a ``random.SystemRandom`` on the module (no state) is left alone."""
    import random

    from genbounds.callbacks.loss_contract import LossContract
    from genbounds.data import DigitsDataModule

    pl.seed_everything(0, verbose=False)
    module = PrivateNoise()
    module.system = random.SystemRandom()
    trainer(tmp_path, [GradientDispersion()], max_steps=2).fit(module, DigitsDataModule(batch_size=64, seed=0))
    contract = LossContract.shared(module)
    assert contract.stochastic
    x = torch.randn(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    a, b = (x, y), (x.clone(), y.clone())
    with torch.no_grad():
        first, again, other = contract(module, a), contract(module, a), contract(module, b)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_a_tensor_changed_in_place_inside_a_container_is_reported_once():
    """A running statistic kept in a dict and updated in place (``self.stats["ema"].mul_(0.9)``)
    is not copied before every probe call (tensors inside containers keep their identity), so a
    probe's change to it is reported — once — instead of passing silently."""

    class Stats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stats = {"ema": torch.zeros(()), "count": torch.zeros(())}

    m = Stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with kept_user_state(m):
                m.stats["ema"].mul_(0.9).add_(0.1)
    said = [str(w.message) for w in caught if "changed a tensor inside stats in place" in str(w.message)]
    assert len(said) == 1 and float(m.stats["ema"]) > 0  # (reported, not restored)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with kept_user_state(m):
            m.stats["count"] = m.stats["count"] + 1  # (rebound, not in place: restored, nothing to say)
    assert float(m.stats["count"]) == 0 and not caught
