#!/usr/bin/env bash
# Cloud TPU VM lifecycle for srft-jax: create, install, copy data, train on every worker, logs,
# stop, delete. Every worker runs the same `srft-jax train --config ...` (SPMD); the workers
# find each other through jax.distributed (auto-detected on TPU VMs: set mesh.distributed=true).
#
#   tpu_scripts/tpu.sh COMMAND [flags] [-- srft-jax overrides ...]
#
# Commands:
#   create   create the TPU VM (or, with --queued, a queued resource and wait until ACTIVE)
#   setup    copy this checkout (or clone --git URL) to every worker and pip install '.[tpu,tfds]'
#   data     copy --data-src (a local folder or gs://...) to ~/srft-data on every worker, and/or
#            download --hf-model ID there (--paper-16k: the paper's RoPE theta 40k / 16k window)
#   mount    mount an NFS export (e.g. Filestore) at --mount-point on every worker: the shared
#            run directory that multi-host checkpoints need
#   train    start `srft-jax train --config CONFIG [overrides]` on all workers (background)
#   logs     print the training log of --worker (default 0; --follow to tail -f)
#   stop     stop the training processes on every worker
#   delete   delete the TPU VM (with --queued: the queued resource and its node)
#   all      create, setup, data (with --data-src/--hf-model), mount (with --nfs), train
#
# Flags (environment variable in brackets; a flag wins):
#   --project P            Google Cloud project [SRFT_TPU_PROJECT]; default: gcloud's own config
#   --zone Z               zone, e.g. us-east5-a [SRFT_TPU_ZONE] (required)
#   --accelerator-type T   v4-8, v5p-64, v5litepod-8 (alias v5e-8), v6e-8 ... [SRFT_TPU_TYPE]
#   --runtime-version V    TPU software version [SRFT_TPU_RUNTIME]; default: from the type
#   --name N               TPU (and queued resource) name [SRFT_TPU_NAME]; default: srft-jax
#   --queued               use a queued resource (create/delete)      --spot  spot capacity
#   --source DIR           checkout to copy (setup; default: this repository)
#   --git URL              clone URL instead of copying (setup)       --ref REF  branch/tag
#   --python X.Y           Python of the workers' virtual environment (default 3.11)
#   --data-src SRC         local folder or gs:// prefix (data)
#   --hf-model ID          Hugging Face model to download to ~/srft-data/NAME[-16k] (data)
#   --paper-16k            with --hf-model: set RoPE theta 40000 and a 16384-token window
#   --nfs HOST:/EXPORT     NFS export to mount (mount)    --mount-point DIR  default /mnt/srft
#   --config FILE|NAME     srft-jax config (train), path relative to the checkout
#   --worker W             worker for logs (0, 1, ... or all)         --follow  tail -f
#   --dry-run              print every command instead of running it
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPT_DIR")"

PROJECT="${SRFT_TPU_PROJECT:-}"
ZONE="${SRFT_TPU_ZONE:-}"
ACCEL="${SRFT_TPU_TYPE:-}"
RUNTIME="${SRFT_TPU_RUNTIME:-}"
NAME="${SRFT_TPU_NAME:-srft-jax}"
QUEUED=0
SPOT=0
SOURCE="$REPO_DIR"
GIT_URL=""
GIT_REF=""
PYVER="3.11"
DATA_SRC=""
HF_MODEL=""
PAPER_16K=0
NFS=""
MOUNT_POINT="/mnt/srft"
CONFIG=""
WORKER="0"
FOLLOW=0
DRY_RUN=0
OVERRIDES=()

# Paths on the workers (relative to the login user's home directory, where ssh starts).
REMOTE_REPO="srft-jax"
REMOTE_VENV="srft-venv"
REMOTE_DATA="srft-data"
REMOTE_LOGS="srft-logs"

die() { echo "tpu.sh: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

# One argument as the shell reads it back: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it (one line, quoted so that it can be pasted) under --dry-run.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    local out="+"
    local arg
    for arg in "$@"; do out+=" $(quote "$arg")"; done
    echo "$out"
  else
    "$@"
  fi
}

parse_flags() {
  while [ $# -gt 0 ]; do
    local flag="$1" value=""
    case "$flag" in
      --) shift; OVERRIDES=("$@"); return ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --queued) QUEUED=1; shift; continue ;;
      --spot) SPOT=1; shift; continue ;;
      --follow) FOLLOW=1; shift; continue ;;
      --paper-16k) PAPER_16K=1; shift; continue ;;
      -h|--help) usage; exit 0 ;;
      --*=*) value="${flag#*=}"; flag="${flag%%=*}"; shift ;;
      --*) [ $# -ge 2 ] || die "$flag needs a value"; value="$2"; shift 2 ;;
      *) die "unexpected argument '$flag' (srft-jax overrides go after --)" ;;
    esac
    case "$flag" in
      --project) PROJECT="$value" ;;
      --zone) ZONE="$value" ;;
      --accelerator-type|--type) ACCEL="$value" ;;
      --runtime-version|--version) RUNTIME="$value" ;;
      --name) NAME="$value" ;;
      --source) SOURCE="$value" ;;
      --git) GIT_URL="$value" ;;
      --ref) GIT_REF="$value" ;;
      --python) PYVER="$value" ;;
      --data-src) DATA_SRC="$value" ;;
      --hf-model) HF_MODEL="$value" ;;
      --nfs) NFS="$value" ;;
      --mount-point) MOUNT_POINT="$value" ;;
      --config) CONFIG="$value" ;;
      --worker) WORKER="$value" ;;
      *) die "unknown flag $flag (see --help)" ;;
    esac
  done
}

# v5e-N is what people say; gcloud calls the same slice v5litepod-N.
normalize_accel() {
  case "$ACCEL" in
    v5e-*) ACCEL="v5litepod-${ACCEL#v5e-}" ;;
  esac
}

# The runtime (TPU software version) recommended for JAX on each generation.
default_runtime() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v4-*|v3-*|v2-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default runtime for accelerator type '$1'; pass --runtime-version" ;;
  esac
}

require_zone() { [ -n "$ZONE" ] || die "set --zone (or SRFT_TPU_ZONE)"; }

# gcloud flags shared by every call.
where() {
  WHERE=(--zone="$ZONE")
  if [ -n "$PROJECT" ]; then WHERE+=(--project="$PROJECT"); fi
}

# Runs a shell command line on the given worker(s) of the TPU VM.
tpu_ssh() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "$NAME" "${WHERE[@]}" --worker="$worker" --command="$command"
}

cmd_create() {
  [ -n "$ACCEL" ] || die "set --accelerator-type (or SRFT_TPU_TYPE)"
  [ -n "$RUNTIME" ] || RUNTIME="$(default_runtime "$ACCEL")"
  local capacity=()
  if [ "$SPOT" = 1 ]; then capacity=(--spot); fi
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources create "$NAME" "${WHERE[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" "${capacity[@]}"
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCEL" --version="$RUNTIME" "${capacity[@]}"
  fi
}

# Polls the queued resource until it is ACTIVE (its TPU VM exists); fails on FAILED/SUSPENDED.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}"
                  --format="value(state.state)")
  if [ "$DRY_RUN" = 1 ]; then
    run "${describe[@]}"
    echo "# (repeats every 60 s until the state is ACTIVE)"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    echo "queued resource $NAME: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED|SUSPENDED) die "queued resource $NAME is $state" ;;
    esac
    sleep 60
  done
}

# Copies the checkout (tracked and untracked files, no .git/runs) or clones it, then installs
# the package with the `tpu` extra into a virtual environment on every worker. `uv` provides
# the Python version the package needs (TPU VM images ship an older system Python).
cmd_setup() {
  local fetch
  if [ -n "$GIT_URL" ]; then
    local ref_flag=""
    if [ -n "$GIT_REF" ]; then ref_flag="--branch $(printf '%q' "$GIT_REF") "; fi
    fetch="rm -rf $REMOTE_REPO && git clone --depth 1 ${ref_flag}$(printf '%q' "$GIT_URL") $REMOTE_REPO"
  else
    local tarball
    tarball="${TMPDIR:-/tmp}/srft-jax-src.tar.gz"
    run tar -czf "$tarball" -C "$SOURCE" --exclude=.git --exclude=runs --exclude=__pycache__ \
      --exclude='*.egg-info' .
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:srft-jax-src.tar.gz" "${WHERE[@]}" --worker=all
    fetch="rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO && tar -xzf srft-jax-src.tar.gz -C $REMOTE_REPO"
  fi
  local install="$fetch"
  install+=" && python3 -m pip install --user -q uv"
  install+=" && python3 -m uv venv --python $PYVER $REMOTE_VENV"
  install+=" && python3 -m uv pip install --python $REMOTE_VENV/bin/python -e \"./${REMOTE_REPO}[tpu,tfds]\""
  install+=" && $REMOTE_VENV/bin/python -c \"import jax; print(jax.devices())\""
  tpu_ssh all "$install"
}

cmd_data() {
  [ -n "$DATA_SRC" ] || [ -n "$HF_MODEL" ] || die "set --data-src (a local folder or gs://bucket/prefix) and/or --hf-model"
  case "$DATA_SRC" in
    "") ;;
    gs://*)
      tpu_ssh all "mkdir -p $REMOTE_DATA && gcloud storage rsync --recursive $(printf '%q' "$DATA_SRC") $REMOTE_DATA" ;;
    *)
      [ "$DRY_RUN" = 1 ] || [ -d "$DATA_SRC" ] || die "--data-src $DATA_SRC is not a folder"
      tpu_ssh all "mkdir -p $REMOTE_DATA"
      run gcloud compute tpus tpu-vm scp --recurse "$DATA_SRC" "$NAME:$REMOTE_DATA/" "${WHERE[@]}" --worker=all ;;
  esac
  if [ -n "$HF_MODEL" ]; then
    local dest="$REMOTE_DATA/${HF_MODEL##*/}" extra=""
    if [ "$PAPER_16K" = 1 ]; then dest+="-16k"; extra=" --paper-16k"; fi
    tpu_ssh all "$REMOTE_VENV/bin/python $REMOTE_REPO/tpu_scripts/fetch_model.py $(printf '%q' "$HF_MODEL") $dest$extra"
  fi
}

cmd_mount() {
  [ -n "$NFS" ] || die "set --nfs HOST:/EXPORT (e.g. a Filestore instance's IP and share)"
  local mp
  mp="$(printf '%q' "$MOUNT_POINT")"
  tpu_ssh all "sudo apt-get install -y -q nfs-common && sudo mkdir -p $mp && (mountpoint -q $mp || sudo mount -t nfs -o rw,hard $(printf '%q' "$NFS") $mp) && sudo chmod a+rwx $mp"
}

# Starts training on every worker in its own session (so that `stop` ends the whole process
# group, reward workers included), with output in ~/srft-logs/train.log on each worker.
cmd_train() {
  [ -n "$CONFIG" ] || die "set --config (a YAML file in the checkout, or a bundled config name)"
  local args=""
  local o
  for o in "${OVERRIDES[@]}"; do args+=" $(printf '%q' "$o")"; done
  local launch="mkdir -p $REMOTE_LOGS && cd $REMOTE_REPO"
  launch+=" && (setsid nohup ../$REMOTE_VENV/bin/srft-jax train --config $(printf '%q' "$CONFIG")$args"
  launch+=" > ../$REMOTE_LOGS/train.log 2>&1 < /dev/null & echo \$! > ../$REMOTE_LOGS/train.pid)"
  tpu_ssh all "$launch"
}

cmd_logs() {
  if [ "$FOLLOW" = 1 ]; then
    tpu_ssh "$WORKER" "tail -n 200 -F $REMOTE_LOGS/train.log"
  else
    tpu_ssh "$WORKER" "tail -n 200 $REMOTE_LOGS/train.log"
  fi
}

cmd_stop() {
  tpu_ssh all "if [ -f $REMOTE_LOGS/train.pid ]; then kill -TERM -- -\$(cat $REMOTE_LOGS/train.pid) || true; rm -f $REMOTE_LOGS/train.pid; fi"
}

cmd_delete() {
  if [ "$QUEUED" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

main() {
  [ $# -ge 1 ] || { usage; exit 2; }
  local command="$1"
  shift
  case "$command" in -h|--help|help) usage; exit 0 ;; esac
  parse_flags "$@"
  normalize_accel
  require_zone
  where
  case "$command" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    data) cmd_data ;;
    mount) cmd_mount ;;
    train) cmd_train ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    all)
      cmd_create
      cmd_setup
      if [ -n "$DATA_SRC" ] || [ -n "$HF_MODEL" ]; then cmd_data; fi
      if [ -n "$NFS" ]; then cmd_mount; fi
      cmd_train ;;
    *) die "unknown command '$command' (create, setup, data, mount, train, logs, stop, delete, all)" ;;
  esac
}

main "$@"
