"""Incremental detokenization for streaming.

Tokens are released with their text once they are final: never while their text
ends in half a UTF-8 character (the tokenizer decodes it as U+FFFD until the rest
arrives) or in a zero-width joiner that the next token may extend into one
grapheme, and never while their text could still become the start of a stop
string. When a stop string is found, the tokens that overlap it are not released:
the turn drops them from the history and re-tokenizes the text before the stop.
"""

from typing import Optional

HOLD_BACK_ENDINGS = ("\ufffd", "\u200d")


class TextStream:
    """Feed token ids one by one; take back the (token id, text) pairs that are final."""

    def __init__(self, tokenizer, stop: Optional[list[str]] = None):
        self._tokenizer = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._ends: list[int] = []  # _ends[i]: length of _text once token i is decoded
        self._prefix = 0  # ids before this are fully decoded into self._text
        self._read = 0
        self._text = ""
        self._safe = 0  # text before this cannot become part of a stop string
        self._taken = 0  # tokens handed out by take()
        self.stop_at: Optional[int] = None  # where the stop string starts in the text

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        """Add one generated token."""
        if self.stopped:
            raise RuntimeError("the stream already stopped")
        self._ids.append(token_id)
        settled = self._decode(self._ids[self._prefix : self._read])
        current = self._decode(self._ids[self._prefix :])
        if current.endswith(HOLD_BACK_ENDINGS):
            return
        if len(current) > len(settled):
            self._text += current[len(settled) :]
        self._settle()
        self._scan()

    def _settle(self) -> None:
        """The tokens decoded since the last settle end where the text now ends.

        Tokens that were held back together (they completed a character together)
        share that end, so a stop string inside their text claims them all.
        """
        self._ends.extend([len(self._text)] * (len(self._ids) - len(self._ends)))
        self._prefix, self._read = self._read, len(self._ids)

    def _scan(self) -> None:
        text = self._text
        if not self._stop:
            self._safe = len(text)
            return
        start = max(0, self._safe - self._longest_stop + 1)
        hits = [i for i in (text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.stop_at = self._safe = min(hits)
            return
        self._safe = len(text) - self._partial_stop_length(text)

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def take(self) -> list[tuple[int, str]]:
        """The tokens that became final since the last call, each with its text."""
        final = self.final_tokens
        out = []
        for i in range(self._taken, final):
            start = self._ends[i - 1] if i else 0
            out.append((self._ids[i], self._text[start : self._ends[i]]))
        self._taken = max(self._taken, final)
        return out

    def flush(self) -> None:
        """At the end of a generation that did not stop on a stop string: every token becomes final."""
        if self.stopped:
            return
        tail = self._decode(self._ids[self._prefix :])
        settled = self._decode(self._ids[self._prefix : self._read])
        if len(tail) > len(settled):
            self._text += tail[len(settled) :]
        self._settle()
        self._safe = len(self._text)

    @property
    def final_tokens(self) -> int:
        """How many of the tokens fed so far are final: their text is out of reach of any stop string."""
        n = len(self._ends)
        while n and self._ends[n - 1] > self._safe:
            n -= 1
        return n

    @property
    def remainder(self) -> str:
        """After a stop: the text between the last kept token and the stop string."""
        kept = self.final_tokens
        start = self._ends[kept - 1] if kept else 0
        return self._text[start : self.stop_at]

    @property
    def stop_sequence(self) -> Optional[str]:
        """After a stop: the stop string found (the first listed, where several start at the same place)."""
        if self.stop_at is None:
            return None
        return next(s for s in self._stop if self._text.startswith(s, self.stop_at))

    @property
    def pending_tokens(self) -> int:
        """Tokens fed but not final yet (their text is held back)."""
        return len(self._ids) - self.final_tokens

    @property
    def text(self) -> str:
        """The text of the tokens taken so far."""
        return self._text[: self._ends[self._taken - 1]] if self._taken else ""
