"""Multi-host runs: every process runs the same jit steps on the same inputs; process 0 decides.

    process 0                                   processes 1..n-1
    scheduler -> StepPlan -> broadcast --------> receive StepPlan
    run_plan (forward, sample: collectives) <--> run_plan (the same graphs, their shards)
    detokenize, stream, serve HTTP              (nothing else)

`jax.distributed.initialize` is called from arguments, else from JAXINFER_COORDINATOR /
JAXINFER_NUM_PROCESSES / JAXINFER_PROCESS_ID, else with no arguments (auto-detected on Cloud TPU
VMs and other managed clusters). The plan travels as pickled bytes through
`multihost_utils.broadcast_one_to_all` (a collective over the same devices the model uses), so
no second network channel is needed. Only process 0 may call `LLMEngine.step`; the others call
`worker_loop` until process 0 calls `stop_workers`.
"""

from __future__ import annotations

import logging
import os
import pickle

import jax
import numpy as np

logger = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins (or forms) the multi-process JAX runtime; a no-op for a single process."""
    coordinator_address = coordinator_address or os.environ.get("JAXINFER_COORDINATOR")
    if num_processes is None and "JAXINFER_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXINFER_NUM_PROCESSES"])
    if process_id is None and "JAXINFER_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXINFER_PROCESS_ID"])
    if num_processes == 1:
        return
    if coordinator_address is None and num_processes is None:
        jax.distributed.initialize()  # Cloud TPU VM / cluster auto-detection
    else:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError("a multi-host run needs the coordinator address, the number of processes and this "
                             "process's id (flags or JAXINFER_COORDINATOR / JAXINFER_NUM_PROCESSES / "
                             "JAXINFER_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    logger.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    return jax.process_index() == 0


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Process 0's `payload` on every process (others pass None)."""
    from jax.experimental import multihost_utils

    length = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload) if is_primary() else 0)))
    buf = np.frombuffer(payload, np.uint8) if is_primary() else np.zeros(length, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


def attach(runner) -> None:
    """On process 0: send every step's plan to the other processes before running it."""
    if jax.process_count() > 1 and is_primary():
        runner.step_hook = lambda plan: broadcast_bytes(pickle.dumps(plan))


def stop_workers() -> None:
    """On process 0: release the other processes' `worker_loop`s."""
    if jax.process_count() > 1 and is_primary():
        broadcast_bytes(pickle.dumps(None))


def worker_loop(runner) -> int:
    """On processes 1..n-1: run process 0's steps until it stops them; returns the step count."""
    steps = 0
    while True:
        plan = pickle.loads(broadcast_bytes(None))
        if plan is None:
            return steps
        runner.run_plan(plan)
        steps += 1
