"""Prometheus text exposition (format 0.0.4): counters, gauges and histograms, no client library.

Families are rendered in the order they are added; label values are escaped as the
format requires, so any string may be a label value.
"""

import bisect
import math
from typing import Iterable, Mapping, Optional

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a cached short turn to a long cold prefill on a slow machine.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Optional[Mapping[str, str]]) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels) + "}"


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


class Histogram:
    """Cumulative-bucket histogram with one series per label set."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, labels: Optional[Mapping[str, str]] = None) -> None:
        key = _labels(labels)
        series = self._series.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            series[index] += 1
        series[-2] += value
        series[-1] += 1

    def samples(self, name: str) -> list[str]:
        lines = []
        for labels, series in sorted(self._series.items()):
            running = 0
            for bound, count in zip(self.buckets, series):
                running += count
                le = labels + (("le", _format_value(float(bound))),)
                lines.append(f"{name}_bucket{_format_labels(le)} {running}")
            lines.append(f"{name}_bucket{_format_labels(labels + (('le', '+Inf'),))} {series[-1]}")
            lines.append(f"{name}_sum{_format_labels(labels)} {_format_value(series[-2])}")
            lines.append(f"{name}_count{_format_labels(labels)} {series[-1]}")
        return lines


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self):
        self._series: dict[Labels, float] = {}

    def inc(self, labels: Optional[Mapping[str, str]] = None, amount: float = 1) -> None:
        key = _labels(labels)
        self._series[key] = self._series.get(key, 0) + amount

    def items(self) -> list[tuple[Labels, float]]:
        return sorted(self._series.items())


class Exposition:
    """Collects metric families and renders them as one text document."""

    def __init__(self):
        self._lines: list[str] = []

    def _header(self, name: str, kind: str, help: str) -> None:
        self._lines.append(f"# HELP {name} {help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        self._lines.append(f"# TYPE {name} {kind}")

    def add(
        self,
        name: str,
        kind: str,
        help: str,
        samples: Iterable[tuple[Optional[Mapping[str, str]], float]],
    ) -> None:
        """A counter or gauge family: samples are (labels, value) pairs."""
        self._header(name, kind, help)
        for labels, value in samples:
            self._lines.append(f"{name}{_format_labels(_labels(labels))} {_format_value(value)}")

    def add_value(self, name: str, kind: str, help: str, value: float) -> None:
        self.add(name, kind, help, [(None, value)])

    def add_counter(self, name: str, help: str, counter: Counter) -> None:
        self._header(name, "counter", help)
        for labels, value in counter.items():
            self._lines.append(f"{name}{_format_labels(labels)} {_format_value(value)}")

    def add_histogram(self, name: str, help: str, histogram: Histogram) -> None:
        self._header(name, "histogram", help)
        self._lines.extend(histogram.samples(name))

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"
