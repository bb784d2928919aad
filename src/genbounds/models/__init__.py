"""Reference networks of the papers and the LightningModules that train them."""

from genbounds.models.modules import Classifier, Regressor
from genbounds.models.networks import MLP, AlexNetSmall, FashionCNN, LinearRegression, TwoLayerReLU

__all__ = ["MLP", "AlexNetSmall", "Classifier", "FashionCNN", "LinearRegression", "Regressor", "TwoLayerReLU"]
