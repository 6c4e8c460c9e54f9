"""The latency table: ``{"schema_version": 1, "rows": [...]}`` in JSON, the same rows in CSV beside it.

One row per layer and bit width; the ILP (``hawqc`` bit selection) reads this file as is. Both
files are rewritten atomically after every finished entry, so a killed run loses nothing finished.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from hawqc.fileio import write_atomic

SCHEMA_VERSION = 1
COLUMNS = ("layer", "workload", "w_bits", "a_bits", "latency_ms", "stdev_ms", "n_runs", "schedule", "target",
           "device", "tvm_version", "date")
"""Every row has these; a predicted row also has ``"predicted": true``."""


class LatencyTable:
    """Rows keyed by (layer, w_bits, a_bits), kept in insertion order."""

    def __init__(self, path: str | os.PathLike[str], rows: list[dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
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
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: not a latency table of schema version {SCHEMA_VERSION}")
        rows = data.get("rows")
        bad = [i for i, r in enumerate(rows or []) if not isinstance(r, dict) or set(COLUMNS) - set(r)]
        if not isinstance(rows, list) or bad:
            raise ValueError(f"{path}: row {bad[0] if bad else ''} lacks columns of the latency table")
        return cls(path, rows)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows.values())

    def get(self, layer: str, w_bits: int, a_bits: int) -> dict[str, Any] | None:
        return self._rows.get((layer, w_bits, a_bits))

    def measured(self, layer: str, w_bits: int, a_bits: int) -> bool:
        row = self.get(layer, w_bits, a_bits)
        return row is not None and not row.get("predicted", False)

    def put(self, row: dict[str, Any]) -> None:
        self._rows[(row["layer"], int(row["w_bits"]), int(row["a_bits"]))] = row

    def save(self) -> None:
        """Write the JSON file and ``<name>.csv`` beside it, each atomically."""
        write_atomic(self.path, json.dumps({"schema_version": SCHEMA_VERSION, "rows": self.rows}, indent=1) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*COLUMNS, "predicted"], extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({**row, "predicted": bool(row.get("predicted", False))})
        write_atomic(self.path.with_suffix(".csv"), buffer.getvalue())

    def check_same_place(self, target: str, device: str) -> None:
        """Refuse to mix measurements of another target or device into this table."""
        for row in self.rows:
            if not row.get("predicted") and (row["target"], row["device"]) != (target, device):
                raise ValueError(f"{self.path} holds measurements for {row['target']} on {row['device']}: "
                                 "write this run to another table (-o)")
