"""scikit-learn's bundled 8×8 handwritten digits: the offline demo data set (no download)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from genbounds.data.base import SupervisedDataModule, corrupt_labels


class DigitsDataModule(SupervisedDataModule):
    """The 1,797 8×8 digit images shipped inside scikit-learn, scaled to [0, 1] and flattened to 64
    features, split at random into a training set and a held-out set.

    Args:
        batch_size: batch size (seed 001 E.1 uses 60).
        val_fraction: share of the samples held out.
        label_noise: fraction of labels replaced by uniformly random ones, in every split
            (seed 001 §5).
        test_fraction: share of the samples kept in a third, test split that no callback sees
            (``test_dataloader``), e.g. to check a test-error bound after the run.
        seed: seeds the split, the label noise and the shuffling.
        shuffle: shuffle the training set each epoch.
        num_workers: dataloader workers (the data is in memory; 0 is fastest).
        drop_last: drop the last incomplete training batch.
    """

    num_features = 64
    num_classes = 10

    def __init__(
        self,
        batch_size: int = 60,
        val_fraction: float = 0.3,
        label_noise: float = 0.0,
        test_fraction: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, shuffle, num_workers, drop_last)
        self.save_hyperparameters()  # every setting in HParams / hparams.yaml (run identity)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"DigitsDataModule(val_fraction={val_fraction}) must be in (0, 1)")
        if not 0.0 <= test_fraction < 1.0 - val_fraction:
            raise ValueError(f"DigitsDataModule(test_fraction={test_fraction}) must be in [0, 1 − val_fraction)")
        self.val_fraction = val_fraction
        self.label_noise = label_noise
        self.test_fraction = test_fraction
        self.test_set: TensorDataset | None = None

    def build(self) -> None:
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(x.shape[0], generator=gen)
        n_val = int(round(self.val_fraction * x.shape[0]))
        n_test = int(round(self.test_fraction * x.shape[0]))
        val_idx, train_idx = order[:n_val], order[n_val:x.shape[0] - n_test]
        test_idx = order[x.shape[0] - n_test:]
        y_train = corrupt_labels(y[train_idx], self.label_noise, self.num_classes, gen)
        y_val = corrupt_labels(y[val_idx], self.label_noise, self.num_classes, gen)
        self.train_set = TensorDataset(x[train_idx], y_train)
        self.val_set = TensorDataset(x[val_idx], y_val)
        if n_test:  # a third split no callback sees: for checking a test-error bound after the run
            self.test_set = TensorDataset(x[test_idx], corrupt_labels(y[test_idx], self.label_noise,
                                                                      self.num_classes, gen))

    def test_dataloader(self):
        from torch.utils.data import DataLoader

        if self.test_set is None:
            self.setup("test")
        assert self.test_set is not None, "DigitsDataModule(test_fraction=0) has no test split"
        return DataLoader(self.test_set, batch_size=self.batch_size)
