"""Two local processes joined by jax.distributed (CPU collectives over gloo), the model tensor
parallel across them, generate the tokens one process generates alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.testing.engine import random_prompts
from tests.server_utils import free_port

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT_LENGTHS = [1, 3, 5, 12, 21]
WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def prompts_for(config):
    return random_prompts(config, PROMPT_LENGTHS, seed=11)


def test_two_processes_generate_what_one_process_generates(tmp_path):
    from jaxinfer.loader import load_model
    from jaxinfer.testing import tiny_gguf
    from jaxinfer.testing.engine import make_engine, run

    gguf = str(tmp_path / "tiny.gguf")
    tiny_gguf(gguf)
    model = load_model(gguf, progress=False)
    outs = run(make_engine(model), {str(i): (p, PARAMS) for i, p in enumerate(prompts_for(model.config))})
    want = [outs[str(i)].outputs[0].token_ids for i in range(len(PROMPT_LENGTHS))]

    coordinator = f"127.0.0.1:{free_port()}"
    out_json = str(tmp_path / "tokens.json")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, WORKER, coordinator, str(i), gguf, out_json], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    with open(out_json) as f:
        got = json.load(f)
    assert got["processes"] == 2 and got["devices"] == 2
    assert got["tokens"] == want


def test_multihost_server_serves_from_process_0(tmp_path):
    """`server.py --multihost` as docs/TPU.md runs it on every worker of a pod slice, here two local
    processes of one CPU device each, the model tensor parallel over both: process 0 serves HTTP and
    answers with the tokens one process alone generates; process 1 runs process 0's steps; SIGTERM
    to process 0 drains it and releases process 1."""
    import signal
    import time

    from jaxinfer.loader import load_model
    from jaxinfer.testing import tiny_gguf
    from jaxinfer.testing.engine import make_engine, run
    from tests.server_utils import post_json

    gguf = str(tmp_path / "tiny.gguf")
    tiny_gguf(gguf)
    model = load_model(gguf, progress=False)
    (prompt,) = prompts_for(model.config)[2:3]
    want = run(make_engine(model), {"a": (prompt, PARAMS)})["a"].outputs[0].token_ids

    port, coordinator = free_port(), f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAXINFER_API_KEY")}
    # (the session's compilation cache: process 0 reads it and writes what it compiles; JAX has
    # process 1 compile its own)
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "server.py", "--multihost", "--coordinator-address", coordinator,
                               "--num-processes", "2", "--process-id", str(i), "--model", gguf, "--port", str(port),
                               "--tensor-parallel-size", "2", "--max-num-seqs", "2", "--max-num-batched-tokens", "16",
                               "--max-model-len", "64", "--served-model-name", "tiny"],
                              cwd=root, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]

    def text(i):
        logs[i].seek(0)
        return logs[i].read()

    try:
        deadline = time.time() + 300
        while "serving tiny at" not in text(0):
            assert all(p.poll() is None for p in procs) and time.time() < deadline, text(0)[-2000:] + text(1)[-2000:]
            time.sleep(0.5)
        status, _, body = post_json(f"http://127.0.0.1:{port}", "/v1/completions",
                                    {"model": "tiny", "prompt": prompt, "max_tokens": PARAMS.max_tokens,
                                     "temperature": 0, "ignore_eos": True})
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == len(want)
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(120) for p in procs] == [0, 0], text(0)[-2000:] + text(1)[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "stopped (0 requests aborted)" in text(0)
    assert re.search(r"worker 1 ran \d+ steps; exiting", text(1)), text(1)[-2000:]
    # The served tokens: the prompt-logprob-free way to read them back is the engine's own detokenizer.
    assert body["choices"][0]["text"] == model.tokenizer.decode(want)


def test_importing_the_runtime_does_not_start_the_jax_backend():
    """jax.distributed.initialize must come before the backend starts: importing the server, the
    API and the loaders may not start it (a default argument once did)."""
    code = ("import jax._src.xla_bridge as xb, server, jaxinfer.cli, jaxinfer.async_engine, checkpoints.hf, "
            "checkpoints.gguf, sharding.multihost\nfrom jaxinfer import LLM, SamplingParams\n"
            "assert not xb._backends, 'the JAX backend started on import'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
