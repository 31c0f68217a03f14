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
#   JAX_EXTRA=cuda12 launch/local.sh ...                                   # on a GPU host: jax[cuda12]
#
# What it does: creates the virtual environment $VENV from requirements.txt if it is missing; with JAX_EXTRA
# (cuda12 or tpu) installs jax[$JAX_EXTRA] at the pinned JAX version, also into an existing $VENV (once: a marker
# file $VENV/.jax-$JAX_EXTRA-<version> remembers it); prints JAX's backend and device count
# (python -m llavaction_jax.probe), stopping when JAX_EXTRA asks for an accelerator that JAX does not see; with a
# cuda JAX_EXTRA puts the H100 flags of launch/common.sh (GPU_XLA_FLAGS, each with its reason) in front of XLA_FLAGS;
# then runs
#   $VENV/bin/python -m llavaction_jax train --config $CONFIG "$@"
# Re-running the same command resumes from the newest good checkpoint in <output_dir>/checkpoints.
#
# Environment: CONFIG (default configs/train.py; a later --config argument wins), VENV (default .venv),
# PYTHON (interpreter that creates the venv, default python3), JAX_EXTRA (unset), DRY_RUN=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/common.sh"  # run, exit_with_usage_if_asked, install_jax_extra, print_backend, export_gpu_xla_flags
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
fi
install_jax_extra "$VENV" "${JAX_EXTRA:-}"
if [[ "${JAX_EXTRA:-}" == cuda* ]]; then
  export_gpu_xla_flags
fi
print_backend "$VENV/bin/python" "${JAX_EXTRA:-}"

if [[ "$DRY_RUN" == "1" ]]; then
  run "$VENV/bin/python" -m llavaction_jax train --config "$CONFIG" "$@"
else
  exec "$VENV/bin/python" -m llavaction_jax train --config "$CONFIG" "$@"
fi
