"""The device side of a step: buckets (shapes), requests (the per-request state the runner keeps),
inputs and plan (a step's host arrays), steps (shared jit graphs), runner (the KV cache; SchedulerOutput
in, sampled tokens out; async submit / collect), results (a step in flight and collected), drafter
(speculative decoding's proposers), warmup (every graph compiled before the first request)."""

from jaxinfer.runner.buckets import RunnerConfig, StepShape, all_step_shapes, default_page_buckets, step_shape
from jaxinfer.runner.inputs import ModelInput, Penalties, SamplingInput
from jaxinfer.runner.requests import CachedRequest
from jaxinfer.runner.results import InFlightStep, PromptLogprob, SampledToken, StepPlan, StepResult
from jaxinfer.runner.runner import Runner
from jaxinfer.runner.steps import AttentionSpec, forward_step, prompt_logprobs_step, sample_step

__all__ = ["AttentionSpec", "CachedRequest", "InFlightStep", "ModelInput", "Penalties", "PromptLogprob", "Runner",
           "RunnerConfig", "SampledToken", "SamplingInput", "StepPlan", "StepResult", "StepShape", "all_step_shapes",
           "default_page_buckets", "forward_step", "prompt_logprobs_step", "sample_step", "step_shape"]
