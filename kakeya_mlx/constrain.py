"""Constrained decoding: JSON schema, regex and grammar constraints as per-token masks.

Built on llguidance rather than a grammar engine of our own. Measured against
xgrammar (tools/bench_constrain.py, docs/bench_constrain.json) it was chosen because
it imports without torch (xgrammar's import pulls torch and transformers), builds its
tokenizer view straight from tokenizer.json, compiles a schema in milliseconds (xgrammar
took seconds for a nested one), and refuses the JSON Schema keywords it cannot enforce
instead of silently ignoring them; both cost microseconds per token, nothing next to a
decode step.

A `Constrainer` is built once per model (the tokenizer view takes ~0.7 s for a
49k vocabulary) and compiles constraint specs, caching them in a bounded LRU:

    {"type": "json_object"}
    {"type": "json_schema", "schema": {...}, "strict": true}
    {"type": "regex", "pattern": "..."}
    {"type": "grammar", "grammar": "..."}   # llguidance Lark, or llama.cpp GBNF

Each generation gets its own `TokenMatcher`, driven by the decode loop on the compute
thread: mask the logits with `allowed_mask()`, pick, `accept()` the pick, stop when
`is_finished()`.
"""

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import llguidance
import mlx.core as mx
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from .errors import EngineError, InvalidArgumentError

if TYPE_CHECKING:  # the loader pulls in mlx-lm (and transformers); this module must not
    from .loader import LoadedModel

DEFAULT_CACHE_SIZE = 64
# Library reasons can quote whole grammars; error messages stay readable.
MAX_REASON_CHARS = 300
# llama.cpp's JSON-schema grammars allow the same: one space, or a newline and an
# indent of up to 20. Unbounded whitespace lets small models loop on newlines forever.
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"
CONSTRAINT_TYPES = ("json_object", "json_schema", "regex", "grammar")
# JSON as Python's json.dumps writes it: ", " and ": " between items, no other
# whitespace, and only the escapes it uses. Text written this way renders back
# unchanged through a chat template's `tojson`, so a reply made of it is a prefix
# of the next turn's prompt and stays cached.
CANONICAL_JSON = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "json_allowed_escapes": '"\\nrbtf',
    "lenient": True,
}


class TokenRejectedError(EngineError):
    """The decode loop offered a token the constraint does not allow: a bug, not bad input."""

    code = "internal"


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint, shared by every generation that uses the same spec."""

    kind: str
    grammar: str  # llguidance's grammar text
    _template: llguidance.LLMatcher  # never advanced: generations get copies


class TokenMatcher:
    """One generation's view of a constraint: which token may come next, and what came so far.

    Not thread-safe; it lives on the compute thread with its generation.
    """

    def __init__(
        self,
        matcher: llguidance.LLMatcher,
        tokenizer_vocab: int,
        vocab_width: int,
        eos_ids: Sequence[int],
        end_token: int | None = None,
    ):
        """`end_token`: where the text may end, the one end token allowed (others are not), when given."""
        self._matcher = matcher
        self._width = vocab_width
        self._eos = frozenset(eos_ids)
        self._other_ends = np.array(sorted(self._eos - {end_token}), dtype=np.int64) if end_token in self._eos else None
        self._end = end_token
        self._bitmask = allocate_token_bitmask(1, tokenizer_vocab)
        self._allowed = np.zeros(vocab_width, dtype=np.bool_)  # stays False past the tokenizer's vocab
        self._accepted = 0

    def allowed_mask(self) -> mx.array:
        """Bool (vocab_width,): True where the next token may be that id."""
        fill_next_token_bitmask(self._matcher, self._bitmask)
        # Unpacking on the host and copying once beats expanding bits in an MLX graph (measured).
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little").view(np.bool_)
        n = min(self._width, bits.shape[0])
        self._allowed[:n] = bits[:n]
        if self._other_ends is not None and self._allowed[self._end]:
            self._allowed[self._other_ends] = False
        return mx.array(self._allowed)

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; raises TokenRejectedError (state unchanged) if it is not allowed."""
        if not self._allows(token_id) or not self._matcher.consume_token(token_id):
            raise TokenRejectedError(f"token {token_id} is not allowed by the constraint here")
        self._accepted += 1

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (rejected speculative drafts)."""
        if not 0 <= n <= self._accepted:
            raise ValueError(f"cannot roll back {n} tokens; {self._accepted} were accepted")
        if n and not self._matcher.rollback(n):
            raise TokenRejectedError(f"constraint rollback failed: {self._matcher.get_error()[:MAX_REASON_CHARS]}")
        self._accepted -= n

    def is_finished(self) -> bool:
        """The constrained text is complete: only an end token may follow."""
        return self._matcher.is_stopped()

    def eos_allowed(self) -> bool:
        """An end token may come next: the text so far satisfies the constraint."""
        return self._matcher.is_accepting()

    def valid_prefix_length(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (a speculative draft) the constraint allows in a row from here."""
        return self._try(tokens)

    def draft_masks(self, draft: Sequence[int]) -> mx.array:
        """Bool (k + 1, vocab_width): the mask here and after each of the first k allowed draft tokens."""
        masks = [self.allowed_mask()]
        self._try(draft, lambda: masks.append(self.allowed_mask()))
        return mx.stack(masks)

    def _try(self, tokens: Sequence[int], after_each: Callable[[], None] | None = None) -> int:
        """Advance over the allowed prefix of `tokens`, calling `after_each` per token, then undo it.

        An end token is counted when the text so far is complete but never consumed:
        llguidance cannot roll back past one (its state is corrupt afterwards), and
        nothing may follow it anyway.
        """
        taken = 0
        ended = 0
        try:
            for token in tokens:
                if token in self._eos:
                    ended = int(self._matcher.is_accepting() or self._matcher.is_stopped())
                    break
                if not self._matcher.validate_tokens([token]) == 1 or not self._matcher.consume_token(token):
                    break
                taken += 1
                if after_each is not None:
                    after_each()
        finally:
            if taken:
                self._matcher.rollback(taken)
        return taken + ended

    def _allows(self, token_id: int) -> bool:
        if token_id in self._eos:
            return self._matcher.is_accepting() and (self._other_ends is None or token_id == self._end)
        return self._matcher.validate_tokens([token_id]) == 1


class Constrainer:
    """Compiles constraint specs against one model's tokenizer; thread-safe."""

    def __init__(
        self,
        tokenizer_json: str,
        eos_token_ids: Sequence[int],
        vocab_width: int,
        cache_size: int = DEFAULT_CACHE_SIZE,
        end_token: int | None = None,
    ):
        """`end_token`: the one end token a constrained text may end with (the tokenizer's own end-of-sequence,
        which chat templates close a turn with); None allows any of `eos_token_ids`."""
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=list(eos_token_ids))
        self._eos = list(eos_token_ids)
        self._end = end_token
        self.vocab_width = vocab_width
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, loaded: "LoadedModel", cache_size: int = DEFAULT_CACHE_SIZE) -> "Constrainer":
        """Build from a `kakeya_mlx.loader.LoadedModel`: its tokenizer.json, end tokens and logits width.

        A constrained reply ends with the tokenizer's own end token, the one the chat template
        closes an assistant turn with (Llama 3's <|eot_id|>, not <|end_of_text|>), so the next
        turn's prompt extends it exactly.
        """
        end = getattr(loaded.tokenizer, "eos_token_id", None)
        return cls(tokenizer_json_of(loaded), loaded.eos_token_ids, loaded.vocab_size, cache_size, end_token=end)

    def compile(self, spec: object, where: str = "constraint") -> Constraint:
        """Check and compile `spec`; `where` names it in errors (e.g. "response_format.json_schema")."""
        kind, grammar, field = _grammar_of(spec, where)
        key = grammar
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        error = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise InvalidArgumentError(f"{field}: cannot be compiled: {_bounded(error)}")
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidArgumentError(f"{field}: cannot be compiled: {_bounded(matcher.get_error())}")
        constraint = Constraint(kind, grammar, matcher)
        with self._lock:
            self._cache[key] = constraint
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return constraint

    def matcher(self, constraint: Constraint) -> TokenMatcher:
        """A fresh matcher for one generation (copying a compiled one takes microseconds)."""
        return TokenMatcher(
            constraint._template.deep_copy(), self._tokenizer.vocab_size, self.vocab_width, self._eos, self._end
        )

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes (a special token's are its text), exact even for part of a character."""
        return [self._tokenizer.decode_bytes([t]) for t in token_ids]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as the constraint's tokenizer view sees them (for tests and tools)."""
        return self._tokenizer.tokenize_str(text)


def check_json_schema(schema: object, field: str, strict: bool = False) -> None:
    """Raise InvalidArgumentError naming `field` unless `schema` compiles (no tokenizer needed)."""
    if not isinstance(schema, dict):
        raise InvalidArgumentError(f"{field}: must be a JSON Schema object")
    error = llguidance.LLMatcher.validate_grammar(_json_grammar(schema, strict, field))
    if error:
        raise InvalidArgumentError(f"{field}: cannot be compiled: {_bounded(error)}")


def json_compile_options(strict: bool) -> dict:
    """llguidance's JSON options as this module uses them (for schemas inlined in grammars as x-guidance)."""
    return {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}


def tokenizer_json_of(loaded: "LoadedModel") -> str:
    """The model's tokenizer as tokenizers-library JSON, without importing transformers."""
    file = Path(loaded.path) / "tokenizer.json"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    backend = getattr(getattr(loaded.tokenizer, "_tokenizer", None), "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    raise InvalidArgumentError(
        f"constraint: model {loaded.name} has no tokenizer.json, which constrained decoding needs"
    )


def spec_from_response_format(response_format: object) -> tuple[dict | None, str]:
    """Map OpenAI's `response_format` to a constraint spec (None for plain text) and its field name."""
    where = "response_format"
    if not isinstance(response_format, dict):
        raise InvalidArgumentError(f"{where}: must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None, where
    if kind == "json_object":
        return {"type": "json_object"}, where
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, dict):
            raise InvalidArgumentError(f"{where}.json_schema: must be an object with a schema")
        spec = {"type": "json_schema", "schema": body.get("schema"), "strict": body.get("strict", False)}
        return spec, f"{where}.json_schema"
    raise InvalidArgumentError(f"{where}.type: must be one of text, json_object, json_schema, not {kind!r}")


def _grammar_of(spec: object, where: str) -> tuple[str, str, str]:
    """(kind, llguidance grammar, the field errors name) for a spec, checking its shape."""
    if not isinstance(spec, dict):
        raise InvalidArgumentError(f"{where}: must be an object with a type")
    kind = spec.get("type")
    if kind not in CONSTRAINT_TYPES:
        raise InvalidArgumentError(f"{where}.type: must be one of {', '.join(CONSTRAINT_TYPES)}, not {kind!r}")
    if kind == "json_object":
        return kind, _json_grammar({"type": "object"}, strict=True, field=where), where
    if kind == "json_schema":
        schema, strict = spec.get("schema"), spec.get("strict", False)
        if not isinstance(schema, dict):
            raise InvalidArgumentError(f"{where}.schema: must be a JSON Schema object")
        if not isinstance(strict, bool):
            raise InvalidArgumentError(f"{where}.strict: must be true or false")
        return kind, _json_grammar(schema, strict, f"{where}.schema"), f"{where}.schema"
    if kind == "regex":
        pattern = spec.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgumentError(f"{where}.pattern: must be a non-empty string")
        return kind, llguidance.LLMatcher.grammar_from_regex(pattern), f"{where}.pattern"
    text = spec.get("grammar")
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"{where}.grammar: must be a non-empty Lark or GBNF grammar")
    try:
        return kind, llguidance.grammar_from("grammar", text), f"{where}.grammar"
    except (ValueError, IndexError, KeyError) as e:  # raised by the GBNF converter
        raise InvalidArgumentError(f"{where}.grammar: {_bounded(str(e))}") from None


def _json_grammar(schema: dict, strict: bool, field: str) -> str:
    """strict: refuse keywords llguidance cannot enforce; otherwise enforce what it can and ignore the rest."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{field}: is not JSON: {e}") from None
    return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=json_compile_options(strict))


def _bounded(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"
