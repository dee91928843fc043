"""The daemon's one set of counters: `stats` and `/metrics` both render these."""

import collections
import time
from dataclasses import dataclass, field

from . import prometheus


@dataclass
class HttpMeters:
    """What only the HTTP front measures: requests by endpoint and status, tokens, latencies."""

    requests: prometheus.Counter = field(default_factory=prometheus.Counter)
    tokens: prometheus.Counter = field(default_factory=prometheus.Counter)
    latency: prometheus.Histogram = field(default_factory=prometheus.Histogram)
    ttft: prometheus.Histogram = field(default_factory=prometheus.Histogram)

    def total_requests(self) -> int:
        return int(sum(n for _, n in self.requests.items()))


@dataclass
class Counters:
    """Counts kept by the core and the fronts; the engine keeps its own token and timing counts."""

    started_at: float = field(default_factory=time.monotonic)
    connections: int = 0  # socket connections open now
    http_connections: int = 0  # HTTP connections open now
    requests: int = 0  # socket requests handled since start
    evicted: collections.Counter = field(default_factory=collections.Counter)  # idle, lru, pooled
    rejections: collections.Counter = field(default_factory=collections.Counter)  # limit name -> refusals
    # The session store: spilled, restored, spill_failures, lost, removed (by its cap).
    store: collections.Counter = field(default_factory=collections.Counter)
    turns_opened: int = 0
    turns_ended: int = 0
    http: HttpMeters = field(default_factory=HttpMeters)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at
