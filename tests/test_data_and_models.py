"""Data modules and reference models."""

from __future__ import annotations

import pytest
import torch

from genbounds.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    EpochSeededSampler,
    MNISTDataModule,
    TeacherRegressionDataModule,
    corrupt_labels,
)
from genbounds.models import MLP, AlexNetSmall, Classifier, FashionCNN, LinearRegression, Regressor, TwoLayerReLU


def test_digits_split_is_disjoint_reproducible_and_offline():
    a, b = DigitsDataModule(seed=1), DigitsDataModule(seed=1)
    a.setup("fit"), b.setup("fit")
    assert len(a.train_set) + len(a.val_set) == 1797
    assert len(a.val_set) == round(0.3 * 1797)
    xa, ya = a.train_set.tensors
    assert torch.equal(xa, b.train_set.tensors[0]) and torch.equal(ya, b.train_set.tensors[1])
    assert xa.shape[1] == 64 and 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0
    train_rows = {tuple(r.tolist()) for r in xa}
    overlap = sum(tuple(r.tolist()) in train_rows for r in a.val_set.tensors[0])
    assert overlap < 10  # a handful of duplicate images exist in the raw data set


def test_label_noise_replaces_the_requested_fraction_in_both_splits():
    clean, noisy = DigitsDataModule(seed=0), DigitsDataModule(seed=0, label_noise=0.6)
    clean.setup("fit"), noisy.setup("fit")
    for split in ("train_set", "val_set"):
        y0, y1 = getattr(clean, split).tensors[1], getattr(noisy, split).tensors[1]
        changed = float((y0 != y1).float().mean())
        # replaced labels are uniform over 10 classes, so 1/10 of them coincide with the truth
        assert changed == pytest.approx(0.6 * 0.9, abs=0.05), split


def test_corrupt_labels_count_and_range():
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(1000, dtype=torch.long)
    noisy = corrupt_labels(y, 0.5, 4, gen)
    assert int((noisy != 0).sum()) == pytest.approx(500 * 3 / 4, abs=60)
    assert int(noisy.max()) <= 3
    with pytest.raises(ValueError):
        corrupt_labels(y, 1.5, 4, gen)


def test_epoch_seeded_sampler_depends_on_epoch_only():
    s = EpochSeededSampler(range(50), seed=3)
    s.set_epoch(2)
    first = list(s)
    torch.manual_seed(123)  # the global RNG must not matter
    assert list(s) == first
    s.set_epoch(3)
    assert list(s) != first and sorted(s) == list(range(50))


@pytest.mark.parametrize("teacher", ["relu", "linear"])
def test_teacher_regression_inputs_on_unit_sphere(teacher):
    dm = TeacherRegressionDataModule(num_train=300, num_val=100, input_dim=20, teacher=teacher, teacher_width=500)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    assert x.shape == (300, 20) and y.shape == (300, 1)
    assert torch.allclose(x.norm(dim=1), torch.ones(300), atol=1e-5)
    if teacher == "relu":
        assert float(y.abs().max()) <= 1.0
    assert dm.num_train == 300


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_vision_data_missing_files_fail_at_setup_with_a_clear_message(tmp_path, cls):
    dm = cls(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="download=true"):
        dm.setup("fit")


def test_reference_networks_shapes_and_sizes():
    assert MLP(784, 10, 512)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in MLP(784, 10, 512).parameters()) == 784 * 512 + 512 + 512 * 10 + 10
    assert AlexNetSmall(width=0.125)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert FashionCNN()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert LinearRegression(7)(torch.zeros(3, 7)).shape == (3, 1)
    net = TwoLayerReLU(7, width=9)
    assert [n for n, _ in net.named_parameters()] == ["hidden.weight"]  # output signs are fixed
    assert net(torch.ones(4, 7)).shape == (4, 1)


def test_modules_expose_per_sample_losses_consistent_with_training_loss():
    torch.manual_seed(0)
    clf = Classifier(MLP(64, 10, 8))
    x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
    losses = clf.per_sample_loss((x, y))
    assert losses.shape == (5,)
    reg = Regressor(LinearRegression(3, 2))
    xr, yr = torch.randn(4, 3), torch.randn(4, 2)
    expected = 0.5 * ((reg(xr) - yr) ** 2).sum(1)
    assert torch.allclose(reg.per_sample_loss((xr, yr)), expected)
