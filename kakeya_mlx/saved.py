"""A session as the session store keeps it, checked against the engine it comes back to.

store.py reads and writes the files; this module says what a session's cache
depends on (the fingerprint) and rebuilds a Session from a stored one only where
every part fits the model and cache shape that will run it.
"""

import json
from typing import Optional

from . import store as session_store
from .cache import LAYOUT_VERSION, CacheShape
from .errors import CorruptSessionError, FingerprintMismatchError, InvalidArgumentError
from .loader import LoadedModel
from .session import Session
from .speculative import check_mode


def fingerprint(files: dict, loaded: LoadedModel, shape: CacheShape) -> dict:
    """What every stored session's cache depends on: the model's files (`store.model_fingerprint`),
    its dtypes, the cache shape and the cache layout version."""
    return {
        "layout": LAYOUT_VERSION,
        **files,
        "dtype": loaded.dtype,
        "kv_dtype": loaded.kv_dtype,
        "sink": shape.sink,
        "window": shape.window,
        "block": shape.block,
    }


def check_extra(extra) -> dict:
    """`extra` if it is a JSON object, else InvalidArgumentError."""
    try:
        json.dumps(extra, allow_nan=False)
        is_json = isinstance(extra, dict)
    except (TypeError, ValueError):
        is_json = False
    if not is_json:
        raise InvalidArgumentError("extra must be a JSON object (str keys; str, number, bool, null, list, map values)")
    return extra


def session_from_stored(
    name: str,
    body: bytes,
    expected: dict,
    new_id: Optional[str],
    shape: CacheShape,
    ropes: list,
    loaded: LoadedModel,
) -> tuple[Session, dict]:
    """The session stored as `name` (under `new_id` if given), and the extra JSON saved with it.

    FingerprintMismatchError names each part that differs from `expected`;
    CorruptSessionError says what in the file does not fit this model.
    """
    stored = session_store.unpack(name, body)
    differences = session_store.fingerprint_differences(stored.fingerprint, expected)
    if differences:
        parts = "; ".join(f"{part}: stored {was!r}, here {now!r}" for part, (was, now) in differences.items())
        why = f"stored session {name!r} was made for another model or cache ({parts})"
        raise FingerprintMismatchError(why, differences)
    session_id = new_id or stored.session.get("id")
    try:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session id {session_id!r}")
        session = Session.from_state(session_id, shape, ropes, stored.session, stored.arrays)
        _check_fits(session, loaded)
        check_mode(session.speculative, session.num_draft_tokens, has_draft_model=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptSessionError(f"stored session {name!r} is inconsistent: {exc}") from None
    except InvalidArgumentError as exc:
        raise CorruptSessionError(f"stored session {name!r} is inconsistent: {exc.message}") from None
    return session, stored.extra


def _check_fits(session: Session, loaded: LoadedModel) -> None:
    """A restored session's arrays have this model's shapes and dtypes, its tokens this vocabulary."""
    for i, layer in enumerate(session.cache.layers):
        if layer.keys is None:
            continue
        heads, dim = layer.keys.shape[1], layer.keys.shape[3]
        if (heads, dim, str(layer.values.dtype).removeprefix("mlx.core.")) != (
            loaded.num_kv_heads, loaded.head_dim, loaded.kv_dtype
        ):
            raise ValueError(f"layer {i}: {heads} heads of {dim} in {layer.values.dtype}, not this model's")
    for logits in (session.logits, session.cache.boundary_logits):
        if logits is not None and logits.shape[1] != loaded.vocab_size:
            raise ValueError(f"logits over {logits.shape[1]} tokens, the vocabulary has {loaded.vocab_size}")
    if any(t >= loaded.vocab_size for t in session.history):
        raise ValueError(f"a history token outside the vocabulary [0, {loaded.vocab_size})")
