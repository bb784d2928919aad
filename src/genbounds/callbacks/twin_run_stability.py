"""``TwinRunStability``: divergence of a twin trained on a neighbouring data set (SPEC §8)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from genbounds.callbacks.checks import (
    FULL_PRECISIONS,
    check_automatic_optimization,
    check_bool,
    check_callable,
    check_choice,
    check_int,
)
from genbounds.callbacks.probe_data import collated_items, step_batch, training_loader, validation_loader
from genbounds.callbacks.state_key import state_key_once
from genbounds.callbacks.step_log import FlushesStepLog, StepLog, mark_run_complete, weights_step
from genbounds.estimators.batching import batch_size, index_batch, map_tensors, tensor_leaves

Mode = Literal["replace", "remove", "none"]


def _sample_fields(item: Any) -> list[Tensor]:
    """The fields of one dataset item as tensors, in batch order (numbers become 0-d tensors)."""
    if isinstance(item, dict):
        item = list(item.values())
    if not isinstance(item, (tuple, list)):
        item = [item]
    return [torch.as_tensor(field) for field in item]


def _prepared_item(trainer: Trainer, loader: Any, index: int) -> list[Tensor]:
    """Item ``index`` of ``loader``'s dataset as a row of the training batches it is compared with
    and swapped into: collated as a batch of one and prepared as Lightning prepares a training
    batch (``probe_data.step_batch``: the batch hooks, the input precision), its fields' row 0.
    Read under forked RNGs. Raw items were compared with the prepared batches: with a batch hook
    that changes the data no changed sample was found (a review, round 34)."""
    return [leaf[0] for leaf in tensor_leaves(step_batch(trainer, collated_items(trainer, loader, [index]), "train"))]


def _step_output_loss(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "loss" in output:
        return output["loss"]
    raise MisconfigurationException("TwinRunStability: training_step must return the loss or a dict with 'loss'")


class TwinRunStability(FlushesStepLog, Callback):
    r"""Train a twin of the model in lockstep on a neighbouring training set and log how far the
    two drift apart (the uniform-stability divergence ``δ_t = ‖w_t − w'_t‖`` of seed 004 §4 and seed
    002 Lemma 1).

    The twin starts from the same initialization (a copy taken at ``on_train_start``) and follows
    the same batch order, optimizer class, hyper-parameters and learning-rate schedule (the real
    optimizer's learning rates of each step, read before Lightning's schedulers update them) and the
    same dropout masks (the RNG state
    of the real step is replayed). Its batches differ in one sample: with ``mode="replace"`` one
    training sample (seeded choice, or ``sample_index``) is replaced, wherever it occurs, by a
    held-out sample — seed 002's ``S^i``, seed 004's Definition 4; with ``mode="remove"`` it is
    dropped from its batch (seed 004's Fig. 1a experiment); ``mode="none"`` changes nothing (the
    divergence is then exactly 0 — a check of the lockstep). The sample is recognized in a batch
    by value in every field (so an exact duplicate of it elsewhere in the data set is changed too),
    and the training transforms must be deterministic (no random augmentation).

    The twin's step is the module's own ``training_step`` on the twin (detached from the
    trainer: what it logs goes nowhere) or, with ``loss_fn``, the mean of the per-sample losses;
    ``Trainer(gradient_clip_val=…)`` norm clipping is applied to it too. Intervention callbacks
    are not replicated on the twin.

    Logs every ``every_n_steps`` steps: ``stability/divergence = ‖w_t − w'_t‖``,
    ``stability/divergence_normalized = ‖w_t − w'_t‖/‖w_t‖`` (our choice of normalization), and per
    layer ``stability/divergence/<layer>`` and ``stability/divergence_normalized/<layer>``.

    Single process, full precision, ``accumulate_grad_batches=1``.

    Args:
        mode: ``"replace"``, ``"remove"`` or ``"none"``.
        sample_index: index of the training sample to change (default: drawn from ``seed``).
        replacement_index: index of the held-out replacement (default: drawn from ``seed``).
        every_n_steps: log every this many steps.
        per_layer: also log per-layer divergences.
        loss_fn: use ``loss_fn(twin, batch).mean()`` instead of the module's ``training_step``.
        seed: seeds the choice of the samples.
    """

    def __init__(
        self,
        mode: Mode = "replace",
        sample_index: int | None = None,
        replacement_index: int | None = None,
        every_n_steps: int = 1,
        per_layer: bool = True,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        o = "TwinRunStability"
        self.mode = check_choice(o, "mode", mode, ("replace", "remove", "none"))
        self.sample_index = check_int(o, "sample_index", sample_index, minimum=0, optional=True)
        # the state key names the constructor's argument: the drawn index (set at train start)
        # would give a key a resumed run, constructed anew, could not find
        self._key_sample_index = self.sample_index
        self.replacement_index = check_int(o, "replacement_index", replacement_index, minimum=0, optional=True)
        self.every_n_steps = check_int(o, "every_n_steps", every_n_steps)
        self.per_layer = check_bool(o, "per_layer", per_layer)
        self.loss_fn = check_callable(o, "loss_fn", loss_fn)
        self.seed = check_int(o, "seed", seed, minimum=None)
        self.step_log = StepLog("TwinRunStability")
        self.twin: LightningModule | None = None
        self.twin_optimizer: torch.optim.Optimizer | None = None
        self.changed_batches = 0
        self._sample: Any = None
        self._replacement: Any = None
        self._twin_batch: Any = None
        self._rng_state: Tensor | None = None
        self._cuda_rng: Tensor | None = None
        self._lrs: list[float] = []
        self._twin_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return state_key_once(self, mode=self.mode, seed=self.seed, sample_index=self._key_sample_index)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = "TwinRunStability"
        check_automatic_optimization(owner, pl_module)
        if trainer.world_size > 1:
            raise MisconfigurationException(f"{owner} trains its twin in the same process: single-process runs only")
        if str(trainer.precision) not in FULL_PRECISIONS:
            raise MisconfigurationException(
                f"{owner} needs full precision (32-true or 64-true) so that the twin reproduces the training "
                f"step; got precision={trainer.precision!r}"
            )
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(f"{owner} needs accumulate_grad_batches=1")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.twin is None:
            self.twin = copy.deepcopy(pl_module, {id(trainer): None})  # same initialization, no trainer
            if self._twin_state is not None:
                self.twin.load_state_dict(self._twin_state["model"])
        self.twin_optimizer = self._twin_optimizer(trainer.optimizers[0], pl_module)
        if self._twin_state is not None and self._twin_state.get("optimizer"):
            self.twin_optimizer.load_state_dict(self._twin_state["optimizer"])
        self._twin_state = None
        self._choose_samples(trainer)

    def _twin_optimizer(self, optimizer: torch.optim.Optimizer, pl_module: LightningModule) -> torch.optim.Optimizer:
        assert self.twin is not None
        names = {id(p): n for n, p in pl_module.named_parameters()}
        twin_params = dict(self.twin.named_parameters())
        groups = []
        for group in optimizer.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = [twin_params[names[id(p)]] for p in group["params"]]
            groups.append(g)
        return type(optimizer)(groups, **optimizer.defaults)

    def _choose_samples(self, trainer: Trainer) -> None:
        if self.mode == "none":
            return
        loader = training_loader(trainer)
        dataset = loader.dataset
        gen = torch.Generator().manual_seed(self.seed)
        i = self.sample_index if self.sample_index is not None else int(torch.randint(len(dataset), (1,), generator=gen))
        self.sample_index = i
        self._sample = _prepared_item(trainer, loader, i)
        if self.mode == "replace":
            val = validation_loader(trainer)
            if val is None:
                raise MisconfigurationException("TwinRunStability(mode='replace') draws the replacement from the "
                                                "validation data; there is no validation dataloader")
            held = val.dataset
            j = (self.replacement_index if self.replacement_index is not None
                 else int(torch.randint(len(held), (1,), generator=gen)))
            self.replacement_index = j
            self._replacement = _prepared_item(trainer, val, j)
        rank_zero_info(f"TwinRunStability: the twin's training set differs at sample {self.sample_index} "
                       f"({self.mode}" + (f" by held-out sample {self.replacement_index})" if self.mode == "replace" else ")"))

    # ------------------------------------------------------------------ lockstep
    def _matches(self, batch: Any) -> Tensor:
        """Boolean mask of the batch rows equal to the chosen sample in every field (a dataset's
        ``(image, int)`` item is compared with the collated ``(images, labels)`` batch)."""
        rows = tensor_leaves(batch)
        target = _sample_fields(self._sample)
        if len(target) != len(rows):
            raise MisconfigurationException(
                f"TwinRunStability: a dataset item has {len(target)} fields but a batch has {len(rows)} tensors; "
                "the changed sample cannot be recognized in the batches"
            )
        mask = torch.ones(rows[0].shape[0], dtype=torch.bool, device=rows[0].device)
        for r, t in zip(rows, target):
            t = t.to(r.device, r.dtype)
            mask &= (r.reshape(r.shape[0], -1) == t.reshape(1, -1)).all(1)
        return mask

    def _twin_batch_of(self, batch: Any) -> Any:
        if self.mode == "none":
            return batch
        mask = self._matches(batch)
        if not bool(mask.any()):
            return batch
        self.changed_batches += 1
        if self.mode == "remove":
            return index_batch(batch, (~mask).nonzero().squeeze(1))
        leaves = iter(_sample_fields(self._replacement))

        def swap(t: Tensor) -> Tensor:
            r = next(leaves).to(t.device, t.dtype)
            out = t.clone()
            out[mask] = r
            return out

        return map_tensors(batch, swap)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # the step's learning rates, read before Lightning's schedulers move them after the step
        self._lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
        self._twin_batch = self._twin_batch_of(batch)
        self._rng_state = torch.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state(pl_module.device) if pl_module.device.type == "cuda" else None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.twin is None or self._twin_batch is None:
            return
        self._twin_step(trainer, pl_module, self._twin_batch, batch_idx)
        self._twin_batch = None
        if (trainer.global_step - 1) % self.every_n_steps == 0:
            self.step_log.record(weights_step(trainer), self._divergence(pl_module))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _twin_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        assert self.twin is not None and self.twin_optimizer is not None
        if batch_size(batch) == 0:
            return
        for lr, twin_group in zip(self._lrs, self.twin_optimizer.param_groups):
            twin_group["lr"] = lr
        for m_twin, m_main in zip(self.twin.modules(), pl_module.modules()):
            m_twin.training = m_main.training
        devices = [pl_module.device.index or 0] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the detached twin's self.log calls
            torch.set_rng_state(self._rng_state)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state(self._cuda_rng, pl_module.device)
            self.twin_optimizer.zero_grad(set_to_none=True)
            if self.loss_fn is not None:
                loss = self.loss_fn(self.twin, batch).mean()
            else:
                loss = _step_output_loss(self.twin.training_step(batch, batch_idx))
            loss.backward()
            if trainer.gradient_clip_val:
                if trainer.gradient_clip_algorithm == "value":
                    torch.nn.utils.clip_grad_value_(self.twin.parameters(), trainer.gradient_clip_val)
                else:
                    torch.nn.utils.clip_grad_norm_(self.twin.parameters(), trainer.gradient_clip_val)
            self.twin_optimizer.step()

    def _divergence(self, pl_module: LightningModule) -> dict[str, Tensor]:
        assert self.twin is not None
        twin = dict(self.twin.named_parameters())
        diff_sq: dict[str, Tensor] = {}
        norm_sq: dict[str, Tensor] = {}
        for name, p in pl_module.named_parameters():
            layer = name.rsplit(".", 1)[0] if "." in name else name
            d = (p.detach().double() - twin[name].detach().double()).pow(2).sum()
            w = p.detach().double().pow(2).sum()
            diff_sq[layer] = diff_sq.get(layer, 0) + d
            norm_sq[layer] = norm_sq.get(layer, 0) + w
        total_d = torch.stack(list(diff_sq.values())).sum().sqrt()
        total_w = torch.stack(list(norm_sq.values())).sum().sqrt()
        out = {"stability/divergence": total_d, "stability/divergence_normalized": total_d / total_w}
        if self.per_layer:
            for layer in diff_sq:
                out[f"stability/divergence/{layer}"] = diff_sq[layer].sqrt()
                out[f"stability/divergence_normalized/{layer}"] = diff_sq[layer].sqrt() / norm_sq[layer].sqrt()
        return out

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.mode != "none" and self.changed_batches == 0 and trainer.current_epoch == 0:
            rank_zero_warn("TwinRunStability: the chosen sample never appeared in the first epoch's batches; are the "
                           "training transforms random, or limit_train_batches cutting the epoch short?")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        if self.twin is None:
            return {}
        return {
            "model": {k: v.detach().clone() for k, v in self.twin.state_dict().items()},
            "optimizer": self.twin_optimizer.state_dict() if self.twin_optimizer is not None else None,
            "sample_index": self.sample_index, "replacement_index": self.replacement_index,
            "changed_batches": self.changed_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._twin_state = state_dict
        self.sample_index = state_dict.get("sample_index", self.sample_index)
        self.replacement_index = state_dict.get("replacement_index", self.replacement_index)
        self.changed_batches = int(state_dict.get("changed_batches", 0))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._twin_batch = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        mark_run_complete(trainer)
