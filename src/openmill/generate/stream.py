"""Token ids in, text out, one token at a time: what streaming and stop strings need.

Byte-level BPE splits a multi-byte character across tokens, so text is released only once it
decodes cleanly (no trailing U+FFFD), and a tail that could be the start of a stop string is held
back until the next token shows whether it is one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False  # a stop string was found; nothing more is released

    def push(self, token: int) -> str:
        """Add one generated token; return the newly released text (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        full = self.decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(full[: min(hits)])
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return ""
        return self._release(full[: len(full) - self._held(full)])

    def finish(self) -> str:
        """The generation ended: release whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self.decode(self.ids).rstrip("\ufffd"))

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        delta, self.text = upto[len(self.text) :], upto
        return delta
