#!/usr/bin/env bash
# shellcheck disable=SC2317
# (SC2317, "unreachable": the functions that stage runs through "$@" are reached indirectly.)
# One-command GPU acceptance: the CUDA test tier, then the refinement and training benchmarks,
# with their tables (and the device's name) appended to BENCHMARKS.md.
set -uo pipefail

usage() {
    cat <<'EOF'
Usage: bash bench/gpu_acceptance.sh [--quick] [--record | --no-record] [-h | --help]

Runs, from the repository root, on a machine with a copy of the working tree:
  1. installs what is missing: torch (only when it cannot be imported; PyPI's Linux wheel is a
     CUDA build), then the package's dependencies with `pip install -e ".[test]"` (only when one
     of them cannot be imported, so a machine that has them needs no network);
  2. the CUDA test tier, `pytest -m cuda tests` (skipped, with the reason, without a GPU);
  3. bench/refine_throughput.py: the 824 VoiceBank-like files, the published-size model, ddim200,
     every precision and switch, and the original code's strategy in the same run; it prints the
     fastest configuration whose refined audio stays within tolerance of fp32's (the candidate
     for the default precision on CUDA, which stays fp32 until a GPU run has measured this);
  4. bench/train_throughput.py.
Tables go to BENCHMARKS.md on a GPU (--no-record: print only); on a CPU only with --record.

--quick   a subset that fits in one command of at most 10 minutes on one H100: all 824 files at
          ddim5 instead of ddim200, without --compile / --cuda-graphs (their compilation takes
          minutes), and 5 training steps per precision. On a CPU: the small stand-in model,
          2 files, 2 steps; it finishes in a few minutes, so the script cannot rot unnoticed.

How long the full run takes on one H100 is estimated from FLOP counts in BENCHMARKS.md
(section "GPU acceptance"); every stage prints its wall time.

Exit status: 0 when every stage succeeded, 1 when one failed (the others still run), 2 for a
wrong option.
EOF
}

quick=0
record=auto
for arg in "$@"; do
    case "$arg" in
        --quick) quick=1 ;;
        --record) record=1 ;;
        --no-record) record=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
status=0
start_all=$SECONDS

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
    if ! "$PY" -c "import torch" 2>/dev/null; then
        "$PY" -m pip install torch || return 1
    fi
    if ! "$PY" -c "import diffiner, numpy, scipy, soundfile, soxr, tqdm, yaml, pytest" 2>/dev/null; then
        "$PY" -m pip install -e ".[test]" || return 1
    fi
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU visible:', torch.cuda.is_available())"
}
stage "install what is missing" install_missing || exit 1

logged() {  # logged LOG COMMAND...: run COMMAND, its output (stdout and stderr) shown and copied to LOG
    local log="$1"
    shift
    "$@" 2>&1 | tee "$log"  # with pipefail: COMMAND's failure is the pipeline's
}

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
device=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import machine_description; print(machine_description())")
echo "device: $device"
command -v nvidia-smi >/dev/null && nvidia-smi
[[ "$record" == auto ]] && record=$cuda
record_flag=()
[[ "$record" == 1 ]] || record_flag=(--no-record)

tier_log=$(mktemp)
stage "CUDA tier: pytest -m cuda tests" logged "$tier_log" "$PY" -m pytest -q -m cuda tests -rs -p no:cacheprovider
tier_summary=$(grep -E "(passed|failed|skipped|error)" "$tier_log" | tail -n 1)

original="original (768 frames; fp32; batch 8)"
refine_args=()
train_args=()
if [[ $quick == 1 && $cuda == 1 ]]; then
    refine_args=(--steps 5 --configs "fp32,bf16,fp16,fp32+channels-last,bf16+channels-last,$original")
    train_args=(--steps 5 --warmup 2 --configs "fp32,bf16,fp16")
elif [[ $quick == 1 ]]; then
    refine_args=(--num-files 2 --steps 2 --configs "fp32,bf16,$original")
    train_args=(--steps 2 --configs "fp32,bf16")
fi
refine_log=$(mktemp)
stage "refinement throughput" logged "$refine_log" \
    "$PY" bench/refine_throughput.py ${refine_args[@]+"${refine_args[@]}"} ${record_flag[@]+"${record_flag[@]}"}
fastest=$(grep -E "^(Fastest configuration|No configuration)" "$refine_log" | tail -n 1)
stage "training throughput" "$PY" bench/train_throughput.py ${train_args[@]+"${train_args[@]}"} \
    ${record_flag[@]+"${record_flag[@]}"}

summary="GPU acceptance: $((SECONDS - start_all)) s in all; CUDA tier: ${tier_summary:-no result}; ${fastest:-no refinement result}"
echo
echo "$summary"
if [[ "$record" == 1 ]]; then
    results="- CUDA tier (\`pytest -m cuda tests\`): ${tier_summary:-no result}
- ${fastest:-no refinement result}
- Wall time of the whole script: $((SECONDS - start_all)) s"
    # bench/common.py's record() writes the heading, the machine and the command line.
    "$PY" -c 'import sys; sys.path.insert(0, "bench"); from common import record
record("GPU acceptance", sys.argv[2], command=sys.argv[1])' "bash bench/gpu_acceptance.sh $*" "$results" || status=1
fi
rm -f "$tier_log" "$refine_log"
exit $status
