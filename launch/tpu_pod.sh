#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (e.g. v5p-64, v4-32, v6e-256): copy the repo to every worker, set up the
# virtual environment there, and run `python -m llavaction_jax train` on all workers at once.
#
# Usage:
#   TPU_NAME=NAME ZONE=ZONE PROJECT=PROJECT launch/tpu_pod.sh [--config.KEY=VALUE ...]
#
# Example (7B fine-tune; data and checkpoints must be readable at the same path on every worker, e.g. a
# gcsfuse mount or a persistent disk attached read-only to all workers):
#   TPU_NAME=llavaction-v5p-64 ZONE=us-east5-a PROJECT=my-project launch/tpu_pod.sh \
#       --config.model.init_from=/mnt/data/ckpt/llava-video-7b --config.data.samples=/mnt/data/mix.yaml \
#       --config.data.shards=/mnt/data/shards/ek100 --out /mnt/data/runs/llavaction_7b \
#       --config.train.batch_size=256 --config.mesh.fsdp=-1
#   PHASES=train TPU_NAME=... ZONE=... PROJECT=... launch/tpu_pod.sh ...   # code and venv already in place
#   DRY_RUN=1 TPU_NAME=t ZONE=z PROJECT=p launch/tpu_pod.sh ...            # print the gcloud commands only
#
# Phases (PHASES, comma list, default copy,setup,train):
#   copy   tar the repository's git-tracked files as they are in the working tree (so no untracked checkpoints,
#          shards or results written into the checkout travel; commit or `git add` a new file to send it), then
#          `gcloud compute tpus tpu-vm scp` it to all workers and unpack it into $REMOTE_DIR
#   setup  on all workers: create $REMOTE_DIR/.venv if missing and install requirements.txt (without torch, which
#          training does not use) plus jax[tpu] at the pinned JAX version
#   train  on all workers: print JAX's backend and device count (python -m llavaction_jax.probe tpu: a worker
#          whose JAX sees no TPU stops there), then `python -m llavaction_jax train --config $CONFIG "$@"`. The
#          run detects the pod slice
#          itself (llavaction_jax/distributed.py: TPU chips attached and several workers in the GCE metadata)
#          and calls jax.distributed.initialize(), which finds the coordinator, process count and id there;
#          every worker feeds its slice of the global batch. --config.distributed=on (or off) still overrides
#          the detection. With DETACH=1 the job runs under
#          nohup with logs in $REMOTE_DIR/train-<hostname>.log and this script returns at once.
# Re-running the train phase with the same arguments resumes from the newest good checkpoint.
#
# Environment: TPU_NAME, ZONE, PROJECT (required), REMOTE_DIR (default llavaction_jax, relative to the
# workers' home directory), CONFIG (default configs/train.py), PHASES, DETACH=1, DRY_RUN=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/common.sh"  # run (print with DRY_RUN=1, else execute), exit_with_usage_if_asked
exit_with_usage_if_asked "${BASH_SOURCE[0]}" "$@"

: "${TPU_NAME:?set TPU_NAME (the TPU VM name), ZONE and PROJECT; see launch/tpu_pod.sh --help}"
: "${ZONE:?set ZONE (e.g. us-east5-a)}"
: "${PROJECT:?set PROJECT (the GCP project id)}"
REMOTE_DIR="${REMOTE_DIR:-llavaction_jax}"
CONFIG="${CONFIG:-configs/train.py}"
PHASES="${PHASES:-copy,setup,train}"
DRY_RUN="${DRY_RUN:-0}"
TPU=(compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --project "$PROJECT")

on_all_workers() {  # run a shell command line on every worker of the pod slice
  run gcloud "${TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command "$1"
}

has_phase() { [[ ",$PHASES," == *",$1,"* ]]; }

if has_phase copy; then
  tarball="${TMPDIR:-/tmp}/llavaction_jax-$$.tar.gz"
  if git -C "$REPO" rev-parse --git-dir > /dev/null 2>&1; then
    run bash -c "cd $(printf '%q' "$REPO") && git ls-files -z --cached \
      | tar -czf $(printf '%q' "$tarball") --ignore-failed-read --null -T -"
  else
    run tar -czf "$tarball" -C "$REPO" --exclude=.venv --exclude=__pycache__ --exclude=.jax_cache --exclude=.whl \
      --exclude=./runs --exclude=./ckpt --exclude=./shards --exclude=./questions --exclude=./results \
      --exclude=./exported --exclude=./demo_out .
  fi
  run gcloud "${TPU[@]}" scp "$tarball" "$TPU_NAME:llavaction_jax.tar.gz" "${WHERE[@]}" --worker=all
  on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf llavaction_jax.tar.gz -C $REMOTE_DIR && rm llavaction_jax.tar.gz"
  [[ "$DRY_RUN" == "1" ]] || rm -f "$tarball"
fi

if has_phase setup; then
  on_all_workers "set -e; cd $REMOTE_DIR; if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi; \
.venv/bin/python -m pip install --quiet --upgrade pip; \
grep -v '^torch' requirements.txt > /tmp/llavaction_requirements.txt; \
.venv/bin/python -m pip install --quiet -r /tmp/llavaction_requirements.txt; \
.venv/bin/python -m pip install --quiet \"jax[tpu]==\$(sed -n 's/^jax==//p' requirements.txt)\""
fi

if has_phase train; then
  args="$(printf '%q ' --config "$CONFIG" "$@")"
  train=".venv/bin/python -m llavaction_jax.probe tpu && .venv/bin/python -m llavaction_jax train ${args% }"
  if [[ "${DETACH:-0}" == "1" ]]; then
    on_all_workers "cd $REMOTE_DIR && nohup bash -c $(printf '%q' "$train") > train-\$(hostname).log 2>&1 < /dev/null &"
  else
    on_all_workers "cd $REMOTE_DIR && $train"
  fi
fi
