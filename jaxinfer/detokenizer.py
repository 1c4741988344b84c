"""Incremental detokenization with stop strings (host side, no jax import).

Decoding one token at a time is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a word's leading space depends on its neighbours). The detokenizer decodes a short
window instead and emits only the text that became final:

    tokens   ... [prefix_offset ........ read_offset ........ end]
    text          decode(prefix..read)   | new text = decode(prefix..end) minus that

A delta ending in U+FFFD (an incomplete UTF-8 sequence) is held back until the next token
completes it. Stop strings are searched in the text as it grows; the text is cut before the first
one found, and while streaming the last len(longest stop) - 1 characters are held back so a
partial stop string is never shown.

Work per token is O(1) in the length of the output: the text is kept as the pieces already handed
out (`take_delta`) plus a short pending tail (held-back characters and what came since the last
delta); a stop string is searched only where it can newly appear (the pending tail).
"""

from __future__ import annotations

from typing import Sequence

from jaxinfer.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first generated token


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool = True,
                 stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._tokens = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._emitted: list[str] = []  # text handed out by take_delta, in order
        self._pending = ""  # final text not handed out yet (the hold-back and the newest deltas)
        self.stop_string: str | None = None  # the stop string that ended the text, once found

    @property
    def text(self) -> str:
        """All final text so far (O(length): for the end of a request, not every step)."""
        return "".join(self._emitted) + self._pending

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _unread_text(self) -> str:
        """Text the tokens after read_offset add, decoded with the window before them as context."""
        prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset:])
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""

    def add_token(self, token_id: int) -> str | None:
        """Appends a token; returns the stop string if the text now contains one (text cut before it)."""
        if self.stop_string is not None:
            return self.stop_string
        self._tokens.append(token_id)
        if self._prefix_offset > 64:  # drop the tokens no decode window reads any more
            drop = self._prefix_offset
            del self._tokens[:drop]
            self._prefix_offset, self._read_offset = 0, self._read_offset - drop
        delta = self._unread_text()
        if not delta or delta.endswith("\ufffd"):
            return None  # nothing final yet (an incomplete character, or a token with no text)
        # The hold-back keeps the last len(longest stop) - 1 characters pending, so a stop string
        # that straddles the old text and the delta lies inside the pending tail.
        old_len = len(self._pending)
        self._pending += delta
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        found = [(i, stop) for stop in self.stop
                 if (i := self._pending.find(stop, max(0, old_len - len(stop) + 1))) >= 0]
        if found:
            i, self.stop_string = min(found)  # the earliest stop string in the text wins
            self._pending = self._pending[:i]
        return self.stop_string

    def flush(self) -> None:
        """At the end: text still held back as a possibly incomplete character becomes final."""
        if self.stop_string is None and self._read_offset < len(self._tokens):
            self._pending += self._unread_text()
            self._prefix_offset = self._read_offset = len(self._tokens)

    def _num_visible_pending(self, finished: bool) -> int:
        if finished or not self._holdback:
            return len(self._pending)
        return max(0, len(self._pending) - self._holdback)

    def take_delta(self, finished: bool) -> str:
        """The text safe to show that was not handed out yet (everything once finished)."""
        n = self._num_visible_pending(finished)
        delta, self._pending = self._pending[:n], self._pending[n:]
        if delta:
            self._emitted.append(delta)
        return delta

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: all of it once finished, else without a possible partial stop string."""
        return "".join(self._emitted) + self._pending[:self._num_visible_pending(finished)]
