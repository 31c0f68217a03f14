#!/usr/bin/env bash
# Accelerator readiness check for a GPU host with its own Python and JAX and no package registry: install any
# missing pure-Python wheels carried in .whl/, print the backend and device count, then run
# `python -m llavaction_jax.bench.device_check` under a time limit (results: BENCHMARKS.md, "Device check").
#
# Usage:
#   bash launch/device_check.sh [--out FILE.json] [--markdown FILE.md] [--sections a,b] [--smoke] [...]
#
# Examples (from anywhere; the check runs in the repository root):
#   bash launch/device_check.sh --out $OUT/device_check.json --markdown $OUT/device_check.md
#   LIMIT=240 bash launch/device_check.sh --sections eval_7b,train_0_5b --out $OUT/retry.json   # a second try
#   bash launch/device_check.sh --smoke --out /tmp/smoke.json                                 # tiny sizes, CPU
#   DRY_RUN=1 bash launch/device_check.sh --out /tmp/x.json                # print the commands, run nothing
#
# What it does:
#   wheels  each $WHEELS/*.whl whose distribution $PYTHON cannot find yet is installed with
#           `pip install --no-index --no-deps --target $SITE`; $SITE and the repository go first on PYTHONPATH.
#           Put Python 3.12 pure-Python wheels there (git-ignored; at most 64 MiB travel with a run, so no JAX).
#   probe   prints the JAX version, backend and device count (a missing GPU shows here, in seconds)
#   check   timeout $LIMIT $PYTHON -m llavaction_jax.bench.device_check --time-limit $((LIMIT - 30)) "$@"
#           The check writes its JSON / markdown after every section, so a run cut off by the limit keeps what it
#           measured; exit status 124 means the limit was hit.
#
# Environment: PYTHON (default python3), WHEELS (default .whl), SITE (default .whl/site), LIMIT (seconds for the
# whole check, default 450), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92), JAX_COMPILATION_CACHE_DIR (default
# .jax_cache: a retry on the same machine compiles less), DRY_RUN=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/common.sh"  # run (print with DRY_RUN=1, else execute), exit_with_usage_if_asked
exit_with_usage_if_asked "${BASH_SOURCE[0]}" "$@"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-$WHEELS/site}"
LIMIT="${LIMIT:-450}"
DRY_RUN="${DRY_RUN:-0}"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$REPO/.jax_cache}"

shopt -s nullglob
for wheel in "$WHEELS"/*.whl; do
  dist="$(basename "$wheel")"
  dist="${dist%%-*}"  # a wheel file is NAME-VERSION-...whl
  if ! "$PYTHON" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$dist" 2> /dev/null; then
    run "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$wheel"
  fi
done

run "$PYTHON" -c 'import jax; print("JAX", jax.__version__, "| backend", jax.default_backend(), "| devices", jax.device_count(), jax.devices())'
run timeout --kill-after=15 "$LIMIT" "$PYTHON" -m llavaction_jax.bench.device_check --time-limit "$((LIMIT - 30))" "$@"
