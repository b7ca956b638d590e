#!/usr/bin/env bash
# Runs the SAMI main job on every worker of a Cloud TPU VM slice (one process per worker, one global mesh).
#
#   TPU_NAME=sami-v4 ZONE=us-central2-b launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [MAIN FLAGS...]
#
#   CONFIG       a config file relative to the repository root, e.g. configs/mistral_7b_hh.py
#   WORKDIR      gs://bucket/path: every worker reads and writes it (checkpoints, metrics, report); rerun
#                with the same one to resume after a preemption
#   MAIN FLAGS   passed on to `python -m sami_jax.main`, e.g. --config.train.iterations=1
#   --dry-run    print every command instead of running it (same as DRY_RUN=1)
#
# Environment:
#   TPU_NAME         (required) the TPU VM; created when it does not exist, reused when it does
#   ZONE             (required) its zone, e.g. us-central2-b
#   PROJECT          GCP project (default: gcloud's configured project)
#   ACCELERATOR      accelerator type for creation (default v4-32: 4 workers x 4 chips)
#   RUNTIME          TPU software version for creation (default tpu-ubuntu2204-base)
#   SPOT=1           create a spot VM (preemptible; the job resumes when rerun)
#   PYTHON_VERSION   Python of the workers' virtual environment, made with uv (default 3.11; the images'
#                    own Python may be older than the package needs)
#   JAX_SPEC         the jax requirement installed on the workers (default jax[tpu])
#   SKIP_INSTALL=1   do not copy and install the package again (a rerun on the same VM)
#   DRY_RUN=1        as --dry-run
#
# Steps: describe the VM or create it; copy this checkout (without .git, .venv, workdir/) to every worker and
# install it with jax[tpu] into ~/sami_venv (`--worker=all`); then run the same command on all workers at
# once. `--distributed=tpu` makes each worker call jax.distributed.initialize(), which reads the coordinator,
# the process count and this worker's id from the TPU metadata.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY_RUN=${DRY_RUN:-0}
positional=()
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) positional+=("$1") ;;
  esac
  shift
done
if ((${#positional[@]} < 2)); then
  usage >&2
  exit 2
fi
CONFIG=${positional[0]}
WORKDIR=${positional[1]}
main_flags=("${positional[@]:2}")

: "${TPU_NAME:?set TPU_NAME, the TPU VM to create or reuse}"
: "${ZONE:?set ZONE, the TPU VM zone (e.g. us-central2-b)}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ $WORKDIR != gs://* ]]; then
  echo "error: WORKDIR must be gs://... (all workers share it), got '$WORKDIR'" >&2
  exit 2
fi
if [[ ! -f $ROOT/$CONFIG ]]; then
  echo "error: CONFIG '$CONFIG' is not a file under $ROOT (give it relative to the repository root)" >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  where+=(--project="$PROJECT")
fi

# Prints the command (shell-quoted, so it can be pasted) under a dry run; runs it otherwise.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# 1. The VM: reuse it when it exists, else create it.
create=("${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
if [[ ${SPOT:-0} == 1 ]]; then
  create+=(--spot)
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "# reuse the VM if this succeeds:"
  run "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)'
  echo "# else create it:"
  run "${create[@]}"
elif "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  echo "reusing TPU VM $TPU_NAME" >&2
else
  run "${create[@]}"
fi

# 2. The package on every worker.
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  archive=$(mktemp -u "${TMPDIR:-/tmp}/sami_jax.XXXXXX").tar.gz
  run tar -czf "$archive" -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./workdir --exclude=__pycache__ .
  run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME":sami_jax.tar.gz "${where[@]}" --worker=all
  install="set -e; rm -rf ~/sami_jax && mkdir ~/sami_jax && tar -xzf ~/sami_jax.tar.gz -C ~/sami_jax"
  install+="; python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --python $PYTHON_VERSION ~/sami_venv"
  install+="; ~/.local/bin/uv pip install -q --python ~/sami_venv/bin/python '$JAX_SPEC' ~/sami_jax"
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$install"
  run rm -f "$archive"
fi

# 3. The same command on all workers at once.
args=(-m sami_jax.main --config="$CONFIG" --workdir="$WORKDIR" --distributed=tpu "${main_flags[@]}")
remote="cd ~/sami_jax && ~/sami_venv/bin/python$(printf ' %q' "${args[@]}")"
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$remote"
