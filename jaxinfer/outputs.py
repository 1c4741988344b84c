"""What the offline API returns (the vLLM shapes)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    """One generated continuation.

    Attributes:
      index: position among the request's outputs (always 0: one output per request).
      text: generated text, special tokens and stop strings left out as the params say.
      token_ids: generated token ids (including a final EOS / stop token).
      finish_reason: "stop" (EOS, a stop token or a stop string) or "length".
      stop_reason: the stop token id or stop string that ended it; None for EOS or length.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:
    """A prompt and what was generated for it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
