"""The INT4/INT8 view of a latency table: where does 4-bit actually pay off?

A layer whose INT4 latency is not below its INT8 latency is flagged: a BOPS proxy (which assumes
4-bit costs a quarter of 8-bit) is wrong exactly there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hawqc.autotune.table import LatencyTable


@dataclass
class LayerRatio:
    layer: str
    workload: str
    int8_ms: float | None
    int4_ms: float | None
    schedules: str
    """e.g. ``tuned/default`` (INT8 / INT4); a predicted latency shows as ``predicted``."""

    @property
    def ratio(self) -> float | None:
        return self.int4_ms / self.int8_ms if self.int4_ms is not None and self.int8_ms else None

    @property
    def int4_not_faster(self) -> bool:
        return self.ratio is not None and self.ratio >= 1.0


def layer_ratios(table: LatencyTable) -> list[LayerRatio]:
    """One entry per layer, in table order, from its W8A8 and W4A4 rows."""
    result: dict[str, LayerRatio] = {}
    for row in table.rows:
        result.setdefault(row["layer"], LayerRatio(row["layer"], row["workload"], None, None, ""))
    for entry in result.values():
        int8, int4 = table.get(entry.layer, 8, 8), table.get(entry.layer, 4, 4)
        entry.int8_ms = int8["latency_ms"] if int8 else None
        entry.int4_ms = int4["latency_ms"] if int4 else None
        entry.schedules = "/".join(r["schedule"] if r else "-" for r in (int8, int4))
    return list(result.values())


def markdown(table: LatencyTable) -> str:
    """The report as a markdown table, with totals and the count of flagged layers."""
    entries = layer_ratios(table)
    lines = ["| layer | workload | INT8 ms | INT4 ms | INT4/INT8 | schedule (8/4) | INT4 not faster |",
             "|---|---|---:|---:|---:|---|---|"]
    for e in entries:
        lines.append(f"| {e.layer} | {e.workload} | {_ms(e.int8_ms)} | {_ms(e.int4_ms)} | {_ratio(e.ratio)} | "
                     f"{e.schedules} | {'**yes**' if e.int4_not_faster else ''} |")
    lines.append("")
    lines.append(summary(entries))
    return "\n".join(lines) + "\n"


def summary(entries: list[LayerRatio]) -> str:
    """Totals over the layers that have both widths, and how many are flagged."""
    both = [e for e in entries if e.ratio is not None]
    flagged = sum(e.int4_not_faster for e in both)
    if not both:
        return f"{len(entries)} layers; none has both INT8 and INT4 latencies."
    int8, int4 = sum(e.int8_ms for e in both), sum(e.int4_ms for e in both)
    return (f"{len(both)} layers with both widths: INT8 total {int8:.3f} ms, INT4 total {int4:.3f} ms "
            f"(ratio {int4 / int8:.2f}); INT4 is not faster at {flagged} of them.")


NUMBER_COLUMNS = ("INT8 ms", "INT4 ms", "INT4/INT8")


def print_rich(table: LatencyTable, console: Any) -> None:
    """The report as a rich table on ``console``."""
    from rich.table import Table

    entries = layer_ratios(table)
    view = Table(title=f"{table.path}: latency per layer")
    for column in ("layer", "workload", "INT8 ms", "INT4 ms", "INT4/INT8", "schedule 8/4", "INT4 not faster"):
        view.add_column(column, justify="right" if column in NUMBER_COLUMNS else "left")
    for e in entries:
        flag = "[bold red]yes[/]" if e.int4_not_faster else ""
        view.add_row(e.layer, e.workload, _ms(e.int8_ms), _ms(e.int4_ms), _ratio(e.ratio), e.schedules, flag)
    console.print(view)
    console.print(summary(entries))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
