"""The HTTP front's sockets, bound when the daemon starts: before the model loads, and before aiohttp is imported.

A busy port, an address that does not resolve or a taken Unix socket path is then
reported at once, not after the model has loaded. The sockets are bound but not
listening until the front serves (asyncio's `create_server` listens on them), so a
client that connects while the model loads is refused at once rather than left
waiting. The Unix socket is claimed like the main socket (lifecycle.ClaimedSocket).
"""

import errno
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .lifecycle import ClaimedSocket, StartError


@dataclass
class HttpListeners:
    """Bound, not yet listening sockets of the HTTP front, and the URLs they will serve."""

    sockets: list[socket.socket] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    claimed: Optional[ClaimedSocket] = None

    @property
    def exposed(self) -> list[str]:
        """The URLs reachable from other machines (TCP addresses that are not loopback)."""
        out = []
        for sock, url in zip(self.sockets, self.urls):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                if not ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback:
                    out.append(url)
        return out

    def close(self) -> None:
        """Close the sockets and give up the Unix socket path (removing its file)."""
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
        if self.claimed is not None:
            self.claimed.release()
            self.claimed = None


def bind_http(host: str, port: Optional[int], unix_socket: Optional[str]) -> HttpListeners:
    """Bind the HTTP front on TCP `host:port` (port 0: any free one) and/or `unix_socket`; StartError says why not."""
    listeners = HttpListeners()
    try:
        if port is not None:
            for sock in _bind_tcp(host, port):
                listeners.sockets.append(sock)
                address, bound_port = sock.getsockname()[:2]
                listeners.urls.append(f"http://{'[' + address + ']' if ':' in address else address}:{bound_port}")
        if unix_socket:
            claimed = ClaimedSocket(Path(unix_socket).expanduser(), "--http-socket")
            claimed.claim()
            listeners.claimed = claimed
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listeners.sockets.append(sock)
            try:
                sock.bind(os.fspath(claimed.path))
            except OSError as exc:
                raise StartError(f"cannot serve the HTTP front on {claimed.path}: {exc.strerror or exc}") from None
            claimed.served()
            listeners.urls.append(f"unix:{claimed.path}")
    except BaseException:
        listeners.close()
        raise
    return listeners


def _bind_tcp(host: str, port: int) -> list[socket.socket]:
    """One socket per address `host` resolves to, as asyncio's create_server binds them."""
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        why = f"--http-host {host!r} does not resolve ({exc.strerror})"
        raise StartError(f"cannot serve the HTTP front on {where}: {why}") from None
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # getaddrinfo may repeat an address
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                busy = exc.errno == errno.EADDRINUSE
                hint = "; another program listens there: stop it or choose another --http-port" if busy else ""
                raise StartError(f"cannot serve the HTTP front on {where}: {exc.strerror or exc}{hint}") from None
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound
