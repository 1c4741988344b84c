"""One process of the two-process test (tests/test_multihost.py): the tiny model, tensor parallel
over the devices of both processes; process 0 schedules and writes the tokens as JSON.

    python tests/multihost_worker.py COORDINATOR PROCESS_ID GGUF_PATH OUT_JSON
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"  # one CPU device per process
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(coordinator, process_id, gguf, out_json):
    from sharding import multihost

    multihost.initialize(coordinator, num_processes=2, process_id=int(process_id))
    import jax

    from jaxinfer.engine import EngineConfig, LLMEngine
    from jaxinfer.loader import load_model
    from tests.test_multihost import PARAMS, PROMPT_LENGTHS, prompts_for

    model = load_model(gguf, progress=False)
    engine = LLMEngine(model.config, model.graphdef, model.params, model.tokenizer,
                       EngineConfig.of(max_num_seqs=8, max_num_batched_tokens=16, page_size=4, num_pages=64,
                                    compilation_cache_dir="", tensor_parallel_size=jax.device_count()))
    if not multihost.is_primary():
        multihost.worker_loop(engine.runner)
        return
    multihost.attach(engine.runner)
    for i, p in enumerate(prompts_for(model.config)):
        engine.add_request(str(i), p, PARAMS)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    multihost.stop_workers()
    with open(out_json, "w") as f:
        json.dump({"tokens": [done[str(i)] for i in range(len(PROMPT_LENGTHS))],
                   "devices": jax.device_count(), "processes": jax.process_count()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
