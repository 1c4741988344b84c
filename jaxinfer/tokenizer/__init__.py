"""Tokenizers from GGUF metadata or a HF directory, and chat templates.

    base.py           Tokenizer: encode / decode, special tokens, apply_chat_template
    chat_template.py  GEMMA_CHAT_TEMPLATE, FAMILY_CHAT_FORMATS, the sandboxed jinja2 compile
    gguf.py           from_gguf_metadata: byte-level BPE (`tokenizers`) or SentencePiece from the metadata
    hf.py             from_hf_directory: tokenizer.json or tokenizer.model, with the HF config files
"""

from jaxinfer.tokenizer.base import Tokenizer
from jaxinfer.tokenizer.chat_template import FAMILY_CHAT_FORMATS, GEMMA_CHAT_TEMPLATE
from jaxinfer.tokenizer.gguf import from_gguf_metadata
from jaxinfer.tokenizer.hf import from_hf_directory

__all__ = ["FAMILY_CHAT_FORMATS", "GEMMA_CHAT_TEMPLATE", "Tokenizer", "from_gguf_metadata", "from_hf_directory"]
