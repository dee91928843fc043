"""What the sync and async clients send: the socket path, hello, and each request's params."""

import operator
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

from kakeya_protocol import PROTOCOL_VERSION, default_socket_path

from .errors import InvalidArgument

try:
    CLIENT_VERSION = metadata.version("kakeya-client")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    CLIENT_VERSION = "0+unknown"
CLIENT_NAME = f"kakeya-python/{CLIENT_VERSION}"


def resolve_socket_path(socket_path: Union[str, Path, None]) -> Path:
    return Path(socket_path).expanduser() if socket_path else default_socket_path()


def hello_params() -> dict:
    return {"protocol": PROTOCOL_VERSION, "client": CLIENT_NAME}


def token_list(tokens) -> list[int]:
    """Plain ints (msgpack cannot pack numpy or mlx scalars); InvalidArgument for anything not integral."""
    try:
        return [operator.index(t) for t in tokens]
    except TypeError:
        raise InvalidArgument("tokens must be an iterable of integer token ids") from None


def append_params(
    session_id: str,
    tokens=None,
    text: Optional[str] = None,
    messages: Optional[list[dict]] = None,
    add_generation_prompt: bool = True,
) -> dict:
    params: dict = {"session_id": session_id}
    if tokens is not None:
        params["tokens"] = token_list(tokens)
    if text is not None:
        params["text"] = text
    if messages is not None:
        params["messages"] = list(messages)
        params["add_generation_prompt"] = add_generation_prompt
    return params


def generate_params(session_id: str, params: dict) -> dict:
    """The generate request's params. None values are left out (the daemon's defaults apply); a lone stop
    string becomes a list."""
    out = {"session_id": session_id}
    for key, value in params.items():
        if value is None:
            continue
        if key == "stop" and isinstance(value, str):
            value = [value]
        elif key == "stop":
            value = list(value)
        out[key] = value
    return out
