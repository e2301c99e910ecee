#!/usr/bin/env bash
# Launches `srft-jax train` on GPUs: one node with N GPUs, or several nodes joined by
# jax.distributed (JAX's own multi-controller runtime; every process runs the same command).
#
#   gpu_scripts/launch.sh --config FILE|NAME [flags] [-- srft-jax overrides ...]
#
# One node, all its GPUs in one process (the mesh comes from the config's `mesh:` section):
#   gpu_scripts/launch.sh --config configs/qwen2.5-math-7b-srft-8xh100.yaml
#
# Several nodes, one process per node, coordinator = node 0 (run on every node, changing the id):
#   gpu_scripts/launch.sh --config ... --coordinator 10.0.0.1:12345 --num-processes 2 --process-id 0
#   (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID instead of the flags)
#
# SLURM (one process per GPU; JAX reads SLURM_* itself): see gpu_scripts/slurm_example.sbatch
#   srun gpu_scripts/launch.sh --config ...
#
# Flags (environment variable in brackets; a flag wins):
#   --config FILE|NAME        srft-jax config (required)
#   --coordinator HOST:PORT   address of process 0 [JAX_COORDINATOR_ADDRESS]
#   --num-processes N         number of processes [JAX_NUM_PROCESSES]
#   --process-id I            this process, 0..N-1 [JAX_PROCESS_ID]
#   --gpus LIST               CUDA_VISIBLE_DEVICES for this process, e.g. 0,1,2,3
#   --srft-jax CMD            the srft-jax executable (default: srft-jax on PATH)
#   --dry-run                 print the command instead of running it
set -euo pipefail

CONFIG=""
COORDINATOR="${JAX_COORDINATOR_ADDRESS:-}"
NUM_PROCESSES="${JAX_NUM_PROCESSES:-}"
PROCESS_ID="${JAX_PROCESS_ID:-}"
GPUS=""
SRFT_JAX="srft-jax"
DRY_RUN=0
OVERRIDES=()

die() { echo "launch.sh: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

run() {
  if [ "$DRY_RUN" = 1 ]; then
    local out="+"
    local arg
    for arg in "$@"; do out+=" $(quote "$arg")"; done
    echo "$out"
  else
    exec "$@"
  fi
}

while [ $# -gt 0 ]; do
  flag="$1"
  value=""
  case "$flag" in
    --) shift; OVERRIDES=("$@"); break ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    -h|--help) usage; exit 0 ;;
    --*=*) value="${flag#*=}"; flag="${flag%%=*}"; shift ;;
    --*) [ $# -ge 2 ] || die "$flag needs a value"; value="$2"; shift 2 ;;
    *) die "unexpected argument '$flag' (srft-jax overrides go after --)" ;;
  esac
  case "$flag" in
    --config) CONFIG="$value" ;;
    --coordinator) COORDINATOR="$value" ;;
    --num-processes) NUM_PROCESSES="$value" ;;
    --process-id) PROCESS_ID="$value" ;;
    --gpus) GPUS="$value" ;;
    --srft-jax) SRFT_JAX="$value" ;;
    *) die "unknown flag $flag (see --help)" ;;
  esac
done

[ -n "$CONFIG" ] || die "set --config"

MESH=()
if [ -n "$COORDINATOR" ]; then
  if [ -z "$NUM_PROCESSES" ] || [ -z "$PROCESS_ID" ]; then
    die "--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
  fi
  MESH=(mesh.distributed=true "mesh.coordinator_address=$COORDINATOR"
        "mesh.num_processes=$NUM_PROCESSES" "mesh.process_id=$PROCESS_ID")
elif [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  # Inside `srun` with several tasks: JAX derives coordinator, count and id from SLURM_* and
  # gives each task the GPU of its SLURM_LOCALID.
  MESH=(mesh.distributed=true)
fi

if [ -n "$GPUS" ]; then export CUDA_VISIBLE_DEVICES="$GPUS"; fi
# Let XLA use most of each GPU (JAX preallocates 75% by default) and overlap collectives.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

run "$SRFT_JAX" train --config "$CONFIG" "${MESH[@]}" "${OVERRIDES[@]}"
