#!/usr/bin/env bash
# Stop training on every worker of a slice, then Ray. Training gets SIGTERM, so it saves a checkpoint
# after the current step and exits; run launch.sh (or train.py) again to continue.
#
#   tpu_setup/stop.sh --name NAME --zone ZONE [--keep-ray] [--project P] [--internal-ip] [--dry-run]
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

KEEP_RAY=0
GRACE_S=300
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --keep-ray) KEEP_RAY=1; shift ;;
    *) die "unknown option $1" ;;
  esac
done

# Shell snippets run on the workers: SIGTERM to the pid in a pid file (with group "-", to its whole
# process group), and waiting (at most GRACE_S) for that pid to exit.
signal_pid_file() {
  echo "if [ -f ~/$1 ]; then kill -TERM -- $2\$(cat ~/$1) 2>/dev/null || true; fi"
}
wait_pid_file() {
  echo "if [ -f ~/$1 ]; then for _ in \$(seq $GRACE_S); do kill -0 \$(cat ~/$1) 2>/dev/null || break; sleep 1; done; \
rm -f ~/$1; fi"
}

# The launcher first: train.py on worker 0 then stops retrying and waits for its hosts, which get
# SIGTERM next, save a checkpoint together and exit. With --direct the launched process group is
# the training itself.
on_workers 0 "$(signal_pid_file "$REMOTE_PID" -)"
on_workers all "$(signal_pid_file "$HOST_ACTOR_PID" "") ; $(signal_pid_file "$REMOTE_PID" -) ; \
$(wait_pid_file "$HOST_ACTOR_PID") ; $(wait_pid_file "$REMOTE_PID")"
if [[ $KEEP_RAY == 0 ]]; then
  on_workers all "ray stop --force >/dev/null 2>&1 || true"
fi
