"""Summaries and the results table."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest-rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Result:
    """One measured quantity for one implementation."""

    bench: str
    impl: str
    unit: str
    samples: list[float] = field(repr=False)
    goal: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples")
        data.update(n=len(self.samples), median=self.median, p50=self.median, p99=self.p99)
        return data


def table(results: list[Result]) -> str:
    """Medians and p99s, with each row's ratio to the first implementation of its bench."""
    lines = [
        f"{'benchmark':<40} {'implementation':<30} {'n':>5} {'median':>12} {'p99':>12}  ratio",
        "-" * 112,
    ]
    first: dict[str, Result] = {}
    for result in results:
        base = first.setdefault(result.bench, result)
        # (Rows that are ratios already are not compared again.)
        comparable = base is not result and base.unit == result.unit != "x" and base.median != 0
        ratio = f"{result.median / base.median:8.2f}x" if comparable else ""
        lines.append(
            f"{result.bench:<40} {result.impl:<30} {len(result.samples):>5} "
            f"{_fmt(result.median, result.unit):>12} {_fmt(result.p99, result.unit):>12}  {ratio}"
        )
    return "\n".join(lines)


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.0f} us"
        if abs(value) < 1:
            return f"{value * 1e3:.2f} ms"
        return f"{value:.2f} s"
    if unit == "B":
        if value >= 1 << 20:
            return f"{value / (1 << 20):.1f} MiB"
        if value >= 1 << 10:
            return f"{value / (1 << 10):.1f} KiB"
        return f"{value:.0f} B"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:g} {unit}"
