"""The daemon's lifecycle: check everything, load the model, start the core and the fronts, stop them all in order.

Starting runs in three steps, cheapest first, so that a mistake is reported in
milliseconds rather than after the model has loaded: `prepare` finds the model
(locate.py: no MLX), claims the socket and binds the HTTP front's sockets;
`load_models` imports the engine and loads the weights (the slow part, with a
progress line per step); `serve` starts the engine, the core and the fronts. This
module imports only the light parts at the top: the engine, the core and aiohttp
are imported by the steps that use them (aiohttp only when the HTTP front is on).

One model, one engine, one core; the Unix-socket front always, the
OpenAI-compatible HTTP front when asked for. Stopping (SIGTERM, SIGINT, the
`shutdown` request, `kakeya stop`) ends every generation of both fronts with a
proper ending before anything closes, then saves the live sessions to the
session store (bounded by stop_save_s) before the engine stops.
"""

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Optional

from kakeya_mlx.errors import EngineError
from kakeya_mlx.locate import ModelSource, locate

from .config import AUTO_BUDGET_FRACTION, ConfigError, DaemonConfig, load_config
from .lifecycle import ClaimedSocket, StartError, StoreLock
from .listeners import HttpListeners, bind_http
from .logs import setup_logging

if TYPE_CHECKING:
    from kakeya_mlx.engine import Engine
    from kakeya_mlx.loader import LoadedModel

    from .core import DaemonCore, Limits
    from .http_server import HttpServer
    from .socket_front import SocketFront
    from .stored import StoreSettings

log = logging.getLogger("kakeya.daemon")


def resolve_memory_budget(configured: int) -> Optional[int]:
    """Bytes the weights, the working margin and the sessions may hold; None for no budget."""
    if configured > 0:
        return configured
    if configured < 0:
        return None
    import mlx.core as mx

    try:
        working_set = mx.device_info().get("max_recommended_working_set_size")
    except Exception:  # backends without device info have no budget to derive
        return None
    return int(working_set * AUTO_BUDGET_FRACTION) if working_set else None


def core_limits(config: DaemonConfig) -> "Limits":
    from .core import Limits

    return Limits(
        max_sessions=config.max_sessions,
        max_concurrent_generations=config.max_concurrent_generations,
        queue_policy=config.queue_policy,
        max_queue_wait_s=config.max_queue_wait_s,
        max_queued_generations=config.max_queued_generations,
        idle_ttl_s=config.idle_ttl_s,
        idle_sweep_interval_s=config.idle_sweep_interval_s,
        memory_budget_bytes=resolve_memory_budget(config.memory_budget_bytes),
        shutdown_grace_s=config.shutdown_grace_s,
    )


class Daemon:
    """Use `running_daemon`, or start() / stop(). `core` is what both fronts call."""

    def __init__(self, config: DaemonConfig, loaded: "Optional[LoadedModel]" = None):
        config.validate()
        self.config = config
        self.socket_path = config.socket_path()
        self.engine: Optional["Engine"] = None
        self.core: Optional["DaemonCore"] = None
        self.socket: Optional["SocketFront"] = None
        self.http: Optional["HttpServer"] = None
        self.source: Optional[ModelSource] = None
        self.draft_source: Optional[ModelSource] = None
        self._loaded = loaded
        self._claimed = ClaimedSocket(self.socket_path)
        self._store_lock: Optional[StoreLock] = None
        self._http_bound: Optional[HttpListeners] = None
        self._stop_task: Optional[asyncio.Task] = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        """prepare(), load_models(), serve(): the whole start; everything claimed is released if a step fails."""
        try:
            self.prepare()
            loaded = self._loaded if self._loaded is not None else self.load_models()
            await self.serve(loaded)
        except BaseException:
            await self._release()
            raise

    def prepare(self) -> None:
        """The checks that need no model: find it, claim the socket, bind the HTTP front.

        Raises StartError or EngineError (ModelLoadError) saying why it cannot start.
        """
        c = self.config
        if self._loaded is None:
            self.source = locate(c.model)
        if c.draft_model:
            try:
                self.draft_source = locate(c.draft_model)
            except EngineError as exc:
                raise StartError(f"draft model {c.draft_model}: {exc.message}") from None
        self._claimed.claim()
        if c.http_enabled:
            self._http_bound = bind_http(c.http_host, c.http_port or None, c.http_socket or None)
            exposed = self._http_bound.exposed
            if exposed and not c.http_api_keys.strip():
                log.warning(
                    "the HTTP front will listen on %s without API keys: anyone who can reach this machine can use "
                    "the model; set --http-api-keys, or keep --http-host on 127.0.0.1",
                    ", ".join(exposed),
                )

    def load_models(self) -> "LoadedModel":
        """Import the engine and load the model named by the settings, saying what happens."""
        log.info("loading the engine (MLX)")
        from kakeya_mlx.loader import load_model

        # On this thread, not a worker: MLX arrays made on a thread that then exits
        # can abort the process at exit (seen with MLX 0.32). Nothing is served yet.
        return load_model(dtype=self.config.dtype or None, progress=_progress, source=self.source)

    async def serve(self, loaded: "LoadedModel") -> None:
        """Start the engine (probing the backend once per model), the core, then the fronts."""
        from kakeya_mlx import platform
        from kakeya_mlx.engine import Engine, EngineConfig

        from .core import DaemonCore
        from .socket_front import SocketFront

        from .stored import open_store

        c = self.config
        store_settings = _store_settings(c)
        store, self._store_lock, unavailable = open_store(store_settings)
        if store is None and (c.eviction == "spill" or c.stop_save_s > 0):
            log.warning("no session store (%s): sessions leaving memory are closed, none is saved at a stop", unavailable)
        self.engine = Engine(
            loaded,
            EngineConfig(
                sink=c.sink,
                window=c.window or None,
                block=c.block,
                max_append_tokens=c.max_append_tokens,
                max_new_tokens=c.max_new_tokens,
                decode_batch_size=c.decode_batch_size,
                prefill_step_tokens=c.prefill_step_tokens,
                speculative=c.speculative,
                num_draft_tokens=c.num_draft_tokens,
                probe_cache_dir=str(platform.default_cache_dir() / "probes"),
            ),
            draft=self._load_draft(),
            store=store,
        )
        await self.engine.start()
        self.core = DaemonCore(self.engine, core_limits(c), store, store_settings, unavailable or "")
        await self.core.start()
        self.socket = SocketFront(self.core, c, self._claimed)
        self.socket.dispatcher.on_shutdown = self.request_stop
        await self.socket.start()
        if self._http_bound is not None:
            from .http_server import start_http

            bound, self._http_bound = self._http_bound, None
            self.http = await start_http(self.core, _http_options(c), _listen_options(c), bound)
            self.socket.dispatcher.http_urls = self.http.urls
        info = self.engine.model_info()
        log.info(
            "serving %s on %s (sink=%d window=%d block=%d, max_sessions=%d, max_concurrent_generations=%d, "
            "memory budget %s)",
            info["name"],
            self.socket_path,
            info["sink"],
            info["window"],
            info["block"],
            c.max_sessions,
            c.max_concurrent_generations,
            f"{self.core.limits.memory_budget_bytes} bytes" if self.core.limits.memory_budget_bytes else "none",
        )

    def _load_draft(self):
        """The draft model for speculative decoding, or None; a bad one stops the start with the reason."""
        if not self.config.draft_model:
            return None
        from kakeya_mlx.loader import load_model

        try:
            c = self.config
            return load_model(c.draft_model, dtype=c.dtype or None, progress=_progress, source=self.draft_source)
        except EngineError as exc:
            raise StartError(f"draft model {self.config.draft_model}: {exc.message}") from None

    def request_stop(self) -> None:
        """Begin a graceful stop (signal handlers and the shutdown request call this)."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self.stop())

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting; end every generation of both fronts (done "cancelled" / a final event and [DONE]);
        then close connections, stop the engine, remove the sockets."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self.socket is not None:
            self.socket.stop_accepting()
        if self.http is not None:
            self.http.stop_accepting()
        if self.core is not None:
            await self.core.stop()
        await self._release(save=True)
        log.info("stopped")
        self._stopped.set()

    async def _release(self, save: bool = False) -> None:
        """Close the fronts and the core; with `save`, save the live sessions once no request runs; then the rest."""
        if self.socket is not None:
            await self.socket.close()
        if self.http is not None:
            await self.http.stop()
        if self._http_bound is not None:
            self._http_bound.close()
            self._http_bound = None
        if self.core is not None:
            await self.core.stop()
            if save:
                await self.core.save_for_stop()
        if self.engine is not None:
            await self.engine.stop()
        if self._store_lock is not None:
            self._store_lock.release()
        self._claimed.release()


def _store_settings(c: DaemonConfig) -> "StoreSettings":
    from .stored import StoreSettings

    return StoreSettings(
        directory=Path(c.store_dir).expanduser() if c.store_dir else None,
        max_bytes=c.store_max_bytes,
        eviction=c.eviction,
        stop_save_s=c.stop_save_s,
    )


def _http_options(c: DaemonConfig):
    from .http_handlers import HttpOptions

    return HttpOptions(
        api_keys=tuple(k.strip() for k in c.http_api_keys.split(",") if k.strip()),
        max_body_bytes=c.http_max_body_bytes,
        max_sessions=c.http_max_sessions,
        frame_timeout_s=c.frame_timeout_s,
        cors_origins=tuple(o.strip() for o in c.http_cors_origins.split(",") if o.strip()),
    )


def _listen_options(c: DaemonConfig):
    from .http_server import ListenOptions

    return ListenOptions(
        max_connections=c.http_max_connections,
        keepalive_s=c.http_keepalive_s,
        frame_timeout_s=c.frame_timeout_s,
    )


def _progress(message: str) -> None:
    log.info("%s", message)


@contextlib.asynccontextmanager
async def running_daemon(config: DaemonConfig, loaded: "Optional[LoadedModel]" = None) -> AsyncIterator[Daemon]:
    """Start a daemon in the running event loop; stop it gracefully on exit.

    `loaded` (a LoadedModel) skips loading `config.model`, so tests can share one.
    """
    daemon = Daemon(config, loaded=loaded)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def serve(config: DaemonConfig) -> None:
    """Run until SIGTERM, SIGINT or a shutdown request. Raises StartError if it cannot start."""
    daemon = Daemon(config)
    try:
        await daemon.start()
    except (StartError, asyncio.CancelledError):
        raise
    except EngineError as exc:
        raise StartError(exc.message) from exc
    except Exception as exc:
        raise StartError(f"{type(exc).__name__}: {exc}") from exc
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, daemon, sig)
    await daemon.wait_stopped()


def _on_signal(daemon: Daemon, sig: signal.Signals) -> None:
    log.info("received %s", sig.name)
    daemon.request_stop()


def main(argv: Optional[list[str]] = None) -> int:
    """`kakeya serve`: 0 after a graceful stop, 1 when the daemon cannot start, 2 for bad settings."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"kakeya serve: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, or argparse's own usage errors
        return exc.code if isinstance(exc.code, int) else 2
    setup_logging(config.log_level)
    debug = config.log_level == "debug"
    try:
        asyncio.run(serve(config))
    except StartError as exc:
        log.error("cannot start: %s", exc, exc_info=debug)
        return 1
    except KeyboardInterrupt:  # before the signal handlers were installed
        log.info("interrupted while starting")
        return 130
    except Exception as exc:
        log.error("daemon failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        return 1
    return 0
