# Shared by launch/local.sh, launch/tpu_pod.sh, launch/slurm_gpu.sbatch (sourced from the repository it is submitted
# from) and launch/device_check.sh.

# XLA flags for NVIDIA H100-class GPUs: the set MaxText runs its H100 (A3) configurations with
# (AI-Hypercomputer/maxtext: MaxText/configs/a3/llama_2_7b/1vm.sh ... 8vm.sh), without its two flags that XLA has
# since removed (--xla_gpu_graph_level, --xla_gpu_enable_triton_softmax_fusion: an unknown flag aborts every JAX
# process). Every flag here is known to the XLA of JAX 0.10.2 and 0.11.2 (tests/test_launch_scripts.py runs JAX
# with all of them). Most matter once several GPUs exchange weights and gradients (FSDP training); on one GPU they
# cost nothing.
GPU_XLA_FLAGS=(
  # Let XLA's scheduler start asynchronous collectives and copies early and wait for them late, so that the
  # communication of one layer runs under the compute of another instead of between them.
  --xla_gpu_enable_latency_hiding_scheduler=true
  # Matmuls go to cuBLAS instead of Triton-generated GEMM fusions: cuBLAS is the faster one for transformer shapes
  # on H100 in MaxText's runs, and skipping Triton's autotuning shortens compiles.
  --xla_gpu_enable_triton_gemm=false
  # Collectives run on the highest-priority CUDA stream, so a queue of compute kernels cannot delay the transfers
  # that the next layer waits for.
  --xla_gpu_enable_highest_priority_async_stream=true
  # Combine the many small per-layer collectives into large ones (up to 128 / 128 / 64 MiB): fewer launches, each
  # near the interconnect's full bandwidth.
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=67108864
  # The layers are a scan (a while loop): gather the next layer's FSDP-sharded weights and scatter this layer's
  # gradients while the current iteration computes, instead of at its start and end.
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
  # Unroll the layer loop by two with double-buffered carries, which the pipelining above needs to overlap one
  # iteration's collectives with the other's compute.
  --xla_gpu_enable_while_loop_double_buffering=true
  # Allow combining collectives that gather or scatter along different dimensions (more of them merge).
  --xla_gpu_enable_all_gather_combine_by_dim=false
  --xla_gpu_enable_reduce_scatter_combine_by_dim=false
  # No rematerialization of XLA's own: what to recompute is chosen by the model's remat policy (jax.checkpoint);
  # XLA's pass would add recomputation the policy did not ask for, slowing the step instead of failing to fit.
  --xla_disable_hlo_passes=rematerialization
)

export_gpu_xla_flags() {  # usage: export_gpu_xla_flags -- put GPU_XLA_FLAGS in front of XLA_FLAGS (the caller's own
  # XLA_FLAGS come after them, so a flag set there wins)
  export XLA_FLAGS="${GPU_XLA_FLAGS[*]}${XLA_FLAGS:+ $XLA_FLAGS}"
}

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
