"""The engine on a background thread, with one output stream per request.

    caller threads                      engine thread
    submit(ids, params) -> stream  -->  command queue --> engine.add_request
    abort(id)                      -->  command queue --> engine.abort
    for out in stream: ...         <--  engine.step() outputs, routed by request id

Only the engine thread touches the engine, so the engine needs no locks. A step that raises fails
the requests it was serving (their streams raise the error) and the loop goes on with an empty
engine: one bad step never takes the server down or leaves pages held.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Iterator, Sequence

from jaxinfer.engine import LLMEngine
from jaxinfer.errors import JaxinferError
from jaxinfer.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(JaxinferError, RuntimeError):
    """The engine stopped (shut down, or failed) before the request finished."""


class RequestStream:
    """The outputs of one request as they come: each a cumulative RequestOutput; the last has
    `finished` set. Iterate it, or call `result()` for the final output."""

    def __init__(self, request_id: str, owner: "AsyncEngine"):
        self.request_id = request_id
        self._owner = owner
        self._queue: queue.Queue = queue.Queue()
        self._final: RequestOutput | None = None
        self._error: BaseException | None = None
        self._done = False

    def _put(self, item) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[RequestOutput]:
        while not self._done:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done, self._error = True, item
                raise item
            if item.finished:
                self._done, self._final = True, item
            yield item

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Blocks until the request finishes; returns its final output."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s") from None
            if isinstance(item, BaseException):
                self._done, self._error = True, item
            elif item.finished:
                self._done, self._final = True, item
        if self._error is not None:
            raise self._error
        return self._final

    def cancel(self) -> None:
        """Aborts the request (e.g. the client went away); its pages are freed."""
        self._owner.abort(self.request_id)


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
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    # ---- caller side --------------------------------------------------------------------------

    def submit(self, prompt_token_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None,
               prompt: str | None = None, priority: int = 0) -> RequestStream:
        """Queues a request; returns its stream. Bad input raises here, in the caller's thread."""
        if not self._accepting or self._stop.is_set():
            raise EngineDeadError("the engine is shutting down and takes no new requests")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = self.engine.validate_prompt(prompt_token_ids)  # pure checks: safe off the engine thread
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        stream = RequestStream(request_id, self)
        self._commands.put(("add", request_id, ids, params, prompt, priority, stream))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, float]:
        """Engine stats (read without locking: counts may be one step stale)."""
        return dict(self.engine.stats(), num_streams=len(self._streams))

    def shutdown(self, *, drain_timeout: float = 0.0) -> None:
        """Stops taking requests; waits up to `drain_timeout` s for in-flight ones, aborts the rest."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while self._streams and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive()

    # ---- engine thread ------------------------------------------------------------------------

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, prompt, priority, stream = cmd
                try:
                    self.engine.add_request(rid, ids, params, prompt=prompt, priority=priority)
                except Exception as e:  # a duplicate id or a bad request: only this caller hears of it
                    stream._put(e)
                    continue
                self._streams[rid] = stream
            elif cmd[0] == "abort":
                rid = cmd[1]
                final = self.engine.abort(rid)
                stream = self._streams.pop(rid, None)
                if final is not None and stream is not None:
                    stream._put(final)  # finished, finish_reason "abort"

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # fail what was in flight, keep serving
                logger.exception("engine step failed; failing %d in-flight requests", len(self._streams))
                for rid, stream in list(self._streams.items()):
                    self.engine.abort(rid)
                    stream._put(e)
                self._streams.clear()
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream._put(out)
                    if out.finished:
                        del self._streams[out.request_id]
        # Shutting down: whatever is still in flight is aborted and told so.
        self._apply_commands()
        for rid, stream in list(self._streams.items()):
            self.engine.abort(rid)
            stream._put(EngineDeadError(f"the engine shut down before request {rid} finished"))
        self._streams.clear()
