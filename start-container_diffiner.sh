#!/usr/bin/env bash
# Build and start an interactive container of a Diffiner image, from one of its two recipes:
#   torch2.13  Dockerfile_torch2p13_cuda13_diffiner: PyTorch 2.13 + CUDA 13, Python 3.12, for
#              current GPUs (compute capability 7.5 and up: Turing to Hopper and Blackwell;
#              host driver 580 or newer)
#   torch1.11  Dockerfile_torch1p11_diffiner: the authors' PyTorch 1.11 + CUDA 11.3, Python 3.8,
#              for GPUs up to Ampere (no kernels for compute capability 9.0 and up)
# With GPUs requested and nvidia-smi on the host, a GPU that the chosen recipe has no kernels for
# (by its compute capability) is refused before anything is built or run.
#
# Usage: ./start-container_diffiner.sh [options] [-- COMMAND ...]
#
# Options; each also reads the environment variable in brackets (default after "="),
# and a flag wins over its variable:
#   --recipe NAME    torch2.13 or torch1.11 (see above)           [DIFFINER_RECIPE=torch2.13]
#   --gpus IDS       GPU ids for --gpus "device=IDS", e.g. 0 or 0,1; "all" for every GPU,
#                    "none" for a CPU-only container              [DIFFINER_GPUS=all]
#   --data DIR       host folder mounted at /data (none when unset)  [DIFFINER_DATA_DIR]
#   --repo DIR       checkout mounted at /workspace/diffiner, where the image installed the
#                    package in editable mode; "none" keeps the copy baked into the image
#                                        [DIFFINER_REPO_DIR=the folder of this script]
#   --image NAME     image to run, and to build with --build
#                                  [DIFFINER_IMAGE=diffiner:torch2.13 or diffiner:torch1.11]
#   --shm SIZE       shared memory (DataLoader workers, NCCL)  [DIFFINER_SHM_SIZE=16g]
#   --ipc-host       share the host's IPC namespace instead of --shm-size
#                                                               [DIFFINER_IPC_HOST=0]
#   --workdir DIR    working directory in the container
#                                          [DIFFINER_WORKDIR=/workspace/diffiner]
#   --name NAME      container name                       [DIFFINER_CONTAINER_NAME]
#   --as-me          run as the calling user, so files written to the mounts are not
#                    owned by root; HOME becomes /tmp               [DIFFINER_AS_ME=0]
#   --build          build the image from the recipe's Dockerfile first  [DIFFINER_BUILD=0]
#   --docker-args "ARGS"  extra `docker run` arguments, split on spaces
#                                                      [DIFFINER_EXTRA_DOCKER_ARGS]
#   --dry-run        print the docker commands instead of running them
#                                                                [DIFFINER_DRY_RUN=0]
#   -h, --help       this help
# Anything after "--" is the command run in the container (default: the image's bash).
#
# Examples:
#   ./start-container_diffiner.sh --build --gpus 0,1 --data /mnt/speech
#   DIFFINER_GPUS=2 DIFFINER_DATA_DIR=~/data ./start-container_diffiner.sh -- python -m pytest -q tests
#   ./start-container_diffiner.sh --recipe torch1.11 --build --gpus 0   # on an A100
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

RECIPE="${DIFFINER_RECIPE:-torch2.13}"
GPUS="${DIFFINER_GPUS:-all}"
DATA_DIR="${DIFFINER_DATA_DIR:-}"
REPO_DIR="${DIFFINER_REPO_DIR:-$SCRIPT_DIR}"
IMAGE="${DIFFINER_IMAGE:-}"
SHM_SIZE="${DIFFINER_SHM_SIZE:-16g}"
IPC_HOST="${DIFFINER_IPC_HOST:-0}"
WORKDIR="${DIFFINER_WORKDIR:-/workspace/diffiner}"
CONTAINER_NAME="${DIFFINER_CONTAINER_NAME:-}"
AS_ME="${DIFFINER_AS_ME:-0}"
BUILD="${DIFFINER_BUILD:-0}"
EXTRA_DOCKER_ARGS="${DIFFINER_EXTRA_DOCKER_ARGS:-}"
DRY_RUN="${DIFFINER_DRY_RUN:-0}"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }

cmd=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --recipe) need_value "$@"; RECIPE="$2"; shift ;;
        --recipe=*) RECIPE="${1#*=}" ;;
        --gpus) need_value "$@"; GPUS="$2"; shift ;;
        --gpus=*) GPUS="${1#*=}" ;;
        --data) need_value "$@"; DATA_DIR="$2"; shift ;;
        --data=*) DATA_DIR="${1#*=}" ;;
        --repo) need_value "$@"; REPO_DIR="$2"; shift ;;
        --repo=*) REPO_DIR="${1#*=}" ;;
        --image) need_value "$@"; IMAGE="$2"; shift ;;
        --image=*) IMAGE="${1#*=}" ;;
        --shm) need_value "$@"; SHM_SIZE="$2"; shift ;;
        --shm=*) SHM_SIZE="${1#*=}" ;;
        --ipc-host) IPC_HOST=1 ;;
        --workdir) need_value "$@"; WORKDIR="$2"; shift ;;
        --workdir=*) WORKDIR="${1#*=}" ;;
        --name) need_value "$@"; CONTAINER_NAME="$2"; shift ;;
        --name=*) CONTAINER_NAME="${1#*=}" ;;
        --as-me) AS_ME=1 ;;
        --build) BUILD=1 ;;
        --docker-args) [[ $# -ge 2 ]] || die "--docker-args needs a value"; EXTRA_DOCKER_ARGS="$2"; shift ;;
        --docker-args=*) EXTRA_DOCKER_ARGS="${1#*=}" ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; cmd=("$@"); break ;;
        *) die "unknown argument '$1' (see --help; put the container command after --)" ;;
    esac
    shift
done

# Each recipe's torch carries kernels for a range of compute capabilities (x10: 75 is 7.5).
case "$RECIPE" in
    torch2.13) DOCKERFILE="$SCRIPT_DIR/Dockerfile_torch2p13_cuda13_diffiner"; LOWEST=75; HIGHEST=999; OTHER=torch1.11 ;;
    torch1.11) DOCKERFILE="$SCRIPT_DIR/Dockerfile_torch1p11_diffiner"; LOWEST=37; HIGHEST=89; OTHER=torch2.13 ;;
    *) die "--recipe wants torch2.13 or torch1.11 (got '$RECIPE')" ;;
esac
IMAGE="${IMAGE:-diffiner:$RECIPE}"
[[ "$GPUS" =~ ^(all|none|[0-9]+(,[0-9]+)*)$ ]] || die "--gpus wants all, none or comma-separated ids like 0,1 (got '$GPUS')"
[[ "$SHM_SIZE" =~ ^[0-9]+[bkmgBKMG]?$ ]] || die "--shm wants a size like 16g (got '$SHM_SIZE')"
[[ "$WORKDIR" == /* ]] || die "--workdir must be an absolute path inside the container (got '$WORKDIR')"

# A GPU outside the recipe's range would fail every CUDA call with "no kernel image is
# available" (torch 1.11's CUDA 11.3 build stops at Ampere and Ada, CUDA 13 starts at Turing), so
# it is refused here, by the capability the host's nvidia-smi reports for the GPUs asked for.
if [[ "$GPUS" != none ]] && command -v nvidia-smi >/dev/null 2>&1; then
    query=(nvidia-smi "--query-gpu=name,compute_cap" "--format=csv,noheader")
    if [[ "$GPUS" != all ]]; then query+=(--id="$GPUS"); fi
    while IFS=, read -r gpu_name capability; do
        capability="${capability// /}"
        [[ "$capability" =~ ^[0-9]+\.[0-9]$ ]] || continue  # an old driver cannot report it
        cc="${capability/./}"
        if (( cc < LOWEST || cc > HIGHEST )); then
            die "$gpu_name (compute capability $capability) has no kernels in the $RECIPE image; use --recipe $OTHER"
        fi
    done < <("${query[@]}" 2>/dev/null)
fi

# Host paths must be absolute for --mount; fail early when they do not exist.
abspath() { (cd "$1" 2>/dev/null && pwd) || die "$2 '$1' is not a directory"; }
if [[ -n "$DATA_DIR" ]]; then DATA_DIR="$(abspath "$DATA_DIR" "--data")"; fi
if [[ "$REPO_DIR" != none ]]; then REPO_DIR="$(abspath "$REPO_DIR" "--repo")"; fi

run=(docker run --rm)
# Interactive only when there is a terminal, so the script also works from CI or a pipe.
if [[ -t 0 && -t 1 ]]; then run+=(-it); else run+=(-i); fi
case "$GPUS" in
    none) ;;
    all) run+=(--gpus all) ;;
    *) run+=(--gpus "\"device=$GPUS\"") ;;  # the quotes are part of the value when it has a comma
esac
if [[ "$IPC_HOST" == 1 ]]; then run+=(--ipc=host); else run+=(--shm-size="$SHM_SIZE"); fi
# Multi-GPU NCCL and DataLoader workers also need enough locked memory and stack.
run+=(--ulimit memlock=-1 --ulimit stack=67108864)
if [[ -n "$CONTAINER_NAME" ]]; then run+=(--name "$CONTAINER_NAME"); fi
# --mount, not -v: -v splits its value at ':', so a host path holding one was mounted wrong.
# --mount reads its value as one CSV record: the source field is quoted (quotes doubled), so
# commas and quotes in the path stay in it too.
bind_mount() { printf 'type=bind,"source=%s",target=%s' "${1//\"/\"\"}" "$2"; }
if [[ "$REPO_DIR" != none ]]; then run+=(--mount "$(bind_mount "$REPO_DIR" /workspace/diffiner)"); fi
if [[ -n "$DATA_DIR" ]]; then run+=(--mount "$(bind_mount "$DATA_DIR" /data)"); fi
if [[ "$AS_ME" == 1 ]]; then run+=(--user "$(id -u):$(id -g)" -e HOME=/tmp); fi
run+=(-w "$WORKDIR")
if [[ -n "$EXTRA_DOCKER_ARGS" ]]; then
    read -r -a extra <<< "$EXTRA_DOCKER_ARGS"
    run+=("${extra[@]}")
fi
run+=("$IMAGE")
if [[ ${#cmd[@]} -gt 0 ]]; then run+=("${cmd[@]}"); fi

build=(docker build -f "$DOCKERFILE" -t "$IMAGE" "$SCRIPT_DIR")

show() { printf '%q ' "$@" | sed 's/ $//'; printf '\n'; }
if [[ "$DRY_RUN" == 1 ]]; then
    if [[ "$BUILD" == 1 ]]; then show "${build[@]}"; fi
    show "${run[@]}"
    exit 0
fi

command -v docker >/dev/null 2>&1 || die "docker is not installed or not on PATH"
if [[ "$BUILD" == 1 ]]; then "${build[@]}"; fi
exec "${run[@]}"
