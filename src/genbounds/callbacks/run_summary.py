"""What a run shows besides the scalars: the TensorBoard custom-scalars layout, the HParams
(every setting of the run next to its final bounds), the results table at the end of ``fit``
(stdout and the Text tab), and a progress-bar status line while the bounds are computed."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from genbounds.callbacks.overhead import OverheadBudget

if TYPE_CHECKING:
    from genbounds.callbacks.generalization_bound import GeneralizationBound

ISOTROPIC_TITLES = {
    "wang_mao_eq2": "Wang–Mao Eq. 2", "wang_mao_eq3": "Wang–Mao Eq. 3", "neu": "Neu Thm 1",
    "wang_mao_eq2_error": "Wang–Mao Eq. 2, 0-1 error", "neu_error": "Neu Thm 1, 0-1 error",
    "wang_mao_eq2_layerwise": "Wang–Mao Eq. 2, layer-wise", "wang_mao_eq3_layerwise": "Wang–Mao Eq. 3, layer-wise",
    "neu_layerwise": "Neu Thm 7, layer-wise",
}


def describe_optimizer(optimizer: torch.optim.Optimizer) -> tuple[str, bool]:
    """A readable description and whether it is plain SGD (no momentum, no weight decay, one learning
    rate for every parameter group: groups stepped at different rates take a step that is not
    ``η_t·ḡ_B``)."""
    name = type(optimizer).__name__
    extras: list[str] = []
    plain = isinstance(optimizer, torch.optim.SGD)
    lrs = [float(group["lr"]) for group in optimizer.param_groups if "lr" in group]
    if len(set(lrs)) > 1:
        extras.append(f"lr per group={tuple(lrs)}")
        plain = False
    for group in optimizer.param_groups:
        for key in ("momentum", "weight_decay", "dampening", "betas", "eps", "nesterov"):
            if key in group and group[key] not in (0, 0.0, False, None) and f"{key}={group[key]}" not in extras:
                extras.append(f"{key}={group[key]}")
                if key in ("momentum", "weight_decay", "nesterov"):
                    plain = False
    return (f"{name}({', '.join(extras)})" if extras else name), plain


def optimizer_notes(trainer: Trainer) -> tuple[str | None, bool, list[tuple[str, str]]]:
    """The first optimizer's description, whether it is plain SGD, and the warnings (kind, message)
    the bounds' assumptions call for: a step that is not ``η_t·ḡ_B``, a data-dependent schedule."""
    if not trainer.optimizers:
        return None, True, []
    name, plain = describe_optimizer(trainer.optimizers[0])
    notes: list[tuple[str, str]] = []
    if not plain:
        notes.append(("optimizer", f"GeneralizationBound: the optimizer is {name}, not plain SGD; the bounds take "
                      "η_t·ḡ_B as the step and are heuristics here (bound/heuristic = 1)" + (
                          ", with η_t the largest group's learning rate" if "lr per group" in name else "") + "."))
    clip = getattr(trainer, "gradient_clip_val", None)
    module = getattr(trainer, "lightning_module", None)
    own = module is not None and type(module).configure_gradient_clipping is not \
        LightningModule.configure_gradient_clipping  # (the class's: an intervention patches the instance)
    if (clip is not None and float(clip) > 0) or own:
        plain = False
        how = f"gradient_clip_val={clip}" if clip else f"{type(module).__name__}.configure_gradient_clipping"
        notes.append(("clipping", f"GeneralizationBound: gradient clipping ({how}) makes the step differ from "
                      "η_t·ḡ_B whenever it clips, and the bounds take η_t·ḡ_B as the step: they are heuristics here "
                      "(bound/heuristic = 1)."))
    for config in getattr(trainer, "lr_scheduler_configs", []):
        if type(config.scheduler).__name__ == "ReduceLROnPlateau":
            notes.append(("plateau", "GeneralizationBound: ReduceLROnPlateau makes the learning-rate schedule "
                          "data-dependent, which the bounds exclude."))
    return name, plain, notes


@contextmanager
def progress_status(trainer: Trainer, text: str) -> Iterator[None]:
    """Show ``text`` in the progress bar while the block runs (TQDM bars; others: nothing)."""
    bar = None
    callback = getattr(trainer, "progress_bar_callback", None)
    for attr in ("_val_progress_bar", "_train_progress_bar"):
        candidate = getattr(callback, attr, None)
        if candidate is not None and not getattr(candidate, "disable", True):
            bar = candidate
            break
    if bar is None:
        yield
        return
    previous = bar.desc
    bar.set_description_str(text, refresh=True)
    try:
        yield
    finally:
        bar.set_description_str(previous, refresh=True)


def margin_values(values: dict[str, float]) -> dict[str, float]:
    """``±1 SE`` companions for the TensorBoard Margin charts."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key.startswith("bound/") and not key.endswith("_se") and f"{key}_se" in values:
            se = values[f"{key}_se"]
            name = key.split("/", 1)[1]
            out[f"ci/bound/{name}_lower"] = value - se
            out[f"ci/bound/{name}_upper"] = value + se
    for gap in ("measured", "error"):
        if f"gap/{gap}" in values and f"gap/{gap}_se" in values:
            out[f"ci/gap/{gap}_lower"] = values[f"gap/{gap}"] - values[f"gap/{gap}_se"]
            out[f"ci/gap/{gap}_upper"] = values[f"gap/{gap}"] + values[f"gap/{gap}_se"]
    return out


def tensorboard_layout(wanted: tuple[str, ...], groups: list[str]) -> dict:
    """One chart type per category: TensorBoard draws a category's Multiline charts first and its
    Margin charts after them in reverse order, so mixing them would scramble the pairing."""
    bounds: dict[str, list] = {}
    margins: dict[str, list] = {}
    names = [n for n in wanted] + (["neu_abs"] if "neu" in wanted else [])
    for name in names:
        gap = "gap/error" if name.endswith("_error") else "gap/measured"
        title = ISOTROPIC_TITLES.get(name, "Neu Thm 1, |flatness|" if name == "neu_abs" else name)
        bounds[f"{title}: bound vs {gap}"] = ["Multiline", [f"^bound/{name}$", f"^{gap}$"]]
        margins[f"{title} ± SE"] = ["Margin", [f"bound/{name}", f"ci/bound/{name}_lower", f"ci/bound/{name}_upper"]]
    margins["measured gap ± SE (held-out − training loss)"] = ["Margin", ["gap/measured", "ci/gap/measured_lower",
                                                                          "ci/gap/measured_upper"]]
    margins["0-1 error gap ± SE"] = ["Margin", ["gap/error", "ci/gap/error_lower", "ci/gap/error_upper"]]
    gaps = {
        "measured gap and 0-1 error gap": ["Multiline", ["^gap/measured$", "^gap/error$"]],
        "predicted vs measured change of the gap": ["Multiline", ["^gap/predicted_cumulative$",
                                                                  "^gap/measured_change$"]],
    }
    terms = {
        "Wang–Mao Eq. 2: trajectory vs flatness": ["Multiline", ["^bound_terms/trajectory_wang_mao$",
                                                                 "^bound_terms/flatness_wang_mao$"]],
        "Neu Thm 1: trajectory vs flatness": ["Multiline", ["^bound_terms/trajectory_neu$", "^bound_terms/flatness_neu$"]],
        "Wang–Mao Eq. 3: multiplicative factors": ["Multiline", ["^bound_terms/trajectory_factor_wang_mao_eq3$",
                                                                 "^bound_terms/flatness_factor_wang_mao_eq3$"]],
        "selected σ (grid points)": ["Multiline", ["^bound_terms/sigma_(wang_mao_eq2|neu)"]],
    }
    gradients = {
        "gradient dispersion Tr Σ_B": ["Multiline", ["^grad/dispersion$"]],
        "training and validation loss": ["Multiline", ["^train_loss_step$", "^train_loss_epoch$", "^val_loss$"]],
    }
    if len(groups) > 1:
        gradients["dispersion per layer"] = ["Multiline", ["^grad/dispersion/layer/"]]
        gradients["Hessian trace per layer"] = ["Multiline", ["^curv/hessian_trace/layer/"]]
    return {"genbounds: bounds": bounds, "genbounds: bounds ± SE": dict(reversed(list(margins.items()))),
            "genbounds: gap": gaps, "genbounds: terms": terms, "genbounds: gradients": gradients}


def _simple(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and not (isinstance(value, float) and math.isnan(value))


TOP_LEVEL_SETTINGS = ("run_name", "optimizer", "lr", "seed", "batch_size", "data", "model", "R_method", "sigma_grid",
                      "bounds", "n", "d", "cli_overrides")
"""The un-namespaced keys :func:`run_settings` writes (``seed`` is the global seed, not the data
module's): ``genbounds report`` never drops them as repeats of a namespaced key."""


def run_settings(trainer: Trainer, pl_module: LightningModule, bound: GeneralizationBound) -> dict[str, Any]:
    """Every setting that tells runs apart: trainer, data module, model, genbounds, CLI overrides."""
    params: dict[str, Any] = {}
    logger = trainer.logger
    if logger is not None:
        version = logger.version  # (an integer version is Lightning's folder version_N: named as the folder)
        folder = f"version_{version}" if isinstance(version, int) else version
        params["run_name"] = f"{logger.name}/{folder}" if version is not None else str(logger.name)
    params["optimizer"] = bound.optimizer or ""
    if trainer.optimizers:
        group = trainer.optimizers[0].param_groups[0]
        params["lr"] = float(group.get("initial_lr", group["lr"]))
    if os.environ.get("PL_GLOBAL_SEED") is not None:
        params["seed"] = int(os.environ["PL_GLOBAL_SEED"])
    dm = trainer.datamodule
    data = dict(getattr(dm, "hparams", {}) or {}) if dm is not None else {}
    if dm is not None and not data:
        data = {k: v for k, v in vars(dm).items() if not k.startswith("_") and _simple(v)}
    if "batch_size" in data:
        params["batch_size"] = data.pop("batch_size")
    if "seed" in data and "seed" not in params:
        params["seed"] = data.pop("seed")
    params.update({f"data/{k}": v for k, v in data.items() if _simple(v) and not k.startswith("_")})
    if dm is not None:
        params["data"] = type(dm).__name__
    params["model"] = type(pl_module).__name__
    for key, value in dict(getattr(pl_module, "hparams", {}) or {}).items():
        if (key == "lr" and "lr" in params) or key.startswith("_"):
            continue
        if _simple(value):
            params[f"model/{key}"] = value
    for key in ("max_epochs", "max_steps", "accumulate_grad_batches", "gradient_clip_val", "log_every_n_steps",
                "check_val_every_n_epoch"):
        value = getattr(trainer, key, None)
        if _simple(value):
            params[f"trainer/{key}"] = value
    params["trainer/precision"] = str(trainer.precision)
    params["trainer/world_size"] = trainer.world_size
    params["R_method"] = bound.R if isinstance(bound.R, str) else f"fixed {bound.R:g}"
    params["sigma_grid"] = ",".join(f"{s:g}" for s in bound.sigmas)
    params["bounds"] = ",".join(bound.wanted)
    params["n"] = int(bound._n or 0)
    params["d"] = int(bound.scope.d or 0)
    overrides = trainer.__dict__.get("_genbounds_cli_overrides")
    if overrides:
        params["cli_overrides"] = " ".join(overrides)
    return params


def _metric_order(bound: GeneralizationBound) -> list[str]:
    head = [f"bound/{bound.headline}"] if bound.headline in bound.wanted else []
    iso = [f"bound/{b}" for b in ("wang_mao_eq3", "wang_mao_eq2", "neu") if b in bound.wanted]
    first = list(dict.fromkeys(head + iso))[:3] + ["gap/measured", "gap/error", "bound/test_error_upper"]
    rest = [f"bound/{b}" for b in bound.wanted] + ["bound/neu_abs"]
    ses = [f"bound/{b}_se" for b in bound.wanted] + ["gap/measured_se", "gap/error_se"]
    tail = ["bound/valid", "bound/heuristic", "gap/train_error", "gap/heldout_error", "gap/train_loss",
            "gap/heldout_loss", "setting/R", "setting/T", "setting/n", "setting/d"]
    return list(dict.fromkeys(first + rest + ses + tail))


class RunSummary:
    def add_layout(self, trainer: Trainer, wanted: tuple[str, ...], groups: list[str]) -> None:
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_custom_scalars(tensorboard_layout(wanted, groups))

    def write_hparams(self, trainer: Trainer, pl_module: LightningModule, bound: GeneralizationBound) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        if not trainer.is_global_zero:
            return
        params = run_settings(trainer, pl_module, bound)
        metrics = {k: bound.latest[k] for k in _metric_order(bound) if k in bound.latest}
        if not metrics:
            return
        varied = _varied_settings(params)
        params = {**{k: params[k] for k in varied}, **{k: v for k, v in params.items() if k not in varied}}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment._get_file_writer()
                exp, ssi, sei = hparams_summary(params, {k: 0.0 for k in metrics})
                for summary in (_mark_differs(exp, varied), ssi, sei):
                    writer.add_summary(summary)
                logger.experiment.add_text("genbounds/settings", _markdown_settings(params))
                logger.experiment.flush()
            elif isinstance(logger, CSVLogger):
                # (one hparams.yaml for the user's and ours: a key of the user's — their `model`, `lr`, `n`
                # — keeps its value, ours goes under genbounds/; load_from_checkpoint(hparams_file=…) read
                # ours until round 32, a new user's walk)
                own = dict(getattr(logger.experiment, "hparams", {}) or {})
                logger.log_hyperparams({(f"genbounds/{k}" if k in own and own[k] != v else k): v
                                        for k, v in params.items()})
                logger.save()

    def print_table(self, trainer: Trainer, bound: GeneralizationBound) -> None:
        text, markdown = results_table(trainer, bound)  # every rank: the gate's verdict and log_dir are collective
        if not trainer.is_global_zero:
            return
        print(text, file=sys.stdout, flush=True)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("genbounds/results", markdown, int(trainer.global_step))
                logger.experiment.flush()


USUALLY_VARIED = ("data/label_noise", "lr", "batch_size", "seed", "trainer/max_epochs", "model/weight_decay",
                  "model/momentum")


def _varied_settings(params: dict[str, Any]) -> list[str]:
    """The settings shown (ticked) first in TensorBoard's HParams: those given on the command line,
    then the ones runs usually differ in. TensorBoard takes one run's experiment summary as is and
    ticks the first five settings flagged as differing, so genbounds flags them itself."""
    overrides = str(params.get("cli_overrides", "")).split()
    from_cli = []
    for item in overrides:
        key = item.split("=", 1)[0].split(".")[-1]
        from_cli += [k for k in params if k == key or k.endswith("/" + key)]
    return list(dict.fromkeys(from_cli + [k for k in USUALLY_VARIED if k in params]))


def _mark_differs(experiment: Any, names: list[str]) -> Any:
    from tensorboard.plugins.hparams import plugin_data_pb2

    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        if info.name in names:
            info.differs = True
    value.metadata.plugin_data.content = data.SerializeToString()
    return experiment


def _fmt(value: float | None, se: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    out = f"{value:.4g}"
    if se is not None and math.isfinite(se):
        out += f" ± {se:.2g}"
    return out


def _gate(trainer: Trainer) -> str | None:
    from genbounds.callbacks.bound_gate import BoundGate

    gates = [cb for cb in trainer.callbacks if isinstance(cb, BoundGate)]
    if not gates:
        return None
    for gate in gates:
        if not (trainer.sanity_checking or trainer.fast_dev_run):
            gate.final_check(trainer)
    return "; ".join(g.verdict() for g in gates)


def results_table(trainer: Trainer, bound: GeneralizationBound) -> tuple[str, str]:
    """The end-of-fit results: plain text (stdout) and Markdown (TensorBoard Text tab)."""
    v = bound.latest
    rows: list[tuple[str, str, str]] = []

    def row(tag: str, note: str = "") -> None:
        if tag in v:
            rows.append((tag, _fmt(v[tag], v.get(f"{tag}_se")), note))

    row("gap/measured", "held-out − training loss, whole sets")
    row("gap/error", "held-out − training 0-1 error")
    for name in bound.wanted:
        valid = v.get(f"bound_valid/{name}")
        note = ISOTROPIC_TITLES.get(name, name)
        if valid == 0.0:
            note += " — FAILED (NaN or below the gap)"
        if name == bound.headline:
            note += " (headline)"
        row(f"bound/{name}", note)
    row("bound/neu_abs", "Neu Thm 1 with |flatness| (bounds |gap|)"
        + (" — FAILED (NaN or below the gap)" if v.get("bound_valid/neu_abs") == 0.0 else ""))
    row("bound/test_error_upper", "training error + tightest 0-1 error bound")
    row("setting/R", f"R ({bound.R if isinstance(bound.R, str) else 'given'})")
    width = max([len(r[0]) for r in rows] + [24])
    vwidth = max([len(r[1]) for r in rows] + [16])
    log_dir = trainer.log_dir if trainer.loggers else None
    gate = _gate(trainer)
    heading = f"genbounds — final values at step {trainer.global_step} (± standard error)"
    lines = [heading, "─" * (width + vwidth + 40)]
    for tag, value, note in rows:
        lines.append(f"{tag:<{width}}  {value:>{vwidth}}  {note}")
    lines.append("─" * (width + vwidth + 40))
    measured = measurement_line(v.get("perf/overhead"), bound.budget.fraction if bound.budget is not None else None)
    if measured:
        lines.append(measured)
    if not bound.plain_sgd:
        if trainer.optimizers and describe_optimizer(trainer.optimizers[0])[1]:  # (plain SGD, clipped)
            lines.append(f"optimizer {bound.optimizer} with gradient clipping: the step is not η_t·ḡ_B whenever it "
                         "clips — the bounds are heuristics here (bound/heuristic = 1)")
        else:
            lines.append(f"optimizer {bound.optimizer}: not plain SGD — the bounds are heuristics here "
                         "(bound/heuristic = 1)")
    idle = [cb for cb in trainer.callbacks if cb is not bound and getattr(cb, "num_probes_run", 1) == 0]
    # (one that needs held-out data and had none was disabled before step 0, not held back by its schedule)
    unfed = [type(cb).__name__ for cb in idle if getattr(cb, "heldout_required", False)
             and not getattr(cb, "heldout_available", True)]
    idle = [type(cb).__name__ for cb in idle if type(cb).__name__ not in unfed]
    if unfed:
        lines.append(f"not measured in this run: {', '.join(unfed)} (no held-out data: no validation dataloader, "
                     "or every held-out sample left out)")
    if idle:  # (said, not left to the reader to notice a missing tag)
        budget = bound.budget.fraction if bound.budget is not None else None
        why = f"its schedule, or the overhead budget of {budget:g}," if budget else "its schedule"
        lines.append(f"not measured in this run: {', '.join(idle)} ({why} never let it run)")
    if gate:
        lines.append(f"gate: {gate}")
    if log_dir:
        # each logger's folder; TensorBoard pointed at a TensorBoardLogger's (it named the first logger's,
        # a CSVLogger's folder without event files, until round 32)
        dirs = list(dict.fromkeys(d for d in (getattr(lg, "log_dir", None) for lg in trainer.loggers) if d))
        lines.append(f"logs: {', '.join(dirs) or log_dir}")
        board = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        view = f"tensorboard --logdir {os.path.dirname(board.rstrip(os.sep)) or board}    " if board else ""
        lines.append(f"next: {view}genbounds report {log_dir}")
    md = [f"**{heading}**", "", "| metric | value | note |", "|---|---:|---|"]
    md += [f"| `{t}` | {_cell(val)} | {_cell(note)} |" for t, val, note in rows]
    md += ["", *(f"* {line}" for line in lines[len(rows) + 3:])]
    return "\n".join(lines), "\n".join(md)


def measurement_line(overhead: float | None, fraction: float | None) -> str | None:
    """What measuring cost, against the budget when there is one (``perf/overhead``: the wall time
    of the genbounds callbacks' hooks, the probes and the per-step statistics, over the rest of the
    wall time since training started, at the final evaluation). Over the budget, what can put it
    there: the final evaluation and Neu's midway Γ probe run whatever the budget affords, the
    per-step statistics measure at least every :attr:`OverheadBudget.MAX_STRIDE` steps, and a
    probe's cost is estimated before it runs (the main job, a 3-second training run: 0.19–0.23)."""
    if overhead is None or not math.isfinite(overhead):
        return None
    line = f"measurement time: {overhead:.3g} × the training time (perf/overhead"
    if fraction is None:
        return line + "; no overhead_budget: every probe ran on its schedule)"
    line += f"; overhead_budget {fraction:g})"
    if overhead > fraction:
        line += (" — over it: the final evaluation and Neu's midway Γ probe run whatever it affords (at their "
                 f"fewest draws), the per-step statistics at least every {OverheadBudget.MAX_STRIDE}th step, "
                 "and a probe can take longer than its cost estimate (README, Overhead)")
    return line


def _cell(text: Any) -> str:
    """A Markdown table cell's text: a ``|`` inside it (``|flatness|``) escaped, or it ends the cell."""
    return str(text).replace("|", "\\|")


def _markdown_settings(params: dict[str, Any]) -> str:
    return "\n".join(["| setting | value |", "|---|---|"] + [f"| `{k}` | {_cell(v)} |" for k, v in params.items()])
