"""Reference networks of the papers and the LightningModules that train them."""

from genbounds.models.modules import Classifier, Regressor
from genbounds.models.networks import MLP, AlexNetSmall, DiagonalLinearNetwork, FashionCNN, LinearRegression, TwoLayerReLU

__all__ = ["MLP", "AlexNetSmall", "Classifier", "DiagonalLinearNetwork", "FashionCNN", "LinearRegression", "Regressor", "TwoLayerReLU"]
