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
        self.text = ""
        self.stop_string: str | None = None  # the stop string that ended the text, once found

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
        delta = self._unread_text()
        if not delta or delta.endswith("\ufffd"):
            return None  # nothing final yet (an incomplete character, or a token with no text)
        old_len = len(self.text)
        self.text += delta
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        found = [(i, stop) for stop in self.stop
                 if (i := self.text.find(stop, max(0, old_len - len(stop) + 1))) >= 0]
        if found:
            i, self.stop_string = min(found)  # the earliest stop string in the text wins
            self.text = self.text[:i]
        return self.stop_string

    def flush(self) -> None:
        """At the end: text still held back as a possibly incomplete character becomes final."""
        if self.stop_string is None and self._read_offset < len(self._tokens):
            self.text += self._unread_text()
            self._prefix_offset = self._read_offset = len(self._tokens)

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: all of it once finished, else without a possible partial stop string."""
        if finished or not self._holdback:
            return self.text
        return self.text[:max(0, len(self.text) - self._holdback)]
