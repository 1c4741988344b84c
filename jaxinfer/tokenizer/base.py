"""`Tokenizer`: text <-> token ids, special tokens and the chat template of one model, over a
`tokenizers` (byte-level BPE) or `sentencepiece` backend. Built by `gguf.from_gguf_metadata` or
`hf.from_hf_directory`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

from jaxinfer.errors import ChatTemplateError
from jaxinfer.tokenizer.chat_template import compile_chat_template


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    Attributes:
      bos_token_id: id prepended when `add_bos` (None if the model has none).
      eos_token_ids: ids that end generation (EOS, end-of-turn, ...).
      add_bos: whether `encode` prepends BOS by default.
      chat_template: the model's Jinja chat template, or None.
    """

    def __init__(self, backend, *, kind: str, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 add_bos: bool, chat_template: str | None, vocab_size: int, user_defined: Sequence[str] = ()):
        self._backend = backend  # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
        # SentencePiece user-defined pieces holding raw spaces (Gemma's runs of spaces): SentencePiece
        # matches user-defined pieces only after spaces became "▁", so it never finds these; they
        # are split out of the raw text first, as HF's added tokens are. Others it matches itself.
        self._user_defined = tuple(p for p in user_defined if " " in p)
        self.kind = kind
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = vocab_size
        self._template = None

    # ---- encode / decode ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS is prepended when the model asks for it and add_special_tokens."""
        if self.kind == "spm":
            ids = self._encode_spm(text)
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]  # even after a "<bos>" in the text, as HF does
        return list(ids)

    def _encode_spm(self, text: str) -> list[int]:
        # SentencePiece does not match control tokens written in the text ("<start_of_turn>"): split
        # them out first so chat-templated prompts tokenize as llama.cpp and HF do.
        pattern = self._special_pattern
        if pattern is None:
            return self._backend.encode(text)
        ids, start = [], 0
        for match in pattern.finditer(text):
            if match.start() > start:
                ids += self._backend.encode(text[start:match.start()])
            ids.append(self._backend.piece_to_id(match.group()))
            start = match.end()
        if start < len(text):
            ids += self._backend.encode(text[start:])
        return ids

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern | None:
        """One regex over every control piece, longest first (vocabularies can hold thousands)."""
        sp = self._backend
        pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)} - {""}
        pieces |= set(self._user_defined)
        if not pieces:
            return None
        return re.compile("|".join(re.escape(p) for p in sorted(pieces, key=len, reverse=True)))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; control tokens are dropped when skip_special_tokens."""
        ids = [int(i) for i in ids]
        if self.kind == "spm":
            sp = self._backend
            if skip_special_tokens:
                return sp.decode([i for i in ids if not sp.is_control(i)])
            # SentencePiece drops control pieces from its output; HF writes them as their text.
            parts, run = [], []
            for i in ids:
                if sp.is_control(i):
                    parts += [sp.decode(run), sp.id_to_piece(i)]
                    run = []
                else:
                    run.append(i)
            return "".join(parts + [sp.decode(run)])
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        if self.kind == "spm":
            return self._backend.id_to_piece(int(token_id))
        return self._backend.id_to_token(int(token_id))

    # ---- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Renders `messages` with the model's template (as HF transformers does).

        Raises:
          ChatTemplateError: no template, malformed messages, or the template rejected them.
        """
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template; use generate() with a plain prompt instead of chat()"
            )
        if not isinstance(messages, list) or not messages:
            raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ChatTemplateError(f"messages[{i}] must be a dict with a 'role' string and 'content'")
        template = self._compiled_template()
        tok = lambda i: self.id_to_token(i) if i is not None else ""  # noqa: E731
        try:
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=tok(self.bos_token_id),
                eos_token=tok(self.eos_token_ids[0] if self.eos_token_ids else None), **kwargs)
        except ChatTemplateError:
            raise
        except Exception as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None

    def _compiled_template(self):
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        return self._template
