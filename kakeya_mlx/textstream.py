"""Incremental detokenization for streaming.

Text is released only when it is final: never half a UTF-8 character (the
tokenizer decodes it as U+FFFD until the rest arrives), never a zero-width joiner
that the next token may extend into one grapheme, and never a piece that could
still become a stop string.
"""

from typing import Optional

HOLD_BACK_ENDINGS = ("\ufffd", "\u200d")


class TextStream:
    """Feed token ids one by one; get back text that is safe to show."""

    def __init__(self, tokenizer, stop: Optional[list[str]] = None):
        self._tokenizer = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are fully decoded into self._text
        self._read = 0
        self._text = ""
        self._released = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Add one token; return newly released text ("" if none is final yet)."""
        self._ids.append(token_id)
        settled = self._decode(self._ids[self._prefix : self._read])
        current = self._decode(self._ids[self._prefix :])
        if len(current) > len(settled) and not current.endswith(HOLD_BACK_ENDINGS):
            self._text += current[len(settled) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release()

    def _release(self) -> str:
        text = self._text
        if self._stop:
            start = max(0, self._released - max(len(s) for s in self._stop) + 1)
            hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                end = min(hits)
                out = text[self._released : end] if end > self._released else ""
                self._released = max(self._released, end)
                return out
            end = len(text) - self._partial_stop_length(text)
        else:
            end = len(text)
        out = text[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return out

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """At the end of a generation: release whatever is held back (not past a stop)."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._prefix :])
        settled = self._decode(self._ids[self._prefix : self._read])
        if len(tail) > len(settled):
            self._text += tail[len(settled) :]
            self._prefix = self._read = len(self._ids)
        out = self._text[self._released :]
        self._released = len(self._text)
        return out

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._released]
