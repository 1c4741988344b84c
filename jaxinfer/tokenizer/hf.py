"""Tokenizers from a HF model directory: tokenizer.json (`tokenizers`) or tokenizer.model
(`sentencepiece`), with tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
generation_config.json for special tokens, BOS and the chat template.
"""

from __future__ import annotations

import json
import os

from jaxinfer.errors import TokenizerError
from jaxinfer.tokenizer.base import Tokenizer


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
