"""genbounds: Lightning callbacks that measure the quantities information-theoretic and stability
theory say govern the generalization of SGD, and log the bounds built from them."""

from genbounds.callbacks import GradientDispersion

__version__ = "0.1.0"

__all__ = ["GradientDispersion", "__version__"]
