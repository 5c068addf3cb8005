#!/usr/bin/env bash
# Compatibility job: run the core and training tests on Python 3.8 + torch 1.11.0,
# the environment of the authors' Docker image (Dockerfile_torch1p11_diffiner).
#
# Usage:
#   bash .ci/compat.sh [TEST_FILE ...] [-- PYTEST_ARGS ...]
#   bash .ci/compat.sh --setup-only          # build/refresh the venv, run nothing
#
# With no test files, runs the defaults below (or $COMPAT_TESTS, space-separated);
# files that do not exist yet are skipped with a note. Always adds -m "not slow".
#
# Environment:
#   COMPAT_VENV        venv location (default .venv-py38 in the repo root, git-ignored);
#                      reused when it already holds Python 3.8 + torch 1.11
#   COMPAT_PYTHON      a Python 3.8 interpreter to use instead of searching for one
#   COMPAT_WHEELHOUSE  folder keeping downloaded wheels between runs (default
#                      ${XDG_CACHE_HOME:-~/.cache}/diffiner-compat/wheels; "" disables).
#                      pip's own HTTP cache does not help here: the package proxy of this
#                      workplace sends no cache headers, so pip never stores the 750 MB
#                      torch wheel. With a full wheelhouse the install also works offline.
#   COMPAT_TORCH_INDEX optional extra index holding CPU builds (e.g. the PyTorch CPU wheel
#                      index); when set, torch==1.11.0+cpu (~170 MB) is installed instead of
#                      the PyPI wheel. PyPI itself has no x86_64 CPU-only build of 1.11.0:
#                      its manylinux1 wheel is the CUDA 10.2 build (750 MB), which runs fine
#                      on CPU. Not reachable from this workplace, so untested here.
#   COMPAT_PIP_EXTRA   extra requirements (space-separated), e.g. a pytest plugin that the
#                      repo's pytest config needs
#   COMPAT_TESTS       default test files (space-separated)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEFAULT_TESTS="tests/test_unet.py tests/test_diffusion.py tests/test_spectrogram.py tests/test_refiner.py tests/test_pipeline.py tests/test_run_refiner.py tests/test_acceleration.py tests/test_speech_datasets.py tests/test_train.py tests/test_dist.py tests/test_schedule_sampler.py tests/test_sample.py tests/test_oom.py tests/test_failures.py tests/test_no_sync.py tests/test_end_of_file.py tests/test_checkpoint_sets.py tests/test_train_signals.py tests/test_layout.py tests/test_methods.py tests/test_model_settings.py tests/test_flags.py tests/test_run_locks.py tests/test_streaming.py tests/test_crossover.py tests/test_pretrained.py tests/test_output_records.py"
VENV="${COMPAT_VENV:-.venv-py38}"
WHEELHOUSE="${COMPAT_WHEELHOUSE-${XDG_CACHE_HOME:-$HOME/.cache}/diffiner-compat/wheels}"

TORCH_VERSION="1.11.0"
if [[ -n "${COMPAT_TORCH_INDEX:-}" ]]; then
    TORCH_REQ="torch==${TORCH_VERSION}+cpu"
else
    TORCH_REQ="torch==${TORCH_VERSION}"
fi
# The newest releases that install and import on Python 3.8 next to torch 1.11
# (tested 2026-11). numpy 2.x needs Python >= 3.9 and breaks torch 1.x's ABI anyway;
# numpy 1.24.4, scipy 1.10.1, soxr 0.3.7 and pytest 8.3.5 are the last for 3.8.
# soundfile's manylinux wheel bundles libsndfile (1.2.2), so no system library is needed.
REQS=(
    "numpy==1.24.4"
    "scipy==1.10.1"
    "soundfile==0.13.1"
    "soxr==0.3.7"
    "tqdm==4.70.1"
    "PyYAML==6.0.3"
    "pytest==8.3.5"
    # build backend for the offline editable install below (PEP 660 needs setuptools >= 64)
    "setuptools==75.3.4"
    "wheel==0.45.1"
)
if [[ -n "${COMPAT_PIP_EXTRA:-}" ]]; then
    read -r -a extra_reqs <<< "$COMPAT_PIP_EXTRA"
    REQS+=("${extra_reqs[@]}")
fi

log() { printf '[compat] %s\n' "$*"; }
die() { printf '[compat] ERROR: %s\n' "$*" >&2; exit 2; }

setup_only=0
tests=()
pytest_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --setup-only) setup_only=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; pytest_args+=("$@"); break ;;
        -*) pytest_args+=("$1") ;;
        *) tests+=("$1") ;;
    esac
    shift
done

is_py38() { [[ -x "$1" ]] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' 2>/dev/null; }

find_python38() {
    local cand roots=()
    if [[ -n "${COMPAT_PYTHON:-}" ]]; then
        is_py38 "$COMPAT_PYTHON" || die "COMPAT_PYTHON=$COMPAT_PYTHON is not a working Python 3.8"
        echo "$COMPAT_PYTHON"; return
    fi
    if command -v pyenv >/dev/null 2>&1; then roots+=("$(pyenv root)"); fi
    roots+=("${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv)
    for root in "${roots[@]}"; do
        # newest 3.8.x first
        while IFS= read -r cand; do
            if is_py38 "$cand"; then echo "$cand"; return; fi
        done < <(compgen -G "$root/versions/3.8*/bin/python3.8" | sort -rV)
    done
    cand="$(command -v python3.8 || true)"
    if [[ -n "$cand" ]] && is_py38 "$cand"; then echo "$cand"; return; fi
    die "no Python 3.8 interpreter found (looked in \$(pyenv root)/versions/3.8*, ~/.pyenv, /root/.pyenv and python3.8 on PATH). Install one (e.g. 'pyenv install 3.8') or set COMPAT_PYTHON=/path/to/python3.8."
}

venv_has_torch111() {
    [[ -x "$VENV/bin/python" ]] && is_py38 "$VENV/bin/python" &&
        "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('${TORCH_VERSION}'))" 2>/dev/null
}

# pip options common to every call: quiet progress for CI logs, no version nag.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# Keep the caller's environment out of the 3.8 interpreter.
unset PYTHONPATH PYTHONHOME
export PYTHONNOUSERSITE=1

# pip install REQ... using (and filling) the wheelhouse when there is one.
pip_install() {
    local pip=("$VENV/bin/python" -m pip)
    local idx=()
    if [[ -n "${COMPAT_TORCH_INDEX:-}" ]]; then idx=(--extra-index-url "$COMPAT_TORCH_INDEX"); fi
    if [[ -z "$WHEELHOUSE" ]]; then
        "${pip[@]}" install -q "${idx[@]}" "$@"
        return
    fi
    mkdir -p "$WHEELHOUSE"
    # 'pip download' resolves against the index but skips files already in the wheelhouse.
    if ! "${pip[@]}" download -q --prefer-binary "${idx[@]}" -d "$WHEELHOUSE" "$@"; then
        log "download failed (offline?); trying the wheelhouse alone"
    fi
    "${pip[@]}" install -q --no-index --find-links "$WHEELHOUSE" "$@"
}

t_start=$SECONDS
STAMP="$VENV/.diffiner-compat-stamp"
stamp_text="$(printf '%s\n' "$TORCH_REQ" "${REQS[@]}")"

if venv_has_torch111; then
    log "reusing $VENV ($("$VENV/bin/python" -c 'import sys, torch; print("Python %d.%d.%d" % sys.version_info[:3], "torch", torch.__version__)'))"
else
    PY38="$(find_python38)"
    if [[ -e "$VENV" ]]; then
        [[ -f "$VENV/pyvenv.cfg" ]] || die "$VENV exists and is not a virtualenv; remove it or set COMPAT_VENV"
        log "recreating $VENV (no working Python 3.8 + torch $TORCH_VERSION in it)"
        rm -rf "$VENV"
    fi
    log "creating $VENV with $PY38"
    "$PY38" -m venv "$VENV" || die "'$PY38 -m venv' failed (Debian/Ubuntu: install python3.8-venv)"
    # pip 25.0.1 is the last pip for 3.8; the bundled 23.0 works as well, so a failure is not fatal.
    pip_install "pip==25.0.1" || log "could not upgrade pip; keeping the bundled one"
fi

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$stamp_text" ]]; then
    t_pip=$SECONDS
    log "installing $TORCH_REQ ${REQS[*]}"
    # torch is always named so that pip keeps it at 1.11.0 while resolving the rest.
    pip_install "$TORCH_REQ" "${REQS[@]}"
    log "packages installed in $((SECONDS - t_pip)) s"
    printf '%s\n' "$stamp_text" > "$STAMP"
fi

if [[ -f setup.py || -f pyproject.toml ]]; then
    # PEP 660 editable install built with the venv's own setuptools: no network, ~1 s.
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --use-pep517 -e .
else
    log "no setup.py/pyproject.toml yet: importing the package through PYTHONPATH"
    export PYTHONPATH="$ROOT"
fi
"$VENV/bin/python" -c 'import sys, torch, numpy; print("[compat] Python %d.%d.%d" % sys.version_info[:3], "torch", torch.__version__, "numpy", numpy.__version__)'
log "environment ready in $((SECONDS - t_start)) s"

if [[ $setup_only -eq 1 ]]; then exit 0; fi

if [[ ${#tests[@]} -eq 0 ]]; then read -r -a tests <<< "${COMPAT_TESTS:-$DEFAULT_TESTS}"; fi
run_tests=()
for t in "${tests[@]}"; do
    if [[ -e "${t%%::*}" ]]; then run_tests+=("$t"); else log "skipping $t (does not exist yet)"; fi
done
if [[ ${#run_tests[@]} -eq 0 ]]; then
    log "none of the test files exist yet; nothing to run"
    exit 0
fi

t_tests=$SECONDS
rc=0
"$VENV/bin/python" -m pytest -q -m "not slow" "${pytest_args[@]}" "${run_tests[@]}" || rc=$?
log "tests took $((SECONDS - t_tests)) s (exit $rc)"
if [[ $rc -eq 5 ]]; then
    log "no test was collected (all deselected by -m 'not slow'?)"
    rc=0
fi
exit "$rc"
