#!/usr/bin/env bash
# Runs the server as a systemd unit (`jaxinfer.service`): on worker 0 of a single-host TPU VM; on
# every worker of a pod slice with --multihost (jax.distributed finds the coordinator from the TPU
# metadata; process 0, on worker 0, serves HTTP, the others run its steps). The unit restarts on
# failure, and `systemctl stop` sends SIGTERM, which drains in-flight requests.
#
#   scripts/tpu_vm/serve.sh --zone us-west4-a --accelerator-type v5litepod-16 [--model M] [--port 8000]
#                           [--tensor-parallel-size 4] [--dry-run]
#   then: gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0 -- -L 8000:localhost:8000
#         curl localhost:8000/v1/models
source "$(dirname "$0")/common.sh"
parse_flags "$@"
if [[ "$MULTIHOST" == 1 ]]; then WORKERS=all; MULTI=" --multihost"; else WORKERS=0; MULTI=""; fi
SERVER_ARGS="--model $MODEL --host 0.0.0.0 --port $PORT --tensor-parallel-size $TP --data-parallel-size $DP$MULTI"
on_workers "$WORKERS" "set -e; printf '%s\n' '[Unit]' 'Description=jaxinfer OpenAI-compatible server' \
'After=network-online.target' '[Service]' \"User=\$USER\" \"WorkingDirectory=\$HOME/$REMOTE_DIR\" \
\"Environment=JAXINFER_COMPILATION_CACHE=\$HOME/.cache/jaxinfer/xla\" \
\"ExecStart=\$HOME/$REMOTE_DIR/.venv/bin/python server.py $SERVER_ARGS\" \
'Restart=on-failure' 'KillSignal=SIGTERM' 'TimeoutStopSec=90' '[Install]' 'WantedBy=multi-user.target' \
| sudo tee /etc/systemd/system/jaxinfer.service >/dev/null; \
sudo systemctl daemon-reload; sudo systemctl enable jaxinfer; sudo systemctl restart jaxinfer"
echo "# serving $MODEL on worker 0, port $PORT: $NUM_WORKERS worker(s), $NUM_DEVICES devices = $DP replica(s) x TP $TP; logs: journalctl -u jaxinfer" >&2
