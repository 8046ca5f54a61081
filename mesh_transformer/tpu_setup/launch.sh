#!/usr/bin/env bash
# Start training on a slice and follow its log.
#
#   tpu_setup/launch.sh --name NAME --zone ZONE --config CONFIG.json [--direct] [--foreground] [--no-tail]
#                       [--project P] [--internal-ip] [--dry-run] [-- EXTRA ARGUMENTS]
#
# Default: train.py on worker 0 drives every host through Ray (start_ray.sh first), retrying after
# failures and lost hosts. --direct: device_train.py on every worker, joined by jax.distributed,
# without Ray or retries. The run goes on in the background on the workers (logs in ~/train.log);
# --foreground waits for it instead, which is what train.py does when it runs this from outside.
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
DIRECT=0
FOREGROUND=0
TAIL=1
EXTRA=()

parse_args() {
  local own=()
  while (($#)); do
    if [[ $1 == -- ]]; then
      shift
      EXTRA=("$@")
      break
    fi
    own+=("$1")
    shift
  done
  parse_common "${own[@]}"
  set -- "${REST[@]+"${REST[@]}"}"
  while (($#)); do
    case "$1" in
      --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
      --direct) DIRECT=1; shift ;;
      --foreground) FOREGROUND=1; shift ;;
      --no-tail) TAIL=0; shift ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ -n $CONFIG ]] || die "--config CONFIG.json is required"
  [[ $DRY_RUN == 1 || -f $CONFIG ]] || die "config file $CONFIG not found"
}

training_command() {
  local extra=""
  if ((${#EXTRA[@]})); then
    printf -v extra ' %q' "${EXTRA[@]}"
  fi
  if [[ $DIRECT == 1 ]]; then
    echo "python3 device_train.py --config run_config.json --no-progress$extra"
  else
    echo "$RAY_ENV_LINE python3 train.py --tpu $NAME --tpu_region $ZONE --config run_config.json$extra"
  fi
}

parse_args "$@"
WORKERS=0
if [[ $DIRECT == 1 ]]; then
  WORKERS=all
fi
RAY_ENV_LINE="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=\$HOME/$RAY_TOKEN_FILE"
scp_args=("--worker=$WORKERS" "--zone=$ZONE")
if [[ $INTERNAL_IP == 1 ]]; then
  scp_args+=(--internal-ip)
fi
gcloud_tpus tpu-vm scp "$CONFIG" "$NAME:$REMOTE_DIR/run_config.json" "${scp_args[@]}"
COMMAND="cd $REMOTE_DIR && $(training_command)"
if [[ $FOREGROUND == 1 ]]; then
  on_workers "$WORKERS" "$COMMAND"
  exit
fi
# setsid + nohup: the run outlives the ssh session; its pid lets stop.sh send it SIGTERM.
printf -v QUOTED_COMMAND '%q' "$COMMAND"
on_workers "$WORKERS" "setsid nohup bash -c $QUOTED_COMMAND > ~/$REMOTE_LOG 2>&1 < /dev/null & echo \$! > ~/$REMOTE_PID"
if [[ $TAIL == 1 ]]; then
  on_workers 0 "tail -n +1 -F ~/$REMOTE_LOG"
fi
