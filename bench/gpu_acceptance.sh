#!/usr/bin/env bash
# shellcheck disable=SC2317
# (SC2317, "unreachable": the functions that stage runs through "$@" are reached indirectly.)
# One-command GPU acceptance: the CUDA test tier, then the refinement and training benchmarks,
# with their tables (and the device's name) appended to BENCHMARKS.md.
set -uo pipefail

usage() {
    cat <<'EOF'
Usage: bash bench/gpu_acceptance.sh [--quick] [--check] [--record | --no-record] [-h | --help]

Runs, from the repository root, on a machine with a copy of the working tree:
  1. its own virtual environment (GPU_ACCEPTANCE_VENV, default .venv-gpu), which sees the
     system's packages, holding torch 2.13.0 (the version the tests run) with CUDA: taken from
     the system when it is that build, else installed into the venv (PyPI's Linux wheel of
     torch 2.13.0 is a CUDA 13.0 build; GPU_ACCEPTANCE_TORCH_INDEX names another wheel index,
     e.g. one of CUDA 12.x builds for a driver older than 580);
  2. the GPU check: when nvidia-smi lists a GPU, torch must run a matrix product on every GPU
     it sees, or the script stops (exit 3) with one line giving the driver version and
     torch.cuda.get_arch_list(). It never falls back to the CPU when a GPU is listed;
  3. the package's test dependencies (`pip install -e ".[test]"`, only when one is missing);
  4. the CUDA test tier, `pytest -m cuda tests`: on a GPU it must pass at least one test and
     fail none;
  5. bench/refine_throughput.py: the 824 VoiceBank-like files, the published-size model, ddim200,
     every precision and switch, and the original code's strategy in the same run; it prints the
     fastest configuration whose refined audio stays within tolerance of fp32's (the candidate
     for the default precision on CUDA, which stays fp32 until a GPU run has measured this);
  6. bench/train_throughput.py.
Tables go to BENCHMARKS.md on a GPU (--no-record: print only); on a CPU only with --record.
Where nvidia-smi is absent or lists no GPU, the run is a CPU smoke test and says so.

--quick   a subset sized to finish within 8 minutes on one H100: the whole CUDA tier, 412 of the
          files at ddim5 in six configurations (no --compile / --cuda-graphs, whose compilation
          takes minutes) and 5 training steps per precision. BENCHMARKS.md ("GPU acceptance")
          gives the estimate, stage by stage. On a CPU: the small stand-in model, 2 files,
          2 steps; a few minutes, so the script cannot rot unnoticed.
--check   steps 1 and 2 only: is this machine's GPU usable by the pinned torch?

Every stage prints its wall time.

Exit status: 0 when every stage succeeded, 1 when one failed (the others still run), 2 for a
wrong option, 3 when the environment cannot run the acceptance (the pinned torch or the test
dependencies cannot be installed, or a listed GPU cannot be used by torch), with one line on
stderr saying why.
EOF
}

quick=0
check_only=0
record=auto
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --check) check_only=1 ;;
        --record) record=1 ;;
        --no-record) record=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TORCH_VERSION=2.13.0  # the version .ci/run installs and the test suite runs
VENV="${GPU_ACCEPTANCE_VENV:-$ROOT/.venv-gpu}"
PY="$VENV/bin/python"
status=0
start_all=$SECONDS

# One line on stderr, and no stage runs: this is not a result, the environment cannot give one.
refuse() { echo "gpu_acceptance: error: $*" >&2; exit 3; }

# --- what nvidia-smi lists: one CSV line per GPU (index, name, compute capability, driver) ---
listed=()
if command -v nvidia-smi >/dev/null 2>&1; then
    if smi=$(nvidia-smi --query-gpu=index,name,compute_cap,driver_version --format=csv,noheader 2>&1); then
        mapfile -t listed < <(grep . <<<"$smi")
    elif ! grep -q "No devices were found" <<<"$smi"; then
        # nvidia-smi is there but cannot reach the driver: a GPU machine whose GPUs nothing can use.
        refuse "nvidia-smi fails, so no GPU can be used: $(head -n 1 <<<"$smi")"
    fi
fi
gpu=0
[[ ${#listed[@]} -gt 0 ]] && gpu=1

# --- 1. the venv and the pinned torch ---
pinned_torch_ok() {  # torch $TORCH_VERSION importable in the venv; with CUDA when a GPU is listed
    "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION' or ($gpu and not torch.version.cuda))" 2>/dev/null
}
if [[ ! -x "$PY" ]]; then
    # --system-site-packages: a machine that already has the pinned torch (3 GB with its CUDA
    # libraries) and the test dependencies needs no download.
    "${PYTHON:-python3}" -m venv --system-site-packages "$VENV" >/dev/null \
        || refuse "could not create the venv $VENV with ${PYTHON:-python3} -m venv (Debian/Ubuntu: apt-get install python3-venv)"
fi
if ! pinned_torch_ok; then
    index=()
    [[ -n "${GPU_ACCEPTANCE_TORCH_INDEX:-}" ]] && index=(--index-url "$GPU_ACCEPTANCE_TORCH_INDEX")
    echo "installing torch==$TORCH_VERSION into $VENV"
    # --ignore-installed: a system torch of another version or a CPU build must not satisfy it.
    "$PY" -m pip install -q --ignore-installed ${index[@]+"${index[@]}"} "torch==$TORCH_VERSION" \
        || refuse "could not install torch==$TORCH_VERSION into $VENV (offline? GPU_ACCEPTANCE_TORCH_INDEX=${GPU_ACCEPTANCE_TORCH_INDEX:-unset})"
    pinned_torch_ok || refuse "$VENV has $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -n 1), not torch $TORCH_VERSION$( ((gpu)) && echo ' with CUDA')"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# --- 2. the GPU check ---
if [[ $gpu == 1 ]]; then
    problem=$("$PY" -c 'import sys; sys.path.insert(0, "bench"); from common import cuda_problem
print(cuda_problem(sys.argv[1:]) or "")' "${listed[@]}" 2>"$VENV/gpu-check.err") \
        || refuse "the GPU check itself failed: $(tail -n 1 "$VENV/gpu-check.err")"
    [[ -z "$problem" ]] || refuse "$problem. A CPU run does not replace a GPU run: fix the driver or the torch build, then run again."
    echo "GPU check passed: ${listed[*]}"
    mode="GPU run"
else
    echo "no GPU listed by nvidia-smi: a CPU smoke run, which proves nothing about GPUs"
    mode="CPU smoke run (no GPU listed)"
fi
[[ $check_only == 1 ]] && exit 0

stage() {  # stage NAME COMMAND...: run, time and report one stage; a failure is remembered
    local name="$1" start=$SECONDS
    shift
    echo
    echo "=== $name"
    "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [[ $rc -eq 0 ]] || status=1
    return $rc
}

install_missing() {
    if ! "$PY" -c "import diffiner, numpy, scipy, soundfile, soxr, tqdm, yaml, pytest" 2>/dev/null; then
        # The constraint keeps the checked torch while pip resolves the package's own "torch>=1.11".
        echo "torch==$("$PY" -c 'import torch; print(torch.__version__)')" > "$VENV/torch-constraint.txt"
        "$PY" -m pip install -q -c "$VENV/torch-constraint.txt" -e ".[test]" || return 1
    fi
}
stage "install what is missing" install_missing || refuse "could not install the test dependencies into $VENV"

logged() {  # logged LOG COMMAND...: run COMMAND, its output (stdout and stderr) shown and copied to LOG
    local log="$1"
    shift
    "$@" 2>&1 | tee "$log"  # with pipefail: COMMAND's failure is the pipeline's
}

device=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import machine_description; print(machine_description())")
echo "device: $device"
[[ $gpu == 1 ]] && nvidia-smi
[[ "$record" == auto ]] && record=$gpu
record_flag=()
[[ "$record" == 1 ]] || record_flag=(--no-record)

tier_log=$(mktemp)
stage "CUDA tier: pytest -m cuda tests" logged "$tier_log" "$PY" -m pytest -q -m cuda tests -rs -p no:cacheprovider
tier_summary=$(grep -E "(passed|failed|skipped|error)" "$tier_log" | tail -n 1)
if [[ $gpu == 1 ]] && ! grep -qE "[1-9][0-9]* passed" <<<"$tier_summary"; then
    echo "error: on a GPU the CUDA tier must pass tests, and it passed none: ${tier_summary:-no result}" >&2
    status=1
fi

original="original (768 frames; fp32; batch 8)"
refine_args=()
train_args=()
if [[ $gpu == 1 ]]; then
    refine_args=(--device cuda)
    train_args=(--device cuda)
fi
if [[ $quick == 1 && $gpu == 1 ]]; then
    refine_args+=(--num-files 412 --steps 5 --configs "fp32,bf16,fp16,fp32+channels-last,bf16+channels-last,$original")
    train_args+=(--steps 5 --warmup 2 --configs "fp32,bf16,fp16")
elif [[ $quick == 1 ]]; then
    refine_args+=(--num-files 2 --steps 2 --configs "fp32,bf16,$original")
    train_args+=(--steps 2 --configs "fp32,bf16")
fi
refine_log=$(mktemp)
stage "refinement throughput" logged "$refine_log" \
    "$PY" bench/refine_throughput.py ${refine_args[@]+"${refine_args[@]}"} ${record_flag[@]+"${record_flag[@]}"}
fastest=$(grep -E "^(Fastest configuration|No configuration)" "$refine_log" | tail -n 1)
stage "training throughput" "$PY" bench/train_throughput.py ${train_args[@]+"${train_args[@]}"} \
    ${record_flag[@]+"${record_flag[@]}"}

summary="GPU acceptance, $mode: $((SECONDS - start_all)) s in all; CUDA tier: ${tier_summary:-no result}; ${fastest:-no refinement result}"
echo
echo "$summary"
if [[ "$record" == 1 ]]; then
    results="- $mode
- CUDA tier (\`pytest -m cuda tests\`): ${tier_summary:-no result}
- ${fastest:-no refinement result}
- Wall time of the whole script: $((SECONDS - start_all)) s"
    # bench/common.py's record() writes the heading, the machine and the command line.
    "$PY" -c 'import sys; sys.path.insert(0, "bench"); from common import record
record("GPU acceptance", sys.argv[2], command=sys.argv[1])' "bash bench/gpu_acceptance.sh $*" "$results" || status=1
fi
rm -f "$tier_log" "$refine_log"
exit $status
