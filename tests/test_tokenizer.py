"""Tokenizer parity with HF transformers' tokenizer for the same GGUF, round trips, chat templates,
the SentencePiece-from-GGUF path and HF directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxinfer import tokenizer as tokenizer_lib
from jaxinfer.errors import ChatTemplateError, TokenizerError
from tests.hf_reference_checks import check_tokenizer_cases


def test_ids_match_hf_for_hard_strings(smollm2, hf_reference):
    check_tokenizer_cases(smollm2.get_tokenizer(), hf_reference[0])


def test_decode_encode_round_trip(smollm2, hf_reference):
    meta, _ = hf_reference
    tok = smollm2.get_tokenizer()
    for case in meta["tokenizer_cases"]:
        assert tok.decode(tok.encode(case["text"]), skip_special_tokens=False) == case["text"]


def test_prompt_ids_and_chat_template_match_hf(smollm2, hf_reference):
    meta, _ = hf_reference
    tok = smollm2.get_tokenizer()
    for prompt in meta["prompts"]:
        if prompt["kind"] == "chat":
            assert tok.apply_chat_template(prompt["messages"], add_generation_prompt=True) == prompt["text"]
        assert tok.encode(prompt["text"]) == prompt["prompt_token_ids"]


def test_special_tokens_and_eos(smollm2):
    tok = smollm2.get_tokenizer()
    assert tok.encode("<|im_start|>") == [1]
    assert tok.eos_token_ids == (2,)
    assert tok.decode([1, 28, 2], skip_special_tokens=True) == tok.decode([28], skip_special_tokens=True)


def test_chat_template_errors(smollm2):
    tok = smollm2.get_tokenizer()
    with pytest.raises(ChatTemplateError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ChatTemplateError, match="non-empty"):
        tok.apply_chat_template([])


def test_unknown_tokenizer_model_is_a_typed_error():
    with pytest.raises(TokenizerError, match="not supported"):
        tokenizer_lib.from_gguf_metadata({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="no tokenizer vocabulary"):
        tokenizer_lib.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


@pytest.fixture(scope="module")
def trained_spm(tmp_path_factory):
    """A real SentencePiece BPE model with byte fallback, trained here on generated text."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve", "hello",
             "world", "token", "izer", "piece", "sentence", "model", "jax", "tpu", "gpu"]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(2000)]
    (d / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=300, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<start_of_turn>"], control_symbols=["<end_of_turn>"],
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(d / "m.model"))


def test_sentencepiece_from_gguf_metadata_matches_the_original(trained_spm):
    sp = trained_spm
    n = sp.get_piece_size()
    type_of = lambda i: (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)  # noqa: E731
                         else 4 if sp.id_to_piece(i) == "<start_of_turn>" else 1)
    meta = {  # what llama.cpp's converter writes for a SentencePiece vocabulary
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [type_of(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
    }
    tok = tokenizer_lib.from_gguf_metadata(meta)
    strings = ["the quick brown fox", "hello world", " leading space", "café naïve", "日本語 unseen ✓",
               "emoji 🚀", "jax  tpu\tgpu\n", "<start_of_turn>hello"]
    for s in strings:
        assert tok.encode(s, add_special_tokens=False) == sp.encode(s), s
        assert tok.encode(s) == [1, *sp.encode(s)]
        assert tok.decode(tok.encode(s)) == sp.decode(sp.encode(s))
    assert 1 not in tok.encode("x", add_special_tokens=False)
    # Byte fallback: characters never seen in training become byte tokens, and decode restores them.
    assert tok.decode(tok.encode("日本語")) == "日本語"
    # A control token written in the text is matched whole, as llama.cpp and HF do.
    assert tok.encode("<end_of_turn>", add_special_tokens=False) == [sp.piece_to_id("<end_of_turn>")]


def test_hf_directory_with_tokenizer_json(smollm2, tmp_path):
    tok = smollm2.get_tokenizer()
    tok._backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": tok.chat_template}))
    hf = tokenizer_lib.from_hf_directory(tmp_path)
    assert hf.eos_token_ids == (2,) and hf.bos_token_id == 1
    for s in ["Hello world", "<|im_start|>user\nhi<|im_end|>", "日本語 🙂 12345"]:
        assert hf.encode(s) == tok.encode(s)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_hf_directory_with_tokenizer_model(trained_spm, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(trained_spm.serialized_model_proto())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": False}))
    tok = tokenizer_lib.from_hf_directory(tmp_path)
    assert tok.encode("the quick fox") == trained_spm.encode("the quick fox")


def test_hf_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        tokenizer_lib.from_hf_directory(tmp_path)


def test_user_defined_pieces_with_raw_spaces_are_split_out_first(trained_spm):
    """Gemma-style vocabularies hold user-defined runs of spaces ("  "); SentencePiece only sees
    "▁" and would never match them, so they are matched in the raw text, as HF's added tokens are."""
    sp = trained_spm
    n = sp.get_piece_size()
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)] + ["  "],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)] + [0.0],
        "tokenizer.ggml.token_type": [3 if sp.is_control(i) else 6 if sp.is_byte(i) else 2 if sp.is_unknown(i)
                                      else 1 for i in range(n)] + [4],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": False,
    }
    tok = tokenizer_lib.from_gguf_metadata(meta)
    ids = tok.encode("hello  world", add_special_tokens=False)
    assert ids == tok.encode("hello", add_special_tokens=False) + [n] + tok.encode("world", add_special_tokens=False)
    assert tok.decode(ids) == "hello  world"
    assert n not in tok.encode("hello world", add_special_tokens=False)
