"""OpenAI-compatible HTTP server: a Flask app over the engine, served by waitress.

    python server.py --model smollm2-135m --host 127.0.0.1 --port 8000      (or: jaxinfer serve ...)

    POST /v1/completions, /v1/chat/completions   generate (JSON, or server-sent events with stream: true)
    GET  /v1/models                              the served model
    GET  /health                                 200 serving ("compiling": warm-up still running in the
                                                 background); 503 draining or engine stopped
    GET  /metrics                                Prometheus text
    GET  /openapi.json                           this API's OpenAPI 3.1 description
    GET  /                                       a chat page that streams from /v1/chat/completions

The app is a thin adapter: `jaxinfer.openai_serving` validates requests and builds responses,
`jaxinfer.async_engine` runs the engine on its own thread, and each HTTP request's thread waits on
its own output queue. The model is loaded and every step shape compiled before the port opens.

Statuses: 400 bad request (OpenAI error body naming the field), 401 missing or wrong API key,
404 unknown route or model, 405 wrong method, 413 body over --max-request-bytes, 415 not JSON,
429 too many requests waiting (Retry-After), 503 shutting down, 500 only for engine failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import hmac
import importlib.resources
import logging
import os
import signal
import sys
import threading
import time

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from jaxinfer.async_engine import AsyncEngine
from jaxinfer.engine import LLMEngine
from jaxinfer.metrics import ServerMetrics, count_compilations
from jaxinfer.openai_serving import ApiError, OpenAIServing, parse_request
from jaxinfer.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

logger = logging.getLogger("jaxinfer.server")

API_KEY_ENV = "JAXINFER_API_KEY"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How the HTTP layer admits requests.

    Attributes:
      served_model_name: the model id clients see and may send as `model`.
      api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>`.
      max_waiting_requests: requests allowed to queue beyond the engine's running batch; past
        that, 429 with Retry-After.
      max_request_bytes: largest request body (413 beyond).
      drain_timeout: seconds SIGTERM waits for in-flight requests before aborting them.
      retry_after: seconds suggested to a client refused with 429.
      poll_interval: seconds between client-disconnect checks while a request produces nothing.
    """

    served_model_name: str
    api_key: str | None = None
    max_waiting_requests: int = 256
    max_request_bytes: int = 4 << 20
    drain_timeout: float = 30.0
    retry_after: int = 1
    poll_interval: float = 0.25

    def __post_init__(self):
        if not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be at least 1024, got {self.max_request_bytes}")
        if self.drain_timeout < 0 or self.poll_interval <= 0 or self.retry_after < 0:
            raise ValueError("drain_timeout and retry_after must be >= 0 and poll_interval > 0")


class ServerState:
    """What the routes share: the engine thread, the OpenAI adapter, metrics and the drain flag."""

    def __init__(self, engine: LLMEngine | AsyncEngine, config: ServerConfig):
        self.async_engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
        core = self.async_engine.engine
        self.config = config
        self.metrics = ServerMetrics(self.async_engine.stats, config.served_model_name)
        self.serving = OpenAIServing(self.async_engine, core.tokenizer, config.served_model_name, core.max_model_len,
                                     self.metrics, config.poll_interval)
        ec = core.engine_config
        self.capacity = ec.max_num_seqs * ec.data_parallel_size + config.max_waiting_requests
        self.created = int(time.time())
        self.draining = False
        self.compiling = False  # warm-up still running in the background (requests are served meanwhile)

    def drain(self, timeout: float | None = None) -> int:
        """Stops admitting (503), waits for in-flight requests up to `timeout` s, stops the engine.
        Returns how many requests had to be aborted."""
        self.draining = True
        left = self.async_engine.shutdown(drain_timeout=self.config.drain_timeout if timeout is None else timeout)
        logger.info("drained: %d requests aborted", left)
        return left


def _chat_page() -> bytes:
    return importlib.resources.files("jaxinfer").joinpath("static/chat.html").read_bytes()


def openapi_spec(config: ServerConfig) -> dict:
    """OpenAPI 3.1 description built from the pydantic request and response models."""
    from pydantic.json_schema import models_json_schema

    from jaxinfer import protocol as p

    models = [p.CompletionRequest, p.ChatCompletionRequest, p.CompletionResponse, p.ChatCompletionResponse,
              p.ChatCompletionChunk, p.ModelList, p.ErrorResponse, p.Health]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    error = {"description": "OpenAI-style error", "content": {"application/json": {"schema": ref("ErrorResponse")}}}
    errors = {str(s): error for s in (400, 401, 404, 413, 415, 429, 503)}

    def sse_event(chunk):  # OpenAPI 3.1: a text/event-stream schema describes each event
        return {"type": "object", "required": ["data"], "properties": {
            "event": {"type": "string"}, "id": {"type": "string"},
            "data": {"anyOf": [
                {"const": "[DONE]", "description": "the last event"},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [ref(chunk), ref("ErrorResponse")]},
                 "description": "a chunk, or an error body if the engine stopped mid-stream"}]}}}

    def generate(req, resp, chunk):
        return {"post": {
            "requestBody": {"required": True, "content": {"application/json": {"schema": ref(req)}}},
            "responses": {"200": {"description": "the completion (JSON), or server-sent events with stream: true",
                                  "content": {"application/json": {"schema": ref(resp)},
                                              "text/event-stream": {"schema": sse_event(chunk)}}}, **errors},
            **({"security": [{"bearer": []}]} if config.api_key else {})}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxinfer OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/completions": generate("CompletionRequest", "CompletionResponse", "CompletionResponse"),
            "/v1/chat/completions": generate("ChatCompletionRequest", "ChatCompletionResponse",
                                             "ChatCompletionChunk"),
            "/v1/models": {"get": {"responses": {
                "200": {"description": "served models", "content": {"application/json": {"schema": ref("ModelList")}}},
                "401": error}, **({"security": [{"bearer": []}]} if config.api_key else {})}},
            "/health": {"get": {"responses": {
                "200": {"description": "serving", "content": {"application/json": {"schema": ref("Health")}}},
                "503": {"description": "draining or stopped",
                        "content": {"application/json": {"schema": ref("Health")}}}}}},
            "/metrics": {"get": {"responses": {"200": {"description": "Prometheus text format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": top.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def create_app(engine: LLMEngine | AsyncEngine, config: ServerConfig) -> Flask:
    """The Flask app serving `engine` (an LLMEngine gets its own engine thread).

    `app.extensions["jaxinfer"]` is the ServerState; call its `drain()` to stop the engine."""
    app = Flask("jaxinfer", static_folder=None)  # no route serves files from disk
    app.config["MAX_CONTENT_LENGTH"] = config.max_request_bytes
    app.json.sort_keys = False
    state = ServerState(engine, config)
    app.extensions["jaxinfer"] = state
    api_key = config.api_key.encode() if config.api_key else None
    spec = openapi_spec(config)

    def error_response(e: ApiError) -> Response:
        resp = jsonify(e.body())
        resp.status_code = e.status
        for k, v in e.headers.items():
            resp.headers[k] = v
        return resp

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return error_response(e)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        messages = {404: f"no route {request.method} {request.path}; see GET /openapi.json",
                    405: f"{request.method} is not allowed on {request.path}",
                    413: f"the request body is over {config.max_request_bytes} bytes; send less (the server's "
                         "--max-request-bytes)"}
        err = ApiError(e.code or 500, messages.get(e.code, e.description or e.name),
                       code="not_found" if e.code == 404 else None)
        resp = error_response(err)
        allow = e.get_headers() and dict(e.get_headers()).get("Allow")
        if allow:
            resp.headers["Allow"] = allow
        return resp

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    @app.before_request
    def _authenticate():
        if api_key is None or not request.path.startswith("/v1/"):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.after_request
    def _count(resp: Response):
        rule = request.url_rule.rule if request.url_rule is not None else "other"
        state.metrics.observe_http(rule, resp.status_code)
        return resp

    def disconnected_probe():
        probe = request.environ.get("waitress.client_disconnected")
        return probe if callable(probe) else (lambda: False)

    def generate(model_cls, prepare):
        if state.draining or not state.async_engine.accepting:
            raise ApiError(503, "the server is shutting down; retry on another replica", type="service_unavailable")
        mimetype = request.mimetype
        if mimetype != "application/json":
            raise ApiError(415, f"the body must be application/json, got {mimetype or 'no Content-Type'}")
        if state.async_engine.num_in_flight >= state.capacity:
            raise ApiError(429, f"{state.async_engine.num_in_flight} requests are already in flight; retry later",
                           type="rate_limit_error", headers={"Retry-After": str(config.retry_after)})
        prepared = prepare(parse_request(request.get_data(cache=False), model_cls))
        stream = state.serving.submit(prepared)
        probe = disconnected_probe()
        if not prepared.request.stream:
            body = state.serving.respond(prepared, stream, probe)
            return ("", 499) if body is None else jsonify(body)
        events = state.serving.events(prepared, stream, probe)
        return Response(events, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    def completions():
        return generate(CompletionRequest, state.serving.prepare_completion)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return generate(ChatCompletionRequest, state.serving.prepare_chat)

    @app.get("/v1/models")
    def models():
        card = ModelCard(id=config.served_model_name, created=state.created,
                         max_model_len=state.serving.max_model_len)
        return jsonify(ModelList(data=[card]).model_dump())

    @app.get("/health")
    def health():
        if not state.async_engine.is_running:
            return jsonify(status="dead"), 503
        if state.draining:
            return jsonify(status="draining"), 503
        return jsonify(status="ok", compiling=state.compiling)

    @app.get("/metrics")
    def metrics():
        return Response(state.metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    def openapi():
        return jsonify(spec)

    @app.get("/")
    def chat_page():
        return Response(_chat_page(), mimetype="text/html")

    return app


class RunningServer:
    """A waitress server running on a background thread."""

    def __init__(self, app: Flask, host: str, port: int, threads: int, max_request_bytes: int):
        from waitress import create_server

        self.app = app
        # Waitress's own body limit sits above Flask's, so oversized bodies get the JSON 413.
        self._server = create_server(app, host=host, port=port, threads=threads, ident="jaxinfer",
                                     channel_request_lookahead=4, max_request_body_size=2 * max_request_bytes + 65536,
                                     connection_limit=max(100, 2 * threads))
        self.host, self.port = host, self._server.effective_port
        self._thread = threading.Thread(target=self._server.run, name="jaxinfer-http", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Stops listening and drops every connection (drain the engine first)."""
        from waitress import wasyncore

        done = threading.Event()

        def close_all():
            wasyncore.close_all(self._server._map)
            done.set()

        self._server.trigger.pull_trigger(close_all)  # runs on the server's own loop thread
        done.wait(5)
        self._thread.join(5)
        self._server.task_dispatcher.shutdown(timeout=5)


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000, *, threads: int = 64) -> RunningServer:
    """Starts `app` on a background waitress server; returns it (see RunningServer.url / close)."""
    state: ServerState = app.extensions["jaxinfer"]
    return RunningServer(app, host, port, threads, state.config.max_request_bytes)


# ---- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from jaxinfer.registry import DEFAULT_MODEL, REGISTRY

    p = argparse.ArgumentParser(prog="jaxinfer serve", description="OpenAI-compatible HTTP server")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"registered name ({', '.join(REGISTRY)}), .gguf file or orbax checkpoint directory")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory to use instead of the model's")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--api-key", default=None, help=f"require this bearer key on /v1 routes (or ${API_KEY_ENV})")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens")
    p.add_argument("--max-num-seqs", type=int, default=16, help="most requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="most tokens computed per step")
    p.add_argument("--max-waiting-requests", type=int, default=256,
                   help="requests queued beyond the running batch before 429")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="largest request body (413 beyond)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for in-flight requests")
    p.add_argument("--threads", type=int, default=128, help="HTTP worker threads (one per open request)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse prompt pages across requests")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel-size", type=int, default=1)
    p.add_argument("--attention-backend", default="auto", help="auto, reference, pallas, pallas_tpu or pallas_gpu")
    p.add_argument("--multihost", action="store_true",
                   help="join a multi-host run (Cloud TPU pod slices are detected; elsewhere give the next flags)")
    p.add_argument("--coordinator-address", default=None, help="multi-host: process 0's host:port")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _status(message: str) -> None:
    print(f"[jaxinfer] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    from jaxinfer.errors import JaxinferError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        if args.threads < 1 or not 0 <= args.port < 65536:
            raise ValueError("--threads must be >= 1 and --port in [0, 65535]")
        config = ServerConfig(served_model_name=args.served_model_name or os.path.basename(str(args.model)),
                              api_key=api_key, max_waiting_requests=args.max_waiting_requests,
                              max_request_bytes=args.max_request_bytes, drain_timeout=args.drain_timeout)
    except ValueError as e:
        print(f"jaxinfer serve: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, config)
    except JaxinferError as e:
        print(f"jaxinfer serve: error: {e}", file=sys.stderr)
        return 2


def _run(args, config: ServerConfig) -> int:
    import jax

    from jaxinfer.llm import LLM
    from sharding import multihost

    if args.multihost or args.coordinator_address or args.num_processes or "JAXINFER_COORDINATOR" in os.environ:
        multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
    _status(f"loading {args.model} ...")
    t0 = time.perf_counter()
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, progress=False,
              warmup=False, enable_prefix_caching=not args.no_prefix_caching,
              tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
              sequence_parallel_size=args.sequence_parallel_size, attention_backend=args.attention_backend)
    if not multihost.is_primary():  # the other hosts run process 0's steps
        llm.warmup()
        steps = multihost.worker_loop(llm.engine.runner)
        _status(f"worker {jax.process_index()} ran {steps} steps; exiting")
        return 0
    multihost.attach(llm.engine.runner)
    t1 = time.perf_counter()
    count_compilations()  # from here on: /metrics' xla_compilations stays flat once ready
    # One device: serve at once and compile in the background, the likeliest shapes first; a request
    # whose shape is not compiled yet compiles it on the engine thread (decision 53). A mesh warms up
    # by running steps on the cache, which must not overlap serving: compile first, then serve.
    background = llm.engine.mesh is None
    if not background:
        _status(f"loaded in {t1 - t0:.1f}s; compiling every step shape ...")
        llm.warmup(progress=True, threads=os.cpu_count() or 1)
        _status(f"compiled {llm.engine.counters['warmup_graphs']} graphs in {time.perf_counter() - t1:.1f}s; ready")
    app = create_app(llm.engine, config)
    state: ServerState = app.extensions["jaxinfer"]
    server = serve(app, args.host, args.port, threads=args.threads)
    _status(f"serving {config.served_model_name} at {server.url}" + (" (API key required)" if config.api_key else "")
            + (f" {time.perf_counter() - t1:.1f}s after loading; compiling every step shape in the background"
               if background else ""))
    if background:
        state.compiling = True

        def warm_up():
            llm.warmup(progress=True, threads=os.cpu_count() or 1)
            state.compiling = False
            _status(f"compiled {llm.engine.counters['warmup_graphs']} graphs in {time.perf_counter() - t1:.1f}s; "
                    "ready: nothing compiles from here on")

        threading.Thread(target=warm_up, name="jaxinfer-warmup", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not state.async_engine.is_running:
            _status("the engine thread stopped; exiting")
            break
    _status(f"shutting down: draining in-flight requests (up to {config.drain_timeout:.0f}s) ...")
    aborted = state.drain()
    time.sleep(0.2)  # let the last responses flush
    server.close()
    multihost.stop_workers()
    _status(f"stopped ({aborted} requests aborted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
