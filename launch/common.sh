# Shared by launch/local.sh, launch/tpu_pod.sh and launch/device_check.sh (sourced; slurm_gpu.sbatch keeps its own copy because SLURM
# runs a spooled copy of the batch script, away from this directory).

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
