#!/usr/bin/env bash
# Print the slice's state (READY, CREATING, PREEMPTED, ...; NOT_FOUND when there is none), with
# --hosts its number of hosts (workers), with --type its accelerator type.
#
#   tpu_setup/status.sh --name NAME --zone ZONE [--hosts | --type] [--project P] [--dry-run]
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

FIELD="state"
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --hosts) FIELD="networkEndpoints.len()"; shift ;;
    --type) FIELD="acceleratorType"; shift ;;
    *) die "unknown option $1" ;;
  esac
done

if [[ $DRY_RUN == 1 ]]; then
  gcloud_tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--format=value($FIELD)"
elif ! gcloud_tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--format=value($FIELD)" 2>/dev/null | grep .; then
  echo "NOT_FOUND"
fi
