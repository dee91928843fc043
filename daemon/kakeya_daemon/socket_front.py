"""The Unix-socket front: accepting connections under `max_connections`, each served by a reader loop.

Sessions outlive connections (a client may reconnect and continue one); a
connection's requests do not: when it closes, its queued and running requests
are cancelled at once, generations included.
"""

import asyncio
import contextlib
import itertools
import logging
import os
from typing import Optional

from kakeya_protocol import ProtocolError, make_error

from .config import DaemonConfig
from .connection import READ_CHUNK, Connection, ConnectionClosed, ConnectionLimits
from .core import DaemonCore
from .dispatch import Dispatcher
from .lifecycle import ClaimedSocket, check_peer

log = logging.getLogger("kakeya.daemon")


class SocketFront:
    """Listens on the claimed socket; one Connection per client."""

    def __init__(self, core: DaemonCore, config: DaemonConfig, claimed: ClaimedSocket):
        self.core = core
        self.config = config
        self.claimed = claimed
        self.dispatcher = Dispatcher(core, config)
        self.connections: set[Connection] = set()
        self._limits = ConnectionLimits(
            config.max_frame_bytes,
            config.max_requests_per_connection,
            config.max_connection_buffer_bytes,
            config.frame_timeout_s,
        )
        self._server: Optional[asyncio.AbstractServer] = None
        self._handlers: set[asyncio.Task] = set()
        self._numbers = itertools.count(1)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=os.fspath(self.claimed.path))
        self.claimed.served()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Let requests finish (up to shutdown_grace_s; generations have been cancelled), then close every connection."""
        pending = [t for conn in self.connections for t in conn.requests.values()]
        if pending:
            await asyncio.wait(pending, timeout=self.config.shutdown_grace_s)
        for conn in list(self.connections):
            for task in conn.requests.values():
                task.cancel()
            conn.writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=self.config.shutdown_grace_s)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._connection(Connection(next(self._numbers), reader, writer, self._limits))
        finally:
            self._handlers.discard(task)

    async def _refuse(self, conn: Connection, limit: str, message: str) -> None:
        """Answer the refused client's first bytes (its hello) with the refusal, then close.

        Closing with its hello unread would make the kernel reset the connection, and
        the client would see a reset instead of the reason.
        """
        self.core.counters.rejections[limit] += 1
        log.warning("conn %d: refused: %s", conn.number, message)
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            await asyncio.wait_for(conn.reader.read(READ_CHUNK), self.config.frame_timeout_s)
        await conn.send_quietly(make_error(None, "protocol_error", message))
        await conn.close()

    async def _connection(self, conn: Connection) -> None:
        refusal, pid = check_peer(conn.writer.get_extra_info("socket"))
        if refusal is not None:
            return await self._refuse(conn, "peer_uid", refusal)
        if len(self.connections) >= self.config.max_connections:
            message = f"too many connections (max_connections={self.config.max_connections}); try again later"
            return await self._refuse(conn, "max_connections", message)
        if self.core.stopping:
            return await conn.close()
        self.connections.add(conn)
        self.core.counters.connections += 1
        log.info("conn %d: connected (pid %s)", conn.number, pid if pid is not None else "unknown")
        reason = "closed by the client"
        try:
            while True:
                frames = await conn.next_frames()
                if not frames:
                    if self.core.stopping:
                        reason = "the daemon is shutting down"
                    elif conn.partial_bytes:
                        reason = f"closed by the client in the middle of a frame ({conn.partial_bytes} bytes unread)"
                    break
                for message, size in frames:
                    await self.dispatcher.handle(conn, message, size)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            await conn.send_quietly(make_error(None, "protocol_error", str(exc)))
        except ConnectionClosed as exc:
            reason = str(exc)
            log.warning("conn %d: closing: %s", conn.number, exc)
            await conn.send_quietly(make_error(None, "protocol_error", f"connection closed: {exc}"))
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            conn.closed = True
            self.connections.discard(conn)
            self.core.counters.connections -= 1
            # A connection's requests end with it: queued work is dropped, generations cancelled.
            tasks = list(conn.requests.values())
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            await conn.close()
            log.info("conn %d: disconnected (%s)", conn.number, reason)
