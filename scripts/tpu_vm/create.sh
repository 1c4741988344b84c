#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host or a multi-host pod slice) for jaxinfer.
#
#   scripts/tpu_vm/create.sh --zone us-west4-a --accelerator-type v5litepod-8 [--name jaxinfer]
#                            [--version RUNTIME] [--project P] [--dry-run] [-- extra gcloud flags, e.g. --spot]
#
# Flags: see scripts/tpu_vm/common.sh. Then: setup.sh, serve.sh, bench.sh, teardown.sh.
source "$(dirname "$0")/common.sh"
parse_flags "$@"
echo "# $ACCELERATOR_TYPE: $NUM_WORKERS worker(s), runtime $VERSION" >&2
tpu_vm create "$NAME" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$VERSION" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
