"""Speculative method "draft": a smaller model of the same vocabulary proposes k tokens greedily.

    load_draft(model, cfg, tokenizer, max_model_len) -> DraftModel   loaded and checked: same
                                                   vocabulary and token spellings as the target

The draft keeps its own paged KV cache, shaped by its own layers and heads but indexed by the
target's page tables: the same pages, page size and slots, so one page allocation, prefix-cache
hit, preemption or free serves both caches (`Runner`). The engine sizes the page pool from one
byte budget holding a page of each (`LLMEngine`). Every step the draft runs the same packed
tokens as the target (`runner.steps.forward_step` on the step's input), so its cache holds
every computed token; after the step's tokens are known it decodes k tokens from each
request's last one (`runner.steps.draft_propose_step`: k decode steps in one jit, greedy, no host
round trip between them). Those k writes land past the request's computed tokens, in slots the
scheduler reserves ahead (`SchedulerConfig.num_lookahead_tokens`), and are overwritten when the
target computes those positions: only pages of computed tokens ever enter the prefix cache.
"""

from __future__ import annotations

import dataclasses
import hashlib

from flax import nnx

from jaxinfer.config import ModelConfig
from jaxinfer.errors import InvalidRequestError


def vocabulary_sha256(vocab_size: int, tokenizer) -> str:
    """A fingerprint of a vocabulary: every id's spelling (None where the tokenizer has no such id,
    e.g. padding rows of an embedding)."""
    spell = hashlib.sha256()
    for i in range(vocab_size):
        try:
            piece = tokenizer.id_to_token(i)
        except Exception:  # an id the tokenizer does not have
            piece = None
        spell.update(str(piece).encode("utf-8", "replace") + b"\0")
    return spell.hexdigest()


@dataclasses.dataclass
class DraftModel:
    """A loaded draft model: its config, NNX graph definition and parameters."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    source: str  # what `model` resolved to, for messages and logs


def load_draft(model: str, cfg: ModelConfig, tokenizer, max_model_len: int) -> DraftModel:
    """The draft model `model` (anything `load_model` takes), in the target's dtype, layer loop and
    weight quantization, checked against the target (`cfg`, `tokenizer`).

    Raises:
      InvalidRequestError: the draft cannot be loaded, has another vocabulary (size or the tokens'
        spellings), or a shorter context than `max_model_len` — the message says which.
    """
    from jaxinfer.errors import JaxinferError
    from jaxinfer.loader import load_model

    quantization = cfg.quantization.method if cfg.quantization is not None else None
    try:
        loaded = load_model(model, dtype=cfg.dtype, scan_layers=cfg.scan_layers, progress=False,
                            quantization=quantization)
    except JaxinferError as e:
        raise InvalidRequestError(f"speculative_config.model {model!r}: cannot load the draft model ({e})") from None
    dc = loaded.config
    if dc.vocab_size != cfg.vocab_size:
        raise InvalidRequestError(
            f"the draft model {loaded.path} has a vocabulary of {dc.vocab_size} tokens, the target {cfg.vocab_size}: "
            "a draft must share the target's tokenizer (pick a smaller model of the same family)")
    if vocabulary_sha256(dc.vocab_size, loaded.tokenizer) != vocabulary_sha256(cfg.vocab_size, tokenizer):
        raise InvalidRequestError(
            f"the draft model {loaded.path} spells its {dc.vocab_size} tokens differently from the target: a draft "
            "must share the target's tokenizer (pick a smaller model of the same family)")
    if dc.max_position_embeddings < max_model_len:
        raise InvalidRequestError(
            f"the draft model {loaded.path} has a {dc.max_position_embeddings}-token context, shorter than the "
            f"engine's max_model_len ({max_model_len}); lower max_model_len or pick another draft")
    return DraftModel(config=dc, graphdef=loaded.graphdef, params=loaded.params, source=loaded.path)
