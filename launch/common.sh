# Shared by launch/local.sh and launch/tpu_pod.sh (sourced; slurm_gpu.sbatch keeps its own copy because SLURM
# runs a spooled copy of the batch script, away from this directory).

run() {  # print (DRY_RUN=1) or execute a command
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}
