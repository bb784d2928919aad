"""Which dispersion backend measures a given model (``backend="auto"``), and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from genbounds.callbacks.checks import MIXED_PRECISIONS
from genbounds.callbacks.dispersion.accumulation import AccumulationBackend
from genbounds.callbacks.dispersion.base import DispersionBackend
from genbounds.callbacks.dispersion.microbatch import MicrobatchBackend
from genbounds.callbacks.dispersion.norm_hooks import NormHooksBackend
from genbounds.callbacks.dispersion.per_sample import PerSampleBackend
from genbounds.callbacks.loss_contract import LossContract
from genbounds.estimators.coupling import has_train_batchnorm
from genbounds.estimators.functional import LossFn
from genbounds.estimators.ghost_norms import plan as ghost_plan
from genbounds.estimators.per_sample_gradients import DEFAULT_MEMORY_BUDGET

BACKPACK_ONLY = (nn.RNN, nn.LSTM)
"""Layers only BackPACK reaches (their weights are used inside fused recurrent kernels)."""


def backpack_refuses(layer: nn.Module) -> str | None:
    """Why BackPACK cannot give this recurrent layer's per-sample norms (``None``: it can).

    BackPACK's RNN/LSTM derivatives support one unidirectional layer with ``batch_first=True``,
    biases and no dropout (``tanh`` for ``nn.RNN``), and raise ``NotImplementedError`` inside the
    training backward otherwise: the layer must be refused here, before step 0. BackPACK's own
    check is asked when available, so the rule follows the installed version."""
    checks = []
    try:
        from backpack.core.derivatives.lstm import LSTMDerivatives
        from backpack.core.derivatives.rnn import RNNDerivatives

        checks = [(nn.LSTM, LSTMDerivatives._check_parameters), (nn.RNN, RNNDerivatives._check_parameters)]
    except (ImportError, AttributeError):  # pragma: no cover - other BackPACK versions
        pass
    for kind, check in checks:
        if type(layer) is kind:
            try:
                check(layer)
            except NotImplementedError as err:
                return f"BackPACK: {err}"
            return None
    if not getattr(layer, "batch_first", False):
        return "BackPACK: Batch axis must be first."
    if getattr(layer, "num_layers", 1) != 1 or getattr(layer, "bidirectional", False) or getattr(layer, "dropout", 0):
        return "BackPACK supports one unidirectional layer without dropout"
    return None


@dataclass
class HookCoverage:
    ghost: dict[str, nn.Module] = field(default_factory=dict)
    backpack: dict[str, nn.Module] = field(default_factory=dict)
    uncovered: dict[str, str] = field(default_factory=dict)
    batchnorm_train: bool = False

    @property
    def complete(self) -> bool:
        return not self.uncovered

    def describe(self, limit: int = 6) -> str:
        """The uncovered parameters by reason (one reason said once for all its parameters)."""
        by_reason: dict[str, list[str]] = {}
        for name, why in self.uncovered.items():
            by_reason.setdefault(why, []).append(name)
        items = []
        for why, names in by_reason.items():
            more = len(names) - limit
            items.append(", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "") + f" ({why})")
        return "; ".join(items)


def hook_coverage(module: nn.Module, mixed_precision: bool) -> HookCoverage:
    covered, uncovered = ghost_plan(module)
    cov = HookCoverage(ghost=dict(covered))
    named = dict(module.named_modules())
    for param_name, reason in uncovered.items():
        owner = param_name.rsplit(".", 1)[0] if "." in param_name else ""
        layer = named.get(owner)
        recurrent = layer is not None and type(layer) in BACKPACK_ONLY
        refused = backpack_refuses(layer) if recurrent else None
        if recurrent and not mixed_precision and refused is None:
            cov.backpack[owner] = layer
        elif recurrent:
            cov.uncovered[param_name] = reason + (f" ({refused})" if refused is not None else
                                                  " (BackPACK would sum squares of half-precision activations)")
        else:
            cov.uncovered[param_name] = reason
    cov.batchnorm_train = has_train_batchnorm(module)
    return cov


def is_compiled(module: nn.Module) -> bool:
    ctx = getattr(module, "_compiler_ctx", None)
    return isinstance(ctx, dict) and ctx.get("compiler") is not None or type(module).__name__ == "OptimizedModule"


def choose_backend(
    requested: str,
    trainer: Trainer,
    module: LightningModule,
    contract: LossContract,
    groups: dict[str, list[str]],
    *,
    loss_fn: LossFn,
    num_chunks: int,
    chunk_size: int | None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    use_accumulation_steps: bool = True,
    seed: int = 0,
    accumulate: int | None = None,
) -> tuple[DispersionBackend, str | None]:
    """The backend, and a note for the user when ``auto`` did not get the cheapest exact one
    (``accumulate``: the fit's ``accumulate_grad_batches`` now, as the callback takes it)."""
    accumulate = int(trainer.accumulate_grad_batches) if accumulate is None else accumulate
    mixed = str(trainer.precision) in MIXED_PRECISIONS
    cov = hook_coverage(module, mixed)
    compiled = is_compiled(module)
    blockers: list[str] = []
    if not contract.reads_training_backward:
        why = "see the genbounds warning above" if contract.warned else \
            ("; ".join(contract.notes) or "see the loss contract")
        blockers.append(f"the training loss is not the mean of per-sample losses genbounds can identify ({why})")
    if not cov.complete:
        blockers.append(f"hooks do not reach {cov.describe()}")
    if compiled:
        blockers.append("the module is torch.compile'd (hooks inside a compiled graph are not reliable)")
    free_chunks = use_accumulation_steps and accumulate >= 2 and trainer.world_size == 1
    functorch_ok = contract.per_sample and not cov.batchnorm_train
    method = contract.per_sample_method

    def hooks() -> NormHooksBackend:
        group_index = {}
        names = list(groups)
        for mod_name, layer in {**cov.ghost, **cov.backpack}.items():
            own = [f"{mod_name}.{n}" if mod_name else n for n, p in layer.named_parameters(recurse=False)
                   if p.requires_grad]
            group = next((g for g, members in groups.items() if own and own[0] in members), names[0])
            group_index[mod_name] = names.index(group)
        return NormHooksBackend(cov.ghost, cov.backpack, group_index, len(names), cov.batchnorm_train)

    def microbatch() -> DispersionBackend:
        return AccumulationBackend(accumulate) if free_chunks else MicrobatchBackend(contract_fn, num_chunks, seed)

    contract_fn = loss_fn
    if requested in ("hooks", "backpack"):
        if blockers:
            raise MisconfigurationException(
                f"GradientDispersion(backend={requested!r}) cannot measure this model: " + "; ".join(blockers)
                + ". Use backend='auto', 'functorch' or 'microbatch'.")
        return hooks(), None
    if requested == "functorch":
        if cov.batchnorm_train:
            raise MisconfigurationException(
                "GradientDispersion(backend='functorch') cannot give per-sample gradients of a model with "
                "BatchNorm in train mode (it couples the samples of a batch); use backend='auto' or 'microbatch'.")
        if not contract.per_sample:
            raise MisconfigurationException(
                "GradientDispersion(backend='functorch') needs per-sample losses: " + "; ".join(contract.notes)
                + ". Add `per_sample_loss(self, batch)` to your module or pass `loss_fn=...`, or use "
                "backend='microbatch'.")
        return per_sample_backend(contract_fn, contract, method, chunk_size, memory_budget), None
    if requested == "microbatch":
        return microbatch(), None
    # auto
    if cov.batchnorm_train and free_chunks:
        return AccumulationBackend(accumulate), None
    if not blockers:
        return hooks(), None
    if functorch_ok:
        backend = per_sample_backend(contract_fn, contract, method, chunk_size, memory_budget)
        if contract.warned and len(blockers) == 1 and not contract.reads_training_backward:
            # the loss contract's own warning already explained why; the result is still exact
            backend.description += (" — the per-sample losses depend on each other: the gradients of each "
                                     "through the whole batch" if contract.coupled else
                                     " — the training loss is not the mean of the per-sample losses")
            return backend, None
        return backend, "not reading the training backward because " + "; ".join(blockers)
    return microbatch(), "not reading the training backward because " + "; ".join(blockers) + (
        "" if contract.per_sample else "; no per-sample losses for an exact extra pass")


def per_sample_backend(loss_fn: LossFn, contract: LossContract, method: str, chunk_size: int | None,
                       memory_budget: int) -> PerSampleBackend:
    """The extra-pass backend over ``contract``'s losses: centred at the training step's ``.grad``
    only where that is their mean (no extra term, no random numbers drawn anew)."""
    return PerSampleBackend(loss_fn, method, chunk_size, memory_budget,  # type: ignore[arg-type]
                            grad_is_mean=contract.reads_training_backward, stochastic=contract.stochastic)


def fallback_backend(failed: str, module: nn.Module, contract: LossContract, loss_fn: LossFn | None, *,
                     chunk_size: int | None, memory_budget: int, accumulate: int, world_size: int,
                     use_accumulation_steps: bool, num_chunks: int, seed: int) -> DispersionBackend:
    """The backend after ``failed`` failed on this model: exact per-sample gradients where the hooks
    failed and the losses are per-sample (no train-mode BatchNorm), else the accumulation windows
    (one process, ``accumulate ≥ 2``), else micro-batches."""
    if failed == "hooks" and contract.per_sample and not has_train_batchnorm(module):
        return per_sample_backend(loss_fn, contract, contract.per_sample_method, chunk_size, memory_budget)
    if accumulate >= 2 and world_size == 1 and use_accumulation_steps:
        return AccumulationBackend(accumulate)
    return MicrobatchBackend(loss_fn, num_chunks, seed)
