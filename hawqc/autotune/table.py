"""The latency table: ``{"schema_version": 2, "machine": {...}, "input_shape": [...], "rows": [...]}``
in JSON, the same rows in CSV beside it.

One row per layer and bit width; the ILP (``hawqc`` bit selection) reads this file. ``machine`` is
where the rows were measured (``device``: the CPU model or ``rpc:KEY@TRACKER``, ``cores``,
``target``); ``input_shape`` is the input of the first layer tuned (the model's input for a CNN).
Each row records the 1-minute load average and the max/min spread of its timed repeats, and
``noisy: true`` when either stayed above the limits after re-measuring. Both files are rewritten
atomically after every finished workload, so a killed run loses nothing finished. Schema 1 files
(without machine, input shape, load and spread) are still read.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from hawqc.fileio import write_atomic

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
COLUMNS = ("layer", "workload", "w_bits", "a_bits", "latency_ms", "stdev_ms", "n_runs", "schedule", "target",
           "device", "tvm_version", "date")
"""Every row has these; a predicted row also has ``"predicted": true``."""
MEASURED_COLUMNS = ("load_1min", "spread", "noisy")
"""Rows measured by schema 2 have these too."""


class LatencyTable:
    """Rows keyed by (layer, w_bits, a_bits), kept in insertion order."""

    def __init__(self, path: str | os.PathLike[str], rows: list[dict[str, Any]] | None = None,
                 machine: dict[str, Any] | None = None, input_shape: list[int] | None = None) -> None:
        self.path = Path(path)
        self.machine = machine
        """Where the rows were measured (``device``, ``cores``, ``target``); ``None`` until known."""
        self.input_shape = input_shape
        self._rows: dict[tuple[str, int, int], dict[str, Any]] = {}
        for row in rows or []:
            self.put(row)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """The table at ``path``, or an empty one if there is no file yet."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a latency table ({err})") from None
        if not isinstance(data, dict) or data.get("schema_version") not in READABLE_VERSIONS:
            raise ValueError(f"{path}: not a latency table of schema version {SCHEMA_VERSION}")
        rows = data.get("rows")
        bad = [i for i, r in enumerate(rows or []) if not isinstance(r, dict) or set(COLUMNS) - set(r)]
        if not isinstance(rows, list) or bad:
            raise ValueError(f"{path}: row {bad[0] if bad else ''} lacks columns of the latency table")
        machine = data.get("machine")
        if machine is None:  # schema 1: the rows name their device and target
            measured = [r for r in rows if not r.get("predicted")]
            machine = {"device": measured[0]["device"], "cores": None, "target": measured[0]["target"]} \
                if measured else None
        return cls(path, rows, machine, data.get("input_shape"))

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows.values())

    def get(self, layer: str, w_bits: int, a_bits: int) -> dict[str, Any] | None:
        return self._rows.get((layer, w_bits, a_bits))

    def measured(self, layer: str, w_bits: int, a_bits: int) -> bool:
        """Whether the entry holds a measurement worth keeping (not predicted, not noisy)."""
        row = self.get(layer, w_bits, a_bits)
        return row is not None and not row.get("predicted", False) and not row.get("noisy", False)

    def latencies(self) -> dict[tuple[str, int, int], float]:
        """``(layer, w_bits, a_bits) -> latency_ms``, what the ILP reads."""
        return {key: float(row["latency_ms"]) for key, row in self._rows.items()}

    def put(self, row: dict[str, Any]) -> None:
        self._rows[(row["layer"], int(row["w_bits"]), int(row["a_bits"]))] = row

    def save(self) -> None:
        """Write the JSON file and ``<name>.csv`` beside it, each atomically."""
        data = {"schema_version": SCHEMA_VERSION, "machine": self.machine, "input_shape": self.input_shape,
                "rows": self.rows}
        write_atomic(self.path, json.dumps(data, indent=1) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, *MEASURED_COLUMNS, "predicted"], extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "predicted": bool(row.get("predicted", False))})
        write_atomic(self.path.with_suffix(".csv"), buffer.getvalue())

    def check_same_place(self, machine: dict[str, Any], input_shape: list[int]) -> None:
        """Refuse to mix measurements of another machine (device, core count, target) or input shape
        into this table; an empty table takes them."""
        if self.machine is not None and any(self.machine.get(k) not in (None, v) for k, v in machine.items()):
            raise ValueError(f"{self.path} holds measurements of {describe(self.machine)}, this run measures "
                             f"{describe(machine)}: write it to another table (-o)")
        if self.input_shape is not None and list(self.input_shape) != list(input_shape):
            raise ValueError(f"{self.path} holds measurements at input {_dims(self.input_shape)}, this run measures "
                             f"{_dims(input_shape)}: write it to another table (-o)")
        self.machine, self.input_shape = {**(self.machine or {}), **machine}, list(input_shape)

    def check_fits(self, layer_inputs: dict[str, tuple[int, ...]], machine: dict[str, Any] | None) -> None:
        """Refuse this table for a model whose layers see other input shapes (``layer_inputs``: per
        layer, without the batch dimension) or when it was measured on another machine than
        ``machine`` (``None``: not checked; nor are tables measured over RPC, for their remote device)."""
        from hawqc.autotune.workloads import Workload

        for row in self.rows:
            if row["layer"] not in layer_inputs:
                continue
            try:
                measured = Workload.from_key(row["workload"]).input_shape[1:]
            except ValueError:
                continue  # a hand-made row without a workload: nothing to compare
            if tuple(measured) != tuple(layer_inputs[row["layer"]]):
                raise ValueError(f"{self.path} was measured at another input shape: layer {row['layer']} sees "
                                 f"{_dims(measured)} there, {_dims(layer_inputs[row['layer']])} here; tune at this "
                                 "input shape (hawqc tune --input-shape)")
        if machine is None or self.machine is None or str(self.machine.get("device", "")).startswith("rpc:"):
            return
        differ = [k for k in ("device", "cores") if self.machine.get(k) not in (None, machine.get(k))]
        if differ:
            raise ValueError(f"{self.path} was measured on {describe(self.machine)}, this is {describe(machine)}: "
                             "tune on this machine, or pass --any-machine to use it anyway")


def describe(machine: dict[str, Any]) -> str:
    """``AMD EPYC 9R14 (2 cores), llvm -mcpu=znver4``."""
    cores = f" ({machine['cores']} cores)" if machine.get("cores") else ""
    target = f", {machine['target']}" if machine.get("target") else ""
    return f"{machine.get('device')}{cores}{target}"


def _dims(shape: Any) -> str:
    return "x".join(map(str, shape))
