"""Two local processes joined by jax.distributed (CPU collectives over gloo), the model tensor
parallel across them, generate the tokens one process generates alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from jaxinfer.sampling_params import SamplingParams
from tests.test_engine import random_prompts

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT_LENGTHS = [1, 3, 5, 12, 21]
WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def prompts_for(config):
    return random_prompts(config, PROMPT_LENGTHS, seed=11)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_what_one_process_generates(tmp_path):
    from jaxinfer.loader import load_model
    from jaxinfer.testing import tiny_gguf
    from tests.test_engine import make_engine, run

    gguf = str(tmp_path / "tiny.gguf")
    tiny_gguf(gguf)
    model = load_model(gguf, progress=False)
    outs = run(make_engine(model), {str(i): (p, PARAMS) for i, p in enumerate(prompts_for(model.config))})
    want = [outs[str(i)].outputs[0].token_ids for i in range(len(PROMPT_LENGTHS))]

    coordinator = f"127.0.0.1:{_free_port()}"
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
