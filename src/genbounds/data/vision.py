"""torchvision image data sets read from a local ``root``; nothing is downloaded unless asked."""

from __future__ import annotations

import torch
from torchvision import datasets, transforms

from genbounds.data.base import SupervisedDataModule, corrupt_labels, seeded_subset


class _TorchvisionDataModule(SupervisedDataModule):
    dataset_name = ""
    num_classes = 10
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 60,
        label_noise: float = 0.0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        normalize: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(batch_size, seed, shuffle, num_workers, drop_last)
        self.save_hyperparameters()  # every setting in HParams / hparams.yaml (run identity)
        self.root = root
        self.download = download
        self.label_noise = label_noise
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.normalize = normalize

    def _dataset_class(self) -> type:
        return getattr(datasets, self.dataset_name)

    def _load(self, train: bool) -> torch.utils.data.Dataset:
        steps: list = [transforms.ToTensor()]
        if self.normalize:
            steps.append(transforms.Normalize(self.mean, self.std))
        try:
            return self._dataset_class()(
                self.root, train=train, download=self.download, transform=transforms.Compose(steps)
            )
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{type(self).__name__}: the {self.dataset_name} files were not found under "
                f"root={self.root!r} ({err}). Put the torchvision-format files there, or pass "
                f"`--data.init_args.download=true` (needs network access)."
            ) from None

    def build(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        splits = []
        for train, subset in ((True, self.train_subset), (False, self.val_subset)):
            ds = self._load(train)
            if self.label_noise > 0:
                targets = torch.as_tensor(ds.targets)
                noisy = corrupt_labels(targets, self.label_noise, self.num_classes, gen)
                ds.targets = noisy if isinstance(ds.targets, torch.Tensor) else noisy.tolist()
            splits.append(seeded_subset(ds, subset, self.seed + int(train)))
        self.train_set, self.val_set = splits


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST (28×28 grey) from ``root``; the official test split is the held-out set.

    Args:
        root: directory holding ``MNIST/raw`` (torchvision layout).
        download: download when missing (off by default: no network access is assumed).
        batch_size: batch size.
        label_noise: fraction of labels replaced at random in both splits.
        train_subset: use this many random training samples (``None``: all 60,000).
        val_subset: use this many random held-out samples (``None``: all 10,000).
        normalize: standardize with the data set's channel mean and std.
        seed: seeds the subsets, the label noise and the shuffling.
        shuffle: shuffle the training set each epoch.
        num_workers: dataloader workers.
        drop_last: drop the last incomplete training batch.
    """

    dataset_name = "MNIST"
    mean, std = (0.1307,), (0.3081,)


class FashionMNISTDataModule(_TorchvisionDataModule):
    """FashionMNIST (28×28 grey) from ``root``; arguments as :class:`MNISTDataModule`."""

    dataset_name = "FashionMNIST"
    mean, std = (0.2860,), (0.3530,)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (32×32 colour) from ``root`` (``cifar-10-batches-py``); arguments as
    :class:`MNISTDataModule`."""

    dataset_name = "CIFAR10"
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
