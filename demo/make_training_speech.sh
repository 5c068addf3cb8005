#!/usr/bin/env bash
# Makes the clean-speech training set of the demo model: espeak-ng sentences from word lists
# written for this project, several voices, speeds and pitches, resampled to 16 kHz.
#
#   bash demo/make_training_speech.sh OUT_DIR [NUM_UTTERANCES]   (default 400)
#
# Deterministic for a given espeak-ng version (the shipped model used espeak-ng 1.51). None of
# the demo's test sentences (demo/audio/clean) are produced here: the model never hears them.
set -euo pipefail

out="${1:?usage: $0 OUT_DIR [NUM_UTTERANCES]}"
count="${2:-400}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_path="${python_path:-python3}"
command -v espeak-ng >/dev/null || { echo "espeak-ng not found (Debian/Ubuntu: apt-get install espeak-ng)" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# One line per utterance: name, voice, speed, pitch, sentence (tab separated).
"$python_path" - "$count" >"$tmp/script.tsv" <<'PY'
import random
import sys

subjects = ["the old farmer", "my neighbour", "a young student", "the pilot", "our teacher", "the baker",
            "a tired driver", "the small dog", "her brother", "the city council", "a quiet child", "the doctor"]
verbs = ["painted", "carried", "found", "opened", "cleaned", "watched", "repaired", "ordered", "borrowed",
         "described", "measured", "forgot"]
objects = ["a wooden chair", "the green window", "seven apples", "the broken radio", "a long letter",
           "the heavy boxes", "an empty bottle", "the garden gate", "a paper map", "the silver key"]
endings = ["before lunch", "in the morning", "after the storm", "near the station", "without a word",
           "on Sunday", "at the market", "for the second time", "in the kitchen", "by the river"]
voices = ["en-us", "en-gb", "en+f2", "en+f3", "en+m3", "en-us+f4", "en-gb-scotland", "en-us+m5",
          "en+f5", "en-gb-x-rp", "en-029", "en-us+m2"]
rng = random.Random(2023)
for k in range(int(sys.argv[1])):
    words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(endings)]
    sentence = " ".join(words).capitalize() + rng.choice([".", ".", "?", "!"])
    print(f"train_{k:04d}\t{rng.choice(voices)}\t{rng.randint(130, 185)}\t{rng.randint(30, 70)}\t{sentence}")
PY

mkdir -p "$tmp/wav"
while IFS=$'\t' read -r name voice speed pitch sentence; do
    espeak-ng -v "$voice" -s "$speed" -p "$pitch" -w "$tmp/wav/$name.wav" "$sentence"
done <"$tmp/script.tsv"
PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$python_path" -m diffiner.commands.resample_audio "$tmp/wav" "$out" --rate 16000
cp "$tmp/script.tsv" "$out/sentences.tsv"
echo "wrote $count utterances to $out"
