"""The engine's async API: sessions over shared weights, all MLX work on one thread.

The asyncio side validates requests and keeps the session table; the compute
thread owns every session's cache and history while it generates. A request that
fails validation leaves its session exactly as it was.

This module runs past 400 lines because `Engine` is the whole public surface and
its methods are thin (check the request, then one call onto the compute thread);
the work itself lives in turn.py, saved.py, decode.py, scheduler.py and session.py.
"""

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten
from kakeya_protocol import params as rules

from . import chat, platform, saved, store as session_store
from .cache import CacheShape
from .compute import ComputeThread
from .constrain import Constraint, Constrainer
from .decode import GenerateRequest, Generation
from .errors import BusyError, InvalidArgumentError, NotFoundError, StoreError
from .events import DoneEvent, TokenEvent, TruncatedEvent
from .loader import LoadedModel
from .probe import ProbeResult, model_fingerprint, probe, probe_cached
from .rope import layer_shifters, make_batchable
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .session import Session, prefill_piece
from .speculative import DraftModel, SpecContext, check_draft_model, check_mode
from .store import SavedSession, SessionStore
from .toolcalls import ModelTools
from .turn import TurnState, TurnStream, cancel_and_wait

Event = Union[TokenEvent, TruncatedEvent, DoneEvent]
log = logging.getLogger("kakeya.engine")


@dataclass(frozen=True)
class EngineConfig:
    """Cache sizes and request limits. `window=None` fills the model's trained range up to 2048."""

    sink: int = 4
    window: Optional[int] = None
    block: int = 64
    max_append_tokens: int = 32768
    max_new_tokens: int = 4096
    # Recompute each completed block, and a tail that arrived in pieces, in one
    # forward pass. Needed for exact chunking invariance only where a block
    # computed at once and in pieces differ; None decides by probing the running
    # backend (probe.py).
    recompute_blocks: Optional[bool] = None
    # Most decoding turns put through the model in one forward pass; 1 computes
    # each session's tokens on their own.
    decode_batch_size: int = 16
    # Most prompt tokens one turn runs between two decode steps of the others.
    prefill_step_tokens: int = 256
    # Speculative decoding when a request does not say: off, auto, prompt_lookup or
    # draft (needs a draft model); and the most tokens drafted per step.
    speculative: str = "auto"
    num_draft_tokens: int = 4
    # Folder where the probe's result is kept for the next start with the same model
    # and kernels (probe.probe_cached); None probes every time and keeps nothing.
    probe_cache_dir: Optional[str] = None

    def cache_shape(self, max_positions: int) -> CacheShape:
        """Resolve the cache sizes against the model's trained range."""
        if self.block < 1:
            raise InvalidArgumentError(f"block={self.block}: must be >= 1")
        if self.sink < 0:
            raise InvalidArgumentError(f"sink={self.sink}: must be >= 0")
        if self.decode_batch_size < 1:
            raise InvalidArgumentError(f"decode_batch_size={self.decode_batch_size}: must be >= 1")
        if self.prefill_step_tokens < 1:
            raise InvalidArgumentError(f"prefill_step_tokens={self.prefill_step_tokens}: must be >= 1")
        check_mode(self.speculative, self.num_draft_tokens, has_draft_model=True)
        window = self.window
        if window is None:
            window = min(2048, max_positions) - self.sink - self.block
        if window < self.block:
            raise InvalidArgumentError(
                f"window={window}: must be >= block ({self.block}) so a block can slide through it"
            )
        shape = CacheShape(self.sink, window, self.block)
        if shape.bound > max_positions:
            raise InvalidArgumentError(
                f"sink + window + block = {shape.bound} exceeds the model's trained range of "
                f"{max_positions} positions; cache-relative positions must stay inside it"
            )
        return shape


class Engine:
    """Sessions and generation over one loaded model."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig = EngineConfig(),
        draft: Optional[LoadedModel] = None,
        store: Optional[SessionStore] = None,
    ):
        """`draft`: a smaller model sharing `loaded`'s tokenizer, for speculative decoding.
        `store`: where `save_session` and `restore_session` keep sessions."""
        self.loaded = loaded
        self.store = store
        self.config = config
        self.shape = config.cache_shape(loaded.max_position_embeddings)
        self.ropes = layer_shifters(loaded.model, self.shape.bound)
        make_batchable(loaded.model, self.shape.bound)
        if draft is not None:
            check_draft_model(loaded, draft, self.shape)
        if config.speculative == "draft" and draft is None:
            raise InvalidArgumentError("speculative='draft' needs a draft model; none was given")
        self.spec = SpecContext(
            mode=config.speculative,
            num_draft_tokens=config.num_draft_tokens,
            draft=DraftModel(draft, self.shape) if draft is not None else None,
        )
        if config.recompute_blocks is None:
            found, reused = self._probe()
            self.recompute_blocks = not found.chunk_invariant
            kept = " (kept from an earlier start)" if reused else ""
            log.info("%s%s: recompute_blocks=%s", found.describe(), kept, self.recompute_blocks)
            if not found.batch_invariant and config.decode_batch_size > 1:
                log.info(
                    "batched sessions may differ from lone ones in the last bits here; "
                    "decode_batch_size=1 computes each session on its own"
                )
        else:
            self.recompute_blocks = config.recompute_blocks
            log.info("recompute_blocks=%s, as configured (not probed)", self.recompute_blocks)
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.counters = {
            "tokens_in": 0,
            "tokens_out": 0,
            "generations": 0,
            "prefill_s": 0.0,
            "decode_s": 0.0,
            "draft_tokens": 0,
            "accepted_tokens": 0,
        }
        self._sessions: dict[str, Session] = {}
        scheduler = Scheduler(
            loaded.model, SchedulerConfig(config.decode_batch_size, config.prefill_step_tokens)
        )
        self._thread = ComputeThread(scheduler)
        self._constrainer_instance: Optional[Constrainer] = None
        self._constrainer_lock = threading.Lock()
        self._tools: Optional[ModelTools] = None
        self._started = False
        self._fingerprint: Optional[dict] = None

    def _probe(self) -> tuple[ProbeResult, bool]:
        """What the backend keeps bit-identical on this model (probe.py): kept from an earlier start, else measured."""
        m = self.loaded
        if self.config.probe_cache_dir is None:
            return probe(m.model, m.vocab_size), False
        key = model_fingerprint(m.path, m.config, m.dtype)
        return probe_cached(m.model, m.vocab_size, key, Path(self.config.probe_cache_dir))

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if not self._started:
            self._thread.start()
            self._started = True

    async def stop(self) -> None:
        """End every in-flight generation (stop reason "cancelled") and the compute thread."""
        sessions = list(self._sessions.values())
        for session in sessions:
            if session.turn is not None:
                session.turn.cancel()
        for session in sessions:
            await cancel_and_wait(session)
        if self._started:
            await asyncio.to_thread(self._thread.stop)
            self._started = False

    async def _call(self, fn, *args):
        return await asyncio.wrap_future(self._thread.call(fn, *args))

    # ---- model -----------------------------------------------------------

    def model_info(self) -> dict:
        m = self.loaded
        return {
            "name": m.name,
            "path": str(m.path),
            "model_type": m.model_type,
            "dtype": m.dtype,
            "backend": platform.backend(),
            "vocab_size": m.vocab_size,
            "num_layers": m.num_layers,
            "max_position_embeddings": m.max_position_embeddings,
            "eos_token_ids": sorted(self.eos_token_ids),
            "sink": self.shape.sink,
            "window": self.shape.window,
            "block": self.shape.block,
            "kv_bytes_per_token": m.kv_bytes_per_token,
            "has_chat_template": bool(m.chat_template),
            "speculative": self.spec.mode,
            "num_draft_tokens": self.spec.num_draft_tokens,
            "draft_model": self.spec.draft.loaded.name if self.spec.draft is not None else None,
            "decode_batch_size": self.config.decode_batch_size,
            "prefill_step_tokens": self.config.prefill_step_tokens,
        }

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidArgumentError("text must be a string")
        return await asyncio.to_thread(self._encode, text, add_special_tokens)

    async def detokenize(self, tokens: list[int]) -> str:
        self._check_token_ids(tokens, allow_empty=True)
        return await asyncio.to_thread(self.loaded.tokenizer.decode, list(tokens))

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_messages(self, messages: list[dict], continuation: bool, add_generation_prompt: bool) -> str:
        """Render chat messages with the model's template; as a continuation after a closed turn if asked."""
        self._check_chat_template()
        if not continuation:
            return chat.render(self.loaded.tokenizer, messages, add_generation_prompt)
        return chat.after_closed_turn(self.loaded.tokenizer, messages, add_generation_prompt)

    def render_chat(self, messages: list[dict], tools: list) -> str:
        """A whole conversation, tool calls and results included, with `tools` offered (toolcalls.py)."""
        self._check_chat_template()
        return self.tools().render(messages, tools)

    def tools(self) -> ModelTools:
        """The model's tool calling (its call format, read from the chat template once)."""
        if self._tools is None:
            self._tools = ModelTools(self.loaded.tokenizer, self.loaded.chat_template)
        return self._tools

    async def token_bytes(self, token_ids: list[int]) -> list[bytes]:
        """Each token's own bytes, exact even where a token holds part of a character."""
        if self._constrainer_instance is None:
            try:
                await asyncio.to_thread(self._constrainer)
            except InvalidArgumentError:  # no tokenizer.json to read exact bytes from
                return [self.loaded.tokenizer.decode([t]).encode("utf-8") for t in token_ids]
        return self._constrainer_instance.token_bytes(token_ids)

    def _check_chat_template(self) -> None:
        if not self.loaded.chat_template:
            raise InvalidArgumentError("this model has no chat template; append text or tokens instead")

    # ---- sessions --------------------------------------------------------

    def _get(self, session_id: str) -> Session:
        if not isinstance(session_id, str):
            raise InvalidArgumentError("session_id must be a string")
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFoundError(f"no session {session_id!r} (it was closed, evicted, or never existed)")
        return session

    def has_session(self, session_id: str) -> bool:
        return session_id in self._sessions

    def check_speculative(self, speculative: Optional[str], num_draft_tokens: Optional[int]) -> None:
        """Raise InvalidArgumentError naming the field unless this engine can serve that choice."""
        check_mode(speculative, num_draft_tokens, self.spec.draft is not None)

    async def create_session(self, speculative: Optional[str] = None, num_draft_tokens: Optional[int] = None) -> str:
        """A new empty session. `speculative` and `num_draft_tokens` become its defaults for generate."""
        self.check_speculative(speculative, num_draft_tokens)
        session_id = uuid.uuid4().hex[:16]
        session = Session(session_id, self.shape, self.ropes)
        session.speculative, session.num_draft_tokens = speculative, num_draft_tokens
        self._sessions[session_id] = session
        return session_id

    async def close_session(self, session_id: str) -> None:
        session = self._get(session_id)
        await cancel_and_wait(session)
        self._sessions.pop(session_id, None)

    async def session_info(self, session_id: str) -> dict:
        return self._get(session_id).info()

    def list_sessions(self) -> list[dict]:
        return [s.info() for s in list(self._sessions.values())]

    def session_history(self, session_id: str) -> list[int]:
        return list(self._get(session_id).history)

    def longest_prefix_session(self, tokens: list[int], among=None) -> tuple[Optional[str], int]:
        """The idle session whose whole history is the longest prefix of `tokens`.

        Histories only grow, so only a session whose entire history matches can be
        extended by the rest of `tokens`. `among` limits the search to those ids.
        Returns (session_id, history_length), or (None, 0).
        """
        best, best_len = None, 0
        candidates = among if among is not None else list(self._sessions)
        for session_id in candidates:
            session = self._sessions.get(session_id)
            if session is None or session.turn is not None:
                continue
            n = len(session.history)
            if best_len < n <= len(tokens) and session.history == tokens[:n]:
                best, best_len = session_id, n
        return best, best_len

    def session_kv_bytes(self, session_id: str) -> int:
        return self._get(session_id).kv_bytes

    def memory(self) -> dict:
        """MLX's own memory counters, plus the bytes held by session caches."""
        return {
            "active_bytes": mx.get_active_memory(),
            "peak_bytes": mx.get_peak_memory(),
            "cache_bytes": mx.get_cache_memory(),
            "kv_bytes": sum(s.kv_bytes for s in list(self._sessions.values())),
        }

    # ---- memory accounting (what the daemon's memory governor budgets by) ----

    def weights_bytes(self) -> int:
        """Bytes held by the model's parameters, and the draft model's (quantization scales and biases included)."""
        models = [self.loaded.model] + ([self.spec.draft.model] if self.spec.draft is not None else [])
        return sum(a.nbytes for m in models for _, a in tree_flatten(m.parameters()))

    def full_session_kv_bytes(self) -> int:
        """Bytes one session's caches hold once full (they never hold more), its draft model's included."""
        per_token = self.loaded.kv_bytes_per_token
        if self.spec.draft is not None:
            per_token += self.spec.draft.loaded.kv_bytes_per_token
        return per_token * self.shape.bound

    async def measure_working_bytes(self) -> int:
        """Peak scratch memory of one block's forward pass, beyond the weights and the cache it fills.

        Runs a block of token 0 through a throwaway session on the compute thread:
        once to make what a model computes once and keeps, then three times, keeping
        the largest peak (when buffers are freed varies from run to run).
        """

        def probe() -> int:
            session = Session("working-bytes-probe", self.shape, self.ropes)
            session.history.extend([0] * self.shape.block)
            mx.synchronize()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            prefill_piece(self.loaded.model, session, self.shape.block, self.recompute_blocks)
            mx.synchronize()
            return mx.get_peak_memory() - before - session.kv_bytes

        await self._call(probe)
        return max([0] + [await self._call(probe) for _ in range(3)])

    def _check_token_ids(self, tokens, allow_empty: bool = False) -> None:
        if not isinstance(tokens, (list, tuple)):
            raise InvalidArgumentError("tokens must be a list of token ids")
        if not tokens and not allow_empty:
            raise InvalidArgumentError("tokens is empty: append at least one token")
        if len(tokens) > self.config.max_append_tokens:
            raise InvalidArgumentError(
                f"{len(tokens)} tokens exceed max_append_tokens={self.config.max_append_tokens}"
            )
        vocab = self.loaded.vocab_size
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int):
                raise InvalidArgumentError(f"tokens[{i}]={t!r} is not an integer token id")
            if not 0 <= t < vocab:
                raise InvalidArgumentError(f"tokens[{i}]={t} is outside the vocabulary [0, {vocab})")

    async def append(
        self,
        session_id: str,
        tokens: Optional[list[int]] = None,
        text: Optional[str] = None,
        messages: Optional[list[dict]] = None,
        add_generation_prompt: bool = True,
    ) -> dict:
        """Append to a session's history; exactly one of tokens, text or messages.

        Messages continue the conversation exactly as the chat template renders it
        (see chat.py). The model runs over appended tokens at the next generate.
        Returns the ids appended, their count and the history length after.
        """
        session = self._get(session_id)
        given = [name for name, v in (("tokens", tokens), ("text", text), ("messages", messages)) if v is not None]
        if len(given) != 1:
            raise InvalidArgumentError(
                f"give exactly one of tokens, text or messages (got {', '.join(given) or 'none'})"
            )
        if session.turn is not None:
            raise BusyError(f"session {session_id!r} is generating; append after it finishes or cancel it")
        length = len(session.history)
        if text is not None:
            if not isinstance(text, str):
                raise InvalidArgumentError("text must be a string")
            if not text:
                raise InvalidArgumentError("text is empty: append at least one character")
            tokens = await asyncio.to_thread(self._encode, text, not session.history)
        elif messages is not None:
            _check_messages(messages)
            self._check_chat_template()
            rendered = chat.continuation(
                self.loaded.tokenizer,
                messages,
                add_generation_prompt,
                session.history,
                session.chat_reply_start,
                self.eos_token_ids,
            )
            tokens = await asyncio.to_thread(self._encode, rendered, False)
        self._check_token_ids(tokens)
        if session.turn is not None:  # a generate may have started while text was tokenized
            raise BusyError(f"session {session_id!r} is generating; append after it finishes or cancel it")
        if len(session.history) != length:  # the text was rendered for the history as it was
            raise BusyError(f"another append to session {session_id!r} landed while this one was tokenized; append again")
        session.history.extend(int(t) for t in tokens)
        # A generation prompt opens an assistant turn; anything else leaves none open.
        opened = messages is not None and chat.opens_turn(messages, add_generation_prompt)
        session.chat_reply_start = len(session.history) if opened else None
        session.last_used_at = time.time()
        return {"appended": len(tokens), "history_length": len(session.history), "tokens": [int(t) for t in tokens]}

    async def prefill(self, session_id: str) -> dict:
        """Run the pending history through the model now, without generating."""
        session = self._get(session_id)
        turn = self._begin_turn(session)
        try:
            model, recompute = self.loaded.model, self.recompute_blocks
            _, evicted = await self._call(lambda: prefill_piece(model, session, session.pending, recompute))
        finally:
            turn.finish()
        return {"evicted": evicted, "cached_tokens": session.cache.length}

    def _begin_turn(self, session: Session) -> TurnState:
        if session.turn is not None:
            raise BusyError(f"session {session.id!r} is already generating; cancel it or wait for it to finish")
        turn = TurnState(session)
        session.turn = turn
        session.cancel_requested.clear()
        session.last_used_at = time.time()
        return turn

    # ---- generation ------------------------------------------------------

    async def compile_constraint(self, spec: dict, where: str = "constraint") -> Constraint:
        """Check and compile a structured-output spec (see constrain.py); errors name `where`.

        Runs off the event loop: the first call builds the tokenizer's view (~0.5 s
        for a 49k vocabulary), later ones take milliseconds or hit a cache.
        """
        return await asyncio.to_thread(self._constrainer().compile, spec, where)

    def _constrainer(self) -> Constrainer:
        with self._constrainer_lock:
            if self._constrainer_instance is None:
                self._constrainer_instance = Constrainer.for_model(self.loaded)
            return self._constrainer_instance

    def _generate_request(
        self, session: Session, max_tokens, sampling, stop, speculative, num_draft_tokens, logprobs, top_logprobs
    ) -> GenerateRequest:
        problem = rules.explain("max_tokens", max_tokens)
        if problem is not None:
            raise InvalidArgumentError(problem)
        if max_tokens > self.config.max_new_tokens:
            raise InvalidArgumentError(
                f"max_tokens={max_tokens} exceeds max_new_tokens={self.config.max_new_tokens}"
            )
        if not isinstance(sampling, SamplingParams):
            raise InvalidArgumentError("sampling must be a SamplingParams")
        sampling.validate()
        stop = list(stop or [])
        problem = rules.explain("stop", stop)
        if problem is not None:
            raise InvalidArgumentError(problem)
        if not session.history:
            raise InvalidArgumentError(
                f"session {session.id!r} has an empty history: append a prompt before generating"
            )
        check_mode(speculative, num_draft_tokens, self.spec.draft is not None)
        mode = speculative or session.speculative or self.spec.mode
        if mode == "draft" and self.spec.draft is None:
            mode = "auto"  # a session default the engine cannot serve now; requests say so explicitly
        k = num_draft_tokens or session.num_draft_tokens or self.spec.num_draft_tokens
        if not isinstance(logprobs, bool):
            raise InvalidArgumentError(f"logprobs={str(logprobs)[:40]!r}: must be a boolean")
        problem = rules.explain("top_logprobs", top_logprobs)
        if problem is not None:
            raise InvalidArgumentError(problem)
        if top_logprobs and not logprobs:
            raise InvalidArgumentError("top_logprobs needs logprobs=true")
        return GenerateRequest(
            max_tokens, sampling, tuple(stop), self.eos_token_ids, time.perf_counter(), mode, k, logprobs, top_logprobs
        )

    def generate(
        self,
        session_id: str,
        max_tokens: int = rules.DEFAULT_MAX_TOKENS,
        sampling: SamplingParams = SamplingParams(),
        stop: Optional[list[str]] = None,
        speculative: Optional[str] = None,
        num_draft_tokens: Optional[int] = None,
        constraint: Optional[Constraint] = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
    ) -> TurnStream:
        """Start a turn; iterate the returned stream for its events, the last always a DoneEvent.

        `speculative` (off, auto, prompt_lookup, draft) and `num_draft_tokens`
        override the session's and the engine's defaults for this turn.
        `constraint` (from `compile_constraint`) restricts every token to text the
        spec allows. `logprobs` and `top_logprobs` (up to 20) add the model's log
        probabilities to each token event. Bad
        arguments, an unknown session or a busy one raise before any event. The
        work starts now, not at the first iteration. Leaving the loop early,
        closing the stream or dropping it unread cancels the turn.
        """
        session = self._get(session_id)
        request = self._generate_request(
            session, max_tokens, sampling, stop, speculative, num_draft_tokens, logprobs, top_logprobs
        )
        if constraint is not None and not isinstance(constraint, Constraint):
            raise InvalidArgumentError("constraint must come from Engine.compile_constraint")
        matcher = self._constrainer().matcher(constraint) if constraint is not None else None
        turn = self._begin_turn(session)
        turn.on_done = self._count
        job = Generation(
            session, request, self.loaded.tokenizer, turn.deliver, self.recompute_blocks, self.spec, matcher
        )
        self._thread.submit(job)
        return TurnStream(turn)

    def scheduler_counters(self) -> dict:
        """The compute thread's step counts (steps, batched decode passes and rows, largest batch, ...)."""
        return dict(self._thread.scheduler.counters)

    def _count(self, done: DoneEvent) -> None:
        c = self.counters
        c["generations"] += 1
        c["tokens_in"] += done.prompt_tokens
        c["tokens_out"] += done.generated_tokens
        c["prefill_s"] += max(0.0, done.ttft_s)
        c["decode_s"] += max(0.0, done.total_s - done.ttft_s)
        c["draft_tokens"] += done.draft_tokens
        c["accepted_tokens"] += done.accepted_tokens

    async def cancel(self, session_id: str) -> bool:
        """Ask the session's running turn to stop; False if none is running. See `end_turn` to wait for it."""
        session = self._get(session_id)
        if session.turn is None:
            return False
        session.turn.cancel()
        return True

    async def end_turn(self, session_id: str) -> None:
        """Cancel the session's running turn, if any, and wait until it has ended."""
        await cancel_and_wait(self._get(session_id))

    # ---- the session store -------------------------------------------------

    async def fingerprint(self) -> dict:
        """What every stored session's cache depends on here: model files, dtype, cache shape, layout.

        Read from the model's files once (a few KiB per weight tensor, see
        `store.model_fingerprint`), then kept.
        """
        if self._fingerprint is None:
            files = await asyncio.to_thread(session_store.model_fingerprint, self.loaded.path)
            self._fingerprint = saved.fingerprint(files, self.loaded, self.shape)
        return self._fingerprint

    def _require_store(self) -> SessionStore:
        if self.store is None:
            raise StoreError("this engine has no session store")
        return self.store

    async def save_session(
        self, session_id: str, name: Optional[str] = None, extra: Optional[dict] = None
    ) -> SavedSession:
        """Write a session to the store under `name` (default: its id); it stays in memory.

        `extra` is free-form JSON kept with it and handed back by `restore_session`.
        A session whose turn is running is refused (BusyError). StoreWriteError (disk
        full, unwritable, larger than the store's cap) leaves the store as it was.
        """
        store = self._require_store()
        name = session_id if name is None else name
        session_store.check_name(name)
        extra = saved.check_extra({} if extra is None else extra)
        fingerprint = await self.fingerprint()
        session = self._get(session_id)
        last_used = session.last_used_at  # saving is not a use: idle timers keep running
        turn = self._begin_turn(session)  # no turn may start while the arrays are read
        try:
            data = await self._call(lambda: session_store.pack(name, fingerprint, *session.state(), extra))
        finally:
            turn.finish()
            session.last_used_at = last_used
        return await asyncio.to_thread(store.write, name, data)

    async def restore_session(self, name: str, fork: bool = False) -> "RestoredSession":
        """Bring a stored session back into memory exactly as it was saved.

        It comes back under the id it was saved with, or under a new id if `fork`
        (a copy of the saved conversation). The file stays in the store. Raises
        NotFoundError; CorruptSessionError if the file is damaged; FingerprintMismatchError
        (saying which part differs) if it was made with another model, dtype or cache
        shape; InvalidArgumentError if its id is in memory already.
        """
        store = self._require_store()
        fingerprint = await self.fingerprint()
        body = await asyncio.to_thread(store.read, name)
        new_id = uuid.uuid4().hex[:16] if fork else None
        session, extra = await self._call(self._unpack_session, name, body, fingerprint, new_id)
        if session.id in self._sessions:
            raise InvalidArgumentError(
                f"session {session.id!r} is in memory already; close it first, or restore {name!r} as a fork"
            )
        session.last_used_at = time.time()
        self._sessions[session.id] = session
        return RestoredSession(session.id, name, extra)

    def _unpack_session(self, name: str, body: bytes, fingerprint: dict, new_id: Optional[str]):
        session, extra = saved.session_from_stored(name, body, fingerprint, new_id, self.shape, self.ropes, self.loaded)
        if session.speculative == "draft" and self.spec.draft is None:
            # Drafting never changes what is generated, so the session is still exact without it.
            log.info("session %s restored without its draft model: this engine has none", session.id)
            session.speculative = None
        mx.eval(session.logits, session.cache.boundary_logits, session.cache.arrays())
        return session, extra


@dataclass(frozen=True)
class RestoredSession:
    """A session back in memory: its id, the stored name it came from, and the extra JSON saved with it."""

    session_id: str
    name: str
    extra: dict


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {role, content} maps")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidArgumentError(
                f"messages[{i}] must be a map with string role and content, not {chat.shown(m)}"
            )
