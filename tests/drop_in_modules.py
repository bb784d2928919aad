"""LightningModules written the way Lightning's documentation writes them, and their data.

None of these modules knows about genbounds: no ``per_sample_loss``, no ``loss_fn``. Each
``training_step`` computes its loss with ``F.cross_entropy`` / ``F.mse_loss`` / an ``nn.*Loss``,
calls ``self.log`` and returns the loss (or a dict holding it). ``tests/test_drop_in.py`` runs
the default genbounds suite on each of them and checks that training is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos.transformer import LightningTransformer
from lightning.pytorch.demos.transformer import Transformer as DemoTransformer
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

NUM_CLASSES = 4


# --------------------------------------------------------------------------------------- data
def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def vectors(n: int, d: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian blobs: ``x ∈ R^d`` around one of ``NUM_CLASSES`` centres, label = the centre."""
    gen = _generator(seed)
    centres = 1.5 * torch.randn(NUM_CLASSES, d, generator=_generator(1234))
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = centres[y] + torch.randn(n, d, generator=gen)
    return x, y


def images(n: int, size: int = 8, channels: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Small images whose class decides a bright quadrant."""
    gen = _generator(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    x = 0.5 * torch.randn(n, channels, size, size, generator=gen)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, r * h:(r + 1) * h, s * h:(s + 1) * h] += 1.0
    return x, y


def tokens(n: int, length: int = 6, vocab: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token sequences; the label is the most frequent of the first ``NUM_CLASSES`` tokens."""
    gen = _generator(seed)
    x = torch.randint(0, vocab, (n, length), generator=gen)
    counts = torch.stack([(x == k).sum(1) for k in range(NUM_CLASSES)], 1).float()
    y = (counts + 0.1 * torch.arange(NUM_CLASSES)).argmax(1)
    return x, y


def tagged_tokens(n: int, length: int = 6, vocab: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Token sequences with a label per token (``token mod NUM_CLASSES``, flipped where the
    previous token is even); the last positions of some sequences are padding (``-100``)."""
    gen = _generator(seed)
    x = torch.randint(1, vocab, (n, length), generator=gen)
    prev = torch.cat([torch.zeros(n, 1, dtype=torch.long), x[:, :-1]], 1)
    y = (x + (prev % 2 == 0).long()) % NUM_CLASSES
    pad = torch.randint(0, 3, (n,), generator=gen)
    for i, k in enumerate(pad.tolist()):
        if k:
            x[i, -k:] = 0
            y[i, -k:] = -100
    return x, y


def sequences(n: int, length: int = 5, features: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Float sequences ``[n, T, F]``; the label is the sign pattern of the time-summed first two features."""
    gen = _generator(seed)
    x = torch.randn(n, length, features, generator=gen)
    s = x.sum(1)
    y = (s[:, 0] > 0).long() * 2 + (s[:, 1] > 0).long()
    return x, y


class AugmentedDataset(Dataset):
    """A training set whose ``__getitem__`` draws its augmentation from the global RNG (random
    noise and a random sign flip), as torchvision-style transforms do."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        noise = 0.1 * torch.rand(self.x.shape[1:])
        flip = 1.0 if float(torch.rand(())) < 0.5 else -1.0
        return self.x[i] * flip + noise, self.y[i]


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader


def loaders(make: Callable[..., tuple[Tensor, Tensor]], n_train: int = 48, n_val: int = 16, batch_size: int = 8,
            augmented: bool = False, num_workers: int = 0, persistent_workers: bool = False,
            **kwargs: Any) -> Loaders:
    """A shuffled training loader (``num_workers`` workers) and a validation loader (workers only
    with ``persistent_workers``, then both loaders keep theirs)."""
    x, y = make(n_train, seed=0, **kwargs)
    xv, yv = make(n_val, seed=1, **kwargs)
    train_set: Dataset = AugmentedDataset(x, y) if augmented else TensorDataset(x, y)
    extra: dict[str, Any] = {"num_workers": num_workers, "persistent_workers": persistent_workers}
    val_extra = extra if persistent_workers else {}
    return Loaders(DataLoader(train_set, batch_size=batch_size, shuffle=True, **extra),
                   DataLoader(TensorDataset(xv, yv), batch_size=batch_size, **val_extra))


# ------------------------------------------------------------------------------------ modules
class CEClassifier(pl.LightningModule):
    """(1) The classic: an MLP, ``F.cross_entropy``, Adam."""

    def __init__(self, d: int = 16, hidden: int = 16, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class MSEAutoencoder(pl.LightningModule):
    """(2) Lightning's README autoencoder: ``nn.functional.mse_loss(x_hat, x)``."""

    def __init__(self, d: int = 16, code: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d, 12), nn.ReLU(), nn.Linear(12, code))
        self.decoder = nn.Sequential(nn.Linear(code, 12), nn.ReLU(), nn.Linear(12, d))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        x = x.view(x.size(0), -1)
        z = self.encoder(x)
        x_hat = self.decoder(z)
        loss = nn.functional.mse_loss(x_hat, x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", F.mse_loss(self.decoder(self.encoder(x)), x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class BasicBlock(nn.Module):
    """ResNet's BasicBlock: conv-BN-ReLU-conv-BN plus the (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetClassifier(pl.LightningModule):
    """(3) A ResNet-18-style net (stem + BasicBlocks, train-mode BatchNorm), SGD with momentum,
    ``nn.CrossEntropyLoss``. ``torchvision=True`` uses ``torchvision.models.resnet18``."""

    def __init__(self, width: int = 4, torchvision: bool = False, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if torchvision:
            from torchvision.models import resnet18

            self.model = resnet18(num_classes=num_classes)
        else:
            self.model = nn.Sequential(
                nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                BasicBlock(width, width), BasicBlock(width, 2 * width, stride=2),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.criterion(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


class TokenTransformer(pl.LightningModule):
    """(4) Embedding + ``nn.TransformerEncoder`` (attention, LayerNorm, dropout), mean-pooled."""

    def __init__(self, vocab: int = 12, d_model: int = 16, nhead: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class TokenTagger(TokenTransformer):
    """(4b) Token classification: a label per token, padding positions ignored
    (``ignore_index=-100``), the logits flattened to ``[b·T, C]`` as the docs' taggers do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 16, padding_idx=0)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens), src_key_padding_mask=tokens == 0))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)))


class SequenceFirstTransformer(TokenTransformer):
    """(4d) The layout of PyTorch's language-model tutorials: tokens turned to ``[T, b]`` before
    the embedding, a sequence-first ``nn.TransformerEncoder`` (the default ``batch_first=False``)
    under a causal mask, mean over positions, a linear head."""

    def __init__(self, vocab: int = 12, d_model: int = 16, nhead: int = 2) -> None:
        super().__init__(vocab, d_model, nhead)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=32, dropout=0.1)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, tokens: Tensor) -> Tensor:
        src = self.embed(tokens.t())  # [T, b, d]
        mask = nn.Transformer.generate_square_subsequent_mask(src.shape[0])
        return self.head(self.encoder(src, mask=mask, is_causal=True).mean(0))


def next_tokens(n: int, length: int = 10, vocab: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Language-model pairs: a token sequence and the same sequence shifted by one."""
    x = torch.randint(0, vocab, (n, length + 1), generator=_generator(seed))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class SharedPositionsLM(TokenTagger):
    """(4e) GPT-style: token embedding plus a learned positional embedding of ``arange(T)``
    broadcast over the batch, one causal encoder layer, a next-token head (the tagger's steps)."""

    def __init__(self, vocab: int = 16, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(32, d)
        self.encoder = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        h = self.embed(idx) + self.pos(torch.arange(T, device=idx.device))
        return self.head(self.encoder(h, src_mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True))


class LightningDemoTransformer(LightningTransformer):
    """(4c) Lightning's own demo, ``lightning.pytorch.demos.transformer.LightningTransformer``,
    unchanged but for size: its ``nn.Transformer`` (encoder and decoder, causal target mask,
    dropout 0.2, ``log_softmax`` + ``F.nll_loss`` over ``[b·T, V]``), made small; its
    ``prepare_data`` downloads WikiText-2, so it is skipped here, and the two steps log their loss
    (the demo logs nothing)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=16)
        self.model = DemoTransformer(vocab_size=16, ninp=16, nhead=2, nhid=32, nlayers=1)

    def prepare_data(self) -> None:
        pass

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val_loss", F.nll_loss(self(inputs, target), target.view(-1)))


class RecurrentClassifier(pl.LightningModule):
    """(5)/(6) An ``nn.LSTM`` or ``nn.GRU`` over ``[b, T, F]`` sequences; with
    ``batch_first=False`` the module transposes to ``[T, b, F]`` as the docs' RNN examples do."""

    def __init__(self, cell: str = "lstm", batch_first: bool = True, features: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.batch_first = batch_first
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.rnn = rnn(features, hidden, batch_first=batch_first)
        self.fc = nn.Linear(hidden, NUM_CLASSES)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: Tensor) -> Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.fc(last)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class MetricClassifier(CEClassifier):
    """(7) ``training_step`` returns a dict and updates a torchmetrics ``Accuracy``."""

    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits.argmax(1), y)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self(x), y)
        self.log("val_acc", self.val_acc)


class MetricCollectionClassifier(CEClassifier):
    """(7b) torchmetrics' documented pattern: a ``MetricCollection`` called in ``training_step``,
    its output logged with ``log_dict`` and indexed by name."""

    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        metrics = torchmetrics.MetricCollection([
            torchmetrics.Accuracy(task="multiclass", num_classes=NUM_CLASSES),
            torchmetrics.F1Score(task="multiclass", num_classes=NUM_CLASSES, average="macro")])
        self.train_metrics = metrics.clone(prefix="train_")

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.CrossEntropyLoss()(logits, y)
        output = self.train_metrics(logits, y)
        self.log_dict(output)
        self.log("train_acc_step", output["train_MulticlassAccuracy"], prog_bar=True)
        self.log("train_loss", loss)
        return loss


class CosineClassifier(CEClassifier):
    """(8) SGD with a cosine learning-rate schedule (stepped per optimizer step); the Trainer
    clips gradients (``gradient_clip_val``)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FrozenFirstLayer(CEClassifier):
    """(11) Transfer-learning style: the first layer is frozen (``requires_grad=False``)."""

    def __init__(self) -> None:
        super().__init__()
        for p in self.net[0].parameters():
            p.requires_grad = False

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


class ManualOptimization(CEClassifier):
    """(12) Manual optimization with one optimizer, as in Lightning's manual-optimization docs:
    ``zero_grad``, ``manual_backward``, ``clip_gradients``, ``step``, and the scheduler stepped
    by hand."""

    def __init__(self, clip: bool = True) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.clip = clip

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.clip:
            self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()
        self.log("train_loss", loss)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


class Regularized(CEClassifier):
    """(13) The training loss holds an explicit weight penalty: ``ce + 0.01 · Σ w²``."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        ce = F.cross_entropy(self(x), y)
        reg = sum(w.pow(2).sum() for w in self.parameters())
        loss = ce + 0.01 * reg
        self.log("train_loss", loss)
        self.log("train_ce", ce)
        return loss


# -------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    """A module factory, its data and the Trainer arguments it is meant to run with."""

    module: Callable[[], pl.LightningModule]
    data: Callable[..., Loaders]
    trainer: dict[str, Any] = field(default_factory=dict)
    suite: dict[str, Any] = field(default_factory=dict)
    """Extra ``default_suite`` arguments for this case."""
    returns_data_loss: bool = True
    """``training_step`` returns exactly the mean data loss (no penalty, no manual optimization)."""


def _vec(**kw: Any) -> Loaders:
    return loaders(vectors, **kw)


CASES: dict[str, Case] = {
    "ce_adam": Case(CEClassifier, _vec),
    "mse_autoencoder": Case(MSEAutoencoder, _vec),
    "resnet_blocks": Case(ResNetClassifier, lambda **kw: loaders(images, **kw)),
    "transformer": Case(TokenTransformer, lambda **kw: loaders(tokens, **kw)),
    "transformer_tagger": Case(TokenTagger, lambda **kw: loaders(tagged_tokens, **kw)),
    "transformer_sequence_first": Case(SequenceFirstTransformer, lambda **kw: loaders(tokens, **kw)),
    "transformer_lightning_demo": Case(LightningDemoTransformer, lambda **kw: loaders(next_tokens, **kw)),
    "lstm_batch_first": Case(lambda: RecurrentClassifier("lstm", batch_first=True),
                             lambda **kw: loaders(sequences, **kw)),
    "gru_time_major": Case(lambda: RecurrentClassifier("gru", batch_first=False),
                           lambda **kw: loaders(sequences, **kw)),
    "dict_torchmetrics": Case(MetricClassifier, _vec),
    "metric_collection": Case(MetricCollectionClassifier, _vec),
    "cosine_clip": Case(CosineClassifier, _vec, {"gradient_clip_val": 0.5}),
    "accumulate_4": Case(CEClassifier, lambda **kw: _vec(**{"batch_size": 4, **kw}),
                         {"accumulate_grad_batches": 4, "limit_train_batches": 8}),
    "bf16_mixed": Case(CEClassifier, _vec, {"precision": "bf16-mixed"}),
    "frozen_first_layer": Case(FrozenFirstLayer, _vec),
    "manual_optimization": Case(ManualOptimization, _vec, returns_data_loss=False),
    "regularized": Case(Regularized, _vec, returns_data_loss=False),
}
