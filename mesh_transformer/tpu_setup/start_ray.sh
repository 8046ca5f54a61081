#!/usr/bin/env bash
# Start Ray on a slice: the head on worker 0, every other worker joins it. Each worker gets the
# resource {"tpu_host": 1}, so train.py places exactly one host actor per worker. The cluster uses
# token authentication with a fresh token kept in ~/.mtj-ray-token on every worker.
#
#   tpu_setup/start_ray.sh --name NAME --zone ZONE [--workers-only] [--project P] [--internal-ip] [--dry-run]
#
# --workers-only: (re)join the other workers to a running head, e.g. after a worker restarted.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKERS_ONLY=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --workers-only) WORKERS_ONLY=1; shift ;;
    *) die "unknown option $1" ;;
  esac
done

# The token is written to a file on each worker and read from there; a dry run shows a placeholder.
new_token() {
  if [[ $DRY_RUN == 1 ]]; then
    echo "RAY_TOKEN"
  else
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n'
  fi
}

if [[ $DRY_RUN == 1 ]]; then
  gcloud_tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--format=value(networkEndpoints[0].ipAddress)"
  HEAD_IP="WORKER0_IP"
else
  HEAD_IP="$(gcloud_tpus tpu-vm describe "$NAME" "--zone=$ZONE" "--format=value(networkEndpoints[0].ipAddress)")"
fi
RAY_ENV="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=\$HOME/$RAY_TOKEN_FILE"
RAY_OPTIONS="--resources='{\"tpu_host\": 1}' --include-dashboard=false --disable-usage-stats"
# A worker is the head when one of its addresses is worker 0's.
IS_HEAD="hostname -I | tr ' ' '\n' | grep -qx $HEAD_IP"

if [[ $WORKERS_ONLY == 0 ]]; then
  TOKEN="$(new_token)"
  on_workers all "umask 077; echo $TOKEN > ~/$RAY_TOKEN_FILE; ray stop --force >/dev/null 2>&1 || true"
  on_workers 0 "$RAY_ENV ray start --head --port=$RAY_PORT $RAY_OPTIONS"
fi
on_workers all "if ! $IS_HEAD; then ray stop --force >/dev/null 2>&1 || true; \
$RAY_ENV ray start --address=$HEAD_IP:$RAY_PORT $RAY_OPTIONS; fi"
