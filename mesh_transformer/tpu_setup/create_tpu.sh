#!/usr/bin/env bash
# Create a TPU VM slice (or a queued resource that becomes one) and wait until it is READY.
#
#   tpu_setup/create_tpu.sh --name NAME --zone ZONE --type v3-8 [--preemptible | --spot]
#                           [--queued [--valid-until DURATION]] [--version VERSION] [--project P] [--dry-run]
#
# --preemptible: cheaper, may be stopped at any time and lives at most 24 h (v2, v3, v4 only).
# --spot:        cheaper, may be stopped at any time, no time limit (all generations).
# --queued:      queue the request until capacity is free instead of failing when there is none.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TYPE=""
VERSION=""
PROVISIONING="on-demand"
QUEUED=0
VALID_UNTIL=""
WAIT_TIMEOUT_S=3600

parse_args() {
  parse_common "$@"
  set -- "${REST[@]+"${REST[@]}"}"
  while (($#)); do
    case "$1" in
      --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
      --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
      --preemptible) PROVISIONING="preemptible"; shift ;;
      --spot) PROVISIONING="spot"; shift ;;
      --queued) QUEUED=1; shift ;;
      --valid-until) VALID_UNTIL="${2:?--valid-until needs a duration, e.g. 6h}"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ -n $TYPE ]] || die "--type is required (e.g. v3-8, v4-32, v5litepod-16, v5p-16, v6e-8)"
  VERSION="${VERSION:-$(runtime_version "$TYPE")}"
  if [[ $PROVISIONING == preemptible ]] && { [[ $QUEUED == 1 ]] || ! supports_preemptible "$TYPE"; }; then
    die "--preemptible is only for directly created v2, v3 and v4 slices; use --spot"
  fi
  if [[ -n $VALID_UNTIL && $QUEUED == 0 ]]; then
    die "--valid-until only applies to --queued requests"
  fi
}

provisioning_flags() {
  case "$PROVISIONING" in
    preemptible) echo "--preemptible" ;;
    spot) echo "--spot" ;;
  esac
}

create_node() {
  local flags
  flags=$(provisioning_flags)
  gcloud_tpus tpu-vm create "$NAME" "--zone=$ZONE" "--accelerator-type=$TYPE" "--version=$VERSION" ${flags:+"$flags"}
}

create_queued() {
  local flags
  flags=$(provisioning_flags)
  gcloud_tpus queued-resources create "$NAME" "--node-id=$NAME" "--zone=$ZONE" "--accelerator-type=$TYPE" \
    "--runtime-version=$VERSION" ${flags:+"$flags"} ${VALID_UNTIL:+"--valid-until-duration=$VALID_UNTIL"}
}

wait_until_ready() {
  local deadline=$((SECONDS + WAIT_TIMEOUT_S)) state=""
  if [[ $DRY_RUN == 1 ]]; then
    gcloud_tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--format=value(state)"
    return 0
  fi
  while ((SECONDS < deadline)); do
    state=$(gcloud_tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--format=value(state)" 2>/dev/null) || true
    [[ $state == READY ]] && return 0
    echo "waiting for $NAME to be READY (now: ${state:-not created yet})" >&2
    sleep 30
  done
  die "$NAME was not READY within ${WAIT_TIMEOUT_S} s (last state: ${state:-unknown})"
}

parse_args "$@"
if [[ $QUEUED == 1 ]]; then
  create_queued
else
  create_node
fi
wait_until_ready
