#!/usr/bin/env bash
# Delete a TPU VM slice, or a queued resource together with its slice. Checkpoints in gs:// are kept.
#
#   tpu_setup/delete_tpu.sh --name NAME --zone ZONE [--queued] [--project P] [--dry-run]
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    *) die "unknown option $1" ;;
  esac
done

if [[ $QUEUED == 1 ]]; then
  gcloud_tpus queued-resources delete "$NAME" "--zone=$ZONE" --force --quiet
else
  gcloud_tpus tpu-vm delete "$NAME" "--zone=$ZONE" --quiet
fi
