"""The Flask app of the OpenAI-compatible server: routes, authentication, admission, error bodies.

    create_app(engine, ServerConfig) -> Flask      app.extensions["jaxinfer"] is the ServerState
    ServerState                                    the engine thread (AsyncEngine), OpenAIServing,
                                                   metrics, the drain and compiling flags

`server.py` runs it on waitress from the command line; `jaxinfer.openai_serving` turns requests into
engine work and outputs into responses; `jaxinfer.openapi` describes the API.
"""

from __future__ import annotations

import dataclasses
import hmac
import importlib.resources
import logging
import time

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from jaxinfer.async_engine import AsyncEngine
from jaxinfer.engine import LLMEngine
from jaxinfer.metrics import ServerMetrics
from jaxinfer.openai_serving import ApiError, OpenAIServing, parse_request
from jaxinfer.openapi import openapi_spec
from jaxinfer.protocol import ChatCompletionRequest, CompletionRequest
from jaxinfer.protocol_responses import ModelCard, ModelList

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
      reasoning_parser: split chat outputs into reasoning_content and content at this model family's
        thinking markers (`jaxinfer.reasoning.REASONING_PARSERS`); a request may name its own.
      thinking_token_budget: the default budget of requests that give none (needs a parser).
    """

    served_model_name: str
    api_key: str | None = None
    max_waiting_requests: int = 256
    max_request_bytes: int = 4 << 20
    drain_timeout: float = 30.0
    retry_after: int = 1
    poll_interval: float = 0.25
    reasoning_parser: str | None = None
    thinking_token_budget: int | None = None

    def __post_init__(self):
        from jaxinfer.reasoning import REASONING_PARSERS

        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}; choose one of "
                             f"{sorted(REASONING_PARSERS)}")
        if self.thinking_token_budget is not None and (self.thinking_token_budget < 0 or self.reasoning_parser is None):
            raise ValueError("thinking_token_budget must be >= 0 and needs a reasoning_parser")
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
                                     self.metrics, config.poll_interval, reasoning_parser=config.reasoning_parser,
                                     thinking_token_budget=config.thinking_token_budget)
        ec = core.engine_config
        self.capacity = ec.max_num_seqs * ec.data_parallel_size + config.max_waiting_requests
        self.created = int(time.time())
        self.quantization = core.config.quantization.method if core.config.quantization is not None else None
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
                         max_model_len=state.serving.max_model_len, quantization=state.quantization)
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
