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
from typing import Any, Iterator, Sequence, Union

from jaxinfer.engine import EngineConfig, LLMEngine, set_compilation_cache
from jaxinfer.engine_config import FLAT_FIELDS
from jaxinfer.errors import InvalidRequestError
from jaxinfer.loader import LoadedModel, load_model
from jaxinfer.outputs import RequestOutput
from jaxinfer.registry import DEFAULT_MODEL
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.tokenizer import Tokenizer, from_hf_directory

logger = logging.getLogger(__name__)

PromptType = Union[str, dict]


class LLM:
    """A model loaded for offline generation on the continuous-batching engine.

    Args:
      model: registered name (see `jaxinfer.registry.REGISTRY`) or path to a .gguf file.
      tokenizer: optional HF tokenizer directory (tokenizer.json or tokenizer.model) to use instead
        of the tokenizer stored in the GGUF.
      dtype: "float32", "bfloat16" or "float16"; None: float32 on CPU, bfloat16 on GPU/TPU.
      scan_layers: scan the layer loop (fast compile) or unroll it (fast steps); None: by backend.
      max_model_len: context limit in tokens; None: the model's own.
      max_num_seqs: most requests running at once.
      max_num_batched_tokens: most tokens computed per engine step.
      seed: seeds requests that set no seed of their own.
      progress: show loading and compiling progress bars.
      warmup: compile every step shape before the first request (else on first use).
      quantization: "int8" or "int4" keeps the weights quantized in memory and dequantizes them
        inside the matmul (a GGUF's own blocks exactly; float checkpoints quantized at load);
        None: float weights in `dtype` (a quantized orbax checkpoint keeps its quantization).
      **engine_kwargs: further `jaxinfer.engine.EngineConfig` fields (page_size, kv_cache_memory,
        enable_prefix_caching, attention_backend, compilation_cache_dir, ...).

    Raises:
      ModelNotFoundError, CheckpointError, UnsupportedModelError, TokenizerError,
      InvalidRequestError (a bad engine setting).
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, *, tokenizer: str | os.PathLike | None = None,
                 dtype: str | None = None, scan_layers: bool | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: int = 512, seed: int = 0, progress: bool = True,
                 warmup: bool = True, quantization: str | None = None, **engine_kwargs):
        from jaxinfer.quantization import check_method

        try:
            check_method(quantization)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        unknown = sorted(set(engine_kwargs) - set(FLAT_FIELDS))
        if unknown:
            raise InvalidRequestError(f"unknown LLM arguments {unknown}; engine settings are {sorted(FLAT_FIELDS)}")
        engine_config = EngineConfig.of(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens, seed=seed, **engine_kwargs)
        # The entry point owns the process-wide compilation cache setting ("" turns it off).
        self.compilation_cache_dir = set_compilation_cache(engine_config.compilation_cache_dir)
        mesh = None
        if not engine_config.parallel.is_single_device:  # orbax checkpoints restore straight into it
            from sharding.mesh import make_mesh

            try:
                mesh = make_mesh(engine_config.parallel)
            except ValueError as e:
                raise InvalidRequestError(str(e)) from None
        loaded: LoadedModel = load_model(model, dtype=dtype, scan_layers=scan_layers, progress=progress, mesh=mesh,
                                         quantization=quantization)
        self.config = loaded.config
        if max_model_len is not None and max_model_len > self.config.max_position_embeddings:
            raise InvalidRequestError(
                f"max_model_len={max_model_len} exceeds the model's context of "
                f"{self.config.max_position_embeddings} tokens; pass at most that, or leave it unset")
        self.tokenizer: Tokenizer = from_hf_directory(tokenizer) if tokenizer else loaded.tokenizer
        self.engine = LLMEngine(self.config, loaded.graphdef, loaded.params, self.tokenizer, engine_config)
        self.model_path = loaded.path
        quant = self.config.quantization
        self.quantization = quant.method if quant is not None else None  # what the weights are stored as
        # what `model` resolved to, e.g. "GGUF file (gemma3)" or "GGUF file (llama), int4 weights"
        self.model_source = loaded.source + (f", {self.quantization} weights" if self.quantization else "")
        self.max_model_len = self.engine.max_model_len
        self.max_num_seqs = max_num_seqs
        self._request_counter = itertools.count()
        if warmup:
            self.engine.warmup(progress=progress)

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def warmup(self, progress: bool = False, threads: int = 1, cancel=None) -> None:
        """Compiles every step shape (done at construction unless warmup=False); `progress` shows
        a bar over the graphs; `threads` compile at once (the server uses one per core); a set
        `cancel` event (threading.Event) skips the graphs not started yet."""
        self.engine.warmup(progress=progress, threads=threads, cancel=cancel)

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generates a continuation for each prompt; all prompts run together on the engine.

        Args:
          prompts: a string, a {"prompt_token_ids": [...]} dict, or a list of them.
          sampling_params: one SamplingParams for all prompts, or one per prompt.
          use_tqdm: show a progress bar over finished requests.

        Returns:
          One RequestOutput per prompt, in order.

        Raises:
          EmptyPromptError, PromptTooLongError, InvalidRequestError: before any work starts.
        """
        ids = self._add_requests(prompts, sampling_params, RequestOutputKind.FINAL_ONLY)
        if not ids:
            return []
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Generating", unit="req")
        finished: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in ids:  # Ctrl-C or an error: leave nothing running
                self.engine.abort(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[rid] for rid in ids]

    def beam_search(self, prompts: PromptType | Sequence[PromptType], *, beam_width: int = 4, max_tokens: int = 16,
                    length_penalty: float = 1.0, early_stopping: bool | str = False, n: int | None = None,
                    ignore_eos: bool = False, stop_token_ids: Sequence[int] | None = None,
                    logprobs: int | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Beam search over each prompt (HF transformers' scores and stopping: `jaxinfer.beam_search`);
        all prompts run together, each prompt's beams sharing its pages.

        Returns one RequestOutput per prompt whose outputs are its `n` best beams (default: all
        beam_width), best first, each with its text, token ids and `cumulative_logprob`.
        """
        params = SamplingParams(use_beam_search=True, beam_width=beam_width, n=beam_width if n is None else n,
                                temperature=0.0, max_tokens=max_tokens, length_penalty=length_penalty,
                                early_stopping=early_stopping, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids,
                                logprobs=logprobs)
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yields the request's output as it grows; the last has `finished`. Each output carries
        everything so far, or, with `SamplingParams(output_kind=RequestOutputKind.DELTA)`, only
        what is new (O(1) per token however long the output).

        Other requests already on the engine keep running meanwhile. Closing the iterator early
        aborts the request.
        """
        (rid,) = self._add_requests([prompt], sampling_params)
        done = False
        try:
            while not done and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort(rid)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation (or a list of them) and generates.

        Raises:
          ChatTemplateError: the model has no template or the messages are malformed.
        """
        return self.generate(self.chat_prompts(messages, add_generation_prompt), sampling_params, use_tqdm=use_tqdm)

    def chat_prompts(self, messages, add_generation_prompt: bool = True) -> list[dict]:
        """The token prompts `chat` generates from (one per conversation)."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        # The template writes the special tokens itself: no BOS on top (as vLLM / HF do).
        return [{"prompt": p, "prompt_token_ids": self.tokenizer.encode(p, add_special_tokens=False)}
                for p in prompts]

    # ---- helpers ------------------------------------------------------------------------------

    def _add_requests(self, prompts, sampling_params, output_kind: RequestOutputKind | None = None) -> list[str]:
        """Validates everything first, then queues all (a bad prompt queues nothing); `output_kind`
        overrides the params' own."""
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
        checked = []  # validated once, here (the engine trusts a ProcessedPrompt)
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            if output_kind is not None and params.output_kind is not output_kind:
                params = dataclasses.replace(params, output_kind=output_kind)
            text, token_ids = self._prompt_ids(prompt, i)
            checked.append((text, self.engine.input_processor.process(token_ids, params, f"prompt {i}")))
        return [self.engine.add_request(f"llm-{next(self._request_counter)}", processed, prompt_text=text)
                for text, processed in checked]

    def _prompt_ids(self, prompt: PromptType, index: int) -> tuple[str | None, list[int]]:
        """(text, token ids) of one prompt (checked by the caller)."""
        where = f"prompt {index}"
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
        elif isinstance(prompt, dict) and "prompt" in prompt and isinstance(prompt["prompt"], str):
            text, ids = prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
        else:
            raise InvalidRequestError(
                f"{where}: expected a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        return text, ids
