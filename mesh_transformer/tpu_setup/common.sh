#!/usr/bin/env bash
# Shared by the tpu_setup scripts: option parsing, --dry-run, accelerator types, gcloud calls.
# Sourced, not run. Every gcloud command goes through `run`, so --dry-run prints exactly what would run.

set -euo pipefail

NAME=""
ZONE=""
PROJECT=""
DRY_RUN=0
INTERNAL_IP=0
REST=()

die() {
  echo "error: $*" >&2
  exit 2
}

# Print a command (shell-quoted, one line, prefixed by "+"), then run it unless --dry-run. A dry run
# prints to stdout (that is its output); a real run traces to stderr, keeping stdout for results.
run() {
  local quoted
  printf -v quoted ' %q' "$@"
  if [[ $DRY_RUN == 1 ]]; then
    echo "+${quoted}"
  else
    echo "+${quoted}" >&2
    "$@"
  fi
}

# The options every script takes; whatever else is left in REST for the script to parse.
parse_common() {
  while (($#)); do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --internal-ip) INTERNAL_IP=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ -n $NAME ]] || die "--name NAME is required"
  [[ -n $ZONE ]] || die "--zone ZONE is required"
}

# gcloud compute tpus ..., with the project when one was given.
gcloud_tpus() {
  local project=()
  if [[ -n $PROJECT ]]; then
    project=("--project=$PROJECT")
  fi
  run gcloud compute tpus "$@" "${project[@]}"
}

# Run a shell command on TPU VM workers ("all", "0", "1,2", ...).
on_workers() {
  local workers="$1" command="$2" internal=()
  if [[ $INTERNAL_IP == 1 ]]; then
    internal=(--internal-ip)
  fi
  gcloud_tpus tpu-vm ssh "$NAME" "--zone=$ZONE" "--worker=$workers" "${internal[@]}" "--command=$command"
}

# The TPU software version for an accelerator type (JAX installs its own libtpu on top).
runtime_version() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "unknown accelerator type '$1' (expected v2-N, v3-N, v4-N, v5litepod-N, v5p-N or v6e-N)" ;;
  esac
}

# Preemptible TPUs exist for v2, v3 and v4 only; newer generations offer Spot VMs instead.
supports_preemptible() {
  case "$1" in
    v2-* | v3-* | v4-*) return 0 ;;
    *) return 1 ;;
  esac
}

# Names on the workers, used by the scripts that source this file.
# shellcheck disable=SC2034
REMOTE_DIR="mesh-transformer"
# shellcheck disable=SC2034
REMOTE_LOG="train.log"
# shellcheck disable=SC2034
REMOTE_PID="train.pid"
# shellcheck disable=SC2034
HOST_ACTOR_PID=".mtj-host-actor.pid"
# shellcheck disable=SC2034
RAY_PORT=6379
# shellcheck disable=SC2034
RAY_TOKEN_FILE=".mtj-ray-token"
