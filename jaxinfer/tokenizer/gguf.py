"""Tokenizers from GGUF metadata. Two kinds of vocabulary, each handled by its well-kept library:

* GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2) through
  `tokenizers`: the vocabulary and merges come from the metadata; the pre-tokenizer (how text is
  split before merging) follows llama.cpp's `tokenizer.ggml.pre` type, since merges only reproduce
  the original tokenizer when text is split the way it was split during training.
* SentencePiece (`"llama"`: Llama 2, Mistral, Gemma) through `sentencepiece`: a model proto is
  built from the tokens, scores and token types in the metadata, byte fallback included.

Files without a chat template get their family's turn format (`chat_template.FAMILY_CHAT_FORMATS`).
"""

from __future__ import annotations

import logging
from typing import Any

from jaxinfer.errors import TokenizerError
from jaxinfer.tokenizer.base import Tokenizer
from jaxinfer.tokenizer.chat_template import FAMILY_CHAT_FORMATS

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
_DIGITS_FIRST = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_SPLITS = {
    **{name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")},
    **{name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen")},
    **{name: _GPT2_SPLIT for name in ("gpt2", "default", "mpt", "olmo", *_DIGITS_FIRST)},
}


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
