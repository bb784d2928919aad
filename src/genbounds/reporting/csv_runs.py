"""Lightning ``CSVLogger`` runs: ``metrics.csv`` (+ ``hparams.yaml``) read back, verified.

``metrics.csv`` has a header (``epoch``, ``step`` and one column per metric, sorted) and one row per
``log_metrics`` call; rows are sparse (a metric not logged by that call is an empty field). Every
metric column is read; a value belongs to the row's ``step``.

Fail closed: a file whose last line has no line terminator (the writer was cut mid-row), a row with
the wrong number of fields, a non-numeric value, or a row without a step raises
:class:`CorruptCSV` naming the file, the line and its byte offset.
"""

from __future__ import annotations

import csv
import math

METRICS_FILE = "metrics.csv"


class CorruptCSV(ValueError):
    def __init__(self, path: str, line: int, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt CSV at line {line} (byte {offset}): {reason}")
        self.path = path
        self.line = line
        self.offset = offset


def read_metrics_csv(path: str) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), …]}`` for every metric column of a CSVLogger ``metrics.csv``.

    Raises:
        CorruptCSV: see the module docstring.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        blob = fh.read()
    if not blob:
        raise CorruptCSV(path, 1, 0, "empty file (no header)")
    lines = blob.splitlines(keepends=True)
    offsets = []
    pos = 0
    for line in lines:
        offsets.append(pos)
        pos += len(line)
    last = lines[-1]
    if not last.endswith((b"\n", b"\r")):
        raise CorruptCSV(path, len(lines), offsets[-1],
                         "the last line has no line terminator (the file was cut mid-row)")

    def parse(index: int) -> list[str]:
        try:
            text = lines[index].decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorruptCSV(path, index + 1, offsets[index], f"not UTF-8 ({err.reason})") from None
        rows = list(csv.reader([text]))
        return rows[0] if rows else []

    header = parse(0)
    if "step" not in header:
        raise CorruptCSV(path, 1, 0, f"header has no 'step' column ({header[:8]})")
    if len(set(header)) != len(header):
        raise CorruptCSV(path, 1, 0, "header repeats a column name")
    step_col = header.index("step")
    scalars: dict[str, list[tuple[int, float]]] = {}
    for index in range(1, len(lines)):
        if not lines[index].strip():
            raise CorruptCSV(path, index + 1, offsets[index], "blank line inside the table")
        fields = parse(index)
        if len(fields) != len(header):
            raise CorruptCSV(path, index + 1, offsets[index],
                             f"{len(fields)} field(s), the header has {len(header)}")
        try:
            step_value = float(fields[step_col])
        except ValueError:
            raise CorruptCSV(path, index + 1, offsets[index], f"step {fields[step_col]!r} is not a number") from None
        if not math.isfinite(step_value) or not step_value.is_integer():
            raise CorruptCSV(path, index + 1, offsets[index], f"step {fields[step_col]!r} is not an integer")
        step = int(step_value)
        for col, (name, text) in enumerate(zip(header, fields)):
            if col == step_col or text == "":
                continue
            try:
                value = float(text)
            except ValueError:
                raise CorruptCSV(path, index + 1, offsets[index],
                                 f"column {name!r} holds {text!r}, not a number") from None
            scalars.setdefault(name, []).append((step, value))
    return scalars
