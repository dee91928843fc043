"""Counters the daemon keeps, and the `stats` reply built from them and the engine's own."""

import time
from dataclasses import dataclass, field
from .admission import Admission


@dataclass
class Stats:
    started_at: float = field(default_factory=time.monotonic)
    connections: int = 0  # open now
    requests: int = 0  # handled since start
    evicted_idle: int = 0
    evicted_lru: int = 0


def stats_reply(stats: Stats, engine, admission: Admission, model_name: str) -> dict:
    """The `stats` result (protocol section "stats")."""
    counters = engine.counters
    memory = dict(engine.memory())
    memory["budget_bytes"] = admission.memory_budget_bytes or 0
    return {
        "uptime_s": time.monotonic() - stats.started_at,
        "model": model_name,
        "sessions": {
            "active": len(engine.list_sessions()),
            "max": admission.max_sessions,
            "evicted_idle": stats.evicted_idle,
            "evicted_lru": stats.evicted_lru,
        },
        "generations": {
            "active": admission.active_generations,
            "total": counters["generations"],
            "queued": admission.queued_generations,
        },
        "tokens": {"in": counters["tokens_in"], "out": counters["tokens_out"]},
        "tokens_per_s": {
            "prefill": _rate(counters["tokens_in"], counters["prefill_s"]),
            "decode": _rate(counters["tokens_out"], counters["decode_s"]),
        },
        "memory": memory,
        "rejections": dict(admission.rejections),
        "connections": stats.connections,
        "requests": stats.requests,
    }


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0
