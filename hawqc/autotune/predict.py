"""Latency of unmeasured workloads, predicted by an XGBoost regressor over workload features.

Trained on the measured rows of the table (log latency against shape features and bits); its
error is estimated by leaving each measured workload out in turn.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import numpy as np

from hawqc.autotune.table import LatencyTable
from hawqc.autotune.workloads import LayerGroup, Workload

MIN_WORKLOADS = 3
"""Fewer measured workloads than this leave nothing to learn from."""


@dataclass
class Prediction:
    rows: int
    """Rows added (marked ``"predicted": true``)."""
    heldout_error: float | None
    """Median relative error on held-out workloads (leave one workload out), if enough were measured."""


def predict_missing(table: LatencyTable, groups: list[LayerGroup], bits: list[int]) -> Prediction:
    """Add a predicted row for every layer and bit width of ``groups`` that has no measured row."""
    measured = {}
    for row in table.rows:
        if not row.get("predicted"):
            measured[(row["workload"], row["w_bits"], row["a_bits"])] = row
    missing = [(g, b) for g in groups for b in bits if not all(table.measured(n, b, b) for n in g.layers)]
    if not missing:
        return Prediction(0, None)
    workloads = {key for key, _, _ in measured}
    if len(workloads) < MIN_WORKLOADS:
        raise ValueError(f"--predict-missing needs measurements of at least {MIN_WORKLOADS} workloads, "
                         f"the table has {len(workloads)}")
    samples = list(measured.values())
    features = np.array([_features(Workload.from_key(r["workload"]), r["w_bits"], r["a_bits"]) for r in samples])
    target = np.log(np.array([r["latency_ms"] for r in samples]))
    keys = np.array([r["workload"] for r in samples])
    errors = []
    for key in sorted(workloads):
        held = keys == key
        model = _regressor().fit(features[~held], target[~held])
        errors.extend(np.abs(np.exp(model.predict(features[held]) - target[held]) - 1))
    model = _regressor().fit(features, target)
    template = samples[0]
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    added = 0
    for group, b in missing:
        latency = float(np.exp(model.predict(np.array([_features(group.workload, b, b)]))[0]))
        for layer in group.layers:
            if table.measured(layer, b, b):
                continue
            table.put({"layer": layer, "workload": group.workload.key, "w_bits": b, "a_bits": b,
                       "latency_ms": round(latency, 6), "stdev_ms": 0.0, "n_runs": 0, "schedule": "predicted",
                       "target": template["target"], "device": template["device"],
                       "tvm_version": template["tvm_version"], "date": date, "predicted": True})
            added += 1
    table.save()
    return Prediction(added, float(np.median(errors)))


def _features(workload: Workload, w_bits: int, a_bits: int) -> list[float]:
    return [float(v) for v in workload.features().values()] + [w_bits, a_bits]


def _regressor() -> Any:
    from xgboost import XGBRegressor

    return XGBRegressor(n_estimators=200, max_depth=3, learning_rate=0.1, n_jobs=1, random_state=0)
