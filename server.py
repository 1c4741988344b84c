"""OpenAI-compatible HTTP server: a Flask app over the engine, served by waitress.

    python server.py --model smollm2-135m --host 127.0.0.1 --port 8000      (or: jaxinfer serve ...)

    POST /v1/completions, /v1/chat/completions   generate (JSON, or server-sent events with stream: true)
    GET  /v1/models                              the served model
    GET  /health                                 200 serving ("compiling": warm-up still running in the
                                                 background); 503 draining or engine stopped
    GET  /metrics                                Prometheus text
    GET  /openapi.json                           this API's OpenAPI 3.1 description
    GET  /                                       a chat page that streams from /v1/chat/completions

This file is the command line and the waitress server; the app is `jaxinfer.http_app` (routes,
auth, admission), a thin adapter: `jaxinfer.openai_serving` validates requests and builds
responses, `jaxinfer.async_engine` runs the engine on its own thread, and each HTTP request's
thread waits on its own output queue. The port opens once the model is loaded; on one device every
step shape compiles in the background meanwhile (with a mesh: before the port opens).

Statuses: 400 bad request (OpenAI error body naming the field), 401 missing or wrong API key,
404 unknown route or model, 405 wrong method, 413 body over --max-request-bytes, 415 not JSON,
429 too many requests waiting (Retry-After), 503 shutting down, 500 only for engine failures.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from flask import Flask

from jaxinfer.http_app import API_KEY_ENV, ServerConfig, ServerState, create_app, logger  # noqa: F401 (the API)
from jaxinfer.metrics import count_compilations
from jaxinfer.openapi import openapi_spec  # noqa: F401 (re-exported)
from jaxinfer.reasoning import REASONING_PARSERS


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
            wasyncore.close_all(self._server._map, ignore_all=True)
            done.set()

        try:
            self._server.trigger.pull_trigger(close_all)  # runs on the server's own loop thread
        except OSError:
            # The loop's wake-up pipe is already closed (seen once in CI: EBADF after a drain); the
            # loop then serves only what is left in its map and ends when the map is empty.
            logger.warning("HTTP server wake-up pipe closed early; closing its connections from this thread")
            close_all()
        done.wait(5)
        self._thread.join(5)
        self._server.task_dispatcher.shutdown(timeout=5)


def serve(app: Flask, host: str = "127.0.0.1", port: int = 8000, *, threads: int = 64) -> RunningServer:
    """Starts `app` on a background waitress server; returns it (see RunningServer.url / close)."""
    state: ServerState = app.extensions["jaxinfer"]
    return RunningServer(app, host, port, threads, state.config.max_request_bytes)


# ---- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from jaxinfer.cli import KV_CACHE_DTYPE_HELP, QUANTIZATION_HELP
    from jaxinfer.speculative import SPECULATIVE_HELP, speculative_flag
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
    p.add_argument("--quantization", default=None, choices=["int8", "int4"], help=QUANTIZATION_HELP)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"], help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--speculative-config", type=speculative_flag, default=None, help=SPECULATIVE_HELP)
    p.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens")
    p.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                   help="split chat outputs into reasoning_content and content at this family's thinking markers")
    p.add_argument("--thinking-token-budget", type=int, default=None,
                   help="default most tokens a chat request may think (needs --reasoning-parser)")
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
                              max_request_bytes=args.max_request_bytes, drain_timeout=args.drain_timeout,
                              reasoning_parser=args.reasoning_parser, thinking_token_budget=args.thinking_token_budget)
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
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype, max_model_len=args.max_model_len,
              speculative_config=args.speculative_config, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, progress=False,
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
    state.compiling = background  # (before the port opens: /health never says "done" too early)
    cancel = threading.Event()  # shutdown skips the graphs not compiled yet
    server = serve(app, args.host, args.port, threads=args.threads)
    _status(f"serving {config.served_model_name} at {server.url}" + (" (API key required)" if config.api_key else "")
            + (f" (loaded in {t1 - t0:.1f}s; compiling every step shape in the background)" if background else ""))
    if background:
        def warm_up():
            try:
                llm.warmup(progress=True, threads=os.cpu_count() or 1, cancel=cancel)
            except Exception:  # requests still compile their own shapes on the engine thread
                logger.exception("background warm-up failed")
                return
            finally:
                state.compiling = False
            if not cancel.is_set():
                _status(f"compiled {llm.engine.counters['warmup_graphs']} graphs in "
                        f"{time.perf_counter() - t1:.1f}s; ready: nothing compiles from here on")

        threading.Thread(target=warm_up, name="jaxinfer-warmup", daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if not state.async_engine.is_running:
            _status("the engine thread stopped; exiting")
            break
    cancel.set()
    _status(f"shutting down: draining in-flight requests (up to {config.drain_timeout:.0f}s) ...")
    aborted = state.drain()
    time.sleep(0.2)  # let the last responses flush
    server.close()
    multihost.stop_workers()
    _status(f"stopped ({aborted} requests aborted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
