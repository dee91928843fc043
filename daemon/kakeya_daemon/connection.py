"""One socket connection: frames read under the per-connection bounds, replies written under a timeout.

Each bound is a setting, named in the log line written when it acts:
- `max_requests_per_connection` and `max_connection_buffer_bytes`: while the
  requests in flight reach either, the daemon reads nothing more from this
  connection (the peer's writes back up in its socket buffer) until some finish;
- `frame_timeout_s`: a frame, once begun, must arrive whole within it, and the
  peer must take each reply within it; otherwise the connection is closed.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Optional

from kakeya_protocol import FrameDecoder, ProtocolError, encode_frame, make_error

log = logging.getLogger("kakeya.daemon")

READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class ConnectionLimits:
    max_frame_bytes: int
    max_requests: int
    max_buffer_bytes: int
    frame_timeout_s: float


class ConnectionClosed(Exception):
    """The connection must end; the message says why (for the log)."""


class Connection:
    """A client connection: its reader and writer, the requests it has in flight, its bounds."""

    def __init__(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: ConnectionLimits):
        self.number = number
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self.hello_done = False
        self.closed = False
        self.requests: dict[int, asyncio.Task] = {}
        self.turns: dict[int, object] = {}  # request id -> the core's Turn of a generate
        # One tokenizer job at a time per connection, so one client's pile of
        # tokenize requests cannot hold every worker thread while others wait.
        self.tokenizer = asyncio.Lock()
        self._decoder = FrameDecoder(limits.max_frame_bytes)
        self._frame_began: Optional[float] = None
        self._bytes_in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._write_lock = asyncio.Lock()

    # ---- reading ---------------------------------------------------------

    async def next_frames(self) -> list[tuple[dict, int]]:
        """The (message, size) of each frame the next read completes; [] at the end of the stream.

        Waits while the connection is at its bounds; raises ProtocolError for a
        framing error and ConnectionClosed when a frame stays incomplete too long.
        """
        while True:
            if not self._room.is_set():
                log.info(
                    "conn %d: reading paused: %d requests (%d bytes) in flight "
                    "(max_requests_per_connection=%d, max_connection_buffer_bytes=%d)",
                    self.number,
                    len(self.requests),
                    self._bytes_in_flight,
                    self.limits.max_requests,
                    self.limits.max_buffer_bytes,
                )
                await self._room.wait()
                log.debug("conn %d: reading resumed", self.number)
            timeout = None
            if self._frame_began is not None:
                timeout = max(0.0, self._frame_began + self.limits.frame_timeout_s - time.monotonic())
            try:
                data = await asyncio.wait_for(self.reader.read(READ_CHUNK), timeout)
            except asyncio.TimeoutError:
                raise ConnectionClosed(
                    f"a frame stayed incomplete for frame_timeout_s={self.limits.frame_timeout_s:g} "
                    f"({self._decoder.buffered} bytes of it arrived)"
                ) from None
            if not data:
                return []
            frames = self._decoder.feed_frames(data)
            if not self._decoder.buffered:
                self._frame_began = None
            elif frames or self._frame_began is None:
                self._frame_began = time.monotonic()
            if frames:
                return frames

    @property
    def partial_bytes(self) -> int:
        """Bytes of a frame begun and not finished (non-zero at EOF means a cut-off frame)."""
        return self._decoder.buffered

    def track(self, request_id: int, task: asyncio.Task, size: int) -> None:
        """Count a request in flight until its task ends."""
        self.requests[request_id] = task
        self._bytes_in_flight += size
        self._update_room()

        def finished(_task: asyncio.Task) -> None:
            self.requests.pop(request_id, None)
            self._bytes_in_flight -= size
            self._update_room()

        task.add_done_callback(finished)

    def _update_room(self) -> None:
        full = len(self.requests) >= self.limits.max_requests or self._bytes_in_flight >= self.limits.max_buffer_bytes
        if full:
            self._room.clear()
        else:
            self._room.set()

    # ---- writing ---------------------------------------------------------

    async def send(self, message: dict) -> None:
        """Write one frame; a reply too large for a frame becomes an error reply. Raises ConnectionError."""
        try:
            frame = encode_frame(message, self.limits.max_frame_bytes)
        except ProtocolError as exc:
            log.warning("conn %d: reply to request %s not sent: %s", self.number, message.get("id"), exc)
            frame = encode_frame(
                make_error(
                    message.get("id"),
                    "resource_exhausted",
                    f"the reply does not fit in one frame (max_frame_bytes={self.limits.max_frame_bytes}): {exc}",
                ),
                self.limits.max_frame_bytes,
            )
        async with self._write_lock:
            if self.closed or self.writer.is_closing():
                raise ConnectionResetError("connection closed")
            self.writer.write(frame)
            try:
                await asyncio.wait_for(self.writer.drain(), self.limits.frame_timeout_s)
            except asyncio.TimeoutError:
                log.warning(
                    "conn %d: closing: the peer took no reply bytes for frame_timeout_s=%g",
                    self.number,
                    self.limits.frame_timeout_s,
                )
                self.abort()
                raise ConnectionResetError("the peer stopped reading") from None

    async def send_quietly(self, message: dict) -> None:
        """Send, ignoring a connection that is already gone."""
        with contextlib.suppress(ConnectionError, OSError):
            await self.send(message)

    def abort(self) -> None:
        """Drop the connection now, unsent bytes included."""
        self.closed = True
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close after the bytes already written are taken, or drop them after frame_timeout_s."""
        self.closed = True
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), self.limits.frame_timeout_s)
        except asyncio.TimeoutError:
            self.abort()
        except (ConnectionError, OSError):
            pass
