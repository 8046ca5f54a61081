#!/usr/bin/env bash
# Follow the training log of one worker (default 0; only worker 0 logs progress).
#
#   tpu_setup/logs.sh --name NAME --zone ZONE [--worker N] [--project P] [--internal-ip] [--dry-run]
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --worker) WORKER="${2:?--worker needs a number}"; shift 2 ;;
    *) die "unknown option $1" ;;
  esac
done
on_workers "$WORKER" "tail -n 200 -F ~/$REMOTE_LOG"
