"""Hyper-parameters of a run, and the labels and axes derived from them.

Sources (merged, later ones win on conflicts):

* the TensorBoard HParams plugin (``_hparams_/session_start_info`` summary, as
  ``TensorBoardLogger.log_hyperparams(params, metrics)`` writes it);
* ``hparams.yaml`` in the run directory (``CSVLogger`` and ``TensorBoardLogger`` write it).

Nested mappings are flattened with ``/`` (``model/lr``), as Lightning's loggers do; lists and other
non-scalar values become their ``str()`` (the form TensorBoard stores them in).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

HPARAMS_TAG = "_hparams_/session_start_info"

#: Last ``/`` component of keys that name a run rather than configure it: never an axis, never a label part.
IDENTIFIER_KEYS = frozenset({
    "run_name", "name", "version", "run_id", "run", "experiment", "experiment_name", "id",
    "log_dir", "logdir", "save_dir", "root_dir", "default_root_dir", "ckpt_path", "output_dir", "hostname",
})
#: Last ``/`` component of keys that only re-draw randomness: shown in labels, not a ``rank`` axis by default.
SEED_KEYS = frozenset({"seed", "seed_everything", "random_seed"})

LR_KEYS = ("lr", "model/lr", "learning_rate", "model/learning_rate", "optimizer/lr", "model/init_args/lr")
BATCH_KEYS = ("batch_size", "data/batch_size", "data/init_args/batch_size", "datamodule/batch_size")


def _leaf(key: str) -> str:
    return key.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def normalize(value: Any) -> Any:
    """A hashable scalar: bool, int, float or str."""
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return str(value)
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    return str(value)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = normalize(value)
    return flat


def from_plugin_content(content: bytes) -> dict[str, Any]:
    """The hyper-parameters of an HParams ``session_start_info`` plugin payload ({} when none)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    if not data.HasField("session_start_info"):
        return {}
    out: dict[str, Any] = {}
    for key, value in data.session_start_info.hparams.items():
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            out[key] = normalize(value.number_value)
        elif kind == "string_value":
            out[key] = value.string_value
        elif kind == "bool_value":
            out[key] = value.bool_value
        elif kind == "null_value":
            out[key] = "None"
        else:
            from google.protobuf import json_format

            out[key] = str(json_format.MessageToDict(value))
    return out


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader that turns unknown tags (``!!python/tuple`` …) into plain data."""

    def unknown(loader, tag_suffix, node):  # noqa: ARG001
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        return loader.construct_scalar(node)

    Loader.add_multi_constructor("", unknown)
    return Loader


def read_yaml(path: str) -> dict[str, Any]:
    """Flattened ``hparams.yaml`` ({} when absent or empty).

    Raises:
        ValueError: the file is not valid YAML or not a mapping.
    """
    if not os.path.isfile(path):
        return {}
    import yaml

    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.load(fh, Loader=_yaml_loader())  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of hyper-parameters, got {type(data).__name__}")
    return flatten(data)


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:g}"
    return str(value)


def is_identifier(key: str) -> bool:
    return _leaf(key) in IDENTIFIER_KEYS


def is_seed(key: str) -> bool:
    return _leaf(key) in SEED_KEYS


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def varying_keys(hparams: Sequence[Mapping[str, Any]], *, aliases: str = "partition") -> list[str]:
    """Keys whose value differs between the runs (a missing key counts as its own value).

    Identifiers (``run_name``, ``version`` …) and non-numeric keys with a different value in every
    run (paths, timestamps) are left out. ``aliases="partition"``: a key that splits the runs exactly
    like a shorter key is left out (``model/lr`` next to ``lr``; two hyper-parameters always varied
    together are one axis); ``"leaf"``: only when the shorter key has the same last component;
    ``"keep"``: never.
    """
    if len(hparams) < 2:
        return []
    keys = sorted({k for h in hparams for k in h}, key=lambda k: (k.count("/"), len(k), k))
    out: list[str] = []
    patterns: dict[tuple, list[str]] = {}
    for key in keys:
        if is_identifier(key):
            continue
        values = [h.get(key) for h in hparams]
        if len(set(values)) < 2:
            continue
        if len(set(values)) == len(values) and not all(_is_number(v) for v in values):
            continue
        pattern = _partition(values)
        seen = patterns.setdefault(pattern, [])
        if aliases == "partition" and seen:
            continue
        if aliases == "leaf" and any(_leaf(k) == _leaf(key) for k in seen):
            continue
        seen.append(key)
        out.append(key)
    return sorted(out)


def _partition(values: Sequence[Any]) -> tuple:
    """The grouping a key induces on the runs, independent of the values' names."""
    first: dict[Any, int] = {}
    return tuple(first.setdefault(v, len(first)) for v in values)


def lookup(hparams: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in hparams:
            return hparams[key]
    return None
