#!/usr/bin/env bash
# Accelerator readiness check for a GPU host with its own Python and JAX and no package registry: install the
# pure-Python wheels carried in .whl/ that it lacks, print the backend and device count, then run
# `python -m llavaction_jax.bench.device_check` within a budget (results: BENCHMARKS.md, "Device check").
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
#   wheels  each $WHEELS/NAME-VERSION-*.whl whose distribution $PYTHON lacks, or has at an older version, is
#           installed with `pip install --no-index --no-deps --upgrade --target $SITE`; $SITE and the repository go
#           first on PYTHONPATH, so the installed one wins over an older copy elsewhere. Put Python 3.12
#           pure-Python wheels there (git-ignored; at most 64 MiB travel with a run, so no JAX). The check needs
#           ml_collections (the configs/ presets), which such a machine may lack:
#             pip download ml_collections==1.1.0 --no-deps --python-version 3.12 --only-binary=:all: -d .whl
#   flags   XLA_FLAGS gets the H100 flags of launch/common.sh (GPU_XLA_FLAGS, each with its reason) in front of
#           any you set
#   probe   prints the JAX version, backend and device count (a missing GPU shows here, in seconds)
#   check   timeout $LIMIT $PYTHON -m llavaction_jax.bench.device_check --budget $((LIMIT - 30)) "$@"
#           The check writes its JSON / markdown after every result, skips what does not fit its budget, and stops
#           a section that overruns its deadline, so a run cut off anywhere keeps what it measured; exit status
#           124 means the outer limit was hit.
#
# Environment: PYTHON (default python3), WHEELS (default .whl), SITE (default .whl/site), LIMIT (seconds for the
# whole check, default 450; the check's own budget is 30 s less), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92), JAX_COMPILATION_CACHE_DIR (default
# .jax_cache: a retry on the same machine compiles less), DRY_RUN=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/common.sh"  # run, exit_with_usage_if_asked, export_gpu_xla_flags
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

export_gpu_xla_flags

shopt -s nullglob
for wheel in "$WHEELS"/*.whl; do
  name="$(basename "$wheel")"  # NAME-VERSION-...whl
  dist="${name%%-*}"
  version="${name#*-}"
  version="${version%%-*}"
  if ! "$PYTHON" - "$dist" "$version" <<'EOF' 2> /dev/null
import importlib.metadata as m, re, sys
try:
    from packaging.version import Version as key
except ImportError:  # numeric fields are enough for the versions pinned here
    key = lambda v: tuple(int(x) for x in re.findall(r"\d+", v))
sys.exit(0 if key(m.version(sys.argv[1])) >= key(sys.argv[2]) else 1)  # missing: PackageNotFoundError, exit 1
EOF
  then
    run "$PYTHON" -m pip install --quiet --no-index --no-deps --upgrade --target "$SITE" "$wheel"
  fi
done

run "$PYTHON" -c 'import jax; print("JAX", jax.__version__, "| backend", jax.default_backend(), "| devices", jax.device_count(), jax.devices())'
run timeout --kill-after=15 "$LIMIT" "$PYTHON" -m llavaction_jax.bench.device_check --budget "$((LIMIT - 30))" "$@"
