"""Tokenizers from GGUF metadata or a HF directory, and chat templates.

Two kinds of vocabulary, each handled by its well-kept library:

* GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2) through
  `tokenizers`: the vocabulary and merges come from the metadata; the pre-tokenizer (how text is
  split before merging) follows llama.cpp's `tokenizer.ggml.pre` type, since merges only reproduce
  the original tokenizer when text is split the way it was split during training.
* SentencePiece (`"llama"`: Llama 2, Mistral, Gemma) through `sentencepiece`: a model proto is
  built from the tokens, scores and token types in the metadata, byte fallback included.

Chat templates are the model's own Jinja template, rendered with jinja2 in a sandbox the way HF
transformers renders them. A GGUF file that carries none gets its family's turn format when the
family has a fixed one (`FAMILY_CHAT_FORMATS`: Gemma's <start_of_turn> turns, with <end_of_turn> as a
stop token, as llama.cpp does for the arch).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from datetime import datetime
from typing import Any, Sequence

from jaxinfer.errors import ChatTemplateError, TokenizerError

logger = logging.getLogger(__name__)

# llama.cpp token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns, by llama.cpp `tokenizer.ggml.pre` type.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Gemma's turn format: user / model turns, a system message folded into the first user turn, roles
# alternating, content a string or a list of text parts. Written from the format Gemma's model card
# documents.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(prefix='') -%}
{%- if messages[0]['role'] == 'system' -%}
  {%- set ns.prefix = (messages[0]['content'] if messages[0]['content'] is string
                       else messages[0]['content'] | map(attribute='text') | join('')) + '\n\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != loop.index0 is even -%}
    {{ raise_exception('Gemma needs user and assistant turns to alternate, starting with user') }}
  {%- endif -%}
  {{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}
  {{- ns.prefix if loop.first else '' -}}
  {%- if m['content'] is string -%}
    {{ m['content'] | trim }}
  {%- else -%}
    {%- for part in m['content'] if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endfor -%}
  {%- endif -%}
  {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"""

# general.architecture -> (chat template, stop tokens) for GGUF files without a template.
FAMILY_CHAT_FORMATS = {"gemma3": (GEMMA_CHAT_TEMPLATE, ("<end_of_turn>",))}

_DIGITS_FIRST = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_SPLITS = {
    **{name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")},
    **{name: _GPT2_SPLIT for name in ("gpt2", "default", "mpt", "olmo", *_DIGITS_FIRST)},
}


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
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ChatTemplateError(f"the chat template rejected the messages: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template


# ---- construction from GGUF metadata --------------------------------------------------------


def from_gguf_metadata(meta: dict[str, Any], *, source: str = "GGUF") -> Tokenizer:
    """Builds the tokenizer a GGUF file describes (`GGUFFile.metadata`).

    Raises:
      TokenizerError: the metadata has no vocabulary or a tokenizer model we do not implement.
    """
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{source}: no tokenizer vocabulary in the metadata (tokenizer.ggml.tokens)")
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id") if k in meta]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    chat_template = meta.get("tokenizer.chat_template")
    family = FAMILY_CHAT_FORMATS.get(str(meta.get("general.architecture", "")))
    if family is not None:
        chat_template = chat_template or family[0]
        eos_ids += [tokens.index(t) for t in family[1] if t in tokens]
    common = dict(bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                  chat_template=chat_template, vocab_size=len(tokens))
    if model == "gpt2":
        backend = _byte_level_bpe(tokens, types, meta.get("tokenizer.ggml.merges") or [],
                                  str(meta.get("tokenizer.ggml.pre", "default")))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        return Tokenizer(backend, kind="bpe", add_bos=add_bos, **common)
    if model == "llama":
        backend = _sentencepiece(tokens, types, meta.get("tokenizer.ggml.scores"),
                                 unk_id=meta.get("tokenizer.ggml.unknown_token_id", 0),
                                 add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        user_defined = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        return Tokenizer(backend, kind="spm", add_bos=add_bos, user_defined=user_defined, **common)
    raise TokenizerError(f"{source}: tokenizer model {model!r} is not supported; jaxinfer builds 'gpt2' "
                         "(byte-level BPE) and 'llama' (SentencePiece) vocabularies")


def _byte_level_bpe(tokens, types, merges, pre: str):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if pre not in _SPLITS:
        logger.warning("unknown pre-tokenizer type %r; splitting text as GPT-2 does", pre)
    split = _SPLITS.get(pre, _GPT2_SPLIT)
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre in _DIGITS_FIRST else []
    steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are matched whole in text and dropped by skip_special_tokens;
    # user-defined tokens are matched whole but kept.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tk


def _sentencepiece(tokens, types, scores, *, unk_id: int, add_space_prefix: bool):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = any(t == _BYTE for t in types)
    proto.trainer_spec.unk_id = int(unk_id)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_space_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    type_map = {_NORMAL: pb.ModelProto.SentencePiece.NORMAL, _UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
                _CONTROL: pb.ModelProto.SentencePiece.CONTROL,
                _USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
                _UNUSED: pb.ModelProto.SentencePiece.UNUSED, _BYTE: pb.ModelProto.SentencePiece.BYTE}
    scores = list(scores) if scores is not None else [0.0] * len(tokens)
    for tok, score, ty in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score = tok, float(score)
        piece.type = type_map.get(int(ty), pb.ModelProto.SentencePiece.NORMAL)
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except Exception as e:
        raise TokenizerError(f"the SentencePiece vocabulary in the metadata is invalid: {e}") from None
    return sp


# ---- construction from a HF directory --------------------------------------------------------


def from_hf_directory(path: str | os.PathLike) -> Tokenizer:
    """Builds a tokenizer from a HF model directory (tokenizer.json or tokenizer.model).

    Raises:
      TokenizerError: neither file exists, or they cannot be read.
    """
    path = os.fspath(path)
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    special = _read_json(os.path.join(path, "special_tokens_map.json"))
    chat_template = config.get("chat_template")
    template_file = os.path.join(path, "chat_template.jinja")
    if chat_template is None and os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            chat_template = f.read()

    def token_text(key):
        value = config.get(key) or special.get(key)
        return value.get("content") if isinstance(value, dict) else value

    tokenizer_json = os.path.join(path, "tokenizer.json")
    spm_model = os.path.join(path, "tokenizer.model")
    if os.path.isfile(tokenizer_json):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(tokenizer_json)
        except Exception as e:
            raise TokenizerError(f"{tokenizer_json}: cannot be read ({e})") from None
        to_id, kind, vocab_size = backend.token_to_id, "bpe", backend.get_vocab_size()
        backend.no_padding()
        # Whether the file's own post-processor prepends a token (Gemma's, Llama's BOS): the
        # default when tokenizer_config.json does not say. Tokenizer.encode adds it from then on.
        post_ids = backend.encode("", add_special_tokens=True).ids
        backend.post_processor = None
    elif os.path.isfile(spm_model):
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor()
        try:
            backend.Load(spm_model)
        except Exception as e:
            raise TokenizerError(f"{spm_model}: cannot be read ({e})") from None
        to_id = lambda t: backend.piece_to_id(t) if backend.piece_to_id(t) != backend.unk_id() else None  # noqa: E731
        kind, vocab_size = "spm", backend.get_piece_size()
        post_ids = None
    else:
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")

    bos, eos = token_text("bos_token"), token_text("eos_token")
    bos_id = to_id(bos) if bos else None
    eos_ids = [to_id(eos)] if eos and to_id(eos) is not None else []
    # generation_config.json may list more stop ids (Gemma: <end_of_turn>, Llama 3: <|eot_id|>).
    generation_eos = _read_json(os.path.join(path, "generation_config.json")).get("eos_token_id")
    eos_ids += [int(i) for i in (generation_eos if isinstance(generation_eos, list) else [generation_eos])
                if isinstance(i, int) and 0 <= i < vocab_size]
    default_bos = kind == "spm" if post_ids is None else bool(post_ids) and post_ids[0] == bos_id
    add_bos = bool(config.get("add_bos_token", default_bos))
    return Tokenizer(backend, kind=kind, bos_token_id=bos_id, eos_token_ids=eos_ids, add_bos=add_bos,
                     chat_template=chat_template, vocab_size=vocab_size)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot be read ({e})") from None
