#!/usr/bin/env bash
# Benchmarks on the TPU VM: the attention kernels against the roofline, then the serving benchmark
# against the running server (serve.sh) on worker 0; results under ~/jaxinfer/bench-results there.
#
#   scripts/tpu_vm/bench.sh --zone us-west4-a --accelerator-type v5litepod-8 [--model M] [--port 8000] [--dry-run]
#   fetch: gcloud compute tpus tpu-vm scp --recurse NAME:jaxinfer/bench-results . --worker=0 --zone ZONE
source "$(dirname "$0")/common.sh"
parse_flags "$@"
on_workers 0 "set -e; cd ~/$REMOTE_DIR; mkdir -p bench-results; \
.venv/bin/python benchmarks/bench_attention.py | tee bench-results/attention.txt; \
.venv/bin/python benchmarks/serving.py --base-url http://127.0.0.1:$PORT --model $MODEL --num-prompts 200 \
--random-input-len 512 --random-output-len 128 --request-rate inf --save-result --result-dir bench-results"
