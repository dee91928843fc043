"""The daemon's settings: one dataclass holding every limit, filled from flags, env and TOML.

Precedence, highest first: command-line flags, environment variables
(KAKEYA_<NAME>, e.g. KAKEYA_MAX_SESSIONS), the TOML file (--config PATH, else
<config dir>/kakeya/config.toml when it exists), then the defaults below.
"""

import argparse
import dataclasses
import difflib
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from kakeya_mlx.locate import DEFAULT_MODEL  # locate.py imports no MLX: reading settings stays fast
from kakeya_protocol import MAX_FRAME_BYTES, default_socket_path
from kakeya_protocol.params import MAX_DRAFT_TOKENS, SPECULATIVE_MODES

LOG_LEVELS = ("debug", "info", "warning", "error")
QUEUE_POLICIES = ("queue", "reject")
EVICTIONS = ("spill", "destroy")
DTYPES = ("", "float16", "bfloat16", "float32")
# memory_budget_bytes = 0 resolves to this share of the device's recommended working set.
AUTO_BUDGET_FRACTION = 0.75
_SIZE_UNITS = {"": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ConfigError(Exception):
    """A setting is unknown or has a bad value; the message names it."""


def _opt(default, help: str, kind: str = "") -> Any:
    return field(default=default, metadata={"help": help, "kind": kind})


@dataclass
class DaemonConfig:
    """Every setting and limit of the daemon. See `kakeya serve --help`."""

    model: str = _opt(
        DEFAULT_MODEL,
        "model to serve: a folder in Hugging Face layout, a Hugging Face repo id, or smollm2 (the bundled default)",
    )
    dtype: str = _opt("", "compute dtype (float16, bfloat16, float32); empty lets the loader choose")
    socket: str = _opt("", "Unix socket path; empty means the platform default")
    sink: int = _opt(4, "attention-sink tokens kept at the start of every session's cache")
    window: int = _opt(0, "most recent tokens kept in every session's cache; 0 fills the model's range up to 2048")
    block: int = _opt(64, "tokens per cache block: the cache commits and slides in whole blocks")
    decode_batch_size: int = _opt(
        16,
        "most generations decoded together in one forward pass; 1 computes each session on its own "
        "(bit-exact per session on backends whose kernels change with the batch size)",
    )
    prefill_step_tokens: int = _opt(
        256, "most prompt tokens one generation processes between two decode steps of the others"
    )
    speculative: str = _opt(
        "auto",
        "speculative decoding when a request does not say: off, auto (drafts only where it measurably pays), "
        "prompt_lookup, or draft (needs draft_model)",
    )
    num_draft_tokens: int = _opt(4, f"most tokens drafted per step when speculating (1-{MAX_DRAFT_TOKENS})")
    draft_model: str = _opt(
        "", "a small model sharing the model's tokenizer, drafting for speculative decoding; empty = none"
    )
    max_sessions: int = _opt(
        64,
        "sessions held in memory at once, both fronts together; beyond it the least recently used idle pooled "
        "HTTP session is closed, else (with eviction = spill) the least recently used idle session is spilled, "
        "else create_session is refused",
    )
    max_concurrent_generations: int = _opt(4, "generations running at once, over all sessions")
    queue_policy: str = _opt("queue", "when every generation slot is taken: 'queue' waits, 'reject' refuses at once")
    max_queue_wait_s: float = _opt(30.0, "longest a queued generate waits for a slot before it is rejected")
    max_queued_generations: int = _opt(64, "generates waiting for a slot at once; beyond it they are refused")
    idle_ttl_s: float = _opt(
        3600.0, "sessions unused for this many seconds leave memory (see eviction); 0 keeps them forever"
    )
    idle_sweep_interval_s: float = _opt(30.0, "how often idle sessions and the memory budget are checked")
    memory_budget_bytes: int = _opt(
        0,
        "memory budget (bytes, or e.g. 8GiB) for the weights, a working margin measured at start and the "
        "sessions' KV caches: over it, idle sessions are evicted least recently used first, then new work is "
        f"rejected; 0 = {AUTO_BUDGET_FRACTION:.0%} of the device's recommended working set where MLX reports one, "
        "-1 = no budget",
        kind="size",
    )
    max_frame_bytes: int = _opt(MAX_FRAME_BYTES, "largest protocol frame accepted or sent", kind="size")
    max_append_tokens: int = _opt(32768, "most tokens one append may add")
    max_new_tokens: int = _opt(
        4096, "largest max_tokens a generate may ask for (one that does not say gets min(256, this))"
    )
    max_connections: int = _opt(128, "socket connections open at once; more are refused")
    max_requests_per_connection: int = _opt(
        32, "requests one socket connection may have in flight; beyond it the daemon stops reading from it"
    )
    max_connection_buffer_bytes: int = _opt(
        32 << 20,
        "bytes of requests one socket connection may have in flight; beyond it the daemon stops reading from it",
        kind="size",
    )
    frame_timeout_s: float = _opt(
        30.0,
        "longest a begun frame or HTTP request may take to arrive, and a peer may leave a reply unread; "
        "the connection is closed after it",
    )
    shutdown_grace_s: float = _opt(10.0, "longest a stop waits for generations and replies to finish")
    store_dir: str = _opt(
        "",
        "the session store: where sessions go when they leave memory, are saved at a stop or by name "
        "(a private 0700 directory); empty = <cache dir>/sessions: $KAKEYA_HOME/sessions, "
        "~/Library/Caches/kakeya/sessions on macOS, $XDG_CACHE_HOME/kakeya/sessions or ~/.cache/kakeya/sessions",
    )
    store_max_bytes: int = _opt(
        4 << 30, "most bytes the session store holds; beyond it its least recently used files are removed", kind="size"
    )
    eviction: str = _opt(
        "spill",
        "what a session that must leave memory (idle_ttl_s, memory_budget_bytes, max_sessions) becomes: 'spill' "
        "writes it to the session store and frees its memory, its next request restores it; 'destroy' closes it. "
        "Spill falls back to destroy, with a warning, when the store cannot be opened",
    )
    stop_save_s: float = _opt(
        10.0,
        "longest a stop spends saving live sessions to the session store, most recently used first (they come "
        "back after the restart); 0 = sessions end with the daemon",
    )
    log_level: str = _opt("info", "log verbosity: debug, info, warning or error")
    http_host: str = _opt("127.0.0.1", "HTTP front (OpenAI and Anthropic APIs): address to listen on (keep it on loopback "
                          "unless API keys are set)")
    http_port: int = _opt(0, "HTTP front (OpenAI and Anthropic APIs): TCP port; 0 = off (the front is off by default)")
    http_socket: str = _opt("", "HTTP front (OpenAI and Anthropic APIs): Unix socket path; empty = off")
    http_api_keys: str = _opt("", "comma-separated bearer keys the HTTP front requires; empty = no auth")
    http_max_body_bytes: int = _opt(1 << 20, "largest HTTP request body (bigger ones get 413)", kind="size")
    http_max_sessions: int = _opt(
        8, "sessions the HTTP front keeps for cache reuse (its LRU idle one is closed); they count in max_sessions"
    )
    http_max_connections: int = _opt(64, "HTTP connections open at once; more get 503")
    http_keepalive_s: float = _opt(75.0, "how long an idle HTTP keep-alive connection stays open")
    http_cors_origins: str = _opt(
        "",
        "comma-separated browser origins (e.g. http://localhost:3000) allowed to call the HTTP front, * for any; "
        "a request from any other origin gets 403; empty = none (CORS off)",
    )

    def socket_path(self) -> Path:
        """The socket to serve: the configured path, else the platform default."""
        return Path(self.socket).expanduser() if self.socket else default_socket_path()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting with a bad value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = (int, float) if f.type is float else f.type
            if isinstance(value, bool) or not isinstance(value, expected):
                raise ConfigError(f"{f.name}={value!r}: expected {_type_word(f)}")

        def check(name: str, ok: bool, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

        check("model", bool(self.model), "must name a model")
        check("dtype", self.dtype in DTYPES, "must be one of float16, bfloat16, float32 (or empty)")
        check("sink", self.sink >= 0, "must be >= 0")
        check("window", self.window >= 0, "must be >= 0 (0 = automatic)")
        check("block", self.block >= 1, "must be >= 1")
        check("decode_batch_size", self.decode_batch_size >= 1, "must be >= 1")
        check("prefill_step_tokens", self.prefill_step_tokens >= 1, "must be >= 1")
        check("speculative", self.speculative in SPECULATIVE_MODES, "must be one of " + ", ".join(SPECULATIVE_MODES))
        check("num_draft_tokens", 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS, f"must be in [1, {MAX_DRAFT_TOKENS}]")
        check("speculative", self.speculative != "draft" or bool(self.draft_model), "draft needs draft_model to be set")
        check("max_sessions", self.max_sessions >= 1, "must be >= 1")
        check("max_concurrent_generations", self.max_concurrent_generations >= 1, "must be >= 1")
        check("queue_policy", self.queue_policy in QUEUE_POLICIES, "must be 'queue' or 'reject'")
        check("max_queue_wait_s", self.max_queue_wait_s >= 0, "must be >= 0")
        check("idle_ttl_s", self.idle_ttl_s >= 0, "must be >= 0 (0 = never)")
        check("idle_sweep_interval_s", self.idle_sweep_interval_s > 0, "must be > 0")
        check("memory_budget_bytes", self.memory_budget_bytes >= -1, "must be a size, 0 (automatic) or -1 (none)")
        check("max_queued_generations", self.max_queued_generations >= 0, "must be >= 0")
        check("max_frame_bytes", 1024 <= self.max_frame_bytes < 2**32, "must be in [1 KiB, 4 GiB)")
        check("max_connections", self.max_connections >= 1, "must be >= 1")
        check("max_requests_per_connection", self.max_requests_per_connection >= 1, "must be >= 1")
        check("max_connection_buffer_bytes", self.max_connection_buffer_bytes >= 1024, "must be >= 1 KiB")
        check("frame_timeout_s", self.frame_timeout_s > 0, "must be > 0")
        check("shutdown_grace_s", self.shutdown_grace_s >= 0, "must be >= 0")
        check("store_max_bytes", self.store_max_bytes >= 1, "must be a positive size")
        check("eviction", self.eviction in EVICTIONS, "must be 'spill' or 'destroy'")
        check("stop_save_s", self.stop_save_s >= 0, "must be >= 0 (0 = do not save at a stop)")
        check("max_append_tokens", self.max_append_tokens >= 1, "must be >= 1")
        check("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1")
        check("log_level", self.log_level in LOG_LEVELS, "must be one of " + ", ".join(LOG_LEVELS))
        check("http_port", 0 <= self.http_port <= 65535, "must be a TCP port (0 = off)")
        check("http_max_body_bytes", self.http_max_body_bytes >= 1024, "must be >= 1 KiB")
        check("http_max_sessions", self.http_max_sessions >= 1, "must be >= 1")
        check("http_max_connections", self.http_max_connections >= 1, "must be >= 1")
        check("http_keepalive_s", self.http_keepalive_s > 0, "must be > 0")

    @property
    def http_enabled(self) -> bool:
        return bool(self.http_port or self.http_socket)


def _type_word(f: dataclasses.Field) -> str:
    if f.metadata.get("kind") == "size":
        return "a byte count (an integer, or a string like '512MiB' or '8GiB')"
    return {int: "an integer", float: "a number", str: "a string"}[f.type]


def parse_size(text: str) -> int:
    """'8GiB' -> 8589934592; plain integers are bytes."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kmgt]ib)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    number, unit = m.groups()
    scaled = float(number) * _SIZE_UNITS[(unit or "").lower()]
    if unit is None and "." in number:
        raise ValueError(text)
    return int(scaled)


def _from_string(f: dataclasses.Field, text: str) -> Any:
    """Parse a flag or environment value for field f."""
    try:
        if f.metadata.get("kind") == "size":
            return parse_size(text)
        if f.type is int:
            return int(text)
        if f.type is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{f.name}={text!r}: expected {_type_word(f)}") from None
    return text


def _from_toml(f: dataclasses.Field, value: Any, where: str) -> Any:
    if f.metadata.get("kind") == "size" and isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            pass
    elif f.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, f.type) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where}: {f.name} = {value!r}: expected {_type_word(f)}")


def env_name(name: str) -> str:
    return "KAKEYA_" + name.upper()


def config_dir() -> Path:
    """Where config.toml lives: $XDG_CONFIG_HOME/kakeya, else the platform's usual place."""
    if os.environ.get("XDG_CONFIG_HOME"):
        return Path(os.environ["XDG_CONFIG_HOME"]) / "kakeya"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "kakeya"
    return Path.home() / ".config" / "kakeya"


def read_toml(path: Path) -> dict:
    """The settings in a TOML file, type-checked; unknown keys are errors."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    fields = {f.name: f for f in dataclasses.fields(DaemonConfig)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r}{hint}")
        values[key] = _from_toml(fields[key], value, str(path))
    return values


def build_parser(prog: str = "kakeya serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model to local apps over a Unix socket, keeping each session's KV cache resident.",
        epilog=(
            "Every option can also be set as an environment variable KAKEYA_<OPTION> "
            "(e.g. KAKEYA_MAX_SESSIONS=8) or as a key in the TOML config file "
            "(e.g. max_sessions = 8). Flags win over the environment, which wins over the file."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML file of settings (default: {config_dir() / 'config.toml'} when it exists; env KAKEYA_CONFIG)",
    )
    for f in dataclasses.fields(DaemonConfig):
        default = f.default
        if f.name == "socket":
            shown = str(default_socket_path())
        elif f.metadata.get("kind") == "size":
            shown = str(default)
        else:
            shown = repr(default) if isinstance(default, str) else str(default)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            metavar=f.name.split("_")[-1].upper() if f.type is str else _metavar(f),
            default=None,
            help=f"{f.metadata['help']} (default: {shown})".replace("%", "%%"),
        )
    return parser


def _metavar(f: dataclasses.Field) -> str:
    if f.metadata.get("kind") == "size":
        return "BYTES"
    return "N" if f.type is int else "SECONDS" if f.name.endswith("_s") else "X"


def load_config(argv: Optional[list[str]] = None, environ: Optional[Mapping[str, str]] = None) -> DaemonConfig:
    """Flags > environment > TOML file > defaults. Raises ConfigError; --help exits via SystemExit."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    fields = {f.name: f for f in dataclasses.fields(DaemonConfig)}

    values: dict[str, Any] = {}
    explicit = args.config or environ.get("KAKEYA_CONFIG")
    path = Path(explicit).expanduser() if explicit else config_dir() / "config.toml"
    if explicit and not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_file():
        values.update(read_toml(path))
    for name, f in fields.items():
        text = environ.get(env_name(name))
        if text is not None:
            try:
                values[name] = _from_string(f, text)
            except ConfigError as exc:
                raise ConfigError(f"{env_name(name)}: {exc}") from None
    for name, f in fields.items():
        text = getattr(args, name)
        if text is not None:
            try:
                values[name] = _from_string(f, text)
            except ConfigError as exc:
                raise ConfigError(f"--{name.replace('_', '-')}: {exc}") from None
    config = DaemonConfig(**values)
    config.validate()
    return config
