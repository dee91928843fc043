"""Python client for the kakeya daemon (sync and asyncio). Depends only on msgpack and kakeya_protocol.

    from kakeya_client import Client

    with Client() as client, client.create_session() as session:
        session.append(messages=[{"role": "user", "content": "Hello!"}])
        for text in session.stream_text(max_tokens=64):
            print(text, end="", flush=True)
"""

from kakeya_protocol import default_socket_path

from .async_client import AsyncClient, AsyncGenerateStream, AsyncSession, AsyncTextStream
from .client import Client, GenerateStream, Session
from .errors import (
    Busy,
    ConnectionFailed,
    Internal,
    InvalidArgument,
    KakeyaError,
    NotFound,
    ProtocolError,
    ResourceExhausted,
    Timeout,
)
from .events import DoneEvent, Event, TokensEvent, TruncatedEvent
from .wire import CLIENT_VERSION as __version__

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncSession",
    "AsyncTextStream",
    "Busy",
    "Client",
    "ConnectionFailed",
    "DoneEvent",
    "Event",
    "GenerateStream",
    "Internal",
    "InvalidArgument",
    "KakeyaError",
    "NotFound",
    "ProtocolError",
    "ResourceExhausted",
    "Session",
    "Timeout",
    "TokensEvent",
    "TruncatedEvent",
    "__version__",
    "default_socket_path",
]
