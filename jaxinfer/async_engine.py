"""The engine on a background thread, with one output stream per caller.

    caller threads                          engine thread
    submit(ids, params) -> stream      -->  command queue --> engine.add_request
    submit_many([...])  -> stream      -->  (one stream for several requests, e.g. an HTTP
                                             request with a list of prompts)
    stream.cancel() / abort(id)        -->  command queue --> engine.abort (pages freed)
    for out in stream: ...             <--  engine.step() outputs, routed by request id

Only the engine thread touches the engine, so the engine needs no locks. A step that raises fails
the requests it was serving (their streams raise the error) and the loop goes on with an empty
engine: one bad step never takes the server down or leaves pages held.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Iterator, Sequence

from jaxinfer.engine import LLMEngine
from jaxinfer.errors import JaxinferError
from jaxinfer.input_processor import ProcessedPrompt
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_REQUEST_IDS = itertools.count()  # process-wide: engines outlive the AsyncEngines driving them


class EngineDeadError(JaxinferError, RuntimeError):
    """The engine stopped (shut down, or failed) before the request finished."""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One request of a `submit_many` call."""

    prompt_token_ids: Sequence[int] | ProcessedPrompt  # a ProcessedPrompt is not checked again
    params: SamplingParams
    prompt: str | None = None
    request_id: str | None = None
    priority: int = 0


class RequestStream:
    """The outputs of one or more requests as they come: each a cumulative RequestOutput (its
    `request_id` says whose); a request's last one has `finished` set. Iterate it, poll it with
    `get(timeout)`, or call `result()` / `results()` for the final outputs. An error in any of the
    requests ends the stream by raising it."""

    def __init__(self, request_ids: Sequence[str], owner: "AsyncEngine"):
        self.request_ids = list(request_ids)
        self._owner = owner
        self._queue: queue.Queue = queue.Queue()
        self._pending = set(self.request_ids)
        self._finals: dict[str, RequestOutput] = {}
        self._error: BaseException | None = None

    @property
    def request_id(self) -> str:
        return self.request_ids[0]

    @property
    def done(self) -> bool:
        """Every request finished, or the stream failed."""
        return not self._pending or self._error is not None

    def _put(self, item) -> None:  # engine thread
        self._queue.put(item)

    def get(self, timeout: float | None = None) -> RequestOutput | None:
        """The next output, or None if none came within `timeout` s or the stream is done.

        Raises the request's error (e.g. EngineDeadError) if it failed."""
        if self._error is not None:
            raise self._error
        if not self._pending:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._error = item
            raise item
        if item.finished and item.request_id in self._pending:
            self._pending.discard(item.request_id)
            self._finals[item.request_id] = item
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        while not self.done:
            out = self.get()
            if out is not None:
                yield out

    def results(self, timeout: float | None = None) -> list[RequestOutput]:
        """Blocks until every request finishes; their final outputs in submission order."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"requests {sorted(self._pending)} did not finish in {timeout} s")
            self.get(timeout=remaining)
        if self._error is not None:
            raise self._error
        return [self._finals[rid] for rid in self.request_ids]

    def result(self, timeout: float | None = None) -> RequestOutput:
        """The final output of a one-request stream (blocks until it finishes)."""
        (out,) = self.results(timeout)
        return out

    def cancel(self) -> None:
        """Aborts every request still running (e.g. the client went away); their pages are freed."""
        for rid in list(self._pending):
            self._owner.abort(rid)


class AsyncEngine:
    """Runs `engine.step()` on a daemon thread while requests come and go from any thread."""

    def __init__(self, engine: LLMEngine, *, idle_wait: float = 0.05):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._idle_wait = idle_wait
        self._lock = threading.Lock()
        self._in_flight = 0  # submitted requests whose stream has not yet delivered their end
        self._stats: dict[str, float] = {}  # published by the engine thread between steps
        self._publish_stats()
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    # ---- caller side --------------------------------------------------------------------------

    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None,
               prompt: str | None = None, priority: int = 0) -> RequestStream:
        """Queues a request; returns its stream. Bad input raises here, in the caller's thread."""
        return self.submit_many([PromptSpec(prompt_token_ids, params, prompt, request_id, priority)])

    def submit_many(self, specs: Sequence[PromptSpec]) -> RequestStream:
        """Queues several requests behind one stream. All are validated first: a bad one raises and
        queues none."""
        if not self._accepting or self._stop.is_set():
            raise EngineDeadError("the engine is shutting down and takes no new requests")
        if not self.is_running:
            raise EngineDeadError("the engine thread is not running")
        checked = []
        for i, spec in enumerate(specs):
            if not isinstance(spec.params, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(spec.params).__name__}")
            where = "prompt" if len(specs) == 1 else f"prompt {i}"
            # validated once, here (pure checks: thread-safe), unless this engine's processor made it already
            raw = not isinstance(spec.prompt_token_ids, ProcessedPrompt)
            processed = self.engine.input_processor.checked(spec.prompt_token_ids, spec.params if raw else None,
                                                            where)
            rid = f"req-{next(_REQUEST_IDS)}" if spec.request_id is None else str(spec.request_id)
            checked.append((rid, processed, spec))
        if not checked:
            raise ValueError("submit_many needs at least one request")
        stream = RequestStream([rid for rid, _, _ in checked], self)
        with self._lock:
            self._in_flight += len(checked)
        for rid, ids, spec in checked:
            self._commands.put(("add", rid, ids, spec.prompt, spec.priority, stream))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not yet finished (running, waiting, or about to be queued)."""
        return self._in_flight

    def _ended(self, n: int = 1) -> None:  # engine thread: n requests' last word was delivered
        with self._lock:
            self._in_flight -= n

    def stats(self) -> dict[str, float]:
        """Engine stats as of the end of the engine thread's last step (a consistent snapshot: the
        scheduler and page pool are never read while a step changes them)."""
        return dict(self._stats, num_in_flight=self._in_flight)

    def _publish_stats(self) -> None:  # engine thread (and __init__, before it starts)
        self._stats = self.engine.stats()

    def stop_accepting(self) -> None:
        """New submissions raise EngineDeadError; requests in flight go on."""
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stop.is_set() and self.is_running

    def shutdown(self, *, drain_timeout: float = 0.0) -> int:
        """Stops taking requests; waits up to `drain_timeout` s for in-flight ones, then aborts the
        rest (their streams raise EngineDeadError). Returns how many were aborted."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._in_flight > 0 and time.monotonic() < deadline and self.is_running:
            time.sleep(0.01)
        left = len(self._streams) + self._commands.qsize()
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        return left

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # ---- engine thread ------------------------------------------------------------------------

    def _apply_commands(self) -> bool:
        """Adds and aborts what callers queued; whether there was anything."""
        applied = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            if cmd[0] == "add":
                _, rid, processed, prompt, priority, stream = cmd
                try:
                    self.engine.add_request(rid, processed, prompt_text=prompt, priority=priority)
                except Exception as e:  # a duplicate id or a bad request: only this caller hears of it
                    stream._put(e)
                    self._ended()
                    continue
                self._streams[rid] = stream
            elif cmd[0] == "abort":
                rid = cmd[1]
                final = self.engine.abort(rid)
                stream = self._streams.pop(rid, None)
                if final is not None and stream is not None:
                    self._publish_stats()
                    stream._put(final)  # finished, finish_reason "abort"
                    self._ended()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._apply_commands():
                self._publish_stats()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
                self._publish_stats()  # before any caller hears of this step's results
            except Exception as e:  # fail what was in flight, keep serving
                logger.exception("engine step failed; failing %d in-flight requests", len(self._streams))
                for rid, stream in list(self._streams.items()):
                    self.engine.abort(rid)
                    stream._put(e)
                    self._ended()
                self._streams.clear()
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream._put(out)
                    if out.finished:
                        del self._streams[out.request_id]
                        self._ended()
        # Shutting down: whatever is still in flight (or still queued to be added) is aborted and told so.
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                cmd[-1]._put(EngineDeadError(f"the engine shut down before request {cmd[1]} started"))
                self._ended()
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream._put(EngineDeadError(f"the engine shut down before request {rid} finished"))
            self._ended()
        self._streams.clear()
