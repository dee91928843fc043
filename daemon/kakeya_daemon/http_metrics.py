"""`/metrics`: the daemon's `stats` and the HTTP front's own meters in Prometheus text format."""

from . import prometheus
from .counters import HttpMeters

CONTENT_TYPE = prometheus.CONTENT_TYPE


def render_metrics(stats: dict, meters: HttpMeters, pooled: int, pool_max: int) -> str:
    """The same numbers `stats` reports, plus HTTP requests, tokens and latencies."""
    out = prometheus.Exposition()
    out.add_value("kakeya_uptime_seconds", "gauge", "Seconds since the daemon started.", stats["uptime_s"])
    sessions = stats["sessions"]
    out.add_value("kakeya_sessions_active", "gauge", "Sessions held (both fronts).", sessions["active"])
    out.add_value("kakeya_sessions_max", "gauge", "Session limit of the daemon (max_sessions).", sessions["max"])
    out.add_value("kakeya_sessions_leased", "gauge", "Sessions a request holds right now.", sessions["leased"])
    out.add(
        "kakeya_sessions_evicted_total",
        "counter",
        "Sessions closed by the daemon, by reason.",
        [({"reason": r}, sessions[f"evicted_{r}"]) for r in ("idle", "lru", "pooled")],
    )
    out.add_value("kakeya_http_sessions", "gauge", "Sessions pooled by the HTTP front for cache reuse.", pooled)
    out.add_value("kakeya_http_sessions_max", "gauge", "Pool limit of the HTTP front (http_max_sessions).", pool_max)
    generations = stats["generations"]
    out.add_value("kakeya_generations_active", "gauge", "Generations running now.", generations["active"])
    out.add_value("kakeya_generations_queued", "gauge", "Generations waiting for a slot.", generations["queued"])
    out.add_value("kakeya_generations_total", "counter", "Generations finished.", generations["total"])
    tokens = stats["tokens"]
    out.add(
        "kakeya_tokens_total",
        "counter",
        "Tokens run through the model (in: prompt, out: generated).",
        [({"direction": "in"}, tokens["in"]), ({"direction": "out"}, tokens["out"])],
    )
    speculative = stats["speculative"]
    out.add(
        "kakeya_speculative_tokens_total",
        "counter",
        "Tokens drafted for speculative decoding, and those the model accepted.",
        [({"kind": "drafted"}, speculative["drafted"]), ({"kind": "accepted"}, speculative["accepted"])],
    )
    scheduler = stats["scheduler"]
    out.add_value("kakeya_scheduler_steps_total", "counter", "Compute-thread scheduler steps.", scheduler["steps"])
    out.add(
        "kakeya_decode_passes_total",
        "counter",
        "Batched forward passes of decoding generations, and the rows (generations) they carried.",
        [({"what": "passes"}, scheduler["decode_passes"]), ({"what": "rows"}, scheduler["decode_rows"])],
    )
    out.add_value(
        "kakeya_decode_batch_largest", "gauge", "Most generations decoded in one pass so far.", scheduler["largest_batch"]
    )
    out.add_value(
        "kakeya_prefill_tokens_total", "counter", "Prompt tokens processed by the scheduler.", scheduler["prefill_tokens"]
    )
    rates = stats["tokens_per_s"]
    out.add(
        "kakeya_tokens_per_second",
        "gauge",
        "Average throughput since start.",
        [({"phase": "prefill"}, rates["prefill"]), ({"phase": "decode"}, rates["decode"])],
    )
    out.add(
        "kakeya_memory_bytes",
        "gauge",
        "Memory: MLX's counters (active, peak, cache), session KV bytes (kv), and the budget's terms.",
        [({"kind": k.removesuffix("_bytes")}, v) for k, v in sorted(stats["memory"].items())],
    )
    out.add(
        "kakeya_rejections_total",
        "counter",
        "Requests refused by a daemon limit, by the limit that refused them.",
        [({"reason": r}, n) for r, n in sorted(stats["rejections"].items())],
    )
    out.add_value("kakeya_connections", "gauge", "Open Unix-socket protocol connections.", stats["connections"])
    out.add_value("kakeya_http_connections", "gauge", "Open HTTP connections.", stats["http"]["connections"])
    out.add_value(
        "kakeya_protocol_requests_total", "counter", "Unix-socket protocol requests handled.", stats["requests"]
    )
    out.add_counter("kakeya_http_requests_total", "HTTP requests by endpoint and status code.", meters.requests)
    out.add_counter("kakeya_http_tokens_total", "HTTP prompt, cached (reused) and completion tokens.", meters.tokens)
    out.add_histogram(
        "kakeya_http_request_duration_seconds", "HTTP request latency (to the last byte).", meters.latency
    )
    out.add_histogram(
        "kakeya_http_time_to_first_token_seconds", "From request arrival to the first generated token.", meters.ttft
    )
    return out.render()
