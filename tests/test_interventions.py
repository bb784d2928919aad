"""Interventions (SPEC §7), twin-run stability (§8) and the dispersion phase detector."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from genbounds.bounds import find_valley
from genbounds.callbacks import (
    DispersionPhaseDetector,
    DynamicGradientClipping,
    GaussianModelPerturbation,
    GradientDispersion,
    TwinRunStability,
    VariabilityRegularizer,
)
from genbounds.data import DigitsDataModule
from genbounds.estimators.perturbation import standard_normal
from genbounds.models import MLP, Classifier, Regressor
from helpers import TensorData, trainer, unit_sphere_regression


class GradRecorder(Regressor):
    """Records ``.grad`` as the optimizer will use it (the module's own clipping slot runs after
    every intervention)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.seen.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in self.parameters()]))


def recorder(d: int, lr: float = 0.0) -> GradRecorder:
    from genbounds.models import LinearRegression

    torch.manual_seed(0)
    return GradRecorder(LinearRegression(d), lr=lr)


def plain_grads(d: int, x, y, steps: int, batch: int, tmp_path) -> list[torch.Tensor]:
    m = recorder(d)
    trainer(tmp_path / "plain", [], max_steps=steps).fit(m, TensorData(x, y, batch))
    return m.seen


# ---------------------------------------------------------------- dynamic clipping
def test_clipping_rescales_above_the_stored_norm_and_tracks_the_minimum(tmp_path):
    """lr = 0, batches alternating between two fixed batches with different gradient norms."""
    x, y = unit_sphere_regression(32, 4, seed=1)
    y[16:] *= 5.0  # the second batch has a much larger gradient
    raw = plain_grads(4, x, y, 4, 16, tmp_path)
    norms = [float(g.norm()) for g in raw]
    assert norms[1] > norms[0] and norms[3] > norms[2]
    m = recorder(4)
    clip = DynamicGradientClipping(alpha=0.1, start_step=0)
    trainer(tmp_path / "clip", [clip], max_steps=4).fit(m, TensorData(x, y, 16))
    # step 0: ‖g‖ < G = +∞ → unchanged, G = ‖g0‖; step 1: ‖g1‖ > G → rescaled to α·G
    assert torch.allclose(m.seen[0], raw[0])
    assert float(m.seen[1].norm()) == pytest.approx(0.1 * norms[0], rel=1e-6)
    assert torch.allclose(m.seen[1] / m.seen[1].norm(), raw[1] / raw[1].norm(), atol=1e-6)  # same direction
    assert torch.allclose(m.seen[2], raw[2])  # ‖g2‖ = ‖g0‖ is not above G
    assert float(clip.level) == pytest.approx(min(norms[0], norms[2]), rel=1e-6)


def test_clipping_before_its_start_step_changes_nothing(tmp_path):
    x, y = unit_sphere_regression(32, 4, seed=2)
    raw = plain_grads(4, x, y, 4, 16, tmp_path)
    m = recorder(4)
    trainer(tmp_path / "c", [DynamicGradientClipping(start_step=100)], max_steps=4).fit(m, TensorData(x, y, 16))
    assert all(torch.equal(a, b) for a, b in zip(raw, m.seen))


def test_clipping_auto_start_when_the_epoch_gradient_norm_grows(tmp_path):
    torch.manual_seed(0)
    clip = DynamicGradientClipping(auto_start="grad_norm")
    module = Classifier(MLP(64, 10, 32), lr=0.5)
    trainer(tmp_path, [clip], max_epochs=6, limit_train_batches=5, limit_val_batches=0).fit(
        module, DigitsDataModule(batch_size=32, label_noise=0.5))
    norms = clip.epoch_norms  # tracked until clipping starts
    first_rise = next((i for i in range(1, len(norms)) if norms[i] > norms[i - 1]), None)
    assert first_rise is not None and first_rise == len(norms) - 1
    assert clip.start_step == 5 * (first_rise + 1)  # the first step after the epoch that rose


def test_measurement_callbacks_see_the_raw_gradient_whatever_the_order(tmp_path):
    x, y = unit_sphere_regression(32, 4, seed=3)
    y[16:] *= 5.0
    raw = plain_grads(4, x, y, 2, 16, tmp_path)
    clip = DynamicGradientClipping(alpha=0.1, start_step=0)
    disp = GradientDispersion(backend="backpack")
    records = []
    disp.step_log.add_listener(records.extend)
    m = recorder(4)
    trainer(tmp_path / "o", [clip, disp], max_steps=2).fit(m, TensorData(x, y, 16))  # clipping listed first
    assert records[1].values["grad/norm_sq"] == pytest.approx(float(raw[1].double().norm() ** 2), rel=1e-6)
    assert float(m.seen[1].norm()) < 0.5 * float(raw[1].norm())  # and the step was clipped
    assert "configure_gradient_clipping" not in m.__dict__  # the module's hook is restored after fit


# ---------------------------------------------------------------- GMP
def test_gmp_with_sigma_zero_leaves_the_gradient_unchanged(tmp_path):
    x, y = unit_sphere_regression(32, 5, seed=4)
    raw = plain_grads(5, x, y, 3, 16, tmp_path)
    m = recorder(5)
    trainer(tmp_path / "g", [GaussianModelPerturbation(rho=0.5, sigma=0.0, k=3)], max_steps=3).fit(
        m, TensorData(x, y, 16))
    for a, b in zip(raw, m.seen):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_gmp_on_a_quadratic_adds_rho_times_the_hessian_times_the_mean_perturbation(tmp_path):
    """Linear regression: ∇ℓ(w + Δ) = ∇ℓ(w) + H_B Δ, so GMP's gradient is g + ρ H_B mean_j Δ_j."""
    d, rho, sigma, k = 5, 0.5, 0.3, 4
    x, y = unit_sphere_regression(16, d, seed=5)
    raw = plain_grads(d, x, y, 1, 16, tmp_path)
    m = recorder(d)
    gmp = GaussianModelPerturbation(rho=rho, sigma=sigma, k=k, seed=7)
    trainer(tmp_path / "q", [gmp], max_steps=1).fit(m, TensorData(x, y, 16))
    base = {"network.linear.weight": m.network.linear.weight.detach()}
    eps = standard_normal(base, k, torch.Generator().manual_seed(7))["network.linear.weight"].reshape(k, d)
    h = (x.T @ x / 16).double()
    expected = raw[0].double() + rho * h @ (sigma * eps.double().mean(0))
    assert torch.allclose(m.seen[0].double(), expected, rtol=1e-5, atol=1e-6)


def test_gmp_refuses_gradient_accumulation(tmp_path):
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=1"):
        trainer(tmp_path, [GaussianModelPerturbation()], max_steps=1, accumulate_grad_batches=2).fit(
            Classifier(MLP(64, 10, 8)), DigitsDataModule())


# ---------------------------------------------------------------- variability regularizers
@pytest.mark.parametrize("reference", ["dataset", "none"])
def test_regularizer_gradients_match_closed_form(tmp_path, reference):
    """ℓ_i = ½(wᵀx_i − y_i)²: g_i = r_i x_i, H_i = x_i x_iᵀ.
    ∇Reg2 = 2λ2 H_B (ḡ_B − ref), ∇Reg1 = (2λ1/b) Σ_i H_i (g_i − ref), ref = ∇L(S) or 0."""
    d, lam1, lam2 = 4, 0.3, 0.7
    x, y = unit_sphere_regression(48, d, seed=6)
    raw = plain_grads(d, x, y, 1, 16, tmp_path)
    m = recorder(d)
    reg = VariabilityRegularizer(lambda1=lam1, lambda2=lam2, reference=reference)
    trainer(tmp_path / "r", [reg], max_steps=1).fit(m, TensorData(x, y, 16))
    w = m.network.linear.weight.detach().double().squeeze(0)
    xd, yd = x.double(), y.double().squeeze(1)
    g_all = (xd @ w - yd)[:, None] * xd
    ref = g_all.mean(0) if reference == "dataset" else torch.zeros(d, dtype=torch.float64)
    xb, gb = xd[:16], g_all[:16]
    h_b = xb.T @ xb / 16
    reg2 = 2 * lam2 * h_b @ (gb.mean(0) - ref)
    reg1 = 2 * lam1 / 16 * sum(torch.outer(xi, xi) @ (gi - ref) for xi, gi in zip(xb, gb))
    assert torch.allclose(m.seen[0].double(), raw[0].double() + reg1 + reg2, rtol=1e-5, atol=1e-7)


def test_regularizer_arguments():
    with pytest.raises(MisconfigurationException):
        VariabilityRegularizer()
    with pytest.raises(MisconfigurationException):
        VariabilityRegularizer(lambda2=1.0, reference="batch")  # type: ignore[arg-type]


# ---------------------------------------------------------------- twin runs
def _twin_fit(tmp_path, mode, lr_decay=1.0, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = Classifier(MLP(64, 10, 32, dropout=0.2), lr=0.1, lr_decay=lr_decay)
    twin = TwinRunStability(mode=mode, **kwargs)
    records = []
    twin.step_log.add_listener(records.extend)
    trainer(tmp_path, [twin], max_epochs=2, limit_val_batches=1).fit(module, DigitsDataModule(batch_size=64))
    return twin, module, records


@pytest.mark.parametrize("lr_decay", [1.0, 0.5])
def test_twin_without_a_changed_sample_does_not_diverge_at_all(tmp_path, lr_decay):
    """Also under a learning-rate schedule (the scheduler moves the rate after each epoch's last step)."""
    twin, module, records = _twin_fit(tmp_path, "none", lr_decay=lr_decay)
    assert len(records) == 40  # 2 epochs × 20 steps
    assert all(r.values["stability/divergence"] == 0.0 for r in records)
    for a, b in zip(module.parameters(), twin.twin.parameters()):
        assert torch.equal(a, b)  # lockstep: same init, batches, dropout masks, optimizer


@pytest.mark.parametrize("mode", ["replace", "remove"])
def test_twin_with_a_changed_sample_diverges_after_it_is_seen(tmp_path, mode):
    twin, module, records = _twin_fit(tmp_path, mode, seed=3)
    values = [r.values["stability/divergence"] for r in records]
    first = next(i for i, v in enumerate(values) if v > 0)
    assert all(v == 0.0 for v in values[:first])  # identical until the changed sample is used
    assert values[-1] > 0 and twin.changed_batches == 2  # the sample is in one batch per epoch
    layers = [k for k in records[-1].values if k.startswith("stability/divergence/")]
    assert sorted(layers) == ["stability/divergence/network.net.1", "stability/divergence/network.net.4"]
    assert records[-1].values["stability/divergence_normalized"] == pytest.approx(
        values[-1] / math.sqrt(sum(float(p.double().pow(2).sum()) for p in module.parameters())), rel=1e-9)


def test_twin_finds_the_changed_sample_through_the_modules_batch_hooks(tmp_path):
    """A module whose ``on_after_batch_transfer`` changes the data (here: scales the inputs): the
    chosen sample is compared as a prepared row of a batch, so it is still found and replaced (a
    review, round 34: compared raw, it was never found — no divergence, only a warning)."""

    class Scaled(Classifier):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return x * 2.0, y

    pl.seed_everything(0, verbose=False)
    twin = TwinRunStability(mode="replace", seed=3)
    trainer(tmp_path, [twin], max_epochs=2, limit_val_batches=1).fit(
        Scaled(MLP(64, 10, 32), lr=0.1), DigitsDataModule(batch_size=64))
    assert twin.changed_batches == 2  # the sample is in one batch per epoch


def test_twin_refuses_mixed_precision(tmp_path):
    with pytest.raises(MisconfigurationException, match="full precision"):
        trainer(tmp_path, [TwinRunStability()], max_steps=1, precision="bf16-mixed").fit(
            Classifier(MLP(64, 10, 8)), DigitsDataModule())


# ---------------------------------------------------------------- phases
def test_find_valley_on_a_synthetic_double_descent():
    e = np.arange(40, dtype=float)
    series = np.where(e < 8, 10 * np.exp(-0.5 * e), 10 * np.exp(-4) + 0.3 * (e - 8) * np.exp(-(e - 8) / 10))
    rng = np.random.default_rng(0)
    noisy = series * (1 + 0.03 * rng.standard_normal(e.size))
    assert find_valley(series, smooth=1) == 8
    valley = find_valley(noisy, smooth=3, rise=0.1, patience=2)
    assert valley is not None and abs(valley - 8) <= 2
    assert find_valley(10 * np.exp(-0.3 * e)) is None  # a plain descent has no valley
    assert find_valley(noisy[:9]) is None  # not confirmed before the rise


def test_phase_detector_logs_epoch_means_and_feeds_clipping(tmp_path):
    torch.manual_seed(0)
    detector = DispersionPhaseDetector(smooth=1, rise=0.05, patience=1)
    clip = DynamicGradientClipping(auto_start="dispersion")
    trainer(tmp_path, [GradientDispersion(), detector, clip], max_epochs=8, limit_train_batches=5,
            limit_val_batches=0).fit(Classifier(MLP(64, 10, 64), lr=0.5), DigitsDataModule(batch_size=32, label_noise=0.6))
    assert len(detector.epoch_means) == 8
    assert detector.valley_epoch == find_valley(detector.epoch_means, smooth=1, rise=0.05, patience=1)
    assert detector.valley_epoch is not None and detector.detected_epoch is not None
    assert clip.start_step == 5 * (detector.detected_epoch + 1)  # from the step after the confirming epoch
    with pytest.raises(MisconfigurationException, match="DispersionPhaseDetector"):
        trainer(tmp_path, [DynamicGradientClipping(auto_start="dispersion")], max_steps=1).fit(
            Classifier(MLP(64, 10, 8)), DigitsDataModule())


def test_interventions_reject_bad_arguments():
    with pytest.raises(MisconfigurationException):
        DynamicGradientClipping(alpha=0)
    with pytest.raises(MisconfigurationException):
        GaussianModelPerturbation(rho=1.5)
    with pytest.raises(MisconfigurationException):
        TwinRunStability(mode="swap")  # type: ignore[arg-type]


def test_twin_recognizes_a_torchvision_style_sample_by_every_field():
    """A dataset item ``(image, int)`` against collated ``(images, labels)``: same image with another
    label is a different sample; the replacement swaps image and label."""
    twin = TwinRunStability(mode="replace")
    twin._sample, twin._replacement = (torch.ones(3), 4), (torch.zeros(3), 7)
    batch = (torch.stack([torch.ones(3), torch.ones(3), torch.full((3,), 2.0)]), torch.tensor([4, 5, 4]))
    assert twin._matches(batch).tolist() == [True, False, False]
    images, labels = twin._twin_batch_of(batch)
    assert torch.equal(images[0], torch.zeros(3)) and labels.tolist() == [7, 5, 4]
    removing = TwinRunStability(mode="remove")
    removing._sample = (torch.ones(3), 4)
    images, labels = removing._twin_batch_of(batch)
    assert labels.tolist() == [5, 4] and images.shape == (2, 3)
