"""The papers' reference networks (plain ``nn.Module`` s; see :mod:`genbounds.models.modules` for
the LightningModules that train them).

Every network here is built from layers BackPACK supports (Linear, Conv2d) and uses no in-place
operations, so the ``backpack`` dispersion backend covers it entirely.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Fully connected ReLU network; the default is seed 001 E.1's one-hidden-layer MLP with 512
    units.

    Args:
        in_features: input size (inputs are flattened).
        num_classes: output size.
        hidden: width of each hidden layer.
        depth: number of hidden layers.
        dropout: dropout probability after each hidden layer (0 = none; the papers use none).
    """

    def __init__(
        self, in_features: int = 784, num_classes: int = 10, hidden: int = 512, depth: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AlexNetSmall(nn.Module):
    """Seed 001 E.1's AlexNet-style CNN for 32×32 inputs: conv3×3(64) → maxpool3×3 → conv5×5(192)
    → maxpool3×3 → conv3×3(384) → conv3×3(256) → conv3×3(256) → maxpool3×3 → FC(4096) → FC(4096) →
    linear(10), ReLU after every conv and hidden FC layer, no BatchNorm, no dropout.

    The paper gives neither padding nor pool strides; we use "same" padding and pools of stride 2
    (32 → 15 → 7 → 3), so the classifier sees 256·3·3 features. ``width`` scales every channel
    and FC width (``width=1`` is the paper's size, 1/4 makes a CPU-sized model).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()

        def c(n: int) -> int:
            return max(1, int(round(n * width)))

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c(64), 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c(64), c(192), 5, padding=2), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
            nn.Conv2d(c(192), c(384), 3, padding=1), nn.ReLU(),
            nn.Conv2d(c(384), c(256), 3, padding=1), nn.ReLU(),
            nn.Conv2d(c(256), c(256), 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(3, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c(256) * 3 * 3, c(4096)), nn.ReLU(),
            nn.Linear(c(4096), c(4096)), nn.ReLU(),
            nn.Linear(c(4096), num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class FashionCNN(nn.Module):
    """Seed 002 A.3's CNN for 28×28 grey images: conv(1→32, 3×3, stride 1, pad 1) →
    conv(32→64, 3×3, stride 1, pad 1) → FC(128) → linear(10). The paper does not state pooling;
    we put a 2×2 max-pool after each conv (28 → 14 → 7), the usual choice for this network."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, stride=1, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class LinearRegression(nn.Module):
    """``f(x) = Wᵀx`` (seed 001 Theorem 3's linear network). With the half-squared loss and
    ``‖x‖ = 1`` its Hessian is ``x xᵀ`` per sample, so ``Tr H = 1`` exactly."""

    def __init__(self, in_features: int = 200, out_features: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class TwoLayerReLU(nn.Module):
    """Seed 001 Theorem 4's two-layer ReLU network ``f(x) = 1/√m Σ_r a_r ReLU(w_rᵀx)``.

    With ``train_output_layer=False`` (the theorem's setting) the signs ``a_r ~ unif{±1}`` are a
    fixed buffer and only the first layer ``W`` trains.
    """

    def __init__(
        self, in_features: int = 200, width: int = 100, out_features: int = 1, train_output_layer: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, width, bias=False)
        self.width = width
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (out_features, width), generator=gen).float() * 2 - 1
        if train_output_layer:
            self.output = nn.Linear(width, out_features, bias=False)
            with torch.no_grad():
                self.output.weight.copy_(signs / math.sqrt(width))
        else:
            self.output = None
            self.register_buffer("signs", signs / math.sqrt(width))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.hidden(x))
        if self.output is not None:
            return self.output(h)
        return h @ self.signs.t()


class DiagonalLinearNetwork(nn.Module):
    """Seed 002 §4.1's diagonal linear network ``f(x; θ) = ⟨θ_a ⊙ θ_b, x⟩``, ``θ = (θ_a, θ_b) ∈ R^{2d}``:
    linear in ``x`` but over-parameterized and non-convex in ``θ``.

    Args:
        in_features: ``d``.
        init_scale: ``θ_a`` and ``θ_b`` start at ``init_scale · (1 + noise)``.
        init_noise: relative spread of the initialization (seeded by ``seed``).
        seed: initialization seed.
    """

    def __init__(self, in_features: int = 100, init_scale: float = 0.5, init_noise: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.theta_a = nn.Parameter(init_scale * (1 + init_noise * torch.randn(in_features, generator=gen)))
        self.theta_b = nn.Parameter(init_scale * (1 + init_noise * torch.randn(in_features, generator=gen)))

    @property
    def weight(self) -> Tensor:
        """The effective linear predictor ``θ_a ⊙ θ_b``."""
        return self.theta_a * self.theta_b

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight).unsqueeze(-1)
