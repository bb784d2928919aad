"""LightningDataModules: offline digits, synthetic teacher regression, torchvision image sets."""

from genbounds.data.base import EpochSeededSampler, SupervisedDataModule, corrupt_labels
from genbounds.data.digits import DigitsDataModule
from genbounds.data.teacher import SparseRegressionDataModule, TeacherRegressionDataModule
from genbounds.data.vision import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "EpochSeededSampler",
    "FashionMNISTDataModule",
    "MNISTDataModule",
    "SparseRegressionDataModule",
    "SupervisedDataModule",
    "TeacherRegressionDataModule",
    "corrupt_labels",
]
