#!/usr/bin/env bash
# Install this package (the committed tree of the current checkout) with JAX for TPU and Ray on every
# worker of a slice.
#
#   tpu_setup/install.sh --name NAME --zone ZONE [--project P] [--internal-ip] [--dry-run]
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common "$@"
((${#REST[@]} == 0)) || die "unknown option ${REST[0]}"

# The scripts live in mesh_transformer/tpu_setup/ (the checkout's tpu_setup/ links there): resolve the
# link, then the checkout is two levels up. An installed wheel has no committed tree to ship.
REPO="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
[[ -e $REPO/.git ]] || die "$REPO is not a git checkout: install.sh ships a checkout's committed tree, run it from one"
ARCHIVE="${TMPDIR:-/tmp}/mesh-transformer-$NAME.tar.gz"

# git archive ships exactly what is committed: no local data, checkpoints or virtual environments.
run git -C "$REPO" archive --format=tar.gz -o "$ARCHIVE" HEAD
scp_args=(--worker=all "--zone=$ZONE")
if [[ $INTERNAL_IP == 1 ]]; then
  scp_args+=(--internal-ip)
fi
gcloud_tpus tpu-vm scp "$ARCHIVE" "$NAME:mesh-transformer.tar.gz" "${scp_args[@]}"
on_workers all "set -e; rm -rf $REMOTE_DIR; mkdir -p $REMOTE_DIR; tar -xzf mesh-transformer.tar.gz -C $REMOTE_DIR; \
python3 -m pip install --quiet --upgrade pip; \
python3 -m pip install --quiet -e ./$REMOTE_DIR 'jax[tpu]' 'ray[default]>=2.60'"
