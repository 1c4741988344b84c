#!/usr/bin/env bash
# Deletes the TPU VM (all workers; billing stops).
#
#   scripts/tpu_vm/teardown.sh --zone us-west4-a [--name jaxinfer] [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
tpu_vm delete "$NAME" --quiet
