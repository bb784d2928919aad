"""Synthetic teacher–student regression (seed 001 E.4)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.utils.data import TensorDataset

from genbounds.data.base import SupervisedDataModule


class TeacherRegressionDataModule(SupervisedDataModule):
    """Inputs ``x ~ N(0, I_d)`` normalized to ``‖x‖ = 1``; targets from a fixed random teacher.

    * ``teacher="relu"`` (seed 001 E.4): ``y = tanh(1/√m Σ_r a_r ReLU(w_rᵀx))`` with ``m``
      hidden units, ``w_r ~ N(0, I)``, ``a_r ~ unif{±1}``; the ``tanh`` keeps ``|y| ≤ 1``.
    * ``teacher="linear"``: ``y = βᵀx`` with ``β ~ N(0, I)``.

    Optional Gaussian label noise ``noise_std``. Paper scale: ``input_dim=200``,
    ``teacher_width=10000``, 20,000 training samples, batch 100.

    Args:
        num_train: training samples ``n``.
        num_val: held-out samples.
        input_dim: ``d_0``.
        teacher: ``"relu"`` or ``"linear"``.
        teacher_width: hidden units of the ReLU teacher.
        noise_std: standard deviation of additive target noise.
        batch_size: batch size.
        seed: seeds the teacher, the inputs, the noise and the shuffling.
        shuffle: shuffle the training set each epoch.
        num_workers: dataloader workers.
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 2000,
        input_dim: int = 200,
        teacher: Literal["relu", "linear"] = "relu",
        teacher_width: int = 10000,
        noise_std: float = 0.0,
        batch_size: int = 100,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, shuffle, num_workers, drop_last)
        self.save_hyperparameters()  # every setting in HParams / hparams.yaml (run identity)
        if teacher not in ("relu", "linear"):
            raise ValueError(f"TeacherRegressionDataModule(teacher={teacher!r}) must be 'relu' or 'linear'")
        self.num_train_samples = num_train
        self.num_val = num_val
        self.input_dim = input_dim
        self.teacher = teacher
        self.teacher_width = teacher_width
        self.noise_std = noise_std

    def _targets(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.teacher == "linear":
            beta = torch.randn(self.input_dim, generator=gen)
            return x @ beta
        w = torch.randn(self.input_dim, self.teacher_width, generator=gen)
        a = torch.randint(0, 2, (self.teacher_width,), generator=gen).float() * 2 - 1
        return torch.tanh(torch.relu(x @ w) @ a / math.sqrt(self.teacher_width))

    def build(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        n = self.num_train_samples + self.num_val
        x = torch.randn(n, self.input_dim, generator=gen)
        x = x / x.norm(dim=1, keepdim=True)
        y = self._targets(x, gen)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(n, generator=gen)
        y = y.unsqueeze(1)
        k = self.num_train_samples
        self.train_set = TensorDataset(x[:k], y[:k])
        self.val_set = TensorDataset(x[k:], y[k:])


class SparseRegressionDataModule(SupervisedDataModule):
    """Seed 002 A.2's sparse regression: ``x ~ N(0, I_d)``, ``y = ⟨β, x⟩ + ξ``, ``ξ ~ N(0, noise_std²)``,
    ``β`` with ``sparsity`` non-zero entries drawn from ``N(0, 2)`` (paper: d = 100, 40 training
    samples, 5 non-zeros, unit noise). The held-out set is a fresh sample; the population loss of a
    linear predictor ``w`` is known in closed form: ``E(⟨w, x⟩ − y)² = ‖w − β‖² + noise_std²``.

    Args:
        num_train: training samples.
        num_val: held-out samples.
        input_dim: ``d``.
        sparsity: non-zero entries of ``β``.
        noise_std: label-noise standard deviation.
        batch_size: batch size.
        seed: seeds the inputs and the noise (the training set).
        beta_seed: seeds ``β`` (shared by training sets of different ``seed``).
        shuffle: shuffle the training set each epoch.
        num_workers: dataloader workers.
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        num_train: int = 40,
        num_val: int = 1000,
        input_dim: int = 100,
        sparsity: int = 5,
        noise_std: float = 1.0,
        batch_size: int = 4,
        seed: int = 0,
        beta_seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, shuffle, num_workers, drop_last)
        self.save_hyperparameters()  # every setting in HParams / hparams.yaml (run identity)
        self.num_train_samples = num_train
        self.num_val = num_val
        self.input_dim = input_dim
        self.sparsity = sparsity
        self.noise_std = noise_std
        self.beta_seed = beta_seed
        gen = torch.Generator().manual_seed(beta_seed)
        self.beta = torch.zeros(input_dim)
        support = torch.randperm(input_dim, generator=gen)[:sparsity]
        self.beta[support] = math.sqrt(2.0) * torch.randn(sparsity, generator=gen)

    def population_loss(self, weight: torch.Tensor) -> float:
        """``E(⟨w, x⟩ − y)²`` for a linear predictor ``w``."""
        return float(((weight.detach().cpu().double() - self.beta.double()) ** 2).sum()) + self.noise_std**2

    def build(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        n = self.num_train_samples + self.num_val
        x = torch.randn(n, self.input_dim, generator=gen)
        y = (x @ self.beta + self.noise_std * torch.randn(n, generator=gen)).unsqueeze(1)
        k = self.num_train_samples
        self.train_set = TensorDataset(x[:k], y[:k])
        self.val_set = TensorDataset(x[k:], y[k:])
