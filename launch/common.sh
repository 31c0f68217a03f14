# Shared by launch/local.sh, launch/tpu_pod.sh, launch/slurm_gpu.sbatch (sourced from the repository it is submitted
# from) and launch/device_check.sh.

run() {  # print (DRY_RUN=1) or execute a command
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

exit_with_usage_if_asked() {  # usage: exit_with_usage_if_asked SCRIPT "$@" -- with -h/--help, print the script's
  # header comment (line 2 up to `set -euo pipefail`) and exit 0
  if [[ "${2:-}" == "-h" || "${2:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
  fi
}

install_jax_extra() {  # usage: install_jax_extra VENV EXTRA -- pip install jax[EXTRA] at requirements.txt's JAX
  # version into VENV, also when VENV already exists (a marker file VENV/.jax-EXTRA-VERSION skips it next time);
  # nothing without EXTRA
  [[ -n "${2:-}" ]] || return 0
  local version
  version="$(sed -n 's/^jax==//p' requirements.txt)"
  [[ -f "$1/.jax-$2-$version" ]] && return 0
  run "$1/bin/python" -m pip install --quiet "jax[$2]==$version"
  run touch "$1/.jax-$2-$version"
}

print_backend() {  # usage: print_backend PYTHON [EXPECTED] -- print JAX's backend and device count; fail when
  # EXPECTED (an accelerator extra such as cuda12 or tpu) is set but JAX sees only the CPU
  run "$1" -m llavaction_jax.probe ${2:+"$2"}
}
