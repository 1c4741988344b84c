"""The offline Python API, shaped like vLLM's:

    from jaxinfer import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    print(outputs[0].outputs[0].text)

Prompts are validated here, before anything reaches the device, and bad ones raise a typed
`jaxinfer.errors` error that says what to change.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
from typing import Any, Sequence, Union

from jaxinfer.errors import EmptyPromptError, InvalidRequestError, PromptTooLongError
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.registry import DEFAULT_MODEL
from jaxinfer.sampling import SamplingParams
from jaxinfer.tokenizer import Tokenizer, from_hf_directory

logger = logging.getLogger(__name__)

PromptType = Union[str, dict]


class LLM:
    """A model loaded for offline generation.

    Args:
      model: registered name (see `jaxinfer.registry.REGISTRY`) or path to a .gguf file.
      tokenizer: optional HF tokenizer directory (tokenizer.json or tokenizer.model) to use instead
        of the tokenizer stored in the GGUF.
      dtype: "float32", "bfloat16" or "float16"; None: float32 on CPU, bfloat16 on GPU/TPU.
      scan_layers: scan the layer loop (fast compile) or unroll it (fast steps); None: by backend.
      max_model_len: context limit in tokens; None: the model's own.
      max_num_seqs: most prompts run together in one batch.
      seed: seeds requests that set no seed of their own.
      progress: show loading progress bars.

    Raises:
      ModelNotFoundError, CheckpointError, UnsupportedModelError, TokenizerError.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, tokenizer: str | os.PathLike | None = None,
                 dtype: str | None = None, scan_layers: bool | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 16, seed: int = 0, progress: bool = True):
        if max_num_seqs <= 0:
            raise InvalidRequestError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if max_model_len is not None and max_model_len <= 1:
            raise InvalidRequestError(f"max_model_len must be at least 2 tokens, got {max_model_len}")
        self._loaded: LoadedModel = load_model(model, dtype=dtype, scan_layers=scan_layers, progress=progress)
        self.config = self._loaded.config
        if max_model_len is not None and max_model_len > self.config.max_position_embeddings:
            raise InvalidRequestError(
                f"max_model_len={max_model_len} exceeds the model's context of "
                f"{self.config.max_position_embeddings} tokens; pass at most that, or leave it unset")
        self.tokenizer: Tokenizer = from_hf_directory(tokenizer) if tokenizer else self._loaded.tokenizer
        self._generator = ReferenceGenerator(self.config, self._loaded.graphdef, self._loaded.params,
                                             max_model_len=max_model_len)
        # The generator holds the parameters in the form it runs; keep no second copy.
        self._loaded = dataclasses.replace(self._loaded, params=None)
        self.max_model_len = self._generator.max_model_len
        self.max_num_seqs = max_num_seqs
        self._rng = random.Random(seed)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def warmup(self, *, prompt_len: int = 1, max_tokens: int = 16) -> None:
        """Compiles the steps a short single prompt with up to `max_tokens` new tokens will use."""
        self._generator.warmup(batch_size=1, prompt_len=prompt_len, max_tokens=max_tokens)

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generates a continuation for each prompt.

        Args:
          prompts: a string, a {"prompt_token_ids": [...]} dict, or a list of them.
          sampling_params: one SamplingParams for all prompts, or one per prompt.
          use_tqdm: show a progress bar over batches.

        Returns:
          One RequestOutput per prompt, in order.

        Raises:
          EmptyPromptError, PromptTooLongError, InvalidRequestError: before any work starts.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise InvalidRequestError(
                f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt"
            )
        for p in sampling_params:
            if not isinstance(p, SamplingParams):
                raise InvalidRequestError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        texts, token_ids = zip(*(self._prompt_ids(p, i) for i, p in enumerate(prompts)))
        seeds = [self._rng.getrandbits(32) for _ in prompts]

        outputs: list[RequestOutput] = []
        batches = range(0, len(prompts), self.max_num_seqs)
        if use_tqdm:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Generating", unit="batch")
        for start in batches:
            end = start + self.max_num_seqs
            gens = self._generator.generate(
                token_ids[start:end], sampling_params[start:end], eos_token_ids=self.tokenizer.eos_token_ids,
                decode=self._decode, seeds=seeds[start:end])
            for text, ids, gen in zip(texts[start:end], token_ids[start:end], gens):
                completion = CompletionOutput(index=0, text=gen.text, token_ids=gen.token_ids,
                                              finish_reason=gen.finish_reason, stop_reason=gen.stop_reason)
                outputs.append(RequestOutput(request_id=str(next(self._request_counter)), prompt=text,
                                             prompt_token_ids=list(ids), outputs=[completion]))
        return outputs

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (or a list of them) and generates.

        Raises:
          ChatTemplateError: the model has no template or the messages are malformed.
        """
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        # The template writes the special tokens itself: no BOS on top (as vLLM / HF do).
        token_prompts = [{"prompt": p, "prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)}
                         for p in prompts]
        return self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)

    # ---- helpers ------------------------------------------------------------------------------

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _prompt_ids(self, prompt: PromptType, index: int) -> tuple[str | None, list[int]]:
        """(text, token ids) of one prompt, validated."""
        where = f"prompt {index}"
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InvalidRequestError(f"{where}: prompt_token_ids must be a list of integers")
            bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{where}: token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            ids = list(ids)
        elif isinstance(prompt, dict) and "prompt" in prompt and isinstance(prompt["prompt"], str):
            text, ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        else:
            raise InvalidRequestError(
                f"{where}: expected a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        if not ids:
            raise EmptyPromptError(f"{where} is empty; give at least one token of prompt")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"{where} has {len(ids)} tokens but the context window is {self.max_model_len}; shorten it to at "
                f"most {self.max_model_len - 1} tokens (or raise max_model_len, up to "
                f"{self.config.max_position_embeddings})")
        return text, ids
