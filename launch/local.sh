#!/usr/bin/env bash
# Train on this machine with every local device (CPU, one multi-GPU host, or a single TPU VM).
#
# Usage:
#   launch/local.sh [--config FILE_OR_NAME] [--config.KEY=VALUE ...]
#
# Examples (run from anywhere; paths are relative to the repository root):
#   launch/local.sh --config.data.samples=data/mix.yaml --config.data.shards=shards/ek100 \
#       --config.model.init_from=ckpt/llava-video-7b --out runs/llavaction_7b
#   launch/local.sh --config configs/train.py --config.train.steps=10      # a short run of the tiny default
#   DRY_RUN=1 launch/local.sh --config.train.steps=10                      # print the command, run nothing
#   JAX_EXTRA=cuda12 launch/local.sh ...                                   # first run on a GPU host: jax[cuda12]
#
# What it does: creates the virtual environment $VENV from requirements.txt if it is missing (plus
# jax[$JAX_EXTRA] at the pinned JAX version when JAX_EXTRA is set, e.g. cuda12 or tpu), then runs
#   $VENV/bin/python -m llavaction_jax train --config $CONFIG "$@"
# Re-running the same command resumes from the newest good checkpoint in <output_dir>/checkpoints.
#
# Environment: CONFIG (default configs/train.py; a later --config argument wins), VENV (default .venv),
# PYTHON (interpreter that creates the venv, default python3), JAX_EXTRA (unset), DRY_RUN=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/common.sh"  # run (print with DRY_RUN=1, else execute), exit_with_usage_if_asked
exit_with_usage_if_asked "${BASH_SOURCE[0]}" "$@"
cd "$REPO"
CONFIG="${CONFIG:-configs/train.py}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setting up $VENV from requirements.txt" >&2
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/python" -m pip install --quiet --upgrade pip
  run "$VENV/bin/python" -m pip install --quiet -r requirements.txt
  if [[ -n "${JAX_EXTRA:-}" ]]; then
    jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
    run "$VENV/bin/python" -m pip install --quiet "jax[$JAX_EXTRA]==$jax_version"
  fi
fi

if [[ "$DRY_RUN" == "1" ]]; then
  run "$VENV/bin/python" -m llavaction_jax train --config "$CONFIG" "$@"
else
  exec "$VENV/bin/python" -m llavaction_jax train --config "$CONFIG" "$@"
fi
