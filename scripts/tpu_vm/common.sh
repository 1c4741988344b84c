# Shared by the Cloud TPU VM scripts: flag parsing, validation and the gcloud runner.
# Sourced, not run. Every script accepts the same flags (named as gcloud names them):
#
#   --name NAME                TPU VM name (default: jaxinfer)
#   --zone ZONE                e.g. us-west4-a (default: $CLOUDSDK_COMPUTE_ZONE; required otherwise)
#   --accelerator-type TYPE    v2-8, v3-8, v4-8, v5litepod-8 (alias v5e-8), v5p-8, v6e-8, ... (default v5litepod-8)
#   --version RUNTIME          TPU software version (default: the one Google documents for the generation)
#   --project PROJECT          GCP project (default: gcloud's configured one)
#   --model MODEL              model to serve or benchmark (default: smollm2-135m)
#   --port PORT                server port (default: 8000)
#   --tensor-parallel-size TP  devices each model replica is split over (default 1); the server runs
#                              devices / TP data-parallel replicas over the whole slice
#   --dry-run                  print the gcloud commands instead of running them
#
# Errors exit with status 2 and one line saying what to change.

set -euo pipefail

NAME="jaxinfer"
ZONE="${CLOUDSDK_COMPUTE_ZONE:-}"
ACCELERATOR_TYPE="v5litepod-8"
VERSION=""
PROJECT=""
MODEL="smollm2-135m"
PORT="8000"
TP="1"
DRY_RUN=0
EXTRA_ARGS=()
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REMOTE_DIR="jaxinfer"  # relative to the remote user's home

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

parse_flags() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name=*|--zone=*|--accelerator-type=*|--version=*|--project=*|--model=*|--port=*|--tensor-parallel-size=*)
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
        continue ;;
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift 2 ;;
      --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --model) MODEL="${2:?--model needs a value}"; shift 2 ;;
      --port) PORT="${2:?--port needs a value}"; shift 2 ;;
      --tensor-parallel-size) TP="${2:?--tensor-parallel-size needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; EXTRA_ARGS+=("$@"); break ;;
      -h|--help) sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) die "unknown flag '$1' (see --help)" ;;
    esac
  done
  validate
}

validate() {
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
    || die "--name '$NAME' is not a valid TPU name: lowercase letters, digits and hyphens, starting with a letter"
  [[ -n "$ZONE" ]] || die "--zone is required (or set CLOUDSDK_COMPUTE_ZONE), e.g. --zone us-west4-a"
  [[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "--zone '$ZONE' does not look like a zone, e.g. us-west4-a"
  [[ "$PORT" =~ ^[0-9]+$ && "$PORT" -ge 1 && "$PORT" -le 65535 ]] || die "--port must be 1-65535, got '$PORT'"
  local given="$ACCELERATOR_TYPE"
  # v5e is called v5litepod in gcloud
  if [[ "$ACCELERATOR_TYPE" =~ ^v5e-([0-9]+)$ ]]; then
    ACCELERATOR_TYPE="v5litepod-${BASH_REMATCH[1]}"
  fi
  [[ "$ACCELERATOR_TYPE" =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$ ]] \
    || die "--accelerator-type '$given' is not a TPU type; use e.g. v2-8, v3-8, v4-8, v5litepod-8 (v5e-8), v5p-8 or v6e-8"
  GENERATION="${BASH_REMATCH[1]}"
  SIZE="${BASH_REMATCH[2]}"
  local sizes
  case "$GENERATION" in
    v2) sizes="8 32 128 256 512" ;;
    v3) sizes="8 32 64 128 256 512 1024 2048" ;;
    v4|v5p) sizes="8 16 32 64 128 256 512 1024 2048 4096" ;;
    v5litepod|v6e) sizes="1 4 8 16 32 64 128 256" ;;
  esac
  [[ " $sizes " == *" $SIZE "* ]] \
    || die "--accelerator-type '$given': $GENERATION slices come in sizes $sizes"
  # Hosts (workers) in the slice: v2/v3/v4/v5p count TensorCores, 8 per host; v5e/v6e count chips,
  # up to 8 on one host, 4 per host in multi-host slices.
  case "$GENERATION" in
    v2|v3|v4|v5p) NUM_WORKERS=$(( SIZE > 8 ? SIZE / 8 : 1 )) ;;
    *) NUM_WORKERS=$(( SIZE > 8 ? SIZE / 4 : 1 )) ;;
  esac
  if [[ -z "$VERSION" ]]; then
    case "$GENERATION" in
      v2|v3|v4) VERSION="tpu-ubuntu2204-base" ;;
      v5litepod) VERSION="v2-alpha-tpuv5-lite" ;;
      v5p) VERSION="v2-alpha-tpuv5" ;;
      v6e) VERSION="v2-alpha-tpuv6e" ;;
    esac
  fi
  MULTIHOST=$(( NUM_WORKERS > 1 ? 1 : 0 ))
  # JAX devices: one per TensorCore on v2/v3, one per chip (2 TensorCores) on v4/v5p, one per chip on v5e/v6e.
  case "$GENERATION" in
    v4|v5p) NUM_DEVICES=$(( SIZE / 2 )) ;;
    *) NUM_DEVICES=$SIZE ;;
  esac
  [[ "$TP" =~ ^[1-9][0-9]*$ ]] && (( NUM_DEVICES % TP == 0 )) \
    || die "--tensor-parallel-size must divide the slice's $NUM_DEVICES devices, got '$TP'"
  DP=$(( NUM_DEVICES / TP ))
}

# gcloud compute tpus tpu-vm <args> --zone ... [--project ...]
tpu_vm() {
  local cmd=(gcloud compute tpus tpu-vm "$@" "--zone=$ZONE")
  [[ -n "$PROJECT" ]] && cmd+=("--project=$PROJECT")
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
  else
    "${cmd[@]}"
  fi
}

# Runs a shell command on the given workers ("0" or "all") over gcloud's ssh.
on_workers() {
  local workers="$1" command="$2"
  tpu_vm ssh "$NAME" "--worker=$workers" "--command=$command"
}
