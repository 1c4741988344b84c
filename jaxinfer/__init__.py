"""jaxinfer: LLM inference in JAX (Flax NNX models, Pallas paged attention, continuous batching)."""

from jaxinfer.outputs import CompletionOutput, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.structured_output import StructuredOutputsParams
from jaxinfer.speculative import SpeculativeConfig

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "SpeculativeConfig", "StructuredOutputsParams", "RequestOutput",
           "RequestOutputKind", "CompletionOutput"]


def __getattr__(name):
    # LLM imports jax and flax; load it on first use so `import jaxinfer` stays cheap.
    if name == "LLM":
        from jaxinfer.llm import LLM

        return LLM
    raise AttributeError(f"module 'jaxinfer' has no attribute {name!r}")
