"""OutputProcessor: what the engine core produced in a step -> RequestOutputs, outside the core.

    SchedulerUpdate (new token ids, finish status per sample)  +  StepResult (logprobs)
      -> detokenize (IncrementalDetokenizer), stop strings (-> the sample ends now; the core aborts
         it at its next step), logprob dicts, n > 1 fan-in (samples -> one RequestOutput), beam
         search's ranked beams (`SchedulerUpdate.beams`: the n best become the outputs),
         metrics -> RequestOutputs of the kind each request asked for (`RequestOutputKind`):

    CUMULATIVE  every output carries everything so far (the pre-v2 behaviour; O(n) per step)
    DELTA       every output carries only what is new: the text, token ids and logprobs of this
                step, and only the samples that changed (streaming is O(n) in all)
    FINAL_ONLY  one output when the request finishes (what `LLM.generate` asks for)

The processor holds no device state and never calls the scheduler: the engine applies the aborts
it returns.
"""

from __future__ import annotations

import dataclasses
import time

from jaxinfer.detokenizer import IncrementalDetokenizer
from jaxinfer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxinfer.sampling_params import RequestOutputKind, SamplingParams
from jaxinfer.self_consistency import SelfConsistencyResult, confidence, should_stop, tally, winner
from jaxinfer.scheduler_output import SchedulerUpdate
from jaxinfer.tokenizer import Tokenizer


@dataclasses.dataclass
class _Sample:
    """One of a request's n samples as the caller sees it."""

    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0  # delta mode: token ids (and logprobs) already handed out
    finish_sent: bool = False  # delta mode: an output with its finish reason went out
    cumulative_logprob: float = 0.0  # of the sampled tokens (when the sampler returned them)
    answer: str | None = None  # self-consistency: the answer extracted once it finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    sample_ids: list[str]  # the core's ids of the samples (the request id itself when n = 1)
    metrics: RequestMetrics
    prompt_logprobs: dict[int, dict[int, Logprob]] | None = None
    prompt_logprobs_sent: bool = False
    stopped_early: bool = False  # self-consistency: the vote was decided before every sample finished

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)


@dataclasses.dataclass
class ProcessedStep:
    """The outputs of a step, and the sample ids the core must abort (stop strings found)."""

    outputs: list[RequestOutput]
    abort_ids: list[str]
    num_new_tokens: int = 0
    num_finished: int = 0


class OutputProcessor:
    """Turns per-sample token updates into the caller's RequestOutputs (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}
        self._owner: dict[str, tuple[_RequestState, _Sample]] = {}  # sample id -> its request, sample

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    sample_ids: list[str], arrival_time: float) -> None:
        """sample_ids: the core's ids of the request's samples (or beams: then the outputs are the n
        best beams, filled in when the search ends)."""
        num = params.n if params.use_beam_search else len(sample_ids)
        samples = [_Sample(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                                     skip_special_tokens=params.skip_special_tokens, stop=params.stop),
                           logprobs=[] if params.logprobs is not None else None) for i in range(num)]
        state = _RequestState(request_id, prompt, prompt_token_ids, params, samples, list(sample_ids),
                              RequestMetrics(arrival_time=arrival_time, num_prompt_tokens=len(prompt_token_ids)),
                              prompt_logprobs={} if params.prompt_logprobs is not None else None)
        self._states[request_id] = state
        for i, sid in enumerate(sample_ids):  # (a beam is no output of its own: None)
            self._owner[sid] = (state, None if params.use_beam_search else samples[i])

    def process(self, update: SchedulerUpdate, result) -> ProcessedStep:
        """result: the runner's StepResult (logprobs, prompt logprobs, when the step started)."""
        now = time.monotonic()
        step = ProcessedStep([], [])
        touched: dict[str, _RequestState] = {}
        for sid, lps in result.prompt_logprobs.items():
            if sid not in self._owner:
                continue  # aborted while its step ran
            state, _ = self._owner[sid]
            for p in lps:
                state.prompt_logprobs[p.position] = self._logprob_dict(p.token_id, p.logprob, p.top_logprobs)
        for u in update.requests:
            owner = self._owner.get(u.request_id)
            if owner is None:
                continue
            state, sample = owner
            m = state.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = result.start_time
            if (sample is None or sample.index == 0) and u.num_cached_tokens > 0:
                m.num_cached_tokens = u.num_cached_tokens
            if u.num_draft_tokens:
                m.num_drafts += 1
                m.num_draft_tokens += u.num_draft_tokens
                m.num_accepted_tokens += u.num_accepted_tokens
            if sample is None or sample.finished or not (u.new_token_ids or u.finished):
                continue
            touched[state.request_id] = state
            for i, token_id in enumerate(u.new_token_ids):
                m.first_token_time = m.first_token_time or now
                m.last_token_time = now
                m.num_generation_tokens += 1
                step.num_new_tokens += 1
                sample.token_ids.append(token_id)
                s = result.sampled.get(u.request_id)
                s = s[i] if s is not None and i < len(s) else None
                if s is not None and s.logprob is not None:
                    sample.cumulative_logprob += s.logprob
                if sample.logprobs is not None:
                    sample.logprobs.append(self._logprob_dict(token_id, s.logprob, s.top_logprobs))
                stop_string = sample.detok.add_token(token_id)
                if stop_string is not None:  # the core has not seen it: abort the sample there
                    sample.finish_reason, sample.stop_reason = "stop", stop_string
                    if not u.finished:
                        step.abort_ids.append(u.request_id)
                    break
            if u.finished and not sample.finished:
                sample.finish_reason, sample.stop_reason = u.status.value, u.stop_reason
                sample.detok.flush()
        for request_id, search in update.beams.items():
            state = self._states.get(request_id)
            if state is not None:
                self._finish_beams(state, search, now)
                touched[request_id] = state
                step.num_new_tokens += search.num_beam_tokens
        for state in touched.values():
            if state.params.self_consistency is not None and not state.finished:
                self._vote(state, step)
            if state.finished:
                state.metrics.finished_time = now
            output = self._output(state)
            if output is not None:
                step.outputs.append(output)
            if state.finished:
                step.num_finished += 1
                self._retire(state)
        return step

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends every unfinished sample of a request with "abort"; its final output (None if unknown)."""
        state = self._states.get(request_id)
        if state is None:
            return None
        for s in state.samples:
            if not s.finished:
                s.finish_reason = "abort"
        state.metrics.finished_time = time.monotonic()
        self._retire(state)
        return self._output(state)

    def _finish_beams(self, state: _RequestState, search, now: float) -> None:
        """A beam search ended: its n best beams become the request's outputs, best first."""
        m = state.metrics
        m.first_token_time = m.first_token_time or now
        m.last_token_time = now
        m.num_beam_tokens = search.num_beam_tokens
        for sample, hyp in zip(state.samples, search.hypotheses):
            for token_id, lp in zip(hyp.token_ids, hyp.logprobs):
                sample.token_ids.append(token_id)
                sample.detok.add_token(token_id)  # (no stop strings: beam search refuses them)
                if sample.logprobs is not None:
                    sample.logprobs.append(self._logprob_dict(token_id, lp, None))
            sample.cumulative_logprob = hyp.cumulative_logprob
            sample.finish_reason, sample.stop_reason = hyp.finish_reason, hyp.stop_reason
            sample.detok.flush()
            m.num_generation_tokens += len(hyp.token_ids)
        for sample in state.samples:  # (a search returns beam_width >= n beams: none is left over)
            if not sample.finished:
                sample.finish_reason = "length"

    def _votes(self, state: _RequestState) -> tuple[list[_Sample], dict[str, float]]:
        """(the samples that voted, the votes) of a self-consistency request."""
        sc = state.params.self_consistency
        voters = [s for s in state.samples if s.finished and s.finish_reason != "abort"]
        for s in voters:
            if s.answer is None:
                s.answer = sc.extract(s.detok.visible_text(True)) or ""
        weight = (lambda s: confidence(s.cumulative_logprob, len(s.token_ids))) if sc.weighted else (lambda s: 1.0)
        return voters, tally([(s.answer or None, weight(s)) for s in voters])

    def _vote(self, state: _RequestState, step: ProcessedStep) -> None:
        """Stops a self-consistency request's running samples once its rule says the vote is over."""
        voters, votes = self._votes(state)
        remaining = [(s, sid) for s, sid in zip(state.samples, state.sample_ids) if not s.finished]
        if remaining and should_stop(state.params.self_consistency, votes, len(voters), len(remaining)):
            for s, sid in remaining:  # the core aborts them at its next step; their pages are freed
                s.finish_reason, s.stop_reason = "abort", "self_consistency"
                step.abort_ids.append(sid)
            state.stopped_early = True

    def _retire(self, state: _RequestState) -> None:
        del self._states[state.request_id]
        for sid in state.sample_ids:
            self._owner.pop(sid, None)

    def _logprob_dict(self, token_id, logprob, top) -> dict[int, Logprob]:
        d = {int(i): Logprob(lp, rank + 1, self.tokenizer.decode([int(i)], skip_special_tokens=False))
             for rank, (i, lp) in enumerate(top or [])}
        if token_id not in d:
            d[token_id] = Logprob(logprob, None, self.tokenizer.decode([token_id], skip_special_tokens=False))
        return d

    def _output(self, state: _RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not state.finished:
            for s in state.samples:  # keep the detokenizers' pending text short
                s.detok.take_delta(False)
            return None
        delta = kind is RequestOutputKind.DELTA
        completions = []
        samples = state.samples
        result = None
        if state.params.self_consistency is not None:  # the voters, and the vote
            if not state.finished:
                return None
            samples, votes = self._votes(state)
            result = SelfConsistencyResult(winner(votes), votes, len(samples),
                                           sum(len(s.token_ids) for s in state.samples), state.stopped_early,
                                           sum(s.stop_reason == "self_consistency" for s in state.samples))
            samples = sorted(samples, key=lambda s: (s.answer or None) != result.answer)  # the winners first
        elif len(samples) > state.params.n:  # best_of: the n best by the documented score, once all finished
            if not state.finished:
                return None
            samples = sorted(samples, key=lambda s: -_score(s, state.params.best_of_score))[:state.params.n]
        for index, s in enumerate(samples):
            text = s.detok.take_delta(s.finished)
            if delta:
                # Only the samples that moved; every sample in a request's last output.
                moved = text or s.num_sent_tokens < len(s.token_ids) or (s.finished and not s.finish_sent)
                if not moved and not state.finished:
                    continue
                s.finish_sent = s.finished
                new = slice(s.num_sent_tokens, None)
                completions.append(CompletionOutput(
                    index=s.index, text=text, token_ids=s.token_ids[new], finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason, logprobs=s.logprobs[new] if s.logprobs is not None else None))
                s.num_sent_tokens = len(s.token_ids)
            else:
                completions.append(CompletionOutput(
                    index=index, text=s.detok.visible_text(s.finished), token_ids=list(s.token_ids),
                    finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    cumulative_logprob=s.cumulative_logprob if len(state.sample_ids) > state.params.n
                    or state.params.use_beam_search else None))
        prompt_lps = None
        if state.prompt_logprobs is not None and not (delta and state.prompt_logprobs_sent):
            prompt_lps = [None] + [state.prompt_logprobs.get(p) for p in range(1, len(state.prompt_token_ids))]
            state.prompt_logprobs_sent = True
        return RequestOutput(request_id=state.request_id, prompt=state.prompt,
                             prompt_token_ids=state.prompt_token_ids if delta else list(state.prompt_token_ids),
                             outputs=completions, finished=state.finished, prompt_logprobs=prompt_lps,
                             metrics=dataclasses.replace(state.metrics), self_consistency=result)


def _score(sample: _Sample, how: str) -> float:
    """best_of's score: the mean or the sum of a sample's token log-probabilities."""
    if how == "sum":
        return sample.cumulative_logprob
    return sample.cumulative_logprob / max(len(sample.token_ids), 1)
